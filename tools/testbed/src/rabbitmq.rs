//! A throwaway RabbitMQ node with its own name, ports, data and cookie, so it never meets the
//! machine's own broker. `rabbitmqctl` (same HOME, hence the same cookie) manages it. Its one
//! user has a generated name and password (never guest:guest, which any local user knows).

use super::process::{Process, find_program, free_port, tail, wait_until};
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PACKAGE: &str = "rabbitmq-server";
/// `max_message_size`: twice the largest valid task (`pageviews::queue::MAX_TASK_BYTES`), so
/// a body between the two reaches the worker, which dead-letters it with a log line saying
/// why, and a larger one is refused at publish. RabbitMQ's default takes 128 MiB.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;

pub struct RabbitMq {
    dir: PathBuf,
    port: u16,
    dist_port: u16,
    bin_dir: PathBuf,
    user: String,
    password: String,
    process: Option<Process>,
}

impl RabbitMq {
    pub async fn start(dir: &Path) -> anyhow::Result<RabbitMq> {
        Self::start_with(dir, "").await
    }

    /// `start`, with more `rabbitmq.conf` lines (`key = value`, one per line).
    pub async fn start_with(dir: &Path, config: &str) -> anyhow::Result<RabbitMq> {
        if !dir.exists() {
            crate::private_dir(dir)?;
        }
        let user = format!("pageviews-{}", &crate::generate_password()?[..8]);
        let password = crate::generate_password()?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        // The default user is made at the node's first boot instead of guest. Messages are
        // bounded as in the NixOS module (nix/modules/data.nix).
        crate::write_private(
            &dir.join("rabbitmq.conf"),
            format!(
                "log.console = true\nlog.file = false\ndefault_user = {user}\ndefault_pass = {password}\n\
                 max_message_size = {MAX_MESSAGE_SIZE}\n{config}"
            ),
        )?;
        let mut node = RabbitMq {
            dir: dir.to_owned(),
            port: free_port()?,
            dist_port: free_port()?,
            bin_dir: bin_dir()?,
            user,
            password,
            process: None,
        };
        node.start_again().await?;
        Ok(node)
    }

    /// Starts the node again on the same data (after `stop`): persistent messages survive.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(self.bin_dir.join("rabbitmq-server"));
        self.environment(&mut command);
        let log = self.dir.join("rabbitmq.log");
        self.process = Some(Process::spawn("rabbitmq-server", &mut command, &log)?);
        let url = self.url("%2f");
        wait_until("RabbitMQ", Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                tokio::task::spawn_blocking(move || amiquip::Connection::insecure_open(&url)?.close())
                    .await?
                    .map_err(anyhow::Error::from)
            }
        })
        .await
        .with_context(|| format!("RabbitMQ log:\n{}", tail(&log, 20)))
    }

    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop_with(libc::SIGTERM, Duration::from_secs(30));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn node_name(&self) -> String {
        format!("pageviews{}@localhost", self.port)
    }

    /// The URL for `vhost` (percent-encoded; `%2f` is the default vhost) as the node's user.
    pub fn url(&self, vhost: &str) -> String {
        format!("amqp://{}:{}@127.0.0.1:{}/{vhost}", self.user, self.password, self.port)
    }

    /// The generated password (for tests that check it never reaches a log).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Creates a vhost that the node's user may use, and returns its URL.
    pub fn create_vhost(&self, vhost: &str) -> anyhow::Result<String> {
        self.ctl(&["add_vhost", vhost])?;
        self.ctl(&["set_permissions", "-p", vhost, &self.user, ".*", ".*", ".*"])?;
        Ok(self.url(vhost))
    }

    /// A command running `program` in the environment that makes `rabbitmqctl` manage this
    /// node without `-n` (for scripts that run it).
    pub fn ctl_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        self.environment(&mut command);
        command
    }

    /// The path of `rabbitmqctl`.
    pub fn ctl_path(&self) -> PathBuf {
        self.bin_dir.join("rabbitmqctl")
    }

    /// Runs `rabbitmqctl` against this node; the output on success.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self
            .ctl_command(self.ctl_path())
            .arg("-n")
            .arg(self.node_name())
            .args(args)
            .output()
            .context("cannot run rabbitmqctl")?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Messages ready in `queue` of `vhost`.
    pub fn queue_depth(&self, vhost: &str, queue: &str) -> anyhow::Result<u64> {
        let out = self.ctl(&[
            "list_queues",
            "-p",
            vhost,
            "--quiet",
            "--no-table-headers",
            "name",
            "messages",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .and_then(|(_, n)| n.trim().parse().ok())
            .unwrap_or(0))
    }

    fn environment(&self, command: &mut Command) {
        let d = &self.dir;
        command
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", self.node_name())
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_PID_FILE", d.join("rabbitmq.pid"))
            .current_dir(d);
    }
}

/// The directory of the real `rabbitmq-server` script. Debian's PATH entry is a wrapper that
/// switches to the `rabbitmq` user and drops our environment, so use the script beside it.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let found = find_program("rabbitmq-server", &["/usr/lib/rabbitmq/bin"], PACKAGE)?;
    let real = std::fs::canonicalize(&found)?;
    let dir = real.parent().context("rabbitmq-server has no parent directory")?;
    if real.file_name().is_some_and(|n| n == "rabbitmq-script-wrapper") {
        return Ok(dir.to_owned());
    }
    // Nix and plain installs: rabbitmqctl sits beside rabbitmq-server on PATH.
    Ok(found.parent().unwrap_or(dir).to_owned())
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.stop();
    }
}
