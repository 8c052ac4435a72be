//! The session on one connection: lines in, each served (or throttled), one record on
//! stdout and one reply out per answered line.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::record::ServeRecord;
use evesnap::exit::Exit;
use evesnap::request::{Op, Reply, MAX_REQUEST_LINE};

use super::handle::{Served, Server};
use super::identify;
use super::lines::{Line, Lines};
use super::listen;
use super::rate::Guest;

/// How often a blocked read looks at the signals.
const READ_TICK: Duration = Duration::from_millis(250);
/// A guest that does not read its replies cannot block the listener longer than this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a session on one connection ended.
pub(super) enum End {
    Stop,
    Closed,
    Broken(std::io::Error),
}

fn record(served: &Served, line: Line<'_>) {
    let entry = serde_json::to_string(&ServeRecord::of(served, line)).unwrap_or_default();
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{entry}").and_then(|()| stdout.flush());
    match &served.reply.error {
        None => evesnap::note!(
            "request {}: {} done",
            served.reply.id.as_deref().unwrap_or("-"),
            served.reply.op.map_or("?", Op::as_str)
        ),
        Some(e) => evesnap::note!(
            "request {}: refused ({}): {}",
            served.reply.id.as_deref().unwrap_or("-"),
            e.kind,
            e.message
        ),
    }
}

fn oversized() -> Served {
    let message = format!("request line longer than {MAX_REQUEST_LINE} bytes: dropped");
    Served {
        request: None,
        reply: Reply::failure(
            None,
            None,
            identify::refuse("bad-request", Exit::Usage, message),
        ),
        report: None,
        rated: false,
    }
}

fn send(stream: &mut impl Write, reply: &Reply) -> std::io::Result<()> {
    // The leading newline ends any half line an interrupted write left in the pipe.
    let mut bytes = b"\n".to_vec();
    bytes.extend(reply.to_line());
    stream.write_all(&bytes)?;
    stream.flush()
}

/// Read and write timeouts on a socket of any family (AF_UNIX, AF_VSOCK).
fn set_timeouts(fd: &impl AsFd) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use nix::sys::time::{TimeVal, TimeValLike};
    let millis = |d: Duration| TimeVal::milliseconds(d.as_millis() as i64);
    setsockopt(fd, sockopt::ReceiveTimeout, &millis(READ_TICK))?;
    setsockopt(fd, sockopt::SendTimeout, &millis(WRITE_TIMEOUT))?;
    Ok(())
}

impl Server {
    /// Serves the requests on one connection. `one_request` (the vsock transports): the
    /// connection ends after its first reply, or unanswered after
    /// [`listen::CONNECTION_IDLE`] without one. `guest` (the VM's rates) outlives the
    /// connection, so that requests and garbage spread over many connections are rated as
    /// one flood.
    pub(super) fn session<S: Read + Write + AsFd>(
        &mut self,
        mut stream: S,
        one_request: bool,
        guest: &mut Guest,
    ) -> End {
        if let Err(e) = set_timeouts(&stream) {
            return End::Broken(e);
        }
        let opened = Instant::now();
        let mut lines = Lines::new(MAX_REQUEST_LINE);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if self.stop_requested() {
                return End::Stop;
            }
            if one_request && opened.elapsed() > listen::CONNECTION_IDLE {
                evesnap::warn!(
                    "a connection sent no request within {} s: closed",
                    listen::CONNECTION_IDLE.as_secs()
                );
                return End::Closed;
            }
            let n = match stream.read(&mut chunk) {
                Ok(0) => return End::Closed,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return End::Broken(e),
            };
            lines.push(&chunk[..n]);
            while let Some(line) = lines.next_line() {
                // A line that is no JSON object cannot be a request: once this second's
                // answers are spent it is only counted, not parsed, so that a flood costs
                // little more than cutting it into lines.
                if matches!(line, Line::Text(text) if text[0] != b'{') && guest.bad_lines.spent() {
                    let _ = guest.bad_lines.admit(); // counted, reported when the second ends
                    continue;
                }
                let served = match line {
                    Line::Oversized => oversized(),
                    Line::Text(text) => self.handle_line(text, guest),
                };
                // A request that went to work is always recorded; garbage is answered and
                // recorded only up to a rate, a rate-limited request always answered.
                let recorded = if served.request.is_none() || served.rated {
                    let (admitted, suppressed) = guest.bad_lines.admit();
                    if let Some(n) = suppressed {
                        evesnap::warn!(
                            "{n} bad lines (not answered) or rate-limited requests from the guest in the last second were not recorded"
                        );
                    }
                    admitted
                } else {
                    true
                };
                if !recorded && served.request.is_none() {
                    continue;
                }
                if recorded {
                    record(&served, line);
                }
                if let Err(e) = send(&mut stream, &served.reply) {
                    return End::Broken(e);
                }
                if one_request {
                    return End::Closed;
                }
                if self.stop_requested() {
                    return End::Stop;
                }
            }
        }
    }
}
