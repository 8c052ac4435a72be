//! `action: create`: preflight → guest_pre → freeze → snapshot → thaw (always) →
//! guest_post → retention.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use evesnap::cancel::Cancel;
use evesnap::document::StepTimer;
use evesnap::exit::{chain, coded, Exit, HasExit};
use evesnap::qga::commands as qga;
use evesnap::report::ExpeditedRcu;
use evesnap::steps::{Method, SnapshotEntry, SnapshotReport, StepRecord};
use qga_freeze::FreezeOptions;
use serde::Serialize;

use super::window::WhileFrozen;
use super::{thaw_step, Consistency, Run, StepError, CONSISTENCY_PROPERTY};
use crate::guest;

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
        let options = FreezeOptions {
            mountpoints: plan.freeze.mountpoints.clone(),
            timeout: self.timeout,
            adopt_frozen: false,
            thaw_after: (plan.freeze.thaw_after_s > 0.0)
                .then(|| Duration::from_secs_f64(plan.freeze.thaw_after_s)),
            watchdog_program: None,
        };
        let mut exec = Vec::new();
        if !plan.guest_pre.is_empty() || !plan.guest_post.is_empty() {
            exec.extend(["guest-exec", "guest-exec-status"]);
        }
        // `freeze.enabled: false` (a disk nothing is mounted from): no agent, no freeze.
        let connected = if plan.freeze.enabled {
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
                let _ = self.run_post(&mut client); // its step records its own result
                return Err((
                    "freeze",
                    evesnap::exit::wrap(e).context(format!("freeze ({})", exit.kind())),
                ));
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
            self.report.freeze_window_ms.unwrap_or_default()
        );
        Ok(())
    }

    /// The report's `snapshots` and `create_time`.
    fn record_snapshots(&mut self, report: &SnapshotReport) {
        self.report.create_time = Some(create_time(&report.snapshots));
        self.report.snapshots = Some(report.snapshots.clone());
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
            .map_err(|e| ("preflight", evesnap::exit::wrap(e)))?;
        let timer = StepTimer::start(zsnap::TOOL);
        match prepared.take().and_then(|taken| prepared.finish(taken)) {
            Ok(report) => {
                self.record_snapshots(&report);
                self.report.consistency = Some(Consistency::Crash);
                self.done(timer, &report);
            }
            Err(e) => {
                self.failed(timer);
                return Err(("snapshot", evesnap::exit::wrap(e)));
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
                self.done(timer, &report);
                // A signal cancelled the destroys still to come: the run did not finish.
                if self.events.poll_signal() {
                    let signal = self.events.interrupted.unwrap_or_default();
                    return Err((
                        "retention",
                        anyhow!(
                            "interrupted by signal {signal} during retention: the snapshot was taken, {} old \
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
                        .context("the snapshot was taken, but pruning old ones failed"),
                ))
            }
        }
    }
}

/// `create_time` for the report: the snapshots' creation, RFC 3339.
fn create_time(snapshots: &[SnapshotEntry]) -> String {
    let secs = snapshots.iter().map(|s| s.creation).min().unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(evesnap::time::rfc3339)
        .unwrap_or_else(|_| evesnap::time::now_rfc3339())
}
