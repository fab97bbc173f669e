//! Coalescing of token hand-out records (`OAUTH_AUDIT_HANDOUT_WINDOW_SECONDS`).
//!
//! A backend asks for a token before nearly every call it makes to a provider, so a row per
//! hand-out makes the log mostly hand-outs and makes every hand-out an indexed database write:
//! that write, not the hand-out, was what bounded throughput (BENCHMARKS.md). Hand-outs that
//! agree on everything an auditor asks about — who received which integration's token, with
//! what outcome, from which address and client — are counted for a window and written as one
//! row: `occurred_at` is the first hand-out, `request_id` the first request's, and `details`
//! holds `count`, `last_at` and the first [`REQUEST_IDS_KEPT`] request ids. Nothing is dropped:
//! the counts add up to every hand-out. A window of zero writes a row per hand-out.
//!
//! Pure bookkeeping: the caller passes the time in, and decides when to take rows out.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};

use crate::storage::audit::NewAuditEvent;

/// Request ids listed in a coalesced row; the count covers the rest.
pub const REQUEST_IDS_KEPT: usize = 16;

/// What makes two hand-outs the same for the log: everything but time, request id and
/// details. Compared on the events themselves, so that counting a hand-out alike to an open
/// count copies nothing (building an owned key per hand-out was a measurable part of its CPU).
fn same_key(a: &NewAuditEvent, b: &NewAuditEvent) -> bool {
    a.action == b.action
        && a.outcome == b.outcome
        && a.actor_user_id == b.actor_user_id
        && a.subject_user_id == b.subject_user_id
        && a.integration_id == b.integration_id
        && a.provider == b.provider
        && a.reason == b.reason
        && a.client_ip == b.client_ip
        && a.user_agent == b.user_agent
}

/// The hash of [`same_key`]'s fields, over borrowed parts.
fn key_hash(hasher: &impl BuildHasher, event: &NewAuditEvent) -> u64 {
    hasher.hash_one((
        &event.action,
        event.outcome.as_str(),
        &event.actor_user_id,
        &event.subject_user_id,
        event.integration_id,
        &event.provider,
        &event.reason,
        &event.client_ip,
        &event.user_agent,
    ))
}

/// Hand-outs counted so far under one key.
#[derive(Debug)]
struct Open {
    /// Tells this count from others of the same hash in the due queue.
    serial: u64,
    first: NewAuditEvent,
    count: u64,
    last_at: DateTime<Utc>,
    request_ids: Vec<String>,
}

impl Open {
    fn new(serial: u64, first: NewAuditEvent) -> Self {
        let last_at = first.occurred_at;
        let request_ids = first.request_id.iter().cloned().collect();
        Self {
            serial,
            first,
            count: 1,
            last_at,
            request_ids,
        }
    }

    fn add(&mut self, event: &NewAuditEvent) {
        self.count += 1;
        self.last_at = self.last_at.max(event.occurred_at);
        if let Some(id) = &event.request_id {
            if self.request_ids.len() < REQUEST_IDS_KEPT {
                self.request_ids.push(id.clone());
            }
        }
    }

    fn into_event(self) -> NewAuditEvent {
        let mut details = match self.first.details {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => Map::from_iter([("details".to_owned(), other)]),
        };
        details.insert("count".to_owned(), json!(self.count));
        details.insert(
            "last_at".to_owned(),
            json!(self.last_at.to_rfc3339_opts(SecondsFormat::Micros, true)),
        );
        details.insert("request_ids".to_owned(), json!(self.request_ids));
        NewAuditEvent {
            details: Value::Object(details),
            ..self.first
        }
    }
}

/// Open counts, oldest first.
#[derive(Debug)]
pub struct Tally<S = RandomState> {
    window: Duration,
    /// When each open count falls due (with its key's hash and serial), in the order they
    /// were opened, so in due order.
    due: VecDeque<(Instant, u64, u64)>,
    /// Open counts by key hash; counts whose keys share a hash share the bucket.
    open: HashMap<u64, Vec<Open>>,
    hasher: S,
    opened: usize,
    next_serial: u64,
}

