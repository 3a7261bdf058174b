//! The relay end to end, against a real Postgres and a real nats-server.

mod delivery;
mod resilience;
mod support;
