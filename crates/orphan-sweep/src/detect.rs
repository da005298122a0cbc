//! Pure detection: which inventory items are orphans, of what kind, and whether they may ever be
//! reclaimed. No I/O; `now` and the grace window are parameters.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use keel_audit::ResourceType;
use keel_provision::{
    BackendName, DatabaseName, INSTALLATION_LABEL, NamespaceName, Stamp, TokenDigest,
    protect_value_protects,
};
use time::OffsetDateTime;

use crate::ports::{InventoryItem, InventorySource, Standings};

/// The label naming a namespace's resource type.
pub const RESOURCE_TYPE_LABEL: &str = "keel.dev/resource-type";
/// The label that proves the platform created an object; only such objects are ever reclaimed.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] on the platform's objects.
pub const MANAGED_BY: &str = "keel";
/// The annotation that protects an object from any reclaim (any value but `false`).
pub const PROTECT_ANNOTATION: &str = "keel.dev/protect";

/// What an orphan is. Closed: it labels metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, strum::VariantArray)]
#[non_exhaustive]
pub enum OrphanKind {
    /// A customer's Kubernetes namespace.
    CustomerNamespace,
    /// A Redis resource's namespace.
    RedisNamespace,
    /// A customer database on the shared Postgres cluster.
    CustomerDatabase,
    /// Something under the prefix whose kind cannot be proven: reported, never reclaimed.
    Generic,
}

impl OrphanKind {
    /// Every kind.
    pub const ALL: &'static [OrphanKind] = <Self as strum::VariantArray>::VARIANTS;

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CustomerNamespace => "customer_namespace",
            Self::RedisNamespace => "redis_namespace",
            Self::CustomerDatabase => "customer_database",
            Self::Generic => "generic",
        }
    }
}

impl fmt::Display for OrphanKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An item with its kind and, when it has one, its backend name (and so its token).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Classified {
    /// The kind.
    pub kind: OrphanKind,
    /// The platform's name for it; `None` for [`OrphanKind::Generic`] items without a token.
    pub backend: Option<BackendName>,
}

/// Classifies an item from `source`.
///
/// Namespaces: the resource-type label decides (`redis` or `namespace`); without the label, the
/// name pattern `instant-customer-<token>` makes a customer namespace; any other label value is
/// generic. Databases: `cust_<digest>` (or a legacy `cust_<token>`) is a customer database. A
/// name that does not parse is
/// generic and carries no backend name, so it can never be handed to the reclaimer.
pub fn classify(item: &InventoryItem, source: InventorySource) -> Classified {
    match source {
        InventorySource::Kubernetes => {
            let Ok(name) = NamespaceName::parse(&item.name) else {
                return generic();
            };
            let resource_type = match item.labels.get(RESOURCE_TYPE_LABEL).map(String::as_str) {
                None | Some("namespace") => ResourceType::Namespace,
                Some("redis") => ResourceType::Redis,
                Some(_) => {
                    return Classified {
                        kind: OrphanKind::Generic,
                        backend: None,
                    };
                }
            };
            let kind = match resource_type {
                ResourceType::Redis => OrphanKind::RedisNamespace,
                ResourceType::Namespace | ResourceType::Postgres => OrphanKind::CustomerNamespace,
            };
            Classified {
                kind,
                backend: Some(BackendName::Namespace {
                    name,
                    resource_type,
                }),
            }
        }
        InventorySource::Postgres => match DatabaseName::parse(&item.name) {
            Ok(name) => Classified {
                kind: OrphanKind::CustomerDatabase,
                backend: Some(BackendName::Database(name)),
            },
            Err(_) => generic(),
        },
    }
}

fn generic() -> Classified {
    Classified {
        kind: OrphanKind::Generic,
        backend: None,
    }
}

/// Whether an item carries a `keel.dev/protect` mark that protects, among its annotations or its
/// labels (as the deprovision chokepoint reads it, so the review list says what an armed run
/// would do): any value but `false` ([`keel_provision::protect_value_protects`]), so a misspelt
/// mark fails closed.
pub fn is_protected(item: &InventoryItem) -> bool {
    [&item.annotations, &item.labels].into_iter().any(|marks| {
        marks
            .get(PROTECT_ANNOTATION)
            .is_some_and(|v| protect_value_protects(v))
    })
}

