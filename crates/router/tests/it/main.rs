//! Tests of the `picloud-router` binary, run as real processes.

mod migrate;
mod relay_crash;
