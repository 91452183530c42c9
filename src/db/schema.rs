//! Table definitions matching migrations/.

diesel::table! {
    page_views (id) {
        id -> Int8,
        created_at -> Timestamptz,
        data -> Jsonb,
        enqueued_at -> Nullable<Timestamptz>,
        processed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    page_view_rollups (minute) {
        minute -> Timestamptz,
        views -> Int8,
        computed_at -> Timestamptz,
    }
}

diesel::table! {
    scheduled_jobs (name) {
        name -> Text,
        last_run_at -> Nullable<Timestamptz>,
        runs -> Int8,
    }
}
