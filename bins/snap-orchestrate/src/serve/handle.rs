//! One request: identify the disk, then list, or build a plan and run the orchestrator's
//! own flow, and turn its typed report into the guest's reply.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use evesnap::exit::{chain, chain_of, exit_of, Exit};
use evesnap::qga::commands::GuestFilesystemInfo;
use evesnap::qga::{Address, Client};
use evesnap::report::{Action, Report, SnapshotType};
use evesnap::request::{self, Op, Reply, ReplyError, Request, SnapshotEntry};
use evesnap::zfs::{self, Zfs};

use super::budget::{self, Budget};
use super::deadline::{deadline_of, GuestClock};
use super::identify::{identify, refuse, Identified, Placed};
use super::rate::{Guest, RequestRate};
use super::redact::Redactor;
use super::volumes::{label, Volumes};
use crate::flow::{self, Finished, Signals};
use crate::placement;
use crate::plan::{FreezePlan, GuestDisk, OnFreezeFailure, Plan, RollbackPlan};

/// What one served request produced, for the host's records on stdout.
#[derive(Debug)]
pub struct Served {
    pub request: Option<Request>,
    pub reply: Reply,
    pub report: Option<Report>,
    /// Refused by the VM's rates before any work: recorded only up to a rate, like a bad
    /// line.
    pub rated: bool,
}

/// The VM a request is served for: its volumes, its agent, what its replies must not name.
#[derive(Debug, Clone)]
pub struct Vm {
    pub(super) volumes: Volumes,
    /// The VM's QMP socket (`--qmp`): places the volumes in the guest for each request.
    pub(super) qmp: Option<std::path::PathBuf>,
    pub(super) agent_text: String,
    pub(super) agent: Address,
    pub(super) redactor: Redactor,
}

/// The listener's state.
pub struct Server {
    /// The VM of the connection being served (one VM unless the listener serves a CID map).
    pub(super) vm: Vm,
    pub(super) zfs: Zfs,
    pub(super) timeout: Duration,
    pub(super) thaw_after: f64,
    pub(super) signals: Signals,
    pub(super) budget: Budget,
    pub(super) rate: RequestRate,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("agent", &self.vm.agent_text)
            .field("volumes", &self.vm.volumes)
            .finish()
    }
}

impl Server {
    fn bad_request(id: Option<String>, message: String) -> Served {
        Served {
            request: None,
            reply: Reply::failure(id, None, refuse("bad-request", Exit::Usage, message)),
            report: None,
            rated: false,
        }
    }

    /// Serves one line read from the channel of `guest`'s VM.
    pub fn handle_line(&mut self, line: &[u8], guest: &mut Guest) -> Served {
        let request = match Request::from_line(line) {
            Ok(request) => request,
            Err(e) => return Server::bad_request(request::salvage_id(line), e.0),
        };
        if let Some(error) = guest.admit(&request, Instant::now()) {
            return Served {
                reply: Reply::failure(Some(request.id.clone()), Some(request.op), error),
                request: Some(request),
                report: None,
                rated: true,
            };
        }
        let (reply, report) = self.handle(&request, guest);
        Served {
            request: Some(request),
            reply,
            report,
            rated: false,
        }
    }

    /// The guest's filesystems and, when the request has a deadline, the guest's clock.
    fn fsinfo(
        &self,
        request: &Request,
    ) -> Result<(Vec<GuestFilesystemInfo>, Option<GuestClock>), evesnap::qga::Error> {
        let mut client = Client::connect(&self.vm.agent, Instant::now() + self.timeout)?;
        client.set_timeout(self.timeout);
        // The agent answers again: what a run could not run before goes first.
        if evesnap::pending::any(&self.vm.agent) {
            match evesnap::pending::run(&mut client, &self.vm.agent) {
                Ok(Some(ran)) => evesnap::note!(
                    "ran {} pending guest_post command(s) of run {} ({} failed, {} still pending)",
                    ran.commands.len(),
                    ran.id,
                    ran.commands.iter().filter(|c| !c.ok).count(),
                    ran.put_back
                ),
                Ok(None) => {}
                Err(e) => evesnap::warn!("pending guest_post: {}", evesnap::exit::chain_of(&e)),
            }
        }
        let clock = match request.deadline_ms {
            Some(_) => {
                let asked_at = Instant::now();
                let ns = client.guest_time_ns()?;
                Some(GuestClock {
                    asked_at,
                    now_ms: u64::try_from(ns / 1_000_000).unwrap_or(0),
                })
            }
            None => None,
        };
        Ok((client.fsinfo()?, clock))
    }

