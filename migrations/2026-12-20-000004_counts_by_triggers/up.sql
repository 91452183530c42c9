-- The counters are kept by triggers on page_views, so every row counts however it was
-- written: the app's batches, the worker's, an app or worker of the previous release during a
-- rolling deploy, a repair by hand (INSERT, UPDATE of processed_at, DELETE, TRUNCATE).
-- Statement-level triggers with transition tables: one counter UPDATE per statement, as
-- before, in the same statement (so the same transaction and the same statement_timeout).
-- SECURITY DEFINER: the runtime roles need no privilege on page_view_counts.

-- Writers wait until this commits, so the recount below is exact.
LOCK TABLE page_views IN SHARE ROW EXCLUSIVE MODE;
UPDATE page_view_counts SET recorded = 0, processed = 0;
UPDATE page_view_counts
SET recorded = (SELECT count(*) FROM page_views),
    processed = (SELECT count(processed_at) FROM page_views)
WHERE shard = 0;

CREATE FUNCTION page_views_count() RETURNS trigger
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

-- One trigger per event: a trigger with transition tables takes only one.
CREATE TRIGGER page_views_count_insert AFTER INSERT ON page_views
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION page_views_count();
CREATE TRIGGER page_views_count_update AFTER UPDATE ON page_views
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION page_views_count();
CREATE TRIGGER page_views_count_delete AFTER DELETE ON page_views
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION page_views_count();
CREATE TRIGGER page_views_count_truncate AFTER TRUNCATE ON page_views
    FOR EACH STATEMENT EXECUTE FUNCTION page_views_count();

-- Any other UPDATE of the counters changes nothing: the previous release still adds its own
-- counts in the same statement, which the triggers above count already. Only an UPDATE made
-- from within a trigger (depth 1 and more) goes through.
CREATE FUNCTION page_view_counts_unchanged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.recorded := OLD.recorded;
    NEW.processed := OLD.processed;
    RETURN NEW;
END
$$;
CREATE TRIGGER page_view_counts_by_triggers_only BEFORE UPDATE ON page_view_counts
    FOR EACH ROW WHEN (pg_trigger_depth() < 1) EXECUTE FUNCTION page_view_counts_unchanged();
