//! What synchronous replication costs: `GET /` through nginx + TLS at the target step's
//! concurrency on a second deployment whose database is a durable three-node Patroni cluster
//! (etcd, one synchronous standby, as nix/modules/database-ha.nix runs it), against the
//! single primary's figure of the same run. Every node, etcd, the stack and wrk share this
//! machine, so the ratio is the cost of a commit waiting for a standby's flush on the same
//! CPUs and disk, not across a network.

use super::{Figure, Settings, TARGET_STEP, raised_nginx_limits, step, warm_up};
use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use pageviews_testbed::patroni::{Options, PatroniCluster};
use pageviews_testbed::{Binaries, Deployment, Stack, Urls};
use std::path::Path;

const NODES: usize = 3;
const KEY: &str = "sync_replication";
const NAME: &str = "sync replication (3 Patroni nodes, one machine), nginx+TLS";
const SKIP: &str = "PAGEVIEWS_BENCH_REPLICATION=0 skips this step";

/// The cluster and the deployment on it.
struct Replicated {
    deployment: Deployment,
    cluster: PatroniCluster,
    database: String,
}

/// Starts the cluster and a deployment on it, runs the step and stops them again, so that
/// the later steps run on a machine without them. `figures` holds the single primary's.
pub(crate) async fn measure(
    settings: &Settings,
    dir: &Path,
    stack: &Stack,
    figures: &[Figure],
    consume_limit: f64,
) -> anyhow::Result<Vec<Figure>> {
    let (_, c) = TARGET_STEP;
    let primary = single_primary_rate(figures);
    let replicated = start(&dir.join("replication"), stack).await?;
    let page = replicated.deployment.https_url("/");
    let mut db = AsyncPgConnection::establish(&replicated.database).await?;
    warm_up(&mut db, &page).await?;
    eprintln!(
        "GET / nginx+TLS on synchronous replication, {c} connections, {} s",
        settings.secs
    );
    let measured = step(&mut db, &page, c, settings.secs, None).await?;
    drop(db);
    stop(replicated).await;
    Ok(measured.figures(KEY, NAME, c, ("single primary", primary), consume_limit))
}

/// The single primary's `GET /` rate at the target step, measured earlier in this run (0, so
/// no ratio, when the run's concurrencies left that step out).
fn single_primary_rate(figures: &[Figure]) -> f64 {
    let (key, c) = TARGET_STEP;
    let wanted = format!("{key}.c{c}.requests_per_sec");
    figures.iter().find(|f| f.key == wanted).map_or(0.0, |f| f.value)
}

/// A durable Patroni cluster, then app, worker and nginx (limits raised as for the stack) on
/// it and on a vhost of the stack's broker.
async fn start(dir: &Path, stack: &Stack) -> anyhow::Result<Replicated> {
    pageviews_testbed::private_dir(dir)?;
    eprintln!("synchronous replication: starting etcd and {NODES} Patroni nodes");
    let options = Options {
        durable: true,
        strict: false,
    };
    let cluster = PatroniCluster::start(&dir.join("patroni"), NODES, options)
        .await
        .with_context(|| format!("cannot start the Patroni cluster ({SKIP})"))?;
    let urls = Urls {
        database: cluster.create_database("pageviews").await?,
        amqp: stack.brokers.create_vhost("replication")?,
    };
    eprintln!("synchronous replication: starting app, worker and nginx on the cluster");
    let binaries = Binaries::this_executable()?;
    let deployment = Deployment::start(dir, &binaries, &urls, raised_nginx_limits()?, &[], &[]).await?;
    Ok(Replicated {
        deployment,
        cluster,
        database: urls.database,
    })
}

/// Stops the deployment, then each node as `systemctl stop patroni` does, the standbys before
/// the leader so that none of them tries to take over (dropping the cluster signals all nodes
/// at once, and the standbys then outlived the 15 s grace), then etcd.
async fn stop(replicated: Replicated) {
    let Replicated {
        deployment,
        mut cluster,
        ..
    } = replicated;
    drop(deployment);
    let leader = cluster.leader().await.ok();
    let order = (0..cluster.nodes.len()).filter(|i| Some(*i) != leader).chain(leader);
    for i in order {
        cluster.nodes[i].stop().await;
    }
}