impl Tally {
    pub fn new(window: Duration) -> Self {
        Self::with_hasher(window, RandomState::new())
    }
}

impl<S: BuildHasher> Tally<S> {
    fn with_hasher(window: Duration, hasher: S) -> Self {
        Self {
            window,
            due: VecDeque::new(),
            open: HashMap::new(),
            hasher,
            opened: 0,
            next_serial: 0,
        }
    }

    /// Counts `event`, seen at `now`; true when it opened a new count.
    pub fn add(&mut self, event: NewAuditEvent, now: Instant) -> bool {
        let hash = key_hash(&self.hasher, &event);
        let bucket = self.open.entry(hash).or_default();
        if let Some(open) = bucket.iter_mut().find(|open| same_key(&open.first, &event)) {
            open.add(&event);
            return false;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        bucket.push(Open::new(serial, event));
        self.due.push_back((now + self.window, hash, serial));
        self.opened += 1;
        true
    }

    /// When the oldest open count falls due, if any is open.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.front().map(|(due, ..)| *due)
    }

    /// The rows of every count due at `now`, oldest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<NewAuditEvent> {
        let mut rows = Vec::new();
        while let Some(&(_, hash, serial)) = self.due.front().filter(|(due, ..)| *due <= now) {
            self.due.pop_front();
            rows.extend(self.remove(hash, serial).map(Open::into_event));
        }
        rows
    }

    /// The rows of every open count, due or not, oldest first.
    pub fn take_all(&mut self) -> Vec<NewAuditEvent> {
        let due = std::mem::take(&mut self.due);
        let rows = due
            .into_iter()
            .filter_map(|(_, hash, serial)| self.remove(hash, serial))
            .map(Open::into_event)
            .collect();
        self.open.clear();
        self.opened = 0;
        rows
    }

    fn remove(&mut self, hash: u64, serial: u64) -> Option<Open> {
        let bucket = self.open.get_mut(&hash)?;
        let index = bucket.iter().position(|open| open.serial == serial)?;
        let open = bucket.swap_remove(index);
        if bucket.is_empty() {
            self.open.remove(&hash);
        }
        self.opened -= 1;
        Some(open)
    }

    /// Open counts.
    pub fn len(&self) -> usize {
        self.opened
    }

    pub fn is_empty(&self) -> bool {
        self.opened == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::audit::Outcome;
    use chrono::TimeZone;
    use uuid::Uuid;

    fn hand_out(actor: &str, integration: u128, at_ms: i64, request: &str) -> NewAuditEvent {
        NewAuditEvent {
            occurred_at: Utc.timestamp_millis_opt(1_700_000_000_000 + at_ms).unwrap(),
            actor_user_id: Some(actor.to_owned()),
            subject_user_id: Some("alice".to_owned()),
            integration_id: Some(Uuid::from_u128(integration)),
            provider: Some("google".to_owned()),
            action: "token_handed_out".to_owned(),
            outcome: Outcome::Success,
            reason: None,
            request_id: Some(request.to_owned()),
            client_ip: Some("10.0.0.1".to_owned()),
            user_agent: None,
            details: json!({}),
        }
    }

    #[test]
    fn hand_outs_alike_become_one_row_that_counts_them_all() {
        let start = Instant::now();
        let mut tally = Tally::new(Duration::from_secs(1));
        for n in 0..40 {
            tally.add(hand_out("svc", 1, n, &format!("r{n}")), start);
        }
        tally.add(hand_out("other-svc", 1, 5, "x"), start);
        tally.add(hand_out("svc", 2, 7, "y"), start);
        assert_eq!(tally.len(), 3);
        assert!(
            tally.take_due(start).is_empty(),
            "nothing is due before its window ends"
        );
        let rows = tally.take_due(start + Duration::from_secs(1));
        assert_eq!(rows.len(), 3);
        let first = &rows[0];
        assert_eq!(first.actor_user_id.as_deref(), Some("svc"));
        assert_eq!(first.request_id.as_deref(), Some("r0"));
        assert_eq!(first.occurred_at, hand_out("svc", 1, 0, "").occurred_at);
        assert_eq!(first.details["count"], 40);
        assert_eq!(first.details["last_at"], "2023-11-14T22:13:20.039000Z");
        let ids = first.details["request_ids"].as_array().unwrap();
        assert_eq!(ids.len(), REQUEST_IDS_KEPT);
        assert_eq!(ids[1], "r1");
        let total: u64 = rows
            .iter()
            .map(|row| row.details["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 42);
        assert!(tally.is_empty() && tally.next_due().is_none());
    }

    #[test]
    fn any_difference_an_auditor_asks_about_keeps_rows_apart() {
        let start = Instant::now();
        let mut tally = Tally::new(Duration::from_secs(1));
        let base = hand_out("svc", 1, 0, "a");
        let variants = [
            NewAuditEvent {
                outcome: Outcome::Failure,
                ..base.clone()
            },
            NewAuditEvent {
                client_ip: Some("10.0.0.2".to_owned()),
                ..base.clone()
            },
            NewAuditEvent {
                user_agent: Some("curl".to_owned()),
                ..base.clone()
            },
            NewAuditEvent {
                subject_user_id: Some("bob".to_owned()),
                ..base.clone()
            },
            NewAuditEvent {
                reason: Some("reauth_required".to_owned()),
                ..base.clone()
            },
            base,
        ];
        for event in variants {
            tally.add(event, start);
        }
        assert_eq!(tally.take_all().len(), 6);
    }

    /// Every key hashes alike: counts must still be told apart by their keys.
    #[derive(Default)]
    struct Colliding;

    impl std::hash::Hasher for Colliding {
        fn finish(&self) -> u64 {
            7
        }

        fn write(&mut self, _bytes: &[u8]) {}
    }

    #[test]
    fn keys_that_share_a_hash_keep_their_own_counts_and_fall_due_in_order() {
        let start = Instant::now();
        let hasher = std::hash::BuildHasherDefault::<Colliding>::default();
        let mut tally = Tally::with_hasher(Duration::from_secs(1), hasher);
        assert!(tally.add(hand_out("svc", 1, 0, "a"), start));
        assert!(tally.add(
            hand_out("svc", 2, 0, "b"),
            start + Duration::from_millis(10)
        ));
        assert!(!tally.add(
            hand_out("svc", 1, 1, "c"),
            start + Duration::from_millis(20)
        ));
        assert!(tally.add(
            hand_out("other", 1, 2, "d"),
            start + Duration::from_millis(30)
        ));
        assert_eq!(tally.len(), 3);
        let due = tally.take_due(start + Duration::from_millis(1015));
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].request_id.as_deref(), Some("a"));
        assert_eq!(due[0].details["count"], 2);
        assert_eq!(due[1].request_id.as_deref(), Some("b"));
        assert_eq!(tally.len(), 1);
        let rest = tally.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].actor_user_id.as_deref(), Some("other"));
        assert!(tally.is_empty() && tally.next_due().is_none());
    }

    #[test]
    fn counts_fall_due_in_the_order_they_opened_and_a_new_window_starts_after() {
        let start = Instant::now();
        let mut tally = Tally::new(Duration::from_secs(1));
        tally.add(hand_out("svc", 1, 0, "a"), start);
        tally.add(
            hand_out("svc", 2, 0, "b"),
            start + Duration::from_millis(500),
        );
        assert_eq!(tally.next_due(), Some(start + Duration::from_secs(1)));
        let due = tally.take_due(start + Duration::from_millis(1200));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].integration_id, Some(Uuid::from_u128(1)));
        tally.add(
            hand_out("svc", 1, 1300, "c"),
            start + Duration::from_millis(1300),
        );
        assert_eq!(tally.next_due(), Some(start + Duration::from_millis(1500)));
        let rest = tally.take_all();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[1].request_id.as_deref(), Some("c"));
        assert_eq!(rest[1].details["count"], 1);
    }
}
