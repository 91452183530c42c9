//! The NixOS module's database and broker setup, run for real: the files nix/modules/data.nix
//! runs (src/db/setup.sql, src/queue/rabbitmq-setup.sh), against throwaway servers, the way
//! NixOS runs them: after nixpkgs' ensureDatabases/ensureUsers, twice (every boot runs them
//! again), with passwords from files. Then the migrations as the owner role and the app and
//! the worker as their own roles and broker users, end to end; then every statement and broker
//! operation a role must not do is refused.

use crate::support::{TestEnv, binaries, client};
use pageviews_testbed::activation::ListenSocket;
use pageviews_testbed::process::{find_program, wait_until};
use pageviews_testbed::{self as stack, Urls};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio_postgres::error::SqlState;

const SETUP_SQL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/db/setup.sql");
const RABBITMQ_SETUP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/queue/rabbitmq-setup.sh");

/// The `public` schema and grants the setup meets.
#[derive(Clone, Copy, PartialEq)]
enum Before {
    /// PostgreSQL 15 and later: `public` belongs to the database owner (pg_database_owner).
    Pg15,
    /// PostgreSQL 14 and older: `public` belongs to the bootstrap superuser, and PUBLIC may
    /// create in it.
    Pg14,
}

/// A login role and the file its password is in (with a trailing newline, as
/// `openssl rand -hex 32 > file` writes it).
struct Role {
    name: String,
    password: String,
    file: PathBuf,
}

impl Role {
    /// `service`: "db" or "amqp" (the same names are used on both, as on NixOS).
    fn new(dir: &Path, service: &str, name: String) -> anyhow::Result<Role> {
        let password = stack::generate_password()?;
        let file = dir.join(format!("{service}-{name}.password"));
        stack::write_private(&file, format!("{password}\n"))?;
        Ok(Role { name, password, file })
    }
}

/// A database set up as the module sets it up.
struct Database {
    name: String,
    owner: Role,
    app: Role,
    worker: Role,
}

impl Database {
    fn url(&self, env: &TestEnv, role: &Role) -> String {
        let port = env.services().postgres.port();
        format!(
            "postgres://{}:{}@127.0.0.1:{port}/{}",
            role.name, role.password, self.name
        )
    }

