//! Tests of the `picloud-router` binary, run as real processes.

mod deploy_files;
mod migrate;
mod relay_crash;
