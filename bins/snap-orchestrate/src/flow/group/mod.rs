//! A consistency group: several VMs snapshotted at one point in time.
//!
//! locks (every VM's, in one fixed order) → each VM's preflight (in parallel) → the zfs
//! preflight of every volume (one pool, an atomic method) → `guest_pre` (in parallel) →
//! freeze (in parallel, each VM's watchdog armed before its freeze) → one `zfs snapshot`
//! of every volume while each freeze is verified (in parallel) → thaw (in parallel) → the
//! claims, per VM → `guest_post` (in parallel) → retention.
//!
//! A required VM that fails before the snapshot returned fails the group: every VM that
//! was frozen is thawed, `guest_post` runs where `guest_pre` ran, and no snapshot is left
//! (destroyed if it was taken). A VM with `required: false` that fails is left out of the
//! freeze and its volumes claim `crash`. Each VM's steps are the single-VM flow's own
//! ([`member`]), recorded in the report's `vms`.

mod member;
mod window;

use std::time::Duration;

use evesnap::document::StepTimer;
use evesnap::exit::{chain, coded, exit_of, Exit};
use evesnap::qga::Address;
use evesnap::report::{Action, Consistency, Origin, Report};
use evesnap::runtime::Lock;
use evesnap::signals::Events;
use evesnap::zfs::Zfs;

use self::member::{in_parallel, Member};
use super::CONSISTENCY_PROPERTY;
use super::{new_report, record_pending, Finished, Run, Signals, StepError, TakeResult};
use crate::group_plan::GroupPlan;
use crate::plan::Plan;

/// Runs a group plan (`create`), with signals installed for this run.
pub fn execute_group(plan: &GroupPlan, zfs: &Zfs) -> Finished {
    let name = plan.member(0).snapshot_name();
    let mut report = Report::new(
        plan.id(),
        plan.kind,
        Action::Create,
        "",
        &plan.datasets(),
        &name,
    );
    let plans: Vec<Plan> = (0..plan.vms.len()).map(|i| plan.member(i)).collect();
    let prepared = Signals::install()
        .and_then(|signals| {
            let queues = plans
                .iter()
                .map(|_| Events::install())
                .collect::<std::io::Result<Vec<Events<TakeResult>>>>()?;
            Ok((signals, queues))
        })
        .map_err(|e| anyhow::Error::new(e).context("cannot install signal handlers"))
        .and_then(|queues| lock_all(&plans, plan.lock_wait_s).map(|locks| (queues, locks)));
    let ((mut signals, mut queues), locks) = match prepared {
        Ok(ready) => ready,
        Err(error) => return Finished::failed(report, "preflight", error),
    };
    let zfs = zfs.clone().with_cancel(signals.0.cancel());
    let timeout = Duration::from_secs_f64(plan.freeze.timeout_s);
    let mut members: Vec<Member> = plans
        .iter()
        .zip(queues.iter_mut())
        .map(|(plan, events)| {
            Member::new(Run {
                plan,
                zfs: &zfs,
                report: new_report(plan),
                events,
                timeout,
                expedited_rcu: false,
                post_left: Vec::new(),
            })
        })
        .collect();
    let mut group = Group {
        plan,
        zfs: &zfs,
        events: &mut signals.0,
        report: &mut report,
        timeout,
    };
    let result = group.create(&mut members);
    let mut vms = Vec::new();
    for mut member in members {
        let left = std::mem::take(&mut member.run.post_left);
        if !left.is_empty() {
            record_pending(member.run.plan, &mut member.run.report, &left);
        }
        let consistency = report.snapshots.is_some().then(|| member.consistency());
        vms.push(member.into_report(consistency));
    }
    report.ok &= vms.iter().all(|vm| vm.ok || !vm.required);
    report.vms = Some(vms);
    drop(locks);
    Finished::ended(report, result)
}

/// Every VM's lock, taken in the order of the normalised agent addresses, so that two
/// groups sharing VMs never hold one each of what the other needs.
fn lock_all(plans: &[Plan], wait_s: f64) -> anyhow::Result<Vec<Lock>> {
    let mut addresses = plans
        .iter()
        .map(|p| {
            p.agent
                .parse::<Address>()
                .map_err(|e| coded(Exit::Usage, format!("plan field `agent`: {e}")))
        })
        .collect::<anyhow::Result<Vec<Address>>>()?;
    addresses.sort_by_key(|a| a.to_string());
    let wait = Duration::from_secs_f64(wait_s.max(0.0));
    addresses
        .iter()
        .map(|a| crate::lock::lock_vm_for(a, Origin::Controller, wait).map_err(evesnap::exit::wrap))
        .collect()
}

