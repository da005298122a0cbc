//! The audit event and the fields it is made of.
//!
//! Every field is a validated type, and none of them can carry a secret: attribute keys that name
//! a secret are refused unless they are explicitly masked, and values that look like connection
//! URLs, credentials or bearer tokens are refused. The error never echoes the refused value.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use time::OffsetDateTime;

use crate::ids::{ResourceId, TeamId};
use crate::kind::AuditKind;

/// Longest accepted actor or request id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted attribute key, in bytes.
pub const MAX_ATTR_KEY_LEN: usize = 64;
/// Longest accepted attribute value, in bytes.
pub const MAX_ATTR_VALUE_LEN: usize = 1024;
/// Most attributes on one event.
pub const MAX_ATTRS: usize = 32;

/// Why a field of an audit event was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditFieldError {
    /// The actor is empty, too long, or uses characters outside `[a-z0-9._:-]`.
    #[error(
        "invalid audit actor: use 1 to {MAX_ID_LEN} characters of [a-z0-9._:-], e.g. \
         \"system\" or \"operator:alice\""
    )]
    InvalidActor,
    /// An operator's act (a command-line change) must name the person acting.
    #[error(
        "expected operator:NAME, the person acting (e.g. operator:alice), with NAME of \
         [a-z0-9._-]"
    )]
    NotAnOperator,
    /// The request id is empty, too long, or uses characters outside `[A-Za-z0-9._:-]`.
    #[error("invalid request id: use 1 to {MAX_ID_LEN} characters of [A-Za-z0-9._:-]")]
    InvalidRequestId,
    /// The attribute key is not lower snake case of a sensible length.
    #[error(
        "invalid audit attribute key {0:?}: use 1 to {MAX_ATTR_KEY_LEN} characters of [a-z0-9_]"
    )]
    InvalidAttributeKey(String),
    /// The attribute key names a secret (password, token, connection URL…).
    #[error(
        "audit attribute {0:?} names a secret; audit rows never hold secrets: store a masked \
         form under a key ending in `_masked` (see Attributes::insert_masked) or leave it out"
    )]
    SecretAttributeKey(String),
    /// The attribute value looks like a secret. The value itself is not shown.
    #[error(
        "the value of audit attribute {0:?} looks like a secret (a connection URL, credentials \
         or a bearer token) and was refused; the value is not shown"
    )]
    SecretAttributeValue(String),
    /// A `_masked` attribute given a value instead of its secret: only
    /// [`Attributes::insert_masked`] (or [`AuditEvent::attr_masked`]) writes one, masking the
    /// secret itself, so a hand-written "masked" value can never hold a short secret whole.
    #[error(
        "audit attribute {0:?} is written with insert_masked/attr_masked, which mask the secret \
         themselves"
    )]
    UnmaskedValue(String),
    /// The attribute value is longer than [`MAX_ATTR_VALUE_LEN`].
    #[error("the value of audit attribute {0:?} is longer than {MAX_ATTR_VALUE_LEN} bytes")]
    AttributeValueTooLong(String),
    /// More than [`MAX_ATTRS`] attributes.
    #[error("an audit event holds at most {MAX_ATTRS} attributes")]
    TooManyAttributes,
}

/// Who caused the event: `system`, a service name, or `operator:<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Actor(String);

impl Actor {
    /// The platform itself, acting on its own schedule.
    pub fn system() -> Self {
        Self("system".to_owned())
    }

