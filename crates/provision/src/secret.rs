//! Secrets that only ever display redacted, and whose memory is zeroed when they are dropped.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A customer's connection URL (it carries the password). `Debug` and `Display` redact it; the
/// value is reachable only through [`ConnectionUrl::expose`], for the one response that shows it.
/// Its memory is zeroed on drop (copies taken through `expose` are the caller's to keep short).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionUrl(String);

impl ConnectionUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password (`scheme://user@host/…`): the address the platform keeps.
    /// The password is shown once, in the 201, and stored nowhere.
    pub fn address(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return self.0.clone();
        };
        let (authority, tail) = match rest.find(['/', '?', '#']) {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                format!("{scheme}://{user}@{host}{tail}")
            }
            None => self.0.clone(),
        }
    }
}

impl Zeroize for ConnectionUrl {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for ConnectionUrl {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for ConnectionUrl {}

impl fmt::Debug for ConnectionUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectionUrl(<redacted>)")
    }
}

impl fmt::Display for ConnectionUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted connection URL>")
    }
}

/// A generated password. `Debug` and `Display` redact it; its memory is zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    /// The password itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Zeroize for Password {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for Password {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for Password {}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted password>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_display() {
        let url = ConnectionUrl::new("postgres://cust:s3cr3t@db/cust");
        let pw = Password::new("s3cr3t");
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            pw.to_string(),
            format!("{pw:?}"),
        ] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
        assert_eq!(pw.expose(), "s3cr3t");
    }

    fn zeroized_on_drop<T: ZeroizeOnDrop>() {}

    /// OPS-24: the secrets' memory is zeroed when they are dropped (`Drop` runs `zeroize`,
    /// which empties the value).
    #[test]
    fn secrets_are_zeroized_on_drop() {
        zeroized_on_drop::<Password>();
        zeroized_on_drop::<ConnectionUrl>();
        let mut pw = Password::new("s3cr3t");
        pw.zeroize();
        assert_eq!(pw.expose(), "");
        let mut url = ConnectionUrl::new("postgres://cust:s3cr3t@db/cust");
        url.zeroize();
        assert_eq!(url.expose(), "");
    }

    #[test]
    fn the_stored_address_never_carries_the_password() {
        for (url, address) in [
            (
                "postgres://cust_a:s3cr3t@db:5432/cust_a?sslmode=require",
                "postgres://cust_a@db:5432/cust_a?sslmode=require",
            ),
            (
                "postgres://cust_a:s3cr3t@localhost:5432/cust_a?host=/run/pg",
                "postgres://cust_a@localhost:5432/cust_a?host=/run/pg",
            ),
            (
                "https://kube.test/api/v1/namespaces/x",
                "https://kube.test/api/v1/namespaces/x",
            ),
        ] {
            assert_eq!(ConnectionUrl::new(url).address(), address);
        }
    }
}
