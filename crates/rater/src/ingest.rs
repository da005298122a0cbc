//! Validating a billing event before it is recorded.

use rust_decimal::Decimal;
use time::{Duration, OffsetDateTime};

use crate::money;

/// The source of events recorded without [`BillingEvent::with_source`].
pub const DEFAULT_SOURCE: &str = "default";

/// How far in the future an event's time may be (clock skew between producers).
pub const MAX_FUTURE_SKEW: Duration = Duration::minutes(5);

/// One usage event, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillingEvent {
    source: String,
    event_id: String,
    auth_id: String,
    meter: String,
    quantity: Decimal,
    occurred_at: OffsetDateTime,
}

/// Why an event was refused. Nothing was recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// An id or the meter is empty, too long, or has odd characters.
    #[error("invalid {field}: use 1 to {max} printable characters without spaces")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// Its longest accepted length.
        max: usize,
    },
    /// A negative quantity.
    #[error("quantity {0} is negative; usage is never negative")]
    NegativeQuantity(Decimal),
    /// A quantity outside the money model: 10^15 or more, or more than 6 decimal places.
    #[error(
        "quantity {0} is out of range: use less than 10^15 with at most 6 decimal places \
         (aggregate finer usage before sending it)"
    )]
    QuantityOutOfRange(Decimal),
    /// An event time more than five minutes ahead of now.
    #[error(
        "occurred_at {occurred_at} is more than 5 minutes ahead of now ({now}); check the producer's clock"
    )]
    InTheFuture {
        /// The event's time.
        occurred_at: OffsetDateTime,
        /// The ingesting clock.
        now: OffsetDateTime,
    },
}

fn field(field: &'static str, value: &str, max: usize) -> Result<String, IngestError> {
    let ok = !value.is_empty() && value.len() <= max && value.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(value.to_owned())
    } else {
        Err(IngestError::InvalidField { field, max })
    }
}

impl BillingEvent {
    /// Validates an event against the ingesting clock `now`.
    pub fn new(
        event_id: &str,
        auth_id: &str,
        meter: &str,
        quantity: Decimal,
        occurred_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Self, IngestError> {
        let event = Self {
            source: DEFAULT_SOURCE.to_owned(),
            event_id: field("event_id", event_id, 128)?,
            auth_id: field("auth_id", auth_id, 128)?,
            meter: field("meter", meter, 64)?,
            quantity,
            occurred_at,
        };
        if quantity.is_sign_negative() && !quantity.is_zero() {
            return Err(IngestError::NegativeQuantity(quantity));
        }
        if !money::quantity_in_range(quantity) {
            return Err(IngestError::QuantityOutOfRange(quantity));
        }
        if occurred_at > now + MAX_FUTURE_SKEW {
            return Err(IngestError::InTheFuture { occurred_at, now });
        }
        Ok(event)
    }

    /// The same event from producer `source` (event ids are unique per source).
    pub fn with_source(mut self, source: &str) -> Result<Self, IngestError> {
        self.source = field("source", source, 64)?;
        Ok(self)
    }

    /// The producing system; event ids are deduplicated within it.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The producer's id: the dedupe key within [`BillingEvent::source`].
    pub fn event_id(&self) -> &str {
        &self.event_id
    }
    /// Whose usage it is.
    pub fn auth_id(&self) -> &str {
        &self.auth_id
    }
    /// What was used.
    pub fn meter(&self) -> &str {
        &self.meter
    }
    /// How much.
    pub fn quantity(&self) -> Decimal {
        self.quantity
    }
    /// When.
    pub fn occurred_at(&self) -> OffsetDateTime {
        self.occurred_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

    fn event(quantity: i64, occurred_at: OffsetDateTime) -> Result<BillingEvent, IngestError> {
        BillingEvent::new(
            "evt-1",
            "auth-1",
            "requests",
            Decimal::from(quantity),
            occurred_at,
            NOW,
        )
    }

    #[test]
    fn events_are_validated_with_clear_errors() {
        assert!(event(0, NOW).is_ok());
        assert!(
            event(5, NOW + Duration::minutes(5)).is_ok(),
            "5 minutes of skew is fine"
        );
        assert_eq!(
            event(-1, NOW),
            Err(IngestError::NegativeQuantity(Decimal::from(-1)))
        );
        let late = NOW + Duration::minutes(6);
        assert_eq!(
            event(1, late),
            Err(IngestError::InTheFuture {
                occurred_at: late,
                now: NOW
            })
        );
        assert_eq!(
            BillingEvent::new("", "a", "m", Decimal::ONE, NOW, NOW),
            Err(IngestError::InvalidField {
                field: "event_id",
                max: 128
            })
        );
        let fine = "0.0000000000000000000000000001".parse().unwrap();
        assert_eq!(
            BillingEvent::new("e", "a", "m", fine, NOW, NOW),
            Err(IngestError::QuantityOutOfRange(fine))
        );
        assert!(matches!(
            BillingEvent::new("e", "a", "m", Decimal::ONE, NOW, NOW)
                .unwrap()
                .with_source("two words"),
            Err(IngestError::InvalidField {
                field: "source",
                ..
            })
        ));
        assert_eq!(
            BillingEvent::new("e", "a b", "m", Decimal::ONE, NOW, NOW),
            Err(IngestError::InvalidField {
                field: "auth_id",
                max: 128
            })
        );
    }
}
