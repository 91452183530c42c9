//! The broker's limits, with a small amiquip client on a vhost of its own and the app's
//! topology: persistent publishes with confirms (in batches as the app's publisher sends them,
//! and one at a time for contrast), then consuming and acking them one by one as the worker does.
//! Once per queue type (quorum and classic), each on a vhost of its own.
//! Synchronous: run it on a blocking thread.

use amiquip::{AmqpProperties, AmqpValue, Confirm, ConfirmSmoother, ConsumerMessage, ConsumerOptions, Publish};
use anyhow::{Context, bail};
use pageviews::config::QueueType;
use pageviews::queue::outbox::MAX_BATCH;
use pageviews::queue::{EXCHANGE, QUEUE, ROUTING_KEY, Task};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BrokerLimits {
    pub version: String,
    /// Persistent publishes per second, `MAX_BATCH` per wait for confirms.
    pub publish_batched: f64,
    /// Persistent publishes per second, each waiting for its confirm.
    pub publish_each: f64,
    /// Deliveries consumed and acked one by one per second, with the worker's prefetch.
    pub consume_ack: f64,
}

impl BrokerLimits {
    /// The higher of each figure of two runs.
    pub fn best_of(self, other: BrokerLimits) -> BrokerLimits {
        BrokerLimits {
            version: self.version,
            publish_batched: self.publish_batched.max(other.publish_batched),
            publish_each: self.publish_each.max(other.publish_each),
            consume_ack: self.consume_ack.max(other.consume_ack),
        }
    }
}

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
const CONSUME_DEADLINE: Duration = Duration::from_secs(120);

pub fn measure(url: &str, secs: f64, prefetch: u16, queue_type: QueueType) -> anyhow::Result<BrokerLimits> {
    let (connection, channel) = pageviews::queue::open(url, queue_type)?;
    let version = match connection.server_properties().get("version") {
        Some(AmqpValue::LongString(v)) => v.clone(),
        _ => "unknown".into(),
    };
    channel.enable_publisher_confirms()?;
    let confirms = channel.listen_for_publisher_confirms()?;
    let mut smoother = ConfirmSmoother::new();
    let mut publish_for = |batch: usize, duration: f64| -> anyhow::Result<(u64, f64)> {
        let body = Task { page_view_ids: vec![1] }.to_bytes();
        let properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let started = Instant::now();
        let (mut sent, mut confirmed) = (0u64, 0u64);
        while started.elapsed().as_secs_f64() < duration {
            for _ in 0..batch {
                channel.basic_publish(
                    EXCHANGE,
                    Publish::with_properties(&body, ROUTING_KEY, properties.clone()),
                )?;
            }
            sent += batch as u64;
            while confirmed < sent {
                let raw = confirms.recv_timeout(CONFIRM_TIMEOUT).context("no confirm in time")?;
                for confirm in smoother.process(raw) {
                    match confirm {
                        Confirm::Ack(_) => confirmed += 1,
                        Confirm::Nack(_) => bail!("the broker refused a publish"),
                    }
                }
            }
        }
        Ok((sent, sent as f64 / started.elapsed().as_secs_f64()))
    };
    let (batched_sent, publish_batched) = publish_for(MAX_BATCH, secs)?;
    let (each_sent, publish_each) = publish_for(1, secs / 2.0)?;

    channel.qos(0, prefetch, false)?;
    let consumer = channel.basic_consume(QUEUE, ConsumerOptions::default())?;
    let total = batched_sent + each_sent;
    let started = Instant::now();
    let mut acked = 0;
    while acked < total {
        let left = CONSUME_DEADLINE
            .checked_sub(started.elapsed())
            .context("consuming took too long")?;
        match consumer.receiver().recv_timeout(left) {
            Ok(ConsumerMessage::Delivery(delivery)) => {
                consumer.ack(delivery)?;
                acked += 1;
            }
            Ok(other) => bail!("consumer stopped: {other:?}"),
            Err(_) => bail!("consuming took too long ({acked} of {total})"),
        }
    }
    let consume_ack = total as f64 / started.elapsed().as_secs_f64();
    consumer.cancel()?;
    connection.close()?;
    Ok(BrokerLimits {
        version,
        publish_batched,
        publish_each,
        consume_ack,
    })
}
