//! One `zfs` process, run to its end or to a deadline or a cancel, whichever comes first.
//!
//! The child gets its own process group, so that a kill reaches whatever it started too (a
//! `zfs` wrapper script, a pager). One thread waits on everything at once with `poll`: the
//! child's stdout and stderr (read as they come, so neither pipe fills up and blocks it), a
//! pidfd that becomes readable when it exits, and the cancel token's waker; the deadline is
//! poll's timeout. No thread is started per call. A child past its deadline or cancelled is
//! killed with `SIGKILL` to its group and reaped.
//!
//! A killed `zfs` dies only once its current kernel call returns (a snapshot, a rollback,
//! a destroy runs to its end in the kernel, and zfs-fuse's daemon finishes a request its
//! client dropped): what it was doing may still take effect. Callers that care look
//! afterwards (zsnap destroys the snapshots a killed `zfs snapshot` made).

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::cancel::Cancel;

/// How long a killed child may take to die before a thread of its own is left to reap it
/// (a `zfs` inside a long kernel call dies only when that returns).
const REAP_WAIT: Duration = Duration::from_secs(2);

/// How a run ended.
#[derive(Debug)]
pub(super) enum Ended {
    /// It exited; everything it wrote.
    Exited {
        status: ExitStatus,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
    /// The deadline came first; killed. What it wrote on stderr until then.
    TimedOut { stderr: Vec<u8> },
    /// The cancel came first; killed.
    Cancelled,
}

/// Runs `program args` (argv, never a shell; stdin `/dev/null`; `LC_ALL=C` since its
/// messages are matched by text) until it ends, `deadline` passes or `cancel` is
/// cancelled. An error means it could not be started or watched (then it was killed).
pub(super) fn run(
    program: &Path,
    args: &[String],
    deadline: Instant,
    cancel: Option<&Cancel>,
) -> io::Result<Ended> {
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let pidfd = match rustix::process::pidfd_open(
        rustix::process::Pid::from_child(&child),
        rustix::process::PidfdFlags::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            kill(&mut child);
            let _ = child.wait();
            return Err(e.into());
        }
    };
    let mut running = Running {
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        child,
        pidfd,
        out: Vec::new(),
        err: Vec::new(),
        exited: false,
    };
    match running.watch(deadline, cancel) {
        Ok(None) => {
            let status = running.child.wait()?;
            Ok(Ended::Exited {
                status,
                stdout: running.out,
                stderr: running.err,
            })
        }
        Ok(Some(stop)) => {
            let stderr = running.kill_and_reap();
            Ok(match stop {
                Stop::Deadline => Ended::TimedOut { stderr },
                Stop::Cancelled => Ended::Cancelled,
            })
        }
        Err(e) => {
            running.kill_and_reap();
            Err(e)
        }
    }
}

enum Stop {
    Deadline,
    Cancelled,
}

struct Running {
    child: Child,
    pidfd: OwnedFd,
    /// `None` once at end of file.
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    out: Vec<u8>,
    err: Vec<u8>,
    /// The pidfd said so; not reaped yet.
    exited: bool,
}

/// What one slot of the poll set watches.
#[derive(Clone, Copy)]
enum Source {
    Stdout,
    Stderr,
    Exit,
    Cancel,
}

