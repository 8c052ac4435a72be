//! Fault injection on the lab (see `evesnap_tests::fault` for what each trial checks).
//!
//! The quick subset below runs with every `cargo test` (one trial per fault family, about
//! two minutes); `soak` draws random faults and timings, many trials in a row: it runs only
//! when asked (`scripts/soak`, which sets `EVESNAP_SOAK_TRIALS`, `EVESNAP_SOAK_SECONDS`,
//! `EVESNAP_SOAK_SEED`, `EVESNAP_SOAK_SUMMARY`).

use std::time::{Duration, Instant};

use evesnap_tests::fault::{trial, Fault, HungCall, Outcome, Phase, Rng, Sig, Tool};
use evesnap_tests::lab::{test_lab, test_lab_vsock, vm_lock, Lab};

fn run(fault: Fault, verify_rollback: bool) {
    run_on(test_lab(), fault, verify_rollback);
}

fn run_on(lab: &Lab, fault: Fault, verify_rollback: bool) {
    let _vm = vm_lock();
    let outcome = trial(lab, 0, &fault, verify_rollback);
    eprintln!("{}\n{}", Outcome::header(), outcome.row());
    assert!(outcome.passed(), "{fault}: {:?}", outcome.failures);
}

#[test]
fn orchestrator_sigkill_while_frozen_is_thawed_by_the_watchdog() {
    run(
        Fault::Orchestrator {
            signal: Sig::Kill,
            phase: Phase::Frozen,
            jitter: Duration::from_millis(100),
        },
        false,
    );
}

/// Regression: a SIGTERM skipped `guest_post`, so the application stayed quiesced.
#[test]
fn orchestrator_sigterm_with_the_snapshot_taken_thaws_and_reports() {
    run(
        Fault::Orchestrator {
            signal: Sig::Term,
            phase: Phase::Snapshot,
            jitter: Duration::from_millis(50),
        },
        false,
    );
}

/// Regression: as above, after an interrupted `guest_pre`.
#[test]
fn orchestrator_sigterm_before_the_freeze_never_freezes() {
    run(
        Fault::Orchestrator {
            signal: Sig::Term,
            phase: Phase::BeforeFreeze,
            jitter: Duration::ZERO,
        },
        false,
    );
}

#[test]
fn pipeline_zsnap_killed_while_frozen_is_thawed_by_the_watchdog() {
    run(
        Fault::Pipeline {
            tool: Tool::Zsnap,
            signal: Sig::Kill,
            jitter: Duration::from_millis(100),
        },
        false,
    );
}

/// Regression: in `qga-freeze | zsnap | qga-thaw`, a snapshot that returned after the
/// watchdog had thawed still said `org.lfedge.evesnap:frozen=true` (its ext4 needs
/// recovery); zsnap now drops the claim past the document's watchdog deadline.
#[test]
fn pipeline_zfs_outlasting_the_watchdog_claims_no_freeze() {
    run(Fault::PipelineOutlastsWatchdog, false);
}

/// Issue 14: as `tests/tests/pipeline.rs`, inside the trial's checks (nothing left behind).
#[test]
fn pipeline_with_a_mistyped_middle_step_thaws_at_once_and_leaves_nothing() {
    run(Fault::PipelineTypo, false);
}

/// qga-thaw killed while it waits for zsnap: the guest is thawed within seconds of the
/// snapshot's end, not at the watchdog's deadline.
#[test]
fn pipeline_qga_thaw_killed_while_it_waits_is_thawed_at_once() {
    run(
        Fault::Pipeline {
            tool: Tool::Thaw,
            signal: Sig::Kill,
            jitter: Duration::from_millis(100),
        },
        false,
    );
}

#[test]
fn qemu_ga_killed_while_frozen() {
    run(
        Fault::AgentKilled {
            signal: Sig::Kill,
            after: Duration::from_millis(300),
        },
        false,
    );
}

/// Issue 14: a run that lost its agent after `guest_pre` left the application quiesced
/// (guest_post never ran). Now the report says `guest_post: "pending"` and the watchdog,
/// once the agent is back, thaws and runs it, once. Away 25 s, past the run's own thaw
/// (which gives up within 22 s): the run must end with exit 3, 4 or 6, never 0.
#[test]
fn qemu_ga_kept_away_after_the_freeze_leaves_guest_post_pending_then_run_once() {
    run(
        Fault::AgentAway {
            away: Duration::from_secs(25),
        },
        false,
    );
}

