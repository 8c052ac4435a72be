//! `freeze.on_failure: "crash"`: a freeze that failed (refused, timed out, froze fewer
//! filesystems than asked, did not verify) after which the guest was thawed and verified
//! thawed is not the end of the run: the snapshot is taken anyway, unfrozen, and labelled
//! for what it is (`consistency: crash`, `frozen=false`, `crash_reason`), with a warning in
//! the report. A guest that may still be frozen fails the run whatever the plan says.

use evesnap::exit::chain;
use evesnap::qga::Client;
use evesnap::report::WarningKind;

use super::{Run, StepError};
use crate::plan::OnFreezeFailure;
use crate::plan::RetentionOrder;
use evesnap::report::Consistency;

impl Run<'_> {
    /// Whether a failed freeze falls back to a crash-consistent snapshot: the plan allows
    /// it and the guest was verified thawed after the failure.
    pub(super) fn falls_back(&self, verified_thawed: bool) -> bool {
        self.plan.freeze.on_failure == OnFreezeFailure::Crash && verified_thawed
    }

    /// After the failed freeze `why` (the guest verified thawed): the snapshot unfrozen and
    /// labelled `crash` with the reason, then `guest_post` (the application stayed
    /// quiesced for the snapshot), then retention.
    pub(super) fn crash_fallback(
        &mut self,
        client: &mut Client,
        prepared: &mut zsnap::PreparedSnapshot<'_>,
        why: &anyhow::Error,
    ) -> Result<(), StepError> {
        let reason = chain(why);
        evesnap::warn!(
            "the freeze failed and the guest was thawed again; taking the snapshot unfrozen, labelled \
             crash-consistent, as the plan allows (freeze.on_failure: crash): {reason}"
        );
        self.report
            .fall_back(WarningKind::CrashFallback, "freeze", reason.clone());
        // Nothing was frozen for this snapshot.
        self.report.freeze_window_ms = None;
        let taken = self.snapshot_unfrozen(prepared, Consistency::Crash, Some(&reason));
        let post = self.run_post(client);
        taken?;
        post?;
        self.check_signal("retention")?;
        self.retention(RetentionOrder::AfterCreate)
    }
}
