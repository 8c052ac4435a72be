//! A VM's rates, kept in memory for as long as the listener runs: how many of its requests
//! are served (a token bucket, checked before the agent, QEMU or zfs is asked anything),
//! when it last tried a create (failed ones count toward `--guest-min-interval` too), and
//! how many of its bad lines and refused requests are recorded ([`Throttle`]).

use std::time::{Duration, Instant};

use evesnap::exit::Exit;
use evesnap::request::{Op, ReplyError, Request};

use super::identify::refuse;
use super::lines::Throttle;

/// Bad lines (garbage, oversized, invalid requests) answered per second, and refused
/// requests recorded per second; the rest are counted and dropped, so a guest flooding its
/// port cannot make the host write more than this many records and log lines a second.
const BAD_LINES_PER_SECOND: u32 = 20;

/// The request rate of `--guest-request-burst` and `--guest-request-interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRate {
    /// Requests a VM may make at once.
    pub burst: u32,
    /// After the burst, one more request per this long; zero: no limit.
    pub interval: Duration,
    /// `--guest-min-interval`: between two creates, failed or not.
    pub create_interval: Duration,
}

/// Tokens refilled one per `interval`, at most `burst`.
#[derive(Debug)]
struct Bucket {
    burst: u32,
    interval: Duration,
    tokens: u32,
    /// When the next token's interval began.
    since: Instant,
}

impl Bucket {
    fn new(burst: u32, interval: Duration, now: Instant) -> Bucket {
        Bucket {
            burst,
            interval,
            tokens: burst,
            since: now,
        }
    }

    /// Takes a token, or tells how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        if self.interval.is_zero() {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.since);
        let earned = elapsed.as_nanos() / self.interval.as_nanos();
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        if self.tokens.saturating_add(earned) >= self.burst {
            self.tokens = self.burst;
            self.since = now;
        } else if earned > 0 {
            self.tokens += earned;
            self.since += self.interval * earned;
        }
        if self.tokens == 0 {
            return Err(self.interval - now.saturating_duration_since(self.since));
        }
        self.tokens -= 1;
        Ok(())
    }
}

/// One VM's rates.
#[derive(Debug)]
pub struct Guest {
    /// What records and log lines its bad lines and refused requests get.
    pub bad_lines: Throttle,
    requests: Bucket,
    create_interval: Duration,
    last_create: Option<Instant>,
}

/// Whole seconds for `retry_after_s`, rounded up: a guest that waits that long is served.
fn seconds(wait: Duration) -> u32 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(whole.max(1)).unwrap_or(u32::MAX)
}

impl Guest {
    pub fn new(rate: &RequestRate) -> Guest {
        let now = Instant::now();
        Guest {
            bad_lines: Throttle::new(BAD_LINES_PER_SECOND),
            requests: Bucket::new(rate.burst, rate.interval, now),
            create_interval: rate.create_interval,
            last_create: None,
        }
    }

    /// The `rate-limited` refusal of `request` now, if any: too many requests, or a create
    /// too soon after the last one tried.
    pub fn admit(&mut self, request: &Request, now: Instant) -> Option<ReplyError> {
        if let Err(wait) = self.requests.take(now) {
            let wait = seconds(wait);
            return Some(limited(
                wait,
                format!("too many requests from this VM: retry in {wait} s"),
            ));
        }
        let ready = self.last_create.map(|at| at + self.create_interval);
        match ready {
            Some(ready) if request.op == Op::Create && now < ready => {
                let wait = seconds(ready - now);
                Some(limited(
                    wait,
                    format!("too soon after this VM's last create: retry in {wait} s"),
                ))
            }
            _ => None,
        }
    }

    /// A create goes ahead (it costs the host whether or not it ends in a snapshot).
    pub fn create_tried(&mut self, now: Instant) {
        self.last_create = Some(now);
    }
}

fn limited(wait: u32, message: String) -> ReplyError {
    let mut error = refuse("rate-limited", Exit::Busy, message);
    error.step = Some("budget".into());
    error.retry_after_s = Some(wait);
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(op: &str) -> Request {
        let line = format!(r#"{{"version":1,"id":"r","op":"{op}","disk":{{"path":"/d"}}}}"#);
        Request::from_line(line.as_bytes()).expect("a request")
    }

    #[test]
    fn the_bucket_serves_its_burst_then_one_per_interval() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut bucket = Bucket::new(2, second, start);
        assert_eq!(bucket.take(start), Ok(()));
        assert_eq!(bucket.take(start), Ok(()));
        assert_eq!(bucket.take(start), Err(second));
        let later = start + Duration::from_millis(400);
        assert_eq!(bucket.take(later), Err(Duration::from_millis(600)));
        assert_eq!(bucket.take(start + second), Ok(()));
        assert!(bucket.take(start + second).is_err());
        // A long pause refills to the burst, no more.
        let idle = start + 10 * second;
        assert_eq!(bucket.take(idle), Ok(()));
        assert_eq!(bucket.take(idle), Ok(()));
        assert!(bucket.take(idle).is_err());
        let mut open = Bucket::new(0, Duration::ZERO, start);
        assert_eq!(open.take(start), Ok(()), "interval 0: no limit");
    }

    #[test]
    fn a_create_tried_holds_the_next_one_whatever_came_of_it() {
        let rate = RequestRate {
            burst: 10,
            interval: Duration::from_secs(1),
            create_interval: Duration::from_secs(30),
        };
        let mut guest = Guest::new(&rate);
        let now = Instant::now();
        assert!(guest.admit(&request("create"), now).is_none());
        guest.create_tried(now);
        let later = now + Duration::from_millis(2500);
        let e = guest.admit(&request("create"), later).expect("too soon");
        assert_eq!((e.kind.as_str(), e.code), ("rate-limited", 8));
        assert_eq!(e.retry_after_s, Some(28));
        assert!(guest.admit(&request("list"), later).is_none());
        let ready = now + Duration::from_secs(30);
        assert!(guest.admit(&request("create"), ready).is_none());
    }

    #[test]
    fn waits_round_up_to_a_whole_second() {
        assert_eq!(seconds(Duration::from_millis(1)), 1);
        assert_eq!(seconds(Duration::ZERO), 1);
        assert_eq!(seconds(Duration::from_millis(1001)), 2);
        assert_eq!(seconds(Duration::from_secs(30)), 30);
    }
}