/// Issue 14: the watchdog gave up 600 s after its deadline, so a VM paused longer stayed
/// frozen once resumed. Its give-up limit is shortened here (EVESNAP_WATCHDOG_RETRY_WINDOW_S,
/// 2 s in the trials): it keeps retrying a VM that exists and thaws after `cont`.
#[test]
fn vm_paused_past_the_watchdog_retry_limit_is_thawed_after_cont() {
    run(
        Fault::VmPaused {
            paused: Duration::from_secs(15),
        },
        false,
    );
}

#[test]
fn vm_paused_past_the_deadline_while_frozen() {
    run(
        Fault::VmPaused {
            paused: Duration::from_secs(7),
        },
        false,
    );
}

#[test]
fn zfs_hanging_past_the_timeout_is_thawed_and_its_snapshot_destroyed() {
    run(Fault::ZfsHangs, false);
}

/// Regression: with `freeze.timeout_s` above `thaw_after_s`, a `zfs snapshot` that ran past
/// `thaw_after_s` kept the guest frozen beyond it: the orchestrator holds the agent's only
/// connection, so the watchdog could not get through. The snapshot wait is now capped at
/// `thaw_after_s`, and what returns later is destroyed.
#[test]
fn zfs_outlasting_the_watchdog_deadline_is_thawed_at_the_deadline() {
    run(Fault::ZfsOutlastsWatchdog, false);
}

/// qemu-ga ignores SIGTERM while frozen (it would exit only thawed): nothing changes, the
/// snapshot is consistent and the trial checks the agent still serves.
#[test]
fn qemu_ga_terminated_while_frozen_is_ignored() {
    run(
        Fault::AgentKilled {
            signal: Sig::Term,
            after: Duration::from_millis(300),
        },
        false,
    );
}

#[test]
fn zfs_failing_leaves_nothing_and_a_thawed_guest() {
    run(Fault::ZfsFails, false);
}

#[test]
fn no_room_touches_nothing() {
    run(Fault::NoRoom, false);
}

#[test]
fn garbage_on_the_agent_channel_then_a_consistent_snapshot_that_rolls_back() {
    run(Fault::Garbage { seed: 0x5eed }, true);
}

#[test]
fn a_held_snapshot_survives_retention_and_blocks_a_destroying_rollback() {
    run(Fault::Held, false);
}

#[test]
fn a_rollback_killed_half_way_loses_nothing_and_a_second_one_completes() {
    run(
        Fault::Rollback {
            signal: Some(Sig::Kill),
        },
        false,
    );
}

/// Regression: a SIGTERM skipped `guest_post`, leaving the application quiesced (create)
/// or the volumes unmounted in the guest (rollback).
#[test]
fn a_rollback_terminated_half_way_still_remounts_the_volumes() {
    run(
        Fault::Rollback {
            signal: Some(Sig::Term),
        },
        false,
    );
}

/// The running QEMU holds the volumes open: the switch is undone at `zfs unmount`.
#[test]
fn a_keep_newer_rollback_under_the_running_vm_is_undone_and_loses_nothing() {
    run(Fault::KeepNewer { clone_fails: false }, false);
}

#[test]
fn a_keep_newer_rollback_whose_clone_fails_is_undone_and_loses_nothing() {
    run(Fault::KeepNewer { clone_fails: true }, false);
}

#[test]
fn a_hung_zfs_get_in_the_preflight_ends_on_sigterm_within_seconds() {
    run(
        Fault::ZfsHangsTerm {
            call: HungCall::Preflight,
        },
        false,
    );
}

#[test]
fn a_hung_zfs_snapshot_while_frozen_ends_on_sigterm_within_seconds_thawed() {
    run(
        Fault::ZfsHangsTerm {
            call: HungCall::Snapshot,
        },
        false,
    );
}

#[test]
fn a_hung_zfs_destroy_in_retention_ends_on_sigterm_within_seconds() {
    run(
        Fault::ZfsHangsTerm {
            call: HungCall::Destroy,
        },
        false,
    );
}

#[test]
fn a_hung_zfs_rollback_ends_on_sigterm_within_seconds_and_remounts() {
    run(
        Fault::ZfsHangsTerm {
            call: HungCall::Rollback,
        },
        false,
    );
}

/// Issue 17: a freeze that comes up short fails the run and takes nothing by default ...
#[test]
fn a_freeze_that_comes_up_short_takes_nothing_by_default() {
    run(Fault::FreezeFails { crash: false }, false);
}

/// ... and with `freeze.on_failure: crash` gives a snapshot labelled `crash` with the
/// reason, the guest thawed first.
#[test]
fn a_freeze_that_comes_up_short_gives_a_labelled_crash_snapshot_when_allowed() {
    run(Fault::FreezeFails { crash: true }, false);
}

