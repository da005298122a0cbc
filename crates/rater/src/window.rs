//! The rating window: which closed UTC hours a run rates.

use std::fmt;

use time::{Duration, OffsetDateTime, UtcOffset};

/// Longest explicit window accepted without `--allow-long-span`, in days.
pub const MAX_SPAN_DAYS: i64 = 31;

/// Hours a routine (default) run re-rates.
const DEFAULT_HOURS: i64 = 24;

/// A half-open span of whole UTC hours, `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    start: OffsetDateTime,
    end: OffsetDateTime,
}

impl Window {
    /// The first instant in the window (on the hour, UTC).
    pub fn start(&self) -> OffsetDateTime {
        self.start
    }

    /// The first instant after the window (on the hour, UTC).
    pub fn end(&self) -> OffsetDateTime {
        self.end
    }

    /// How many hours the window covers.
    pub fn hours(&self) -> i64 {
        (self.end - self.start).whole_hours()
    }

    /// The window cut into consecutive spans of at most one day, for per-day transactions.
    pub fn days(&self) -> Vec<Window> {
        let mut days = Vec::new();
        let mut start = self.start;
        while start < self.end {
            let end = (start + Duration::DAY).min(self.end);
            days.push(Window { start, end });
            start = end;
        }
        days
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", rfc3339(self.start), rfc3339(self.end))
    }
}

/// `at` in RFC 3339 (`2026-11-22T10:00:00Z`); an instant RFC 3339 cannot express (a year
/// outside 0000-9999) falls back to `time`'s own format, so formatting never fails.
pub(crate) fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}

/// An instant in a message: RFC 3339 where possible.
struct Rfc3339(OffsetDateTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&rfc3339(self.0))
    }
}

/// Why a window was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WindowError {
    /// The window would start before year 1 (UTC), which no stored time may (migration 0099).
    #[error(
        "the window would start at {}, before 0001-01-01T00:00:00Z, the earliest time a run can \
         record; give a later --since or --until",
        Rfc3339(*.start)
    )]
    BeforeYearOne {
        /// Where it would start.
        start: OffsetDateTime,
    },
    /// A bound falls outside the years 1 to 9999 in UTC (or outside what UTC can hold at all,
    /// like `9999-12-31T23:00:00-01:00`): no stored time may.
    #[error(
        "--{flag} ({}) must fall in the years 0001 to 9999 in UTC",
        Rfc3339(*.at)
    )]
    OutOfRange {
        /// `since` or `until`.
        flag: &'static str,
        /// The bound given.
        at: OffsetDateTime,
    },
    /// `since` is not before `until`.
    #[error(
        "--since ({}) must be before the window's end ({}: --until, or the start of the current \
         hour without it)",
        Rfc3339(*.since),
        Rfc3339(*.until)
    )]
    Empty {
        /// The start asked for.
        since: OffsetDateTime,
        /// The end asked for.
        until: OffsetDateTime,
    },
    /// A bound is not on a whole UTC hour.
    #[error(
        "--{flag} ({}) must be on a whole hour in UTC, e.g. 2026-11-22T10:00:00Z",
        Rfc3339(*.at)
    )]
    NotOnTheHour {
        /// `since` or `until`.
        flag: &'static str,
        /// The bound given.
        at: OffsetDateTime,
    },
    /// The window reaches into the hour still open, or the future.
    #[error(
        "--until ({}) reaches into the open hour or the future; the last closed hour ends at {}",
        Rfc3339(*.until),
        Rfc3339(*.last_closed)
    )]
    NotClosed {
        /// The end asked for.
        until: OffsetDateTime,
        /// The end of the last closed hour.
        last_closed: OffsetDateTime,
    },
    /// The window is longer than [`MAX_SPAN_DAYS`] and `--allow-long-span` was not given.
    #[error(
        "the window spans {hours} hours, more than {MAX_SPAN_DAYS} days ({} hours); pass \
         --allow-long-span if you mean it",
        MAX_SPAN_DAYS * 24
    )]
    TooLong {
        /// The span asked for, in hours.
        hours: i64,
    },
}

/// The start of the hour `at` falls in, in UTC.
fn floor_hour(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.checked_to_offset(UtcOffset::UTC).unwrap_or(at);
    at.replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap_or(at)
}