/// Whether an item carries `app.kubernetes.io/managed-by=keel`.
pub fn is_managed(item: &InventoryItem) -> bool {
    item.labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
}

/// What keeps a candidate from being reclaimed. Closed: it labels metrics and the review list.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, strum::VariantArray,
)]
#[serde(rename_all = "snake_case")]
pub enum Blocker {
    /// Its kind cannot be proven (no token): reported, never reclaimed.
    Generic,
    /// Another installation's stamp is on it: never reclaimed by this one.
    ForeignInstallation,
    /// Already being deleted (stuck terminating): tracked, never reclaimed again.
    Terminating,
    /// Not labelled `managed-by=keel` (made by hand or by an older platform).
    Unmanaged,
    /// This installation has no `resources` row for its token: not provably its own.
    Unowned,
    /// Protected (the platform's `reclaim_protections`, or the object's own mark).
    Protected,
    /// The chokepoint refused it before: never attempted again while it stays a candidate.
    Quarantined,
    /// Not yet seen reclaimable over the burn-in (duration and ticks).
    BurnIn,
    /// Over this tick's rate limit (`max_reclaims`, the fewest failed reclaims first, then the
    /// oldest): next tick.
    Cap,
    /// The circuit breaker tripped: more than `max_fraction` of this installation's inventory
    /// would be reclaimed at once, so nothing is.
    Breaker,
}

impl Blocker {
    /// Every blocker.
    pub const ALL: &'static [Blocker] = <Self as strum::VariantArray>::VARIANTS;

    /// The metric label and review-list value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Generic => "generic",
            Self::ForeignInstallation => "foreign_installation",
            Self::Terminating => "terminating",
            Self::Unmanaged => "unmanaged",
            Self::Unowned => "unowned",
            Self::Protected => "protected",
            Self::Quarantined => "quarantined",
            Self::BurnIn => "burn_in",
            Self::Cap => "cap",
            Self::Breaker => "breaker",
        }
    }
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An orphan candidate: no live resource owns it and it is older than the grace window.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Candidate {
    /// Its kind.
    pub kind: OrphanKind,
    /// Its name as listed (secret: it carries the token).
    pub name: String,
    /// The platform's name for it (`None` for generic items).
    pub backend: Option<BackendName>,
    /// How old it is.
    pub age: Duration,
    /// Protected: by the platform (`reclaim_protections`) or by its own `keel.dev/protect` mark.
    pub protected: bool,
    /// Labelled `app.kubernetes.io/managed-by=keel`. An object without it (made by hand, or by
    /// an older platform) is reported, never reclaimed.
    pub managed: bool,
    /// Whose installation stamp it carries.
    pub stamp: Stamp,
    /// This installation has a `resources` row (any status) for its token.
    pub owned: bool,
    /// Already being deleted.
    pub terminating: bool,
}

impl Candidate {
    /// The digest of the item's token, when it has one.
    pub fn digest(&self) -> Option<TokenDigest> {
        self.backend.as_ref().map(BackendName::digest)
    }

    /// What keeps it from ever being reclaimed, whatever the burn-in and the cap say: `None`
    /// when it is reclaimable (a proven kind, this installation's by a platform-held row and no
    /// foreign stamp, made by the platform, not terminating, not protected).
    pub fn static_blocker(&self) -> Option<Blocker> {
        let proven = match self.kind {
            OrphanKind::CustomerNamespace
            | OrphanKind::RedisNamespace
            | OrphanKind::CustomerDatabase => self.backend.is_some(),
            OrphanKind::Generic => false,
        };
        let foreign = match self.stamp {
            Stamp::Foreign => true,
            Stamp::None | Stamp::Ours => false,
        };
        if !proven {
            Some(Blocker::Generic)
        } else if foreign {
            Some(Blocker::ForeignInstallation)
        } else if self.terminating {
            Some(Blocker::Terminating)
        } else if !self.managed {
            Some(Blocker::Unmanaged)
        } else if !self.owned {
            Some(Blocker::Unowned)
        } else if self.protected {
            Some(Blocker::Protected)
        } else {
            None
        }
    }

    /// Whether the reclaim arm may ever touch it ([`Candidate::static_blocker`] is `None`).
    pub fn reclaimable(&self) -> bool {
        self.static_blocker().is_none()
    }

