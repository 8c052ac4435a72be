//! The controller-initiated flow, built from the same step functions the small tools use:
//! `qga_freeze::freeze_unverified`/`verify_frozen`, `zsnap::preflight`/`take`/`finish`,
//! `qga_thaw::thaw`, `zsnap::prune`, `zrollback::plan`/`execute`.
//!
//! create ([`create`]): the set with the plan's id, if it exists, is reported ([`byid`]) →
//! the VM's state (not running: no agent, no freeze, [`halted`]) → preflight (retention
//! before the create, EVE's order, between its agent and space checks) → guest_pre → freeze → snapshot → thaw (always) →
//! guest_post → retention after the create → report. Everything that can be prepared (connection, name,
//! preflight, the zfs argv) is prepared before the freeze, so the window holds only
//! freeze → snapshot → thaw.
//!
//! rollback ([`rollback`]): preflight (zrollback's checks, the VM's state) → guest_pre (e.g.
//! stop the application, umount) → verify no guest filesystem sits on the volumes →
//! rollback → guest_post (e.g. drop caches, mount, start the application) → report.
//!
//! delete ([`byid`]): the set with the plan's id (or name) destroyed, all or none.
//!
//! The flow returns a typed [`Report`]; only the edge ([`Finished::into_outcome`]) turns it
//! into the job document printed on stdout.

mod byid;
mod create;
mod fallback;
mod group;
mod halted;
mod landing;
mod placing;
mod rollback;
mod window;

use std::time::{Duration, Instant};

use anyhow::anyhow;
use evesnap::cli::Outcome;
use evesnap::document::{Document, StepTimer};
use evesnap::exit::{chain, coded, exit_of, Exit};
use evesnap::pending::PendingCommand;
use evesnap::qga::commands as qga;
use evesnap::qga::watchdog;
use evesnap::qga::{Address, Client};
use evesnap::report::{Action, ExpeditedRcu, GuestPost, Report};
use evesnap::steps::{CommandRun, FreezeReport, GuestCommands};
use evesnap::zfs::Zfs;
use qga_thaw::ThawOptions;

use crate::guest;
use crate::plan::{GuestCommand, Plan};
use evesnap::signals::Events;

pub use evesnap::report::Consistency;
pub use group::execute_group;

pub const TOOL: &str = "snap-orchestrate";

/// How long a signal during the snapshot waits for `zfs snapshot` before thawing anyway.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);

/// The user property that records the consistency the snapshot was taken with.
pub const CONSISTENCY_PROPERTY: &str = "org.lfedge.evesnap:consistency";

type TakeResult = Result<zsnap::Taken, evesnap::zfs::Error>;

/// SIGINT, SIGTERM and SIGHUP, caught for the life of the process (a long-running
/// caller such as a listener installs them once and passes them to every run).
#[derive(Debug)]
pub struct Signals(Events<TakeResult>);

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Events::install().map(Signals)
    }

    /// The first signal caught so far, if any.
    pub fn caught(&mut self) -> Option<i32> {
        self.0.poll_signal();
        self.0.interrupted
    }
}

/// What a run ended with: its report and, when it failed, why (for the exit code and for
/// callers that look into the cause, such as a preflight's problems).
#[derive(Debug)]
pub struct Finished {
    pub report: Report,
    pub error: Option<anyhow::Error>,
}

impl Finished {
    /// The edge: the report as the job document on stdout, the error for stderr and the
    /// exit code.
    pub fn into_outcome(self) -> Outcome {
        match Document::from_typed(&self.report) {
            Ok(document) => Outcome {
                document: Some(document),
                error: self.error,
                ..Outcome::default()
            },
            Err(e) => Outcome::error(
                evesnap::exit::wrap(e).context("the report does not fit the job document"),
            ),
        }
    }

    /// A run that failed at `step`, the failure recorded in its report.
    fn failed(mut report: Report, step: &str, error: anyhow::Error) -> Finished {
        report.fail(TOOL, step, &error);
        Finished {
            report,
            error: Some(error),
        }
    }

    /// A run that got to its end: what its steps came to, recorded in its report.
    fn ended(report: Report, result: Result<(), StepError>) -> Finished {
        match result {
            Ok(()) => Finished {
                report,
                error: None,
            },
            Err((step, error)) => Finished::failed(report, step, error),
        }
    }
}

