//! RabbitMQ: the topology, the task message, connecting with backoff. amiquip is synchronous,
//! so everything here runs on dedicated threads, never on the tokio workers.

pub mod brokers;
pub mod consumer;
pub mod publisher;

use amiquip::{AmqpValue, Channel, Connection, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const EXCHANGE: &str = "pageviews";
pub const QUEUE: &str = "pageviews.tasks";
pub const ROUTING_KEY: &str = "page_view";
pub const DEAD_LETTER_EXCHANGE: &str = "pageviews.dead";
pub const DEAD_LETTER_QUEUE: &str = "pageviews.dead";

/// The task: "process this page view". The row in PostgreSQL is the source of truth.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Task {
    pub page_view_id: i64,
}

impl Task {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of one integer always serialises")
    }

    /// Parses a message body; the error says what was wrong, for the dead-letter log line.
    pub fn parse(body: &[u8]) -> Result<Task, String> {
        let task: Task = serde_json::from_slice(body).map_err(|e| {
            let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
            format!("not a task {{\"page_view_id\": <positive integer>}}: {e}; body {shown:?}")
        })?;
        if task.page_view_id <= 0 {
            return Err(format!("page_view_id {} is not positive", task.page_view_id));
        }
        Ok(task)
    }
}

/// The type of the task and dead-letter queues (`PAGEVIEWS_QUEUE_TYPE`). Quorum queues are
/// replicated across a cluster's nodes (Raft); classic queues live on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            _ => Err(()),
        }
    }
}

/// Declares exchanges and queues (idempotent; both the app and the worker do it, so tasks
/// published before any worker ever ran are kept). Both queues are durable and not
/// exclusive, as quorum queues require.
pub fn declare_topology(channel: &Channel, queue_type: QueueType) -> amiquip::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.exchange_declare(ExchangeType::Direct, EXCHANGE, durable.clone())?;
    channel.exchange_declare(ExchangeType::Fanout, DEAD_LETTER_EXCHANGE, durable)?;
    // Classic queues are declared without the argument, as before quorum queues existed, so
    // queues declared by older versions stay equivalent.
    let mut typed = FieldTable::default();
    if queue_type == QueueType::Quorum {
        typed.insert("x-queue-type".into(), AmqpValue::LongString("quorum".into()));
    }
    let mut arguments = typed.clone();
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
            arguments: typed,
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
pub fn open(url: &str, queue_type: QueueType) -> amiquip::Result<(Connection, Channel)> {
    let url = if url.contains("heartbeat=") {
        url.to_owned()
    } else {
        format!("{url}{}heartbeat=5", if url.contains('?') { '&' } else { '?' })
    };
    let mut connection = Connection::insecure_open(&url)?;
    let channel = connection.open_channel(None)?;
    declare_topology(&channel, queue_type)?;
    Ok((connection, channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_round_trip_and_bad_bodies_say_why() {
        let task = Task { page_view_id: 42 };
        assert_eq!(Task::parse(&task.to_bytes()), Ok(task));
        assert!(Task::parse(b"hello").unwrap_err().contains("body \"hello\""));
        assert!(
            Task::parse(br#"{"page_view_id": "7"}"#)
                .unwrap_err()
                .contains("invalid type")
        );
        assert_eq!(
            Task::parse(br#"{"page_view_id": -1}"#).unwrap_err(),
            "page_view_id -1 is not positive"
        );
    }

    #[test]
    fn redacted_urls_hide_credentials() {
        assert_eq!(redacted("amqp://user:secret@broker:5673/%2fv"), "broker:5673/%2fv");
    }
}
