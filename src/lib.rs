//! pageviews: `GET /` records a page view in PostgreSQL and hands it to a worker over RabbitMQ.
//!
//! `web` is the HTTP app, `worker` consumes tasks and runs the scheduled rollup, `queue` and `db`
//! hold everything that talks to RabbitMQ and PostgreSQL. This crate is what ships; the local
//! launcher, the benchmark and the probe are separate crates of the workspace (see README.md).

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod db;
pub mod listener;
pub mod metrics;
pub mod queue;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;
pub mod web;
pub mod worker;
