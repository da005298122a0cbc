//! What a rating run did, bounded: counts for everything, details for the first
//! [`DETAIL_CAP`] rows of each kind, whatever the window's size.

use std::fmt;

use time::OffsetDateTime;

use crate::window::Window;

/// Most detail rows a report keeps per kind of change (counts are always complete).
pub const DETAIL_CAP: usize = 50;

/// One rated hour of one meter for one auth id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct UsageKey {
    /// Whose usage.
    pub auth_id: String,
    /// Which meter.
    pub meter: String,
    /// The hour.
    #[serde(with = "time::serde::rfc3339")]
    pub window_start: OffsetDateTime,
}

impl fmt::Display for UsageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hour = crate::window::rfc3339(self.window_start);
        write!(f, "{}/{}@{hour}", self.auth_id, self.meter)
    }
}

/// A rated hour's values, exactly as PostgreSQL prints them (decimal text, never rounded by
/// a float or refused by a bounded decimal type).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rated {
    /// Units used in the hour.
    pub quantity: String,
    /// Events in the hour.
    pub event_count: i64,
    /// Price of one unit (absent for an hour with no effective price).
    pub unit_price: Option<String>,
    /// `round(quantity * unit_price, 9)` (absent for an hour with no effective price).
    pub amount: Option<String>,
    /// The price's currency.
    pub currency: Option<String>,
}

/// One hour the run changed (or, in a dry run, would change): its values before and after.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RatedChange {
    /// Which hour.
    #[serde(flatten)]
    pub key: UsageKey,
    /// What was rated before (`None` for a new hour).
    pub old: Option<Rated>,
    /// What the events say now (`None` when the hour's events are gone).
    pub new: Option<Rated>,
}

impl fmt::Display for RatedChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |r: &Option<Rated>| match r {
            None => "none".to_owned(),
            Some(r) => format!(
                "{} units/{} events = {} {}",
                r.quantity,
                r.event_count,
                r.amount.as_deref().unwrap_or("unpriced"),
                r.currency.as_deref().unwrap_or("")
            )
            .trim_end()
            .to_owned(),
        };
        write!(
            f,
            "{}: {} -> {}",
            self.key,
            side(&self.old),
            side(&self.new)
        )
    }
}

/// Every change of one kind: the complete count and the first [`DETAIL_CAP`] rows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Changes {
    /// How many hours changed this way.
    pub count: u64,
    /// The first [`DETAIL_CAP`] of them, by (auth id, meter, hour).
    pub details: Vec<RatedChange>,
}

impl Changes {
    /// Whether no hour changed this way.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `count` changes with (some of) their details, keeping at most [`DETAIL_CAP`].
    pub fn add(&mut self, count: u64, details: impl IntoIterator<Item = RatedChange>) {
        self.count += count;
        let room = DETAIL_CAP.saturating_sub(self.details.len());
        self.details.extend(details.into_iter().take(room));
    }

    fn absorb(&mut self, other: Changes) {
        self.add(other.count, other.details);
    }
}

/// Events ingested, changed or deleted after their hour left the routine window, not yet
/// reflected in `rated_usage`: never dropped silently, always an anomaly naming the backfill to
/// run (which reconciles a lowered hour as any backfill does).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct LateUsage {
    /// Late events in hours whose rating disagrees with their events.
    pub events: u64,
    /// How many hours disagree with their rating (grown or lowered).
    pub hours: u64,
    /// How many of them went down or lost every event under a rated row: billed too high until
    /// the backfill reconciles them.
    pub lowered: u64,
    /// The first such hour.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// The end of the last such hour.
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
}

impl LateUsage {
    /// The command that rates the late usage: it runs as printed, with `--allow-long-span`
    /// when the late hours span more than [`MAX_SPAN_DAYS`](crate::window::MAX_SPAN_DAYS).
    pub fn backfill_command(&self) -> String {
        let at = crate::window::rfc3339;
        let long = self.until - self.since > time::Duration::days(crate::window::MAX_SPAN_DAYS);
        format!(
            "keel-rater --backfill --since {} --until {}{}",
            at(self.since),
            at(self.until),
            if long { " --allow-long-span" } else { "" }
        )
    }
}

