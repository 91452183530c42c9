-- No per-row "enqueued" write: the app's sweep re-offers rows still unprocessed after a grace
-- period (which also recovers tasks the broker confirmed and lost later), found through a
-- partial index that holds only unprocessed rows. Dropping the column first takes the table
-- lock, so the counts below are exact even with an old app still writing.
ALTER TABLE page_views DROP COLUMN enqueued_at;
CREATE INDEX page_views_unprocessed ON page_views (id) WHERE processed_at IS NULL;

-- The page's figures without counting the table: the transactions that insert and process
-- page views add their batch's count to one of these rows (one UPDATE per batch). Several
-- rows, so concurrent batches rarely wait for each other's row lock; readers sum them.
CREATE TABLE page_view_counts (
    shard     SMALLINT PRIMARY KEY,
    recorded  BIGINT NOT NULL DEFAULT 0,
    processed BIGINT NOT NULL DEFAULT 0
);
INSERT INTO page_view_counts (shard) SELECT generate_series(0, 15);
UPDATE page_view_counts
SET recorded = (SELECT count(*) FROM page_views),
    processed = (SELECT count(processed_at) FROM page_views)
WHERE shard = 0;
