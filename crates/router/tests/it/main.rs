//! Tests of the `picloud-router` binary, run as real processes.

mod admin;
mod cluster;
mod deploy_files;
mod dev;
mod faults;
mod migrate;
mod relay_crash;
mod serve_checks;
mod shutdown;
mod support;
