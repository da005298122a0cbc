//! Backend names, derived from a customer token and nothing else.
//!
//! Each name is its own type, built from a [`Token`] (or parsed back from a name that carries
//! the platform's prefix), so a function that deletes a namespace cannot be handed a resource id,
//! and a name outside the platform's prefix cannot be built at all.
//!
//! Names on the shared Postgres cluster carry no token: a database and its role are
//! `cust_<digest>`, where the [`TokenDigest`] is the first 48 hex digits of the token's SHA-256
//! (the same value the `resources.token_digest` column holds), so statements, bound parameters
//! and connection lines in the server's log name no token. Databases created before that naming
//! keep their legacy name `cust_<token>` ([`DatabaseName::legacy_for_token`]) until they are
//! deprovisioned. Kubernetes namespaces, which no Postgres log names, keep `instant-customer-<token>`.

use std::fmt;

use keel_audit::Token;
use sha2::{Digest as _, Sha256};

/// Prefix of every customer namespace (and the orphan sweep's inventory filter).
pub const NAMESPACE_PREFIX: &str = "instant-customer-";
/// Prefix of every customer database and role on the shared Postgres cluster.
pub const DATABASE_PREFIX: &str = "cust_";

/// Hex digits of a [`TokenDigest`] (longer than any token, so a digest name and a legacy token
/// name never look alike).
pub const DIGEST_HEX_LEN: usize = 48;

/// The first [`DIGEST_HEX_LEN`] hex digits of a token's SHA-256: what names and looks up a
/// customer's objects wherever a token would otherwise be written down (SQL computes the same
/// value as `resources.token_digest`). Not a secret: the token cannot be recovered from it.
///
/// Held inline (no allocation), so a digest is built, cloned, hashed and compared without the
/// heap: the orphan sweep handles one for every item of a large inventory each tick. Digests
/// order as their hex text does.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenDigest([u8; DIGEST_HEX_LEN]);

impl TokenDigest {
    /// The digest of `token`.
    pub fn of(token: &Token) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hash = Sha256::digest(token.expose().as_bytes());
        let mut hex = [0u8; DIGEST_HEX_LEN];
        for (pair, &byte) in hex.chunks_exact_mut(2).zip(hash.iter()) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        Self(hex)
    }

    /// Parses [`DIGEST_HEX_LEN`] lowercase hex digits.
    pub fn parse(hex: &str) -> Option<Self> {
        let bytes: [u8; DIGEST_HEX_LEN] = hex.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            .then_some(Self(bytes))
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored (`of` and `parse`), so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The digest as an audit fingerprint (`sha256:<hex>`): the tagged form the audit trail's
    /// secret screen accepts under a `*_fingerprint` attribute, and the value orphan-reclaim
    /// rows carry as `token_fingerprint`.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", self.as_str())
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TokenDigest").field(&self.as_str()).finish()
    }
}

impl fmt::Display for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that does not carry the platform's prefix and a valid token. The value is not shown
/// (it may contain a token).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} is not one of the platform's names ({prefix}…); the value is not shown")]
pub struct ForeignName {
    what: &'static str,
    prefix: &'static str,
}

macro_rules! token_name {
    ($(#[$meta:meta])* $name:ident, $prefix:expr, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash)]
        pub struct $name {
            token: Token,
            name: String,
        }

        impl $name {
            /// The name for `token`'s backend object.
            pub fn for_token(token: &Token) -> Self {
                Self {
                    token: token.clone(),
                    name: format!("{}{}", $prefix, token.expose()),
                }
            }

            /// Parses a name found on a backend; refuses anything outside the platform's prefix.
            pub fn parse(name: &str) -> Result<Self, ForeignName> {
                name.strip_prefix($prefix)
                    .and_then(|token| Token::parse(token).ok())
                    .map(|token| Self::for_token(&token))
                    .ok_or(ForeignName { what: $what, prefix: $prefix })
            }

            /// The token the name derives from.
            pub fn token(&self) -> &Token {
                &self.token
            }

            /// The name itself, for the backend API. It contains the token: never log it.
            pub fn expose(&self) -> &str {
                &self.name
            }

            /// The name with its token masked, for logs.
            pub fn masked(&self) -> String {
                format!("{}{}", $prefix, self.token.masked())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.masked())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.masked())
            }
        }
    };
}

