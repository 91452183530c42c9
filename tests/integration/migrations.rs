//! Every migration applies, reverts (each `down.sql`) and applies again.

use crate::support::{TestEnv, binaries};

#[tokio::test(flavor = "multi_thread")]
async fn migrations_go_up_down_and_up_again() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let tables = "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public' \
                  AND tablename IN ('page_views', 'page_view_rollups', 'scheduled_jobs', 'page_view_counts')";
    // Two processes starting at once: the advisory lock serialises them.
    let mut first = binaries().app_command();
    let mut second = binaries().app_command();
    let a = first.arg("migrate").env("DATABASE_URL", &env.urls.database).spawn()?;
    let b = second.arg("migrate").env("DATABASE_URL", &env.urls.database).spawn()?;
    assert!(a.wait_with_output()?.status.success() && b.wait_with_output()?.status.success());
    assert_eq!(env.sql_count(tables).await?, 4);

    let reverted = pageviews::db::revert_all(&env.urls.database).await?;
    let embedded = diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&pageviews::db::MIGRATIONS)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(reverted.len(), embedded.len(), "{reverted:?}");
    assert_eq!(env.sql_count(tables).await?, 0);

    env.migrate()?;
    assert_eq!(env.sql_count(tables).await?, 4);
    assert_eq!(
        env.sql_count("SELECT count(*) AS n FROM scheduled_jobs WHERE name = 'rollup'")
            .await?,
        1
    );
    Ok(())
}
