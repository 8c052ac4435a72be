//! One VM of a consistency group: the single-VM flow's own steps (`Run::connect_agent`,
//! `Run::guest_commands`, `Run::run_post`, `thaw_step`) on its own agent, its own report,
//! and the phases run for every VM in parallel.

use evesnap::document::StepTimer;
use evesnap::exit::{chain, Exit, HasExit};
use evesnap::qga::commands as qga;
use evesnap::qga::Client;
use evesnap::report::{Consistency, Report, VmReport};
use evesnap::steps::FreezeReport;
use qga_freeze::FreezeOptions;

use super::super::{thaw_step, Run, StepError, TOOL};

/// A VM's part of the group run.
pub(super) struct Member<'a> {
    pub(super) run: Run<'a>,
    pub(super) required: bool,
    pub(super) options: FreezeOptions,
    /// The agent, once the preflight connected; `None`: the VM is not frozen (`crash`).
    pub(super) agent: Option<(Client, qga::GuestAgentInfo)>,
    /// `guest_pre` ran and all of it succeeded (with at least one command).
    pub(super) quiesced: bool,
    /// Frozen, not yet thawed.
    pub(super) frozen: Option<FreezeReport>,
    /// What the freeze froze, kept for the report.
    pub(super) froze: Option<i64>,
    /// The freeze was verified while the snapshot ran.
    pub(super) verified: bool,
    /// This VM's freeze window, once thawed.
    pub(super) window_ms: Option<f64>,
    /// When the freeze and the thaw returned (µs since the epoch).
    pub(super) frozen_at: Option<u64>,
    pub(super) thawed_at: Option<u64>,
    /// This VM's failure: it fails the group when `required`.
    pub(super) error: Option<StepError>,
}