fn on_the_hour(flag: &'static str, at: OffsetDateTime) -> Result<OffsetDateTime, WindowError> {
    let utc = keel_audit::utc_in_range(at).ok_or(WindowError::OutOfRange { flag, at })?;
    if floor_hour(utc) == utc {
        Ok(utc)
    } else {
        Err(WindowError::NotOnTheHour { flag, at })
    }
}

/// Resolves the window a run rates, and whether it was chosen explicitly.
///
/// With neither bound, the trailing 24 closed UTC hours ending at the start of the current hour
/// (a routine run). With either bound the window is explicit (a backfill); a missing side takes
/// its default (`until`: the start of the current hour; `since`: 24 hours before `until`).
/// Hours are UTC whatever offset the bounds are written in.
pub fn resolve_window(
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    now: OffsetDateTime,
    allow_long_span: bool,
) -> Result<(Window, bool), WindowError> {
    let explicit = since.is_some() || until.is_some();
    let last_closed = floor_hour(now);
    let end = match until {
        Some(until) => on_the_hour("until", until)?,
        None => last_closed,
    };
    let start = match since {
        Some(since) => on_the_hour("since", since)?,
        None => end - Duration::hours(DEFAULT_HOURS),
    };
    if start < time::macros::datetime!(0001-01-01 00:00 UTC) {
        return Err(WindowError::BeforeYearOne { start });
    }
    if start >= end {
        return Err(WindowError::Empty {
            since: start,
            until: end,
        });
    }
    if end > last_closed {
        return Err(WindowError::NotClosed {
            until: end,
            last_closed,
        });
    }
    if end - start > Duration::days(MAX_SPAN_DAYS) && !allow_long_span {
        return Err(WindowError::TooLong {
            hours: (end - start).whole_hours(),
        });
    }
    Ok((Window { start, end }, explicit))
}

#[cfg(test)]
mod tests {

    /// A window that would start before year 1 is refused before anything connects: no stored
    /// time may be earlier, so the run would fail after taking its lock, with no ledger row.
    #[test]
    fn a_window_before_year_one_is_refused() {
        let now = time::macros::datetime!(2026-12-02 12:30 UTC);
        let year_one = time::macros::datetime!(0001-01-01 00:00 UTC);
        let err = resolve_window(None, Some(year_one), now, false).unwrap_err();
        assert!(matches!(err, WindowError::BeforeYearOne { .. }), "{err:?}");
        assert!(err.to_string().contains("0001-01-01T00:00:00Z"), "{err}");
        assert!(
            resolve_window(
                Some(year_one),
                Some(year_one + Duration::hours(1)),
                now,
                false
            )
            .is_ok()
        );
    }

    use super::*;
    use time::macros::datetime;

