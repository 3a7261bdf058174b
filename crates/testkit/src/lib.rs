//! What the tests and benchmarks need besides the local servers of `picloud-local` (re-exported
//! here, so a test names one crate):
//!
//! - [`TestDatabase`]: a fresh database per test, on a PostgreSQL server shared by the test
//!   process (stopped at exit) or on the server `PICLOUD_TEST_DATABASE_URL` names.
//! - [`TcpProxy`]: a TCP proxy a test cuts and restores, a network partition between a process
//!   and its server.
//! - [`eventually`]: the tests' one way to wait for a condition.
//!
//! Never a dependency of production code: the `dev` command takes its servers from
//! `picloud-local` directly.
#![warn(missing_docs)]
// `atexit` (to stop the shared server when the test process exits) is a libc call; it is in
// `exit`, with its `SAFETY` comment.
#![allow(unsafe_code)]

mod exit;
mod proxy;
mod testdb;
mod wait;

pub use picloud_local::*;
pub use proxy::TcpProxy;
pub use testdb::{TEST_DATABASE_URL_ENV, TestDatabase};
pub use wait::{EVENTUALLY, eventually, eventually_within};