    /// Parses an actor name; see [`AuditFieldError::InvalidActor`] for the rules.
    pub fn parse(s: &str) -> Result<Self, AuditFieldError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && s.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b':' | b'-')
            });
        if ok && !value_looks_secret(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(AuditFieldError::InvalidActor)
        }
    }

    /// Parses the actor of an operator's act: `operator:NAME`, with a non-empty NAME and no
    /// further `:` (so it can never name the API, the system or an API key's actor, `key:ID`).
    pub fn operator(s: &str) -> Result<Self, AuditFieldError> {
        match s.strip_prefix("operator:") {
            Some(name) if !name.is_empty() && !name.contains(':') => {
                Self::parse(s).map_err(|_| AuditFieldError::NotAnOperator)
            }
            _ => Err(AuditFieldError::NotAnOperator),
        }
    }

    /// An actor as stored, not validated again on read (FND-8).
    #[cfg(feature = "postgres")]
    pub(crate) fn from_stored(stored: String) -> Self {
        Self(stored)
    }

    /// The actor's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Actor {
    type Err = AuditFieldError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of the request that caused the event, for correlating with logs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    /// Parses a request id; see [`AuditFieldError::InvalidRequestId`] for the rules.
    pub fn parse(s: &str) -> Result<Self, AuditFieldError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok && !value_looks_secret(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(AuditFieldError::InvalidRequestId)
        }
    }

    /// A request id as stored, not validated again on read (FND-8).
    #[cfg(feature = "postgres")]
    pub(crate) fn from_stored(stored: String) -> Self {
        Self(stored)
    }

    /// The request id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RequestId {
    type Err = AuditFieldError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What [`Attributes::insert_or_withhold`] stores in place of a refused value.
pub const WITHHELD: &str = "(withheld: refused by the secret screen)";

/// The marker [`mask`] appends; a `_masked` attribute must end with it.
pub const MASK_SUFFIX: char = '…';

/// Masks a secret for logs and audit rows: of a secret of 8 characters or more (every
/// [`crate::Token`]), at most a third of its characters and never more than 4, so a masked
/// minimum-length token keeps most of its entropy hidden; of a shorter string (a PIN, a short
/// password), nothing at all (FND-19). Then `…`.
///
/// ```
/// assert_eq!(keel_audit::mask("tok_9f8e7d6c"), "tok_…");
/// assert_eq!(keel_audit::mask("a1b2c3d4"), "a1…");
/// assert_eq!(keel_audit::mask("1234"), "…");
/// ```
pub fn mask(secret: &str) -> String {
    let len = secret.chars().count();
    let shown = if len < 8 { 0 } else { (len / 3).min(4) };
    let mut masked: String = secret.chars().take(shown).collect();
    masked.push(MASK_SUFFIX);
    masked
}

use crate::screen::{is_fingerprint, key_names_a_secret, value_looks_secret};

/// Whether free text looks like it holds a secret: a connection URL, a URL with a password or a
/// signed query, a `password=` / `secret: …` form, an authorization header, a JWT, a cloud or
/// SaaS key, private key material, or a backend name holding a customer token. The screen
/// audit attributes, actors and request ids go through; use it for any free text that is
/// stored or shown (error messages, say). It matches known credential shapes: it cannot prove
/// that no secret passes.
pub fn looks_secret(value: &str) -> bool {
    value_looks_secret(value)
}

/// Deserializes a string through `parse`, so a deserialized value passed the same checks as a
/// parsed one; the error names the rule, never the value when it may be a secret.
fn deserialize_parsed<'de, D, T, E>(
    deserializer: D,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    E: fmt::Display,
{
    let s = <String as serde::Deserialize>::deserialize(deserializer)?;
    parse(&s).map_err(serde::de::Error::custom)
}

impl<'de> serde::Deserialize<'de> for Actor {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_parsed(deserializer, Self::parse)
    }
}

impl<'de> serde::Deserialize<'de> for RequestId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_parsed(deserializer, Self::parse)
    }
}

/// Accepts only a wire name in [`AuditKind::ALL`].
impl<'de> serde::Deserialize<'de> for AuditKind {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_parsed(deserializer, str::parse::<AuditKind>)
    }
}

/// String attributes of an event, keyed by lower-snake names, screened for secrets.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Attributes(BTreeMap<String, String>);

