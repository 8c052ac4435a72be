//! `action: create`: preflight → guest_pre → freeze → snapshot → thaw (always) →
//! guest_post → retention.

use std::time::Instant;

use anyhow::anyhow;
use evesnap::cancel::Cancel;
use evesnap::document::StepTimer;
use evesnap::exit::{chain, coded, Exit, HasExit};
use evesnap::qga::commands as qga;
use evesnap::report::ExpeditedRcu;
use evesnap::steps::{Method, SnapshotEntry, SnapshotReport, StepRecord};
use qga_freeze::CleanupThaw;
use serde::Serialize;

use super::halted::VmState;
use super::window::WhileFrozen;
use super::{thaw_step, Consistency, Run, StepError, CONSISTENCY_PROPERTY};
use crate::guest;
use crate::plan::RetentionOrder;

/// The `vm_state` step's record, for a VM found not running.
#[derive(Debug, Serialize)]
struct Halted {
    running: bool,
    clean: bool,
    /// The volumes were checked: no process on the host has them open.
    in_use: bool,
}

/// The create preflight's record.
#[derive(Debug, Serialize)]
struct Preflight<'a> {
    agent_version: Option<String>,
    agent: bool,
    method: &'a Method,
    snapshots: &'a [String],
}

/// A failed snapshot step: why.
#[derive(Debug, Serialize)]
struct SnapshotFailed {
    error: String,
}

