//! The outbox's counters, exposed by the app's `/metrics`.

use crate::metrics::{Counter, Registry};

#[derive(Default)]
pub struct OutboxMetrics {
    pub confirmed: Counter,
    pub failures: Counter,
    pub deferred: Counter,
    pub republished: Counter,
}

impl OutboxMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "publish_confirmed",
            "Tasks confirmed by the broker",
            self.confirmed.clone(),
        );
        registry.register(
            "publish_failures",
            "Broker connections lost, or blocked by a resource alarm, while publishing",
            self.failures.clone(),
        );
        registry.register(
            "publish_deferred",
            "Tasks left to the sweep because the outbox was full or stopping",
            self.deferred.clone(),
        );
        registry.register(
            "republished",
            "Unprocessed page views offered again by the sweep",
            self.republished.clone(),
        );
    }
}