    fn handle(&mut self, request: &Request, guest: &mut Guest) -> (Reply, Option<Report>) {
        let fail =
            |error: ReplyError| Reply::failure(Some(request.id.clone()), Some(request.op), error);
        if let Some(error) = self.controller_first(request.op) {
            return (fail(error), None);
        }
        if request.op == Op::Create {
            guest.create_tried(Instant::now());
        }
        let (fsinfo, clock) = match self.fsinfo(request) {
            Ok((fsinfo, clock)) => (Some(fsinfo), clock),
            // Listing needs no agent: the guest's own description has to do.
            Err(e) if request.op == Op::List => {
                evesnap::warn!("guest-get-fsinfo failed ({}); identifying the disk by its serial and PCI address", e);
                (None, None)
            }
            Err(e) => {
                let error = evesnap::exit::wrap(e);
                let exit = exit_of(&error);
                let message = self.vm.redactor.text(&chain(
                    &error.context("cannot ask the guest agent which disk that is"),
                ));
                return (fail(refuse(exit.kind(), exit, message)), None);
            }
        };
        let deadline = match deadline_of(request, clock.as_ref()) {
            Ok(deadline) => deadline,
            Err(error) => return (fail(error), None),
        };
        let placed = match self.place_volumes() {
            Ok(placed) => placed,
            Err(error) => return (fail(error), None),
        };
        let identified = match identify(&placed, &request.disk, fsinfo.as_deref()) {
            Ok(identified) => identified,
            Err(error) => return (fail(error), None),
        };
        let labels: Vec<String> = identified
            .datasets
            .iter()
            .filter_map(|d| self.vm.volumes.get(d))
            .map(label)
            .collect();
        let (mut reply, report) = match request.op {
            Op::List => (self.list(request, &identified), None),
            Op::Create => match self.over_budget(&identified) {
                Some(error) => (fail(error), None),
                None => self.run_flow(request, &identified, deadline),
            },
            Op::Rollback => self.run_flow(request, &identified, deadline),
        };
        reply.disks = labels;
        (reply, report)
    }

    /// This VM's volumes placed in the guest, asking QEMU (the guest may have renumbered its
    /// buses since the last request) when the map names disks as QEMU knows them.
    fn place_volumes(&self) -> Result<Placed, ReplyError> {
        let topology = match &self.vm.qmp {
            Some(path) if self.vm.volumes.values().any(GuestDisk::needs_qmp) => Some(
                evesnap::qmp::Qmp::connect(path, self.timeout)
                    .and_then(|mut q| q.topology())
                    .map_err(|e| {
                        let error = evesnap::exit::wrap(e);
                        let exit = exit_of(&error);
                        let message = self.vm.redactor.text(&chain(
                            &error.context("cannot ask QEMU where the guest sees the volumes"),
                        ));
                        refuse(exit.kind(), exit, message)
                    })?,
            ),
            _ => None,
        };
        placement::locate_all(&self.vm.volumes, topology.as_ref()).map_err(|why| {
            refuse(
                "unknown-disk",
                Exit::Preflight,
                self.vm.redactor.text(&format!(
                    "cannot place this VM's volumes in the guest: {why}"
                )),
            )
        })
    }

