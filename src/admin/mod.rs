//! `pageviews-app admin status | dead-letters | requeue`: the backlog, the dead letters and why
//! each was rejected, and putting them back after a fix. Configured like the app (the same
//! `DATABASE_URL`, `AMQP_URL`, `PAGEVIEWS_QUEUE_TYPE`: `requeue` publishes to the task
//! exchange, which only the app's broker user may); every database call is bounded by
//! `PAGEVIEWS_DB_TIMEOUT_MS`, all broker work of a command by [`BROKER_DEADLINE`].
//!
//! Dead letters are never taken for good to be looked at: each one is read (`basic.get`), a
//! copy is published (back to `pageviews.dead`, or to the task exchange by `requeue`) and
//! confirmed by the broker, and only then is the original acked. A failure at any step leaves
//! the original where it was (unacked, it returns to the queue when the connection closes);
//! at worst a dead letter is there twice, which is harmless: processing is idempotent. Reading
//! without acking and giving the messages back would count a delivery each time, and a quorum
//! queue with a delivery limit drops a message past it. Listing moves what it lists to the end
//! of the queue, so a listing of every dead letter leaves their order as it was.

use crate::config::{BrokerConfig, ConfigError, DatabaseConfig, Environment, Source};
use crate::db::{self, Pool};
use crate::queue::brokers::Brokers;
use crate::queue::{DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, EXCHANGE, MAX_IDS, QUEUE, ROUTING_KEY, Task};
use amiquip::{AmqpProperties, AmqpValue, Channel, Confirm, Publish};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub const USAGE: &str =
    "admin status | admin dead-letters [--limit N] | admin requeue (--all | --id PAGE_VIEW_ID ...) [--limit N]";

/// Dead letters one command handles unless `--limit` says otherwise, and at most.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 10_000;
/// All the broker work of one command, connecting included.
pub const BROKER_DEADLINE: Duration = Duration::from_secs(60);
/// How long the broker may take to confirm one copy.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a dead letter's body shown.
const SHOWN_BYTES: usize = 200;
/// A copy carries what the broker recorded about the original in this header of ours: from
/// RabbitMQ 4 on, the broker no longer reads an `x-death` header a client publishes.
const DEATH_HEADER: &str = "pageviews-death";

#[derive(Debug, PartialEq)]
pub enum Command {
    Status,
    DeadLetters {
        limit: u32,
    },
    /// `only`: the dead letters naming one of these page views; `None`: every one.
    Requeue {
        only: Option<Vec<i64>>,
        limit: u32,
    },
}

pub fn parse(args: &[String]) -> Result<Command, String> {
    let (name, rest) = args.split_first().ok_or("which admin command?")?;
    let mut limit = DEFAULT_LIMIT;
    let (mut all, mut ids) = (false, Vec::new());
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        let mut value = || rest.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--limit" if name != "status" => {
                let v = value()?;
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or(format!("--limit {v:?} is not a whole number from 1 to {MAX_LIMIT}"))?;
            }
            "--all" if name == "requeue" => all = true,
            "--id" if name == "requeue" => {
                let v = value()?;
                let id = v
                    .parse::<i64>()
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or(format!("--id {v:?} is not a page view id (a positive whole number)"))?;
                ids.push(id);
                if ids.len() > MAX_IDS {
                    return Err(format!("more than {MAX_IDS} --id"));
                }
            }
            other => return Err(format!("unexpected argument {other:?} for {name:?}")),
        }
    }
    match name.as_str() {
        "status" => Ok(Command::Status),
        "dead-letters" => Ok(Command::DeadLetters { limit }),
        "requeue" => match (all, ids.is_empty()) {
            (true, true) => Ok(Command::Requeue { only: None, limit }),
            (false, false) => Ok(Command::Requeue { only: Some(ids), limit }),
            (true, false) => Err("--all and --id exclude each other".into()),
            (false, true) => Err("requeue needs --all or --id PAGE_VIEW_ID".into()),
        },
        other => Err(format!("unknown admin command {other:?}")),
    }
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub database: DatabaseConfig,
    pub broker: BrokerConfig,
}

impl AdminConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            database: DatabaseConfig::from_source(src)?,
            broker: BrokerConfig::from_source(src)?,
        })
    }
}

/// `pageviews-app admin …`: exit 2 for bad arguments or settings, 1 when something did not
/// answer or a step failed, 0 otherwise.
pub fn main(program: &str, args: &[String]) -> ExitCode {
    let command = match parse(args) {
        Ok(command) => command,
        Err(problem) => {
            eprintln!("{program} admin: {problem}; usage: {program} {USAGE}");
            return ExitCode::from(2);
        }
    };
    crate::cli::main_with(
        program,
        || AdminConfig::from_source(&Environment),
        |config| run(config, command),
        |program, e| eprintln!("{program} admin: {e:#}"),
    )
}

