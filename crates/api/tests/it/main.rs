//! The HTTP API and the NATS ingest against a real Postgres and nats-server.

mod authz;
mod batch;
mod bulk;
mod cancel;
mod deliveries;
mod flow;
mod invalid;
mod limits;
mod openapi;
mod routes;
mod stats;
mod support;
mod sync;
mod tail;
mod webhooks;
