//! Test doubles and the inventory port's contract (feature `testing`).
//!
//! - [`ScriptedReclaimer`]: a reclaimer that destroys nothing and answers what a closure says,
//!   recording every name it was asked for (masked).
//! - [`FakeInventory`]: an in-memory [`Inventory`] of named objects, with scripted failures.
//! - [`FakeLiveTokens`]: an in-memory [`LiveTokens`] answering from token sets, with scripted
//!   failures.
//! - [`inventory_contract`]: what every [`Inventory`] promises, as one story a user runs against
//!   their own adapter through an [`InventoryHarness`]; Keel runs it against [`FakeInventory`]
//!   and the Postgres adapter.
//! - [`live_tokens_contract`]: what every [`LiveTokens`] promises (liveness fails closed: a
//!   status the build does not know is live), run through a [`LiveTokensHarness`]; Keel runs it
//!   against [`FakeLiveTokens`] and the Postgres adapter.
//! - [`sweep_state_contract`]: what every [`SweepState`] promises about sightings (what is
//!   recorded, whole or by its changes, is what is read back; a lost claim writes nothing), run
//!   through a [`SweepStateHarness`]; Keel runs it against [`MemoryState`] and the Postgres
//!   adapter.
//!
//! ```
//! # async fn demo() {
//! use keel_orphan_sweep::InventorySource;
//! use keel_orphan_sweep::testing::{FakeInventory, inventory_contract};
//! use time::macros::datetime;
//!
//! let inventory = FakeInventory::new(InventorySource::Postgres, "cust_");
//! inventory_contract(&inventory, datetime!(2026-11-22 10:00 UTC)).await;
//! # }
//! ```

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use keel_audit::Token;
use keel_provision::{BackendName, InstallationId, TokenDigest, new_token};
use time::OffsetDateTime;

use crate::ports::{
    Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens, LiveTokensError,
    PeriodClaim, ReclaimError, Reclaimed, Reclaimer, Sighting, SightingChanges, Standings,
    SweepState, sealed,
};
use crate::state::{MemoryState, advance};

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

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

type Failure = Box<dyn FnOnce() -> InventoryError + Send>;

/// An in-memory [`Inventory`]: the objects put in it whose names start with its prefix, sorted by
/// name; each scripted failure answers one list with an error (never a partial list). Cheap to
/// clone (shared).
#[derive(Clone)]
pub struct FakeInventory {
    source: InventorySource,
    prefix: String,
    objects: Arc<Mutex<BTreeMap<String, InventoryItem>>>,
    failures: Arc<Mutex<VecDeque<Failure>>>,
    lists: Arc<Mutex<u32>>,
}

impl std::fmt::Debug for FakeInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Object names carry tokens: only counts are shown.
        f.debug_struct("FakeInventory")
            .field("source", &self.source)
            .field("objects", &locked(&self.objects).len())
            .field("lists", &self.lists())
            .finish_non_exhaustive()
    }
}

impl FakeInventory {
    /// An empty inventory of `source` listing objects whose names start with `prefix`.
    pub fn new(source: InventorySource, prefix: impl Into<String>) -> Self {
        Self {
            source,
            prefix: prefix.into(),
            objects: Arc::default(),
            failures: Arc::default(),
            lists: Arc::default(),
        }
    }

    /// Puts `item` in (replacing an object of the same name).
    pub fn put(&self, item: InventoryItem) {
        locked(&self.objects).insert(item.name.clone(), item);
    }

    /// Takes the object `name` out; whether it was there.
    pub fn take(&self, name: &str) -> bool {
        locked(&self.objects).remove(name).is_some()
    }

    /// The next list answers `failure()` instead (failures queue up, one per list).
    pub fn fail_next(&self, failure: impl FnOnce() -> InventoryError + Send + 'static) {
        locked(&self.failures).push_back(Box::new(failure));
    }

    /// How many lists were asked for, failed ones included.
    pub fn lists(&self) -> u32 {
        *locked(&self.lists)
    }
}

impl Inventory for FakeInventory {
    fn source(&self) -> InventorySource {
        self.source
    }

    async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
        *locked(&self.lists) += 1;
        let failure = locked(&self.failures).pop_front();
        if let Some(failure) = failure {
            return Err(failure());
        }
        Ok(locked(&self.objects)
            .values()
            .filter(|item| item.name.starts_with(&self.prefix))
            .cloned()
            .collect())
    }
}

