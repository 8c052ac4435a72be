//! Holds and rollbacks: a held snapshot against retention and a destroying rollback, a
//! rollback interrupted half way, a rollback keeping the newer snapshots under the running VM;
//! and a `zfs` call of a run (create or rollback) that hangs until SIGTERM.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::fault::trial::{md5_pair, wait_for, DATA, MD5, MOUNTS};
use crate::fault::{HungCall, Sig, Trial};
use crate::zfs::{all_snapshots, zfs, zfs_get};

impl Trial<'_> {
    pub(in crate::fault) fn held(&mut self) {
        let older = format!("{}-a", self.name);
        let newer = format!("{}-b", self.name);
        if !self.take_clean(&older) {
            return;
        }
        let held = format!("{}@{older}", self.lab.datasets[0]);
        if !zfs(&["hold", "evesnap-fault", &held]).status.success() {
            // zfs-fuse has `hold` but no `holds`; userrefs tells.
            self.note("zfs hold failed");
        }
        // Retention may not destroy the held snapshot.
        self.names.push(newer.clone());
        let plan = self.plan(&newer, json!({"max_snapshots": 1}));
        let child = self.spawn_orchestrator(&plan);
        let (_, report, _) = self.finish_checked(child);
        self.check(
            zfs_get("name", &held) == held,
            "retention destroyed a held snapshot",
        );
        self.check_claims(report.as_ref());
        let new_data = self.sh(DATA).map(|o| md5_pair(&o)).unwrap_or_default();
        // Rolling back to the older one would destroy the newer: hold the newer.
        let newer_full = format!("{}@{newer}", self.lab.datasets[0]);
        let _ = zfs(&["hold", "evesnap-fault", &newer_full]);
        let plan = self.rollback_plan(&older, true);
        let child = self.spawn_orchestrator(&plan);
        let (code, _, _) = self.finish_checked(child);
        self.check(
            code == 7,
            format!("a rollback over a held newer snapshot exits {code}, not 7"),
        );
        self.check(
            zfs_get("name", &newer_full) == newer_full,
            "the held newer snapshot was destroyed",
        );
        let now = self.sh(MD5).map(|o| md5_pair(&o)).unwrap_or_default();
        self.check(now == new_data, "a refused rollback changed the data");
        let _ = zfs(&["release", "evesnap-fault", &newer_full]);
        let _ = zfs(&["release", "evesnap-fault", &held]);
        self.check_thawed_at_once();
        self.check_rollback(&older);
    }

    pub(in crate::fault) fn rollback(&mut self, signal: Option<Sig>) {
        let target = format!("{}-r", self.name);
        if !self.take_clean(&target) {
            return;
        }
        let before = self.data.clone();
        let after = match self.sh(DATA) {
            Ok(o) => md5_pair(&o),
            Err(e) => return self.fail(e),
        };
        self.shim.set("rollback.before", "1");
        let plan = self.rollback_plan(&target, true);
        let child = self.spawn_orchestrator(&plan);
        let pid = child.id();
        if let Some(signal) = signal {
            if wait_for(
                &self.shim.marker("rollback-started"),
                Duration::from_secs(60),
            )
            .is_none()
            {
                self.fail("the rollback never started");
            }
            std::thread::sleep(Duration::from_millis(300));
            self.kill(pid, signal);
        }
        let (code, _, stderr) = self.finish_checked(child);
        self.shim.wait_idle(Duration::from_secs(30));
        if signal.is_none() {
            self.check(
                code == 0,
                format!("the rollback exits {code}: {}", stderr.trim()),
            );
        }
        if signal == Some(Sig::Term) && code == 0 {
            self.note("SIGTERM during the rollback: it completed");
        }
        self.check_resumed(code);
        // Whatever the kill left: mounted again, each volume old or new, never a mix.
        if let Err(e) = self.sh(MOUNTS) {
            self.fail(format!("cannot remount: {e}"));
            return;
        }
        match self.sh(MD5) {
            Ok(o) => {
                let now = md5_pair(&o);
                self.check(now.len() == before.len(), format!("files missing: {now:?}"));
                for (i, md5) in now.iter().enumerate() {
                    let fine = before.get(i) == Some(md5) || after.get(i) == Some(md5);
                    self.check(fine, format!("volume {i} holds neither version: data lost"));
                }
                if signal.is_none() {
                    self.check(
                        now == before,
                        "the rollback did not restore the snapshot's data",
                    );
                }
            }
            Err(e) => self.fail(e),
        }
        self.check_thawed_at_once();
        // A second rollback finishes the job.
        let _ = std::fs::remove_file(self.shim.marker("rollback.before"));
        self.data = before;
        let plan = self.rollback_plan(&target, true);
        let child = self.spawn_orchestrator(&plan);
        let (code, _, stderr) = self.finish_checked(child);
        self.out.exits.pop();
        self.check(
            code == 0,
            format!("the second rollback exits {code}: {}", stderr.trim()),
        );
        match self.sh(MD5) {
            Ok(o) => {
                let now = md5_pair(&o);
                self.check(
                    now == self.data,
                    "after a second rollback the data is not the snapshot's",
                );
            }
            Err(e) => self.fail(e),
        }
    }

    /// A `zfs` call that never returns, then SIGTERM: the preflight's `zfs get`, `zfs
    /// snapshot` with the guest frozen, retention's `zfs destroy` or `zfs rollback`. The run
    /// ends within seconds (not at the call's deadline) and non-zero, the hung call goes
    /// with it, the guest is thawed and resumed, nothing is left behind, and the VM lock is
    /// free (the same run again succeeds).
    pub(in crate::fault) fn zfs_hangs_term(&mut self, call: HungCall) {
        let first = format!("{}-h", self.name);
        if matches!(call, HungCall::Destroy | HungCall::Rollback) && !self.take_clean(&first) {
            return;
        }
        // How long the run may take to end after the signal: a call is cancelled at once
        // (its process group killed); then the thaw and guest_post (create) or the remount
        // (rollback) in a slow TCG guest; `zfs snapshot` first gets SIGNAL_GRACE (2 s).
        let (config, marker, within) = match call {
            HungCall::Preflight => ("get.before", "get-started", 5),
            HungCall::Snapshot => ("snapshot.before", "snapshot-started", 8),
            HungCall::Destroy => ("destroy.before", "destroy-started", 10),
            HungCall::Rollback => ("rollback.before", "rollback-started", 10),
        };
        let plan = match call {
            HungCall::Rollback => self.rollback_plan(&first, true),
            HungCall::Destroy => {
                // Retention's destroy of the first snapshot, not the recursive snapshot's
                // own cleanup, which follows the window on a view a signal does not cancel.
                self.shim.set("destroy.match", &format!("@{first}"));
                let second = format!("{}-s", self.name);
                self.names.push(second.clone());
                self.plan(&second, json!({"max_snapshots": 1}))
            }
            HungCall::Preflight => self.plan(&self.name.clone(), json!({})),
            // Agent timeout and watchdog deadline far beyond the bound, which caps the
            // snapshot's wait otherwise: only the signal can end the run in time.
            HungCall::Snapshot => self.plan(
                &self.name.clone(),
                json!({"freeze": {"timeout_s": 30, "thaw_after_s": 60}}),
            ),
        };
        self.shim.set(config, "100000");
        let child = self.spawn_orchestrator(&plan);
        let pid = child.id();
        if wait_for(&self.shim.marker(marker), Duration::from_secs(60)).is_none() {
            self.fail(format!("no `{marker}` within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(300));
        self.kill(pid, Sig::Term);
        let signalled = Instant::now();
        let (code, _, stderr) = self.finish_checked(child);
        let took = signalled.elapsed();
        let _ = std::fs::remove_file(self.shim.marker(config));
        self.note(format!("ended {:.1} s after SIGTERM", took.as_secs_f64()));
        self.check(
            took < Duration::from_secs(within),
            format!(
                "ended {:.1} s after SIGTERM, not within {within} s",
                took.as_secs_f64()
            ),
        );
        self.check(
            code > 0,
            format!("a run cut short by SIGTERM exits {code}: {}", stderr.trim()),
        );
        self.check_thawed_at_once();
        self.check_resumed(code);
        // The hung call was killed with the run: no `zfs` of it runs on.
        self.check(
            self.shim.wait_idle(Duration::from_secs(2)),
            "the hung zfs call outlived the run",
        );
        if matches!(call, HungCall::Preflight | HungCall::Snapshot) {
            let left = self.snapshots();
            self.check(left.is_empty(), format!("left behind: {left:?}"));
            self.check_no_watchdogs();
        }
        // The lock is free and the pool usable: the same run again succeeds.
        if call == HungCall::Rollback {
            if let Err(e) = self.sh(MOUNTS) {
                return self.fail(format!("cannot remount: {e}"));
            }
        }
        let plan = if call == HungCall::Destroy {
            let third = format!("{}-t", self.name);
            self.names.push(third.clone());
            self.plan(&third, json!({"max_snapshots": 1}))
        } else {
            plan
        };
        let child = self.spawn_orchestrator(&plan);
        let (code, _, stderr) = self.finish_checked(child);
        self.out.exits.pop();
        self.check(
            code == 0,
            format!("the run after the SIGTERM exits {code}: {}", stderr.trim()),
        );
    }

    /// `keep_newer` under the running VM: QEMU holds the volumes' images open in the
    /// datasets, so the switch cannot unmount them and is undone (with `clone_fails`, it
    /// fails earlier, at `zfs clone`). Invariants: exit 1 naming the undone step; every
    /// snapshot still there; no `.evesnap-new-`/`.evesnap-kept-` dataset left; the data as
    /// it was (not rolled back, not lost); the guest resumed and its volumes mounted again.
    pub(in crate::fault) fn keep_newer(&mut self, clone_fails: bool) {
        let target = format!("{}-k", self.name);
        if !self.take_clean(&target) {
            return;
        }
        let after = match self.sh(DATA) {
            Ok(o) => md5_pair(&o),
            Err(e) => return self.fail(e),
        };
        let parent = self.lab.datasets[0]
            .rsplit_once('/')
            .map_or(String::new(), |(p, _)| p.to_string());
        let snapshots_before = all_snapshots(&parent);
        if clone_fails {
            self.shim
                .set("clone.fail", "cannot create 'x': out of space\n");
        }
        let mut plan = self.rollback_plan(&target, false);
        plan["rollback"]["keep_newer"] = json!(true);
        let child = self.spawn_orchestrator(&plan);
        let (code, report, stderr) = self.finish_checked(child);
        let _ = std::fs::remove_file(self.shim.marker("clone.fail"));
        self.check(
            code == 1,
            format!(
                "keep_newer under a running VM exits {code}: {}",
                stderr.trim()
            ),
        );
        let error = report
            .as_ref()
            .and_then(|r| r["error"]["description"].as_str().map(str::to_string))
            .unwrap_or_default();
        let step = if clone_fails {
            "zfs clone"
        } else {
            "zfs unmount"
        };
        self.check(
            error.contains(&format!("failed at `{step}")) && error.contains("was undone"),
            format!("the error does not say `{step}` failed and was undone: {error}"),
        );
        self.check(
            all_snapshots(&parent) == snapshots_before,
            "the snapshots changed",
        );
        let leftovers: Vec<String> = crate::zfs::zfs(&["list", "-H", "-o", "name", "-r", &parent])
            .stdout
            .split(|b| *b == b'\n')
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .filter(|n| n.contains(".evesnap-new-") || n.contains(".evesnap-kept-"))
            .collect();
        self.check(leftovers.is_empty(), format!("left behind: {leftovers:?}"));
        self.check_resumed(code);
        match self.sh(MD5) {
            Ok(o) => self.check(
                md5_pair(&o) == after,
                "an undone keep_newer changed the data",
            ),
            Err(e) => self.fail(format!("volumes not back: {e}")),
        }
        self.check_thawed_at_once();
    }
}
