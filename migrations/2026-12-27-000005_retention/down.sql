DROP FUNCTION expire_page_views(timestamptz, integer);
DELETE FROM scheduled_jobs WHERE name = 'retention';

-- Every DELETE counted again, as …_counts_by_triggers left it.
CREATE OR REPLACE FUNCTION page_views_count() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    recorded_change bigint := 0;
    processed_change bigint := 0;
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
