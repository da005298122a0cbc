//! The secret screen against corpora (FND-6, FND-7, FND-19): credential shapes are refused in
//! every field, ordinary audit vocabulary is accepted, and one policy withholds what is refused.

use keel_audit::{Actor, Attributes, RequestId, WITHHELD};

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

/// FND-6: every input the audit accepted before, as an attribute value, each refused.
const SECRET_VALUES: &[&str] = &[
    "postgres%3A%2F%2Fapp%3Ahunter2%40db%2Fapp",
    "postgres:/app:hunter2@db/app",
    "host=db user=app password = hunter2",
    "Server=db;Uid=sa;Pwd=hunter2;",
    "passwd=hunter2",
    "password: hunter2",
    "{\"password\":\"hunter2\"}",
    "client_secret=abcdef123456",
    "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AKIAIOSFODNN7EXAMPLE",
    JWT,
    "Bearer\teyJhbGciOiJIUzI1NiJ9abc",
    "Bearer\u{a0}abcdef0123456789",
    "bearer:abcdef0123456789",
    "Authorization: Basic dXNlcjpodW50ZXIy",
    "Authorization: Token ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "xoxb-123456789012-abcdefghijkl",
    "https://hooks.slack.com/services/T000/B000/XXXXXXXX",
    "https://api.example.com/v1?access_token=abc123def456",
    "https://bucket.s3.amazonaws.com/o?X-Amz-Credential=AKIA%2F20260101&X-Amz-Signature=abcdef",
    "----BEGIN PRIVATE KEY----",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW",
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKjMzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvuNMoSfm76oqFvAp8Gy0iz5sxjZmSnXyCdPEovGhLa0VzMaQ8s+CLOyS56YyCFGeJZ",
    "postgres：／／app:hunter2@db/app",
    "pass\u{200b}word=hunter2",
    "namespace instant-customer-a1b2c3d4e5f6 not found",
];

/// FND-6: keys that name a secret.
const SECRET_KEYS: &[&str] = &[
    "pw",
    "pass",
    "passphrase",
    "passwords",
    "dbpassword",
    "secrets",
    "tokens",
    "accesstoken",
    "access_key",
    "aws_secret_access_key",
    "ssh_key",
    "signing_key",
    "client_key",
    "privatekey",
    "jwt",
    "bearer",
    "auth",
    "otp",
    "pin",
    "mfa_code",
    "recovery_code",
    "conninfo",
    "connstr",
    "connection_string",
    "kubeconfig",
];

/// FND-7: ordinary audit vocabulary the screen refused before.
const ORDINARY_KEYS: &[&str] = &[
    "authorization_decision",
    "password_changed",
    "password_reset_requested",
    "token_type",
    "token_count",
    "max_token",
    "secret_name",
    "secret_ref",
    "secret_rotated_at",
    "credential_id",
    "credentials_rotated",
    "api_key_id",
    "cookie_consent",
    "dsn_host",
];

const ORDINARY_VALUES: &[&str] = &[
    "the bearer of this certificate",
    "-----BEGIN CERTIFICATE-----",
    "ssh://git@github.com/org/repo.git",
    "https://ops@example.com/hook",
    "redis://cache/ns-ab12",
    "moved from mysql://db-old/app to mysql://db-new/app",
    "the database URL is not a valid postgres:// URL (its value is not shown)",
    "namespace instant-customer-a1b2… not found",
    "token expired",
    "deleted: /a:a@1970-01-01T00:00:00Z: 2 units -> none",
    "https://example.com/docs/Some/Long/Path/With/MixedCase/Segments/And/More/Segments/Here",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
];

fn refused(key: &str, value: &str) -> bool {
    Attributes::new().insert(key, value).is_err()
}

#[test]
fn an_adversarial_secret_corpus_is_refused_in_every_field() {
    for value in SECRET_VALUES {
        assert!(refused("detail", value), "value accepted: {value:?}");
        assert!(
            keel_audit::looks_secret(value),
            "looks_secret missed {value:?}"
        );
    }
    for key in SECRET_KEYS {
        assert!(refused(key, "hunter2"), "key accepted: {key}");
    }
    // Split secrets: each half is refused on its own shape.
    assert!(refused("a", "postgres:/"));
    assert!(refused("b", "/app:hunter2@db/app"));
    assert!(refused("pw", "hunter2"));
    // `_fingerprint` is no escape hatch: only a tagged digest is accepted under it.
    assert!(refused(
        "password_fingerprint",
        "correct-horse-battery-staple"
    ));
    assert!(refused("token_fingerprint", "a1b2c3d4e5f6"));
    Attributes::new()
        .insert("token_fingerprint", "hmac:9a8b7c6d5e4f")
        .unwrap();
    // Actor and request id go through the same screen.
    let ghp = "ghp_16C7e42F292c6912E7710c838347Ae178B4a";
    for id in [
        JWT,
        "AKIAIOSFODNN7EXAMPLE",
        ghp,
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    ] {
        assert!(RequestId::parse(id).is_err(), "request id accepted: {id}");
    }
    assert!(Actor::parse("sk_live_4ec39hqlyjwdarjtt1zdp7dc").is_err());
    assert!(Actor::parse("operator:alice").is_ok());
    assert!(RequestId::parse("req-01HZX3K9Q").is_ok());
}

#[test]
fn ordinary_audit_vocabulary_is_accepted() {
    for key in ORDINARY_KEYS {
        assert!(!refused(key, "yes"), "key refused: {key}");
    }
    for value in ORDINARY_VALUES {
        assert!(!refused("detail", value), "value refused: {value:?}");
    }
}

/// FND-7: one policy for a refusal: the value is withheld and the row says so, whatever the
/// caller; only a malformed key is still an error.
#[test]
fn a_refused_attribute_is_withheld_not_dropped_or_fatal() {
    let mut attrs = Attributes::new();
    assert!(!attrs.insert_or_withhold("tier", "pro").unwrap());
    assert!(
        attrs
            .insert_or_withhold("detail", "password=hunter2")
            .unwrap()
    );
    assert!(attrs.insert_or_withhold("password", "hunter2").unwrap());
    assert_eq!(attrs.get("tier"), Some("pro"));
    assert_eq!(attrs.get("detail"), Some(WITHHELD));
    assert_eq!(attrs.get("withheld_attribute"), Some(WITHHELD));
    assert!(attrs.get("password").is_none());
    assert!(attrs.insert_or_withhold("Bad Key", "x").is_err());
}
