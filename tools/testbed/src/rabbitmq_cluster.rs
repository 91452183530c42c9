//! A throwaway RabbitMQ cluster on loopback: `size` nodes, each a [`RabbitMq`] with its own
//! name, ports and data directory, sharing an Erlang cookie made for this cluster (written as
//! each node's `$HOME/.erlang.cookie` before it starts), joined with
//! `rabbitmqctl join_cluster` to the first node.

use super::RabbitMq;
use super::process::wait_until;
use anyhow::{Context, bail};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// What each node adds to `rabbitmq.conf`, as nix/modules/cluster.nix does (README, "Scaling
/// out", has the reasons): a node that stops answering (frozen, not dead) is given up after
/// 7.5 to 12.5 s instead of 45 to 75 s, so its quorum queues elect a leader elsewhere and
/// the clients' new connections work; when it comes back, the partition that the others
/// then see heals by restarting it.
pub const CLUSTER_CONFIG: &str = "net_ticktime = 10\ncluster_partition_handling = autoheal\n";

pub struct RabbitMqCluster {
    pub nodes: Vec<RabbitMq>,
}

impl RabbitMqCluster {
    pub async fn start(dir: &Path, size: usize) -> anyhow::Result<RabbitMqCluster> {
        anyhow::ensure!(size >= 1, "a cluster needs at least one node");
        let cookie = random_hex(32)?;
        let dirs: Vec<_> = (0..size).map(|i| dir.join(format!("node{i}"))).collect();
        for node_dir in &dirs {
            std::fs::create_dir_all(node_dir)?;
            let file = node_dir.join(".erlang.cookie");
            std::fs::write(&file, &cookie)?;
            // Erlang refuses a cookie file others can read.
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400))?;
        }
        // In parallel: a node takes seconds to boot.
        let starting: Vec<_> = dirs
            .into_iter()
            .map(|d| tokio::spawn(async move { RabbitMq::start_with(&d, CLUSTER_CONFIG).await }))
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for node in starting {
            nodes.push(node.await??);
        }
        let cluster = RabbitMqCluster { nodes };
        let first = cluster.nodes[0].node_name();
        // Each rabbitmqctl call boots an Erlang VM (seconds on a busy machine): join in parallel.
        tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let joins: Vec<_> = cluster.nodes[1..]
                    .iter()
                    .map(|node| {
                        let first = &first;
                        scope.spawn(move || -> anyhow::Result<()> {
                            node.ctl(&["stop_app"])?;
                            node.ctl(&["join_cluster", first])
                                .with_context(|| format!("{} cannot join {first}", node.node_name()))?;
                            node.ctl(&["start_app"])?;
                            Ok(())
                        })
                    })
                    .collect();
                joins
                    .into_iter()
                    .try_for_each(|j| j.join().map_err(|_| anyhow::anyhow!("a join thread panicked"))?)
            })
        })?;
        Ok(cluster)
    }

    /// Waits until `count` nodes are running in the cluster, as the first running node sees it.
    pub async fn wait_for_members(&self, count: usize) -> anyhow::Result<()> {
        wait_until("RabbitMQ cluster members", Duration::from_secs(60), || async {
            let running = self.running_nodes()?;
            anyhow::ensure!(running.len() == count, "running: {running:?}");
            Ok(())
        })
        .await
    }

    /// Node names the cluster reports as running.
    pub fn running_nodes(&self) -> anyhow::Result<Vec<String>> {
        let out = self.ctl(&["eval", "io:format(\"~p\", [rabbit_nodes:all_running()])."])?;
        Ok(out
            .split(|c: char| !(c.is_alphanumeric() || c == '@' || c == '_' || c == '-'))
            .filter(|s| s.contains('@'))
            .map(str::to_owned)
            .collect())
    }

    /// `rabbitmqctl` on the first node that is running.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.pid().is_some())
            .context("no cluster node is running")?;
        node.ctl(args)
    }

    /// The URL for `vhost` listing every node, in node order (the app's `AMQP_URL` form).
    pub fn url(&self, vhost: &str) -> String {
        let first = self.nodes[0].url(vhost);
        let port = format!(":{}/", self.nodes[0].port());
        self.nodes
            .iter()
            .map(|n| first.replace(&port, &format!(":{}/", n.port())))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Creates a vhost (users and vhosts are cluster-wide) and returns the cluster's URL for it.
    pub fn create_vhost(&self, vhost: &str) -> anyhow::Result<String> {
        self.nodes[0].create_vhost(vhost)?;
        Ok(self.url(vhost))
    }

    /// The index of the node with this AMQP port.
    pub fn node_with_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// The index of the node that leads quorum queue `queue` in `vhost`, and its members.
    pub fn queue_leader(&self, vhost: &str, queue: &str) -> anyhow::Result<(usize, usize)> {
        let out = self.ctl(&[
            "list_queues",
            "-p",
            vhost,
            "--quiet",
            "--no-table-headers",
            "name",
            "leader",
            "members",
        ])?;
        let line = out
            .lines()
            .find(|l| l.split('\t').next() == Some(queue))
            .with_context(|| format!("no queue {queue} in {out:?}"))?;
        let fields: Vec<&str> = line.split('\t').collect();
        let (Some(leader), Some(members)) = (fields.get(1), fields.get(2)) else {
            bail!("unexpected list_queues line {line:?}");
        };
        let index = self
            .nodes
            .iter()
            .position(|n| n.node_name() == leader.trim())
            .with_context(|| format!("leader {leader:?} is no node of this cluster"))?;
        Ok((index, members.matches('@').count()))
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
