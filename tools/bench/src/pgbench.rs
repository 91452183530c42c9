//! The database's limit: pgbench running the app's single-row JSONB INSERT, into a database
//! of its own with the app's schema, on the stack's (durable) PostgreSQL.

use anyhow::Context;
use pageviews_testbed::Postgres;
use pageviews_testbed::postgres::DEBIAN_DIRS;
use pageviews_testbed::process::find_program;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct InsertRate {
    pub clients: u32,
    pub per_sec: f64,
    pub latency_ms: f64,
}

/// Runs the INSERT with each number of clients for `secs` seconds.
pub async fn insert_rates(
    postgres: &Postgres,
    dir: &Path,
    clients: &[u32],
    secs: u64,
) -> anyhow::Result<Vec<InsertRate>> {
    let url = postgres.create_database("pgbench").await?;
    pageviews::db::migrate(&url).await?;
    let script = dir.join("pgbench-insert.sql");
    std::fs::write(&script, crate::db::PGBENCH_INSERT)?;
    let pgbench = find_program("pgbench", DEBIAN_DIRS, "postgresql")?;
    let mut rates = Vec::new();
    for &n in clients {
        let mut command = tokio::process::Command::new(&pgbench);
        command
            .args(["-n", "-M", "prepared", "-j", "2", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &postgres.port().to_string()])
            .args(["-c", &n.to_string(), "-T", &secs.to_string(), "-f"])
            .arg(&script)
            .arg("pgbench")
            // In the environment, not on the command line other users can read.
            .env("PGPASSWORD", postgres.password());
        let text = super::output_of("pgbench", &mut command).await?;
        let (per_sec, latency_ms) = parse(&text).with_context(|| format!("cannot read pgbench's report:\n{text}"))?;
        rates.push(InsertRate {
            clients: n,
            per_sec,
            latency_ms,
        });
    }
    Ok(rates)
}

/// `tps = 10650.12 (without initial connection time)` and `latency average = 0.751 ms`.
fn parse(text: &str) -> anyhow::Result<(f64, f64)> {
    let number_after = |prefix: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .with_context(|| format!("no `{prefix}` line"))?;
        let number = line[prefix.len()..].split_whitespace().next().context("no number")?;
        Ok(number.parse()?)
    };
    Ok((number_after("tps = ")?, number_after("latency average = ")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_tps_and_latency() {
        let text = "number of transactions actually processed: 106502\nlatency average = 0.751 ms\ninitial connection time = 12.3 ms\ntps = 10650.123456 (without initial connection time)\n";
        assert_eq!(super::parse(text).unwrap(), (10650.123456, 0.751));
    }
}
