//! The store's integration tests: the conformance suite against both stores, and the
//! Postgres-only properties (concurrent claims, the claim plan at scale, migrations), and the
//! firing of cron ticks.

#[macro_use]
mod support;

mod cancel;
mod conformance;
mod cron;
mod debounce;
mod deliveries;
mod fairness;
mod lanes;
mod limits;
mod postgres;
mod stats;
