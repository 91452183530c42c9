//! Connecting to the broker: one node ([`open`]), or the first that answers of several
//! ([`Brokers`]). `AMQP_URL` may list the nodes of a RabbitMQ cluster as comma-separated full
//! URLs. A client connects to the first node that answers and, after losing it, tries the
//! others first, so it fails over instead of waiting for the lost node.

use super::{CONNECT_TIMEOUT, Error, declare_topology, redacted};
use crate::config::QueueType;
use amiquip::{Channel, Connection};

/// The nodes of one broker (a cluster or a single node) and which one this client used last.
pub struct Brokers {
    nodes: Vec<String>,
    queue_type: QueueType,
    /// Index of the node last tried: the connected one after a success.
    current: Option<usize>,
}

impl Brokers {
    pub fn new(nodes: Vec<String>, queue_type: QueueType) -> Brokers {
        assert!(!nodes.is_empty(), "config guarantees at least one broker node");
        Brokers {
            nodes,
            queue_type,
            current: None,
        }
    }

    pub fn from_config(config: &crate::config::BrokerConfig) -> Brokers {
        let nodes = config.nodes.iter().map(|n| n.expose().to_owned()).collect();
        Brokers::new(nodes, config.queue_type)
    }

    /// Tries every node once, the one after the last connected first (the first node at
    /// start), and returns the connection of the first that answers with the topology
    /// declared; the error of the last node tried when none does. `Ok(None)`: `stop` said so
    /// before a node was tried (each attempt takes up to `CONNECT_TIMEOUT`, so a shutdown
    /// must not wait for a round over every node).
    pub fn open(&mut self, stop: &dyn Fn() -> bool) -> super::Result<Option<(Connection, Channel)>> {
        let n = self.nodes.len();
        let start = self.current.map_or(0, |i| (i + 1) % n);
        let mut last_error = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if stop() {
                return Ok(None);
            }
            self.current = Some(i);
            match open(&self.nodes[i], self.queue_type) {
                Ok(pair) => return Ok(Some(pair)),
                Err(e) => {
                    explain_queue_type_mismatch(&e, self.queue_type);
                    tracing::debug!(broker = %redacted(&self.nodes[i]), error = %e, "broker node did not answer");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("at least one node was tried"))
    }

    /// The node last tried (the connected one after a success), without credentials.
    pub fn current(&self) -> String {
        redacted(&self.nodes[self.current.unwrap_or(0)])
    }
}

/// The heartbeat: a dead broker is noticed within seconds instead of at the next TCP timeout.
const HEARTBEAT_SECS: u64 = 5;

/// Opens a connection to one node and a channel with the topology declared, within
/// [`CONNECT_TIMEOUT`] for the connection.
pub fn open(url: &str, queue_type: QueueType) -> super::Result<(Connection, Channel)> {
    let mut connection = Connection::insecure_open(&with_client_settings(url)).map_err(|e| Error::connect(&e, url))?;
    let channel = connection.open_channel(None)?;
    declare_topology(&channel, queue_type).map_err(Error::Topology)?;
    Ok((connection, channel))
}

/// `url` with the heartbeat and the connect timeout, unless it sets them itself.
fn with_client_settings(url: &str) -> String {
    let mut full = url.to_owned();
    for (name, value) in [
        ("heartbeat", HEARTBEAT_SECS),
        ("connection_timeout", CONNECT_TIMEOUT.as_millis() as u64),
    ] {
        if !url.contains(&format!("{name}=")) {
            let separator = if full.contains('?') { '&' } else { '?' };
            full = format!("{full}{separator}{name}={value}");
        }
    }
    full
}

/// Every node, without credentials, for the log line when none answers.
impl std::fmt::Display for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self.nodes.iter().map(|u| redacted(u)).collect();
        f.write_str(&shown.join(","))
    }
}

/// A queue declared with another `x-queue-type` (a classic queue from before quorum queues
/// were the default) makes the broker refuse the declaration; say what to do about it.
fn explain_queue_type_mismatch(error: &Error, wanted: QueueType) {
    // PRECONDITION_FAILED (406) naming the argument.
    let message = error.to_string();
    if matches!(error, Error::Topology(_)) && message.contains("x-queue-type") {
        tracing::error!(
            queue_type = wanted.as_str(),
            %message,
            "the broker holds the queues as another queue type than PAGEVIEWS_QUEUE_TYPE; \
             set PAGEVIEWS_QUEUE_TYPE to the existing type, or migrate the queues (README: \"Moving to quorum queues\")"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_errors_hide_credentials() {
        let url = "amqp://app:S3CRET%2FPW@rabbitmq.invalid:5672/%2f";
        let Err(e) = open(url, QueueType::Classic) else {
            panic!("rabbitmq.invalid resolved")
        };
        assert!(matches!(e, Error::Connect(_)), "{e:?}");
        let e = e.to_string();
        assert!(!e.contains("S3CRET") && e.contains("rabbitmq.invalid"), "{e}");
    }

    #[test]
    fn the_client_settings_are_added_unless_the_url_has_them() {
        assert_eq!(
            with_client_settings("amqp://h/v"),
            "amqp://h/v?heartbeat=5&connection_timeout=5000"
        );
        assert_eq!(
            with_client_settings("amqp://h/v?heartbeat=30"),
            "amqp://h/v?heartbeat=30&connection_timeout=5000"
        );
    }

    #[test]
    fn after_a_loss_the_next_node_is_tried_first() {
        // Nothing listens on port 1: the order in which nodes are tried shows in `current`.
        let nodes = ["a", "b", "c"]
            .map(|v| format!("amqp://u:secret@127.0.0.1:1/{v}"))
            .to_vec();
        let mut brokers = Brokers::new(nodes, QueueType::Quorum);
        let go_on = || false;
        assert!(brokers.open(&go_on).is_err());
        assert_eq!(brokers.current(), "127.0.0.1:1/c", "a fresh client starts at the first");
        brokers.current = Some(0); // as if connected to the first and then lost it
        assert!(brokers.open(&go_on).is_err());
        assert_eq!(brokers.current(), "127.0.0.1:1/a", "tried b, c, then a last");
        // Stopping after the first attempt: the others are not tried.
        let tried = std::cell::Cell::new(0);
        let stop_after_one = || {
            tried.set(tried.get() + 1);
            tried.get() > 1
        };
        assert!(matches!(brokers.open(&stop_after_one), Ok(None)));
        assert_eq!(brokers.current(), "127.0.0.1:1/b", "only b was tried");
        assert_eq!(brokers.to_string(), "127.0.0.1:1/a,127.0.0.1:1/b,127.0.0.1:1/c");
    }
}