/// An in-memory [`LiveTokens`] for one installation: tokens are live, owned or protected as set;
/// the answer covers only the digests asked about; each scripted failure answers one read with
/// an error. Cheap to clone (shared).
#[derive(Clone)]
pub struct FakeLiveTokens {
    installation: InstallationId,
    sets: Arc<Mutex<Standings>>,
    failures: Arc<Mutex<VecDeque<String>>>,
    asked: Arc<Mutex<Vec<usize>>>,
}

impl std::fmt::Debug for FakeLiveTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeLiveTokens")
            .field("installation", &self.installation)
            .field("asked", &self.asked())
            .finish_non_exhaustive()
    }
}

impl FakeLiveTokens {
    /// Standings of `installation` where nothing is live, owned or protected yet.
    pub fn new(installation: InstallationId) -> Self {
        Self {
            installation,
            sets: Arc::new(Mutex::new(Standings::empty(installation))),
            failures: Arc::default(),
            asked: Arc::default(),
        }
    }

    /// `token` has a row that is not terminal (live, and owned by this installation).
    pub fn live(&self, token: &Token) {
        let digest = TokenDigest::of(token);
        let mut sets = locked(&self.sets);
        sets.owned.insert(digest.clone());
        sets.live.insert(digest);
    }

    /// `token` has only terminal rows (owned by this installation, not live).
    pub fn ended(&self, token: &Token) {
        let digest = TokenDigest::of(token);
        let mut sets = locked(&self.sets);
        sets.live.remove(&digest);
        sets.owned.insert(digest);
    }

    /// `token` is protected from reclaim.
    pub fn protect(&self, token: &Token) {
        locked(&self.sets).protected.insert(TokenDigest::of(token));
    }

    /// The next read fails with `message` as its source (failures queue up, one per read).
    pub fn fail_next(&self, message: impl Into<String>) {
        locked(&self.failures).push_back(message.into());
    }

    /// How many digests each read asked about, in order (one read per tick, never one per
    /// token).
    pub fn asked(&self) -> Vec<usize> {
        locked(&self.asked).clone()
    }
}

impl LiveTokens for FakeLiveTokens {
    async fn standing_among(&self, digests: &[TokenDigest]) -> Result<Standings, LiveTokensError> {
        locked(&self.asked).push(digests.len());
        let failure = locked(&self.failures).pop_front();
        if let Some(message) = failure {
            return Err(LiveTokensError(message.into()));
        }
        let sets = locked(&self.sets);
        let among = |set: &HashSet<TokenDigest>| -> HashSet<TokenDigest> {
            digests
                .iter()
                .filter(|d| set.contains(*d))
                .cloned()
                .collect()
        };
        let mut standings = Standings::empty(self.installation);
        standings.live = among(&sets.live);
        standings.owned = among(&sets.owned);
        standings.protected = among(&sets.protected);
        Ok(standings)
    }
}

/// What [`inventory_contract`] needs beyond the [`Inventory`] port: making and removing backend
/// objects. Implement it for an adapter to check that adapter against the contract.
pub trait InventoryHarness: Inventory {
    /// The name the platform gives the object of `token` (under the inventory's prefix).
    fn name_for(&self, token: &str) -> String;

    /// A name for `token` outside the inventory's prefix (an object the platform did not name).
    fn foreign_name(&self, token: &str) -> String;

    /// Makes a backend object as `item` describes: its name, labels, annotations and creation
    /// time (whole seconds), so the backend reports them back.
    fn create(&self, item: &InventoryItem) -> impl Future<Output = ()> + Send;

    /// Removes the backend object `name`.
    fn remove(&self, name: &str) -> impl Future<Output = ()> + Send;
}

impl InventoryHarness for FakeInventory {
    fn name_for(&self, token: &str) -> String {
        format!("{}{token}", self.prefix)
    }

    fn foreign_name(&self, token: &str) -> String {
        format!("zz_not_{}{token}", self.prefix)
    }

    async fn create(&self, item: &InventoryItem) {
        self.put(item.clone());
    }

    async fn remove(&self, name: &str) {
        self.take(name);
    }
}

