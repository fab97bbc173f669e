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

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::storage::audit::NewAuditEvent;

/// Request ids listed in a coalesced row; the count covers the rest.
pub const REQUEST_IDS_KEPT: usize = 16;

/// What makes two hand-outs the same for the log (everything but time and request id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    action: String,
    outcome: &'static str,
    actor: Option<String>,
    subject: Option<String>,
    integration: Option<Uuid>,
    provider: Option<String>,
    reason: Option<String>,
    client_ip: Option<String>,
    user_agent: Option<String>,
}

impl Key {
    fn of(event: &NewAuditEvent) -> Self {
        Self {
            action: event.action.clone(),
            outcome: event.outcome.as_str(),
            actor: event.actor_user_id.clone(),
            subject: event.subject_user_id.clone(),
            integration: event.integration_id,
            provider: event.provider.clone(),
            reason: event.reason.clone(),
            client_ip: event.client_ip.clone(),
            user_agent: event.user_agent.clone(),
        }
    }
}

/// Hand-outs counted so far under one key.
#[derive(Debug)]
struct Open {
    first: NewAuditEvent,
    count: u64,
    last_at: DateTime<Utc>,
    request_ids: Vec<String>,
}

impl Open {
    fn new(first: NewAuditEvent) -> Self {
        let last_at = first.occurred_at;
        let request_ids = first.request_id.iter().cloned().collect();
        Self {
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
pub struct Tally {
    window: Duration,
    /// When each open count falls due, in the order they were opened (so in due order).
    due: VecDeque<(Instant, Key)>,
    open: HashMap<Key, Open>,
}

impl Tally {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            due: VecDeque::new(),
            open: HashMap::new(),
        }
    }

    /// Counts `event`, seen at `now`.
    pub fn add(&mut self, event: NewAuditEvent, now: Instant) {
        let key = Key::of(&event);
        match self.open.get_mut(&key) {
            Some(open) => open.add(&event),
            None => {
                self.due.push_back((now + self.window, key.clone()));
                self.open.insert(key, Open::new(event));
            }
        }
    }

    /// When the oldest open count falls due, if any is open.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.front().map(|(due, _)| *due)
    }

    /// The rows of every count due at `now`, oldest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<NewAuditEvent> {
        let mut rows = Vec::new();
        while let Some((_, key)) = self.due.front().filter(|(due, _)| *due <= now) {
            if let Some(open) = self.open.remove(key) {
                rows.push(open.into_event());
            }
            self.due.pop_front();
        }
        rows
    }

    /// The rows of every open count, due or not, oldest first.
    pub fn take_all(&mut self) -> Vec<NewAuditEvent> {
        let rows = self
            .due
            .drain(..)
            .filter_map(|(_, key)| self.open.remove(&key))
            .map(Open::into_event)
            .collect();
        self.open.clear();
        rows
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Open counts.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::audit::Outcome;
    use chrono::TimeZone;

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
