//! The scenarios, one `Trial` method per fault family, grouped by what fails.

mod agent;
mod pool;
mod rollback;
mod tools;