async fn contract_list<H: InventoryHarness>(inventory: &H, step: &str) -> Vec<InventoryItem> {
    let items = inventory
        .list()
        .await
        .unwrap_or_else(|e| panic!("{step}: the inventory failed to list: {e}"));
    let mut seen = HashSet::new();
    for item in &items {
        assert!(
            seen.insert(item.name.as_str()),
            "{step}: an object is listed twice"
        );
    }
    items
}

fn contract_find<'a>(items: &'a [InventoryItem], name: &str) -> Option<&'a InventoryItem> {
    items.iter().find(|item| item.name == name)
}

fn contract_token() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("ctr{}", &hex[..13])
}

/// The `Inventory` contract, as one story at `now` that makes and removes its own objects (fresh
/// random tokens, so it shares a backend with other objects and other runs): every object under
/// the prefix is listed once, with its labels, annotations and creation time, not terminating;
/// an object outside the prefix is not listed; listing twice gives the same objects; a removed
/// object is no longer listed. Panics at the first broken promise, never showing a name.
pub async fn inventory_contract<H: InventoryHarness>(inventory: &H, now: OffsetDateTime) {
    let now = now
        .replace_nanosecond(0)
        .unwrap_or_else(|e| panic!("whole seconds: {e}"));
    let (first, second, outside) = (contract_token(), contract_token(), contract_token());
    let older = InventoryItem::new(inventory.name_for(&first))
        .with_created_at(now - time::Duration::hours(3))
        .with_label(crate::MANAGED_BY_LABEL, crate::MANAGED_BY)
        .with_annotation(crate::PROTECT_ANNOTATION, "true");
    let newer = InventoryItem::new(inventory.name_for(&second))
        .with_created_at(now - time::Duration::minutes(10));
    let foreign = InventoryItem::new(inventory.foreign_name(&outside))
        .with_created_at(now - time::Duration::hours(3))
        .with_label(crate::MANAGED_BY_LABEL, crate::MANAGED_BY);
    for item in [&older, &newer, &foreign] {
        inventory.create(item).await;
    }

    // Every object under the prefix, as made; nothing outside it.
    let listed = contract_list(inventory, "after creating").await;
    for made in [&older, &newer] {
        let found = contract_find(&listed, &made.name)
            .unwrap_or_else(|| panic!("an object under the prefix is missing from the list"));
        assert_eq!(
            found.labels, made.labels,
            "an object's labels are not listed as made"
        );
        for (key, value) in &made.annotations {
            assert_eq!(
                found.annotations.get(key),
                Some(value),
                "annotation {key} is not listed as made"
            );
        }
        assert_eq!(
            found.created_at, made.created_at,
            "an object's creation time is not listed as made"
        );
        assert!(!found.terminating, "a live object is listed as terminating");
    }
    assert!(
        contract_find(&listed, &foreign.name).is_none(),
        "an object outside the prefix is listed"
    );

    // A second list gives the same objects.
    let again = contract_list(inventory, "listing again").await;
    for made in [&older, &newer] {
        assert!(
            contract_find(&again, &made.name).is_some(),
            "a second list lost an object"
        );
    }

    // A removed object is no longer listed; the other still is.
    inventory.remove(&older.name).await;
    let after = contract_list(inventory, "after removing one").await;
    assert!(
        contract_find(&after, &older.name).is_none(),
        "a removed object is still listed"
    );
    assert!(
        contract_find(&after, &newer.name).is_some(),
        "removing one object lost another"
    );

    inventory.remove(&newer.name).await;
    inventory.remove(&foreign.name).await;
    let end = contract_list(inventory, "after removing all").await;
    assert!(
        contract_find(&end, &newer.name).is_none(),
        "a removed object is still listed"
    );
}

/// What [`live_tokens_contract`] needs beyond the [`LiveTokens`] port: writing the platform's
/// rows for tokens. Implement it for an adapter to check that adapter against the contract.
pub trait LiveTokensHarness: LiveTokens {
    /// This installation's id, as the platform database knows it.
    fn installation(&self) -> impl Future<Output = InstallationId> + Send;

    /// Gives `token` a row whose status is not terminal and is one this build knows (e.g.
    /// `active`).
    fn seed_live(&self, token: &Token) -> impl Future<Output = ()> + Send;

    /// Gives `token` a row whose status is terminal (`deleted` or `failed`) and no other row.
    fn seed_terminal(&self, token: &Token) -> impl Future<Output = ()> + Send;

