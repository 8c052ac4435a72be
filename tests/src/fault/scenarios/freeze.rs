//! The freeze itself fails: `/data0` is frozen behind qemu-ga's back, which then skips it
//! (EBUSY, which it takes for a bind mount), so the plan's freeze of both volumes comes up
//! one short. `freeze.on_failure` decides: `fail` takes nothing, `crash` takes a snapshot
//! labelled `crash` with the reason. Either way the guest is thawed at once, `/data0`
//! included, and `guest_post` runs.

use serde_json::json;

use crate::fault::{Trial, THAW_AFTER};

impl Trial<'_> {
    pub(in crate::fault) fn freeze_fails(&mut self, crash: bool) {
        if let Err(e) = self.sh("sync; fsfreeze --freeze /data0") {
            self.fail(format!("cannot freeze /data0 in the guest: {e}"));
            return;
        }
        let freeze = json!({
            "timeout_s": 4,
            "thaw_after_s": THAW_AFTER.as_secs_f64(),
            "mountpoints": ["/data0", "/data1"],
            "on_failure": if crash { "crash" } else { "fail" },
        });
        let child = self.start(json!({ "freeze": freeze }));
        let (code, report, _) = self.finish_checked(child);
        self.check_thawed_at_once();
        // qemu-ga's thaw after the failed freeze thaws what it did not freeze too.
        match self.sh("fsfreeze --unfreeze /data0 2>/dev/null && echo frozen || echo thawed") {
            Ok(state) => self.check(
                state.trim() == "thawed",
                "/data0 stayed frozen after the run",
            ),
            Err(e) => self.fail(format!("cannot ask whether /data0 is frozen: {e}")),
        }
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        let taken = self.snapshots();
        let step = report.as_ref().map(|r| &r["error"]["step"]);
        if crash {
            self.check(code == 0, format!("on_failure crash: exit {code}, not 0"));
            self.check(
                taken.len() == 2,
                format!("on_failure crash: snapshots {taken:?}"),
            );
            if let Some(r) = &report {
                self.check(
                    r["consistency"] == "crash",
                    format!("consistency {} after a failed freeze", r["consistency"]),
                );
                self.check(
                    r["warnings"][0]["kind"] == "crash-fallback",
                    format!("no crash-fallback warning: {}", r["warnings"]),
                );
            }
        } else {
            self.check(code == 1, format!("a failed freeze exits {code}, not 1"));
            self.check(taken.is_empty(), format!("left behind: {taken:?}"));
            self.check(
                step.is_some_and(|s| s == "freeze"),
                format!("error.step {step:?} instead of freeze"),
            );
        }
    }
}
