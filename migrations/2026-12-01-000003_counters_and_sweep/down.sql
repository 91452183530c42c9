DROP TABLE page_view_counts;
DROP INDEX page_views_unprocessed;
-- The old sweep publishes rows without enqueued_at: the unprocessed ones.
ALTER TABLE page_views ADD COLUMN enqueued_at TIMESTAMPTZ;
UPDATE page_views SET enqueued_at = processed_at WHERE processed_at IS NOT NULL;
CREATE INDEX page_views_unconfirmed ON page_views (id) WHERE enqueued_at IS NULL;