    /// Gives `token` a row whose status this build does not know (one the platform added
    /// later): the adapter must count it as live.
    fn seed_unknown_status(&self, token: &Token) -> impl Future<Output = ()> + Send;

    /// Protects `token` from reclaim.
    fn protect(&self, token: &Token) -> impl Future<Output = ()> + Send;
}

impl LiveTokensHarness for FakeLiveTokens {
    async fn installation(&self) -> InstallationId {
        self.installation
    }

    async fn seed_live(&self, token: &Token) {
        self.live(token);
    }

    async fn seed_terminal(&self, token: &Token) {
        self.ended(token);
    }

    async fn seed_unknown_status(&self, token: &Token) {
        // The fake keeps standings, not statuses: a row of a status it does not know is a row
        // that is not terminal.
        self.live(token);
    }

    async fn protect(&self, token: &Token) {
        FakeLiveTokens::protect(self, token);
    }
}

async fn contract_standings<H: LiveTokensHarness>(
    tokens: &H,
    digests: &[TokenDigest],
    step: &str,
) -> Standings {
    tokens
        .standing_among(digests)
        .await
        .unwrap_or_else(|e| panic!("{step}: the live-token read failed: {e}"))
}

/// The `LiveTokens` contract, as one story that seeds its own rows (fresh random tokens, so it
/// shares a database with other rows and other runs): a token with a known non-terminal row is
/// live and owned; one with only a terminal row is owned, not live; one with a row of a status
/// the build does not know is live and owned (liveness fails closed); a protected token is
/// protected; a token without a row is nothing; the answer covers only the digests asked (a
/// seeded token not asked about is in no set), names this installation, and an empty question
/// gets empty sets. Panics at the first broken promise, never showing a token or digest.
pub async fn live_tokens_contract<H: LiveTokensHarness>(tokens: &H) {
    let (live, ended, unknown, guarded, stranger, unasked) = (
        new_token(),
        new_token(),
        new_token(),
        new_token(),
        new_token(),
        new_token(),
    );
    tokens.seed_live(&live).await;
    tokens.seed_terminal(&ended).await;
    tokens.seed_unknown_status(&unknown).await;
    tokens.seed_terminal(&guarded).await;
    tokens.protect(&guarded).await;
    tokens.seed_live(&unasked).await;
    tokens.protect(&unasked).await;

    let installation = tokens.installation().await;
    let asked = [&live, &ended, &unknown, &guarded, &stranger].map(TokenDigest::of);
    let [live, ended, unknown, guarded, stranger] = asked.clone();
    let unasked = TokenDigest::of(&unasked);
    let standings = contract_standings(tokens, &asked, "asking about five tokens").await;
    assert_eq!(
        standings.installation, installation,
        "the standings name another installation"
    );
    assert!(
        standings.live.contains(&live) && standings.owned.contains(&live),
        "a token with a non-terminal row is not live and owned"
    );
    assert!(
        !standings.live.contains(&ended),
        "a token with only a terminal row is live"
    );
    assert!(
        standings.owned.contains(&ended),
        "a token with only a terminal row is not owned (any row proves ownership)"
    );
    assert!(
        standings.live.contains(&unknown),
        "a token whose row has a status this build does not know is not live (liveness must \
         fail closed)"
    );
    assert!(
        standings.owned.contains(&unknown),
        "a token whose row has an unknown status is not owned"
    );
    assert!(
        standings.protected.contains(&guarded),
        "a protected token is not protected"
    );
    assert!(
        !standings.live.contains(&guarded) && standings.owned.contains(&guarded),
        "protecting a terminal token changed its liveness or ownership"
    );
    for (set, what) in [
        (&standings.live, "live"),
        (&standings.owned, "owned"),
        (&standings.protected, "protected"),
    ] {
        assert!(!set.contains(&stranger), "a token without a row is {what}");
        assert!(
            !set.contains(&unasked),
            "a token nobody asked about is answered as {what}"
        );
        assert!(
            set.iter().all(|digest| asked.contains(digest)),
            "the {what} set holds a digest nobody asked about"
        );
    }
    assert!(
        !standings.protected.contains(&live) && !standings.protected.contains(&unknown),
        "an unprotected token is protected"
    );

    // Asking again gives the same answer; asking about nothing gets nothing.
    let again = contract_standings(tokens, &asked, "asking again").await;
    assert!(again == standings, "asking again gave another answer");
    let empty = contract_standings(tokens, &[], "asking about no token").await;
    assert_eq!(
        empty.installation, installation,
        "the standings name another installation"
    );
    assert!(
        empty.live.is_empty() && empty.owned.is_empty() && empty.protected.is_empty(),
        "asking about no token answered about some"
    );

    // A large question (an inventory's worth: the five among 20 000 digests without a row,
    // each of the five asked twice) gets the same answer: an adapter that reads a large
    // question in parts, or deduplicates it, must answer for every part.
    let stranger_digest = |i: u32, high: bool| {
        let fill = if high { 'f' } else { '0' };
        let hex = format!("{}{i:08x}", fill.to_string().repeat(40));
        TokenDigest::parse(&hex).expect("48 hex digits")
    };
    let mut large: Vec<TokenDigest> = (0..10_000).map(|i| stranger_digest(i, false)).collect();
    large.extend(asked.iter().cloned());
    large.extend((0..10_000).map(|i| stranger_digest(i, true)));
    large.extend(asked.iter().rev().cloned());
    let answer = contract_standings(tokens, &large, "asking a large question").await;
    assert!(
        answer == standings,
        "a large question got another answer about the same tokens"
    );
}

