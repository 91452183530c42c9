//! Waiting between attempts: reconnecting to the broker, retrying the database.

use std::time::{Duration, Instant};

/// Waits between reconnect (and retry) attempts: 100 ms doubling to 5 s. A session that stayed
/// up for at least the longest wait counts as a recovery: the next outage starts again from
/// 100 ms. One that fails sooner (a broker accepting connections and then refusing us) keeps
/// doubling, so a broken peer never gets a reconnect loop.
pub struct Backoff {
    next: Duration,
    connected_at: Option<Instant>,
}

const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: FIRST_DELAY,
            connected_at: None,
        }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        if self.connected_at.take().is_some_and(|at| at.elapsed() >= MAX_DELAY) {
            self.next = FIRST_DELAY;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        delay
    }

    /// A session is up: if it lasts, the next failure waits the shortest time again.
    pub fn connected(&mut self) {
        self.connected_at = Some(Instant::now());
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_restarts_only_after_a_lasting_session() {
        let mut backoff = Backoff::default();
        let delays: Vec<u128> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.connected();
        assert_eq!(backoff.next_delay(), MAX_DELAY, "a session that failed at once");
        backoff.connected_at = Some(Instant::now() - MAX_DELAY);
        assert_eq!(backoff.next_delay(), FIRST_DELAY, "a session that lasted");
    }
}
