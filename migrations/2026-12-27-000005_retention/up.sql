-- Retention (PAGEVIEWS_RETENTION_DAYS): the worker's scheduled job deletes processed page
-- views older than N days, in small batches, through expire_page_views() below: the runtime
-- roles may not DELETE, and this function deletes nothing else. The page's figures stay
-- all-time: the rows it deletes are not taken off the counters (any other DELETE still is).
INSERT INTO scheduled_jobs (name) VALUES ('retention') ON CONFLICT (name) DO NOTHING;

-- As in …_counts_by_triggers, except a DELETE made while `pageviews.expiring` is on (set by
-- expire_page_views for its own statement) changes no counter.
CREATE OR REPLACE FUNCTION page_views_count() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    recorded_change bigint := 0;
    processed_change bigint := 0;
    -- Any of the 16 rows: concurrent statements rarely wait for each other's row lock.
    target smallint := floor(random() * 16);
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE page_view_counts SET recorded = 0, processed = 0;
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        SELECT count(*), count(processed_at) INTO recorded_change, processed_change FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT (SELECT count(processed_at) FROM new_rows) - (SELECT count(processed_at) FROM old_rows)
        INTO processed_change;
    ELSIF current_setting('pageviews.expiring', true) = 'on' THEN
        RETURN NULL;
    ELSE
        SELECT -count(*), -count(processed_at) INTO recorded_change, processed_change FROM old_rows;
    END IF;
    IF recorded_change <> 0 OR processed_change <> 0 THEN
        UPDATE page_view_counts
        SET recorded = recorded + recorded_change, processed = processed + processed_change
        WHERE shard = target;
    END IF;
    RETURN NULL;
END
$$;

-- Deletes at most `batch` processed page views recorded before `cutoff`, oldest first,
-- skipping rows another transaction holds; returns how many. Never a row recorded within the
-- last day, nor one the rollup may still count (its next run recomputes from the minute
-- before its last run): the chart's minutes stay as they were. SECURITY DEFINER: runs as the
-- owner, so the worker needs only EXECUTE (src/db/setup.sql), not DELETE.
CREATE FUNCTION expire_page_views(cutoff timestamptz, batch integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    rolled_up timestamptz;
    deleted bigint;
BEGIN
    IF cutoff > now() - interval '1 day' THEN
        RAISE EXCEPTION 'expire_page_views: the cutoff % is less than a day ago', cutoff;
    END IF;
    IF batch < 1 OR batch > 100000 THEN
        RAISE EXCEPTION 'expire_page_views: a batch of % rows is not from 1 to 100000', batch;
    END IF;
    SELECT last_run_at INTO rolled_up FROM scheduled_jobs WHERE name = 'rollup';
    IF rolled_up IS NULL THEN
        RETURN 0;
    END IF;
    cutoff := least(cutoff, date_trunc('minute', rolled_up) - interval '1 minute');
    PERFORM set_config('pageviews.expiring', 'on', true);
    DELETE FROM page_views WHERE id IN (
        SELECT id FROM page_views
        WHERE created_at < cutoff AND processed_at IS NOT NULL
        ORDER BY created_at
        LIMIT batch
        FOR UPDATE SKIP LOCKED
    );
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('pageviews.expiring', 'off', true);
    RETURN deleted;
END
$$;
REVOKE ALL ON FUNCTION expire_page_views(timestamptz, integer) FROM PUBLIC;