impl Attributes {
    /// No attributes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `key`, which must end in `_masked`, holding [`mask`] of `secret`:
    /// the masking happens here, so the stored value shows at most what [`mask`] shows (nothing
    /// of a string shorter than 8 characters). Plain [`Attributes::insert`] refuses `_masked`
    /// keys (FND-19).
    ///
    /// ```
    /// let mut attrs = keel_audit::Attributes::new();
    /// attrs.insert_masked("token_masked", "tok_9f8e7d6c5b4a").unwrap();
    /// assert_eq!(attrs.get("token_masked"), Some("tok_…"));
    /// assert!(attrs.insert("password_masked", "pw1…").is_err());
    /// ```
    pub fn insert_masked(&mut self, key: &str, secret: &str) -> Result<(), AuditFieldError> {
        if !key.ends_with("_masked") || key == "_masked" {
            return Err(AuditFieldError::InvalidAttributeKey(
                key.chars().take(MAX_ATTR_KEY_LEN).collect(),
            ));
        }
        let key_ok = key.len() <= MAX_ATTR_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return Err(AuditFieldError::InvalidAttributeKey(
                key.chars().take(MAX_ATTR_KEY_LEN).collect(),
            ));
        }
        self.0.insert(key.to_owned(), mask(secret));
        Ok(())
    }

    /// Adds (or replaces) one attribute after screening it for secrets.
    pub fn insert(&mut self, key: &str, value: impl Into<String>) -> Result<(), AuditFieldError> {
        let value = value.into();
        let key_ok = !key.is_empty()
            && key.len() <= MAX_ATTR_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return Err(AuditFieldError::InvalidAttributeKey(
                key.chars().take(MAX_ATTR_KEY_LEN).collect(),
            ));
        }
        if key.ends_with("_masked") {
            // FND-19: a caller-made "masked" value cannot be checked (`pw1…` may be the whole
            // password): `_masked` attributes are only written by `insert_masked`.
            return Err(AuditFieldError::UnmaskedValue(key.to_owned()));
        } else if key.ends_with("_fingerprint") {
            if !is_fingerprint(&value) {
                return Err(AuditFieldError::UnmaskedValue(key.to_owned()));
            }
        } else if key_names_a_secret(key) {
            return Err(AuditFieldError::SecretAttributeKey(key.to_owned()));
        }
        if value.len() > MAX_ATTR_VALUE_LEN {
            return Err(AuditFieldError::AttributeValueTooLong(key.to_owned()));
        }
        // Postgres cannot store a NUL in jsonb, and the failed insert would abort the caller's
        // transaction: it is replaced here, in the fake and the adapter alike (FND-11).
        let value = if value.contains('\0') {
            value.replace('\0', "\u{FFFD}")
        } else {
            value
        };
        if value_looks_secret(&value) {
            return Err(AuditFieldError::SecretAttributeValue(key.to_owned()));
        }
        if !self.0.contains_key(key) && self.0.len() >= MAX_ATTRS {
            return Err(AuditFieldError::TooManyAttributes);
        }
        self.0.insert(key.to_owned(), value);
        Ok(())
    }

    /// The one policy for a refused attribute (FND-7): stores it, or, when the screen refuses
    /// its key or value, stores [`WITHHELD`] under a key that says so (`<key>` when the key is
    /// fine, `withheld_attribute` otherwise), so the row keeps that something was left out and
    /// the state change never fails for it. Returns whether the value was withheld. Only a
    /// malformed key or too many attributes is still an error.
    pub fn insert_or_withhold(
        &mut self,
        key: &str,
        value: impl Into<String>,
    ) -> Result<bool, AuditFieldError> {
        match self.insert(key, value) {
            Ok(()) => Ok(false),
            Err(
                AuditFieldError::SecretAttributeValue(_)
                | AuditFieldError::UnmaskedValue(_)
                | AuditFieldError::AttributeValueTooLong(_),
            ) => {
                self.insert(key, WITHHELD)?;
                Ok(true)
            }
            Err(AuditFieldError::SecretAttributeKey(_)) => {
                self.insert("withheld_attribute", WITHHELD)?;
                Ok(true)
            }
            Err(
                e @ (AuditFieldError::InvalidActor
                | AuditFieldError::NotAnOperator
                | AuditFieldError::InvalidRequestId
                | AuditFieldError::InvalidAttributeKey(_)
                | AuditFieldError::TooManyAttributes),
            ) => Err(e),
        }
    }

    /// Attributes as stored, without screening them again: history is read as it was written,
    /// whatever today's rules would say (FND-8).
    #[cfg(feature = "postgres")]
    pub(crate) fn from_stored(stored: BTreeMap<String, String>) -> Self {
        Self(stored)
    }

    /// The value of one attribute.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// All attributes in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many attributes there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One audit row: what happened, who did it, to what, and when.