    /// A bound whose UTC instant lies past the year 9999 (`9999-12-31T23:00:00-01:00`) is a
    /// clear error naming the flag, never a panic converting it to UTC.
    #[test]
    fn a_bound_utc_cannot_hold_is_refused_with_its_flag() {
        let now = datetime!(2026-12-02 12:30 UTC);
        let past_9999 = datetime!(9999-12-31 23:00 -01:00);
        let err = resolve_window(None, Some(past_9999), now, true).unwrap_err();
        assert!(
            matches!(err, WindowError::OutOfRange { flag: "until", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("--until"), "{err}");
        let err = resolve_window(Some(past_9999), None, now, true).unwrap_err();
        assert!(
            matches!(err, WindowError::OutOfRange { flag: "since", .. }),
            "{err:?}"
        );
    }

    /// RATER-L1: messages printed `time`'s own format, named a flag the user did not pass,
    /// and said "spans 31 days, more than 31" for 31 days and an hour.
    #[test]
    fn window_errors_speak_rfc3339_and_name_only_what_was_given() {
        let now = datetime!(2026-11-22 10:17:33 UTC);
        let future = resolve_window(Some(datetime!(2026-11-22 12:00 UTC)), None, now, false)
            .unwrap_err()
            .to_string();
        assert!(future.contains("2026-11-22T12:00:00Z"), "{future}");
        assert!(future.contains("the start of the current hour"), "{future}");
        let long = resolve_window(
            Some(datetime!(2026-10-01 09:00 UTC)),
            Some(datetime!(2026-11-01 10:00 UTC)),
            now,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            long.contains("745 hours, more than 31 days (744 hours)"),
            "{long}"
        );
        let off = resolve_window(Some(datetime!(2026-11-20 00:30 UTC)), None, now, false)
            .unwrap_err()
            .to_string();
        assert!(off.contains("--since (2026-11-20T00:30:00Z)"), "{off}");
    }

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:17:33 UTC);

    fn check(
        since: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
        expected: Result<(OffsetDateTime, OffsetDateTime, bool), WindowError>,
    ) {
        let got = resolve_window(since, until, NOW, false)
            .map(|(w, explicit)| (w.start(), w.end(), explicit));
        assert_eq!(got, expected, "since {since:?}, until {until:?}");
    }

    #[test]
    fn the_default_is_the_trailing_24_closed_hours_and_routine() {
        check(
            None,
            None,
            Ok((
                datetime!(2026-11-21 10:00 UTC),
                datetime!(2026-11-22 10:00 UTC),
                false,
            )),
        );
    }

    #[test]
    fn a_single_flag_is_explicit_and_the_other_side_takes_its_default() {
        check(
            Some(datetime!(2026-11-22 03:00 UTC)),
            None,
            Ok((
                datetime!(2026-11-22 03:00 UTC),
                datetime!(2026-11-22 10:00 UTC),
                true,
            )),
        );
        check(
            None,
            Some(datetime!(2026-11-20 00:00 UTC)),
            Ok((
                datetime!(2026-11-19 00:00 UTC),
                datetime!(2026-11-20 00:00 UTC),
                true,
            )),
        );
    }

    #[test]
    fn hours_are_utc_whatever_the_offset_they_are_written_in() {
        check(
            Some(datetime!(2026-11-22 08:30 +05:30)),
            Some(datetime!(2026-11-22 05:00 -02:00)),
            Ok((
                datetime!(2026-11-22 03:00 UTC),
                datetime!(2026-11-22 07:00 UTC),
                true,
            )),
        );
        check(
            Some(datetime!(2026-11-22 08:00 +05:30)),
            None,
            Err(WindowError::NotOnTheHour {
                flag: "since",
                at: datetime!(2026-11-22 08:00 +05:30),
            }),
        );
    }

    #[test]
    fn bad_windows_are_refused_with_the_reason() {
        let at = datetime!(2026-11-22 04:00 UTC);
        check(
            Some(at),
            Some(at),
            Err(WindowError::Empty {
                since: at,
                until: at,
            }),
        );
        check(
            Some(datetime!(2026-11-22 05:00 UTC)),
            Some(at),
            Err(WindowError::Empty {
                since: datetime!(2026-11-22 05:00 UTC),
                until: at,
            }),
        );
        check(
            None,
            Some(datetime!(2026-11-22 04:30 UTC)),
            Err(WindowError::NotOnTheHour {
                flag: "until",
                at: datetime!(2026-11-22 04:30 UTC),
            }),
        );
        check(
            None,
            Some(datetime!(2026-11-22 11:00 UTC)),
            Err(WindowError::NotClosed {
                until: datetime!(2026-11-22 11:00 UTC),
                last_closed: datetime!(2026-11-22 10:00 UTC),
            }),
        );
        check(
            Some(datetime!(2026-10-01 00:00 UTC)),
            None,
            Err(WindowError::TooLong { hours: 1258 }),
        );
    }

    #[test]
    fn windows_display_as_half_open_rfc3339_ranges() {
        let (window, _) = resolve_window(None, None, NOW, false).unwrap();
        assert_eq!(
            window.to_string(),
            "[2026-11-21T10:00:00Z, 2026-11-22T10:00:00Z)"
        );
    }

    #[test]
    fn a_long_span_needs_the_flag_and_is_cut_into_days() {
        let since = Some(datetime!(2026-10-01 00:00 UTC));
        let (window, explicit) = resolve_window(since, None, NOW, true).unwrap();
        assert!(explicit);
        let days = window.days();
        assert_eq!(days.len(), 53);
        assert_eq!(days[0].start(), window.start());
        assert_eq!(days.last().unwrap().end(), window.end());
        assert!(days.windows(2).all(|pair| pair[0].end() == pair[1].start()));
        assert_eq!(days.iter().map(Window::hours).sum::<i64>(), window.hours());
    }
}
