//! What the consumer does with a batch, without I/O: how many deliveries make a batch, and
//! which acks, rejects and dead-letter messages settle it once its verdict is in.

use super::{MAX_BATCH_IDS, Verdict};

/// An estimate of a body's ids from its size (about 8 bytes an id), known before parsing.
pub(super) fn estimated_ids(body_len: usize) -> usize {
    body_len / 8 + 1
}

/// Whether a batch of `deliveries` holding about `ids` ids takes another delivery.
pub(super) fn room_for_more(deliveries: usize, ids: usize, prefetch: u16) -> bool {
    deliveries < usize::from(prefetch) && ids < MAX_BATCH_IDS
}

/// One step of settling a batch, on the deliveries of its valid tasks (by position).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Action {
    /// A task of just this id, which names no page view: reject it without requeue (the
    /// broker dead-letters it as it is).
    Reject { delivery: usize, id: i64 },
    /// An id naming no page view, from a larger task: a message of its own to the dead-letter
    /// exchange, before its task is acked.
    DeadLetter { id: i64 },
    /// Ack this delivery alone.
    Ack { delivery: usize },
    /// Ack this delivery and every earlier one of the channel.
    AckMultiple { delivery: usize },
}

/// How a batch is settled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// These steps, in order.
    Settle(Vec<Action>),
    /// Not processed: no ack; the broker redelivers once the channel closes.
    LeaveUnacked,
}

/// The plan for a batch of `tasks` (the ids of each valid delivery, in delivery order).
/// Normally one ack settles the batch: `multiple` settles every earlier delivery of the
/// channel, which are all settled already. Once a batch has been left unacked on purpose
/// (`left_unacked`), that would ack its deliveries too: from then on each delivery is acked on
/// its own.
pub(super) fn plan(tasks: &[Vec<i64>], verdict: Verdict, left_unacked: bool) -> Plan {
    let Verdict::Done { missing } = verdict else {
        return Plan::LeaveUnacked;
    };
    let mut actions = Vec::new();
    let mut last = None;
    for (delivery, ids) in tasks.iter().enumerate() {
        let bogus: Vec<i64> = ids.iter().copied().filter(|id| missing.contains(id)).collect();
        if let ([id], 1) = (bogus.as_slice(), ids.len()) {
            actions.push(Action::Reject { delivery, id: *id });
            continue;
        }
        actions.extend(bogus.into_iter().map(|id| Action::DeadLetter { id }));
        if let Some(previous) = last.replace(delivery)
            && left_unacked
        {
            actions.push(Action::Ack { delivery: previous });
        }
    }
    match last {
        Some(delivery) if left_unacked => actions.push(Action::Ack { delivery }),
        Some(delivery) => actions.push(Action::AckMultiple { delivery }),
        None => {}
    }
    Plan::Settle(actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn done(missing: &[i64]) -> Verdict {
        Verdict::Done {
            missing: missing.to_vec(),
        }
    }

    #[test]
    fn a_processed_batch_is_settled_by_one_ack_of_its_last_delivery() {
        let tasks = [vec![1, 2], vec![3], vec![4]];
        assert_eq!(
            plan(&tasks, done(&[]), false),
            Plan::Settle(vec![AckMultiple { delivery: 2 }])
        );
    }

    #[test]
    fn ids_naming_no_page_view_are_dead_lettered_alone_or_with_their_message() {
        let tasks = [vec![1, 2, 3], vec![7], vec![4]];
        assert_eq!(
            plan(&tasks, done(&[2, 3, 7]), false),
            Plan::Settle(vec![
                DeadLetter { id: 2 },
                DeadLetter { id: 3 },
                Reject { delivery: 1, id: 7 },
                AckMultiple { delivery: 2 },
            ])
        );
        // A task that is all bogus but not a single id is acked after its dead letters.
        assert_eq!(
            plan(&[vec![8, 9]], done(&[8, 9]), false),
            Plan::Settle(vec![
                DeadLetter { id: 8 },
                DeadLetter { id: 9 },
                AckMultiple { delivery: 0 }
            ])
        );
        assert_eq!(
            plan(&[vec![7]], done(&[7]), false),
            Plan::Settle(vec![Reject { delivery: 0, id: 7 }])
        );
    }

    #[test]
    fn after_a_batch_left_unacked_every_delivery_is_acked_on_its_own() {
        let tasks = [vec![1], vec![5], vec![2]];
        assert_eq!(
            plan(&tasks, done(&[5]), true),
            Plan::Settle(vec![
                Reject { delivery: 1, id: 5 },
                Ack { delivery: 0 },
                Ack { delivery: 2 },
            ])
        );
    }

    #[test]
    fn a_batch_not_processed_is_left_unacked() {
        assert_eq!(plan(&[vec![1]], Verdict::NotDone, false), Plan::LeaveUnacked);
    }

    #[test]
    fn a_batch_takes_deliveries_up_to_the_prefetch_and_about_2000_ids() {
        assert!(room_for_more(1, estimated_ids(10), 100));
        assert!(!room_for_more(100, 1, 100), "prefetch reached");
        assert_eq!(estimated_ids(16_000), 2_001);
        assert!(!room_for_more(1, estimated_ids(16_000), 100), "about 2 000 ids");
    }
}