///
/// Built with [`AuditEvent::new`] and the chaining setters. `occurred_at` is always a parameter
/// (never read from a clock here) and is normalized to UTC with microsecond precision, the
/// precision Postgres stores, so an event read back equals the event written.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[must_use = "an audit event does nothing until it is recorded"]
pub struct AuditEvent {
    kind: AuditKind,
    actor: Actor,
    team_id: Option<TeamId>,
    resource_id: Option<ResourceId>,
    request_id: Option<RequestId>,
    attributes: Attributes,
    #[serde(with = "time::serde::rfc3339")]
    occurred_at: OffsetDateTime,
}

/// The instant `at` in UTC, when it falls in the years 1 to 9999 there: the range every
/// timestamp column of Keel's schema accepts. `None` otherwise, and for an instant whose UTC
/// date the `time` crate cannot hold at all (`9999-12-31T23:00:00-01:00` is in the year 10000
/// in UTC), which the database driver would fail to bind. Parse a time from outside (a flag, a
/// query parameter, a stored text) through this before using it.
pub fn utc_in_range(at: OffsetDateTime) -> Option<OffsetDateTime> {
    at.checked_to_offset(time::UtcOffset::UTC)
        .filter(|utc| (1..=9999).contains(&utc.year()))
}

/// Truncates to whole microseconds in UTC (an instant UTC cannot hold keeps its own offset).
fn normalize(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.checked_to_offset(time::UtcOffset::UTC).unwrap_or(at);
    let micros = at.nanosecond() / 1_000 * 1_000;
    at.replace_nanosecond(micros).unwrap_or(at)
}

impl AuditEvent {
    /// An event of `kind` caused by `actor` at `occurred_at`, with no ids or attributes yet.
    pub fn new(kind: AuditKind, actor: Actor, occurred_at: OffsetDateTime) -> Self {
        Self {
            kind,
            actor,
            team_id: None,
            resource_id: None,
            request_id: None,
            attributes: Attributes::new(),
            occurred_at: normalize(occurred_at),
        }
    }

    /// Sets the team the event concerns.
    pub fn team(mut self, team_id: TeamId) -> Self {
        self.team_id = Some(team_id);
        self
    }

    /// Sets the resource the event concerns.
    pub fn resource(mut self, resource_id: ResourceId) -> Self {
        self.resource_id = Some(resource_id);
        self
    }

    /// Sets the request that caused the event.
    pub fn request(mut self, request_id: RequestId) -> Self {
        self.request_id = Some(request_id);
        self
    }

    /// Adds one attribute, refusing secrets (see [`Attributes::insert`]).
    pub fn attr(mut self, key: &str, value: impl Into<String>) -> Result<Self, AuditFieldError> {
        self.attributes.insert(key, value)?;
        Ok(self)
    }

    /// Adds `key` (ending in `_masked`) holding [`mask`] of `secret` (see
    /// [`Attributes::insert_masked`]).
    pub fn attr_masked(mut self, key: &str, secret: &str) -> Result<Self, AuditFieldError> {
        self.attributes.insert_masked(key, secret)?;
        Ok(self)
    }

    /// Replaces all attributes.
    pub fn with_attributes(mut self, attributes: Attributes) -> Self {
        self.attributes = attributes;
        self
    }

