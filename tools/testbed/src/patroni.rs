//! A throwaway high-availability PostgreSQL on loopback: one etcd member and `size`
//! PostgreSQL servers, each run by its own Patroni, with synchronous replication as
//! nix/modules/database-ha.nix configures it (the same `ttl`, `loop_wait`, `retry_timeout`,
//! `synchronous_mode`, `use_pg_rewind`). Each node reaches etcd through a port of its own (a
//! [`Link`]), so a [`Partition`] can cut one node off the others, the clients and etcd: the
//! kernel drops every packet to or from its ports, as a network that fails silently does.

use super::link::{Link, LinkState};
use super::postgres::{DEBIAN_DIRS, as_server_user};
use super::process::{Process, find_program, free_port, is_root, tail, wait_until};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SCOPE: &str = "pageviews";
/// The NixOS module's settings (Patroni's defaults): a leader key lives 30 s without renewal,
/// each node looks every 10 s, etcd and PostgreSQL calls are retried for 10 s.
const TTL_SECS: u64 = 30;
const LOOP_WAIT_SECS: u64 = 10;
const RETRY_TIMEOUT_SECS: u64 = 10;
/// How long a cluster may take to form, a node to start or a failover to settle.
const SETTLE: Duration = Duration::from_secs(120);

pub struct Etcd {
    process: Process,
    pub port: u16,
    dir: PathBuf,
}

