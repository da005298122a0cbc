//! Test doubles (feature `testing`): a reclaimer that destroys nothing and answers what a
//! closure says, recording every name it was asked for (masked).

use std::sync::{Arc, Mutex, PoisonError};

use keel_provision::BackendName;
use time::OffsetDateTime;

use crate::ports::{ReclaimError, Reclaimed, Reclaimer, sealed};

type Answer = dyn Fn(&BackendName, OffsetDateTime) -> Result<Reclaimed, ReclaimError> + Send + Sync;

/// A [`Reclaimer`] for tests: answers with `answer`, destroys nothing, and records the masked
/// name of every object it was asked to reclaim. Cheap to clone (shared).
#[derive(Clone)]
pub struct ScriptedReclaimer {
    answer: Arc<Answer>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for ScriptedReclaimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedReclaimer")
            .field("asked", &self.asked())
            .finish_non_exhaustive()
    }
}

impl ScriptedReclaimer {
    /// A reclaimer answering with `answer`.
    pub fn new(
        answer: impl Fn(&BackendName, OffsetDateTime) -> Result<Reclaimed, ReclaimError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            answer: Arc::new(answer),
            asked: Arc::default(),
        }
    }

    /// A reclaimer that answers [`Reclaimed::TornDown`] to everything.
    pub fn tearing_down() -> Self {
        Self::new(|_, _| Ok(Reclaimed::TornDown))
    }

    /// The masked names asked so far, in order.
    pub fn asked(&self) -> Vec<String> {
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl sealed::Sealed for ScriptedReclaimer {}

impl Reclaimer for ScriptedReclaimer {
    async fn reclaim(
        &self,
        name: &BackendName,
        now: OffsetDateTime,
    ) -> Result<Reclaimed, ReclaimError> {
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name.masked());
        (self.answer)(name, now)
    }
}