impl Run<'_> {
    pub(super) fn create(&mut self) -> Result<(), StepError> {
        let plan = self.plan;
        // 0. The set may exist already (the same config handled again): reported, not retaken.
        if self.existing()? {
            return Ok(());
        }
        let halted = self.halted_vm()?;
        // The freeze window's own cancel: the snapshot inside it gets the signal grace, and
        // is cancelled once the guest was thawed without it.
        let window = Cancel::new().map_err(|e| {
            (
                "preflight",
                anyhow::Error::new(e).context("cannot make a cancel token"),
            )
        })?;
        let window_zfs = self.zfs.for_cleanup().with_cancel(window.clone());
        // 1. Preflight: nothing in the guest or on disk changes before all of it passed.
        let timer = StepTimer::start("preflight");
        let options = plan.freeze.options();
        let mut exec = Vec::new();
        if !plan.guest_pre.is_empty() || !plan.guest_post.is_empty() {
            exec.extend(["guest-exec", "guest-exec-status"]);
        }
        // `freeze.enabled: false` (a disk nothing is mounted from) or a VM that is not
        // running: no agent, no freeze.
        let connected = if plan.freeze.enabled && halted.is_none() {
            self.connect_agent(&[], plan.freeze.required)
        } else {
            Ok(None)
        };
        let agent = match connected {
            Ok(agent) => agent,
            Err(e) => {
                self.failed(timer);
                return Err(e);
            }
        };
        let mut agent = match agent {
            Some((mut client, info)) => {
                match qga_freeze::check(&mut client, &options, &info, &exec) {
                    Ok(qga::GuestFsfreezeStatus::thawed) => Some((client, info)),
                    Ok(qga::GuestFsfreezeStatus::frozen) => {
                        self.failed(timer);
                        return Err((
                            "preflight",
                            coded(Exit::Preflight, "the guest is already frozen (another tool's freeze?): refusing to snapshot"),
                        ));
                    }
                    Err(e) => {
                        self.failed(timer);
                        return Err(("preflight", evesnap::exit::wrap(e)));
                    }
                }
            }
            None => None,
        };
        // Created claiming nothing (`frozen=false`, `consistency=crash`): the claims are
        // written only once `zfs snapshot` returned inside the verified freeze, so that a
        // snapshot completing after this process died (SIGKILL) claims nothing.
        let metadata = zsnap::Metadata {
            id: plan.id().to_string(),
            kind: plan.kind.as_str().to_ascii_uppercase(),
            frozen: false,
            origin: plan.origin,
        };
        // EVE's order: room is made before the create (and before the space check), once
        // the guest is known to be ready; its step goes before the preflight's.
        self.retention(RetentionOrder::BeforeCreate)?;
        let mut prepared = match zsnap::preflight(
            self.zfs,
            &plan.datasets,
            &plan.snapshot_name(),
            &metadata.properties(),
            zsnap::DEFAULT_MIN_FREE,
        ) {
            Ok(p) => p,
            Err(e) => {
                self.failed(timer);
                return Err(("preflight", evesnap::exit::wrap(e)));
            }
        };
        self.done(
            timer,
            &Preflight {
                agent_version: agent.as_ref().map(|(_, info)| info.version.clone()),
                agent: agent.is_some(),
                method: &prepared.method,
                snapshots: &prepared.snapshots,
            },
        );
        self.check_signal("guest_pre")?;

        let Some((mut client, info)) = agent.take() else {
            return self.create_unfrozen(prepared, halted.unwrap_or(Consistency::Crash));
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
        let by_hooks = pre_ok && !plan.guest_pre.is_empty();
        let mut consistency = if by_hooks || plan.application_quiesced {
            Consistency::Application
        } else {
            Consistency::Filesystem
        };
        let claimed = prepared
            .claim(zsnap::meta::FROZEN, "false", "true")
            .and_then(|()| {
                prepared.claim(
                    CONSISTENCY_PROPERTY,
                    Consistency::Crash.as_str(),
                    consistency.as_str(),
                )
            });
        if let Err(e) = claimed {
            return Err(("preflight", evesnap::exit::wrap(e)));
        }
        // This pool's freeze windows take turns (crate::turn): waited for before the flush,
        // held until the claims are written.
        let turn = crate::turn::take(&plan.datasets, crate::turn::WAIT, || {
            self.events.poll_signal()
        });
        self.report.pool_turn_wait_ms = Some(turn.waited.as_secs_f64() * 1000.0);
        // The flush first, the RCU setting after it: the setting restores itself 10 s after
        // it was made, and a slow flush must not use that time up before the freeze.
        if plan.freeze.flush_first {
            let timer = StepTimer::start(guest::FlushReport::TOOL);
            let flushed = guest::flush(&mut client, &plan.freeze.mountpoints, self.timeout);
            if let Some(e) = &flushed.error {
                evesnap::warn!("the flush before the freeze did not run, freezing without it: {e}");
            }
            // Never fails the run: the freeze flushes anyway, only inside the stall.
            self.done(timer, &flushed);
        }
        if plan.freeze.expedite_rcu {
            match guest::expedite_rcu(&mut client, self.timeout) {
                Ok(()) => self.expedited_rcu = true,
                Err(e) => {
                    evesnap::warn!("expedited RCU not set in the guest, freezing without it: {e}");
                    self.report.expedited_rcu = Some(ExpeditedRcu {
                        set: false,
                        restored: None,
                        error: Some(e),
                    });
                }
            }
        }
        if let Err(e) = self.check_signal("freeze") {
            drop(turn); // nobody waits for this pool through guest_post
            let _ = self.run_post(&mut client); // its step records its own result
            return Err(e);
        }
        let timer = StepTimer::start(qga_freeze::TOOL);
        // The state the preflight saw holds unless something ran in the guest since.
        let ran_in_guest =
            !plan.guest_pre.is_empty() || plan.freeze.expedite_rcu || plan.freeze.flush_first;
        let status = (!ran_in_guest).then_some(qga::GuestFsfreezeStatus::thawed);
        // Verified inside the window, while `zfs snapshot` runs (take_while_frozen).
        let frozen = match qga_freeze::freeze_checked(&mut client, &options, &info.version, status)
        {
            Ok(report) => report,
            Err(e) => {
                // The freeze step thawed what it may have frozen; its error says how it ended.
                self.failed(timer);
                let exit = e.exit();
                let thawed = e.aftermath().is_some_and(|a| {
                    !a.possibly_frozen && matches!(a.thaw, Some(CleanupThaw::Thawed { .. }))
                });
                let error = evesnap::exit::wrap(e).context(format!("freeze ({})", exit.kind()));
                drop(turn);
                if self.falls_back(thawed) {
                    return self.crash_fallback(&mut client, &mut prepared, &error);
                }
                let _ = self.run_post(&mut client); // its step records its own result
                return Err(("freeze", error));
            }
        };
        self.done(timer, &frozen);
        let freeze_step_at = self.report.steps.len() - 1;

        // 4. Snapshot, on a worker so a signal can be answered by a thaw. Its step goes
        // here, before the thaw's, whenever the thaw is recorded (an early one included).
        let timer = StepTimer::start(zsnap::TOOL);
        let snapshot_step_at = self.report.steps.len();
        let WhileFrozen {
            taken,
            thawed: early_thaw,
            unverified,
        } = self.take_while_frozen(&mut client, &mut prepared, &window_zfs, &window, &frozen);
        if unverified {
            self.report.steps[freeze_step_at].ok = false;
            self.report.ok = false;
        }
        // The caller's quiescing holds only while it waits: a snapshot that returned after
        // its deadline may postdate the application's resumption.
        let returned_at = Instant::now();
        if consistency == Consistency::Application
            && !by_hooks
            && plan
                .quiesced_until
                .is_some_and(|until| returned_at >= until)
        {
            evesnap::warn!(
                "the snapshot returned after the requester's deadline: its application may have resumed, \
                 so the snapshot claims `filesystem` only"
            );
            consistency = Consistency::Filesystem;
            let _ = prepared.claim(
                CONSISTENCY_PROPERTY,
                Consistency::Crash.as_str(),
                consistency.as_str(),
            );
        }

        // 5. Thaw: always, whatever happened above.
        let thaw = match early_thaw {
            Some(thawed) => thawed,
            None => thaw_step(&mut self.report, &mut client, self.timeout, &frozen),
        };
        // From the freeze command's return to the thaw command's return, on one clock.
        self.report.freeze_window_ms = thaw
            .as_ref()
            .ok()
            .map(|thawed_at| thawed_at.saturating_sub(frozen.frozen_at_unix_us) as f64 / 1000.0);

        // `taken` is Ok only when `zfs snapshot` returned before any thaw: the claims hold.
        let snapshot = taken.and_then(|taken| {
            let mut report = prepared.finish(taken).map_err(evesnap::exit::wrap)?;
            prepared.confirm_claims().map_err(|e| {
                evesnap::exit::wrap(e)
                    .context("cannot record the freeze on the snapshot, which claims nothing")
            })?;
            report.properties.extend(prepared.claims.iter().cloned());
            Ok(report)
        });
        drop(turn);
        let step = match &snapshot {
            Ok(report) => {
                self.record_snapshots(report);
                timer.finish_with(true, report)
            }
            Err(e) => timer.finish_with(false, &SnapshotFailed { error: chain(e) }),
        };
        self.report.insert(snapshot_step_at, step);
        if let Err(e) = thaw {
            // The snapshot stays: it was taken while frozen. The guest is what matters now.
            self.report.consistency = Some(consistency);
            if self.expedited_rcu {
                // No agent to undo it with: the guest's own fallback restores it.
                self.report.expedited_rcu = Some(ExpeditedRcu {
                    set: true,
                    restored: Some(false),
                    error: None,
                });
            }
            return Err(("thaw", e));
        }

        // The freeze did not verify, and the guest was thawed and verified since.
        if unverified && self.falls_back(true) {
            if let Err(why) = snapshot {
                prepared.use_zfs(self.zfs); // the window's view is cancelled
                return self.crash_fallback(&mut client, &mut prepared, &why);
            }
        }

        // 6. Post commands, also after a failed snapshot: the application must resume.
        let post = self.run_post(&mut client);
        let snapshot = match snapshot {
            Ok(s) => s,
            Err(e) => return Err((if unverified { "freeze" } else { "snapshot" }, e)),
        };
        self.report.consistency = Some(consistency);
        post?;
        self.check_signal("retention")?;

        // 7. Retention.
        self.retention(RetentionOrder::AfterCreate)?;
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
            self.report.freeze_window_ms.unwrap_or_default()
        );
        Ok(())
    }

    /// The report's `snapshots` and `create_time`.
    fn record_snapshots(&mut self, report: &SnapshotReport) {
        self.record_snapshots_of(report.snapshots.clone());
    }

    /// The report's `snapshots`, `volume_snapshots` and `create_time`.
    pub(super) fn record_snapshots_of(&mut self, snapshots: Vec<SnapshotEntry>) {
        self.report.set_create_time(create_time(&snapshots));
        self.report.volume_snapshots = self.by_volume(snapshots.iter().map(|s| s.name.as_str()));
        self.report.snapshots = Some(snapshots);
    }

    /// A VM found not running (QMP): the consistency its snapshot claims, once no process on
    /// the host holds its volumes (exit 7 otherwise). `None`: it runs.
    fn halted_vm(&mut self) -> Result<Option<Consistency>, StepError> {
        let timer = StepTimer::start("vm_state");
        let state = match self.vm_state() {
            Ok(state) => state,
            Err(e) => {
                self.failed(timer);
                return Err(("preflight", e));
            }
        };
        let VmState::Halted { clean, qemu } = &state else {
            return Ok(None);
        };
        let record = |in_use| Halted {
            running: false,
            clean: *clean,
            in_use,
        };
        if let Err(e) = self.check_unheld(qemu) {
            self.report.push(timer.finish_with(false, &record(true)));
            return Err(("preflight", e));
        }
        self.done(timer, &record(false));
        Ok(state.consistency())
    }

    /// No agent and the plan allows it, or the VM is not running: the snapshot is taken
    /// unfrozen, claiming `consistency`.
    fn create_unfrozen(
        &mut self,
        mut prepared: zsnap::PreparedSnapshot<'_>,
        consistency: Consistency,
    ) -> Result<(), StepError> {
        if consistency == Consistency::Crash
            && (!self.plan.guest_pre.is_empty() || !self.plan.guest_post.is_empty())
        {
            evesnap::warn!("the guest commands are skipped: there is no agent to run them");
        }
        self.snapshot_unfrozen(&mut prepared, consistency, None)?;
        self.retention(RetentionOrder::AfterCreate)
    }

    /// Takes the snapshot without a freeze, labelled `consistency` (`crash` or `halted*`;
    /// `frozen=false`, and the `crash_reason` when given), and records it.
    pub(super) fn snapshot_unfrozen(
        &mut self,
        prepared: &mut zsnap::PreparedSnapshot<'_>,
        consistency: Consistency,
        crash_reason: Option<&str>,
    ) -> Result<(), StepError> {
        // Properties, not claims: what it says holds however the snapshot call ends.
        let labelled = prepared
            .set_property(zsnap::meta::FROZEN, "false")
            .and_then(|()| prepared.set_property(CONSISTENCY_PROPERTY, consistency.as_str()))
            .and_then(|()| match crash_reason {
                Some(reason) => prepared.set_property(
                    zsnap::meta::CRASH_REASON,
                    &zsnap::meta::crash_reason(reason),
                ),
                None => Ok(()),
            });
        labelled.map_err(|e| ("snapshot", evesnap::exit::wrap(e)))?;
        let timer = StepTimer::start(zsnap::TOOL);
        match prepared.take().and_then(|taken| prepared.finish(taken)) {
            Ok(report) => {
                self.record_snapshots(&report);
                self.report.consistency = Some(consistency);
                self.done(timer, &report);
                Ok(())
            }
            Err(e) => {
                self.failed(timer);
                Err(("snapshot", evesnap::exit::wrap(e)))
            }
        }
    }

    /// `max_snapshots`, when the plan's order says `when`: an app's sets
    /// ([`Run::app_retention`]), or each dataset's ([`zsnap::prune`]). Before the create it
    /// keeps one fewer, so that the new set fits.
    pub(super) fn retention(&mut self, when: RetentionOrder) -> Result<(), StepError> {
        let Some(max) = self.plan.max_snapshots else {
            return Ok(());
        };
        if self.plan.retention_order() != when {
            return Ok(());
        }
        let keep = match when {
            RetentionOrder::BeforeCreate => max as usize - 1,
            RetentionOrder::AfterCreate => max as usize,
        };
        let timer = StepTimer::start("retention");
        let pruned = if self.plan.app.is_some() {
            self.app_retention(keep)
        } else {
            zsnap::prune(self.zfs, &self.plan.datasets, keep, false, false)
        };
        let taken = match when {
            RetentionOrder::BeforeCreate => "the snapshot was not taken yet",
            RetentionOrder::AfterCreate => "the snapshot was taken",
        };
        match pruned {
            Ok(report) => {
                self.done(timer, &report);
                // A signal cancelled the destroys still to come: the run did not finish.
                if self.events.poll_signal() {
                    let signal = self.events.interrupted.unwrap_or_default();
                    return Err((
                        "retention",
                        anyhow!(
                            "interrupted by signal {signal} during retention: {taken}, {} old \
                             snapshot(s) were not pruned",
                            report.failed.len()
                        ),
                    ));
                }
                Ok(())
            }
            Err(e) => {
                self.failed(timer);
                Err((
                    "retention",
                    evesnap::exit::wrap(e)
                        .context(format!("pruning old snapshots failed ({taken})")),
                ))
            }
        }
    }
}

/// `create_time` for the report: the snapshots' creation, RFC 3339.
pub(super) fn create_time(snapshots: &[SnapshotEntry]) -> String {
    let secs = snapshots.iter().map(|s| s.creation).min().unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(evesnap::time::rfc3339)
        .unwrap_or_else(|_| evesnap::time::now_rfc3339())
}