    fn list(&self, request: &Request, identified: &Identified) -> Reply {
        let mut entries = Vec::new();
        for dataset in &identified.datasets {
            match self.zfs.snapshots(dataset, &[flow::CONSISTENCY_PROPERTY]) {
                Ok(list) => {
                    let disk = self.vm.volumes.get(dataset).map(label).unwrap_or_default();
                    entries.extend(list.into_iter().map(|s| {
                        SnapshotEntry {
                            disk: disk.clone(),
                            name: s.short_name().to_string(),
                            guid: s.guid.clone(),
                            creation: s.creation,
                            consistency: s
                                .properties
                                .get(flow::CONSISTENCY_PROPERTY)
                                .and_then(|c| c.parse().ok()),
                        }
                    }));
                }
                Err(e) => {
                    let error = evesnap::exit::wrap(e);
                    let exit = exit_of(&error);
                    let message = self.vm.redactor.text(&chain(&error));
                    return Reply::failure(
                        Some(request.id.clone()),
                        Some(request.op),
                        refuse(exit.kind(), exit, message),
                    );
                }
            }
        }
        let mut reply = Reply::success(request);
        reply.snapshots = Some(entries);
        reply
    }

    /// The plan for a guest's request: the orchestrator's flow, on the identified volumes.
    fn plan(
        &self,
        request: &Request,
        identified: &Identified,
        deadline: Option<Instant>,
    ) -> Result<Plan, crate::plan::Error> {
        let disks: BTreeMap<String, GuestDisk> = identified
            .datasets
            .iter()
            .filter_map(|d| self.vm.volumes.get_key_value(d))
            .map(|(d, disk)| (d.clone(), disk.clone()))
            .collect();
        let mut plan = Plan {
            version: crate::plan::VERSION,
            id: Some(uuid::Uuid::new_v4()),
            kind: SnapshotType::Immediate,
            config_id: None,
            config_version: None,
            app_name: None,
            action: Action::Create,
            agent: self.vm.agent_text.clone(),
            qmp: self.vm.qmp.as_ref().map(|p| p.display().to_string()),
            datasets: identified.datasets.clone(),
            app: None,
            volumes: Vec::new(),
            volume_root: None,
            retention: None,
            shutdown_clean: false,
            snapshot: None,
            freeze: FreezePlan {
                // Only the disk's own filesystems; none mounted: no freeze at all (an empty
                // list would freeze every filesystem of the guest).
                enabled: !identified.mountpoints.is_empty(),
                mountpoints: identified.mountpoints.clone(),
                timeout_s: self.timeout.as_secs_f64(),
                thaw_after_s: self.thaw_after,
                required: true,
                // As for the controller's plans: the disk's writers feel the freeze too.
                expedite_rcu: true,
                flush_first: true,
                // The guest's choice: a failed freeze fails the request, or gives a
                // snapshot labelled `crash` with the reason.
                on_failure: if request.accept_crash {
                    OnFreezeFailure::Crash
                } else {
                    OnFreezeFailure::Fail
                },
            },
            guest_pre: Vec::new(),
            guest_post: Vec::new(),
            max_snapshots: None,
            origin: evesnap::report::Origin::Guest,
            lock_wait_s: 0.0,
            application_quiesced: false,
            quiesced_until: None,
            rollback: None,
            disks,
        };
        match request.op {
            Op::Create => {
                plan.snapshot = Some(request.name.clone().unwrap_or_else(|| {
                    format!(
                        "guest-{}",
                        evesnap::time::eve_timestamp(time::OffsetDateTime::now_utc())
                    )
                }));
                // The guest's word, for as long as it waits for the reply.
                plan.application_quiesced = request.quiesced;
                plan.quiesced_until = deadline;
            }
            Op::Rollback => {
                plan.action = Action::Rollback;
                plan.rollback = Some(RollbackPlan {
                    to: request.to.clone().unwrap_or_default(),
                    destroy_newer: false,
                    keep_newer: false,
                    vm_stopped: false,
                });
            }
            Op::List => {}
        }
        plan.check()?;
        Ok(plan)
    }

