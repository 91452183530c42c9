//! pageviews: `GET /` records a page view in PostgreSQL and hands it to a worker over RabbitMQ.
//!
//! `web` is the HTTP app, `worker` consumes tasks and runs the scheduled rollup, `queue` and `db`
//! hold everything that talks to RabbitMQ and PostgreSQL, `stack` starts real services for the
//! local launcher and the integration tests, `probe` checks a deployed stack from outside.

pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod metrics;
pub mod probe;
pub mod queue;
pub mod shutdown;
pub mod stack;
pub mod telemetry;
pub mod web;
pub mod worker;
