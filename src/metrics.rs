//! Prometheus metrics through `prometheus-client` (OpenMetrics text exposition). Each part of
//! the service owns a struct of metric handles and registers it; `/metrics` encodes the
//! registry. Names get the `pageviews_` prefix here and counters their `_total` suffix from
//! the library.

pub use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};
pub use prometheus_client::registry::Registry;

/// Latency buckets in seconds, 1 ms to 60 s (README: Metrics).
pub const SECONDS_BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0];

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn registry() -> Registry {
    Registry::with_prefix("pageviews")
}

pub fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

/// The body of `/metrics` with its content type.
pub fn exposition(registry: &Registry) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_help_and_buckets_are_exposed() {
        let mut registry = registry();
        let h = seconds_histogram();
        let c = Counter::<u64>::default();
        registry.register("x_seconds", "Test latency", h.clone());
        registry.register("things", "Things done", c.clone());
        h.observe(0.002);
        h.observe(0.2);
        c.inc_by(3);
        let (_, out) = exposition(&registry);
        assert!(out.contains("# HELP pageviews_x_seconds Test latency.\n"), "{out}");
        assert!(out.contains("pageviews_x_seconds_bucket{le=\"0.001\"} 0\n"), "{out}");
        assert!(out.contains("pageviews_x_seconds_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("pageviews_x_seconds_bucket{le=\"0.25\"} 2\n"), "{out}");
        assert!(out.contains("pageviews_x_seconds_count 2\n"), "{out}");
        assert!(out.contains("pageviews_things_total 3\n"), "{out}");
        assert!(out.ends_with("# EOF\n"));
    }
}