/// What rating a window did (or, in a dry run, would do). Its size is bounded whatever the
/// window's.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateReport {
    /// Newly rated hours.
    pub inserted: Changes,
    /// Rated hours whose quantity, count or amount went up, or that were repriced without their
    /// amount going down.
    pub updated: Changes,
    /// Rated hours whose quantity, event count or amount went down, or whose currency changed:
    /// billed events vanished, or a price cut (or a currency change) took effect under them.
    pub lowered: Changes,
    /// Rated hours whose events are all gone: the reconcile deletions.
    pub deleted: Changes,
    /// Rated hours that lost their effective price: the stale row was removed.
    pub price_lost: Changes,
    /// Hours with events but no effective price and no rated row: not rated.
    pub unpriced: Changes,
    /// Hours whose quantity or amount would leave the money model's range: not rated.
    pub out_of_range: Changes,
    /// Rated hours already right, left untouched.
    pub unchanged: u64,
    /// Late usage outside the window, if any was found.
    pub late: Option<LateUsage>,
}

impl RateReport {
    /// Whether something is wrong enough to page for, whatever the window: unpriced hours, an
    /// hour that lost its price, out-of-range hours, or late usage.
    pub fn has_anomaly(&self) -> bool {
        !self.unpriced.is_empty()
            || !self.price_lost.is_empty()
            || !self.out_of_range.is_empty()
            || self.late.is_some()
    }

    /// Rated hours whose billed value went down or away: deleted, lowered, or price lost. On a
    /// routine run any of these pages; on an explicit backfill it is convergence.
    pub fn losses(&self) -> u64 {
        self.deleted.count + self.lowered.count + self.price_lost.count
    }

    /// Rows written: inserted, updated, lowered, deleted and price-lost hours.
    pub fn rows_written(&self) -> u64 {
        self.inserted.count + self.updated.count + self.losses()
    }

    /// Adds another day's report.
    pub fn absorb(&mut self, other: RateReport) {
        self.inserted.absorb(other.inserted);
        self.updated.absorb(other.updated);
        self.lowered.absorb(other.lowered);
        self.deleted.absorb(other.deleted);
        self.price_lost.absorb(other.price_lost);
        self.unpriced.absorb(other.unpriced);
        self.out_of_range.absorb(other.out_of_range);
        self.unchanged += other.unchanged;
        if other.late.is_some() {
            self.late = other.late;
        }
    }
}

