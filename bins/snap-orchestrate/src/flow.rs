//! The controller-initiated flow, built from the same step functions the small tools use:
//! `qga_freeze::freeze`, `zsnap::preflight`/`take`/`finish`, `qga_thaw::thaw`,
//! `zsnap::prune`, `zrollback::plan`/`execute`.
//!
//! create: preflight → guest_pre → freeze → snapshot → thaw (always) → guest_post →
//! retention → report. Everything that can be prepared (connection, name, preflight,
//! the zfs argv) is prepared before the freeze, so the window holds only
//! freeze → snapshot → thaw.
//!
//! rollback: preflight (zrollback's checks, the VM's state) → guest_pre (e.g. stop the
//! application, umount) → verify no guest filesystem sits on the volumes → rollback →
//! guest_post (e.g. drop caches, mount, start the application) → report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use evesnap::cli::Outcome;
use evesnap::document::{Document, StepTimer};
use evesnap::exit::{coded, Exit};
use evesnap::qga::commands as qga;
use evesnap::qga::{Address, Client};
use evesnap::zfs::Zfs;
use qga_freeze::{FreezeOptions, FreezeReport};
use qga_thaw::ThawOptions;
use serde_json::{json, Map, Value};

use crate::guest::{self, CommandRun};
use crate::interrupt::{Event, Events};
use crate::plan::{Action, GuestCommand, Plan};

pub const TOOL: &str = "snap-orchestrate";

/// How long a signal during the snapshot waits for `zfs snapshot` before thawing anyway.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);

/// The user property that records the consistency the snapshot was taken with.
pub const CONSISTENCY_PROPERTY: &str = "org.lfedge.evesnap:consistency";

/// What the snapshot can claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Application hooks ran and the filesystems were frozen.
    Application,
    /// Frozen, without (successful) application hooks.
    Filesystem,
    /// Not frozen: as if the power had been cut.
    Crash,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Application => "application",
            Consistency::Filesystem => "filesystem",
            Consistency::Crash => "crash",
        }
    }
}

type TakeResult = Result<zsnap::Taken, evesnap::zfs::Error>;

/// One orchestration: the plan, the report being built, the signals caught.
struct Run<'a> {
    plan: &'a Plan,
    zfs: &'a Zfs,
    report: Document,
    events: &'a mut Events<TakeResult>,
    timeout: Duration,
    /// The guest runs with expedited RCU for this freeze and must get its setting back.
    expedited_rcu: bool,
}

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

/// Runs the plan's action and returns the report (printed by the caller).
pub fn execute(plan: &Plan, zfs: &Zfs) -> Outcome {
    match Signals::install() {
        Ok(mut signals) => execute_with(plan, zfs, &mut signals),
        Err(e) => {
            let report = Document::new();
            fail(
                report,
                "preflight",
                anyhow::Error::new(e).context("cannot install signal handlers"),
            )
        }
    }
}

/// [`execute`] with signals installed by the caller. A signal caught before the run
/// stops it before it touches anything.
pub fn execute_with(plan: &Plan, zfs: &Zfs, signals: &mut Signals) -> Outcome {
    let mut report = Document::new();
    report.agent = Some(plan.agent.clone());
    report.datasets = plan.datasets.clone();
    report.snapshot = Some(match plan.action {
        Action::Create => plan.snapshot_name(),
        Action::Rollback => plan
            .rollback
            .as_ref()
            .map(|r| r.to.clone())
            .unwrap_or_default(),
    });
    report
        .extra
        .insert("id".into(), json!(plan.id().to_string()));
    report
        .extra
        .insert("type".into(), json!(plan.kind.as_str()));
    report.extra.insert("action".into(), json!(plan.action));
    let lock = match crate::lock::lock_vm(&plan.agent) {
        Ok(lock) => lock,
        Err(e) => return fail(report, "preflight", evesnap::exit::wrap(e)),
    };
    let mut run = Run {
        plan,
        zfs,
        report,
        events: &mut signals.0,
        timeout: Duration::from_secs_f64(plan.freeze.timeout_s),
        expedited_rcu: false,
    };
    let result = match plan.action {
        Action::Create => run.create(),
        Action::Rollback => run.rollback(),
    };
    drop(lock);
    match result {
        Ok(()) => Outcome::success(run.report),
        Err((step, error)) => fail(run.report, step, error),
    }
}

