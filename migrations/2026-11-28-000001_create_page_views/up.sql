-- One row per `GET /`. `enqueued_at` is set once the broker has confirmed the task; rows
-- where it is still NULL are re-published by the app's sweep, so a broker outage loses nothing.
CREATE TABLE page_views (
    id          BIGSERIAL PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    data        JSONB NOT NULL,
    enqueued_at TIMESTAMPTZ,
    processed_at TIMESTAMPTZ
);

-- The sweep's lookup; stays small because confirmed rows leave it.
CREATE INDEX page_views_unconfirmed ON page_views (id) WHERE enqueued_at IS NULL;
-- Rollups read recent rows by time.
CREATE INDEX page_views_created_at ON page_views (created_at);