    /// nixpkgs' ensureDatabases and ensureUsers (with ensureDBOwnership and the LOGIN clause),
    /// as the superuser; then `before`.
    async fn create(env: &TestEnv, before: Before) -> anyhow::Result<Database> {
        let dir = env.dir.path();
        let prefix = &env.vhost;
        let db = Database {
            name: format!("{prefix}_nixos"),
            owner: Role::new(dir, "db", format!("{prefix}-owner"))?,
            app: Role::new(dir, "db", format!("{prefix}-app"))?,
            worker: Role::new(dir, "db", format!("{prefix}-worker"))?,
        };
        let admin = connect(&env.services().postgres.admin_url()).await?;
        admin
            .batch_execute(&format!(r#"CREATE DATABASE "{}""#, db.name))
            .await?;
        for role in [&db.owner, &db.app, &db.worker] {
            admin
                .batch_execute(&format!(r#"CREATE ROLE "{0}"; ALTER ROLE "{0}" LOGIN"#, role.name))
                .await?;
        }
        admin
            .batch_execute(&format!(r#"ALTER DATABASE "{}" OWNER TO "{}""#, db.name, db.owner.name))
            .await?;
        if before == Before::Pg14 {
            db.as_superuser(env)
                .await?
                .batch_execute("ALTER SCHEMA public OWNER TO postgres; GRANT CREATE, USAGE ON SCHEMA public TO PUBLIC")
                .await?;
        }
        Ok(db)
    }

    async fn as_superuser(&self, env: &TestEnv) -> anyhow::Result<tokio_postgres::Client> {
        let mut url = url::Url::parse(&env.services().postgres.admin_url())?;
        url.set_path(&format!("/{}", self.name));
        connect(url.as_str()).await
    }

    /// As on every boot: the second run must change nothing and fail nothing.
    async fn setup_twice(&self, env: &TestEnv) -> anyhow::Result<()> {
        self.setup(env).await?;
        self.setup(env).await
    }

    /// src/db/setup.sql as postgresql-setup runs it.
    async fn setup(&self, env: &TestEnv) -> anyhow::Result<()> {
        let command = self.setup_command(env).await?;
        run("setup.sql", command, Duration::from_secs(60)).await.map(drop)
    }

    /// psql as the superuser on setup.sql, the passwords as SCRAM-SHA-256 verifiers that
    /// `pageviews-app scram-verifier` made from the files. Every statement goes to the server
    /// log.
    async fn setup_command(&self, env: &TestEnv) -> anyhow::Result<Command> {
        let pg = &env.services().postgres;
        let psql = find_program("psql", stack::postgres::DEBIAN_DIRS, "postgresql")?;
        let mut command = Command::new(psql);
        command
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port().to_string())
            .env("PGUSER", "postgres")
            .env("PGPASSWORD", pg.password())
            .env("PGOPTIONS", "-c log_statement=all")
            .args(["-X", "-d", &self.name])
            .args(["-v", &format!("db={}", self.name)])
            .args(["-v", &format!("owner={}", self.owner.name)])
            .args(["-v", &format!("app={}", self.app.name)])
            .args(["-v", &format!("worker={}", self.worker.name)])
            .args(["-v", "passwords=1", "-f", SETUP_SQL]);
        for (who, role) in [("OWNER", &self.owner), ("APP", &self.app), ("WORKER", &self.worker)] {
            command.env(format!("PAGEVIEWS_{who}_VERIFIER"), scram_verifier(&role.file).await?);
        }
        Ok(command)
    }
}

/// `pageviews-app scram-verifier < file`
async fn scram_verifier(file: &Path) -> anyhow::Result<String> {
    let mut command = binaries().app_command();
    command.arg("scram-verifier").stdin(std::fs::File::open(file)?);
    let stdout = run("scram-verifier", command, Duration::from_secs(10)).await?;
    Ok(stdout.trim_end().to_owned())
}

/// Runs `command` to its end within `limit` (killed past it); its stdout, or an error with its
/// output when it fails.
async fn run(what: &str, command: Command, limit: Duration) -> anyhow::Result<String> {
    let output = tokio::process::Command::from(command).kill_on_drop(true).output();
    let output = tokio::time::timeout(limit, output)
        .await
        .map_err(|_| anyhow::anyhow!("{what} did not finish within {limit:?}"))??;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}): {stdout}{stderr}",
        output.status
    );
    Ok(stdout.into_owned())
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Runs each statement as `role` (each in a transaction rolled back, in case it is not
/// refused) and returns a line for each one that is not refused for lack of privilege.
async fn not_refused(url: &str, role: &str, statements: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut client = connect(url).await?;
    let mut wrong = Vec::new();
    for statement in statements {
        let tx = client.transaction().await?;
        match tx.batch_execute(statement).await {
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
            Err(e) => wrong.push(format!("{role}: {statement}: {e} (not a privilege error)")),
            Ok(()) => wrong.push(format!("{role}: {statement}: allowed")),
        }
        tx.rollback().await.ok();
    }
    Ok(wrong)
}

/// What neither runtime role may do: DDL, temporary tables, diesel's bookkeeping, the job
/// table's rows, deleting anything, reading the stored request data, the setup's own schema.
const FORBIDDEN_TO_BOTH: &[&str] = &[
    "UPDATE __diesel_schema_migrations SET run_on = now()",
    "INSERT INTO __diesel_schema_migrations (version) VALUES ('99999999999999')",
    "DELETE FROM __diesel_schema_migrations",
    "INSERT INTO scheduled_jobs (name) VALUES ('another')",
    "DELETE FROM scheduled_jobs",
    "DELETE FROM page_views",
    "TRUNCATE page_views",
    "UPDATE page_views SET data = '{}'",
    "SELECT data FROM page_views",
    "DELETE FROM page_view_counts",
    "DELETE FROM page_view_rollups",
    "CREATE TABLE intruder (x int)",
    "CREATE TEMP TABLE intruder (x int)",
    "ALTER TABLE page_views ADD COLUMN intruder int",
    "DROP TABLE page_view_rollups",
    "CREATE INDEX ON page_views (processed_at)",
    "SELECT setval('page_views_id_seq', 1)",
    "SELECT pageviews_setup.grant_runtime()",
];

const FORBIDDEN_TO_APP: &[&str] = &[
    "UPDATE scheduled_jobs SET last_run_at = 'infinity'",
    "UPDATE page_views SET processed_at = now()",
    "INSERT INTO page_views (data, processed_at) VALUES ('{}', now())",
    "INSERT INTO page_views (id, data) VALUES (1000000, '{}')",
    "UPDATE page_view_counts SET processed = processed + 1",
    "INSERT INTO page_view_rollups (minute, views, computed_at) VALUES (now(), 1, now())",
    "UPDATE page_view_rollups SET views = 0",
    "SELECT expire_page_views(now() - interval '2 days', 10)",
];

const FORBIDDEN_TO_WORKER: &[&str] = &[
    "INSERT INTO page_views (data) VALUES ('{}')",
    "SELECT nextval('page_views_id_seq')",
    "UPDATE page_views SET created_at = now()",
    "UPDATE page_view_counts SET recorded = recorded + 1",
    "UPDATE scheduled_jobs SET name = 'renamed'",
];

/// Every forbidden statement as each runtime role: all refused.
async fn assert_least_privilege(env: &TestEnv, db: &Database) -> anyhow::Result<()> {
    let mut wrong = Vec::new();
    for (role, own) in [(&db.app, FORBIDDEN_TO_APP), (&db.worker, FORBIDDEN_TO_WORKER)] {
        let statements: Vec<&str> = FORBIDDEN_TO_BOTH.iter().chain(own).copied().collect();
        wrong.extend(not_refused(&db.url(env, role), &role.name, &statements).await?);
    }
    assert!(wrong.is_empty(), "not refused:\n{}", wrong.join("\n"));
    Ok(())
}

/// Migrations as the owner, then the app and the worker as their roles: a page view is
/// recorded, published, processed and rolled up, one the app never published is found by the
/// sweep, and the page shows the figures. `amqp`: the app's and the worker's broker URLs.
async fn assert_pipeline_runs(env: &TestEnv, db: &Database, amqp: (&str, &str)) -> anyhow::Result<()> {
    let owner = Urls {
        database: db.url(env, &db.owner),
        amqp: String::new(),
    };
    stack::migrate(&binaries(), &owner, &env.log("migrate"))?;
    let socket = ListenSocket::loopback()?;
    let app_urls = Urls {
        database: db.url(env, &db.app),
        amqp: amqp.0.to_owned(),
    };
    let fast_sweep = [("PAGEVIEWS_SWEEP_INTERVAL_SECS", "1".to_owned())];
    let _app = stack::start_app(&binaries(), &app_urls, &socket, &fast_sweep, &env.log("app")).await?;
    let worker_urls = Urls {
        database: db.url(env, &db.worker),
        amqp: amqp.1.to_owned(),
    };
    let fast_rollup = [
        ("PAGEVIEWS_ROLLUP_INTERVAL_SECS", "1".to_owned()),
        ("PAGEVIEWS_RETENTION_DAYS", "1".to_owned()),
    ];
    let _worker = stack::start_worker(&binaries(), &worker_urls, &fast_rollup, &env.log("worker")).await?;

    let url = |path: &str| format!("http://127.0.0.1:{}{path}", socket.port());
    let page = client().get(url("/")).send().await?.error_for_status()?.text().await?;
    assert!(page.contains(r#"<strong id="visit">#1</strong>"#), "{page}");
    // A row whose task was lost: only the app's sweep offers it.
    let admin = db.as_superuser(env).await?;
    admin
        .batch_execute("INSERT INTO page_views (created_at, data) VALUES (now() - interval '1 minute', '{}')")
        .await?;
    wait_until(
        "both page views processed and rolled up",
        Duration::from_secs(60),
        || async {
            let row = admin
                .query_one(
                    "SELECT (SELECT count(*) FROM page_views WHERE processed_at IS NOT NULL) AS processed, \
                        (SELECT COALESCE(sum(views), 0)::bigint FROM page_view_rollups) AS rolled_up",
                    &[],
                )
                .await?;
            let (processed, rolled_up): (i64, i64) = (row.get(0), row.get(1));
            anyhow::ensure!(
                processed == 2 && rolled_up == 2,
                "{processed} processed, {rolled_up} rolled up"
            );
            Ok(())
        },
    )
    .await?;
    // Retention, as the worker (EXECUTE on expire_page_views, no DELETE): a processed row two
    // days old goes.
    admin
        .batch_execute(
            "INSERT INTO page_views (created_at, data, processed_at) VALUES (now() - interval '2 days', '{}', now())",
        )
        .await?;
    wait_until("the old row deleted by retention", Duration::from_secs(30), || async {
        let old: i64 = admin
            .query_one(
                "SELECT count(*) FROM page_views WHERE created_at < now() - interval '1 day'",
                &[],
            )
            .await?
            .get(0);
        anyhow::ensure!(old == 0, "{old} left");
        Ok(())
    })
    .await?;
    let visit = client().get(url("/visits/1")).send().await?.text().await?;
    assert_eq!(visit, r#"{"id":1,"processed":true}"#);
    let page = client().get(url("/")).send().await?.error_for_status()?.text().await?;
    assert!(!page.contains("figures-unavailable"), "{page}");
    for log in ["migrate", "app", "worker"] {
        let text = env.log_text(log);
        assert!(!text.contains("permission denied"), "{log}:\n{text}");
    }
    Ok(())
}

/// The passwords reached the server only as verifiers: with every statement logged, none
/// appears in the server log; the roles log in with them all the same (the pipeline did).
fn assert_no_password_logged(env: &TestEnv, db: &Database) -> anyhow::Result<()> {
    let log = std::fs::read_to_string(env.services().postgres.log())?;
    let statement = format!(r#"REVOKE ALL ON DATABASE "{}" FROM PUBLIC"#, db.name);
    assert!(
        log.contains(&statement),
        "the setup's statements are not in the server log"
    );
    for role in [&db.owner, &db.app, &db.worker] {
        assert!(
            !log.contains(&role.password),
            "{}'s password is in the server log",
            role.name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_modules_database_setup_runs_the_pipeline_with_exact_grants() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let db = Database::create(&env, Before::Pg15).await?;
    db.setup_twice(&env).await?;
    assert_no_password_logged(&env, &db)?;
    let broker = Broker::setup(&env).await?;
    broker.assert_least_privilege(&env)?;
    assert_pipeline_runs(
        &env,
        &db,
        (&broker.url(&env, &broker.app), &broker.url(&env, &broker.worker)),
    )
    .await?;
    assert_admin_runs(&env, &db, &broker).await?;
    assert_least_privilege(&env, &db).await?;
    Ok(())
}

/// `pageviews-app admin` with the services' own database roles and broker users: listing
/// with either, requeueing with the app's (the worker's may not publish tasks).
async fn assert_admin_runs(env: &TestEnv, db: &Database, broker: &Broker) -> anyhow::Result<()> {
    let worker_amqp = broker.url(env, &broker.worker);
    let dead_letter = worker_amqp.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let (connection, channel) = pageviews::queue::open(&dead_letter, pageviews::config::QueueType::Quorum)?;
        let body = br#"{"v": 2, "page_view_ids": [1]}"#;
        channel.basic_publish("pageviews.dead", amiquip::Publish::new(body, ""))?;
        channel.queue_declare_passive("pageviews.dead")?;
        connection.close()?;
        Ok(())
    })
    .await??;
    let admin = |role: &Role, amqp: &str, args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pageviews-app"));
        command
            .arg("admin")
            .args(args)
            .env("DATABASE_URL", db.url(env, role))
            .env("AMQP_URL", amqp)
            .env("PAGEVIEWS_QUEUE_TYPE", "quorum");
        run("pageviews-app admin", command, Duration::from_secs(90))
    };
    let listed = admin(&db.worker, &worker_amqp, &["dead-letters"]).await?;
    assert!(
        // And the one the privilege check published.
        listed.contains("2 dead letters in pageviews.dead; 2 listed")
            && listed.contains("every page view it names is processed"),
        "{listed}"
    );
    let app_amqp = broker.url(env, &broker.app);
    let requeued = admin(&db.app, &app_amqp, &["requeue", "--all"]).await?;
    assert!(requeued.contains("2 of 2 dead letters requeued"), "{requeued}");
    let status = admin(&db.app, &app_amqp, &["status"]).await?;
    assert!(
        status.contains("database: ok") && status.contains("broker: ok"),
        "{status}"
    );
    Ok(())
}

/// PostgreSQL 14 and older (which NixOS hosts from 22.05 to 23.05 keep): `public` is not the
/// owner's, so migrations could create tables only through PUBLIC's CREATE, which the setup
/// takes away.
#[tokio::test(flavor = "multi_thread")]
async fn the_modules_database_setup_works_with_postgresql_14_schema_rights() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let db = Database::create(&env, Before::Pg14).await?;
    db.setup_twice(&env).await?;
    // The testbed's broker user: the broker setup is the other test's.
    assert_pipeline_runs(&env, &db, (&env.urls.amqp, &env.urls.amqp)).await?;
    assert_least_privilege(&env, &db).await?;

    // A missing verifier (the verifier step failed) stops the setup with the role named and
    // changes nothing: the app still logs in with its password.
    let mut command = db.setup_command(&env).await?;
    command.env("PAGEVIEWS_APP_VERIFIER", "");
    let error = run("setup.sql", command, Duration::from_secs(60)).await.unwrap_err();
    let expected = format!("the password for role {} is not a SCRAM-SHA-256 verifier", db.app.name);
    assert!(format!("{error:#}").contains(&expected), "{error:#}");
    connect(&db.url(&env, &db.app)).await?;
    Ok(())
}

/// A host the earlier module set up (SELECT, INSERT, UPDATE on every table, and by default on
/// every future one) has exactly the new grants once the setup runs, before and after another
/// migration.
#[tokio::test(flavor = "multi_thread")]
async fn the_modules_database_setup_takes_back_the_earlier_broad_grants() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let db = Database::create(&env, Before::Pg15).await?;
    let runtime = format!(r#""{}", "{}""#, db.app.name, db.worker.name);
    let owner = &db.owner.name;
    db.as_superuser(&env)
        .await?
        .batch_execute(&format!(
            r#"GRANT CONNECT ON DATABASE "{name}" TO {runtime};
               GRANT USAGE ON SCHEMA public TO {runtime};
               ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public GRANT SELECT, INSERT, UPDATE ON TABLES TO {runtime};
               ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {runtime};"#,
            name = db.name
        ))
        .await?;
    let owner_urls = Urls {
        database: db.url(&env, &db.owner),
        amqp: String::new(),
    };
    let verifier = scram_verifier(&db.owner.file).await?;
    let admin = db.as_superuser(&env).await?;
    admin
        .batch_execute(&format!(r#"ALTER ROLE "{owner}" PASSWORD '{verifier}'"#))
        .await?;
    stack::migrate(&binaries(), &owner_urls, &env.log("migrate-before"))?;
    db.setup(&env).await?;
    assert_least_privilege(&env, &db).await?;
    // A table a later migration makes starts with no grant (the default privileges are gone).
    let owner_client = connect(&db.url(&env, &db.owner)).await?;
    owner_client.batch_execute("CREATE TABLE later (x int)").await?;
    for role in [&db.app, &db.worker] {
        let wrong = not_refused(
            &db.url(&env, role),
            &role.name,
            &["SELECT x FROM later", "INSERT INTO later VALUES (1)"],
        )
        .await?;
        assert!(wrong.is_empty(), "{wrong:?}");
    }
    Ok(())
}

/// The broker side: a vhost and two users made by src/queue/rabbitmq-setup.sh.
struct Broker {
    vhost: String,
    app: Role,
    worker: Role,
}

impl Broker {
    /// The script twice (every boot runs it), with guest present the first time.
    async fn setup(env: &TestEnv) -> anyhow::Result<Broker> {
        let rabbitmq = &env.services().rabbitmq;
        let dir = env.dir.path();
        let prefix = &env.vhost;
        let broker = Broker {
            vhost: format!("{prefix}-nixos"),
            app: Role::new(dir, "amqp", format!("{prefix}-app"))?,
            worker: Role::new(dir, "amqp", format!("{prefix}-worker"))?,
        };
        rabbitmq.ctl(&["add_user", "guest", "guest"])?;
        for _ in 0..2 {
            let mut command = rabbitmq.ctl_command("sh");
            command
                .arg(RABBITMQ_SETUP)
                .arg(rabbitmq.ctl_path())
                .args([&broker.vhost, &broker.app.name])
                .arg(&broker.app.file)
                .arg(&broker.worker.name)
                .arg(&broker.worker.file);
            // About a dozen rabbitmqctl runs, each starting an Erlang VM.
            run("rabbitmq-setup.sh", command, Duration::from_secs(300)).await?;
        }
        let users = rabbitmq.ctl(&["list_users", "--quiet", "--no-table-headers"])?;
        assert!(!users.lines().any(|l| l.starts_with("guest\t")), "{users}");
        Ok(broker)
    }

    fn url(&self, env: &TestEnv, user: &Role) -> String {
        let port = env.services().rabbitmq.port();
        format!("amqp://{}:{}@127.0.0.1:{port}/{}", user.name, user.password, self.vhost)
    }

    /// What each user needs is allowed; what it may not do is refused (ACCESS_REFUSED, the
    /// channel closed).
    fn assert_least_privilege(&self, env: &TestEnv) -> anyhow::Result<()> {
        use amiquip::{ExchangeDeclareOptions, ExchangeType, Publish, QueueDeclareOptions};
        type Attempt = fn(&amiquip::Channel) -> amiquip::Result<()>;
        // A refused publish closes the channel; the next call reports it.
        let publish_task: Attempt = |c| {
            c.basic_publish("pageviews", Publish::new(b"{}", "tasks"))?;
            c.queue_declare_passive("pageviews.tasks").map(drop)
        };
        let publish_dead_letter: Attempt = |c| {
            c.basic_publish("pageviews.dead", Publish::new(b"{}", ""))?;
            c.queue_declare_passive("pageviews.dead").map(drop)
        };
        let publish_default: Attempt = |c| {
            c.basic_publish("", Publish::new(b"{}", "pageviews.tasks"))?;
            c.queue_declare_passive("pageviews.tasks").map(drop)
        };
        let prefixed_queue: Attempt = |c| {
            c.queue_declare("pageviews.intruder", QueueDeclareOptions::default())
                .map(drop)
        };
        let other_queue: Attempt = |c| c.queue_declare("intruder", QueueDeclareOptions::default()).map(drop);
        let other_exchange: Attempt = |c| {
            c.exchange_declare(ExchangeType::Fanout, "intruder", ExchangeDeclareOptions::default())
                .map(drop)
        };
        let system_exchange: Attempt = |c| c.queue_bind("pageviews.dead", "amq.direct", "x", Default::default());
        let (app, worker) = (&self.app, &self.worker);
        let cases: Vec<(&Role, &str, Attempt, bool)> = vec![
            (app, "publish a task to `pageviews`", publish_task, true),
            (worker, "publish a dead letter", publish_dead_letter, true),
            (worker, "publish a task to `pageviews`", publish_task, false),
            (app, "publish to the default exchange", publish_default, false),
            (worker, "publish to the default exchange", publish_default, false),
            (app, "declare another queue", other_queue, false),
            (app, "declare pageviews.intruder", prefixed_queue, false),
            (worker, "declare pageviews.intruder", prefixed_queue, false),
            (worker, "declare another queue", other_queue, false),
            (app, "declare another exchange", other_exchange, false),
            (worker, "declare another exchange", other_exchange, false),
            (app, "bind to amq.direct", system_exchange, false),
            (worker, "bind to amq.direct", system_exchange, false),
        ];
        let mut wrong = Vec::new();
        for (user, what, attempt, allowed) in cases {
            // What the clients do at connect (declare the topology), with their timeouts.
            let (connection, channel) =
                pageviews::queue::open(&self.url(env, user), pageviews::config::QueueType::Quorum)?;
            match (attempt(&channel), allowed) {
                (Ok(()), true) | (Err(amiquip::Error::ServerClosedChannel { code: 403, .. }), false) => {}
                (Ok(()), false) => wrong.push(format!("{}: {what}: allowed", user.name)),
                (Err(e), _) => wrong.push(format!("{}: {what}: {e}", user.name)),
            }
            connection.close().ok();
        }
        assert!(wrong.is_empty(), "wrong:\n{}", wrong.join("\n"));
        Ok(())
    }
}
