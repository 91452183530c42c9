//! Settlement of one published batch, without I/O: which messages the broker confirmed,
//! nacked or returned, which ids go back to the front of the queue, and what the session does
//! next.

use super::IDS_PER_MESSAGE;
use super::session::SessionError;
use std::collections::VecDeque;

/// One batch of ids as messages, and what the broker said about each published one.
pub(super) struct InFlight {
    messages: Vec<Vec<i64>>,
    /// The delivery tag of the first message.
    first_tag: u64,
    /// Messages published (a prefix of `messages`; the rest failed to go out).
    published: usize,
    /// Per published message: acked by the broker and not returned.
    acked: Vec<bool>,
    settled: usize,
    nacked: usize,
}

/// What the broker's answers came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Settled {
    /// Ids the broker took.
    pub confirmed: usize,
    /// Messages it refused.
    pub nacked: usize,
}

impl InFlight {
    /// `batch` cut into messages of [`IDS_PER_MESSAGE`] ids, the first to be published with
    /// delivery tag `first_tag`.
    pub fn new(batch: &[i64], first_tag: u64) -> InFlight {
        InFlight {
            messages: batch.chunks(IDS_PER_MESSAGE).map(<[i64]>::to_vec).collect(),
            first_tag,
            published: 0,
            acked: Vec::new(),
            settled: 0,
            nacked: 0,
        }
    }

    pub fn messages(&self) -> &[Vec<i64>] {
        &self.messages
    }

    /// The next message went out.
    pub fn published_one(&mut self) {
        self.published += 1;
        self.acked.push(false);
    }

    /// Every published message has its confirm.
    pub fn all_settled(&self) -> bool {
        self.settled >= self.published
    }

    /// A confirm (`ok`) or nack for `tag`; tags of other batches are ignored.
    pub fn confirm(&mut self, tag: u64, ok: bool) {
        let Some(i) = tag
            .checked_sub(self.first_tag)
            .map(|i| i as usize)
            .filter(|i| *i < self.published)
        else {
            return;
        };
        self.settled += 1;
        self.acked[i] = ok;
        self.nacked += usize::from(!ok);
    }

    /// The broker returned a message with these ids as unroutable: it is not confirmed,
    /// whatever its confirm said (a return comes before the confirm of its message).
    pub fn returned(&mut self, ids: &[i64]) {
        if let Some(i) = self.messages[..self.published].iter().position(|m| m == ids) {
            self.acked[i] = false;
        }
    }

    /// Puts every id the broker did not take back at the front of `pending`: those never
    /// published first, then those published and not confirmed, each in their order.
    pub fn settle(self, pending: &mut VecDeque<i64>) -> Settled {
        let (sent, unsent) = self.messages.split_at(self.published);
        let mut confirmed = 0;
        let mut back: Vec<i64> = unsent.concat();
        for (ids, ok) in sent.iter().zip(&self.acked) {
            if *ok {
                confirmed += ids.len();
            } else {
                back.extend(ids);
            }
        }
        for id in back.into_iter().rev() {
            pending.push_front(id);
        }
        Settled {
            confirmed,
            nacked: self.nacked,
        }
    }
}

/// What the session does after a settled batch.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// The broker took work: the next failure starts its backoff from the shortest wait.
    ResetBackoff,
    /// Nothing taken, nothing refused (all lost with the connection, or nothing published).
    GoOn,
}

/// Returns end the session (the topology is declared again on the next connection), then
/// nacks (retried later on a new channel, not in a loop); otherwise the session goes on.
/// Only work the broker took resets the backoff: a broker that accepts connections and
/// refuses publishes keeps it growing.
pub(super) fn next_step(settled: &Settled, returned: usize, reason: String) -> Result<Next, SessionError> {
    if returned > 0 {
        Err(SessionError::Unroutable(returned, reason))
    } else if settled.nacked > 0 {
        Err(SessionError::Refused(settled.nacked))
    } else if settled.confirmed > 0 {
        Ok(Next::ResetBackoff)
    } else {
        Ok(Next::GoOn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: i64) -> Vec<i64> {
        (1..=n).collect()
    }

    fn publish_all(flight: &mut InFlight) {
        for _ in 0..flight.messages().len() {
            flight.published_one();
        }
    }

    #[test]
    fn a_batch_is_cut_into_messages_of_at_most_64_ids() {
        let flight = InFlight::new(&batch(130), 1);
        let sizes: Vec<usize> = flight.messages().iter().map(Vec::len).collect();
        assert_eq!(sizes, [64, 64, 2]);
    }

    #[test]
    fn confirmed_messages_leave_and_the_others_go_back_to_the_front_in_order() {
        let mut flight = InFlight::new(&batch(130), 10);
        publish_all(&mut flight);
        flight.confirm(10, true);
        flight.confirm(11, false);
        flight.confirm(99, true); // another batch's tag
        flight.confirm(9, true);
        assert!(!flight.all_settled());
        flight.confirm(12, true);
        assert!(flight.all_settled());
        let mut pending = VecDeque::from([500, 501]);
        let settled = flight.settle(&mut pending);
        assert_eq!(
            settled,
            Settled {
                confirmed: 66,
                nacked: 1
            }
        );
        let expected: Vec<i64> = (65..=128).chain([500, 501]).collect();
        assert_eq!(Vec::from(pending), expected);
    }

    #[test]
    fn a_returned_message_is_not_confirmed_whatever_its_ack() {
        let mut flight = InFlight::new(&batch(70), 1);
        publish_all(&mut flight);
        flight.returned(&[65, 66, 67, 68, 69, 70]);
        flight.returned(&[1000]); // not of this batch
        flight.confirm(1, true);
        flight.confirm(2, true);
        // The return arrives before the confirm; marking after the confirms must count too.
        flight.returned(&[65, 66, 67, 68, 69, 70]);
        let mut pending = VecDeque::new();
        assert_eq!(flight.settle(&mut pending).confirmed, 64);
        assert_eq!(Vec::from(pending), [65, 66, 67, 68, 69, 70]);
    }

    #[test]
    fn messages_never_published_go_back_first() {
        let mut flight = InFlight::new(&batch(130), 1);
        flight.published_one();
        flight.published_one(); // the third failed to go out
        flight.confirm(1, true);
        // the connection went away before the second's confirm
        let mut pending = VecDeque::from([900]);
        let settled = flight.settle(&mut pending);
        assert_eq!(
            settled,
            Settled {
                confirmed: 64,
                nacked: 0
            }
        );
        let expected: Vec<i64> = [129, 130].into_iter().chain(65..=128).chain([900]).collect();
        assert_eq!(Vec::from(pending), expected);
    }

    #[test]
    fn returns_then_nacks_end_the_session_and_only_taken_work_resets_the_backoff() {
        let took = Settled {
            confirmed: 5,
            nacked: 0,
        };
        let refused = Settled {
            confirmed: 5,
            nacked: 2,
        };
        let nothing = Settled {
            confirmed: 0,
            nacked: 0,
        };
        assert!(matches!(
            next_step(&refused, 1, "NO_ROUTE".into()),
            Err(SessionError::Unroutable(1, reason)) if reason == "NO_ROUTE"
        ));
        assert!(matches!(
            next_step(&refused, 0, String::new()),
            Err(SessionError::Refused(2))
        ));
        assert_eq!(next_step(&took, 0, String::new()).unwrap(), Next::ResetBackoff);
        assert_eq!(next_step(&nothing, 0, String::new()).unwrap(), Next::GoOn);
    }
}
