//! A pgBackRest repository for a throwaway PostgreSQL: the configuration file, WAL archiving
//! from the server (`archive-push`), full, differential and incremental backups, `expire` by
//! `repo1-retention-full`, and restores to the end of the archive or to a point in time.
//!
//! Every command is run the way a person runs it on a database host (the command lines of
//! README's runbook come from [`Step::args`]); only the configuration file's place differs,
//! given in `PGBACKREST_CONFIG` (to the server too, for `archive_command` and the
//! `restore_command` a restore writes), where a host has `/etc/pgbackrest/pgbackrest.conf`.

use crate::postgres::{Archiving, Postgres, as_server_user};
use crate::process::wait_until;
use anyhow::{Context, bail};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;

const PROGRAM: &str = "pgbackrest";
const PACKAGE: &str = "pgbackrest";
/// What the server runs for each completed WAL segment (`%p`: its path); the same on a host.
pub const ARCHIVE_COMMAND: &str = "pgbackrest --stanza={stanza} archive-push %p";
/// Output kept of a command, each stream (for `info` and for error messages).
const MAX_OUTPUT: u64 = 1 << 20;
/// Deadlines: a backup or restore copies the database, the rest is quick.
const QUICK: Duration = Duration::from_secs(60);
const COPY: Duration = Duration::from_secs(300);

/// What the repository keeps and how.
#[derive(Clone, Debug)]
pub struct Settings {
    pub stanza: String,
    /// `repo1-retention-full`: full backups kept (with the differential and incremental
    /// backups and the WAL that depend on them); `expire`, which every backup runs at its
    /// end, removes older ones.
    pub retention_full: u32,
    /// `compress-type` and `compress-level`, for backups and archived WAL.
    pub compress_type: &'static str,
    pub compress_level: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stanza: "pageviews".to_owned(),
            retention_full: 2,
            compress_type: "zst",
            compress_level: 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupType {
    Full,
    Diff,
    Incr,
}

impl BackupType {
    fn name(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Diff => "diff",
            BackupType::Incr => "incr",
        }
    }
}

/// The commands of the runbook, each as the arguments after `pgbackrest`.
#[derive(Clone, Debug)]
pub enum Step {
    StanzaCreate,
    /// Switches the WAL and waits until that segment is in the repository: archiving works,
    /// and what was committed before it is archived.
    Check,
    Info,
    InfoJson,
    Backup(BackupType),
    Expire,
    /// Into the stopped server's data directory (emptied, or with `--delta` rewriting only
    /// what differs), replaying the archive to its end.
    RestoreLatest,
    /// Replays up to the last commit at or before `target` (a timestamp with its time zone),
    /// then promotes: a new timeline, writable at once.
    RestoreToTime(String),
}

impl Step {
    pub fn args(&self, stanza: &str) -> Vec<String> {
        let mut args = vec![format!("--stanza={stanza}")];
        let rest: Vec<String> = match self {
            Step::StanzaCreate => vec!["stanza-create".into()],
            Step::Check => vec!["check".into()],
            Step::Info => vec!["info".into()],
            Step::InfoJson => vec!["--output=json".into(), "info".into()],
            Step::Backup(kind) => vec![format!("--type={}", kind.name()), "backup".into()],
            Step::Expire => vec!["expire".into()],
            Step::RestoreLatest => vec!["--delta".into(), "restore".into()],
            Step::RestoreToTime(target) => vec![
                "--delta".into(),
                "--type=time".into(),
                format!("--target={target}"),
                "--target-action=promote".into(),
                "restore".into(),
            ],
        };
        args.extend(rest);
        args
    }

    fn deadline(&self) -> Duration {
        match self {
            Step::Backup(_) | Step::RestoreLatest | Step::RestoreToTime(_) => COPY,
            _ => QUICK,
        }
    }
}

