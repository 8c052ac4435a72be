//! The orchestrator's flow, branch by branch, in seconds and without root or the lab: a
//! fake `zfs` (`tests/support/fake-zfs.py`) and the simulated agent
//! (`evesnap::qga::testing`). The lab tests (`lab.rs`) run the same flow for real.

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
