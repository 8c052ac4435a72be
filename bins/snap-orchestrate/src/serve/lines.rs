//! The guest's byte stream cut into request lines, in time linear in the input: a guest
//! that floods its port can cost the host no more than reading it once, and a bad line
//! costs a reply, a record and a log line only up to a rate ([`Throttle`]).

use std::time::{Duration, Instant};

/// What the stream held next.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, without its newline and surrounding white space; never empty.
    Text(&'a [u8]),
    /// A line longer than the limit began; the rest of it is skipped as it comes.
    Oversized,
}

/// Accumulates chunks and hands out complete lines.
#[derive(Debug)]
pub struct Lines {
    buf: Vec<u8>,
    /// Where the next line starts in `buf`.
    start: usize,
    /// Where the search for a newline goes on (everything before has none).
    scanned: usize,
    max: usize,
    /// Inside an oversized line: skip up to its newline.
    skipping: bool,
}

impl Lines {
    pub fn new(max: usize) -> Lines {
        Lines {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max,
            skipping: false,
        }
    }

    /// Adds what was read. Consumed lines are dropped first, once per chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line or oversized start, if the buffer holds one.
    pub fn next_line(&mut self) -> Option<Line<'_>> {
        loop {
            let newline = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|at| self.scanned + at);
            let Some(end) = newline else {
                self.scanned = self.buf.len();
                let pending = self.buf.len() - self.start;
                if self.skipping {
                    self.start = self.buf.len();
                } else if pending > self.max {
                    self.skipping = true;
                    self.start = self.buf.len();
                    return Some(Line::Oversized);
                }
                return None;
            };
            let (from, skipping) = (self.start, std::mem::take(&mut self.skipping));
            self.start = end + 1;
            self.scanned = end + 1;
            if skipping {
                continue; // the end of an oversized line, answered already
            }
            if end - from > self.max {
                return Some(Line::Oversized);
            }
            let line = &self.buf[from..end];
            let lead = line.iter().take_while(|b| b.is_ascii_whitespace()).count();
            if lead == line.len() {
                continue;
            }
            let trail = line
                .iter()
                .rev()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            return Some(Line::Text(&self.buf[from + lead..end - trail]));
        }
    }
}

/// At most `per_second` bad lines get a reply, a record and a log line each second; the
/// rest are counted and reported once a second.
#[derive(Debug)]
pub struct Throttle {
    per_second: u32,
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl Throttle {
    pub fn new(per_second: u32) -> Throttle {
        Throttle {
            per_second,
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether this second's answers are all used up: a bad line now would only be counted.
    pub fn spent(&self) -> bool {
        self.used >= self.per_second && self.window.elapsed() < Duration::from_secs(1)
    }

    /// Whether this bad line may be answered; when a new second starts, also how many
    /// were suppressed in the one before (to be reported once).
    pub fn admit(&mut self) -> (bool, Option<u64>) {
        let mut report = None;
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.used = 0;
            if self.suppressed > 0 {
                report = Some(std::mem::take(&mut self.suppressed));
            }
        }
        if self.used < self.per_second {
            self.used += 1;
            (true, report)
        } else {
            self.suppressed += 1;
            (false, report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(lines: &mut Lines) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = lines.next_line() {
            out.push(match line {
                Line::Text(t) => String::from_utf8_lossy(t).into_owned(),
                Line::Oversized => "<oversized>".into(),
            });
        }
        out
    }

    #[test]
    fn the_throttle_is_spent_after_its_lines_for_the_second() {
        let mut throttle = Throttle::new(2);
        assert!(!throttle.spent());
        assert_eq!(throttle.admit(), (true, None));
        assert_eq!(throttle.admit(), (true, None));
        assert!(throttle.spent());
        assert_eq!(throttle.admit(), (false, None));
        throttle.window -= Duration::from_secs(1);
        assert!(!throttle.spent());
        assert_eq!(throttle.admit(), (true, Some(1)));
    }

    #[test]
    fn lines_across_chunks_blank_lines_and_white_space() {
        let mut lines = Lines::new(16);
        lines.push(b"\n  {\"a\"");
        assert!(all(&mut lines).is_empty());
        lines.push(b":1} \n\n\nnext\nhalf");
        assert_eq!(all(&mut lines), ["{\"a\":1}", "next"]);
        lines.push(b" line\n");
        assert_eq!(all(&mut lines), ["half line"]);
    }

    #[test]
    fn an_oversized_line_is_reported_once_and_skipped_to_its_end() {
        let mut lines = Lines::new(8);
        lines.push(b"0123456789");
        assert_eq!(all(&mut lines), ["<oversized>"]);
        lines.push(b"more of the same line");
        assert!(all(&mut lines).is_empty());
        lines.push(b" end\nok\n0123456789abc\nok2\n");
        assert_eq!(all(&mut lines), ["ok", "<oversized>", "ok2"]);
    }

    #[test]
    fn a_flood_costs_time_linear_in_its_size() {
        // 8 MiB of "y\n" in 64 KiB chunks, as `yes` writes them: each byte is looked at a
        // bounded number of times (the old listener drained from the front per line).
        let chunk: Vec<u8> = b"y\n".repeat(32 * 1024);
        let mut lines = Lines::new(64 * 1024);
        let mut count = 0usize;
        for _ in 0..128 {
            lines.push(&chunk);
            while let Some(line) = lines.next_line() {
                assert_eq!(line, Line::Text(b"y"));
                count += 1;
            }
        }
        assert_eq!(count, 128 * 32 * 1024);
        assert!(lines.buf.len() <= chunk.len(), "consumed lines are dropped");
    }

    #[test]
    fn the_throttle_admits_a_rate_and_reports_the_rest() {
        let mut t = Throttle::new(3);
        let admitted: Vec<bool> = (0..5).map(|_| t.admit().0).collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        t.window -= Duration::from_secs(1);
        assert_eq!(t.admit(), (true, Some(2)));
    }
}
