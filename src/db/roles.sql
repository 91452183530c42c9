-- The database and its three login roles, created where missing; run by a superuser on the
-- `postgres` database of a cluster that nixpkgs' ensureDatabases/ensureUsers do not set up
-- (the Patroni cluster of services.pageviews.database.ha), before setup.sql. Idempotent.
--
--   psql -d postgres -v db=DB -v owner=OWNER -v app=APP -v worker=WORKER -f roles.sql

\set ON_ERROR_STOP on
SET client_min_messages = warning;

SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE', role)
FROM unnest(ARRAY[:'owner', :'app', :'worker']::name[]) AS role
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) \gexec

-- The owner owns the database (it runs the migrations), as ensureDBOwnership makes it.
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'owner') \gexec
