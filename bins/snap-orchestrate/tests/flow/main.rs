//! The orchestrator's flow, branch by branch, in seconds and without root or the lab: a
//! fake `zfs` (`tests/support/fake-zfs.py`) and the simulated agent
//! (`evesnap::qga::testing`). The lab tests (`lab.rs`) run the same flow for real.

mod support;

mod create;
mod create_failed;
mod create_refused;
mod group;
mod pending;
mod rollback;
mod serve;
mod signal;
