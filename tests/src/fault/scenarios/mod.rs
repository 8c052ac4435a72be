//! The scenarios, one `Trial` method per fault family, grouped by what fails.

mod agent;
mod freeze;
mod pool;
mod rollback;
mod tools;