/// Runs the plan's action with signals installed for this run.
pub fn execute(plan: &Plan, zfs: &Zfs) -> Finished {
    match Signals::install() {
        Ok(mut signals) => execute_with(plan, zfs, &mut signals),
        Err(e) => Finished::failed(
            new_report(plan),
            "preflight",
            anyhow::Error::new(e).context("cannot install signal handlers"),
        ),
    }
}

fn new_report(plan: &Plan) -> Report {
    let snapshot = match plan.action {
        Action::Create | Action::Delete => plan.snapshot_name(),
        Action::Rollback => plan
            .rollback
            .as_ref()
            .map(|r| r.to.clone())
            .unwrap_or_default(),
    };
    let mut report = Report::new(
        plan.id(),
        plan.kind,
        plan.action,
        &plan.agent,
        &plan.datasets,
        &snapshot,
    );
    report.origin = plan.origin;
    report.app = plan.app;
    report.app_name = plan.app_name.clone();
    report.zinfo_snapshot.config_id = plan.config_id.clone();
    report.zinfo_snapshot.config_version = plan.config_version.clone();
    report
}

/// [`execute`] with signals installed by the caller. A signal caught before the run
/// stops it before it touches anything.
pub fn execute_with(plan: &Plan, zfs: &Zfs, signals: &mut Signals) -> Finished {
    let report = new_report(plan);
    let locked = plan
        .agent
        .parse::<Address>()
        .map_err(|e| coded(Exit::Usage, format!("plan field `agent`: {e}")))
        .and_then(|agent| {
            let wait = Duration::from_secs_f64(plan.lock_wait_s.max(0.0));
            crate::lock::lock_vm_for(&agent, plan.origin, wait).map_err(evesnap::exit::wrap)
        });
    let lock = match locked {
        Ok(lock) => lock,
        Err(error) => return Finished::failed(report, "preflight", error),
    };
    // Every zfs call of the run ends at its deadline, or at once when a signal comes (the
    // snapshot inside the freeze window excepted: see `take_while_frozen`).
    let zfs = zfs.clone().with_cancel(signals.0.cancel());
    let mut run = Run {
        plan,
        zfs: &zfs,
        report,
        events: &mut signals.0,
        timeout: plan.freeze.timeout(),
        expedited_rcu: false,
        post_left: Vec::new(),
    };
    let result = match plan.action {
        Action::Create => run.create(),
        Action::Rollback => run.rollback(),
        Action::Delete => run.delete(),
    };
    let post_left = std::mem::take(&mut run.post_left);
    let mut report = run.report;
    if !post_left.is_empty() {
        record_pending(plan, &mut report, &post_left);
    }
    drop(lock);
    Finished::ended(report, result)
}

/// A failed step: which one, and why.
type StepError = (&'static str, anyhow::Error);

/// One orchestration: the plan, the report being built, the signals caught.
struct Run<'a> {
    plan: &'a Plan,
    zfs: &'a Zfs,
    report: Report,
    events: &'a mut Events<TakeResult>,
    timeout: Duration,
    /// The guest runs with expedited RCU for this freeze and must get its setting back.
    expedited_rcu: bool,
    /// The `guest_post` commands still owed to the guest: all of them once `guest_pre`
    /// started, fewer as they run; what is left at the end (the agent was lost) is
    /// recorded as pending ([`record_pending`]).
    post_left: Vec<GuestCommand>,
}

