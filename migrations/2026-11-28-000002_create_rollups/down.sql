DROP TABLE scheduled_jobs;
DROP TABLE page_view_rollups;
