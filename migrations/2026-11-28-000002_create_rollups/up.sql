-- Page views per minute, written by the worker's scheduled job and shown on the page.
CREATE TABLE page_view_rollups (
    minute      TIMESTAMPTZ PRIMARY KEY,
    views       BIGINT NOT NULL,
    computed_at TIMESTAMPTZ NOT NULL
);

-- One row per scheduled job: the row lock and `last_run_at` make each job run once per
-- interval however many workers are running.
CREATE TABLE scheduled_jobs (
    name        TEXT PRIMARY KEY,
    last_run_at TIMESTAMPTZ,
    runs        BIGINT NOT NULL DEFAULT 0
);

INSERT INTO scheduled_jobs (name) VALUES ('rollup');