token_name!(
    /// A customer's Kubernetes namespace: `instant-customer-<token>`.
    NamespaceName,
    NAMESPACE_PREFIX,
    "namespace"
);
/// A customer's database on the shared Postgres cluster: `cust_<digest>` (see [`TokenDigest`]),
/// or the legacy `cust_<token>` of a database created before digest names.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DatabaseName {
    digest: TokenDigest,
    name: String,
    /// The token, for a legacy name only (whose text contains it).
    legacy: Option<Token>,
}

impl DatabaseName {
    /// The name of `token`'s database: `cust_<digest>`.
    pub fn for_token(token: &Token) -> Self {
        let digest = TokenDigest::of(token);
        Self {
            name: format!("{DATABASE_PREFIX}{digest}"),
            digest,
            legacy: None,
        }
    }

    /// The legacy name `cust_<token>` of a database created before digest names.
    pub fn legacy_for_token(token: &Token) -> Self {
        Self {
            digest: TokenDigest::of(token),
            name: format!("{DATABASE_PREFIX}{}", token.expose()),
            legacy: Some(token.clone()),
        }
    }

    /// Parses a name found on the cluster: `cust_<digest>`, or a legacy `cust_<token>`; refuses
    /// anything else.
    pub fn parse(name: &str) -> Result<Self, ForeignName> {
        let foreign = ForeignName {
            what: "database",
            prefix: DATABASE_PREFIX,
        };
        let rest = name.strip_prefix(DATABASE_PREFIX).ok_or(foreign.clone())?;
        if let Some(digest) = TokenDigest::parse(rest) {
            return Ok(Self {
                name: name.to_owned(),
                digest,
                legacy: None,
            });
        }
        Token::parse(rest)
            .map(|token| Self::legacy_for_token(&token))
            .map_err(|_| foreign)
    }

    /// The digest the name derives from (what `resources.token_digest` holds).
    pub fn digest(&self) -> &TokenDigest {
        &self.digest
    }

    /// Whether this is a legacy `cust_<token>` name.
    pub fn is_legacy(&self) -> bool {
        self.legacy.is_some()
    }

    /// The name itself, for the backend. A digest name is no secret; a legacy name contains its
    /// token: never log it.
    pub fn expose(&self) -> &str {
        &self.name
    }

    /// The name for logs: a digest name in full, a legacy name with its token masked.
    pub fn masked(&self) -> String {
        match &self.legacy {
            None => self.name.clone(),
            Some(token) => format!("{DATABASE_PREFIX}{}", token.masked()),
        }
    }

    /// [`DatabaseName::masked`], taking the name: a digest name is its own masked form, so it
    /// is handed over without a copy.
    pub fn into_masked(self) -> String {
        match self.legacy {
            None => self.name,
            Some(token) => format!("{DATABASE_PREFIX}{}", token.masked()),
        }
    }

    /// `text` with a legacy name's token masked (a digest name needs no masking).
    pub fn mask_in(&self, text: &str) -> String {
        match &self.legacy {
            None => text.to_owned(),
            Some(token) => text.replace(token.expose(), &token.masked()),
        }
    }
}

impl fmt::Debug for DatabaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseName({})", self.masked())
    }
}

impl fmt::Display for DatabaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// A customer's role on the shared Postgres cluster: the same name as the database it owns.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RoleName(DatabaseName);

impl RoleName {
    /// The role owning `database`.
    pub fn for_database(database: &DatabaseName) -> Self {
        Self(database.clone())
    }