    /// The key its durable sighting is stored under: kind and token digest, never the name (a
    /// generic item: a digest of its name).
    pub fn sighting_key(&self) -> String {
        use sha2::Digest as _;
        match &self.backend {
            Some(name) => {
                let (kind, digest) = (self.kind.as_str(), digest_of(name));
                let mut key = String::with_capacity(kind.len() + 1 + digest.as_str().len());
                key.push_str(kind);
                key.push(':');
                key.push_str(digest.as_str());
                key
            }
            None => {
                let hash = sha2::Sha256::digest(self.name.as_bytes());
                let hex: String = hash.iter().take(24).map(|b| format!("{b:02x}")).collect();
                format!("{}:{hex}", self.kind.as_str())
            }
        }
    }
}

/// The digest of `name`'s token, borrowed when the name carries it (a database name) and
/// computed otherwise (a namespace name carries the token).
pub(crate) fn digest_of(name: &BackendName) -> Cow<'_, TokenDigest> {
    match name {
        BackendName::Database(database) => Cow::Borrowed(database.digest()),
        BackendName::Namespace { .. } => Cow::Owned(name.digest()),
    }
}

/// The token digests of the items that have a token, for the one set-based standing read (by
/// digest, so the read sends no token).
pub fn digests_of(items: &[InventoryItem], source: InventorySource) -> Vec<TokenDigest> {
    items
        .iter()
        .filter_map(|item| classify(item, source).backend)
        .map(|name| name.digest())
        .collect()
}

/// A tick's classification of its inventory, kept while the standing read runs: whether each
/// item has a token, in the order of the items, and the token digest of each item that has one,
/// in the same order.
///
/// It keeps no backend name: a parsed name for every item (the name copied, its digest beside
/// it) was about 20 MB of a first tick's 80 at 100 000 items, most of them not candidates. Only
/// the candidates are classified again, from their own item, when they are built.
pub(crate) struct Classes {
    /// Whether each item has a token (and so a digest in `digests`).
    pub(crate) tokened: Vec<bool>,
    /// The digests of the items with a token, for the standing read.
    pub(crate) digests: Vec<TokenDigest>,
}

/// The digest of `item`'s token, when it has one (see [`classify`]).
fn digest_of_item(item: &InventoryItem, source: InventorySource) -> Option<TokenDigest> {
    classify(item, source)
        .backend
        .as_ref()
        .map(|name| digest_of(name).into_owned())
}

/// Every item classified, in the order of `items`: the digests a tick reuses for the standing
/// read, detection and the breaker's denominator. Two halves at once for a large inventory (see
/// `split`).
pub(crate) fn classify_all(items: &[InventoryItem], source: InventorySource) -> Classes {
    let run = |items: &[InventoryItem], room: usize| {
        let mut classes = Classes {
            tokened: Vec::with_capacity(room),
            digests: Vec::with_capacity(room),
        };
        for item in items {
            let digest = digest_of_item(item, source);
            classes.tokened.push(digest.is_some());
            classes.digests.extend(digest);
        }
        classes
    };
    if !crate::split::worth_two(items.len()) {
        return run(items, items.len());
    }
    let (a, b) = items.split_at(items.len() / 2);
    // The first half's lists have room for both, so joining them copies the second's only.
    let (mut first, second) = crate::split::both(|| run(a, items.len()), || run(b, b.len()));
    first.tokened.extend(second.tokened);
    first.digests.extend(second.digests);
    first
}

/// The candidates among `items`: items whose token has no live resource and which are older than
/// `grace`. Generic items under the prefix (no token to prove ownership) are candidates once
/// older than `grace`; they are reported and never reclaimed. An item whose age is unknown is
/// never a candidate: nothing proves it is past the grace window.
pub fn detect(
    items: &[InventoryItem],
    source: InventorySource,
    standings: &Standings,
    now: OffsetDateTime,
    grace: Duration,
) -> Vec<Candidate> {
    let classes = classify_all(items, source);
    detect_classified(
        items.to_vec(),
        source,
        &classes,
        standings,
        now,
        grace,
        |c| c,
    )
}

/// How old `item` is at `now`; `None` when the backend did not say when it was created. An item
/// created after `now` (clock skew) is of age zero.
fn age_of(item: &InventoryItem, now: OffsetDateTime) -> Option<Duration> {
    item.created_at
        .map(|created| (now - created).try_into().unwrap_or(Duration::ZERO))
}

