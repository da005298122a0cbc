//! No panic anywhere in the rater's input handling: property tests over arbitrary inputs, a
//! bounded number of cases per run (`PROPTEST_CASES` raises it), for body capture, window
//! resolution, event validation, the money model and audit attribute building.

use keel_rater::{
    BillingEvent, Changes, RateReport, Rated, RatedChange, UsageKey, capture, loss_attributes,
    money, resolve_window, truncate_on_char_boundary,
};
use proptest::prelude::*;
use rust_decimal::Decimal;
use time::{Duration, OffsetDateTime};

fn any_time() -> impl Strategy<Value = OffsetDateTime> {
    // Any instant between years -9999 and 9999, to the nanosecond.
    (-377_705_116_800i64..253_402_300_799i64, 0u32..1_000_000_000).prop_map(|(secs, nanos)| {
        OffsetDateTime::from_unix_timestamp(secs)
            .map(|t| t + Duration::nanoseconds(i64::from(nanos)))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    })
}

fn any_decimal() -> impl Strategy<Value = Decimal> {
    (any::<i64>(), any::<u32>(), any::<bool>(), 0u32..=28).prop_map(|(lo, mid, negative, scale)| {
        Decimal::from_parts(lo as u32, (lo >> 32) as u32, mid, negative, scale)
    })
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        "[a-z0-9._:-]{0,200}",
        proptest::collection::vec(any::<char>(), 0..1500).prop_map(|c| c.into_iter().collect()),
    ]
}

fn rated(text: String) -> Rated {
    Rated {
        quantity: text.clone(),
        event_count: 1,
        unit_price: Some(text.clone()),
        amount: Some(text.clone()),
        currency: Some(text),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn capture_never_panics_and_respects_its_cap(
        id in any_text(),
        body in proptest::collection::vec(any::<u8>(), 0..4096),
        cap in 0usize..5000,
    ) {
        let captured = capture(&id, &body, cap);
        prop_assert!(captured.body().len() <= cap);
        prop_assert!(!captured.body().contains('\0'));
        prop_assert_eq!(captured.original_len(), body.len());
        let stored_id = keel_rater::sanitize_request_id(&id);
        prop_assert!(stored_id.len() <= keel_rater::MAX_REQUEST_ID_LEN);
        prop_assert!(!stored_id.contains('\0'));
    }

    #[test]
    fn window_resolution_never_panics(
        since in proptest::option::of(any_time()),
        until in proptest::option::of(any_time()),
        now in any_time(),
        long in any::<bool>(),
    ) {
        if let Ok((window, _)) = resolve_window(since, until, now, long) {
            prop_assert!(window.start() < window.end());
            prop_assert!(window.end() <= now);
            let days = window.days();
            prop_assert_eq!(days.first().map(|d| d.start()), Some(window.start()));
            prop_assert_eq!(days.last().map(|d| d.end()), Some(window.end()));
            let _ = window.to_string();
        }
    }

    #[test]
    fn event_validation_never_panics_and_accepts_only_the_money_model(
        id in any_text(), auth in any_text(), meter in any_text(), source in any_text(),
        quantity in any_decimal(), at in any_time(), now in any_time(),
    ) {
        if let Ok(event) = BillingEvent::new(&id, &auth, &meter, quantity, at, now) {
            prop_assert!(money::quantity_in_range(event.quantity()));
            prop_assert!(event.auth_id().chars().all(|c| c.is_ascii_graphic()));
            let _ = event.with_source(&source);
        }
        let _ = money::unit_price_in_range(quantity);
    }

    #[test]
    fn audit_attributes_are_always_built_within_limits(
        auth in any_text(), meter in any_text(), value in any_text(),
        count in any::<u64>(), run_id in proptest::option::of(any::<i64>()),
        explicit in any::<bool>(), at in any_time(),
    ) {
        let change = RatedChange {
            key: UsageKey { auth_id: auth, meter, window_start: at },
            old: Some(rated(value.clone())),
            new: Some(rated(value.clone())),
        };
        let mut changes = Changes::default();
        changes.add(count % 1000, std::iter::repeat_n(change, 60));
        let report = RateReport {
            deleted: changes.clone(),
            lowered: changes.clone(),
            price_lost: changes,
            ..RateReport::default()
        };
        let day = resolve_window(None, None, OffsetDateTime::UNIX_EPOCH + Duration::days(30), false)
            .unwrap()
            .0;
        let attributes = loss_attributes(&report, day, explicit, run_id);
        prop_assert!(attributes.is_ok(), "{:?}", attributes.err());

        let mut cut = value.clone();
        let max = value.len() / 2;
        truncate_on_char_boundary(&mut cut, max);
        prop_assert!(cut.len() <= max && value.starts_with(cut.as_str()));
    }
}