impl Etcd {
    /// One member on loopback (a cluster of one: the local stand-in for the three of NixOS).
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        crate::private_dir(dir)?;
        let etcd = find_program("etcd", &[], "etcd-server")?;
        let (port, peer) = (free_port()?, free_port()?);
        let (client_url, peer_url) = (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{peer}"));
        let mut command = Command::new(etcd);
        command
            .args(["--name", "etcd0", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("etcd0={peer_url}"),
                "--initial-cluster-state",
                "new",
            ])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        let log = dir.join("etcd.log");
        let process = Process::spawn("etcd", &mut command, &log)?;
        let health = format!("{client_url}/health");
        let client = reqwest::Client::new();
        wait_until("etcd", Duration::from_secs(30), || async {
            let body: Value = client.get(&health).send().await?.json().await?;
            anyhow::ensure!(body["health"] == "true", "{body}");
            Ok(())
        })
        .await
        .with_context(|| format!("etcd log:\n{}", tail(&log, 20)))?;
        Ok(Etcd {
            process,
            port,
            dir: dir.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }
}

/// One database host: Patroni, and the PostgreSQL it runs.
pub struct Node {
    pub name: String,
    dir: PathBuf,
    pub postgres_port: u16,
    pub rest_port: u16,
    // Field order is drop order: Patroni stops before its way to etcd closes (it gives its
    // keys up on the way out, and would retry until killed).
    process: Option<Process>,
    /// This node's way to etcd.
    pub etcd_link: Link,
}

impl Node {
    pub fn log(&self) -> PathBuf {
        self.dir.join("patroni.log")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Cuts the node off the network until the partition is dropped.
    pub fn cut_off(&self) -> anyhow::Result<Partition> {
        Partition::new(&[self.postgres_port, self.rest_port, self.etcd_link.port])
    }

    /// Patroni's own view of this node (`GET /patroni`).
    pub async fn status(&self) -> anyhow::Result<Value> {
        let url = format!("http://127.0.0.1:{}/patroni", self.rest_port);
        Ok(reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await?
            .json()
            .await?)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// The postmaster's pid, from its pid file.
    pub fn postmaster_pid(&self) -> anyhow::Result<i32> {
        let file = self.data_dir().join("postmaster.pid");
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no pid in {}", file.display()))
    }

    /// SIGKILLs the postmaster only (Patroni lives on): a crash of the database server.
    pub fn kill_postmaster(&self) -> anyhow::Result<()> {
        let pid = self.postmaster_pid()?;
        // SAFETY: kill(2) on a pid read from the server's own pid file, of a process we started.
        anyhow::ensure!(unsafe { libc::kill(pid, libc::SIGKILL) } == 0, "kill {pid} failed");
        Ok(())
    }

    /// Stops Patroni as `systemctl stop patroni` does (SIGTERM to Patroni alone, the unit's
    /// `KillMode=process`: it stops PostgreSQL and, as the leader, gives the leader key up),
    /// waiting for it to exit.
    pub async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut process = self.process.take()?;
        process.stop_alone_async(libc::SIGTERM, SETTLE).await
    }
}

/// What the cluster may trade: `strict` is Patroni's `synchronous_mode_strict`.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub durable: bool,
    pub strict: bool,
}

pub struct PatroniCluster {
    // Field order is drop order: the nodes before etcd.
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
    config: Configs,
}

struct Configs {
    bin_dir: PathBuf,
    patroni: PathBuf,
    superuser_password: String,
    replication_password: String,
    options: Options,
}

impl PatroniCluster {
    /// Starts etcd and `size` nodes; returns once one node leads and every other one streams
    /// from it, one of them as the synchronous standby.
    pub async fn start(dir: &Path, size: usize, options: Options) -> anyhow::Result<PatroniCluster> {
        anyhow::ensure!(size >= 2, "a synchronous standby needs a second node");
        if !dir.exists() {
            crate::private_dir(dir)?;
        }
        let config = Configs {
            // Patroni runs pg_controldata, pg_rewind, pg_basebackup from there, which a
            // directory of symlinks to a few server programs (as on PATH here) lacks.
            bin_dir: std::fs::canonicalize(find_program("pg_ctl", DEBIAN_DIRS, "postgresql")?)?
                .parent()
                .context("pg_ctl has no directory")?
                .to_owned(),
            patroni: patroni_program()?,
            superuser_password: crate::generate_password()?,
            replication_password: crate::generate_password()?,
            options,
        };
        let etcd = Etcd::start(&dir.join("etcd")).await?;
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let (postgres_port, rest_port) = (free_port()?, free_port()?);
            nodes.push(Node {
                name: format!("node{i}"),
                dir: dir.join(format!("node{i}")),
                postgres_port,
                rest_port,
                etcd_link: Link::start(etcd.port, LinkState::Up).await?,
                process: None,
            });
        }
        let mut cluster = PatroniCluster { nodes, etcd, config };
        // The first node bootstraps (initdb); the others then copy it with pg_basebackup.
        cluster.start_node(0)?;
        wait_until("the first node leading", SETTLE, || async {
            anyhow::ensure!(cluster.leader().await? == 0, "another leads");
            Ok(())
        })
        .await
        .with_context(|| format!("Patroni log:\n{}", problems(&cluster.nodes[0].log())))?;
        for i in 1..size {
            cluster.start_node(i)?;
        }
        cluster.wait_until_replicated().await?;
        Ok(cluster)
    }

    /// Starts node `i`'s Patroni (again): a stopped leader comes back as a standby.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        if !node.dir.exists() {
            crate::private_dir(&node.dir)?;
        }
        let file = node.dir.join("patroni.json");
        let _ = std::fs::remove_file(&file);
        crate::write_private(&file, serde_json::to_vec_pretty(&self.patroni_config(node))?)?;
        let mut command = Command::new(&self.config.patroni);
        command.arg(&file);
        as_server_user(&mut command, &node.dir)?;
        let process = Process::spawn(&format!("patroni {}", node.name), &mut command, &node.log())?;
        self.nodes[i].process = Some(process);
        Ok(())
    }

    /// Patroni's settings for `node` (JSON is YAML).
    fn patroni_config(&self, node: &Node) -> Value {
        let c = &self.config;
        let mut parameters = json!({
            "max_connections": 200,
            "wal_log_hints": "on",
            "unix_socket_directories": node.dir,
        });
        if !c.options.durable {
            // full_page_writes stays on: pg_rewind, which brings an old primary back, needs it.
            parameters["fsync"] = json!("off");
        }
        let hba = [
            "local all all scram-sha-256",
            "host replication replicator 127.0.0.1/32 scram-sha-256",
            "host all all 127.0.0.1/32 scram-sha-256",
        ];
        json!({
            "scope": SCOPE,
            "name": node.name,
            "restapi": {
                "listen": format!("127.0.0.1:{}", node.rest_port),
                "connect_address": format!("127.0.0.1:{}", node.rest_port),
            },
            // use_proxies: talk to etcd only through this node's port, never to the members
            // etcd advertises (which a partition would not cut).
            "etcd3": { "hosts": format!("127.0.0.1:{}", node.etcd_link.port), "use_proxies": true },
            "bootstrap": {
                "dcs": {
                    "ttl": TTL_SECS,
                    "loop_wait": LOOP_WAIT_SECS,
                    "retry_timeout": RETRY_TIMEOUT_SECS,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": true,
                    "synchronous_mode_strict": c.options.strict,
                    "postgresql": { "use_pg_rewind": true, "parameters": parameters },
                },
                "initdb": [{ "encoding": "UTF8" }, { "auth": "scram-sha-256" }],
            },
            "postgresql": {
                "listen": format!("127.0.0.1:{}", node.postgres_port),
                "connect_address": format!("127.0.0.1:{}", node.postgres_port),
                "data_dir": node.data_dir(),
                "bin_dir": c.bin_dir,
                "pgpass": node.dir.join("pgpass"),
                "pg_hba": hba,
                "parameters": { "unix_socket_directories": node.dir },
                "authentication": {
                    "superuser": { "username": "postgres", "password": c.superuser_password },
                    "replication": { "username": "replicator", "password": c.replication_password },
                },
            },
        })
    }

    /// The node whose Patroni holds the leader key and runs PostgreSQL as the primary, each
    /// node asked directly (`GET /primary` answers 200 only there).
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let client = reqwest::Client::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let url = format!("http://127.0.0.1:{}/primary", node.rest_port);
            let answer = client.get(url).timeout(Duration::from_secs(2)).send().await;
            if answer.is_ok_and(|a| a.status().is_success()) {
                return Ok(i);
            }
        }
        bail!("no node is the primary")
    }

    /// The members as the leader sees them (`GET /cluster`).
    pub async fn members(&self) -> anyhow::Result<Vec<Value>> {
        let leader = &self.nodes[self.leader().await?];
        let url = format!("http://127.0.0.1:{}/cluster", leader.rest_port);
        let cluster: Value = reqwest::get(url).await?.json().await?;
        Ok(cluster["members"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every running node is a member, the leader running and the others
    /// streaming from it, one of them as the synchronous standby.
    pub async fn wait_until_replicated(&mut self) -> anyhow::Result<()> {
        let running: Vec<String> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then(|| n.name.clone()))
            .collect();
        let this = &*self;
        wait_until("every node replicating, one synchronously", SETTLE, || async {
            let members = this.members().await?;
            for name in &running {
                let member = members.iter().find(|m| m["name"] == name.as_str());
                // Patroni 4: the leader is "running", a standby receiving WAL "streaming".
                let state = if member.is_some_and(|m| m["role"] == "leader") {
                    "running"
                } else {
                    "streaming"
                };
                anyhow::ensure!(member.is_some_and(|m| m["state"] == state), "{name}: {member:?}");
            }
            anyhow::ensure!(
                members.iter().any(|m| m["role"] == "sync_standby"),
                "no synchronous standby: {members:?}"
            );
            Ok(())
        })
        .await
        .with_context(|| {
            let logs: Vec<String> = this
                .nodes
                .iter()
                .map(|n| format!("{}:\n{}", n.name, problems(&n.log())))
                .collect();
            logs.join("\n")
        })
    }

    /// Every node, for a client that finds the primary itself.
    pub fn hosts(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.postgres_port))
            .collect();
        hosts.join(",")
    }

    /// `database` as the superuser on every node, read-write sessions only: libpq's and
    /// tokio-postgres' multi-host form, as the NixOS module gives the app and the worker.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@{}/{database}?target_session_attrs=read-write&connect_timeout=2",
            self.config.superuser_password,
            self.hosts()
        )
    }

    /// Creates a database on the primary and returns its multi-host URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        super::postgres::create_database_only(&self.url("postgres"), name).await?;
        Ok(self.url(name))
    }

    pub fn process_groups(&self) -> Vec<u32> {
        let nodes = self.nodes.iter().filter_map(|n| n.process.as_ref().map(Process::pid));
        nodes.chain([self.etcd.pid()]).collect()
    }
}

