//! One test binary: every test starts real PostgreSQL, RabbitMQ (and nginx) processes through
//! the same launcher code as `pageviews-stack`, and runs the real built binaries.

mod admin;
mod alerting;
mod browser;
mod cluster;
mod config_errors;
mod connections;
mod database;
mod deploys;
mod failover;
mod failures;
mod faults;
mod health;
mod journald;
mod load;
mod migrations;
mod ops;
mod outbox;
mod page;
mod pipeline;
mod proxy;
mod restore;
mod retention;
mod setup;
mod support;
mod worker;