    /// Parses a role name found on the cluster or stored as a resource's provider id: what
    /// provisioning creates (`cust_<digest>`, or a legacy `cust_<token>`); refuses anything else,
    /// so no platform role (`postgres`, `keel_app`, a replication role) ever parses.
    pub fn parse(name: &str) -> Result<Self, ForeignName> {
        DatabaseName::parse(name)
            .map(Self)
            .map_err(|_| ForeignName {
                what: "role",
                prefix: DATABASE_PREFIX,
            })
    }

    /// The digest the name derives from.
    pub fn digest(&self) -> &TokenDigest {
        self.0.digest()
    }

    /// Whether this is `token`'s role: a digest name whose digest is [`TokenDigest::of`] the
    /// token, or a legacy name that carries exactly the token.
    pub fn belongs_to(&self, token: &Token) -> bool {
        match &self.0.legacy {
            Some(legacy) => legacy == token,
            None => self.0.digest == TokenDigest::of(token),
        }
    }

    /// The name itself, for the backend (see [`DatabaseName::expose`]).
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The name for logs.
    pub fn masked(&self) -> String {
        self.0.masked()
    }

    /// Whether the name itself carries the customer's token (a legacy `cust_<token>`): it must
    /// then never be sent in a statement's text or parameters, which a server may log.
    pub fn carries_token(&self) -> bool {
        self.0.legacy.is_some()
    }
}

