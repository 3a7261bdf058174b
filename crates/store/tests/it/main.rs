//! The store's integration tests: the conformance suite against both stores, and the
//! Postgres-only properties (concurrent claims, the claim plan at scale, migrations).

mod conformance;
mod postgres;
mod support;