    fn run_flow(
        &mut self,
        request: &Request,
        identified: &Identified,
        deadline: Option<Instant>,
    ) -> (Reply, Option<Report>) {
        let fail =
            |error: ReplyError| Reply::failure(Some(request.id.clone()), Some(request.op), error);
        let plan = match self.plan(request, identified, deadline) {
            Ok(plan) => plan,
            Err(e) => {
                let message = self.vm.redactor.text(&chain_of(&e));
                return (fail(refuse("bad-request", Exit::Usage, message)), None);
            }
        };
        evesnap::note!(
            "request {}: {} on {} (plan {})",
            request.id,
            request.op.as_str(),
            identified.datasets.join(", "),
            plan.id()
        );
        let Finished { report, error } = flow::execute_with(&plan, &self.zfs, &mut self.signals);
        if let Some(error) = &error {
            let exit = exit_of(error);
            let mut reply = fail(ReplyError {
                kind: exit.kind().into(),
                code: exit.code(),
                message: self.vm.redactor.error(error),
                step: report.error.as_ref().map(|e| e.step.clone()),
                problems: zfs::preflight_problems(error)
                    .iter()
                    .map(|p| self.vm.redactor.problem(p))
                    .collect(),
                ..ReplyError::default()
            });
            if let Some(e) = reply.error.as_mut() {
                budget::hide_pool(e);
            }
            reply.consistency = report.consistency;
            return (reply, Some(report));
        }
        let mut reply = Reply::success(request);
        reply.snapshot = Some(report.snapshot.clone());
        match request.op {
            Op::Create => {
                let taken = report.snapshots.as_deref().unwrap_or_default();
                reply.snapshots = Some(
                    taken
                        .iter()
                        .map(|s| SnapshotEntry {
                            disk: self
                                .vm
                                .volumes
                                .get(s.dataset())
                                .map(label)
                                .unwrap_or_default(),
                            name: s.short_name().to_string(),
                            guid: s.guid.clone(),
                            creation: s.creation,
                            consistency: report.consistency,
                        })
                        .collect(),
                );
                reply.consistency = report.consistency;
                reply.freeze_window_ms = report.freeze_window_ms;
                reply.crash_reason = report.crash_reason().map(|r| self.vm.redactor.text(r));
            }
            Op::Rollback => {
                let destroyed = report.destroyed.as_deref().unwrap_or_default();
                reply.destroyed =
                    Some(destroyed.iter().map(|s| self.vm.redactor.text(s)).collect());
            }
            Op::List => {}
        }
        (reply, Some(report))
    }

    /// A `busy` refusal of a create or rollback while a controller run waits for the VM
    /// ([`crate::lock`]): it goes first, and the agent is left to it.
    fn controller_first(&self, op: Op) -> Option<ReplyError> {
        if op == Op::List || !crate::lock::controller_waiting(&self.vm.agent) {
            return None;
        }
        let mut error = refuse(
            Exit::Busy.kind(),
            Exit::Busy,
            "a controller operation on this VM goes first: retry later".into(),
        );
        error.retry_after_s = Some(1);
        Some(error)
    }

    /// The guest budget's refusal of a create on `identified`, if any ([`budget::decide`]).
    fn over_budget(&self, identified: &Identified) -> Option<ReplyError> {
        let volumes: Vec<String> = self.vm.volumes.keys().cloned().collect();
        match budget::facts(&self.zfs, &volumes, &identified.datasets) {
            Ok(facts) => budget::decide(&self.budget, &facts)
                .err()
                .map(|refusal| refusal.to_error()),
            Err(e) => {
                let error = evesnap::exit::wrap(e);
                let exit = exit_of(&error);
                let message = self.vm.redactor.text(&chain(
                    &error.context("cannot check this VM's snapshot budget"),
                ));
                Some(refuse(exit.kind(), exit, message))
            }
        }
    }

    pub(super) fn stop_requested(&mut self) -> bool {
        self.signals.caught().is_some()
    }
}
