//! A throwaway PostgreSQL cluster: initdb into a directory, `postgres` on a free loopback port,
//! scram-sha-256 with a password generated at start (on a shared machine, `trust` would let
//! every local user in).

use super::process::{Process, find_program, free_port, is_root, tail, user_ids, wait_until};
use anyhow::{Context, bail};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Debian keeps the server binaries off PATH.
pub const DEBIAN_DIRS: &[&str] = &[
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
];
const PACKAGE: &str = "postgresql";

pub struct Postgres {
    dir: PathBuf,
    port: u16,
    /// Durable (fsync on) for the launcher and benchmarks; off for tests.
    durable: bool,
    /// The superuser's, generated at initdb.
    password: String,
    archiving: Option<Archiving>,
    process: Option<Process>,
}

/// WAL archiving: `archive_mode=on` with `command` as the `archive_command`, and what the
/// server's environment needs for it (and for the `restore_command` a restore writes).
#[derive(Clone, Debug)]
pub struct Archiving {
    pub command: String,
    pub env: Vec<(String, String)>,
}

impl Postgres {
    pub async fn start(dir: &Path, durable: bool) -> anyhow::Result<Postgres> {
        Self::start_with(dir, durable, None).await
    }

    /// `start`, with WAL archiving on when `archiving` is given.
    pub async fn start_with(dir: &Path, durable: bool, archiving: Option<Archiving>) -> anyhow::Result<Postgres> {
        if !dir.exists() {
            crate::private_dir(dir)?;
        }
        let data = dir.join("data");
        anyhow::ensure!(!data.exists(), "{} exists already", data.display());
        let password = crate::generate_password()?;
        let pwfile = dir.join("initdb.pw");
        crate::write_private(&pwfile, &password)?;
        let initdb = find_program("initdb", DEBIAN_DIRS, PACKAGE)?;
        let mut command = Command::new(initdb);
        command
            .args([
                "--auth=scram-sha-256",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data);
        let log = dir.join("initdb.log");
        let status = as_server_user(&mut command, dir)?
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join("initdb.err"))?)
            .status()
            .context("cannot run initdb")?;
        std::fs::remove_file(&pwfile)?;
        if !status.success() {
            bail!("initdb failed: {}", tail(&dir.join("initdb.err"), 10));
        }
        let mut pg = Postgres {
            dir: dir.to_owned(),
            port: free_port()?,
            durable,
            password,
            archiving,
            process: None,
        };
        pg.start_again().await?;
        Ok(pg)
    }

    /// Starts the server on the same data directory and port (after `stop`).
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let postgres = find_program("postgres", DEBIAN_DIRS, PACKAGE)?;
        let mut command = Command::new(postgres);
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ])
            .arg("-k")
            .arg(&self.dir);
        if !self.durable {
            command.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        if let Some(archiving) = &self.archiving {
            command
                .args(["-c", "archive_mode=on", "-c"])
                .arg(format!("archive_command={}", archiving.command))
                .envs(archiving.env.iter().map(|(k, v)| (k, v)));
        }
        as_server_user(&mut command, &self.dir)?;
        let log = self.log();
        self.process = Some(Process::spawn("postgres", &mut command, &log)?);
        let url = self.admin_url();
        wait_until("PostgreSQL", Duration::from_secs(30), || async {
            Ok(AsyncPgConnection::establish(&url).await.map(|_| ())?)
        })
        .await
        .with_context(|| format!("PostgreSQL log:\n{}", tail(&log, 20)))
    }

    /// Fast shutdown (SIGINT): connections are cut, like a crash from the clients' side.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop_with(libc::SIGINT, Duration::from_secs(30));
        }
    }

    /// Turns WAL archiving on (or off): `archive_mode` changes only at a restart, so a
    /// running server is stopped and started again (clients reconnect).
    pub async fn set_archiving(&mut self, archiving: Option<Archiving>) -> anyhow::Result<()> {
        self.archiving = archiving;
        if self.process.is_some() {
            self.stop();
            self.start_again().await?;
        }
        Ok(())
    }

    /// The data directory (`-D`): what a restore writes, and what a lost disk takes.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Where the server's Unix socket is (`-k`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log (stderr).
    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The generated superuser password (for tests that check it never reaches a log).
    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// Creates a database and returns its URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        create_database(&self.admin_url(), name).await
    }
}

/// Creates `name` on the server `admin_url` points at and returns the new database's URL.
pub async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    create_database_only(admin_url, name).await?;
    let mut url = url::Url::parse(admin_url)?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

/// Creates `name` on the server `admin_url` points at (any form tokio-postgres reads,
/// multi-host included).
pub async fn create_database_only(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = AsyncPgConnection::establish(admin_url).await?;
    diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// PostgreSQL refuses to run as root: as root, run it as the `postgres` (or `nobody`) user,
/// hand it the directory, and let its group traverse (not list) the private directories
/// above it up to the temp dir (mode 0710).
pub(crate) fn as_server_user<'a>(command: &'a mut Command, dir: &Path) -> anyhow::Result<&'a mut Command> {
    if !is_root() {
        return Ok(command);
    }
    let (uid, gid) = user_ids("postgres")
        .or_else(|| user_ids("nobody"))
        .context("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")?;
    chown_tree(dir, uid, gid)?;
    let top = std::env::temp_dir();
    for parent in dir.ancestors().skip(1).take_while(|p| p.starts_with(&top) && *p != top) {
        std::os::unix::fs::chown(parent, None, Some(gid))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o710))?;
    }
    Ok(command.uid(uid).gid(gid).current_dir(dir))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