/// A failed step: which one, and why.
type StepError = (&'static str, anyhow::Error);

/// Records the failure with eve-api's `snap_err` fields and hands it to the tool edge.
fn fail(mut report: Document, step: &str, error: anyhow::Error) -> Outcome {
    let mut outcome = Outcome::failed(std::mem::take(&mut report), TOOL, error);
    if let (Some(doc), Some(error)) = (outcome.document.as_mut(), outcome.error.as_ref()) {
        if let Some(e) = doc.error.as_mut() {
            let severity = if evesnap::cli::exit_of(error) == Exit::ThawFailed {
                "critical"
            } else {
                "error"
            };
            e.extra.insert("description".into(), json!(e.message));
            e.extra.insert("severity".into(), json!(severity));
            e.extra.insert("step".into(), json!(step));
            e.extra
                .insert("timestamp".into(), json!(evesnap::time::now_rfc3339()));
        }
    }
    outcome
}

fn fields(value: impl serde::Serialize) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        Ok(other) => Map::from_iter([("value".to_string(), other)]),
        Err(e) => Map::from_iter([("error".to_string(), json!(e.to_string()))]),
    }
}

impl Run<'_> {
    fn step(&mut self, timer: StepTimer, ok: bool, fields: Map<String, Value>) {
        self.report.push(timer.finish(ok, fields));
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
                    evesnap::cli::chain(&anyhow::Error::new(e))
                );
                return Ok(None);
            }
            Err(e) => {
                return Err((
                    "preflight",
                    anyhow::Error::new(e).context("the guest agent is required (freeze.required)"),
                ))
            }
        };
        for &name in needed {
            match info.supported_commands.iter().find(|c| c.name == name) {
                Some(c) if c.enabled => {}
                Some(_) => {
                    return Err((
                        "preflight",
                        coded(
                            Exit::Preflight,
                            format!("the guest agent has {name} disabled"),
                        ),
                    ))
                }
                None => {
                    return Err((
                        "preflight",
                        coded(Exit::Preflight, format!("the guest agent lacks {name}")),
                    ))
                }
            }
        }
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
            let run = guest::run_command(client, command);
            evesnap::note!("{label}: {}", run.describe());
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
        self.step(timer, result.is_ok(), fields(json!({ "commands": runs })));
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
        if !undo.is_empty() {
            let _ = self.guest_commands(client, "guest_post", &undo);
        }
    }

    fn create(&mut self) -> Result<(), StepError> {
        let plan = self.plan;
        // 1. Preflight: nothing in the guest or on disk changes before all of it passed.
        let timer = StepTimer::start("preflight");
        let mut needed = vec!["guest-fsfreeze-status", "guest-fsfreeze-thaw"];
        needed.push(if plan.freeze.mountpoints.is_empty() {
            "guest-fsfreeze-freeze"
        } else {
            "guest-fsfreeze-freeze-list"
        });
        if !plan.guest_pre.is_empty() || !plan.guest_post.is_empty() {
            needed.extend(["guest-exec", "guest-exec-status"]);
        }
        let mut agent = match self.connect_agent(&needed, plan.freeze.required) {
            Ok(agent) => agent,
            Err(e) => {
                self.step(timer, false, Map::new());
                return Err(e);
            }
        };
        if let Some((client, _)) = agent.as_mut() {
            match client.fsfreeze_status() {
                Ok(qga::GuestFsfreezeStatus::thawed) => {}
                Ok(qga::GuestFsfreezeStatus::frozen) => {
                    self.step(timer, false, Map::new());
                    return Err((
                        "preflight",
                        coded(Exit::Preflight, "the guest is already frozen (another tool's freeze?): refusing to snapshot"),
                    ));
                }
                Err(e) => {
                    self.step(timer, false, Map::new());
                    return Err((
                        "preflight",
                        anyhow::Error::new(e).context("guest-fsfreeze-status"),
                    ));
                }
            }
        }
        let metadata = zsnap::Metadata {
            id: plan.id().to_string(),
            kind: plan.kind.as_str().to_ascii_uppercase(),
            frozen: agent.is_some(),
        };
        let mut prepared = match zsnap::preflight(
            self.zfs,
            &plan.datasets,
            &plan.snapshot_name(),
            &metadata.properties(),
            zsnap::DEFAULT_MIN_FREE,
        ) {
            Ok(p) => p,
            Err(e) => {
                self.step(timer, false, Map::new());
                return Err(("preflight", anyhow::Error::new(e)));
            }
        };
        let agent_version = agent.as_ref().map(|(_, info)| info.version.clone());
        self.step(
            timer,
            true,
            fields(json!({
                "agent_version": agent_version,
                "agent": agent.is_some(),
                "method": prepared.method,
                "snapshots": prepared.snapshots,
            })),
        );
        self.check_signal("guest_pre")?;

        let Some((mut client, _)) = agent else {
            return self.create_unfrozen(prepared);
        };

        // 2. Application hooks.
        let (ran, pre_ok, pre) = self.guest_commands(&mut client, "guest_pre", &plan.guest_pre);
        if let Err(e) = pre {
            self.undo_pre(&mut client, ran);
            return Err(e);
        }

        // 3. Freeze. The freeze step arms the watchdog before freezing.
        // Application-consistent only when something quiesced the application: the plan's
        // own commands, all successful, or the caller.
        let quiesced = (pre_ok && !plan.guest_pre.is_empty()) || plan.application_quiesced;
        let consistency = if quiesced {
            Consistency::Application
        } else {
            Consistency::Filesystem
        };
        if let Err(e) = prepared.set_property(CONSISTENCY_PROPERTY, consistency.as_str()) {
            return Err(("preflight", anyhow::Error::new(e)));
        }
        if plan.freeze.expedite_rcu {
            match guest::expedite_rcu(&mut client, self.timeout) {
                Ok(()) => self.expedited_rcu = true,
                Err(e) => {
                    evesnap::warn!("expedited RCU not set in the guest, freezing without it: {e}");
                    self.report
                        .extra
                        .insert("expedited_rcu".into(), json!({"set": false, "error": e}));
                }
            }
        }
        if let Err(e) = self.check_signal("freeze") {
            let _ = self.run_post(&mut client); // its step records its own result
            return Err(e);
        }
        let timer = StepTimer::start(qga_freeze::TOOL);
        let options = FreezeOptions {
            mountpoints: plan.freeze.mountpoints.clone(),
            timeout: self.timeout,
            adopt_frozen: false,
            thaw_after: (plan.freeze.thaw_after_s > 0.0)
                .then(|| Duration::from_secs_f64(plan.freeze.thaw_after_s)),
            watchdog_program: None,
        };
        // Verified inside the window, while `zfs snapshot` runs (take_while_frozen).
        let frozen = match qga_freeze::freeze_unverified(&mut client, &options) {
            Ok(report) => report,
            Err(e) => {
                // The freeze step thawed what it may have frozen; its error says how it ended.
                self.step(timer, false, Map::new());
                let exit = evesnap::exit::HasExit::exit(&e);
                let _ = self.run_post(&mut client); // its step records its own result
                return Err((
                    "freeze",
                    evesnap::exit::wrap(e).context(format!("freeze ({})", exit.kind())),
                ));
            }
        };
        self.step(timer, true, fields(&frozen));
        let freeze_step_at = self.report.steps.len() - 1;

        // 4. Snapshot, on a worker so a signal can be answered by a thaw.
        let timer = StepTimer::start(zsnap::TOOL);
        let WhileFrozen {
            taken,
            thawed: early_thaw,
            unverified,
        } = self.take_while_frozen(&mut client, &prepared, &frozen);
        if unverified {
            self.report.steps[freeze_step_at].ok = false;
        }
        let snapshot_step_at = self.report.steps.len();

        // 5. Thaw: always, whatever happened above.
        let thaw = match early_thaw {
            Some(thawed) => thawed,
            None => self.thaw(&mut client, &frozen),
        };
        // From the freeze command's return to the thaw command's return, on one clock.
        let window_ms = thaw
            .as_ref()
            .ok()
            .map(|thawed_at| thawed_at.saturating_sub(frozen.frozen_at_unix_us) as f64 / 1000.0);
        self.report
            .extra
            .insert("freeze_window_ms".into(), json!(window_ms));

        let snapshot = match taken {
            Ok(taken) => match prepared.finish(taken) {
                Ok(report) => Ok(report),
                Err(e) => Err(anyhow::Error::new(e)),
            },
            Err(e) => Err(e),
        };
        let step = match &snapshot {
            Ok(report) => {
                self.report
                    .extra
                    .insert("create_time".into(), json!(create_time(report)));
                self.report
                    .extra
                    .insert("snapshots".into(), json!(report.snapshots));
                timer.finish(true, fields(report))
            }
            Err(e) => timer.finish(false, fields(json!({ "error": evesnap::cli::chain(e) }))),
        };
        self.report.insert(snapshot_step_at, step);
        if let Err(e) = thaw {
            // The snapshot stays: it was taken while frozen. The guest is what matters now.
            self.report
                .extra
                .insert("consistency".into(), json!(consistency.as_str()));
            if self.expedited_rcu {
                // No agent to undo it with: the guest's own fallback restores it.
                self.report.extra.insert(
                    "expedited_rcu".into(),
                    json!({"set": true, "restored": false}),
                );
            }
            return Err(("thaw", e));
        }

        // 6. Post commands, also after a failed snapshot: the application must resume.
        let post = self.run_post(&mut client);
        let snapshot = match snapshot {
            Ok(s) => s,
            Err(e) => return Err((if unverified { "freeze" } else { "snapshot" }, e)),
        };
        self.report
            .extra
            .insert("consistency".into(), json!(consistency.as_str()));
        post?;
        self.check_signal("retention")?;

        // 7. Retention.
        self.retention()?;
        evesnap::note!(
            "took {} snapshot(s) {}@{} ({}), freeze window {:.1} ms",
            snapshot.snapshots.len(),
            if plan.datasets.len() == 1 {
                plan.datasets[0].as_str()
            } else {
                "<datasets>"
            },
            plan.snapshot_name(),
            consistency.as_str(),
            window_ms.unwrap_or_default()
        );
        Ok(())
    }

    /// The snapshot inside the freeze window, on a worker thread so that neither a hung
    /// zfs nor a signal keeps the guest frozen: the thaw follows as soon as `zfs snapshot`
    /// returns, or after the agent timeout (after [`SIGNAL_GRACE`] once a signal came) at
    /// the latest. The freeze is verified while `zfs snapshot` runs, which keeps that round
    /// trip out of the window. A snapshot that returns only after an early thaw (the
    /// freeze did not verify, zfs hung, a signal) is destroyed: it may postdate the thaw.
    fn take_while_frozen(
        &mut self,
        client: &mut Client,
        prepared: &zsnap::PreparedSnapshot<'_>,
        frozen: &FreezeReport,
    ) -> WhileFrozen {
        let sender = self.events.sender();
        let Run {
            events,
            report,
            timeout,
            zfs,
            plan,
            ..
        } = self;
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let _ = sender.send(Event::Done(prepared.take()));
            });
            if let Err(e) = qga_freeze::verify_frozen(client, frozen, *timeout) {
                // verify_frozen thawed already; its aftermath says whether that worked.
                let thawed = match e.aftermath() {
                    Some(a) if a.possibly_frozen => None,
                    _ => Some(evesnap::time::now_unix_us()),
                };
                let exit = evesnap::exit::HasExit::exit(&e);
                let destroyed = destroy_late(events, zfs);
                let error = evesnap::exit::wrap(e).context(format!(
                    "the freeze did not verify, so the snapshot taken meanwhile cannot be trusted and was \
                     destroyed ({destroyed})"
                ));
                // The guest may still be frozen: that is the run's outcome, with the code
                // the freeze step gives it.
                let chain = evesnap::cli::chain(&error);
                return WhileFrozen {
                    thawed: Some(thawed.ok_or_else(|| coded(exit, chain))),
                    taken: Err(error),
                    unverified: true,
                };
            }
            // A zfs that hangs must not keep the guest frozen: the snapshot gets the same
            // time as an agent call, a signal shortens that to the grace. Never longer than
            // the watchdog's deadline: while this holds the agent's one connection, the
            // watchdog cannot get through to thaw.
            let started = Instant::now();
            let limit = match plan.freeze.thaw_after_s {
                t if t > 0.0 => (*timeout).min(Duration::from_secs_f64(t)),
                _ => *timeout,
            };
            let mut deadline = started + limit;
            let mut why = format!(
                "`zfs snapshot` did not return within {:.1} s",
                limit.as_secs_f64()
            );
            loop {
                match events.wait_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Some(Event::Done(result)) => {
                        return WhileFrozen {
                            taken: result.map_err(anyhow::Error::new),
                            thawed: None,
                            unverified: false,
                        }
                    }
                    Some(Event::Signal(signal)) => {
                        let grace = Instant::now() + SIGNAL_GRACE;
                        if grace < deadline {
                            deadline = grace;
                            why = format!(
                                "interrupted by signal {signal} while `zfs snapshot` ran, which did not return \
                                 within {} s",
                                SIGNAL_GRACE.as_secs()
                            );
                        }
                    }
                    None => {
                        if Instant::now() < deadline {
                            continue;
                        }
                        let thawed = thaw_step(report, client, *timeout, frozen);
                        let destroyed = destroy_late(events, zfs);
                        let error = anyhow!(
                            "{why}: the guest was thawed without waiting for it, and what it created later was \
                             destroyed, since it may postdate the thaw ({destroyed})"
                        );
                        return WhileFrozen {
                            taken: Err(error),
                            thawed: Some(thawed),
                            unverified: false,
                        };
                    }
                }
            }
        })
    }

    fn thaw(&mut self, client: &mut Client, frozen: &FreezeReport) -> Result<u64, anyhow::Error> {
        thaw_step(&mut self.report, client, self.timeout, frozen)
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
            self.report.extra.insert(
                "expedited_rcu".into(),
                json!({"set": true, "restored": restored.is_ok()}),
            );
        }
        if self.plan.guest_post.is_empty() {
            return Ok(());
        }
        let post = self.plan.guest_post.clone();
        self.guest_commands(client, "guest_post", &post).2
    }

    /// No agent, and the plan allows it: the snapshot is taken unfrozen.
    fn create_unfrozen(
        &mut self,
        mut prepared: zsnap::PreparedSnapshot<'_>,
    ) -> Result<(), StepError> {
        if !self.plan.guest_pre.is_empty() || !self.plan.guest_post.is_empty() {
            evesnap::warn!("the guest commands are skipped: there is no agent to run them");
        }
        prepared
            .set_property(CONSISTENCY_PROPERTY, Consistency::Crash.as_str())
            .map_err(|e| ("preflight", anyhow::Error::new(e)))?;
        let timer = StepTimer::start(zsnap::TOOL);
        match prepared.take().and_then(|taken| prepared.finish(taken)) {
            Ok(report) => {
                self.report
                    .extra
                    .insert("create_time".into(), json!(create_time(&report)));
                self.report
                    .extra
                    .insert("snapshots".into(), json!(report.snapshots));
                self.report
                    .extra
                    .insert("consistency".into(), json!(Consistency::Crash.as_str()));
                self.step(timer, true, fields(&report));
            }
            Err(e) => {
                self.step(timer, false, Map::new());
                return Err(("snapshot", anyhow::Error::new(e)));
            }
        }
        self.retention()
    }

    fn retention(&mut self) -> Result<(), StepError> {
        let Some(keep) = self.plan.max_snapshots else {
            return Ok(());
        };
        let timer = StepTimer::start("retention");
        match zsnap::prune(self.zfs, &self.plan.datasets, keep as usize, false, false) {
            Ok(report) => {
                self.step(timer, true, fields(&report));
                Ok(())
            }
            Err(e) => {
                self.step(timer, false, Map::new());
                Err((
                    "retention",
                    anyhow::Error::new(e)
                        .context("the snapshot was taken, but pruning old ones failed"),
                ))
            }
        }
    }

    fn rollback(&mut self) -> Result<(), StepError> {
        let plan = self.plan;
        let Some(rollback) = plan.rollback.as_ref() else {
            return Err((
                "preflight",
                coded(Exit::Usage, "`rollback` is missing from the plan"),
            ));
        };
        // 1. Preflight: zrollback's checks, then whether the VM is stopped.
        let timer = StepTimer::start("preflight");
        let target = match zrollback::plan(
            self.zfs,
            &plan.datasets,
            &rollback.to,
            rollback.destroy_newer,
        ) {
            Ok(t) => t,
            Err(e) => {
                self.step(timer, false, Map::new());
                return Err(("preflight", anyhow::Error::new(e)));
            }
        };
        let vm_stopped = match self.vm_stopped(rollback.vm_stopped) {
            Ok(stopped) => stopped,
            Err(e) => {
                self.step(timer, false, Map::new());
                return Err(("preflight", e));
            }
        };
        let mut agent = None;
        if !vm_stopped {
            let mut needed = vec!["guest-get-fsinfo"];
            let resolves = plan.disks.values().any(|d| d.dev.is_some());
            if !plan.guest_pre.is_empty() || !plan.guest_post.is_empty() || resolves {
                needed.extend(["guest-exec", "guest-exec-status"]);
            }
            // Without an agent nothing can show the volumes are unused: it is required here.
            match self.connect_agent(&needed, true) {
                Ok(a) => agent = a,
                Err(e) => {
                    self.step(timer, false, Map::new());
                    return Err(e);
                }
            }
            if let Some(missing) = plan.datasets.iter().find(|d| !plan.disks.contains_key(*d)) {
                self.step(timer, false, Map::new());
                return Err((
                    "preflight",
                    coded(
                        Exit::Usage,
                        format!(
                            "the VM is running and the plan's `disks` does not say how the guest sees {missing}: \
                             cannot check that it is unmounted"
                        ),
                    ),
                ));
            }
        }
        // `disks.*.dev` resolved in the guest, before anything changes there.
        let mut devices: BTreeMap<&str, String> = BTreeMap::new();
        if let Some((client, _)) = agent.as_mut() {
            for (dataset, disk) in &plan.disks {
                let Some(dev) = &disk.dev else { continue };
                match guest::resolve_dev(client, dev, self.timeout) {
                    Ok(node) => {
                        devices.insert(dataset, node);
                    }
                    Err(why) => {
                        self.step(timer, false, fields(json!({ "devices": devices })));
                        return Err((
                            "preflight",
                            coded(
                                Exit::Preflight,
                                format!(
                                    "cannot tell whether {dataset} is mounted in the guest: `disks.{dataset}.dev` \
                                     does not resolve there: {why}"
                                ),
                            ),
                        ));
                    }
                }
            }
        }
        self.step(
            timer,
            true,
            fields(json!({ "vm_stopped": vm_stopped, "plan": target, "devices": devices })),
        );
        self.check_signal("guest_pre")?;

        if let Some((client, _)) = agent.as_mut() {
            // 2. Release the volumes in the guest.
            let (ran, _, pre) = self.guest_commands(client, "guest_pre", &plan.guest_pre);
            if let Err(e) = pre {
                self.undo_pre(client, ran);
                return Err(e);
            }
            // 3. Nothing may be mounted on them any more.
            let timer = StepTimer::start("unmounted");
            let busy = match client.fsinfo() {
                Ok(filesystems) => plan
                    .datasets
                    .iter()
                    .filter_map(|d| {
                        let dev = devices.get(d.as_str()).map(String::as_str);
                        let mounts = plan
                            .disks
                            .get(d)
                            .map(|disk| guest::mounts_on(&filesystems, disk, dev))
                            .unwrap_or_default();
                        (!mounts.is_empty()).then(|| format!("{d}: {}", mounts.join(", ")))
                    })
                    .collect::<Vec<_>>(),
                Err(e) => {
                    self.step(timer, false, Map::new());
                    let _ = self.run_post(client); // its step records its own result
                    return Err((
                        "unmounted",
                        anyhow::Error::new(e).context("guest-get-fsinfo"),
                    ));
                }
            };
            if !busy.is_empty() {
                self.step(timer, false, fields(json!({ "mounted": busy })));
                let _ = self.run_post(client); // its step records its own result
                return Err((
                    "unmounted",
                    coded(
                        Exit::Preflight,
                        format!(
                            "refusing to roll back under a running guest that has the volume mounted ({}); \
                             unmount it in guest_pre or stop the VM",
                            busy.join("; ")
                        ),
                    ),
                ));
            }
            self.step(timer, true, fields(json!({ "mounted": [] })));
        }
        self.check_signal("rollback")?;

        // 4. Roll back.
        let timer = StepTimer::start(zrollback::TOOL);
        let rolled = zrollback::execute(self.zfs, &target);
        let result = match rolled {
            Ok(report) => {
                self.report
                    .extra
                    .insert("rolled_back".into(), json!(report.rolled_back));
                self.report
                    .extra
                    .insert("destroyed".into(), json!(report.destroyed));
                self.step(timer, true, fields(&report));
                Ok(())
            }
            Err(e) => {
                self.step(timer, false, fields(&e.report));
                Err(("rollback", anyhow::Error::new(e.source)))
            }
        };
        // 5. Bring the guest back, whether or not the rollback worked.
        let post = match agent.as_mut() {
            Some((client, _)) => self.run_post(client),
            None => Ok(()),
        };
        result.and(post)
    }

    /// Whether the VM is stopped: the plan says so, or QMP reports it shut down.
    fn vm_stopped(&self, plan_says: bool) -> Result<bool, anyhow::Error> {
        if plan_says {
            return Ok(true);
        }
        let Some(qmp) = &self.plan.qmp else {
            return Ok(false);
        };
        let status = evesnap::qmp::Qmp::connect(std::path::Path::new(qmp), self.timeout)
            .and_then(|mut q| q.status())
            .map_err(|e| anyhow::Error::new(e).context("plan field `qmp`"))?;
        // A paused VM resumes with its caches: only a VM that is not running at all counts.
        Ok(matches!(
            status.state.as_str(),
            "shutdown" | "prelaunch" | "guest-panicked"
        ))
    }
}

