//! A scripted hybrid vsock device (the host side of `vhost-device-vsock`, Firecracker,
//! Cloud Hypervisor) on a Unix socket, for tests of the `CONNECT <port>` handshake: it
//! opens one guest port, forwarding it to an agent on a Unix socket (a
//! [`FakeAgent`](super::testing::FakeAgent)), or refuses, answers garbage or stays silent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::testing_socket::SocketServer;
use super::Address;

/// What the device does with a `CONNECT` line.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// `OK <n>` for `port` and the stream is the agent's at `backend`; any other port is
    /// refused (the connection closed, as vhost-device-vsock does when the guest resets it).
    Forward { port: u32, backend: PathBuf },
    /// Closes every connection after reading the `CONNECT` line.
    Refuse,
    /// Answers this line instead of `OK <n>`.
    Answer(String),
    /// Reads the `CONNECT` line and never answers.
    Silent,
}

/// The device, in its own temporary folder; stops and removes it when dropped.
#[derive(Debug)]
pub struct HybridDevice {
    /// The device's Unix socket (what `hvsock:<path>:<port>` names).
    pub path: PathBuf,
    /// `CONNECT` lines read so far.
    pub connects: Arc<AtomicUsize>,
    _server: SocketServer,
}

impl HybridDevice {
    pub fn start(behaviour: Behaviour) -> HybridDevice {
        let connects = Arc::new(AtomicUsize::new(0));
        let counted = connects.clone();
        let server = SocketServer::start("hvsock", "vsock.sock", move |stream, stop| {
            let (behaviour, stop) = (behaviour.clone(), stop.clone());
            let connects = counted.clone();
            std::thread::spawn(move || serve(stream, &behaviour, &connects, &stop));
        });
        HybridDevice {
            path: server.path.clone(),
            connects,
            _server: server,
        }
    }

    /// The agent address of guest port `port` behind this device.
    pub fn address(&self, port: u32) -> Address {
        Address::hybrid_vsock(&self.path, port)
    }
}

fn serve(stream: UnixStream, behaviour: &Behaviour, connects: &AtomicUsize, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    connects.fetch_add(1, Ordering::SeqCst);
    let mut stream = reader.into_inner();
    let asked: Option<u32> = line
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim_end().parse().ok());
    match behaviour {
        Behaviour::Forward { port, backend } if asked == Some(*port) => forward(stream, backend),
        Behaviour::Forward { .. } | Behaviour::Refuse => {}
        Behaviour::Answer(reply) => {
            let _ = stream.write_all(format!("{reply}\n").as_bytes());
        }
        Behaviour::Silent => {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `OK 1024`, then bytes both ways between the client and the agent until either closes.
fn forward(mut client: UnixStream, backend: &Path) {
    let Ok(agent) = UnixStream::connect(backend) else {
        return;
    };
    if client.write_all(b"OK 1024\n").is_err() {
        return;
    }
    let (Ok(mut client_in), Ok(mut agent_out)) = (client.try_clone(), agent.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut agent_out);
        let _ = agent_out.shutdown(std::net::Shutdown::Write);
    });
    let mut agent_in = agent;
    let _ = std::io::copy(&mut agent_in, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = upstream.join();
}
