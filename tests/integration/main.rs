//! One test binary: every test starts real PostgreSQL, RabbitMQ (and nginx) processes through
//! the same launcher code as `pageviews-stack`, and runs the real built binaries.

mod config_errors;
mod deploys;
mod faults;
mod migrations;
mod pipeline;
mod proxy;
mod support;
