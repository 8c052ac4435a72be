//! `zfs` and the pool fail: a snapshot that fails, hangs, outlasts the watchdog or is
//! slow, the pool full at the snapshot, no room at the preflight.

use std::time::Duration;

use serde_json::json;

use crate::fault::{Trial, THAW_AFTER};

impl Trial<'_> {
    pub(in crate::fault) fn zfs_fails(&mut self, out_of_space: bool) {
        let name = format!("{}/lab/vm0/disk0@{}", self.lab.pool, self.name);
        self.shim.set(
            "snapshot.fail",
            &if out_of_space {
                format!("cannot create snapshot '{name}': out of space\n")
            } else {
                format!("cannot create snapshot '{name}': I/O error\n")
            },
        );
        let child = self.start(json!({}));
        let (code, report, _) = self.finish_checked(child);
        self.check(
            code == 1,
            format!("a failing zfs snapshot exits {code}, not 1"),
        );
        if let Some(r) = &report {
            self.check(
                r["error"]["step"] == "snapshot",
                format!("error.step {} instead of snapshot", r["error"]["step"]),
            );
            if out_of_space {
                let d = r["error"]["description"].as_str().unwrap_or("");
                self.check(d.contains("out of space"), format!("description: {d}"));
            }
        }
        self.check_thawed_at_once();
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        let left = self.snapshots();
        self.check(left.is_empty(), format!("left behind: {left:?}"));
    }

    pub(in crate::fault) fn zfs_slow(&mut self, delay: Duration, timeout_s: f64, verify: bool) {
        self.shim
            .set("snapshot.before", &format!("{:.3}", delay.as_secs_f64()));
        let freeze = json!({"timeout_s": timeout_s, "thaw_after_s": THAW_AFTER.as_secs_f64()});
        let child = self.start(json!({ "freeze": freeze }));
        let seen = self.shim.snapshot_started();
        let (code, report, _) = self.finish_checked(child);
        let reference = seen.unwrap_or(self.started);
        self.check_thawed_by_deadline(reference);
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        if delay + Duration::from_secs(1) < THAW_AFTER {
            self.check(
                code == 0,
                format!("a slow zfs within the deadline exits {code}"),
            );
            if let Some(r) = &report {
                self.check(
                    r["consistency"] == "application",
                    format!("consistency {}", r["consistency"]),
                );
            }
        } else if delay > THAW_AFTER + Duration::from_secs(1) {
            self.check(
                code != 0,
                "the watchdog thawed during the snapshot, yet exit 0",
            );
        }
        if verify && code == 0 {
            let name = self.name.clone();
            self.check_rollback(&name);
        }
    }

    pub(in crate::fault) fn no_room(&mut self) {
        self.shim.set("noroom", "");
        let child = self.start(json!({}));
        let (code, report, _) = self.finish_checked(child);
        self.check(code == 7, format!("no room exits {code}, not 7"));
        if let Some(r) = &report {
            let froze = r["steps"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["tool"] == "qga-freeze" || s["tool"] == "guest_pre")
            });
            self.check(
                !froze,
                "the guest was touched although the preflight failed",
            );
        }
        self.check_thawed_at_once();
        self.check_resumed(code);
        let left = self.snapshots();
        self.check(left.is_empty(), format!("left behind: {left:?}"));
    }
}