/// What [`sweep_state_contract`] needs beyond the [`SweepState`] port: the store, and periods
/// claimed at will (a store claims by its own clock, and the story spans several periods).
pub trait SweepStateHarness {
    /// The store under test.
    type State: SweepState;

    /// The store.
    fn state(&self) -> &Self::State;

    /// Makes `period` (later than any claimed before) the newest claim of `source`.
    fn claim_period(
        &self,
        source: InventorySource,
        period: i64,
    ) -> impl Future<Output = PeriodClaim> + Send;
}

/// Claims through [`SweepState::claim`] with `now` `period` seconds after the epoch and a
/// one-second interval.
impl SweepStateHarness for MemoryState {
    type State = Self;

    fn state(&self) -> &Self {
        self
    }

    async fn claim_period(&self, source: InventorySource, period: i64) -> PeriodClaim {
        let now =
            OffsetDateTime::from_unix_timestamp(period).expect("a period within time's range");
        self.claim(source, std::time::Duration::from_secs(1), now)
            .await
            .expect("the memory store claims")
            .expect("a period later than any claimed before")
    }
}

async fn contract_read<S: SweepState>(
    state: &S,
    source: InventorySource,
    step: &str,
) -> Vec<Sighting> {
    let mut read = state
        .sightings(source)
        .await
        .unwrap_or_else(|e| panic!("{step}: the sightings could not be read: {e}"));
    read.sort_by(|a, b| a.key.cmp(&b.key));
    read
}

/// The changes from `stored` to `now`, as a tick works them out.
fn contract_changes(stored: &[Sighting], now: &[Sighting]) -> (Vec<bool>, Vec<String>) {
    let continued = now
        .iter()
        .map(|s| {
            stored
                .iter()
                .find(|stored| stored.key == s.key)
                .is_some_and(|stored| s.continues(stored))
        })
        .collect();
    let vanished = stored
        .iter()
        .filter(|stored| now.iter().all(|s| s.key != stored.key))
        .map(|stored| stored.key.clone())
        .collect();
    (continued, vanished)
}

/// Records `now` under `claim`, told `continued` and `vanished`, and checks that what is read
/// back is `now` (as a set): what a replace of the whole set would leave.
async fn contract_record<S: SweepState>(
    state: &S,
    source: InventorySource,
    claim: &PeriodClaim,
    now: &[Sighting],
    (continued, vanished): (&[bool], &[String]),
    step: &str,
) -> Vec<Sighting> {
    let changes = SightingChanges {
        continued,
        vanished,
    };
    state
        .record(source, claim, now, changes)
        .await
        .unwrap_or_else(|e| panic!("{step}: the record failed: {e}"));
    // As a tick does, the recorded sightings go back to the store, which may answer the read
    // below with them.
    state.keep_recorded(source, now.to_vec());
    let read = contract_read(state, source, step).await;
    let mut expected = now.to_vec();
    expected.sort_by(|a, b| a.key.cmp(&b.key));
    assert!(
        read == expected,
        "{step}: what a record recorded is not what is read back: {read:?}"
    );
    read
}