impl Running {
    /// Collects output until the child has exited and closed both pipes (`None`), or a stop.
    fn watch(&mut self, deadline: Instant, cancel: Option<&Cancel>) -> io::Result<Option<Stop>> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if self.exited && self.stdout.is_none() && self.stderr.is_none() {
                return Ok(None);
            }
            if cancel.is_some_and(Cancel::is_cancelled) {
                return Ok(Some(Stop::Cancelled));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Some(Stop::Deadline));
            }
            // poll counts whole milliseconds: round up rather than wake early and spin.
            let millis = (deadline - now).as_micros().div_ceil(1000);
            let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
            let mut sources = Vec::with_capacity(4);
            let mut fds = Vec::with_capacity(4);
            let input = PollFlags::POLLIN;
            if let Some(pipe) = &self.stdout {
                sources.push(Source::Stdout);
                fds.push(PollFd::new(pipe.as_fd(), input));
            }
            if let Some(pipe) = &self.stderr {
                sources.push(Source::Stderr);
                fds.push(PollFd::new(pipe.as_fd(), input));
            }
            if !self.exited {
                sources.push(Source::Exit);
                fds.push(PollFd::new(self.pidfd.as_fd(), input));
            }
            if let Some(cancel) = cancel {
                sources.push(Source::Cancel);
                fds.push(PollFd::new(cancel.fd(), input));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            // POLLHUP and POLLERR count as ready too: the read then says end of file.
            let ready: Vec<Source> = sources
                .iter()
                .zip(&fds)
                .filter(|(_, fd)| fd.any().unwrap_or(false))
                .map(|(s, _)| *s)
                .collect();
            drop(fds);
            for source in ready {
                match source {
                    Source::Stdout => read_some(&mut self.stdout, &mut self.out, &mut buf)?,
                    Source::Stderr => read_some(&mut self.stderr, &mut self.err, &mut buf)?,
                    Source::Exit => self.exited = true,
                    // Checked at the top of the loop, after what this round brought is kept.
                    Source::Cancel => {}
                }
            }
        }
    }

    /// Kills the child's group and reaps the child; what it said on stderr.
    fn kill_and_reap(mut self) -> Vec<u8> {
        kill(&mut self.child);
        // The child may be stuck in a kernel call, which a kill does not interrupt.
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(REAP_WAIT).unwrap_or(PollTimeout::MAX);
        let dead = self.exited || matches!(poll(&mut fds, timeout), Ok(n) if n > 0);
        if dead {
            let _ = self.child.wait();
        } else {
            let mut child = self.child;
            std::thread::spawn(move || child.wait());
        }
        self.err
    }
}

/// `SIGKILL` to the child's process group, then to the child itself (in case it left the
/// group). The child is not reaped yet, so neither id can have been reused.
fn kill(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
}