/// Patroni 4 or later, on PATH: with Debian bookworm's 3.0.2 a primary cut off the network
/// kept its role while its etcd calls hung, and took the leader key back once the network
/// returned, so two nodes had been primary (tests/integration/failover.rs saw it).
fn patroni_program() -> anyhow::Result<PathBuf> {
    const INSTALL: &str = "pip install 'patroni[etcd3,psycopg2-binary]>=4' (into a virtualenv the server's user can read; .ci/run puts one in /opt/pageviews-tools/patroni)";
    let program = find_program("patroni", &[], "patroni").with_context(|| format!("or {INSTALL}"))?;
    let output = Command::new(&program).arg("--version").output()?;
    let version = String::from_utf8_lossy(&output.stdout);
    let major: Option<u32> = version
        .split_whitespace()
        .last()
        .and_then(|v| v.split('.').next()?.parse().ok());
    match major {
        Some(m) if m >= 4 => Ok(program),
        _ => bail!(
            "{} is {}: Patroni 4 or later is needed (3.x let a primary cut off the network take the leader key back); {INSTALL}",
            program.display(),
            version.trim()
        ),
    }
}

/// A node cut off the network: the kernel drops every TCP packet to or from its ports on
/// loopback (iptables, so root), both ways: connections neither fail nor answer, new ones
/// get no SYN-ACK. Dropping the value removes the rules.
pub struct Partition {
    rules: Vec<Vec<String>>,
    iptables: PathBuf,
}