/// Over vsock (the guest's second agent through the hybrid vsock device), the faults whose
/// handling depends on the transport: the watchdog reconnecting (a new `CONNECT`) after the
/// orchestrator's death, the pipeline's kept connection handed between processes, and
/// qemu-ga killed under a vsock connection (the guest resets it: the device closes the
/// stream, and `CONNECT` is refused until init respawns it). The other families exercise
/// zfs, rollback and the flow, which do not see the transport. Not here: the VM paused
/// while frozen. vhost-device-vsock 0.3.0 never answers a `CONNECT` sent while the VM is
/// paused, and no later one either, even after `cont` (docs/lab.md#hybrid-vsock): the lab's
/// device, not the tools, cannot survive it; the tools' side of it (a `CONNECT` never
/// answered times out, a refusal while the device is there keeps the watchdog trying) is
/// covered by the scripted device in `shared/src/qga/client_tests.rs`.
mod over_vsock {
    use super::*;

    #[test]
    fn orchestrator_sigkill_while_frozen_is_thawed_by_the_watchdog() {
        run_on(
            test_lab_vsock(),
            Fault::Orchestrator {
                signal: Sig::Kill,
                phase: Phase::Frozen,
                jitter: Duration::from_millis(100),
            },
            false,
        );
    }

    #[test]
    fn pipeline_zsnap_killed_while_frozen_is_thawed_by_the_watchdog() {
        run_on(
            test_lab_vsock(),
            Fault::Pipeline {
                tool: Tool::Zsnap,
                signal: Sig::Kill,
                jitter: Duration::from_millis(100),
            },
            false,
        );
    }

    #[test]
    fn qemu_ga_killed_while_frozen() {
        run_on(
            test_lab_vsock(),
            Fault::AgentKilled {
                signal: Sig::Kill,
                after: Duration::from_millis(300),
            },
            false,
        );
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The soak: `EVESNAP_SOAK_TRIALS` random trials or until `EVESNAP_SOAK_SECONDS` pass; prints
/// a table and `N passed, M failed`. Neither set: 200 trials within 2700 s, a time box. Trials
/// set: all of them must run (no time cap unless seconds are set too); fewer fails.
#[test]
#[ignore = "the soak runs through scripts/soak"]
fn soak() {
    let asked = std::env::var("EVESNAP_SOAK_TRIALS").is_ok();
    let trials = env_u64("EVESNAP_SOAK_TRIALS", 200);
    let budget = match std::env::var("EVESNAP_SOAK_SECONDS") {
        Ok(_) => Some(Duration::from_secs(env_u64("EVESNAP_SOAK_SECONDS", 0))),
        Err(_) if asked => None,
        Err(_) => Some(Duration::from_secs(2700)),
    };
    let seed = env_u64(
        "EVESNAP_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let lab = test_lab();
    let _vm = vm_lock();
    let mut rng = Rng::new(seed);
    let cap = budget.map_or("no time cap".to_string(), |b| format!("{} s", b.as_secs()));
    println!("soak: seed {seed}, up to {trials} trials, {cap}");
    println!("{:>4} {}", "#", Outcome::header());
    let started = Instant::now();
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut failures = Vec::new();
    for i in 0..trials {
        if budget.is_some_and(|b| started.elapsed() > b) {
            println!("soak: time is up after {i} trials");
            break;
        }
        let fault = Fault::random(&mut rng);
        let verify = rng.below(3) == 0;
        let outcome = trial(lab, i as usize, &fault, verify);
        println!("{i:>4} {}", outcome.row());
        if outcome.passed() {
            passed += 1;
        } else {
            failed += 1;
            failures.push(format!("#{i} {}", outcome.row()));
        }
    }
    // Trials asked for and not run are not passed: the soak did not do what it was asked.
    let ran = passed + failed;
    let short = if asked && ran < trials {
        format!(
            ", {} of the {trials} trials asked not run: time was up",
            trials - ran
        )
    } else {
        String::new()
    };
    let summary = format!(
        "{passed} passed, {failed} failed{short} ({:.0} s, seed {seed})",
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        println!("failed trials:\n{}", failures.join("\n"));
    }
    println!("{summary}");
    if let Some(path) = std::env::var_os("EVESNAP_SOAK_SUMMARY") {
        let _ = std::fs::write(path, format!("{}\n{summary}\n", failures.join("\n")));
    }
    assert!(failed == 0 && short.is_empty(), "{summary}");
}