/// The thaw step (`qga_thaw::thaw`, verified, watchdog cancelled), recorded in `report`;
/// when the thaw command returned.
fn thaw_step(
    report: &mut Document,
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
            report.push(timer.finish(true, fields(&thawed)));
            Ok(thawed.thawed_at_unix_us)
        }
        Err(e) => {
            report.push(timer.finish(false, Map::new()));
            Err(evesnap::exit::wrap(e))
        }
    }
}

/// What [`Run::take_while_frozen`] ended with.
struct WhileFrozen {
    taken: Result<zsnap::Taken, anyhow::Error>,
    /// Set when the guest was thawed before the snapshot was waited for: when that thaw
    /// returned (µs since the epoch), or why it may not have worked.
    thawed: Option<Result<u64, anyhow::Error>>,
    /// The freeze did not verify (`taken` holds why).
    unverified: bool,
}

/// After an early thaw: waits for the snapshot worker and destroys what it created, since
/// it may postdate the thaw. Says what was destroyed.
fn destroy_late(events: &mut Events<TakeResult>, zfs: &Zfs) -> String {
    // No result (the worker is gone): it created nothing.
    let created = loop {
        match events.wait() {
            Some(Event::Done(result)) => break result.map(|t| t.created).unwrap_or_default(),
            Some(Event::Signal(_)) => {}
            None => break Vec::new(),
        }
    };
    let mut destroyed = Vec::new();
    for snapshot in &created {
        match zfs.destroy_snapshot(snapshot) {
            Ok(()) => destroyed.push(snapshot.clone()),
            Err(e) => evesnap::warn!("cannot destroy {snapshot}, taken after an early thaw: {e}"),
        }
    }
    if destroyed.is_empty() {
        "nothing".to_string()
    } else {
        destroyed.join(", ")
    }
}

/// `create_time` for the report: the snapshots' creation, RFC 3339.
fn create_time(report: &zsnap::SnapshotReport) -> String {
    let secs = report
        .snapshots
        .iter()
        .map(|s| s.creation)
        .min()
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(evesnap::time::rfc3339)
        .unwrap_or_else(|_| evesnap::time::now_rfc3339())
}