impl<'a> Member<'a> {
    pub(super) fn new(run: Run<'a>) -> Member<'a> {
        let plan = run.plan;
        let options = plan.freeze.options();
        Member {
            required: plan.freeze.required,
            run,
            options,
            agent: None,
            quiesced: false,
            frozen: None,
            froze: None,
            verified: false,
            window_ms: None,
            frozen_at: None,
            thawed_at: None,
            error: None,
        }
    }

    /// The VM's agent, checked as the single-VM preflight checks it: it answers, has the
    /// freeze (and `guest-exec` when there are guest commands), the guest is thawed. A VM
    /// that is not required and fails this is left out of the freeze.
    pub(super) fn preflight(&mut self) {
        let timer = StepTimer::start("preflight");
        let plan = self.run.plan;
        let mut exec = Vec::new();
        if !plan.guest_pre.is_empty() || !plan.guest_post.is_empty() {
            exec.extend(["guest-exec", "guest-exec-status"]);
        }
        let checked = self.run.connect_agent(&[], true).and_then(|agent| {
            // Asked as required: no agent is an error, never `None`.
            let Some((mut client, info)) = agent else {
                return Err((
                    "preflight",
                    evesnap::exit::coded(Exit::AgentUnreachable, "no guest agent"),
                ));
            };
            match qga_freeze::check(&mut client, &self.options, &info, &exec) {
                Ok(qga::GuestFsfreezeStatus::thawed) => Ok((client, info)),
                Ok(qga::GuestFsfreezeStatus::frozen) => Err((
                    "preflight",
                    evesnap::exit::coded(
                        Exit::Preflight,
                        "the guest is already frozen (another tool's freeze?)",
                    ),
                )),
                Err(e) => Err(("preflight", evesnap::exit::wrap(e))),
            }
        });
        match checked {
            Ok(agent) => {
                self.agent = Some(agent);
                self.run.report.push(timer.finish(true, Default::default()));
            }
            Err(e) => {
                self.run.failed(timer);
                self.fail(e);
            }
        }
    }

    /// `guest_pre`; a fatal failure undoes what ran and leaves the VM unfrozen.
    pub(super) fn guest_pre(&mut self) {
        let Some((client, _)) = self.agent.as_mut() else {
            return;
        };
        let plan = self.run.plan;
        let (ran, ok, result) = self
            .run
            .guest_commands(client, "guest_pre", &plan.guest_pre);
        if let Err(e) = result {
            self.run.undo_pre(client, ran);
            self.agent = None;
            self.fail(e);
            return;
        }
        self.quiesced = ok && !plan.guest_pre.is_empty();
    }

    /// Arms the watchdog and freezes. A failed freeze thawed what it may have frozen.
    pub(super) fn freeze(&mut self) {
        let Some((client, info)) = self.agent.as_mut() else {
            return;
        };
        let timer = StepTimer::start(qga_freeze::TOOL);
        match qga_freeze::freeze_checked(client, &self.options, &info.version, None) {
            Ok(report) => {
                self.froze = report.frozen;
                self.frozen_at = Some(report.frozen_at_unix_us);
                self.run.done(timer, &report);
                self.frozen = Some(report);
            }
            Err(e) => {
                self.run.failed(timer);
                let exit = e.exit();
                let error = evesnap::exit::wrap(e).context(format!("freeze ({})", exit.kind()));
                self.fail(("freeze", error));
            }
        }
    }

    /// The freeze holds (asked while the snapshot runs). A freeze that does not verify was
    /// thawed by the check; the VM then counts as not frozen.
    pub(super) fn verify(&mut self) {
        let (Some((client, _)), Some(frozen)) = (self.agent.as_mut(), self.frozen.as_ref()) else {
            return;
        };
        match qga_freeze::verify_frozen(client, frozen, self.run.timeout) {
            Ok(()) => self.verified = true,
            Err(e) => {
                let possibly_frozen = e.aftermath().is_some_and(|a| a.possibly_frozen);
                let exit = if possibly_frozen {
                    Exit::ThawFailed
                } else {
                    e.exit()
                };
                let error = evesnap::exit::wrap(e)
                    .context(format!("the freeze did not verify ({})", exit.kind()));
                let error = if possibly_frozen {
                    evesnap::exit::recode(Exit::ThawFailed, error)
                } else {
                    error
                };
                self.frozen = None;
                self.fail(("freeze", error));
            }
        }
    }

    /// Thaws a frozen VM (verified, its watchdog cancelled) and records its window.
    pub(super) fn thaw(&mut self) {
        let (Some((client, _)), Some(frozen)) = (self.agent.as_mut(), self.frozen.take()) else {
            return;
        };
        match thaw_step(&mut self.run.report, client, self.run.timeout, &frozen) {
            Ok(thawed_at) => {
                self.thawed_at = Some(thawed_at);
                self.window_ms =
                    Some(thawed_at.saturating_sub(frozen.frozen_at_unix_us) as f64 / 1000.0);
            }
            Err(e) => {
                self.verified = false;
                self.fail(("thaw", e));
            }
        }
    }

    /// `guest_post` after the thaw (or the failed freeze), like the single-VM flow.
    pub(super) fn guest_post(&mut self) {
        let Some((client, _)) = self.agent.as_mut() else {
            return;
        };
        if let Err(e) = self.run.run_post(client) {
            self.fail(e);
        }
    }

    /// What this VM's snapshots can claim once the snapshot returned inside the window.
    pub(super) fn consistency(&self) -> Consistency {
        match (self.verified, self.quiesced) {
            (true, true) => Consistency::Application,
            (true, false) => Consistency::Filesystem,
            (false, _) => Consistency::Crash,
        }
    }

    /// Records the VM's failure (the first one counts).
    pub(super) fn fail(&mut self, (step, error): StepError) {
        evesnap::warn!("VM {}: {step}: {}", self.run.plan.agent, chain(&error));
        self.run.report.fail(TOOL, step, &error);
        self.error.get_or_insert((step, error));
    }

    /// The VM's part of the group report.
    pub(super) fn into_report(self, consistency: Option<Consistency>) -> VmReport {
        let Report {
            agent,
            datasets,
            ok,
            steps,
            error,
            guest_post,
            ..
        } = self.run.report;
        VmReport {
            agent,
            datasets,
            required: self.required,
            ok,
            steps,
            frozen: self.froze,
            consistency,
            freeze_window_ms: self.window_ms,
            guest_post,
            error,
        }
    }
}

/// Runs `phase` for every member at once, one thread each.
pub(super) fn in_parallel<'a>(members: &mut [Member<'a>], phase: fn(&mut Member<'a>)) {
    std::thread::scope(|scope| {
        for member in members.iter_mut() {
            scope.spawn(move || phase(member));
        }
    });
}