/// Cuts `s` to at most `max` bytes, on a character boundary (never panics).
pub fn truncate_on_char_boundary(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// The attributes of the audit row for one day's losses: counts, the window in RFC 3339, the
/// run id, and the first changed hours with old -> new values. Every value is cut to the audit
/// limit on a character boundary, so no id can make it fail or panic.
pub fn loss_attributes(
    report: &RateReport,
    day: Window,
    explicit: bool,
    run_id: Option<i64>,
) -> Result<keel_audit::Attributes, keel_audit::AuditFieldError> {
    let at = crate::window::rfc3339;
    let changes = |c: &Changes| {
        let mut text = c
            .details
            .iter()
            .take(10)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        truncate_on_char_boundary(&mut text, keel_audit::MAX_ATTR_VALUE_LEN);
        text
    };
    let mut attributes = keel_audit::Attributes::new();
    for (key, value) in [
        ("deleted_count", report.deleted.count.to_string()),
        ("lowered_count", report.lowered.count.to_string()),
        ("price_lost_count", report.price_lost.count.to_string()),
        ("window_start", at(day.start())),
        ("window_end", at(day.end())),
        ("explicit_window", explicit.to_string()),
        (
            "run_id",
            run_id.map_or_else(|| "none".to_owned(), |id| id.to_string()),
        ),
        ("deleted", changes(&report.deleted)),
        ("lowered", changes(&report.lowered)),
        ("price_lost", changes(&report.price_lost)),
    ] {
        attributes.insert(key, value)?;
    }
    Ok(attributes)
}

#[cfg(test)]
mod tests {

    /// The printed backfill runs as printed: past the longest window accepted without it, it
    /// carries `--allow-long-span`, and the window it names is accepted.
    #[test]
    fn the_printed_backfill_is_accepted_as_printed() {
        use time::macros::datetime;
        let late = |since, until| LateUsage {
            events: 2,
            hours: 2,
            lowered: 0,
            since,
            until,
        };
        let short = late(
            datetime!(2026-11-01 10:00 UTC),
            datetime!(2026-11-27 11:00 UTC),
        );
        assert!(!short.backfill_command().contains("--allow-long-span"));
        let long = late(
            datetime!(2026-09-01 10:00 UTC),
            datetime!(2026-11-27 11:00 UTC),
        );
        assert_eq!(
            long.backfill_command(),
            "keel-rater --backfill --since 2026-09-01T10:00:00Z --until 2026-11-27T11:00:00Z \
             --allow-long-span"
        );
        assert!(
            crate::resolve_window(
                Some(long.since),
                Some(long.until),
                datetime!(2026-12-01 00:00 UTC),
                true
            )
            .is_ok()
        );
    }

    use super::*;
    use time::macros::datetime;

    fn key(auth: &str) -> UsageKey {
        UsageKey {
            auth_id: auth.into(),
            meter: "requests".into(),
            window_start: datetime!(2026-11-20 01:00 UTC),
        }
    }

    fn rated(quantity: &str, amount: &str) -> Rated {
        Rated {
            quantity: quantity.into(),
            event_count: 1,
            unit_price: Some("0.001".into()),
            amount: Some(amount.into()),
            currency: Some("USD".into()),
        }
    }

    /// RATER-H2: an id whose 1024th byte falls inside a character used to panic.
    #[test]
    fn reconcile_audit_values_truncate_on_a_char_boundary() {
        let auth = format!("a{}", "é".repeat(600));
        let mut report = RateReport::default();
        report.deleted.add(
            1,
            [RatedChange {
                key: key(&auth),
                old: Some(rated("5", "0.005")),
                new: None,
            }],
        );
        let day = crate::resolve_window(
            Some(datetime!(2026-11-20 00:00 UTC)),
            Some(datetime!(2026-11-21 00:00 UTC)),
            datetime!(2026-11-22 00:00 UTC),
            false,
        )
        .unwrap()
        .0;
        let attributes = loss_attributes(&report, day, false, Some(7)).unwrap();
        let json = serde_json::to_value(&attributes).unwrap();
        let deleted = json["deleted"].as_str().unwrap();
        assert!(deleted.len() <= keel_audit::MAX_ATTR_VALUE_LEN);
        assert!(deleted.starts_with("aé"));
        assert_eq!(json["window_start"], "2026-11-20T00:00:00Z");
        assert_eq!(json["run_id"], "7");

        for max in 0..8 {
            let mut s = "aéé".to_owned();
            truncate_on_char_boundary(&mut s, max);
            assert!(s.len() <= max && "aéé".starts_with(s.as_str()));
        }
    }

    /// RATER-M3: details stop at the cap while counts stay complete.
    #[test]
    fn reports_keep_complete_counts_and_capped_details() {
        let mut changes = Changes::default();
        for round in 0..3 {
            changes.add(
                40,
                (0..40).map(|i| RatedChange {
                    key: key(&format!("a{round}-{i}")),
                    old: None,
                    new: Some(rated("1", "0.001")),
                }),
            );
        }
        assert_eq!(changes.count, 120);
        assert_eq!(changes.details.len(), DETAIL_CAP);
    }

    #[test]
    fn a_change_prints_old_and_new_values() {
        let change = RatedChange {
            key: key("acme"),
            old: Some(rated("15", "0.015")),
            new: Some(rated("5", "0.005")),
        };
        assert_eq!(
            change.to_string(),
            "acme/requests@2026-11-20T01:00:00Z: 15 units/1 events = 0.015 USD -> 5 units/1 events = 0.005 USD"
        );
    }
}