/// The `SweepState` contract for sightings, as one story over three periods of `source` from
/// `first_period` (the store must hold no sightings of `source` before): what
/// [`SweepState::replace`] records is what [`SweepState::sightings`] reads back (as a set);
/// what [`SweepState::record`] records, told the changes a tick works out (runs carried on,
/// changed, new, vanished, a quarantine and a failed reclaim later in the same period), reads back the same as
/// a replace of the whole set would, also when the recorded sightings are handed back with
/// [`SweepState::keep_recorded`] before the read; under a claim that is no longer the newest,
/// both are refused and change nothing, and what such a refused write is handed back is never
/// read. Panics at the first broken promise.
pub async fn sweep_state_contract<H: SweepStateHarness>(
    harness: &H,
    source: InventorySource,
    first_period: i64,
) {
    let state = harness.state();
    let key = |c: char| format!("customer_database:{}", c.to_string().repeat(48));
    let start = OffsetDateTime::from_unix_timestamp(1_764_496_800).expect("a valid instant");
    let hour = time::Duration::hours(1);

    let first = harness.claim_period(source, first_period).await;
    let seen: Vec<Sighting> = ['a', 'b', 'c', 'd']
        .into_iter()
        .map(|c| advance(None, key(c), first.period, start, c != 'b' && c != 'd').0)
        .collect();
    state
        .replace(source, &first, &seen)
        .await
        .unwrap_or_else(|e| panic!("replace: {e}"));
    assert!(
        contract_read(state, source, "after a replace").await == seen,
        "what a replace recorded is not what is read back"
    );

    // The next period: a and b carry their runs on, c stops being reclaimable, d vanishes, e is
    // new.
    let next = harness.claim_period(source, first_period + 1).await;
    let stored = contract_read(state, source, "before the next period").await;
    let mut now: Vec<Sighting> = [('a', true), ('b', false), ('c', false), ('e', true)]
        .into_iter()
        .map(|(c, reclaimable)| {
            let prev = stored.iter().find(|s| s.key == key(c));
            advance(prev, key(c), next.period, start + hour, reclaimable).0
        })
        .collect();
    let (continued, vanished) = contract_changes(&stored, &now);
    assert_eq!(
        continued,
        [true, true, false, false],
        "the story's own changes"
    );
    let read = contract_record(
        state,
        source,
        &next,
        &now,
        (&continued, &vanished),
        "the next period",
    )
    .await;
    assert_eq!(
        read[0].consecutive, 2,
        "a carried-on run is a period longer"
    );

    // Later in the same period the chokepoint refuses b: only its quarantine changes.
    now[1].quarantined = Some("refused".to_owned());
    let continued = [true, false, true, true];
    contract_record(
        state,
        source,
        &next,
        &now,
        (&continued, &[]),
        "a quarantine in the same period",
    )
    .await;

    // Then a's reclaim fails: only its count of failed reclaims changes.
    now[0].failed_reclaims = 1;
    let continued = [false, true, true, true];
    let read = contract_record(
        state,
        source,
        &next,
        &now,
        (&continued, &[]),
        "a failed reclaim in the same period",
    )
    .await;
    assert_eq!(
        read[0].failed_reclaims, 1,
        "a failed reclaim is not counted"
    );

    // A newer claim: the older one records nothing, whole or by changes.
    let last = harness.claim_period(source, first_period + 2).await;
    let changes = SightingChanges {
        continued: &continued,
        vanished: &[],
    };
    assert!(
        state.record(source, &next, &now, changes).await.is_err(),
        "a record under a lost claim was accepted"
    );
    assert!(
        state.replace(source, &next, &[]).await.is_err(),
        "a replace under a lost claim was accepted"
    );
    state.keep_recorded(source, Vec::new());
    assert!(
        contract_read(state, source, "after lost claims").await == now,
        "a lost claim changed the sightings"
    );

    // Every sighting vanishes.
    let vanished: Vec<String> = now.iter().map(|s| s.key.clone()).collect();
    let read = contract_record(state, source, &last, &[], (&[], &vanished), "all vanished").await;
    assert!(read.is_empty(), "vanished sightings are still read");
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

    fn block_on<F: Future>(future: F) -> F::Output {
        // The fakes never wait: a no-op waker polls them to completion.
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }

    /// The message a contract run by `run` failed with; a contract that passed fails the test
    /// with `passed`.
    fn contract_failure(run: impl FnOnce(), passed: &str) -> String {
        let payload =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).expect_err(passed);
        payload
            .downcast_ref::<&str>()
            .map(|message| (*message).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    }

    /// The in-memory state store keeps the contract every state store is held to.
    #[test]
    fn the_memory_state_keeps_the_sweep_state_contract() {
        let state = MemoryState::new();
        block_on(sweep_state_contract(
            &state,
            InventorySource::Kubernetes,
            1_000,
        ));
    }

    /// A store that records only the sightings a tick marked changed and never deletes the
    /// vanished ones: the contract catches it.
    struct KeepsVanished(MemoryState);

    impl SweepState for KeepsVanished {
        async fn claim(
            &self,
            source: InventorySource,
            interval: std::time::Duration,
            now: OffsetDateTime,
        ) -> Result<Option<PeriodClaim>, crate::StateError> {
            self.0.claim(source, interval, now).await
        }
        async fn holds(
            &self,
            source: InventorySource,
            claim: &PeriodClaim,
        ) -> Result<bool, crate::StateError> {
            self.0.holds(source, claim).await
        }
        async fn sightings(
            &self,
            source: InventorySource,
        ) -> Result<Vec<Sighting>, crate::StateError> {
            self.0.sightings(source).await
        }
        async fn replace(
            &self,
            source: InventorySource,
            claim: &PeriodClaim,
            sightings: &[Sighting],
        ) -> Result<(), crate::StateError> {
            self.0.replace(source, claim, sightings).await
        }
        async fn record(
            &self,
            source: InventorySource,
            claim: &PeriodClaim,
            sightings: &[Sighting],
            changes: SightingChanges<'_>,
        ) -> Result<(), crate::StateError> {
            let mut kept = self.0.sightings(source).await?;
            for (sighting, &continued) in sightings.iter().zip(changes.continued) {
                if !continued {
                    kept.retain(|s| s.key != sighting.key);
                    kept.push(sighting.clone());
                }
            }
            self.0.replace(source, claim, &kept).await
        }
    }

    impl SweepStateHarness for KeepsVanished {
        type State = Self;
        fn state(&self) -> &Self {
            self
        }
        async fn claim_period(&self, source: InventorySource, period: i64) -> PeriodClaim {
            self.0.claim_period(source, period).await
        }
    }

    #[test]
    fn the_sweep_state_contract_catches_a_store_that_keeps_vanished_sightings() {
        let broken = KeepsVanished(MemoryState::new());
        let message = contract_failure(
            || block_on(sweep_state_contract(&broken, InventorySource::Postgres, 7)),
            "the contract passed a store that keeps vanished sightings",
        );
        assert!(
            message.contains("what a record recorded is not what is read back"),
            "the contract failed for another reason: {message}"
        );
    }

    /// LIB-7: the fake inventory keeps the contract every adapter is held to.
    #[test]
    fn the_fake_inventory_keeps_the_inventory_contract() {
        let inventory = FakeInventory::new(InventorySource::Postgres, "cust_");
        block_on(inventory_contract(&inventory, NOW));
        assert_eq!(inventory.lists(), 4);
    }

    /// LIB-7: the fake live-token source keeps the contract every adapter is held to.
    #[test]
    fn the_fake_live_tokens_keep_the_live_tokens_contract() {
        let tokens = FakeLiveTokens::new(InstallationId::from_uuid(uuid::Uuid::from_u128(7)));
        block_on(live_tokens_contract(&tokens));
        assert_eq!(tokens.asked(), [5, 5, 0, 20_010], "one read per question");
    }

    /// A live-token source that knows a fixed list of live statuses, so a row of a status added
    /// later counts as dead (liveness failing open): the contract catches it.
    struct UnknownStatusIsDead {
        inner: FakeLiveTokens,
        unknown: Mutex<HashSet<TokenDigest>>,
    }

    impl LiveTokens for UnknownStatusIsDead {
        async fn standing_among(
            &self,
            digests: &[TokenDigest],
        ) -> Result<Standings, LiveTokensError> {
            let mut standings = self.inner.standing_among(digests).await?;
            let unknown = locked(&self.unknown).clone();
            standings.live.retain(|digest| !unknown.contains(digest));
            Ok(standings)
        }
    }

    impl LiveTokensHarness for UnknownStatusIsDead {
        async fn installation(&self) -> InstallationId {
            self.inner.installation().await
        }
        async fn seed_live(&self, token: &Token) {
            self.inner.seed_live(token).await;
        }
        async fn seed_terminal(&self, token: &Token) {
            self.inner.seed_terminal(token).await;
        }
        async fn seed_unknown_status(&self, token: &Token) {
            self.inner.seed_unknown_status(token).await;
            locked(&self.unknown).insert(TokenDigest::of(token));
        }
        async fn protect(&self, token: &Token) {
            LiveTokensHarness::protect(&self.inner, token).await;
        }
    }

    #[test]
    fn the_live_tokens_contract_catches_an_adapter_that_treats_an_unknown_status_as_dead() {
        let broken = UnknownStatusIsDead {
            inner: FakeLiveTokens::new(InstallationId::from_uuid(uuid::Uuid::from_u128(7))),
            unknown: Mutex::default(),
        };
        let message = contract_failure(
            || block_on(live_tokens_contract(&broken)),
            "the contract passed an adapter failing open",
        );
        assert!(
            message.contains("fail closed"),
            "the contract failed for another reason: {message}"
        );
    }

    /// An inventory that drops labels: the contract catches it.
    struct LosesLabels(FakeInventory);

    impl Inventory for LosesLabels {
        fn source(&self) -> InventorySource {
            self.0.source()
        }
        async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
            let mut items = self.0.list().await?;
            for item in &mut items {
                item.labels.clear();
            }
            Ok(items)
        }
    }

    impl InventoryHarness for LosesLabels {
        fn name_for(&self, token: &str) -> String {
            self.0.name_for(token)
        }
        fn foreign_name(&self, token: &str) -> String {
            self.0.foreign_name(token)
        }
        async fn create(&self, item: &InventoryItem) {
            self.0.create(item).await;
        }
        async fn remove(&self, name: &str) {
            self.0.remove(name).await;
        }
    }

    #[test]
    fn the_inventory_contract_catches_an_adapter_that_loses_labels() {
        let broken = LosesLabels(FakeInventory::new(InventorySource::Postgres, "cust_"));
        contract_failure(
            || block_on(inventory_contract(&broken, NOW)),
            "the contract passed an adapter that loses labels",
        );
    }

    /// A scripted failure answers one list with an error, never a partial list; the next list is
    /// complete again.
    #[test]
    fn a_scripted_inventory_failure_answers_one_list_with_an_error() {
        let inventory = FakeInventory::new(InventorySource::Kubernetes, "instant-customer-");
        inventory.put(InventoryItem::new("instant-customer-abcdefgh1234"));
        inventory.fail_next(|| InventoryError::Expired { pages: 2 });
        let failed = block_on(inventory.list());
        assert!(matches!(failed, Err(InventoryError::Expired { pages: 2 })));
        let listed = block_on(inventory.list()).unwrap();
        assert_eq!(listed.len(), 1);
    }

    /// The fake live-token source answers only about the digests asked, in one read.
    #[test]
    fn fake_live_tokens_answer_only_about_the_digests_asked() {
        let installation = InstallationId::from_uuid(uuid::Uuid::from_u128(7));
        let tokens = FakeLiveTokens::new(installation);
        let (live, ended, protected, stranger) = (
            Token::parse("live00000001").unwrap(),
            Token::parse("ended0000001").unwrap(),
            Token::parse("prot00000001").unwrap(),
            Token::parse("strn00000001").unwrap(),
        );
        tokens.live(&live);
        tokens.ended(&ended);
        tokens.protect(&protected);
        let asked = [&live, &ended, &stranger].map(TokenDigest::of);
        let standings = block_on(tokens.standing_among(&asked)).unwrap();
        assert_eq!(standings.installation, installation);
        assert_eq!(standings.live, HashSet::from([TokenDigest::of(&live)]));
        assert_eq!(
            standings.owned,
            HashSet::from([TokenDigest::of(&live), TokenDigest::of(&ended)])
        );
        assert!(
            standings.protected.is_empty(),
            "a digest nobody asked about was answered"
        );
        tokens.fail_next("down");
        assert!(block_on(tokens.standing_among(&asked)).is_err());
        assert_eq!(tokens.asked(), [3, 3]);
    }
}
