//! RabbitMQ: the topology, the task message, connecting with backoff. amiquip is synchronous,
//! so everything here runs on dedicated threads, never on the tokio workers.

pub mod consumer;
pub mod outbox;

use amiquip::{AmqpValue, Channel, Connection, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const EXCHANGE: &str = "pageviews";
pub const QUEUE: &str = "pageviews.tasks";
pub const ROUTING_KEY: &str = "page_view";
pub const DEAD_LETTER_EXCHANGE: &str = "pageviews.dead";
pub const DEAD_LETTER_QUEUE: &str = "pageviews.dead";

/// Ids in one task message, at most (the publisher sends up to `outbox::IDS_PER_MESSAGE`).
pub const MAX_IDS: usize = 1_000;

/// The task: "process these page views". The rows in PostgreSQL are the source of truth.
///
/// On the wire (README, "Task messages"), version 2: `{"v": 2, "page_view_ids": [1, 2, 3]}`,
/// 1 to 1 000 positive ids. Version 1, `{"page_view_id": 1}`, is still read, so tasks queued
/// by an older app are processed after an upgrade.
#[derive(Debug, PartialEq, Eq)]
pub struct Task {
    pub page_view_ids: Vec<i64>,
}

#[derive(Serialize)]
struct WireV2<'a> {
    v: u8,
    page_view_ids: &'a [i64],
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Wire {
    Versioned { v: i64, page_view_ids: Vec<i64> },
    V1 { page_view_id: i64 },
}

impl Task {
    pub const VERSION: u8 = 2;

    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = WireV2 {
            v: Self::VERSION,
            page_view_ids: &self.page_view_ids,
        };
        serde_json::to_vec(&wire).expect("a list of integers always serialises")
    }

    /// Parses a message body; the error says what was wrong, for the dead-letter log line.
    pub fn parse(body: &[u8]) -> Result<Task, String> {
        let shown = || String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
        let wire: Wire = serde_json::from_slice(body).map_err(|e| {
            format!(
                "not a task {{\"v\": 2, \"page_view_ids\": [<positive integers>]}}: {e}; body {:?}",
                shown()
            )
        })?;
        let ids = match wire {
            Wire::Versioned { v: 2, page_view_ids } => page_view_ids,
            Wire::Versioned { v, .. } => return Err(format!("task format version {v} is not supported (2 is)")),
            Wire::V1 { page_view_id } => vec![page_view_id],
        };
        if ids.is_empty() || ids.len() > MAX_IDS {
            return Err(format!("{} page_view_ids; a task has 1 to {MAX_IDS}", ids.len()));
        }
        if let Some(bad) = ids.iter().find(|id| **id <= 0) {
            return Err(format!("page_view_id {bad} is not positive"));
        }
        Ok(Task { page_view_ids: ids })
    }
}

/// Declares exchanges and queues (idempotent; both the app and the worker do it, so tasks
/// published before any worker ever ran are kept).
pub fn declare_topology(channel: &Channel) -> amiquip::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.exchange_declare(ExchangeType::Direct, EXCHANGE, durable.clone())?;
    channel.exchange_declare(ExchangeType::Fanout, DEAD_LETTER_EXCHANGE, durable)?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AmqpValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    let tasks = channel.queue_declare(
        QUEUE,
        QueueDeclareOptions {
            durable: true,
            arguments,
            ..Default::default()
        },
    )?;
    channel.queue_bind(tasks.name(), EXCHANGE, ROUTING_KEY, FieldTable::default())?;
    let dead = channel.queue_declare(
        DEAD_LETTER_QUEUE,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
    )?;
    channel.queue_bind(dead.name(), DEAD_LETTER_EXCHANGE, "", FieldTable::default())?;
    Ok(())
}

/// The broker's address without credentials, for log lines.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}{}",
            u.host_str().unwrap_or("localhost"),
            u.port().unwrap_or(5672),
            u.path()
        ),
        Err(_) => "<unparseable url>".into(),
    }
}

/// Exponential backoff between reconnect attempts: 100 ms doubling to 5 s.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        delay
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Opens a connection and a channel with the topology declared. The heartbeat notices a dead
/// broker within seconds instead of at the next TCP timeout.
pub fn open(url: &str) -> amiquip::Result<(Connection, Channel)> {
    let url = if url.contains("heartbeat=") {
        url.to_owned()
    } else {
        format!("{url}{}heartbeat=5", if url.contains('?') { '&' } else { '?' })
    };
    let mut connection = Connection::insecure_open(&url)?;
    let channel = connection.open_channel(None)?;
    declare_topology(&channel)?;
    Ok((connection, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_round_trip_and_bad_bodies_say_why() {
        let task = Task {
            page_view_ids: vec![42, 43],
        };
        assert_eq!(task.to_bytes(), br#"{"v":2,"page_view_ids":[42,43]}"#);
        assert_eq!(Task::parse(&task.to_bytes()), Ok(task));
        assert_eq!(
            Task::parse(br#"{"page_view_id": 7}"#),
            Ok(Task { page_view_ids: vec![7] })
        );
        assert!(Task::parse(b"hello").unwrap_err().contains("body \"hello\""));
        assert!(
            Task::parse(br#"{"page_view_id": "7"}"#)
                .unwrap_err()
                .contains("not a task")
        );
        assert_eq!(
            Task::parse(br#"{"v": 2, "page_view_ids": [3, -1]}"#).unwrap_err(),
            "page_view_id -1 is not positive"
        );
        assert_eq!(
            Task::parse(br#"{"v": 3, "page_view_ids": [3]}"#).unwrap_err(),
            "task format version 3 is not supported (2 is)"
        );
        assert!(
            Task::parse(br#"{"v": 2, "page_view_ids": []}"#)
                .unwrap_err()
                .contains("0 page_view_ids")
        );
    }

    #[test]
    fn redacted_urls_hide_credentials() {
        assert_eq!(redacted("amqp://user:secret@broker:5673/%2fv"), "broker:5673/%2fv");
    }
}