/// One read from a ready pipe; at end of file the pipe is dropped.
fn read_some<R: Read>(pipe: &mut Option<R>, into: &mut Vec<u8>, buf: &mut [u8]) -> io::Result<()> {
    let Some(reader) = pipe else { return Ok(()) };
    match reader.read(buf) {
        Ok(0) => *pipe = None,
        Ok(n) => into.extend_from_slice(&buf[..n]),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Error, Zfs};
    use crate::cancel::Cancel;
    use crate::exit::{Exit, HasExit};
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    /// Generous: the machine may be busy; a call that is not cut short takes 1000 s.
    const MARGIN: Duration = Duration::from_secs(10);

    /// A fake `zfs`: `body` as a shell script in a fresh folder, `$D` being that folder.
    fn fake(test: &str, body: &str) -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("evesnap-zfs-process-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("zfs");
        let script = format!("#!/bin/sh\nD='{}'\n{body}", dir.display());
        std::fs::write(&path, script).expect("write fake zfs");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod fake zfs");
        (dir, path)
    }

    fn list() -> Vec<String> {
        vec!["list".into()]
    }

    fn pid_in(file: &Path) -> i32 {
        std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Dead: no such process, or a zombie its new parent has yet to reap.
    fn gone(pid: i32) -> bool {
        let deadline = Instant::now() + MARGIN;
        loop {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                Ok(stat)
                    if stat
                        .rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z')) =>
                {
                    return true
                }
                Ok(_) if Instant::now() > deadline => return false,
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    #[test]
    fn a_hung_call_is_killed_with_what_it_started() {
        let (dir, program) = fake(
            "hung",
            "sleep 1000 &\necho $! > \"$D/grandchild\"\necho $$ > \"$D/child\"\necho working >&2\nwait\n",
        );
        let zfs = Zfs::with_path(&program).with_timeout(Duration::from_secs(1));
        let start = Instant::now();
        let result = zfs.run_raw(&list());
        let took = start.elapsed();
        let error = result.expect_err("a hung call fails");
        match &error {
            Error::TimedOut {
                command_line,
                after,
                stderr,
            } => {
                assert_eq!(command_line, &format!("{} list", program.display()));
                assert_eq!(*after, Duration::from_secs(1));
                assert_eq!(stderr.trim(), "working");
            }
            other => panic!("{other:?}"),
        }
        assert!(took >= Duration::from_secs(1), "{took:?}");
        assert!(took < Duration::from_secs(1) + MARGIN, "{took:?}");
        assert_eq!(
            error.to_string(),
            format!(
                "`{} list` did not finish within 1.0 s and was killed; it had said: working",
                program.display()
            )
        );
        assert_eq!(error.exit(), Exit::StepFailed);
        assert!(gone(pid_in(&dir.join("child"))), "the child lives on");
        assert!(
            gone(pid_in(&dir.join("grandchild"))),
            "what the child started lives on"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_view_ends_its_calls_by_its_own_deadline() {
        let (dir, program) = fake("within", "touch \"$D/ran\"\nexec sleep 1000\n");
        let zfs = Zfs::with_path(&program);
        let start = Instant::now();
        let error = zfs
            .within(start + Duration::from_millis(300))
            .run_raw(&list())
            .expect_err("cut short");
        assert!(
            matches!(error, Error::TimedOut { after, .. } if after <= Duration::from_millis(300)),
            "{error:?}"
        );
        assert!(start.elapsed() < MARGIN);
        let _ = std::fs::remove_file(dir.join("ran"));
        let error = zfs
            .within(Instant::now())
            .run_raw(&list())
            .expect_err("too late");
        assert!(
            matches!(&error, Error::TimedOut { after, .. } if after.is_zero()),
            "{error:?}"
        );
        assert!(error
            .to_string()
            .ends_with("list` was not run: its deadline had passed"));
        assert!(!dir.join("ran").exists(), "run after its deadline");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cancel_from_another_thread_stops_the_call_and_later_ones() {
        let (dir, program) = fake(
            "cancel",
            "echo $$ >> \"$D/runs\"\nsleep 1000 &\necho $! > \"$D/grandchild\"\nwait\n",
        );
        let cancel = Cancel::new().expect("token");
        let zfs = Zfs::with_path(&program).with_cancel(cancel.clone());
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            cancel.cancel();
        });
        let start = Instant::now();
        let error = zfs.run_raw(&list()).expect_err("cancelled");
        assert!(start.elapsed() < MARGIN, "{:?}", start.elapsed());
        canceller.join().expect("canceller");
        assert!(
            matches!(&error, Error::Cancelled { after: Some(_), .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("list` was cancelled after"),
            "{error}"
        );
        assert_eq!(error.exit(), Exit::StepFailed);
        assert!(gone(pid_in(&dir.join("runs"))));
        assert!(gone(pid_in(&dir.join("grandchild"))));
        let error = zfs.run_raw(&list()).expect_err("still cancelled");
        assert!(
            matches!(&error, Error::Cancelled { after: None, .. }),
            "{error:?}"
        );
        let runs = std::fs::read_to_string(dir.join("runs")).expect("runs");
        assert_eq!(runs.lines().count(), 1, "run after the cancel");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_normal_call_keeps_its_output_status_and_stderr() {
        let (dir, program) = fake(
            "normal",
            "case \"$1\" in\n  get) printf 'p/a\\ttype\\tfilesystem\\n'; echo note >&2; exit 0;;\n  \
             *) echo \"cannot open 'p/x': dataset does not exist\" >&2; exit 1;;\nesac\n",
        );
        let zfs = Zfs::with_path(&program);
        let out = zfs.run(&["get".into()], "p/a").expect("success");
        assert_eq!(out.stdout, "p/a\ttype\tfilesystem\n");
        assert_eq!(out.stderr, "note\n");
        let error = zfs.run(&["destroy".into()], "p/y").expect_err("failure");
        assert!(
            matches!(&error, Error::DoesNotExist { name, .. } if name == "p/x"),
            "{error:?}"
        );
        let failure = error.failure().expect("the failed run");
        assert_eq!(failure.status, Some(1));
        assert_eq!(
            failure.argv,
            [program.display().to_string(), "destroy".into()]
        );
        assert!(failure.stderr.contains("dataset does not exist"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_mebibyte_on_each_pipe_does_not_deadlock() {
        // stderr first: a reader that waited for stdout's end first would block the child.
        let (dir, program) = fake(
            "large",
            "head -c 1048576 /dev/zero | tr '\\0' e >&2\nhead -c 1048576 /dev/zero | tr '\\0' o\n",
        );
        let out = Zfs::with_path(&program)
            .run(&list(), "p")
            .expect("large output");
        assert_eq!(out.stdout.len(), 1 << 20);
        assert_eq!(out.stderr.len(), 1 << 20);
        assert!(out.stdout.bytes().all(|b| b == b'o'));
        assert!(out.stderr.bytes().all(|b| b == b'e'));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
