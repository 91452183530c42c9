-- The database's access rules, run by a superuser after the database, its owner and the two
-- login roles exist, before and after any migration; idempotent. The NixOS module runs it on
-- every start of postgresql-setup (after nixpkgs' ensureDatabases/ensureUsers); the tests run
-- this same file.
--
--   psql -d DB -v db=DB -v owner=OWNER -v app=APP -v worker=WORKER -f setup.sql
--
-- With `-v passwords=1` it also sets the three roles' passwords from the SCRAM-SHA-256
-- verifiers in the environment variables PAGEVIEWS_OWNER_VERIFIER, PAGEVIEWS_APP_VERIFIER and
-- PAGEVIEWS_WORKER_VERIFIER (`pageviews-app scram-verifier < password-file`): the server
-- stores a verifier as it is, so the password never reaches it (nor pg_stat_activity or the
-- log), and the environment keeps the verifiers out of argv.
--
-- What the runtime roles may do is the list in pageviews_setup.grant_runtime() below (the one
-- place; migrations/README.md explains each line).

\set ON_ERROR_STOP on
SET client_min_messages = warning;
BEGIN;

-- Only the runtime roles connect (the owner owns the database); nobody makes temporary tables.
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"app", :"worker";

-- Only the owner creates objects (the migrations). On PostgreSQL 14 and older `public`
-- belongs to the bootstrap superuser and the database owner could create there only as a
-- member of PUBLIC, so the explicit grant is what keeps migrations working after the revoke
-- (from 15 on the owner holds it already, through pg_database_owner).
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"owner";
GRANT USAGE ON SCHEMA public TO :"app", :"worker";

-- Earlier versions of this setup granted SELECT, INSERT, UPDATE on every table the owner
-- would create; tables now get exactly the grants below.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public REVOKE ALL ON TABLES FROM :"app", :"worker";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public REVOKE ALL ON SEQUENCES FROM :"app", :"worker";

-- Grants on tables need the tables, which the migrations create later (and on a first boot
-- after this has run), so they are a function that runs now and after every statement that
-- creates or alters a table (the event trigger below). Default privileges cannot do it: they
-- grant the same privileges on every table, never on columns. The schema belongs to the
-- superuser, so neither the owner nor the runtime roles can change what is in it.
CREATE SCHEMA IF NOT EXISTS pageviews_setup;
REVOKE ALL ON SCHEMA pageviews_setup FROM PUBLIC;

-- The role names travel as settings of the function, the one place psql can put them into
-- its definition.
CREATE OR REPLACE FUNCTION pageviews_setup.grant_runtime() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET pageviews.app_role = :'app'
SET pageviews.worker_role = :'worker'
AS $$
DECLARE
    app text := current_setting('pageviews.app_role');
    worker text := current_setting('pageviews.worker_role');
    statement text;
BEGIN
    -- Everything else is taken away: a table a migration creates starts with no grant, and
    -- neither role can touch diesel's __diesel_schema_migrations.
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I, %I', app, worker);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM %I, %I', app, worker);
    -- %1$I is the app, %2$I the worker. Each line is what the SQL in src/db/ needs.
    FOREACH statement IN ARRAY ARRAY[
        -- app: records page views (INSERT … RETURNING id), answers /visits/{id}, sweeps
        -- unprocessed rows; never reads the stored request data.
        'GRANT INSERT (data), SELECT (id, created_at, processed_at) ON public.page_views TO %1$I',
        'GRANT USAGE ON SEQUENCE public.page_views_id_seq TO %1$I',
        -- worker: locks and marks rows processed, counts them per minute.
        'GRANT SELECT (id, created_at, processed_at), UPDATE (processed_at) ON public.page_views TO %2$I',
        -- The counters are kept by triggers on page_views that run as the owner (migrations/
        -- …_counts_by_triggers), which ignore any other UPDATE of them. Each role keeps UPDATE
        -- on its own column only so that the previous release, which still adds its own counts,
        -- does not fail during a rolling deploy.
        'GRANT SELECT (shard, recorded, processed), UPDATE (recorded) ON public.page_view_counts TO %1$I',
        'GRANT SELECT (shard, processed), UPDATE (processed) ON public.page_view_counts TO %2$I',
        -- The rollup: the worker claims the job row and upserts the minutes (ON CONFLICT …
        -- EXCLUDED reads every column); the app reads them.
        'GRANT SELECT (name, last_run_at, runs), UPDATE (last_run_at, runs) ON public.scheduled_jobs TO %2$I',
        'GRANT SELECT (minute, views, computed_at), INSERT (minute, views, computed_at), UPDATE (views, computed_at) ON public.page_view_rollups TO %2$I',
        'GRANT SELECT (minute, views) ON public.page_view_rollups TO %1$I',
        -- Retention: the worker deletes old processed rows only through this function
        -- (migrations/…_retention), never with a DELETE of its own.
        'GRANT EXECUTE ON FUNCTION public.expire_page_views(timestamptz, integer) TO %2$I'
    ] LOOP
        BEGIN
            EXECUTE format(statement, app, worker);
        EXCEPTION WHEN undefined_table OR undefined_column OR undefined_function THEN
            -- Not created yet (a migration still to run): granted when it is.
            NULL;
        END;
    END LOOP;
END
$$;

-- Runs as its owner (the superuser running this file), whoever's DDL fires it: the owner
-- running migrations has no access to this schema.
CREATE OR REPLACE FUNCTION pageviews_setup.grant_after_ddl() RETURNS event_trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pageviews_setup.grant_runtime();
END
$$;
REVOKE ALL ON FUNCTION pageviews_setup.grant_runtime() FROM PUBLIC;
REVOKE ALL ON FUNCTION pageviews_setup.grant_after_ddl() FROM PUBLIC;

-- Not on GRANT or REVOKE (the function's own statements), nor on DROP.
DROP EVENT TRIGGER IF EXISTS pageviews_grants;
CREATE EVENT TRIGGER pageviews_grants ON ddl_command_end
WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'CREATE SEQUENCE', 'ALTER SEQUENCE', 'CREATE FUNCTION')
EXECUTE PROCEDURE pageviews_setup.grant_after_ddl();

DO $$ BEGIN PERFORM pageviews_setup.grant_runtime(); END $$;

\if :{?passwords}
-- Anything but a verifier is refused (an empty one would clear the password), without being
-- shown.
CREATE FUNCTION pg_temp.set_verifier(role name, verifier text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF verifier !~ '^SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/]+=*\$[A-Za-z0-9+/]+=*:[A-Za-z0-9+/]+=*$' THEN
        RAISE EXCEPTION 'the password for role % is not a SCRAM-SHA-256 verifier (pageviews-app scram-verifier makes one)', role;
    END IF;
    EXECUTE format('ALTER ROLE %I PASSWORD %L', role, verifier);
END
$$;
\set owner_verifier `printf '%s' "$PAGEVIEWS_OWNER_VERIFIER"`
\set app_verifier `printf '%s' "$PAGEVIEWS_APP_VERIFIER"`
\set worker_verifier `printf '%s' "$PAGEVIEWS_WORKER_VERIFIER"`
\o /dev/null
SELECT pg_temp.set_verifier(:'owner', :'owner_verifier');
SELECT pg_temp.set_verifier(:'app', :'app_verifier');
SELECT pg_temp.set_verifier(:'worker', :'worker_verifier');
\o
\endif

COMMIT;