/// The group run: what the VMs share.
struct Group<'a, 'r> {
    plan: &'a GroupPlan,
    zfs: &'a Zfs,
    events: &'r mut Events<TakeResult>,
    report: &'r mut Report,
    timeout: Duration,
}

impl<'a> Group<'a, '_> {
    fn create(&mut self, members: &mut [Member<'_>]) -> Result<(), StepError> {
        in_parallel(members, Member::preflight);
        fails_group(members)?;
        let window = evesnap::cancel::Cancel::new().map_err(|e| {
            (
                "preflight",
                anyhow::Error::new(e).context("cannot make a cancel token"),
            )
        })?;
        let window_zfs = self.zfs.for_cleanup().with_cancel(window.clone());
        let mut prepared = self.zfs_preflight()?;
        self.check_signal("guest_pre")?;

        in_parallel(members, Member::guest_pre);
        if let Err(e) = fails_group(members) {
            in_parallel(members, Member::guest_post);
            return Err(e);
        }
        // The pools' freeze windows take turns (crate::turn), until the claims are written.
        let datasets: Vec<&String> = members.iter().flat_map(|m| &m.run.plan.datasets).collect();
        let turn = crate::turn::take(datasets, crate::turn::WAIT, || self.events.poll_signal());
        self.report.pool_turn_wait_ms = Some(turn.waited.as_secs_f64() * 1000.0);
        if let Err(e) = self.check_signal("freeze") {
            drop(turn); // nobody waits for these pools through guest_post
            in_parallel(members, Member::guest_post);
            return Err(e);
        }

        in_parallel(members, Member::freeze);
        if let Err(e) = fails_group(members) {
            in_parallel(members, Member::thaw);
            drop(turn);
            in_parallel(members, Member::guest_post);
            return Err(e);
        }

        let timer = StepTimer::start(zsnap::TOOL);
        let limit = match self.plan.freeze.thaw_after_s {
            t if t > 0.0 => self.timeout.min(Duration::from_secs_f64(t)),
            _ => self.timeout,
        };
        prepared.use_zfs(&window_zfs);
        let taken =
            window::take_while_frozen(members, &prepared, self.events, self.zfs, &window, limit);
        // Always (a VM the window thawed already is not frozen any more).
        in_parallel(members, Member::thaw);
        self.record_window(members);
        let taken = match taken {
            Ok(taken) => taken,
            Err(e) => {
                self.report.push(timer.finish(false, Default::default()));
                drop(turn);
                in_parallel(members, Member::guest_post);
                fails_group(members)?;
                return Err(("snapshot", e));
            }
        };
        let snapshot = prepared.finish(taken).map_err(evesnap::exit::wrap);
        let snapshot = snapshot.and_then(|mut snapshot| {
            for member in members.iter().filter(|m| m.thawed_at.is_some()) {
                let claims = [
                    (zsnap::meta::FROZEN.to_string(), "true".to_string()),
                    (
                        CONSISTENCY_PROPERTY.to_string(),
                        member.consistency().as_str().to_string(),
                    ),
                ];
                let snapshots: Vec<String> = member
                    .run
                    .plan
                    .datasets
                    .iter()
                    .map(|d| format!("{d}@{}", prepared.name))
                    .collect();
                zsnap::confirm_claims(&self.zfs.for_cleanup(), &snapshots, &claims).map_err(
                    |e| {
                        evesnap::exit::wrap(e).context(format!(
                            "cannot record the freeze of the VM behind {} on its snapshots, which claim nothing",
                            member.run.plan.agent
                        ))
                    },
                )?;
            }
            snapshot.properties.remove(CONSISTENCY_PROPERTY);
            snapshot.properties.remove(zsnap::meta::FROZEN);
            Ok(snapshot)
        });
        drop(turn);
        match &snapshot {
            Ok(snapshot) => {
                self.report.create_time = Some(super::create::create_time(&snapshot.snapshots));
                self.report.snapshots = Some(snapshot.snapshots.clone());
                self.report.consistency = members.iter().map(Member::consistency).min_by_key(rank);
                self.report.push(timer.finish_with(true, snapshot));
            }
            Err(_) => self.report.push(timer.finish(false, Default::default())),
        }
        in_parallel(members, Member::guest_post);
        fails_group(members)?;
        snapshot.map_err(|e| ("snapshot", e))?;
        fails_group(members)?;
        self.check_signal("retention")?;
        self.retention()
    }

    /// The zfs preflight of every volume: the one pool, an atomic method, names, room.
    /// The snapshots are created claiming nothing; each VM's claims follow its thaw.
    fn zfs_preflight(&mut self) -> Result<zsnap::PreparedSnapshot<'a>, StepError> {
        let timer = StepTimer::start("preflight");
        let metadata = zsnap::Metadata {
            id: self.plan.id().to_string(),
            kind: self.plan.kind.as_str().to_ascii_uppercase(),
            frozen: false,
            origin: Origin::Controller,
        };
        let mut properties = metadata.properties();
        properties.push((
            CONSISTENCY_PROPERTY.to_string(),
            Consistency::Crash.as_str().to_string(),
        ));
        let prepared = zsnap::preflight(
            self.zfs,
            &self.plan.datasets(),
            &self.report.snapshot,
            &properties,
            zsnap::DEFAULT_MIN_FREE,
        )
        .map_err(evesnap::exit::wrap)
        .and_then(|prepared| {
            if prepared.method.atomic() {
                Ok(prepared)
            } else {
                Err(coded(
                    Exit::Preflight,
                    "the group's volumes cannot be snapshotted in one atomic call (zfs-fuse: they must be \
                     every volume below one dataset)",
                ))
            }
        });
        match prepared {
            Ok(prepared) => {
                self.report.push(timer.finish(true, Default::default()));
                Ok(prepared)
            }
            Err(e) => {
                self.report.push(timer.finish(false, Default::default()));
                Err(("preflight", e))
            }
        }
    }

    /// The group's freeze window: from the first freeze's return to the last thaw's.
    fn record_window(&mut self, members: &[Member<'_>]) {
        let start = members.iter().filter_map(|m| m.frozen_at).min();
        let end = members.iter().filter_map(|m| m.thawed_at).max();
        if let (Some(start), Some(end)) = (start, end) {
            self.report.freeze_window_ms = Some(end.saturating_sub(start) as f64 / 1000.0);
        }
    }

    fn check_signal(&mut self, step: &'static str) -> Result<(), StepError> {
        if self.events.poll_signal() {
            let signal = self.events.interrupted.unwrap_or_default();
            return Err((
                step,
                anyhow::anyhow!("interrupted by signal {signal} before {step}"),
            ));
        }
        Ok(())
    }

    fn retention(&mut self) -> Result<(), StepError> {
        let Some(keep) = self.plan.max_snapshots else {
            return Ok(());
        };
        let timer = StepTimer::start("retention");
        match zsnap::prune(self.zfs, &self.plan.datasets(), keep as usize, false, false) {
            Ok(report) => {
                self.report.push(timer.finish_with(true, &report));
                Ok(())
            }
            Err(e) => {
                self.report.push(timer.finish(false, Default::default()));
                Err((
                    "retention",
                    evesnap::exit::wrap(e)
                        .context("the snapshot was taken, but pruning old ones failed"),
                ))
            }
        }
    }
}

/// The group's error when a required VM failed: that VM's failed step, its exit code, the
/// VM named.
fn fails_group(members: &[Member<'_>]) -> Result<(), StepError> {
    let failed = members
        .iter()
        .filter(|m| m.required)
        .find_map(|m| m.error.as_ref().map(|(step, e)| (m, *step, e)));
    match failed {
        None => Ok(()),
        Some((member, step, error)) => Err((
            step,
            coded(
                exit_of(error),
                format!("VM {}: {}", member.run.plan.agent, chain(error)),
            ),
        )),
    }
}

/// Weakest first. (A group's VMs run: its snapshots never claim `halted*`, ranked here
/// between a live VM not frozen and a frozen one.)
fn rank(consistency: &Consistency) -> u8 {
    match consistency {
        Consistency::Crash => 0,
        Consistency::Halted => 1,
        Consistency::HaltedClean => 2,
        Consistency::Filesystem => 3,
        Consistency::Application => 4,
    }
}