pub async fn run(config: AdminConfig, command: Command) -> anyhow::Result<()> {
    let pool = db::request_pool(&config.database);
    let report = match command {
        Command::Status => status(&pool, &config.broker).await,
        Command::DeadLetters { limit } => dead_letters(&pool, &config.broker, limit).await,
        Command::Requeue { only, limit } => requeue(&config.broker, only, limit).await,
    };
    let (text, outcome) = report;
    print!("{text}");
    outcome
}

async fn status(pool: &Pool, broker: &BrokerConfig) -> (String, anyhow::Result<()>) {
    let database = db::with_connection(pool, async |conn| db::admin::backlog(conn).await).await;
    let queues = on_broker(broker, |channel| {
        let tasks = channel.queue_declare_passive(QUEUE)?;
        let dead = channel.queue_declare_passive(DEAD_LETTER_QUEUE)?;
        Ok((
            tasks.declared_message_count().unwrap_or(0),
            tasks.declared_consumer_count().unwrap_or(0),
            dead.declared_message_count().unwrap_or(0),
        ))
    })
    .await;
    let mut out = String::new();
    match &database {
        Ok(backlog) => {
            let totals = backlog.totals;
            let _ = writeln!(out, "database: ok");
            let _ = writeln!(
                out,
                "  page views: {} recorded, {} processed, {} unprocessed",
                totals.recorded,
                totals.processed,
                totals.recorded - totals.processed
            );
            if let Some(oldest) = backlog.oldest_unprocessed {
                let age = (chrono::Utc::now() - oldest).num_seconds().max(0);
                let _ = writeln!(
                    out,
                    "  oldest unprocessed: recorded {age} s ago ({})",
                    oldest.to_rfc3339()
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "database: unavailable ({e})");
        }
    }
    match &queues {
        Ok((node, (ready, consumers, dead))) => {
            let _ = writeln!(out, "broker: ok ({node})");
            let _ = writeln!(
                out,
                "  {QUEUE}: {ready} ready, {consumers} consumers (deliveries in flight count as unprocessed rows above)"
            );
            let _ = writeln!(
                out,
                "  {DEAD_LETTER_QUEUE}: {dead} dead letters (`admin dead-letters` lists them)"
            );
        }
        Err(e) => {
            let _ = writeln!(out, "broker: unavailable ({e})");
        }
    }
    let outcome = match (database.is_ok(), queues.is_ok()) {
        (true, true) => Ok(()),
        (false, true) => Err(anyhow::anyhow!("the database did not answer")),
        (true, false) => Err(anyhow::anyhow!("the broker did not answer")),
        (false, false) => Err(anyhow::anyhow!("neither the database nor the broker answered")),
    };
    (out, outcome)
}

async fn dead_letters(pool: &Pool, broker: &BrokerConfig, limit: u32) -> (String, anyhow::Result<()>) {
    let cycled = on_broker(broker, move |channel| cycle(channel, limit, |_| Destination::Back)).await;
    let (present, letters) = match cycled {
        Ok((_, result)) => result,
        Err(e) => return (String::new(), Err(anyhow::anyhow!("{e}"))),
    };
    let mut out = format!(
        "{present} dead letters in {DEAD_LETTER_QUEUE}; {} listed (each left in the queue)\n",
        letters.len()
    );
    for (n, (letter, _)) in letters.iter().enumerate() {
        let _ = writeln!(out, "{}. {}", n + 1, letter.shown());
        let _ = writeln!(out, "   dead-lettered: {}", letter.death);
        let _ = writeln!(out, "   now: {}", reason_now(pool, &letter.body).await);
    }
    (out, Ok(()))
}

async fn requeue(broker: &BrokerConfig, only: Option<Vec<i64>>, limit: u32) -> (String, anyhow::Result<()>) {
    let cycled = on_broker(broker, move |channel| {
        cycle(channel, limit, |letter| {
            let chosen = match &only {
                None => true,
                Some(ids) => Task::parse(&letter.body).is_ok_and(|t| t.page_view_ids.iter().any(|id| ids.contains(id))),
            };
            if chosen { Destination::Tasks } else { Destination::Back }
        })
    })
    .await;
    let (present, letters) = match cycled {
        Ok((_, result)) => result,
        Err(e) => return (String::new(), Err(anyhow::anyhow!("{e}"))),
    };
    let requeued: Vec<&DeadLetter> = letters
        .iter()
        .filter(|(_, d)| *d == Destination::Tasks)
        .map(|(l, _)| l)
        .collect();
    let mut out = format!(
        "{} of {present} dead letters requeued to {QUEUE} ({} looked at)\n",
        requeued.len(),
        letters.len()
    );
    for letter in requeued {
        let _ = writeln!(out, "  {}", letter.shown());
    }
    (out, Ok(()))
}

/// Why a dead letter would be rejected today, from its body and the rows it names.
async fn reason_now(pool: &Pool, body: &[u8]) -> String {
    let task = match Task::parse(body) {
        Ok(task) => task,
        Err(problem) => return format!("malformed, rejected again if requeued: {problem}"),
    };
    let ids = task.page_view_ids;
    match db::with_connection(pool, async |conn| db::admin::known(conn, &ids).await).await {
        Err(e) => format!("its page views could not be looked up: {e}"),
        Ok(known) => {
            let missing: Vec<String> = ids
                .iter()
                .filter(|id| known.binary_search_by_key(*id, |(k, _)| *k).is_err())
                .map(i64::to_string)
                .collect();
            let unprocessed = known.iter().filter(|(_, processed)| !processed).count();
            if !missing.is_empty() {
                format!("names no page view: {}", missing.join(", "))
            } else if unprocessed > 0 {
                format!("its page views exist, {unprocessed} unprocessed: `admin requeue` processes them")
            } else {
                "every page view it names is processed: requeuing it changes nothing".into()
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Destination {
    /// Back to the end of the dead-letter queue.
    Back,
    /// To the task exchange, for the workers.
    Tasks,
}

struct DeadLetter {
    body: Vec<u8>,
    /// What the broker recorded when it dead-lettered the message (`x-death`).
    death: String,
}

impl DeadLetter {
    /// The start of the body, escaped (a body can hold anything).
    fn shown(&self) -> String {
        let text = String::from_utf8_lossy(&self.body[..self.body.len().min(SHOWN_BYTES)]);
        let more = if self.body.len() > SHOWN_BYTES {
            format!(" ({} bytes)", self.body.len())
        } else {
            String::new()
        };
        format!("{text:?}{more}")
    }
}

/// Takes up to `limit` dead letters, never more than the queue held at the start, and moves
/// each where `route` says: a copy published and confirmed, then the original acked. Returns
/// how many the queue held, and each letter with where it went.
fn cycle(
    channel: &Channel,
    limit: u32,
    mut route: impl FnMut(&DeadLetter) -> Destination,
) -> anyhow::Result<(u32, Vec<(DeadLetter, Destination)>)> {
    channel.enable_publisher_confirms()?;
    let confirms = channel.listen_for_publisher_confirms()?;
    let present = channel
        .queue_declare_passive(DEAD_LETTER_QUEUE)?
        .declared_message_count()
        .unwrap_or(0);
    let mut done = Vec::new();
    for tag in 1..=u64::from(present.min(limit)) {
        let Some(get) = channel.basic_get(DEAD_LETTER_QUEUE, false)? else {
            break;
        };
        let delivery = &get.delivery;
        let letter = DeadLetter {
            body: delivery.body.clone(),
            death: death(&delivery.properties),
        };
        let destination = route(&letter);
        let (exchange, key) = match destination {
            // The dead-letter exchange, as the worker republishes: the clients' broker users
            // may not write to the default exchange (src/queue/rabbitmq-setup.sh).
            Destination::Back => (DEAD_LETTER_EXCHANGE, ROUTING_KEY),
            Destination::Tasks => (EXCHANGE, ROUTING_KEY),
        };
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(DEATH_HEADER.into(), AmqpValue::LongString(letter.death.clone()));
        let properties = delivery.properties.clone().with_delivery_mode(2).with_headers(headers);
        channel.basic_publish(exchange, Publish::with_properties(&delivery.body, key, properties))?;
        // Confirms come in order on this channel, one publish at a time.
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match confirms.recv_timeout(left) {
                Ok(Confirm::Ack(p)) if p.delivery_tag >= tag => break,
                Ok(Confirm::Nack(p)) if p.delivery_tag >= tag => {
                    anyhow::bail!("the broker refused to take a copy of a dead letter (nack); the original stays")
                }
                Ok(_) => continue,
                Err(_) => anyhow::bail!(
                    "no publisher confirm within {CONFIRM_TIMEOUT:?} for a copy of a dead letter; the original stays"
                ),
            }
        }
        get.ack(channel)?;
        done.push((letter, destination));
    }
    Ok((present, done))
}

/// The newest `x-death` entry (why, from which queue, how often), else what an earlier
/// listing copied from it.
fn death(properties: &AmqpProperties) -> String {
    let headers = properties.headers().clone().unwrap_or_default();
    let entry = match headers.get("x-death") {
        Some(AmqpValue::FieldArray(deaths)) => deaths.first().cloned(),
        _ => None,
    };
    let Some(AmqpValue::FieldTable(entry)) = entry else {
        return match headers.get(DEATH_HEADER) {
            Some(AmqpValue::LongString(recorded)) => recorded.clone(),
            _ => "no x-death header: published to the dead-letter exchange directly (the worker does so for an id of a larger task that names no page view)".into(),
        };
    };
    let field = |name: &str| match entry.get(name) {
        Some(AmqpValue::LongString(s)) => s.clone(),
        Some(AmqpValue::LongLongInt(n)) => n.to_string(),
        Some(AmqpValue::LongInt(n)) => n.to_string(),
        Some(other) => format!("{other:?}"),
        None => "?".into(),
    };
    format!("{} in {} ({} times)", field("reason"), field("queue"), field("count"))
}

/// Runs `work` on a broker connection (the first node of `AMQP_URL` that answers, topology
/// declared) on a thread of its own, for at most [`BROKER_DEADLINE`]. Past it the thread is
/// left to end with the process: whatever it held unacked returns to its queue then.
async fn on_broker<T: Send + 'static>(
    config: &BrokerConfig,
    work: impl FnOnce(&Channel) -> anyhow::Result<T> + Send + 'static,
) -> Result<(String, T), String> {
    let mut brokers = Brokers::from_config(config);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("admin-amqp".into()).spawn(move || {
        let result = match brokers.open(&|| false) {
            Ok(Some((connection, channel))) => {
                let result = work(&channel).map_err(|e| format!("{e:#}"));
                let _ = connection.close();
                result.map(|value| (brokers.current(), value))
            }
            Ok(None) => Err("not connected".into()),
            Err(e) => Err(format!("{} did not answer: {e}", brokers)),
        };
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        return Err(format!("cannot start a thread: {e}"));
    }
    match tokio::time::timeout(BROKER_DEADLINE, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err("the broker thread ended without an answer".into()),
        Err(_) => Err(format!("no answer within {BROKER_DEADLINE:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn commands_parse_and_bad_ones_say_why() {
        assert_eq!(parse(&args("status")), Ok(Command::Status));
        assert_eq!(
            parse(&args("dead-letters --limit 5")),
            Ok(Command::DeadLetters { limit: 5 })
        );
        assert_eq!(
            parse(&args("requeue --id 4 --id 7")),
            Ok(Command::Requeue {
                only: Some(vec![4, 7]),
                limit: DEFAULT_LIMIT
            })
        );
        assert_eq!(
            parse(&args("requeue --all")),
            Ok(Command::Requeue {
                only: None,
                limit: DEFAULT_LIMIT
            })
        );
        assert_eq!(
            parse(&args("requeue")).unwrap_err(),
            "requeue needs --all or --id PAGE_VIEW_ID"
        );
        assert_eq!(
            parse(&args("requeue --all --id 3")).unwrap_err(),
            "--all and --id exclude each other"
        );
        assert!(
            parse(&args("requeue --id -3"))
                .unwrap_err()
                .contains("not a page view id")
        );
        assert!(
            parse(&args("dead-letters --limit 0"))
                .unwrap_err()
                .contains("from 1 to 10000")
        );
        assert!(
            parse(&args("dead-letters --limit"))
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            parse(&args("status --all"))
                .unwrap_err()
                .contains("unexpected argument")
        );
        assert!(parse(&args("purge")).unwrap_err().contains("unknown admin command"));
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn the_reason_comes_from_x_death_else_from_an_earlier_copy() {
        let mut entry = amiquip::FieldTable::new();
        entry.insert("reason".into(), AmqpValue::LongString("rejected".into()));
        entry.insert("queue".into(), AmqpValue::LongString(QUEUE.into()));
        entry.insert("count".into(), AmqpValue::LongLongInt(2));
        let mut headers = amiquip::FieldTable::new();
        headers.insert(
            "x-death".into(),
            AmqpValue::FieldArray(vec![AmqpValue::FieldTable(entry)]),
        );
        headers.insert(DEATH_HEADER.into(), AmqpValue::LongString("older".into()));
        let with = |h| AmqpProperties::default().with_headers(h);
        assert_eq!(death(&with(headers)), "rejected in pageviews.tasks (2 times)");
        let mut copied = amiquip::FieldTable::new();
        let recorded = "rejected in pageviews.tasks (1 times)";
        copied.insert(DEATH_HEADER.into(), AmqpValue::LongString(recorded.into()));
        assert_eq!(death(&with(copied)), recorded);
        assert!(death(&AmqpProperties::default()).starts_with("no x-death header"));
    }

    #[test]
    fn a_body_is_shown_escaped_and_cut() {
        let letter = DeadLetter {
            body: b"a\x1b[31mb\n".to_vec(),
            death: String::new(),
        };
        assert_eq!(letter.shown(), r#""a\u{1b}[31mb\n""#);
        let long = DeadLetter {
            body: vec![b'x'; 1000],
            death: String::new(),
        };
        assert!(long.shown().ends_with("\" (1000 bytes)"));
    }
}
