//! The rater's exit-code contract.

/// How a rater run ends, as a process exit code.
///
/// | code | meaning |
/// |---|---|
/// | 0 | clean |
/// | 1 | error (configuration, database) |
/// | 2 | attention: an anomaly (unpriced or out-of-range hours, late usage), or a routine run that lowered or removed previously rated usage — page someone |
/// | 3 | skipped: another rater holds the single-flight lock; only the ledger row was written |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RaterExit {
    /// Nothing needs anyone.
    Clean,
    /// The run failed.
    Error,
    /// The run finished but someone must look.
    Attention,
    /// Another rater was running; this one did nothing.
    Locked,
}

impl RaterExit {
    /// The process exit code.
    pub const fn code(self) -> u8 {
        match self {
            RaterExit::Clean => 0,
            RaterExit::Error => 1,
            RaterExit::Attention => 2,
            RaterExit::Locked => 3,
        }
    }
}

/// The exit of a run that rated its window.
///
/// `losses` counts rated hours whose billed value went down or away (deleted, lowered, or that
/// lost their price). Deliberately not folded into an anomaly check: losses on an explicit
/// backfill are the convergence the operator asked for and exit 0, while the same losses on a
/// routine run mean billed usage vanished and exit 2. An anomaly exits 2 either way.
pub const fn exit_code(losses: u64, window_explicit: bool, has_anomaly: bool) -> RaterExit {
    if has_anomaly || (losses > 0 && !window_explicit) {
        RaterExit::Attention
    } else {
        RaterExit::Clean
    }
}

/// How loudly a reconcile deletion is logged: the same gate as the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletionSeverity {
    /// A routine run rewrote a prior bill.
    Error,
    /// An explicit backfill converged.
    Info,
}

/// The log severity for reconcile deletions on a run whose window was or was not explicit.
pub const fn deletion_severity(window_explicit: bool) -> DeletionSeverity {
    if window_explicit {
        DeletionSeverity::Info
    } else {
        DeletionSeverity::Error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_contract_table() {
        use RaterExit::*;
        // (deletions, explicit, anomaly) -> exit
        let table = [
            ((0, false, false), Clean),
            ((0, true, false), Clean),
            ((3, false, false), Attention), // routine run rewrote a prior bill: page
            ((3, true, false), Clean),      // backfill converged: quiet
            ((0, false, true), Attention),
            ((0, true, true), Attention), // an anomaly during a backfill still pages
            ((3, true, true), Attention),
            ((3, false, true), Attention),
        ];
        for ((deletions, explicit, anomaly), expected) in table {
            assert_eq!(
                exit_code(deletions, explicit, anomaly),
                expected,
                "{deletions} {explicit} {anomaly}"
            );
        }
    }

    #[test]
    fn codes_are_the_documented_ones_and_never_64() {
        assert_eq!(
            [
                RaterExit::Clean,
                RaterExit::Error,
                RaterExit::Attention,
                RaterExit::Locked
            ]
            .map(RaterExit::code),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn deletion_severity_follows_the_exit_gate() {
        assert_eq!(deletion_severity(false), DeletionSeverity::Error);
        assert_eq!(deletion_severity(true), DeletionSeverity::Info);
        for explicit in [false, true] {
            let pages = exit_code(1, explicit, false) == RaterExit::Attention;
            assert_eq!(
                pages,
                deletion_severity(explicit) == DeletionSeverity::Error
            );
        }
    }
}
