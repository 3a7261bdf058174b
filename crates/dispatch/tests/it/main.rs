//! The relay end to end, against a real Postgres and a real nats-server.

mod batch;
mod cron;
mod delivery;
mod executors;
mod fairness;
mod flow;
mod handover;
mod janitor;
mod limits;
mod observability;
mod outages;
mod resilience;
mod support;
mod tenancy;
mod working;
