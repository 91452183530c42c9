//! RabbitMQ: `AMQP_URL` (one node or a cluster's), its password file, the queue type.

use super::{ConfigError, Secret, Source, parsed, password_file, required, with_password};
use serde::Serialize;
use std::path::PathBuf;

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
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            _ => Err(()),
        }
    }
}

impl Serialize for QueueType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The queue type unless `PAGEVIEWS_QUEUE_TYPE` says otherwise (README "Scaling out" has the
/// figures it was chosen from).
pub const DEFAULT_QUEUE_TYPE: QueueType = QueueType::Quorum;

/// Splits an `AMQP_URL` value into its node URLs. The error says which entry (1-based) was
/// wrong and never quotes an entry, since it may hold a password.
pub fn parse_list(raw: &str) -> Result<Vec<String>, String> {
    let entries: Vec<&str> = raw.split(',').map(str::trim).collect();
    let count = entries.len();
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let which = which(i, count);
            if entry.is_empty() {
                return Err(format!("{which}is empty (separate full amqp:// URLs with commas)"));
            }
            let url = url::Url::parse(entry).map_err(|e| format!("{which}not a URL: {e}"))?;
            match url.scheme() {
                "amqp" if url.host_str().is_some_and(|h| !h.is_empty()) => Ok((*entry).to_owned()),
                "amqp" => Err(format!("{which}has no host")),
                "amqps" => Err(format!(
                    "{which}amqps:// is not supported by this build; use amqp:// on a private network"
                )),
                other => Err(format!("{which}scheme {other:?} is not amqp")),
            }
        })
        .collect()
}

