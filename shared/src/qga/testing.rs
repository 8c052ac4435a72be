//! A scripted guest agent on a Unix socket, for tests of the client and the tools
//! (edge cases the real agent cannot be made to produce on demand).
//!
//! Like QEMU's chardev it serves one connection at a time; like qemu-ga it answers a
//! `0xFF` byte with a parse error and then reads on.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;

use serde_json::{json, Value};

use super::testing_socket::SocketServer;
use super::Address;

/// One request as the peer read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Value,
    pub id: Option<Value>,
}

/// The agent end of one connection.
#[derive(Debug)]
pub struct Peer {
    stream: UnixStream,
    buf: Vec<u8>,
    stop: Arc<AtomicBool>,
    /// Lines that were not JSON requests.
    pub garbage: Vec<Vec<u8>>,
}

impl Peer {
    /// The next request; `None` when the client closed the connection or the agent stops.
    /// A `0xFF` byte drops any partial input and is answered like qemu-ga does.
    pub fn next_request(&mut self) -> Option<Request> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == 0xFF || b == b'\n') {
                let byte = self.buf[pos];
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if byte == 0xFF {
                    self.send_raw(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n");
                    continue;
                }
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<Value>(line) {
                    Ok(value) if value.get("execute").and_then(Value::as_str).is_some() => {
                        return Some(Request {
                            execute: value["execute"].as_str().unwrap_or_default().to_string(),
                            arguments: value.get("arguments").cloned().unwrap_or(json!({})),
                            id: value.get("id").cloned(),
                        });
                    }
                    _ => {
                        self.garbage.push(line.to_vec());
                        continue;
                    }
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.stop.load(Ordering::SeqCst) {
                        return None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    /// Writes bytes as they are (errors ignored: the client may be gone).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    fn send_value(&mut self, mut value: Value, request: &Request) {
        if let (Some(id), Value::Object(map)) = (&request.id, &mut value) {
            map.insert("id".into(), id.clone());
        }
        let mut bytes = serde_json::to_vec(&value).unwrap_or_default();
        bytes.push(b'\n');
        self.send_raw(&bytes);
    }

    /// `{"return": value, "id": <the request's>}`.
    pub fn reply(&mut self, request: &Request, value: Value) {
        self.send_value(json!({ "return": value }), request);
    }

    /// `{"error": {class, desc}, "id": <the request's>}`.
    pub fn fail(&mut self, request: &Request, class: &str, desc: &str) {
        self.send_value(
            json!({ "error": { "class": class, "desc": desc } }),
            request,
        );
    }

    /// Answers `guest-sync-delimited` as qemu-ga does: `0xFF` then `{"return": id}`.
    pub fn answer_sync(&mut self, request: &Request) {
        let id = request.arguments.get("id").cloned().unwrap_or(Value::Null);
        let mut bytes = vec![0xFF];
        bytes.extend(serde_json::to_vec(&json!({ "return": id })).unwrap_or_default());
        bytes.push(b'\n');
        self.send_raw(&bytes);
    }
}

type Handler = dyn FnMut(&mut Peer) + Send;

/// A scripted agent listening on a Unix socket in its own temporary folder; stops and
/// removes the folder when dropped.
#[derive(Debug)]
pub struct FakeAgent {
    pub address: Address,
    pub connections: Arc<AtomicUsize>,
    _server: SocketServer,
}

impl FakeAgent {
    /// Serves connections one at a time, each by `handler` until it returns.
    pub fn start(handler: impl FnMut(&mut Peer) + Send + 'static) -> FakeAgent {
        let connections = Arc::new(AtomicUsize::new(0));
        let mut handler: Box<Handler> = Box::new(handler);
        let counted = connections.clone();
        let server = SocketServer::start("fake", "qga.sock", move |stream, stop| {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
            let mut peer = Peer {
                stream,
                buf: Vec::new(),
                stop: stop.clone(),
                garbage: Vec::new(),
            };
            handler(&mut peer);
        });
        FakeAgent {
            address: Address::Unix(server.path.clone()),
            connections,
            _server: server,
        }
    }

    /// An agent that behaves like qemu-ga 7.2 over the state in the returned handle.
    pub fn simulated(state: SimState) -> (FakeAgent, Sim) {
        let sim = Sim(Arc::new(Mutex::new(state)));
        let shared = sim.clone();
        let agent = FakeAgent::start(move |peer| shared.serve(peer));
        (agent, sim)
    }
}

/// A program the simulated guest can run through `guest-exec`.
#[derive(Debug, Clone, Default)]
pub struct Program {
    pub exitcode: i64,
    pub stdout: String,
    pub stderr: String,
    /// How long it runs before it exits.
    pub runs_for: Duration,
    /// What it changes in the guest as it exits (e.g. unmounts a filesystem).
    pub effect: Option<fn(&mut SimState)>,
}

impl Program {
    /// A program that exits at once with `exitcode`.
    pub fn exits(exitcode: i64) -> Program {
        Program {
            exitcode,
            ..Program::default()
        }
    }
}

/// The simulated guest behind [`FakeAgent::simulated`].
#[derive(Debug, Clone)]
pub struct SimState {
    pub version: String,
    /// Mounted filesystems.
    pub mounts: Vec<String>,
    /// How many are frozen now (0 = thawed).
    pub frozen: i64,
    /// Commands the agent lacks / has disabled (beyond those disabled while frozen).
    pub missing: Vec<String>,
    pub disabled: Vec<String>,
    /// Commands it reads but never answers.
    pub silent: Vec<String>,
    /// Commands it answers with this error desc.
    pub failing: Vec<(String, String)>,
    /// Commands it carries out at once but answers only after a delay.
    pub delays: Vec<(String, Duration)>,
    /// Sent to every new connection before anything else (stale output).
    pub stale_output: Vec<u8>,
    /// Another client thaws right after each freeze is answered.
    pub thawed_by_another_client: bool,
    /// What `guest-exec` can run, by path; any other path fails to start.
    pub programs: Vec<(String, Program)>,
    /// Started by `guest-exec` and not yet reported exited: pid, program, start.
    pub running: Vec<(i64, Program, Instant)>,
    /// The answer to `guest-get-fsinfo`.
    pub fsinfo: Value,
    /// How far the guest's clock (`guest-get-time`) is ahead of the host's, in ns.
    pub clock_offset_ns: i64,
    /// Every command it received, in order; `guest-exec` with the argv it ran
    /// (`guest-exec /bin/app quiesce`).
    pub log: Vec<String>,
}

impl Default for SimState {
    fn default() -> Self {
        SimState {
            version: "7.2.0".into(),
            mounts: vec!["/".into(), "/data0".into(), "/data1".into()],
            frozen: 0,
            missing: Vec::new(),
            disabled: Vec::new(),
            silent: Vec::new(),
            failing: Vec::new(),
            delays: Vec::new(),
            stale_output: Vec::new(),
            thawed_by_another_client: false,
            programs: Vec::new(),
            running: Vec::new(),
            fsinfo: json!([]),
            clock_offset_ns: 0,
            log: Vec::new(),
        }
    }
}

const KNOWN: &[&str] = &[
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-fsfreeze-status",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-exec",
    "guest-exec-status",
    "guest-get-fsinfo",
    "guest-get-time",
];

const ALLOWED_WHILE_FROZEN: &[&str] = &[
    "guest-sync-delimited",
    "guest-sync",
    "guest-ping",
    "guest-info",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
];

/// Shared handle on a simulated guest.
#[derive(Debug, Clone)]
pub struct Sim(Arc<Mutex<SimState>>);

impl Sim {
    pub fn state(&self) -> MutexGuard<'_, SimState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first `n` commands the agent received after its first freeze (fewer if it got
    /// fewer; none without a freeze).
    pub fn after_freeze(&self, n: usize) -> Vec<String> {
        let log = self.state().log.clone();
        log.iter()
            .position(|c| c.starts_with("guest-fsfreeze-freeze"))
            .map(|froze| log.into_iter().skip(froze + 1).take(n).collect())
            .unwrap_or_default()
    }

    fn serve(&self, peer: &mut Peer) {
        let stale = self.state().stale_output.clone();
        peer.send_raw(&stale);
        while let Some(request) = peer.next_request() {
            let name = request.execute.as_str();
            let (reply, delay) = {
                let mut state = self.state();
                state.log.push(Self::describe(&request));
                if state.silent.iter().any(|c| c == name) {
                    continue;
                }
                if name == "guest-sync-delimited" {
                    peer.answer_sync(&request);
                    continue;
                }
                let delay = state
                    .delays
                    .iter()
                    .find(|(c, _)| c == name)
                    .map(|(_, d)| *d);
                (Self::answer(&mut state, &request), delay)
            };
            if let Some(delay) = delay {
                std::thread::sleep(delay);
            }
            match reply {
                Ok(value) => peer.reply(&request, value),
                Err((class, desc)) => peer.fail(&request, class, &desc),
            }
        }
    }

    /// The log's entry for a request.
    fn describe(request: &Request) -> String {
        if request.execute != "guest-exec" {
            return request.execute.clone();
        }
        let args = &request.arguments;
        std::iter::once(&args["path"])
            .chain(args["arg"].as_array().into_iter().flatten())
            .fold(request.execute.clone(), |line, a| {
                format!("{line} {}", a.as_str().unwrap_or_default())
            })
    }

    fn answer(state: &mut SimState, request: &Request) -> Result<Value, (&'static str, String)> {
        let name = request.execute.as_str();
        if !KNOWN.contains(&name) || state.missing.iter().any(|c| c == name) {
            return Err((
                "CommandNotFound",
                format!("The command {name} has not been found"),
            ));
        }
        if state.frozen > 0 && !ALLOWED_WHILE_FROZEN.contains(&name) {
            // Verbatim (class included) from qemu-ga 7.2.
            let desc = format!("Command {name} has been disabled: the agent is in frozen state");
            return Err(("CommandNotFound", desc));
        }
        if state.disabled.iter().any(|c| c == name) {
            return Err((
                "CommandNotFound",
                format!("Command {name} has been disabled"),
            ));
        }
        if let Some((_, desc)) = state.failing.iter().find(|(c, _)| c == name) {
            return Err(("GenericError", desc.clone()));
        }
        let reply = Self::carry_out(state, request)?;
        if name.starts_with("guest-fsfreeze-freeze") && state.thawed_by_another_client {
            state.frozen = 0;
        }
        Ok(reply)
    }

    fn carry_out(state: &mut SimState, request: &Request) -> Result<Value, (&'static str, String)> {
        let name = request.execute.as_str();
        Ok(match name {
            "guest-ping" => json!({}),
            "guest-get-time" => {
                json!(crate::time::now_unix_us() as i64 * 1000 + state.clock_offset_ns)
            }
            "guest-sync" => request.arguments["id"].clone(),
            "guest-info" => {
                let commands: Vec<Value> = KNOWN
                    .iter()
                    .filter(|c| !state.missing.iter().any(|m| m == *c))
                    .map(|c| {
                        let enabled = !state.disabled.iter().any(|d| d == c);
                        json!({"name": c, "enabled": enabled, "success-response": true})
                    })
                    .collect();
                json!({"version": state.version, "supported_commands": commands})
            }
            "guest-fsfreeze-status" => json!(if state.frozen > 0 { "frozen" } else { "thawed" }),
            "guest-fsfreeze-freeze" => {
                state.frozen = state.mounts.len() as i64;
                json!(state.frozen)
            }
            "guest-fsfreeze-freeze-list" => {
                let wanted: Vec<String> = request.arguments["mountpoints"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_else(|| state.mounts.clone());
                let n = state.mounts.iter().filter(|m| wanted.contains(m)).count() as i64;
                state.frozen = n;
                json!(n)
            }
            "guest-fsfreeze-thaw" => {
                let n = state.frozen;
                state.frozen = 0;
                json!(n)
            }
            "guest-exec" => {
                let path = request.arguments["path"].as_str().unwrap_or_default();
                let Some((_, program)) = state.programs.iter().find(|(p, _)| p == path) else {
                    // Shaped like qemu-ga's failed spawn (glib's message inside its own).
                    let desc = format!(
                        "Guest agent command failed, error was 'Failed to execute child process \u{201c}{path}\u{201d} (No such file or directory)'"
                    );
                    return Err(("GenericError", desc));
                };
                // Unique: one log entry per request.
                let pid = state.log.len() as i64;
                state.running.push((pid, program.clone(), Instant::now()));
                json!({ "pid": pid })
            }
            "guest-exec-status" => {
                let pid = request.arguments["pid"].as_i64();
                let Some(at) = state.running.iter().position(|(p, _, _)| Some(*p) == pid) else {
                    return Err(("GenericError", "Invalid parameter 'pid'".into()));
                };
                if state.running[at].2.elapsed() < state.running[at].1.runs_for {
                    return Ok(json!({ "exited": false }));
                }
                let (_, program, _) = state.running.remove(at);
                if let Some(effect) = program.effect {
                    effect(state);
                }
                let mut status = json!({ "exited": true, "exitcode": program.exitcode });
                // Like qemu-ga: output only when there is some, base64.
                for (key, text) in [("out-data", &program.stdout), ("err-data", &program.stderr)] {
                    if !text.is_empty() {
                        status[key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
                    }
                }
                status
            }
            "guest-get-fsinfo" => state.fsinfo.clone(),
            _ => return Err(("GenericError", "not simulated".into())),
        })
    }
}
