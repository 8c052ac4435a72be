//! `guest-exec`: runs a program in the guest and polls `guest-exec-status` until it
//! exits.

use std::time::{Duration, Instant};

use qapi::qga;
use serde::{Deserialize, Serialize};

use super::Client;
use crate::qga::Error;

/// What a program run through `guest-exec` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The exit code, when it exited normally.
    pub exitcode: Option<i64>,
    /// The signal that ended it, if one did.
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The agent caps captured output (16 MiB in qemu-ga 7.2) and says so only here.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl ExecResult {
    /// Exited normally with status 0.
    pub fn success(&self) -> bool {
        self.exitcode == Some(0) && self.signal.is_none()
    }
}

impl Client {
    /// Runs `path args…` in the guest (`guest-exec`, output captured) and polls
    /// `guest-exec-status` until it exits or `timeout` passes.
    ///
    /// A program still running at the timeout is left running (the agent has no kill).
    pub fn guest_exec(
        &mut self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecResult, Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let command = qga::guest_exec {
            path: path.to_string(),
            arg: Some(args.iter().map(|a| a.to_string()).collect()),
            env: None,
            input_data: None,
            capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
        };
        let pid = self.execute_within(command, timeout)?.pid;
        let mut pause = Duration::from_millis(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::StillRunning {
                    command: format!("guest-exec {path}"),
                    pid,
                    after: started.elapsed(),
                });
            }
            let status = self.execute_within(qga::guest_exec_status { pid }, left)?;
            if status.exited {
                return Ok(ExecResult {
                    exitcode: status.exitcode,
                    signal: status.signal,
                    stdout: status.out_data.unwrap_or_default(),
                    stderr: status.err_data.unwrap_or_default(),
                    stdout_truncated: status.out_truncated.unwrap_or(false),
                    stderr_truncated: status.err_truncated.unwrap_or(false),
                });
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

/// The outcome of one guest command (`guest-exec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRun {
    pub path: String,
    pub args: Vec<String>,
    pub ok: bool,
    pub fatal: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_truncated: bool,
    /// Why it did not succeed (agent error, timeout, exit status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: f64,
}

impl CommandRun {
    /// `` `path arg…` why``, for error messages.
    pub fn describe(&self) -> String {
        let mut argv = self.path.clone();
        for a in &self.args {
            argv.push(' ');
            argv.push_str(a);
        }
        format!("`{argv}` {}", self.error.as_deref().unwrap_or("succeeded"))
    }
}
