//! The rater's contract in a table: which window a run rates, and which exit code (and so
//! which page) each outcome gives. A routine run that deletes billed usage pages (exit 2); an
//! explicit backfill that does the same converges quietly (exit 0).
//!
//! Run with `cargo run -p keel-rater --example exit_codes`.

use keel_rater::{exit_code, resolve_window};
use time::macros::datetime;

fn main() -> Result<(), keel_rater::WindowError> {
    let now = datetime!(2026-11-22 10:17 UTC);
    let (window, explicit) = resolve_window(None, None, now, false)?;
    println!(
        "routine run at {now}: rates {} .. {} (explicit: {explicit})",
        window.start(),
        window.end()
    );
    let (window, explicit) = resolve_window(
        Some(datetime!(2026-11-20 00:00 UTC)),
        Some(datetime!(2026-11-21 00:00 UTC)),
        now,
        false,
    )?;
    println!(
        "backfill: rates {} .. {} (explicit: {explicit})",
        window.start(),
        window.end()
    );

    println!("\ndeletions  explicit  anomaly  exit");
    for (deletions, explicit, anomaly) in [
        (0, false, false),
        (3, false, false),
        (3, true, false),
        (0, true, true),
    ] {
        let exit = exit_code(deletions, explicit, anomaly);
        println!(
            "{deletions:>9}  {explicit:<8}  {anomaly:<7}  {}",
            exit.code()
        );
    }
    Ok(())
}
