//! RabbitMQ: the topology, the task message, connecting with backoff. amiquip is synchronous,
//! so everything here runs on dedicated threads, never on the tokio workers.

pub mod brokers;
pub mod consumer;
mod error;
pub mod outbox;

pub use brokers::open;
pub use error::{BadTask, Error, Result};

use crate::config::QueueType;
use amiquip::{AmqpValue, Channel, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

pub const EXCHANGE: &str = "pageviews";
pub const QUEUE: &str = "pageviews.tasks";
pub const ROUTING_KEY: &str = "page_view";
pub const DEAD_LETTER_EXCHANGE: &str = "pageviews.dead";
pub const DEAD_LETTER_QUEUE: &str = "pageviews.dead";

/// Ids in one task message, at most (the publisher sends up to `outbox::IDS_PER_MESSAGE`).
pub const MAX_IDS: usize = 1_000;
/// Bytes in one task message, at most: 1 000 ids of up to 19 digits, their commas and some
/// whitespace. A longer body cannot be a valid task and is dead-lettered unread.
pub const MAX_TASK_BYTES: usize = MAX_IDS * 32;

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

    /// Parses a message body; the error says what was wrong, for the dead-letter log line. A
    /// body over [`MAX_TASK_BYTES`] is refused before any parsing: parsed, a few megabytes of
    /// `1,1,1,...` take twenty times their size in memory.
    pub fn parse(body: &[u8]) -> std::result::Result<Task, BadTask> {
        if body.len() > MAX_TASK_BYTES {
            return Err(BadTask::TooLarge(body.len()));
        }
        let wire: Wire = serde_json::from_slice(body).map_err(|e| BadTask::NotATask {
            error: e.to_string(),
            body: String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned(),
        })?;
        let ids = match wire {
            Wire::Versioned { v: 2, page_view_ids } => page_view_ids,
            Wire::Versioned { v, .. } => return Err(BadTask::Version(v)),
            Wire::V1 { page_view_id } => vec![page_view_id],
        };
        if ids.is_empty() || ids.len() > MAX_IDS {
            return Err(BadTask::IdCount(ids.len()));
        }
        if let Some(bad) = ids.iter().find(|id| **id <= 0) {
            return Err(BadTask::NotPositive(*bad));
        }
        Ok(Task { page_view_ids: ids })
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

/// How long a connection attempt (TCP connect and AMQP handshake) may take: well under
/// systemd's stop timeout (30 s in nix/modules/hardening.nix), so a SIGTERM while the broker's
/// host drops packets still ends in time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a shutdown waits for a client thread that holds nothing to lose (beyond the
/// publisher's drain): enough to finish a batch in hand and close the connection, not to
/// wait out a connect attempt.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Waits for a client thread to end, for at most `limit()` (asked again while waiting: what
/// the thread still holds may change it). `false`: it had not ended and is left running, for
/// the process to end: it may be in a call without a deadline of its own (a connect attempt
/// of up to `CONNECT_TIMEOUT`, a call on a connection the broker has blocked).
pub async fn join_within(thread: std::thread::JoinHandle<()>, limit: impl Fn() -> Duration) -> bool {
    let started = Instant::now();
    while !thread.is_finished() {
        if started.elapsed() >= limit() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = thread.join();
    true
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
        assert!(
            Task::parse(b"hello")
                .unwrap_err()
                .to_string()
                .contains("body \"hello\"")
        );
        assert!(
            Task::parse(br#"{"page_view_id": "7"}"#)
                .unwrap_err()
                .to_string()
                .contains("not a task")
        );
        assert_eq!(
            Task::parse(br#"{"v": 2, "page_view_ids": [3, -1]}"#)
                .unwrap_err()
                .to_string(),
            "page_view_id -1 is not positive"
        );
        assert_eq!(
            Task::parse(br#"{"v": 3, "page_view_ids": [3]}"#)
                .unwrap_err()
                .to_string(),
            "task format version 3 is not supported (2 is)"
        );
        assert!(
            Task::parse(br#"{"v": 2, "page_view_ids": []}"#)
                .unwrap_err()
                .to_string()
                .contains("0 page_view_ids")
        );
        let widest = Task {
            page_view_ids: vec![i64::MAX; MAX_IDS],
        };
        assert!(widest.to_bytes().len() <= MAX_TASK_BYTES);
        assert_eq!(Task::parse(&widest.to_bytes()), Ok(widest));
        assert_eq!(
            Task::parse(&vec![b' '; MAX_TASK_BYTES + 1]).unwrap_err().to_string(),
            "task body of 32001 bytes is over the limit of 32000 (1000 ids)"
        );
    }

    #[test]
    fn redacted_urls_hide_credentials() {
        assert_eq!(redacted("amqp://user:secret@broker:5673/%2fv"), "broker:5673/%2fv");
    }
}
