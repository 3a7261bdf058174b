//! The relay end to end, against a real Postgres and a real nats-server.

mod delivery;
mod executors;
mod resilience;
mod support;
mod tenancy;
