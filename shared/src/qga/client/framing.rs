//! The framing on the wire: the `0xFF` + `guest-sync-delimited` handshake, requests
//! carrying ids, and replies read by id (stale output, other ids and garbage skipped) and
//! decoded (see the module documentation of [`crate::qga`] for the rules).

use std::time::{Duration, Instant};

use qapi::qga;
use serde_json::Value;

use super::Client;
use crate::qga::stream::WaitError;
use crate::qga::{AgentError, Error};

/// Byte that resets the agent's JSON parser and precedes a `guest-sync-delimited` reply.
const DELIMITER: u8 = 0xFF;

/// The first wait for a sync reply; doubled up to [`MAX_SYNC_ATTEMPT`] while the agent
/// is silent (guest booting, agent restarting).
const FIRST_SYNC_ATTEMPT: Duration = Duration::from_millis(500);
const MAX_SYNC_ATTEMPT: Duration = Duration::from_secs(2);

/// Why reading a reply stopped.
enum ReadError {
    Wait(WaitError),
    TooLong,
}

impl From<WaitError> for ReadError {
    fn from(e: WaitError) -> Self {
        ReadError::Wait(e)
    }
}

impl Client {
    fn wait_error(&mut self, e: WaitError, command: &str, started: Instant) -> Error {
        self.synced = false;
        match e {
            WaitError::Timeout => self.timeout_error(command, started),
            WaitError::Io(source) => Error::Disconnected {
                command: command.to_string(),
                source,
            },
        }
    }

    fn read_error(&mut self, e: ReadError, command: &str, started: Instant) -> Error {
        match e {
            ReadError::Wait(e) => self.wait_error(e, command, started),
            ReadError::TooLong => {
                self.synced = false;
                Error::ReplyTooLong {
                    command: command.to_string(),
                    limit: self.max_reply,
                }
            }
        }
    }

    /// Reads more bytes into the buffer.
    fn fill(&mut self, deadline: Instant) -> Result<(), WaitError> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.stream.read_some(&mut chunk, deadline)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next non-empty line (without delimiters and the line end).
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                self.scanned = 0;
                let line: Vec<u8> = line.into_iter().filter(|&b| b != DELIMITER).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_reply {
                // Drop what we have; the rest of the line is dropped by the next sync.
                self.buf.clear();
                self.scanned = 0;
                return Err(ReadError::TooLong);
            }
            self.fill(deadline)?;
        }
    }

    /// Drops everything up to and including the next delimiter byte.
    fn skip_to_delimiter(&mut self, deadline: Instant) -> Result<(), WaitError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == DELIMITER) {
                self.buf.drain(..=pos);
                self.scanned = 0;
                return Ok(());
            }
            self.buf.clear();
            self.scanned = 0;
            self.fill(deadline)?;
        }
    }

    fn request<C: qapi_spec::Command>(command: C, id: i64) -> Vec<u8> {
        let execute = qapi_spec::Execute::<C, i64>::with_id(command, id);
        // Commands are plain data: serialising them cannot fail.
        let mut bytes = serde_json::to_vec(&execute).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Resets the agent's parser and waits for the reply to a fresh
    /// `guest-sync-delimited`, skipping stale output; repeats while the agent is silent.
    pub(super) fn handshake(&mut self, deadline: Instant, started: Instant) -> Result<(), Error> {
        const SYNC: &str = "guest-sync-delimited";
        let mut attempt = FIRST_SYNC_ATTEMPT;
        loop {
            // Only the newest sync counts: the agent answers in order, so once its reply
            // is here, every older reply has been read and skipped.
            let id = self.fresh_id();
            let mut message = vec![DELIMITER];
            message.extend(Self::request(qga::guest_sync_delimited { id }, id));
            self.stream
                .write_all(&message, deadline)
                .map_err(|e| self.wait_error(e, SYNC, started))?;
            let attempt_deadline = deadline.min(Instant::now() + attempt);
            match self.await_sync(id, attempt_deadline) {
                Ok(()) => {
                    self.synced = true;
                    return Ok(());
                }
                Err(ReadError::Wait(WaitError::Timeout)) if Instant::now() < deadline => {
                    attempt = (attempt * 2).min(MAX_SYNC_ATTEMPT);
                }
                Err(e) => return Err(self.read_error(e, SYNC, started)),
            }
        }
    }

    fn await_sync(&mut self, id: i64, deadline: Instant) -> Result<(), ReadError> {
        loop {
            self.skip_to_delimiter(deadline)?;
            let line = match self.read_line(deadline) {
                Ok(line) => line,
                // A runaway line after a stray delimiter: dropped, keep looking.
                Err(ReadError::TooLong) => continue,
                Err(e) => return Err(e),
            };
            if let Ok(Value::Object(reply)) = serde_json::from_slice::<Value>(&line) {
                if reply.get("return").and_then(Value::as_i64) == Some(id) {
                    return Ok(());
                }
            }
        }
    }

    pub(super) fn send_and_await<C: qapi_spec::Command>(
        &mut self,
        command: C,
        deadline: Instant,
        started: Instant,
        reset_parser: bool,
    ) -> Result<C::Ok, Error> {
        let id = self.fresh_id();
        let mut message = Vec::new();
        if reset_parser {
            // Ends whatever half request a timed-out write may have left; the agent
            // answers the stray byte with an error without our id, which is skipped.
            message.push(DELIMITER);
        }
        message.extend(Self::request(command, id));
        self.stream
            .write_all(&message, deadline)
            .map_err(|e| self.wait_error(e, C::NAME, started))?;
        let reply = self.await_reply(id, C::NAME, deadline, started)?;
        self.decode::<C>(reply)
    }

    fn await_reply(
        &mut self,
        id: i64,
        command: &str,
        deadline: Instant,
        started: Instant,
    ) -> Result<Value, Error> {
        loop {
            let line = self
                .read_line(deadline)
                .map_err(|e| self.read_error(e, command, started))?;
            let value: Value = match serde_json::from_slice(&line) {
                Ok(value) => value,
                Err(source) => {
                    self.synced = false;
                    return Err(Error::Protocol {
                        command: command.to_string(),
                        detail: format!("not JSON: {}", excerpt(&line)),
                        source: Some(source),
                    });
                }
            };
            match value.get("id") {
                Some(v) if v.as_i64() == Some(id) => return Ok(value),
                // A reply to someone else's request, or to one of ours that timed out.
                _ => continue,
            }
        }
    }

    fn decode<C: qapi_spec::Command>(&mut self, reply: Value) -> Result<C::Ok, Error> {
        if let Some(error) = reply.get("error") {
            let agent = AgentError {
                class: error
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                desc: error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            };
            return Err(Error::from_agent(C::NAME, agent));
        }
        let text = excerpt(reply.to_string().as_bytes());
        match serde_json::from_value::<qapi_spec::Response<C::Ok>>(reply) {
            Ok(response) => response.result().map_err(|e| {
                Error::from_agent(
                    C::NAME,
                    AgentError {
                        class: format!("{:?}", e.class),
                        desc: e.desc,
                    },
                )
            }),
            Err(source) => Err(Error::Protocol {
                command: C::NAME.to_string(),
                detail: format!("unexpected reply {text}"),
                source: Some(source),
            }),
        }
    }
}

/// The start of a reply, for messages.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 120;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    if bytes.len() > MAX {
        format!("{text:?}…")
    } else {
        format!("{text:?}")
    }
}