impl Run<'_> {
    /// Records a step that did its work, with its record.
    fn done(&mut self, timer: StepTimer, record: &impl serde::Serialize) {
        self.report.push(timer.finish_with(true, record));
    }

    /// Records a step that failed before it had anything to report.
    fn failed(&mut self, timer: StepTimer) {
        self.report.push(timer.finish(false, Default::default()));
    }

    /// Stops between steps when a signal arrived.
    fn check_signal(&mut self, step: &'static str) -> Result<(), StepError> {
        if self.events.poll_signal() {
            let signal = self.events.interrupted.unwrap_or_default();
            return Err((
                step,
                anyhow!("interrupted by signal {signal} before {step}"),
            ));
        }
        Ok(())
    }

    /// Connects to the agent and checks it can do what the plan needs. `Ok(None)`: the
    /// agent is missing and `required` is false.
    fn connect_agent(
        &mut self,
        needed: &[&'static str],
        required: bool,
    ) -> Result<Option<(Client, qga::GuestAgentInfo)>, StepError> {
        let address: Address = self.plan.agent.parse().map_err(|e| {
            (
                "preflight",
                coded(Exit::Usage, format!("plan field `agent`: {e}")),
            )
        })?;
        let attempt = (|| {
            let mut client = Client::connect(&address, Instant::now() + self.timeout)?;
            client.set_timeout(self.timeout);
            let info = client.info()?;
            Ok::<_, evesnap::qga::Error>((client, info))
        })();
        let (client, info) = match attempt {
            Ok(pair) => pair,
            Err(e) if !required => {
                evesnap::warn!(
                    "the guest agent is not usable ({}); going on without it as the plan allows (freeze.required: false): \
                     the snapshot will be crash-consistent only",
                    evesnap::exit::chain_of(&e)
                );
                return Ok(None);
            }
            Err(e) => {
                return Err((
                    "preflight",
                    evesnap::exit::wrap(e).context("the guest agent is required (freeze.required)"),
                ))
            }
        };
        evesnap::qga::check_commands(&info, needed)
            .map_err(|e| ("preflight", evesnap::exit::wrap(e)))?;
        Ok(Some((client, info)))
    }

    /// Runs a list of guest commands in order; stops at the first fatal failure and
    /// returns how many ran (the failing one included) and whether all succeeded.
    fn guest_commands(
        &mut self,
        client: &mut Client,
        label: &'static str,
        commands: &[GuestCommand],
    ) -> (usize, bool, Result<(), StepError>) {
        let timer = StepTimer::start(label);
        if label == "guest_pre" {
            self.post_left = self.plan.guest_post.clone();
        }
        let mut runs: Vec<CommandRun> = Vec::new();
        let mut all_ok = true;
        let mut result = Ok(());
        for command in commands {
            // A signal stops what moves forward (guest_pre), never what brings the guest
            // back (guest_post resumes the application, remounts the volumes).
            if label != "guest_post" {
                if let Err(e) = self.check_signal(label) {
                    result = Err(e);
                    break;
                }
            }
            let (run, lost) = guest::run_command_checked(client, command);
            evesnap::note!("{label}: {}", run.describe());
            if label == "guest_post" && !self.post_left.is_empty() {
                // Reported on: never again. Lost in it: it stays owed, with the rest.
                if !lost {
                    self.post_left.remove(0);
                }
                if lost {
                    runs.push(run);
                    result = Err((
                        label,
                        coded(
                            Exit::AgentUnreachable,
                            format!(
                                "{label}: the agent was lost ({})",
                                runs[runs.len() - 1].describe()
                            ),
                        ),
                    ));
                    all_ok = false;
                    break;
                }
            }
            all_ok &= run.ok;
            let fatal_failure = !run.ok && run.fatal;
            let message = run.describe();
            runs.push(run);
            if fatal_failure {
                result = Err((
                    label,
                    coded(Exit::StepFailed, format!("{label} command {message}")),
                ));
                break;
            }
        }
        let ran = runs.len();
        let record = GuestCommands { commands: runs };
        self.report.push(timer.finish_with(result.is_ok(), &record));
        (ran, all_ok && result.is_ok(), result)
    }

    /// After a fatal `guest_pre` failure: the `guest_post` of the commands that ran, in
    /// reverse (`guest_post[i]` undoes `guest_pre[i]`).
    fn undo_pre(&mut self, client: &mut Client, ran: usize) {
        let undo: Vec<GuestCommand> = self
            .plan
            .guest_post
            .iter()
            .take(ran)
            .rev()
            .cloned()
            .map(|c| GuestCommand { fatal: false, ..c })
            .collect();
        // Only the undo is owed now.
        self.post_left = undo.clone();
        if !undo.is_empty() {
            let _ = self.guest_commands(client, "guest_post", &undo);
        }
        self.post_left.clear();
    }

    /// After the thaw (or a failed freeze): the guest's RCU setting back, then guest_post.
    fn run_post(&mut self, client: &mut Client) -> Result<(), StepError> {
        if std::mem::take(&mut self.expedited_rcu) {
            let restored = guest::restore_rcu(client, self.timeout);
            if let Err(e) = &restored {
                evesnap::warn!(
                    "cannot restore the guest's RCU setting ({e}); the guest restores it by itself within {} s",
                    guest::RCU_RESTORE_AFTER_S
                );
            }
            self.report.expedited_rcu = Some(ExpeditedRcu {
                set: true,
                restored: Some(restored.is_ok()),
                error: None,
            });
        }
        if self.plan.guest_post.is_empty() {
            return Ok(());
        }
        // What is still owed (all of it unless an undo ran some).
        let post = self.post_left.clone();
        if post.is_empty() {
            return Ok(());
        }
        let result = self.guest_commands(client, "guest_post", &post).2;
        if self.post_left.is_empty() {
            self.report.guest_post = Some(GuestPost::Ran);
        } else {
            // A fatal failure stops guest_post on purpose: the rest is not owed.
            let lost = result
                .as_ref()
                .err()
                .is_some_and(|(_, e)| exit_of(e) == Exit::AgentUnreachable);
            if !lost {
                self.post_left.clear();
                self.report.guest_post = Some(GuestPost::Ran);
            }
        }
        result
    }
}