/// `args` as a person types them after `pgbackrest` (arguments with spaces or `$` quoted).
pub fn command_line(args: &[String]) -> String {
    let quoted = args.iter().map(|a| {
        if a.contains([' ', '$', '"', '\'']) {
            format!("\"{a}\"")
        } else {
            a.clone()
        }
    });
    std::iter::once(PROGRAM.to_owned())
        .chain(quoted)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A repository in a directory of its own (the configuration file, `repo/`, pgBackRest's
/// log, lock and spool directories, and the password file it connects with).
pub struct Repository {
    dir: PathBuf,
    settings: Settings,
}

impl Repository {
    /// Makes the directories; the configuration is written by [`attach`](Self::attach), once
    /// the server's port is known. `dir` must not exist.
    pub fn new(dir: &Path, settings: Settings) -> anyhow::Result<Repository> {
        anyhow::ensure!(
            settings
                .stanza
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && !settings.stanza.is_empty(),
            "pgBackRest stanza {:?}: letters, digits, `_` and `-` only",
            settings.stanza
        );
        anyhow::ensure!(settings.retention_full >= 1, "repo1-retention-full must be at least 1");
        crate::private_dir(dir)?;
        for sub in ["repo", "log", "lock", "spool"] {
            crate::private_dir(&dir.join(sub))?;
        }
        Ok(Repository {
            dir: dir.to_owned(),
            settings,
        })
    }

    pub fn stanza(&self) -> &str {
        &self.settings.stanza
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// `repo1-path`: the backups and the archived WAL.
    pub fn repo_path(&self) -> PathBuf {
        self.dir.join("repo")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("pgbackrest.conf")
    }

    /// pgBackRest's own log files (`log-path`), one per stanza and command.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn config_env(&self) -> (String, String) {
        ("PGBACKREST_CONFIG".to_owned(), self.config_path().display().to_string())
    }

    /// The environment a shell needs to run the runbook's commands on this repository: the
    /// configuration file, and the superuser's password file (backups connect).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            self.config_env(),
            ("PGPASSFILE".to_owned(), self.dir.join("pgpass").display().to_string()),
        ]
    }

    /// For [`Postgres::start_with`]: archive every WAL segment into this repository.
    pub fn archiving(&self) -> Archiving {
        Archiving {
            command: ARCHIVE_COMMAND.replace("{stanza}", self.stanza()),
            env: vec![self.config_env()],
        }
    }

    /// Writes the configuration for `pg` (which must archive here: see [`archiving`](Self::archiving)),
    /// creates the stanza and checks that WAL reaches the repository.
    pub async fn attach(&self, pg: &Postgres) -> anyhow::Result<()> {
        let s = &self.settings;
        let path = |p: &Path| -> anyhow::Result<String> {
            let text = p.display().to_string();
            anyhow::ensure!(!text.contains('\n'), "a path with a line break: {text:?}");
            Ok(text)
        };
        let config = format!(
            "[global]\n\
             repo1-path={repo}\n\
             repo1-retention-full-type=count\n\
             repo1-retention-full={retention}\n\
             compress-type={compress}\n\
             compress-level={level}\n\
             start-fast=y\n\
             archive-timeout=60\n\
             log-path={log}\n\
             log-level-console=warn\n\
             log-level-file=info\n\
             lock-path={lock}\n\
             spool-path={spool}\n\
             \n\
             [{stanza}]\n\
             pg1-path={data}\n\
             pg1-port={port}\n\
             pg1-socket-path={socket}\n\
             pg1-user=postgres\n",
            repo = path(&self.repo_path())?,
            retention = s.retention_full,
            compress = s.compress_type,
            level = s.compress_level,
            log = path(&self.log_path())?,
            lock = path(&self.dir.join("lock"))?,
            spool = path(&self.dir.join("spool"))?,
            stanza = s.stanza,
            data = path(&pg.data_dir())?,
            port = pg.port(),
            socket = path(pg.socket_dir())?,
        );
        crate::write_private(&self.config_path(), config)?;
        // libpq reads the superuser's password from here (never argv, never a log).
        crate::write_private(&self.dir.join("pgpass"), format!("*:*:*:postgres:{}\n", pg.password()))?;
        self.run(&Step::StanzaCreate).await?;
        self.run(&Step::Check).await?;
        Ok(())
    }

    /// Runs `pgbackrest <step>` as the server's user, within the step's deadline; the error
    /// carries pgBackRest's own message. Returns its standard output.
    pub async fn run(&self, step: &Step) -> anyhow::Result<String> {
        let args = step.args(self.stanza());
        let line = command_line(&args);
        let program = crate::process::find_program(PROGRAM, &[], PACKAGE)?;
        let mut command = Command::new(program);
        command
            .args(&args)
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        as_server_user(&mut command, &self.dir)?;
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        let mut child = command.spawn().with_context(|| format!("cannot run {line}"))?;
        let pid = child.id().unwrap_or(0) as i32;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let deadline = step.deadline();
        let finished = tokio::time::timeout(deadline, async {
            let (out, err, status) = tokio::join!(read_bounded(stdout), read_bounded(stderr), child.wait());
            (out, err, status)
        })
        .await;
        let Ok((out, err, status)) = finished else {
            // SAFETY: kill(2) on the process group of our own child (its helpers too).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            bail!(
                "{line} did not finish within {deadline:?} (killed); pgBackRest's log is in {}",
                self.log_path().display()
            );
        };
        let status = status.with_context(|| format!("cannot wait for {line}"))?;
        if !status.success() {
            let message = [err.trim(), out.trim()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            bail!("{line} failed ({status}): {message}");
        }
        Ok(out)
    }

    pub async fn backup(&self, kind: BackupType) -> anyhow::Result<()> {
        self.run(&Step::Backup(kind)).await.map(drop)
    }

    /// The stanza as `pgbackrest info --output=json` describes it.
    pub async fn info(&self) -> anyhow::Result<Info> {
        let out = self.run(&Step::InfoJson).await?;
        let mut stanzas: Vec<Info> = serde_json::from_str(&out)
            .with_context(|| format!("pgbackrest info --output=json: unexpected output {out:?}"))?;
        let i = stanzas
            .iter()
            .position(|s| s.name == self.stanza())
            .with_context(|| format!("pgbackrest info lists no stanza {}", self.stanza()))?;
        Ok(stanzas.swap_remove(i))
    }
}

