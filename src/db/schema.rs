//! Table definitions matching migrations/.

diesel::table! {
    page_views (id) {
        id -> Int8,
        created_at -> Timestamptz,
        data -> Jsonb,
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

diesel::table! {
    page_view_counts (shard) {
        shard -> Int2,
        recorded -> Int8,
        processed -> Int8,
    }
}