/// "entry 2 of 3: " in a list of several, nothing for a single URL.
fn which(i: usize, count: usize) -> String {
    if count == 1 {
        String::new()
    } else {
        format!("entry {} of {count}: ", i + 1)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BrokerConfig {
    /// One URL per broker node (`AMQP_URL` lists them separated by commas), each with the
    /// password of `PAGEVIEWS_AMQP_PASSWORD_FILE` in it if set.
    #[serde(rename = "AMQP_URL", serialize_with = "redacted")]
    pub nodes: Vec<Secret>,
    /// The file the password was read from (`PAGEVIEWS_AMQP_PASSWORD_FILE`), if any.
    #[serde(rename = "PAGEVIEWS_AMQP_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// The type of the task and dead-letter queues (`PAGEVIEWS_QUEUE_TYPE`).
    #[serde(rename = "PAGEVIEWS_QUEUE_TYPE")]
    pub queue_type: QueueType,
}

/// The node list as `AMQP_URL` takes it, passwords shown as `***`.
fn redacted<S: serde::Serializer>(nodes: &[Secret], s: S) -> Result<S::Ok, S::Error> {
    let shown: Vec<String> = nodes.iter().map(|n| super::without_password(n.expose())).collect();
    s.serialize_str(&shown.join(","))
}

impl BrokerConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        const NAME: &str = "AMQP_URL";
        const PASSWORD_FILE: &str = "PAGEVIEWS_AMQP_PASSWORD_FILE";
        let raw = required(src, NAME)?;
        let mut nodes = parse_list(&raw).map_err(|problem| ConfigError::new(NAME, problem))?;
        let password = password_file(src, PASSWORD_FILE)?;
        if let Some((_, password)) = &password {
            let count = nodes.len();
            for (i, node) in nodes.iter_mut().enumerate() {
                *node = with_password(node, password, NAME, PASSWORD_FILE)
                    .map_err(|e| ConfigError::new(NAME, format!("{}{}", which(i, count), e.problem)))?;
            }
        }
        Ok(Self {
            nodes: nodes.into_iter().map(Secret).collect(),
            password_file: password.map(|(path, _)| path),
            queue_type: parsed(
                src,
                "PAGEVIEWS_QUEUE_TYPE",
                DEFAULT_QUEUE_TYPE,
                "\"quorum\" or \"classic\"",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{Scratch, env};

    fn error(pairs: &[(&str, &str)]) -> String {
        BrokerConfig::from_source(&env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn a_list_of_urls_is_split_and_checked() {
        assert_eq!(
            parse_list("amqp://u:p@h1:5672/%2f, amqp://u:p@h2:5672/%2f").unwrap(),
            ["amqp://u:p@h1:5672/%2f", "amqp://u:p@h2:5672/%2f"]
        );
        assert_eq!(parse_list("amqp://u:p@h/v").unwrap(), ["amqp://u:p@h/v"]);
    }

    #[test]
    fn a_bad_entry_is_named_by_position_without_its_password() {
        let error = parse_list("amqp://u:secret@h1/v,amqp://u:secret@h2:port/v").unwrap_err();
        assert_eq!(error, "entry 2 of 2: not a URL: invalid port number");
        assert_eq!(
            parse_list("amqp://u:secret@h1/v,,amqp://h3").unwrap_err(),
            "entry 2 of 3: is empty (separate full amqp:// URLs with commas)"
        );
        assert_eq!(
            parse_list("amqp://u:secret@h1/v,http://u:secret@h2/").unwrap_err(),
            "entry 2 of 2: scheme \"http\" is not amqp"
        );
        assert_eq!(parse_list("http://x").unwrap_err(), "scheme \"http\" is not amqp");
        assert!(parse_list("amqps://u:secret@h1/v").unwrap_err().starts_with("amqps://"));
    }

    #[test]
    fn amqp_url_may_list_several_nodes() {
        let config = BrokerConfig::from_source(&env(&[("AMQP_URL", "amqp://u:p@h1/v, amqp://u:p@h2:5673/v")])).unwrap();
        let nodes: Vec<&str> = config.nodes.iter().map(Secret::expose).collect();
        assert_eq!(nodes, ["amqp://u:p@h1/v", "amqp://u:p@h2:5673/v"]);
    }

    #[test]
    fn the_password_file_goes_into_every_node() {
        let dir = Scratch::new("amqp-password");
        let file = dir.file("amqp", b"a/b@c\n");
        let config = BrokerConfig::from_source(&env(&[
            (
                "AMQP_URL",
                "amqp://app@h1:5672/pageviews,amqp://app@[fd00::2]:5672/pageviews",
            ),
            ("PAGEVIEWS_AMQP_PASSWORD_FILE", &file),
        ]))
        .unwrap();
        let nodes: Vec<&str> = config.nodes.iter().map(Secret::expose).collect();
        assert_eq!(
            nodes,
            [
                "amqp://app:a%2Fb%40c@h1:5672/pageviews",
                "amqp://app:a%2Fb%40c@[fd00::2]:5672/pageviews"
            ]
        );
        let shown = serde_json::to_value(&config).unwrap();
        assert_eq!(
            shown["AMQP_URL"],
            "amqp://app:***@h1:5672/pageviews,amqp://app:***@[fd00::2]:5672/pageviews"
        );
        assert_eq!(
            error(&[
                ("AMQP_URL", "amqp://app@h1/v,amqp://app:pw@h2/v"),
                ("PAGEVIEWS_AMQP_PASSWORD_FILE", &file)
            ]),
            "AMQP_URL: entry 2 of 2: has a password and PAGEVIEWS_AMQP_PASSWORD_FILE gives one too; set one"
        );
    }

    #[test]
    fn errors_name_the_variable_and_the_problem() {
        assert_eq!(error(&[("AMQP_URL", "")]), "AMQP_URL: is required but not set");
        assert!(error(&[("AMQP_URL", "http://x")]).contains("scheme \"http\" is not amqp"));
        assert_eq!(
            error(&[("AMQP_URL", "amqp://u:secret@h1/v,amqp://u:secret@h2:x/v")]),
            "AMQP_URL: entry 2 of 2: not a URL: invalid port number"
        );
        assert_eq!(
            error(&[("PAGEVIEWS_QUEUE_TYPE", "mirrored")]),
            "PAGEVIEWS_QUEUE_TYPE: \"mirrored\" is not \"quorum\" or \"classic\""
        );
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = Scratch::new("amqp-url");
        let path = dir.file("amqp", b"amqp://u:p@10.0.0.3:5672/v\n");
        let config = BrokerConfig::from_source(&env(&[("AMQP_URL", ""), ("AMQP_URL_FILE", &path)])).unwrap();
        assert_eq!(config.nodes[0].expose(), "amqp://u:p@10.0.0.3:5672/v");
        assert!(!format!("{config:?}").contains("u:p@"), "Debug output leaks the secret");
        assert_eq!(
            error(&[("AMQP_URL_FILE", &path)]),
            "AMQP_URL: both AMQP_URL and AMQP_URL_FILE are set; set one"
        );
        let missing = error(&[("AMQP_URL", ""), ("AMQP_URL_FILE", "/nonexistent/amqp")]);
        assert!(
            missing.starts_with("AMQP_URL_FILE: cannot read /nonexistent/amqp"),
            "{missing}"
        );
    }
}