    /// What happened.
    pub fn kind(&self) -> AuditKind {
        self.kind
    }
    /// Who caused it.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }
    /// The team it concerns, if any.
    pub fn team_id(&self) -> Option<TeamId> {
        self.team_id
    }
    /// The resource it concerns, if any.
    pub fn resource_id(&self) -> Option<ResourceId> {
        self.resource_id
    }
    /// The request that caused it, if any.
    pub fn request_id(&self) -> Option<&RequestId> {
        self.request_id.as_ref()
    }
    /// Its string attributes.
    pub fn attributes(&self) -> &Attributes {
        &self.attributes
    }
    /// When it happened (UTC, microsecond precision).
    pub fn occurred_at(&self) -> OffsetDateTime {
        self.occurred_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A time from outside is held to the schema's years 1 to 9999 in UTC, and one UTC cannot
    /// hold at all is refused rather than panicking.
    #[test]
    fn a_time_outside_the_years_utc_and_the_schema_hold_is_refused() {
        use time::macros::datetime;
        let inside = datetime!(2026-11-30 23:30 -01:00);
        assert_eq!(utc_in_range(inside), Some(datetime!(2026-12-01 00:30 UTC)));
        assert_eq!(
            utc_in_range(datetime!(9999-12-31 22:59:59 -01:00)),
            Some(datetime!(9999-12-31 23:59:59 UTC))
        );
        assert_eq!(utc_in_range(datetime!(9999-12-31 23:00 -01:00)), None);
        assert_eq!(utc_in_range(datetime!(0001-01-01 00:30 +01:00)), None);
        assert_eq!(utc_in_range(datetime!(0000-06-01 00:00 UTC)), None);
    }

    /// An event stamped with an instant UTC cannot hold is built, never a panic.
    #[test]
    fn an_event_at_an_instant_utc_cannot_hold_never_panics() {
        let at = time::macros::datetime!(9999-12-31 23:30 -01:00);
        let event = AuditEvent::new(
            AuditKind::ALL[0],
            Actor::parse("operator:alice").unwrap(),
            at,
        );
        assert_eq!(event.occurred_at(), at);
    }

    /// LIB-13: a deserialized actor or request id passed the same rules as a parsed one.
    #[test]
    fn deserializing_an_actor_or_request_id_applies_the_parse_rules() {
        let actor: Actor = serde_json::from_str("\"operator:alice\"").unwrap();
        assert_eq!(actor, Actor::parse("operator:alice").unwrap());
        assert_eq!(serde_json::to_string(&actor).unwrap(), "\"operator:alice\"");
        assert!(serde_json::from_str::<Actor>("\"\"").is_err());
        assert!(serde_json::from_str::<Actor>("\"has space\"").is_err());
        let request: RequestId = serde_json::from_str("\"req-1\"").unwrap();
        assert_eq!(request.as_str(), "req-1");
    }

    /// LIB-13: an audit kind deserializes from its wire name only.
    #[test]
    fn audit_kinds_deserialize_from_their_wire_names_only() {
        for &kind in AuditKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<AuditKind>(&json).unwrap(), kind);
        }
        assert!(serde_json::from_str::<AuditKind>("\"team.nothing\"").is_err());
    }

    fn check_attr(key: &str, value: &str, expected: Result<(), AuditFieldError>) {
        let mut attrs = Attributes::new();
        assert_eq!(attrs.insert(key, value), expected, "{key} = {value:?}");
        if expected.is_ok() {
            assert_eq!(attrs.get(key), Some(value));
        } else {
            assert!(attrs.is_empty(), "a refused attribute must not be stored");
        }
    }

    #[test]
    fn attributes_refuse_secret_keys_and_secret_looking_values() {
        use AuditFieldError::*;
        let cases: &[(&str, &str, Result<(), AuditFieldError>)] = &[
            ("tier", "pro", Ok(())),
            ("resource_type", "postgres", Ok(())),
            ("provider_resource_id", "instant-customer-ab12", Ok(())),
            ("docs", "https://keel.dev/docs/errors", Ok(())),
            (
                "password",
                "hunter2",
                Err(SecretAttributeKey("password".into())),
            ),
            (
                "db_password",
                "hunter2",
                Err(SecretAttributeKey("db_password".into())),
            ),
            (
                "token",
                "tok_abcdef",
                Err(SecretAttributeKey("token".into())),
            ),
            (
                "connection_url",
                "x",
                Err(SecretAttributeKey("connection_url".into())),
            ),
            ("api_key", "x", Err(SecretAttributeKey("api_key".into()))),
            // `_masked` keys are written only by insert_masked (FND-19).
            (
                "token_masked",
                "tok_…",
                Err(UnmaskedValue("token_masked".into())),
            ),
            (
                "token_masked",
                "tok_abcdef",
                Err(UnmaskedValue("token_masked".into())),
            ),
            ("token_fingerprint", "hmac:9a8b7c", Ok(())),
            (
                "note",
                "postgres://app@db:5432/x",
                Err(SecretAttributeValue("note".into())),
            ),
            // A Redis URL without credentials names a host, not a secret (FND-7); with a
            // password it is refused.
            ("note", "see REDIS://cache", Ok(())),
            (
                "note",
                "see REDIS://:hunter2@cache",
                Err(SecretAttributeValue("note".into())),
            ),
            (
                "target",
                "https://u:p@host/x",
                Err(SecretAttributeValue("target".into())),
            ),
            (
                "conninfo",
                "host=db password=pw",
                Err(SecretAttributeKey("conninfo".into())),
            ),
            (
                "header",
                "Bearer eyJhbGciOi",
                Err(SecretAttributeValue("header".into())),
            ),
            ("Tier", "pro", Err(InvalidAttributeKey("Tier".into()))),
            ("", "pro", Err(InvalidAttributeKey(String::new()))),
        ];
        for (key, value, expected) in cases {
            check_attr(key, value, expected.clone());
        }
    }

    #[test]
    fn refusal_messages_never_echo_the_secret_value() {
        let err = Attributes::new()
            .insert("note", "postgres://app:s3cr3t@db/x")
            .unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        assert!(!format!("{err:?}").contains("s3cr3t"), "{err:?}");
    }

    /// FND-19: a masked token of the minimum length (or longer) shows at most a third of it.
    #[test]
    fn a_masked_short_secret_keeps_most_of_it_hidden() {
        for secret in [
            "a1b2c3d4",
            "abcdefghi",
            "a1b2c3d4e5f6",
            "a1b2c3d4e5f6g7h8i9",
        ] {
            let masked = mask(secret);
            let shown = masked.chars().count() - 1;
            assert!(
                shown * 3 <= secret.chars().count(),
                "{secret:?} -> {masked:?}"
            );
        }
        assert_eq!(mask("a1b2c3d4"), "a1…");
    }

    /// FND-19: a string shorter than a minimum-length token (a PIN, a short password) is
    /// masked whole: nothing of it is shown, so `mask("1234")` no longer returns the PIN.
    #[test]
    fn a_secret_shorter_than_eight_characters_is_masked_whole() {
        for secret in ["", "1", "pw1", "1234", "abcde", "a1b2c3d"] {
            assert_eq!(mask(secret), "…", "{secret:?}");
        }
        let mut attrs = Attributes::new();
        attrs.insert_masked("pin_masked", "1234").unwrap();
        assert_eq!(attrs.get("pin_masked"), Some("…"));
    }

    /// FND-19: a hand-written "masked" value (`pw1…` may be a whole password) is refused; a
    /// `_masked` attribute is only ever the library's own mask of the secret it was given.
    #[test]
    fn a_masked_attribute_is_only_written_from_its_secret() {
        let mut attrs = Attributes::new();
        for (key, value) in [("password_masked", "pw1…"), ("pin_masked", "…")] {
            assert_eq!(
                attrs.insert(key, value),
                Err(AuditFieldError::UnmaskedValue(key.into()))
            );
        }
        attrs.insert_masked("password_masked", "pw1").unwrap();
        assert_eq!(attrs.get("password_masked"), Some("…"));
        for bad in ["password", "_masked", "Token_masked", "token-masked"] {
            assert!(matches!(
                attrs.insert_masked(bad, "tok_9f8e7d6c5b4a"),
                Err(AuditFieldError::InvalidAttributeKey(_))
            ));
        }
        let event = AuditEvent::new(
            AuditKind::ProvisionCreated,
            Actor::system(),
            OffsetDateTime::UNIX_EPOCH,
        )
        .attr_masked("token_masked", "tok_9f8e7d6c5b4a")
        .unwrap();
        assert_eq!(event.attributes().get("token_masked"), Some("tok_…"));
    }

    /// FND-11: a NUL, which Postgres cannot store in jsonb (and whose failure would abort the
    /// caller's transaction), is replaced before it reaches any store.
    #[test]
    fn a_nul_in_an_attribute_is_replaced_before_it_reaches_the_store() {
        let mut attrs = Attributes::new();
        attrs.insert("detail", "backend said: bad\0byte").unwrap();
        assert_eq!(attrs.get("detail"), Some("backend said: bad\u{FFFD}byte"));
    }

    #[test]
    fn masked_values_show_at_most_four_characters() {
        assert_eq!(mask("tok_9f8e7d6c5b4a"), "tok_…");
        assert_eq!(mask("é漢字x-rest"), "é漢字…");
        assert_eq!(mask("ab"), "…");
        assert_eq!(mask(""), "…");
        let mut attrs = Attributes::new();
        attrs
            .insert_masked("token_masked", "tok_9f8e7d6c5b4a")
            .unwrap();
        assert_eq!(attrs.get("token_masked"), Some("tok_…"));
    }

    #[test]
    fn an_operators_act_names_the_person_acting() {
        assert_eq!(
            Actor::operator("operator:alice").unwrap(),
            Actor::parse("operator:alice").unwrap()
        );
        for refused in [
            "",
            "bob",
            "operator:",
            "operator",
            "api",
            "system",
            "key:123",
            "operator:key:123",
            "operator:Alice",
            "operator:a b",
        ] {
            assert_eq!(
                Actor::operator(refused),
                Err(AuditFieldError::NotAnOperator),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn actors_and_request_ids_are_validated() {
        assert!(Actor::parse("operator:alice").is_ok());
        assert!(Actor::parse("keel-orphan-sweep").is_ok());
        assert_eq!(Actor::parse(""), Err(AuditFieldError::InvalidActor));
        assert_eq!(
            Actor::parse("Alice Smith"),
            Err(AuditFieldError::InvalidActor)
        );
        assert_eq!(
            Actor::parse(&"a".repeat(129)),
            Err(AuditFieldError::InvalidActor)
        );
        assert!(RequestId::parse("req_01HZX-9.a:b").is_ok());
        assert_eq!(
            RequestId::parse("a b"),
            Err(AuditFieldError::InvalidRequestId)
        );
    }

    #[test]
    fn attribute_count_and_length_are_bounded() {
        let mut attrs = Attributes::new();
        for i in 0..MAX_ATTRS {
            attrs.insert(&format!("k{i}"), "v").unwrap();
        }
        assert_eq!(
            attrs.insert("one_more", "v"),
            Err(AuditFieldError::TooManyAttributes)
        );
        assert_eq!(
            attrs.insert("k0", "replaced"),
            Ok(()),
            "replacing is not adding"
        );
        assert_eq!(
            Attributes::new().insert("long", "x".repeat(MAX_ATTR_VALUE_LEN + 1)),
            Err(AuditFieldError::AttributeValueTooLong("long".into()))
        );
    }

    #[test]
    fn occurred_at_is_normalized_to_utc_microseconds() {
        let at = time::macros::datetime!(2026-11-22 10:00:00.123456789 +02:00);
        let event = AuditEvent::new(AuditKind::ProvisionCreated, Actor::system(), at);
        assert_eq!(
            event.occurred_at(),
            time::macros::datetime!(2026-11-22 08:00:00.123456 UTC)
        );
    }
}
