//! The orchestrator's flow, branch by branch, in seconds and without root or the lab: a
//! fake `zfs` (`tests/support/fake-zfs.py`) and the simulated agent
//! (`evesnap::qga::testing`). The lab tests (`lab.rs`) run the same flow for real.
//!
//! Each branch of `src/flow/create.rs` and `src/flow/rollback.rs` (with what they call in
//! `byid.rs` and `halted.rs`), in the order the code takes them, and its test(s); `-` says
//! why a branch has none.
//!
//! create
//! - the set with the plan's id exists whole: by_id::the_same_create_twice_reports_the_first_set_and_takes_nothing
//! - … on some volumes: by_id::a_set_on_only_some_volumes_is_removed_and_taken_again_whole
//! - … with a held member: by_id::a_half_set_with_a_held_member_is_refused_and_left_alone
//! - … that cannot be removed: by_id::a_half_set_that_cannot_be_removed_fails_before_the_guest_is_touched
//! - the snapshot list fails: by_id::a_snapshot_list_that_fails_stops_create_and_rollback_by_id_at_once
//! - QMP answers badly (`vm_state`): halted::a_qmp_that_answers_badly_fails_the_preflight_and_touches_nothing
//! - halted, its volumes held: halted::a_halted_vm_whose_volume_a_process_holds_open_is_refused
//! - halted: halted::a_vm_without_qemu_is_snapshotted_as_halted_without_the_agent,
//!   halted::a_guest_that_powered_itself_off_is_halted_clean_and_a_running_one_is_not_halted
//! - no cancel token for the window: - (only with no file descriptor left)
//! - agent unreachable, required: create_refused::without_an_agent_a_required_freeze_fails_the_run_unreachable
//! - agent unreachable, not required: create::without_an_agent_the_plan_may_allow_a_crash_consistent_snapshot
//! - agent check fails: create_refused::an_agent_without_the_freeze_command_is_refused_before_anything_changes
//! - guest frozen already: create_refused::a_guest_frozen_already_is_refused_and_left_as_it_is
//! - retention before the create: app_retention::max_snapshots_per_app_makes_room_before_the_create
//! - … fails: create_failed::retention_failing_before_the_create_takes_nothing_and_keeps_the_old_set
//! - zfs preflight refuses: create_refused::a_missing_dataset_is_refused_before_the_guest_is_touched,
//!   create_refused::no_room_for_the_snapshot_is_refused_before_the_guest_is_touched
//! - signal before guest_pre: - (no I/O between the check and the preflight's last zfs call,
//!   which a signal cancels: signal::sigterm_during_a_hung_preflight_read_ends_the_run)
//! - no agent, unfrozen snapshot: create::without_an_agent_the_plan_may_allow_a_crash_consistent_snapshot
//! - … fails: create_failed::a_failed_snapshot_without_an_agent_fails_the_run_and_takes_nothing
//! - guest_pre fatal failure: create_failed::a_fatal_guest_pre_failure_undoes_what_ran_and_never_freezes
//! - guest_pre non-fatal failure: create::a_non_fatal_guest_pre_failure_makes_it_filesystem_consistent_only
//! - a claim refused: - (fixed keys and values, valid by construction)
//! - flush: create::the_flush_runs_before_the_freeze_on_the_plans_mountpoints_and_is_recorded
//! - … fails: create::a_guest_without_sync_is_frozen_anyway_and_the_report_says_why_it_was_not_flushed
//! - expedited RCU: create::expedited_rcu_is_set_before_the_freeze_and_restored_after_the_thaw
//! - … fails: create::without_a_shell_in_the_guest_the_freeze_goes_on_without_expedited_rcu
//! - signal before the freeze: signal::sigterm_while_guest_pre_runs_stops_before_the_freeze_and_guest_post_runs
//! - freeze fails: create_failed::a_freeze_the_agent_refuses_takes_no_snapshot_and_guest_post_runs
//! - … falls back to crash: crash_fallback::* (one test per cause)
//! - freeze does not verify: create_failed::a_freeze_that_does_not_verify_destroys_the_snapshot_taken_meanwhile
//! - … falls back to crash: crash_fallback::a_freeze_that_does_not_verify_is_replaced_by_a_crash_snapshot
//! - past the requester's deadline: serve::a_request_past_its_deadline_is_refused_and_one_that_outlives_it_claims_no_application
//! - early thaw: create_failed::a_hung_zfs_snapshot_is_thawed_at_the_timeout_then_cut_short,
//!   signal::sigterm_during_a_hung_snapshot_thaws_and_ends_the_run
//! - zfs snapshot fails: create_failed::a_failed_zfs_snapshot_is_thawed_and_guest_post_runs
//! - claims not recorded: create_failed::claims_that_cannot_be_recorded_leave_a_snapshot_claiming_nothing
//! - thaw fails: create_failed::a_refused_thaw_is_eve_apis_worst_severity_and_the_snapshot_stays
//! - … with expedited RCU set: create_failed::a_refused_thaw_leaves_expedited_rcu_to_the_guests_own_restore
//! - … the agent silent, guest_post pending: pending::a_silent_thaw_leaves_guest_post_pending_and_recover_runs_it_once
//! - guest_post fails: create_failed::a_failing_guest_post_fails_the_run_but_keeps_the_snapshot
//! - signal before retention: signal::sigterm_while_guest_post_runs_skips_retention_and_keeps_the_snapshot
//! - retention after the create: create::retention_destroys_the_oldest_sets_but_never_a_held_or_foreign_one
//! - … a destroy fails: create_failed::a_destroy_retention_cannot_do_is_reported_and_the_run_succeeds
//! - … fails: create_failed::retention_failing_after_the_create_fails_the_run_but_keeps_the_snapshot
//! - … signal during it: signal::sigterm_during_a_hung_retention_ends_the_run
//! - success: create::guest_pre_freeze_one_atomic_snapshot_thaw_guest_post_is_application_consistent
//!
//! rollback
//! - no `rollback` in the plan: - (`Plan::from_json` refuses such a plan)
//! - `to` an id: by_id::rollback_by_id_goes_to_the_set_with_that_id
//! - … naming snapshots of different names: by_id::an_id_on_snapshots_of_different_names_is_refused_not_guessed
//! - … the snapshot list fails: by_id::a_snapshot_list_that_fails_stops_create_and_rollback_by_id_at_once
//! - zrollback's plan refuses: rollback::newer_snapshots_are_refused_without_destroy_newer,
//!   rollback::a_rollback_refused_for_newer_guest_snapshots_says_they_are_the_guests, keep_newer::*
//! - already there: by_id::a_rollback_to_where_the_volumes_already_are_touches_nothing
//! - QMP answers badly (`vm_state`): halted::a_qmp_that_answers_badly_fails_the_preflight_and_touches_nothing
//! - stopped, its volumes held: halted::a_halted_vm_whose_volume_a_process_holds_open_is_refused
//! - stopped (the plan says): rollback::a_vm_the_plan_says_is_stopped_is_rolled_back_without_the_agent
//! - stopped (QMP says): halted::a_vm_without_qemu_is_rolled_back_without_the_agent_when_nothing_holds_it
//! - running, agent unreachable: rollback_failed::a_running_vm_whose_agent_is_unreachable_is_refused_untouched
//! - volumes not placed: rollback::a_running_vm_without_disks_in_the_plan_is_bad_input,
//!   rollback::a_disk_qemu_does_not_have_or_the_wrong_one_is_refused_before_the_guest_is_touched
//! - `disks.*.dev` resolved: rollback::a_zvol_is_told_apart_by_its_device_resolved_in_the_guest
//! - … does not resolve: rollback_failed::a_dev_that_does_not_resolve_in_the_guest_is_refused_before_guest_pre
//! - signal before guest_pre: signal::sigterm_while_the_agent_is_asked_in_the_rollback_preflight_touches_nothing
//! - guest_pre fatal failure: rollback_failed::a_fatal_guest_pre_failure_is_undone_and_nothing_is_rolled_back
//! - guest-get-fsinfo fails: rollback_failed::a_failing_guest_get_fsinfo_rolls_nothing_back_and_guest_post_runs
//! - still mounted: rollback::a_volume_still_mounted_after_guest_pre_is_refused_and_guest_post_runs,
//!   rollback::disks_named_as_qemu_knows_them_are_placed_through_qmp, rollback::a_scsi_disk_is_placed_by_its_hba_and_address
//! - signal before the rollback: signal::sigterm_before_the_rollback_step_rolls_nothing_back_and_guest_post_runs
//! - zfs rollback fails: rollback_failed::a_failed_zfs_rollback_still_brings_the_guest_back
//! - … signal during it: signal::sigterm_during_a_hung_rollback_ends_the_run,
//!   signal::sigterm_during_a_hung_keep_newer_promote_undoes_the_switch
//! - guest_post fails after it: rollback_failed::a_failing_guest_post_after_the_rollback_fails_the_run_but_the_rollback_stands
//! - success: rollback::a_running_vm_is_rolled_back_once_guest_pre_unmounted_the_volume

mod support;

mod app_retention;
mod by_id;
mod crash_fallback;
mod create;
mod create_failed;
mod create_refused;
mod eve_api;
mod group;
mod halted;
mod keep_newer;
mod pending;
mod qmp;
mod rollback;
mod rollback_failed;
mod serve;
mod signal;