async fn read_bounded(stream: Option<impl tokio::io::AsyncRead + Unpin>) -> String {
    let mut bytes = Vec::new();
    if let Some(stream) = stream {
        let mut kept = stream.take(MAX_OUTPUT);
        let _ = kept.read_to_end(&mut bytes).await;
        // The rest is read and dropped, so the command never blocks on a full pipe.
        let _ = tokio::io::copy(&mut kept.into_inner(), &mut tokio::io::sink()).await;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What `pgbackrest info --output=json` says about a stanza (the parts used here).
#[derive(Debug, serde::Deserialize)]
pub struct Info {
    pub name: String,
    pub status: Status,
    #[serde(default)]
    pub backup: Vec<Backup>,
    #[serde(default)]
    pub archive: Vec<ArchiveRange>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Status {
    pub code: i64,
    pub message: String,
}

#[derive(Debug, serde::Deserialize)]
pub struct Backup {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The full backup a differential or incremental one depends on, and the others between.
    pub reference: Option<Vec<String>>,
    pub archive: WalRange,
    pub timestamp: Times,
}

#[derive(Debug, serde::Deserialize)]
pub struct WalRange {
    pub start: Option<String>,
    pub stop: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Times {
    pub start: i64,
    pub stop: i64,
}

/// The archived WAL of one database (PostgreSQL version and system) in the repository.
#[derive(Debug, serde::Deserialize)]
pub struct ArchiveRange {
    pub id: String,
    pub min: Option<String>,
    pub max: Option<String>,
}

impl Info {
    pub fn labels(&self) -> Vec<&str> {
        self.backup.iter().map(|b| b.label.as_str()).collect()
    }

    /// The oldest WAL segment kept (any timeline): what point-in-time recovery can start from.
    pub fn archive_min(&self) -> Option<&str> {
        self.archive.iter().filter_map(|a| a.min.as_deref()).min()
    }
}

/// After a restore to a point in time (`--target-action=promote`) the server accepts
/// connections while it replays; waits until it has promoted (writable).
pub async fn wait_for_promotion(pg: &Postgres, timeout: Duration) -> anyhow::Result<()> {
    #[derive(diesel::QueryableByName)]
    struct Recovery {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        in_recovery: bool,
    }
    let url = pg.admin_url();
    wait_until("PostgreSQL to finish recovery and promote", timeout, || async {
        let mut conn = AsyncPgConnection::establish(&url).await?;
        let row: Recovery = diesel::sql_query("SELECT pg_is_in_recovery() AS in_recovery")
            .get_result(&mut conn)
            .await?;
        anyhow::ensure!(!row.in_recovery, "still in recovery");
        Ok(())
    })
    .await
    .with_context(|| format!("PostgreSQL log:\n{}", crate::process::tail(&pg.log(), 20)))
}
