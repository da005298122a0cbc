//! Backend names, derived from a customer token and nothing else.
//!
//! Each name is its own type, built from a [`Token`] (or parsed back from a name that carries
//! the platform's prefix), so a function that deletes a namespace cannot be handed a resource id,
//! and a name outside the platform's prefix cannot be built at all.

use std::fmt;

use keel_audit::Token;

/// Prefix of every customer namespace (and the orphan sweep's inventory filter).
pub const NAMESPACE_PREFIX: &str = "instant-customer-";
/// Prefix of every customer database and role on the shared Postgres cluster.
pub const DATABASE_PREFIX: &str = "cust_";

/// A name that does not carry the platform's prefix and a valid token. The value is not shown
/// (it may contain a token).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} is not one of the platform's names ({prefix}<token>); the value is not shown")]
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
token_name!(
    /// A customer's database on the shared Postgres cluster: `cust_<token>`.
    DatabaseName,
    DATABASE_PREFIX,
    "database"
);
token_name!(
    /// A customer's role on the shared Postgres cluster: `cust_<token>` (it owns the database).
    RoleName,
    DATABASE_PREFIX,
    "role"
);

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
        assert_eq!(
            DatabaseName::for_token(&token).expose(),
            "cust_a1b2c3d4e5f6"
        );
        assert_eq!(RoleName::for_token(&token).token(), &token);
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
                "namespace is not one of the platform's names (instant-customer-<token>); the value is not shown"
            );
        }
        assert!(DatabaseName::parse("postgres").is_err());
        assert!(DatabaseName::parse("cust_a1b2c3d4e5f6").is_ok());
    }
}
