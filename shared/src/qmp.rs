//! A small QMP client (the VM's monitor socket): is the VM running, stop it, resume it.
//!
//! Typed commands and replies come from the `qapi` crate; the greeting is read here so a
//! socket that closes early is an error, not a panic.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qapi::qmp;

use crate::exit::{Exit, HasExit};

type Stream = qapi::Stream<BufReader<UnixStream>, UnixStream>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the QMP socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("the QMP connection failed")]
    Io(#[source] std::io::Error),
    #[error("QMP sent no greeting")]
    NoGreeting,
    #[error("QMP command `{0}` failed")]
    Command(&'static str, #[source] qapi::ExecuteError),
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        Exit::StepFailed
    }
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    inner: qapi::Qmp<Stream>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Qmp")
    }
}

/// The VM's run state as QMP reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// True only while guest CPUs execute.
    pub running: bool,
    /// QEMU's run state, e.g. `running`, `paused`, `shutdown`.
    pub state: String,
}

impl Qmp {
    /// Connects and negotiates capabilities; every read and write has `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let socket =
            UnixStream::connect(path).map_err(|e| Error::Connect(path.to_path_buf(), e))?;
        socket.set_read_timeout(Some(timeout)).map_err(Error::Io)?;
        socket.set_write_timeout(Some(timeout)).map_err(Error::Io)?;
        let writer = socket.try_clone().map_err(Error::Io)?;
        let mut reader = BufReader::new(socket);
        let mut greeting = String::new();
        if reader.read_line(&mut greeting).map_err(Error::Io)? == 0 || !greeting.contains("\"QMP\"")
        {
            return Err(Error::NoGreeting);
        }
        let mut inner = qapi::Qmp::new(qapi::Stream::new(reader, writer));
        inner
            .execute(&qmp::qmp_capabilities { enable: None })
            .map_err(|e| Error::Command("qmp_capabilities", e))?;
        Ok(Qmp { inner })
    }

    pub fn status(&mut self) -> Result<VmStatus, Error> {
        let info = self
            .inner
            .execute(&qmp::query_status {})
            .map_err(|e| Error::Command("query-status", e))?;
        let state = serde_json::to_value(info.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Ok(VmStatus {
            running: info.running,
            state,
        })
    }

    /// Pauses the guest's CPUs (QMP `stop`).
    pub fn stop(&mut self) -> Result<(), Error> {
        self.inner
            .execute(&qmp::stop {})
            .map(drop)
            .map_err(|e| Error::Command("stop", e))
    }

    /// Resumes the guest's CPUs (QMP `cont`).
    pub fn cont(&mut self) -> Result<(), Error> {
        self.inner
            .execute(&qmp::cont {})
            .map(drop)
            .map_err(|e| Error::Command("cont", e))
    }
}
