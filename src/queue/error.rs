//! The broker side's errors: what failed, never a credential (amiquip puts the whole URL,
//! password included, in the text of its connection errors).

use super::{MAX_IDS, MAX_TASK_BYTES};

/// A broker call that failed, by what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the connection to a node (TCP, the AMQP handshake); the text has no password.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Declaring the exchanges and queues (a queue declared with other arguments, say).
    #[error("cannot declare the topology: {0}")]
    Topology(#[source] amiquip::Error),
    /// Any other call on an open connection or channel, or the connection going away.
    #[error(transparent)]
    Channel(#[from] amiquip::Error),
}

impl Error {
    /// A failed connection attempt to `url`, with its password (if any) masked.
    pub(super) fn connect(error: &amiquip::Error, url: &str) -> Self {
        let mut text = error.to_string();
        if let Ok(u) = url::Url::parse(url) {
            // amiquip shows the URL as `url` serialises it: userinfo is `user[:password]@`.
            if let Some(password) = u.password() {
                text = text.replace(&format!(":{password}@"), ":***@").replace(password, "***");
            }
        }
        Error::Connect(text)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Why a message body is not a task (the consumer's dead-letter log line says it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadTask {
    #[error("task body of {0} bytes is over the limit of {MAX_TASK_BYTES} ({MAX_IDS} ids)")]
    TooLarge(usize),
    /// Not JSON of either format; the parser's words and the body's first 120 bytes.
    #[error("not a task {{\"v\": 2, \"page_view_ids\": [<positive integers>]}}: {error}; body {body:?}")]
    NotATask { error: String, body: String },
    #[error("task format version {0} is not supported (2 is)")]
    Version(i64),
    #[error("{0} page_view_ids; a task has 1 to {MAX_IDS}")]
    IdCount(usize),
    #[error("page_view_id {0} is not positive")]
    NotPositive(i64),
}