impl fmt::Debug for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleName({})", self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_token_and_display_masked() {
        let token = Token::parse("a1b2c3d4e5f6").unwrap();
        let ns = NamespaceName::for_token(&token);
        assert_eq!(ns.expose(), "instant-customer-a1b2c3d4e5f6");
        assert_eq!(ns.to_string(), "instant-customer-a1b2…");
        assert!(!format!("{ns:?}").contains("a1b2c3d4e5f6"));
        let db = DatabaseName::for_token(&token);
        assert_eq!(
            db.expose(),
            format!("cust_{}", TokenDigest::of(&token)),
            "a database name carries the digest, not the token"
        );
        assert!(!db.expose().contains(token.expose()));
        assert!(db.expose().len() <= 63, "fits a Postgres identifier");
        assert_eq!(
            RoleName::for_database(&db).expose(),
            db.expose(),
            "the role is named like its database"
        );
        // SHA-256("a1b2c3d4e5f6"), as SQL's sha256() computes it.
        assert_eq!(
            TokenDigest::of(&token).as_str(),
            "bde81e9384b7848e57951ec32c7344459233235bfa519d73"
        );
        let legacy = DatabaseName::legacy_for_token(&token);
        assert_eq!(legacy.expose(), "cust_a1b2c3d4e5f6");
        assert!(!legacy.masked().contains("a1b2c3d4e5f6"));
        assert_eq!(legacy.digest(), db.digest(), "both names share the digest");
    }

    #[test]
    fn a_name_taken_for_logs_masks_exactly_as_the_borrowed_form() {
        let token = Token::parse("a1b2c3d4e5f6").unwrap();
        let names = [
            crate::BackendName::Database(DatabaseName::for_token(&token)),
            crate::BackendName::Database(DatabaseName::legacy_for_token(&token)),
            crate::BackendName::Namespace {
                name: NamespaceName::for_token(&token),
                resource_type: keel_audit::ResourceType::Redis,
            },
        ];
        for name in names {
            let masked = name.masked();
            assert!(!masked.contains(token.expose()), "{masked}");
            assert_eq!(name.into_masked(), masked);
        }
    }

    #[test]
    fn a_digest_is_held_inline_and_reads_back_as_the_hex_it_was_made_from() {
        // Inline: the digest itself is its 48 hex digits, with nothing behind a pointer.
        assert_eq!(std::mem::size_of::<TokenDigest>(), DIGEST_HEX_LEN);
        let tokens = [
            "a1b2c3d4e5f6",
            "000000000000",
            "ffffffffffff",
            "zz9zz9zz9zz9",
        ]
        .map(|t| Token::parse(t).expect("a valid token"));
        let digests = tokens.each_ref().map(TokenDigest::of);
        for digest in &digests {
            let parsed = TokenDigest::parse(digest.as_str()).expect("a digest parses back");
            assert_eq!(&parsed, digest);
            assert_eq!(parsed.to_string(), digest.as_str());
            assert_eq!(
                format!("{digest:?}"),
                format!("TokenDigest({:?})", digest.as_str()),
                "Debug shows the hex as a string"
            );
            assert_eq!(digest.fingerprint(), format!("sha256:{}", digest.as_str()));
        }
        // Digests order as their text does (the sweep sends them to the server in this order).
        let mut by_digest = digests.to_vec();
        by_digest.sort();
        let mut by_text: Vec<&str> = digests.iter().map(TokenDigest::as_str).collect();
        by_text.sort_unstable();
        assert_eq!(
            by_digest
                .iter()
                .map(TokenDigest::as_str)
                .collect::<Vec<_>>(),
            by_text
        );
        // Only 48 lowercase hex digits parse: not 47 or 49, not upper case, not another letter,
        // not 48 bytes that hold a multi-byte character.
        let good = digests[0].as_str();
        for bad in [
            good[..47].to_owned(),
            format!("{good}0"),
            good.to_uppercase(),
            format!("{}g", &good[..47]),
            format!("{}é", &good[..46]),
            String::new(),
        ] {
            assert!(TokenDigest::parse(&bad).is_none(), "{bad:?} parsed");
        }
    }

    #[test]
    fn only_names_inside_the_platform_prefix_parse() {
        assert!(NamespaceName::parse("instant-customer-a1b2c3d4e5f6").is_ok());
        for foreign in [
            "kube-system",
            "instant-customer-",
            "instant-customer-UPPER123",
            "cust_a1b2c3d4e5f6",
            "",
        ] {
            let err = NamespaceName::parse(foreign).unwrap_err();
            assert_eq!(
                err.to_string(),
                "namespace is not one of the platform's names (instant-customer-…); the value is not shown"
            );
        }
        assert!(DatabaseName::parse("postgres").is_err());
        assert!(
            DatabaseName::parse("cust_a1b2c3d4e5f6")
                .unwrap()
                .is_legacy()
        );
        let token = Token::parse("a1b2c3d4e5f6").unwrap();
        let digest_name = DatabaseName::for_token(&token);
        let parsed = DatabaseName::parse(digest_name.expose()).unwrap();
        assert!(!parsed.is_legacy());
        assert_eq!(parsed, digest_name);
    }

    #[test]
    fn a_role_name_parses_only_as_provisioning_creates_it_and_belongs_to_its_token() {
        let token = Token::parse("a1b2c3d4e5f6").unwrap();
        let other = Token::parse("ffff0000ffff").unwrap();
        let digest_role = RoleName::for_database(&DatabaseName::for_token(&token));
        let parsed = RoleName::parse(digest_role.expose()).unwrap();
        assert_eq!(parsed, digest_role);
        assert_eq!(parsed.digest(), &TokenDigest::of(&token));
        assert!(parsed.belongs_to(&token));
        assert!(!parsed.belongs_to(&other));

        let legacy = RoleName::parse("cust_a1b2c3d4e5f6").unwrap();
        assert!(legacy.belongs_to(&token));
        assert!(!legacy.belongs_to(&other));
        assert!(!format!("{legacy:?}").contains("a1b2c3d4e5f6"));

        for foreign in [
            "postgres",
            "keel_app",
            "replicator",
            "cust_",
            "Cust_a1b2c3d4e5f6",
            "instant-customer-a1b2c3d4e5f6",
            // A digest with an upper-case digit is not a digest provisioning writes.
            &format!("cust_{}", TokenDigest::of(&token).as_str().to_uppercase()),
        ] {
            let err = RoleName::parse(foreign).unwrap_err();
            assert_eq!(
                err.to_string(),
                "role is not one of the platform's names (cust_…); the value is not shown",
                "{foreign}"
            );
        }
    }
}
