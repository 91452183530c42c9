-- The counters stay exact as they are; the previous release counts in its own statements.
DROP TRIGGER page_view_counts_by_triggers_only ON page_view_counts;
DROP FUNCTION page_view_counts_unchanged();
DROP TRIGGER page_views_count_truncate ON page_views;
DROP TRIGGER page_views_count_delete ON page_views;
DROP TRIGGER page_views_count_update ON page_views;
DROP TRIGGER page_views_count_insert ON page_views;
DROP FUNCTION page_views_count();
