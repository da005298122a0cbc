//! The money model: declared scales and ranges, enforced by `BillingEvent::new`, by CHECK
//! constraints on the contract tables (migration 0030) and by the rating statement.
//!
//! | value | range | scale |
//! |---|---|---|
//! | event quantity | `0 <= q < 10^15` | 6 decimal places |
//! | unit price | `0 <= p < 10^6` | 9 decimal places |
//! | rated hour's quantity | `0 <= q < 10^18` | 6 |
//! | rated hour's amount | `0 <= a < 10^18`, `round(quantity * unit_price, 9)` (half away from zero) | 9 |
//!
//! Every value in range fits [`Decimal`] exactly, so no stored row can fail decoding. An hour
//! whose quantity or amount would leave its range is not rated: it is reported as an anomaly
//! (`out_of_range`, exit 2) and the rest of the window is rated as usual.

use rust_decimal::Decimal;

/// Decimal places an event quantity may have.
pub const QUANTITY_SCALE: u32 = 6;
/// Decimal places a unit price may have.
pub const PRICE_SCALE: u32 = 9;
/// Decimal places of a rated amount: `round(quantity * unit_price, AMOUNT_SCALE)`.
pub const AMOUNT_SCALE: u32 = 9;
/// An event quantity is below 10^15.
pub const MAX_EVENT_QUANTITY_DIGITS: u32 = 15;
/// A unit price is below 10^6.
pub const MAX_UNIT_PRICE_DIGITS: u32 = 6;

fn below_power_of_ten(value: Decimal, digits: u32) -> bool {
    let bound = Decimal::from(10u64.pow(digits));
    value < bound
}

/// Whether `quantity` is a valid event quantity: in range and at most [`QUANTITY_SCALE`] places.
pub fn quantity_in_range(quantity: Decimal) -> bool {
    !quantity.is_sign_negative()
        && below_power_of_ten(quantity, MAX_EVENT_QUANTITY_DIGITS)
        && quantity.normalize().scale() <= QUANTITY_SCALE
}

/// Whether `price` is a valid unit price: in range and at most [`PRICE_SCALE`] places.
pub fn unit_price_in_range(price: Decimal) -> bool {
    !price.is_sign_negative()
        && below_power_of_ten(price, MAX_UNIT_PRICE_DIGITS)
        && price.normalize().scale() <= PRICE_SCALE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn quantities_have_a_declared_scale_and_range() {
        assert!(quantity_in_range(d("0")));
        assert!(quantity_in_range(d("0.000001")));
        assert!(
            quantity_in_range(d("1.500000000")),
            "trailing zeros are fine"
        );
        assert!(quantity_in_range(d("999999999999999.999999")));
        assert!(!quantity_in_range(d("0.0000001")));
        assert!(!quantity_in_range(d("0.0000000000000000000000000001")));
        assert!(!quantity_in_range(d("1000000000000000")));
        assert!(!quantity_in_range(d("-1")));
    }

    #[test]
    fn prices_have_a_declared_scale_and_range() {
        assert!(unit_price_in_range(d("0.000000001")));
        assert!(unit_price_in_range(d("999999.999999999")));
        assert!(!unit_price_in_range(d("0.0000000001")));
        assert!(!unit_price_in_range(d("1000000")));
        assert!(!unit_price_in_range(d("-0.5")));
    }
}