/// [`detect`] over items already classified (`classes`, from [`classify_all`] over the same
/// items), each candidate handed to `wrap` (a tick keeps it in its own row). It takes the items,
/// so names move into their candidates and every other item is freed as it is passed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn detect_classified<T: Send>(
    items: Vec<InventoryItem>,
    source: InventorySource,
    classes: &Classes,
    standings: &Standings,
    now: OffsetDateTime,
    grace: Duration,
    wrap: impl Fn(Candidate) -> T + Sync,
) -> Vec<T> {
    // Which items are candidates (not live, past the grace window), so that the candidates'
    // list is made once, at its size: a candidate is the largest thing a tick holds per item.
    let mut digests = classes.digests.iter();
    let is_candidate: Vec<bool> = items
        .iter()
        .zip(&classes.tokened)
        .map(|(item, &tokened)| {
            let digest = if tokened { digests.next() } else { None };
            let live = digest.is_some_and(|digest| standings.live.contains(digest));
            !live && age_of(item, now).is_some_and(|age| age > grace)
        })
        .collect();
    crate::split::filter_map_pairs(
        items,
        is_candidate,
        |&c| c,
        |item, candidate| {
            if !candidate {
                return None;
            }
            let age = age_of(&item, now)?;
            let classified = classify(&item, source);
            let digest = classified.backend.as_ref().map(digest_of);
            let platform_protected = digest
                .as_ref()
                .is_some_and(|digest| standings.protected.contains(digest.as_ref()));
            let owned = digest
                .as_ref()
                .is_some_and(|digest| standings.owned.contains(digest.as_ref()));
            Some(wrap(Candidate {
                kind: classified.kind,
                backend: classified.backend,
                age,
                protected: platform_protected || is_protected(&item),
                managed: is_managed(&item),
                stamp: Stamp::of(
                    item.labels.get(INSTALLATION_LABEL).map(String::as_str),
                    standings.installation,
                ),
                owned,
                terminating: item.terminating,
                name: item.name,
            }))
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use keel_provision::InstallationId;
    use time::macros::datetime;

    use super::*;

    const OURS: InstallationId = InstallationId::from_uuid(uuid::Uuid::from_u128(1));

    /// Standings where `live` is live and every item of `items` is this installation's.
    fn standings(
        live: &HashSet<TokenDigest>,
        items: &[InventoryItem],
        source: InventorySource,
    ) -> Standings {
        let mut standings = Standings::empty(OURS);
        standings.live = live.clone();
        standings.owned = digests_of(items, source).into_iter().collect();
        standings
    }

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);
    const HOUR: Duration = Duration::from_secs(3600);

    /// An item labelled as the platform's (`managed-by=keel`) plus `labels`.
    fn item(name: &str, age_minutes: i64, labels: &[(&str, &str)], protect: bool) -> InventoryItem {
        let mut annotations = crate::Labels::new();
        if protect {
            annotations.insert(PROTECT_ANNOTATION.to_owned(), "true".to_owned());
        }
        let mut all: crate::Labels = labels.iter().copied().collect();
        all.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
        InventoryItem {
            name: name.to_owned(),
            created_at: Some(NOW - time::Duration::minutes(age_minutes)),
            labels: all,
            annotations,
            terminating: false,
        }
    }

    fn unmanaged(name: &str) -> InventoryItem {
        let mut item = item(name, 120, &[], false);
        item.labels.clear();
        item
    }

    /// A protect mark among an item's labels protects as one among its annotations does, as
    /// the chokepoint reads a database comment: the review list never says `would_reclaim` of
    /// what an armed run would be refused; `false` in either place protects nothing.
    #[test]
    fn a_protect_mark_among_the_labels_protects_as_the_chokepoint_reads_it() {
        let mut labelled = item("cust_x", 120, &[(PROTECT_ANNOTATION, "true")], false);
        assert!(is_protected(&labelled));
        labelled
            .labels
            .insert(PROTECT_ANNOTATION.to_owned(), "false".to_owned());
        assert!(!is_protected(&labelled));
        assert!(is_protected(&item("cust_y", 120, &[], true)));
        assert!(!is_protected(&item("cust_z", 120, &[], false)));
    }

    /// (case, item, source, expected: None = not a candidate, Some((kind, reclaimable))).
    type Case = (
        &'static str,
        InventoryItem,
        InventorySource,
        Option<(OrphanKind, bool)>,
    );

    #[test]
    fn detection_table_orphan_live_pending_grace_protected_generic() {
        let token = |t: &str| keel_audit::Token::parse(t).unwrap();
        let live: HashSet<TokenDigest> = ["live00000001", "pend00000001", "live00000002"]
            .iter()
            .map(|t| TokenDigest::of(&token(t)))
            .collect();
        let digest_name = |t: &str| DatabaseName::for_token(&token(t)).expose().to_owned();
        let redis = [(RESOURCE_TYPE_LABEL, "redis")];
        let ns = [(RESOURCE_TYPE_LABEL, "namespace")];
        let mongo = [(RESOURCE_TYPE_LABEL, "mongo")];
        let k8s = InventorySource::Kubernetes;
        let pg = InventorySource::Postgres;
        let cases: Vec<Case> = vec![
            (
                "orphan namespace, by name pattern",
                item("instant-customer-orph00000001", 120, &[], false),
                k8s,
                Some((OrphanKind::CustomerNamespace, true)),
            ),
            (
                "orphan namespace, by label",
                item("instant-customer-orph00000002", 120, &ns, false),
                k8s,
                Some((OrphanKind::CustomerNamespace, true)),
            ),
            (
                "orphan redis namespace, by label",
                item("instant-customer-orph00000003", 120, &redis, false),
                k8s,
                Some((OrphanKind::RedisNamespace, true)),
            ),
            (
                "orphan database",
                item("cust_orph00000004", 120, &[], false),
                pg,
                Some((OrphanKind::CustomerDatabase, true)),
            ),
            (
                "orphan database under its digest name",
                item(&digest_name("orph00000009"), 120, &[], false),
                pg,
                Some((OrphanKind::CustomerDatabase, true)),
            ),
            (
                "live database under its digest name",
                item(&digest_name("live00000002"), 120, &[], false),
                pg,
                None,
            ),
            (
                "live (active) token",
                item("instant-customer-live00000001", 120, &[], false),
                k8s,
                None,
            ),
            (
                "pending token is live too",
                item("cust_pend00000001", 120, &[], false),
                pg,
                None,
            ),
            (
                "within the grace window",
                item("instant-customer-orph00000005", 59, &[], false),
                k8s,
                None,
            ),
            (
                "protected orphan: reported, never reclaimed",
                item("cust_orph00000006", 120, &[], true),
                pg,
                Some((OrphanKind::CustomerDatabase, false)),
            ),
            (
                "not made by the platform (no managed-by=keel): reported, never reclaimed",
                unmanaged("cust_hand00000001"),
                pg,
                Some((OrphanKind::CustomerDatabase, false)),
            ),
            (
                "unlabelled namespace: reported, never reclaimed",
                unmanaged("instant-customer-hand00000002"),
                k8s,
                Some((OrphanKind::CustomerNamespace, false)),
            ),
            (
                "unknown resource-type label: generic",
                item("instant-customer-orph00000007", 120, &mongo, false),
                k8s,
                Some((OrphanKind::Generic, false)),
            ),
            (
                "name under the prefix without a valid token: generic",
                item("instant-customer-NOT_A_TOKEN", 120, &[], false),
                k8s,
                Some((OrphanKind::Generic, false)),
            ),
            (
                "database name that does not parse: generic",
                item("cust_x", 120, &[], false),
                pg,
                Some((OrphanKind::Generic, false)),
            ),
        ];
        for (case, item, source, expected) in cases {
            let items = std::slice::from_ref(&item);
            let found = detect(items, source, &standings(&live, items, source), NOW, HOUR);
            let got = found.first().map(|c| (c.kind, c.reclaimable()));
            assert_eq!(got, expected, "{case}");
            if let Some(candidate) = found.first() {
                assert_eq!(candidate.name, item.name);
                assert!(candidate.age >= HOUR);
            }
        }
    }

    #[test]
    fn an_item_without_a_known_age_is_never_a_candidate() {
        let mut unknown = item("cust_orph00000008", 0, &[], false);
        unknown.created_at = None;
        let found = detect(
            &[unknown],
            InventorySource::Postgres,
            &Standings::empty(OURS),
            NOW,
            HOUR,
        );
        assert!(found.is_empty());
    }

    /// SWEEP-1, SWEEP-4: another installation's object, an object this installation has no row
    /// for, and a terminating namespace are candidates the sweep reports and never reclaims.
    #[test]
    fn foreign_unowned_and_terminating_candidates_are_blocked() {
        let theirs = InstallationId::from_uuid(uuid::Uuid::from_u128(2));
        let mut foreign = item("cust_frgn00000001", 120, &[], false);
        foreign
            .labels
            .insert(INSTALLATION_LABEL.to_owned(), theirs.to_string());
        let mut ours = item("cust_ours00000001", 120, &[], false);
        ours.labels
            .insert(INSTALLATION_LABEL.to_owned(), OURS.to_string());
        let unowned = item("cust_nrow00000001", 120, &[], false);
        let mut terminating = item("instant-customer-term00000001", 120, &[], false);
        terminating.terminating = true;
        let pg = InventorySource::Postgres;
        let mut st = standings(&HashSet::new(), &[foreign.clone(), ours.clone()], pg);
        let found = detect(&[foreign, ours, unowned], pg, &st, NOW, HOUR);
        let blockers: Vec<Option<Blocker>> = found.iter().map(Candidate::static_blocker).collect();
        assert_eq!(
            blockers,
            [
                Some(Blocker::ForeignInstallation),
                None,
                Some(Blocker::Unowned)
            ]
        );
        let k8s = InventorySource::Kubernetes;
        st.owned
            .extend(digests_of(std::slice::from_ref(&terminating), k8s));
        let found = detect(&[terminating], k8s, &st, NOW, HOUR);
        assert_eq!(found[0].static_blocker(), Some(Blocker::Terminating));
    }

    /// Detection over a mixed inventory finds exactly what detecting each item on its own
    /// finds: each item is weighed against its own token's standing (the digests are matched to
    /// items by position), whatever mix of generic, young, undated and live items comes before
    /// it. (The two halves a large inventory is split into are pinned by `split`'s test and the
    /// large ticks in `sweep`.)
    #[test]
    fn a_mixed_inventory_is_detected_as_each_item_alone() {
        let pg = InventorySource::Postgres;
        let items: Vec<InventoryItem> = (0..2_007)
            .map(|i| {
                let token = keel_audit::Token::parse(&format!("mix{i:09}")).unwrap();
                let name = if i % 7 == 0 {
                    DatabaseName::legacy_for_token(&token)
                } else {
                    DatabaseName::for_token(&token)
                };
                match i % 5 {
                    0 => item(&format!("cust_not a token {i}"), 120, &[], false),
                    1 => item(name.expose(), 10, &[], false),
                    2 => {
                        let mut undated = item(name.expose(), 120, &[], false);
                        undated.created_at = None;
                        undated
                    }
                    _ => item(name.expose(), 120, &[], i % 11 == 0),
                }
            })
            .collect();
        let tokened = digests_of(&items, pg);
        let live: HashSet<TokenDigest> = tokened.iter().step_by(3).cloned().collect();
        let st = standings(&live, &items, pg);
        let together = detect(&items, pg, &st, NOW, HOUR);
        let alone: Vec<Candidate> = items
            .iter()
            .flat_map(|item| detect(std::slice::from_ref(item), pg, &st, NOW, HOUR))
            .collect();
        assert_eq!(together, alone);
        let generic = together
            .iter()
            .filter(|c| c.kind == OrphanKind::Generic)
            .count();
        let databases = together.len() - generic;
        assert!(
            generic > 0 && databases > 0,
            "{generic} generic, {databases} databases"
        );
        assert!(
            together
                .iter()
                .filter_map(Candidate::digest)
                .all(|digest| !live.contains(&digest)),
            "a live token is never a candidate"
        );
    }

    #[test]
    fn only_items_with_tokens_go_to_the_liveness_read() {
        let items = [
            item("instant-customer-abcd00000001", 120, &[], false),
            item("instant-customer-BAD", 120, &[], false),
            item(
                "instant-customer-abcd00000002",
                120,
                &[(RESOURCE_TYPE_LABEL, "redis")],
                false,
            ),
        ];
        let digests = digests_of(&items, InventorySource::Kubernetes);
        let expected: Vec<TokenDigest> = ["abcd00000001", "abcd00000002"]
            .iter()
            .map(|t| TokenDigest::of(&keel_audit::Token::parse(t).unwrap()))
            .collect();
        assert_eq!(digests, expected);
    }
}
