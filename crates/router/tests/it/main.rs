//! Tests of the `picloud-router` binary, run as a real process.

mod migrate;