/// Records the `guest_post` commands a run could not run (its agent lost or silent) as
/// pending for its agent ([`evesnap::pending`]), for whoever talks to the agent next, and
/// makes sure someone will: when no watchdog is armed for the agent any more, one is armed
/// to run them (it waits for the agent while the VM exists).
fn record_pending(plan: &Plan, report: &mut Report, left: &[GuestCommand]) {
    let Ok(address) = plan.agent.parse::<Address>() else {
        return;
    };
    let commands: Vec<PendingCommand> = left
        .iter()
        .map(|c| PendingCommand {
            path: c.path.clone(),
            args: c.args.clone(),
            timeout_s: c.timeout_s,
        })
        .collect();
    match evesnap::pending::record(&address, &plan.id().to_string(), &commands) {
        Ok(path) => {
            report.guest_post = Some(GuestPost::Pending);
            evesnap::warn!(
                "guest_post could not run (the agent was lost): {} command(s) recorded in {}, run when the \
                 agent answers again (the watchdog, `snap-orchestrate serve`, or `snap-orchestrate recover \
                 --agent {address}`)",
                commands.len(),
                path.display()
            );
        }
        Err(e) => {
            evesnap::warn!(
                "guest_post could not run and cannot be recorded ({}): run it by hand",
                chain(&evesnap::exit::wrap(e))
            );
            return;
        }
    }
    if matches!(watchdog::current(&address), Ok(Some(_))) {
        return; // It runs them once it got through.
    }
    let program = qga_freeze::default_watchdog_program();
    if let Err(e) = watchdog::arm(&address, PENDING_WATCHDOG_AFTER, &program) {
        evesnap::warn!(
            "no watchdog to run the pending guest_post ({}): run `snap-orchestrate recover --agent {address}`",
            chain(&evesnap::exit::wrap(e))
        );
    }
}

/// When a watchdog armed for pending `guest_post` commands first tries the agent.
const PENDING_WATCHDOG_AFTER: Duration = Duration::from_secs(1);

/// The thaw step (`qga_thaw::thaw`, verified, watchdog cancelled), recorded in `report`;
/// when the thaw command returned.
fn thaw_step(
    report: &mut Report,
    client: &mut Client,
    timeout: Duration,
    frozen: &FreezeReport,
) -> Result<u64, anyhow::Error> {
    let timer = StepTimer::start(qga_thaw::TOOL);
    let options = ThawOptions {
        timeout,
        expected: frozen.frozen,
        cancel_watchdog: true,
    };
    match qga_thaw::thaw(client, &options) {
        Ok(thawed) => {
            report.push(timer.finish_with(true, &thawed));
            Ok(thawed.thawed_at_unix_us)
        }
        Err(e) => {
            report.push(timer.finish(false, Default::default()));
            Err(evesnap::exit::wrap(e))
        }
    }
}