impl Partition {
    fn new(ports: &[u16]) -> anyhow::Result<Partition> {
        anyhow::ensure!(is_root(), "cutting a node off the network needs root (iptables)");
        let iptables = find_program("iptables", &["/usr/sbin", "/sbin"], "iptables")?;
        let mut partition = Partition {
            rules: Vec::new(),
            iptables,
        };
        for port in ports {
            for direction in ["--dport", "--sport"] {
                let rule: Vec<String> = [
                    "INPUT",
                    "-i",
                    "lo",
                    "-p",
                    "tcp",
                    direction,
                    &port.to_string(),
                    "-j",
                    "DROP",
                ]
                .map(str::to_owned)
                .into();
                partition.iptables("-I", &rule)?;
                partition.rules.push(rule);
            }
        }
        Ok(partition)
    }

    fn iptables(&self, action: &str, rule: &[String]) -> anyhow::Result<()> {
        let output = Command::new(&self.iptables)
            .args(["-w", "5", action])
            .args(rule)
            .output()
            .context("cannot run iptables")?;
        anyhow::ensure!(
            output.status.success(),
            "iptables {action} {}: {}",
            rule.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in std::mem::take(&mut self.rules) {
            if let Err(e) = self.iptables("-D", &rule) {
                tracing::error!("cannot heal the partition: {e:#}");
            }
        }
    }
}

/// A Patroni log's errors and warnings and its last lines (a Python traceback buries the
/// cause above it).
fn problems(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let marked = ["ERROR", "FATAL", "CRITICAL", "WARNING"];
    let lines: Vec<&str> = text.lines().filter(|l| marked.iter().any(|m| l.contains(m))).collect();
    format!(
        "{}\n...\n{}",
        lines[lines.len().saturating_sub(20)..].join("\n"),
        tail(log, 10)
    )
}
