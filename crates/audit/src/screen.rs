//! The secret screen: which attribute keys name a secret and which values look like one.
//!
//! Values are normalised first (fullwidth forms folded to ASCII, zero-width characters removed,
//! tabs and no-break spaces made spaces, percent-escapes decoded), then matched against known
//! credential shapes: connection URLs, URLs carrying a password or a signed query, `key=value`
//! and `key: value` forms of secret words, bearer/basic/token authorization, JWTs, cloud and
//! SaaS key formats, private key material and Keel's own backend names that embed a token.
//! Shapes are what the screen refuses; it is not a proof that no secret passes.
//!
//! Every audited write screens each of its values, so the fixed strings the screen looks for
//! are compiled into searchers once per process ([`Needles`]), not once per search.

use std::sync::LazyLock;

use memchr::memmem::{FindIter, Finder};

/// Words that make an attribute key name a secret (as one `_`-separated word of the key).
const SECRET_KEY_WORDS: &[&str] = &[
    "password",
    "passwords",
    "passwd",
    "pwd",
    "pw",
    "pass",
    "passphrase",
    "dbpassword",
    "secret",
    "secrets",
    "token",
    "tokens",
    "accesstoken",
    "dsn",
    "credential",
    "credentials",
    "apikey",
    "authorization",
    "cookie",
    "jwt",
    "bearer",
    "auth",
    "otp",
    "pin",
    "privatekey",
    "conninfo",
    "connstr",
    "kubeconfig",
];

/// Two-word keys that name a secret (`access_key`, `mfa_code`, …).
const SECRET_KEY_PAIRS: &[(&str, &str)] = &[
    ("api", "key"),
    ("access", "key"),
    ("secret", "key"),
    ("private", "key"),
    ("ssh", "key"),
    ("signing", "key"),
    ("client", "key"),
    ("session", "key"),
    ("encryption", "key"),
    ("mfa", "code"),
    ("recovery", "code"),
    ("connection", "url"),
    ("connection", "string"),
    ("database", "url"),
    ("conn", "url"),
];

/// A word after a secret word that makes the key name something about the secret, not the
/// secret itself (`secret_name`, `token_type`, `password_changed`, `api_key_id`).
const NOUN_SUFFIXES: &[&str] = &[
    "id",
    "ids",
    "name",
    "names",
    "type",
    "changed",
    "at",
    "count",
    "ref",
    "rotated",
    "decision",
    "reset",
    "requested",
    "consent",
    "host",
    "kind",
    "scope",
    "expires",
    "expiry",
    "length",
    "policy",
    "version",
    "source",
    "status",
];

/// A word before a secret word that makes the key a quantity (`max_token`).
const QUANTITY_PREFIXES: &[&str] = &["max", "min", "num"];

/// Whether an attribute key names a secret.
pub(crate) fn key_names_a_secret(key: &str) -> bool {
    let words: Vec<&str> = key.split('_').collect();
    let mut i = 0;
    while i < words.len() {
        let (hit, len) =
            if i + 1 < words.len() && SECRET_KEY_PAIRS.contains(&(words[i], words[i + 1])) {
                (true, 2)
            } else {
                (SECRET_KEY_WORDS.contains(&words[i]), 1)
            };
        if hit {
            let next = words.get(i + len);
            let described = next.is_some_and(|n| NOUN_SUFFIXES.contains(n));
            let quantity = i > 0 && QUANTITY_PREFIXES.contains(&words[i - 1]);
            if !described && !quantity {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Whether a `*_fingerprint` value is a tagged digest (`hmac:9a8b…`, `sha256:…`): a tag of
/// lower-case letters and digits, a colon, at least 6 hex digits. Anything else under such a
/// key is refused, so the suffix cannot smuggle a raw secret.
pub(crate) fn is_fingerprint(value: &str) -> bool {
    let Some((tag, digest)) = value.split_once(':') else {
        return false;
    };
    !tag.is_empty()
        && tag.len() <= 16
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && (6..=128).contains(&digest.len())
        && digest.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Folds the obfuscations a screen must see through: fullwidth ASCII forms, zero-width
/// characters, tabs and no-break spaces.
fn normalise(value: &str) -> String {
    value
        .chars()
        .filter(|c| {
            !matches!(
                c,
                '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}'
            )
        })
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\t' | '\u{00A0}' | '\u{2007}' | '\u{202F}' | '\u{3000}' => ' ',
            other => other,
        })
        .collect()
}

/// Decodes `%XX` escapes (invalid ones are kept as they are).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            // Both digits are ASCII, so this never splits a character.
            out.push(u8::try_from(high * 16 + low).unwrap_or(b'%'));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Schemes whose URLs are connection strings: secret even without a password.
const ALWAYS_SECRET_SCHEMES: &[&str] = &["postgres:/", "postgresql:/", "jdbc:postgresql:"];

/// Query keys of signed or token-carrying URLs.
const SECRET_QUERY_KEYS: &[&str] = &[
    "token=",
    "access_token=",
    "id_token=",
    "refresh_token=",
    "signature=",
    "sig=",
    "x-amz-signature=",
    "x-amz-credential=",
    "x-goog-signature=",
    "api_key=",
    "apikey=",
    "key=",
    "client_secret=",
    "password=",
];

/// Words that, followed by `=` or `:` and a value, give a secret away.
const SECRET_ASSIGN_WORDS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "pass",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "api_key",
    "access_key",
    "private_key",
    "credential",
    "credentials",
];

/// Prefixes of well-known API keys and tokens.
const TOKEN_PREFIXES: &[&str] = &[
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "xoxb-",
    "xoxa-",
    "xoxp-",
    "xoxr-",
    "xoxs-",
    "npm_",
    "pypi-",
];

/// The fixed strings the screen searches for, each compiled once into a searcher.
struct Needles {
    schemes: Vec<Finder<'static>>,
    assign_words: Vec<Finder<'static>>,
    authorization_schemes: Vec<Finder<'static>>,
    token_prefixes: Vec<Finder<'static>>,
    pem_begin: Finder<'static>,
    private_key: Finder<'static>,
    openssh: Finder<'static>,
    pem_private_key_end: Finder<'static>,
    openssh_key_base64: Finder<'static>,
    slack_hook: Finder<'static>,
    backend_name: Finder<'static>,
    keel_api_key: Finder<'static>,
    url_scheme_separator: Finder<'static>,
    aws_key_prefixes: [Finder<'static>; 2],
}

/// The schemes of an authorization header value.
const AUTHORIZATION_SCHEMES: &[&str] = &["bearer", "basic", "token", "authorization"];

fn compiled(words: &[&'static str]) -> Vec<Finder<'static>> {
    words.iter().map(|word| Finder::new(*word)).collect()
}

static NEEDLES: LazyLock<Needles> = LazyLock::new(|| Needles {
    schemes: compiled(ALWAYS_SECRET_SCHEMES),
    assign_words: compiled(SECRET_ASSIGN_WORDS),
    authorization_schemes: compiled(AUTHORIZATION_SCHEMES),
    token_prefixes: compiled(TOKEN_PREFIXES),
    pem_begin: Finder::new("----begin"),
    private_key: Finder::new("private key"),
    openssh: Finder::new("openssh"),
    pem_private_key_end: Finder::new("private key-----"),
    // `openssh-key-v1` in base64: key material without its PEM header.
    openssh_key_base64: Finder::new("b3blbnnzac1rzxktdjeaaaaa"),
    slack_hook: Finder::new("hooks.slack.com/services/"),
    backend_name: Finder::new("instant-customer-"),
    keel_api_key: Finder::new("keel_"),
    url_scheme_separator: Finder::new(":/"),
    aws_key_prefixes: [Finder::new("AKIA"), Finder::new("ASIA")],
});

/// Where `needle` starts in `text`, left to right, without overlaps (as `str::match_indices`).
/// Every needle is ASCII, so each position is a character boundary of `text`.
fn starts<'t>(needle: &'t Finder<'static>, text: &'t str) -> FindIter<'t, 't> {
    needle.find_iter(text.as_bytes())
}

/// Whether `text` contains `needle`.
fn has(needle: &Finder<'static>, text: &str) -> bool {
    needle.find(text.as_bytes()).is_some()
}

fn is_word_start(text: &str, at: usize) -> bool {
    text[..at]
        .chars()
        .next_back()
        .is_none_or(|c| !c.is_ascii_alphanumeric())
}

/// `word = value`, `word: value`, `"word":"value"`, allowing spaces and quotes around the
/// separator, with `word` at a word start (`_` counts as a boundary: `client_secret=`).
fn assigns_a_secret_word(lower: &str) -> bool {
    NEEDLES.assign_words.iter().any(|needle| {
        let word_len = needle.needle().len();
        starts(needle, lower).any(|at| {
            if !is_word_start(lower, at) && !lower[..at].ends_with('_') {
                return false;
            }
            let rest = lower[at + word_len..].trim_start_matches(['"', '\'']);
            let rest = rest.trim_start();
            let Some(rest) = rest.strip_prefix(['=', ':']) else {
                return false;
            };
            let value = rest.trim_start().trim_start_matches(['"', '\'']);
            value
                .chars()
                .next()
                .is_some_and(|c| !c.is_whitespace() && c != ',' && c != '}')
        })
    })
}

/// `bearer <token>`, `basic <base64>`, `token <value>` as an authorization scheme: the scheme
/// word followed by a separator and a credential-looking run of at least 8 characters.
fn carries_an_authorization(lower: &str) -> bool {
    NEEDLES.authorization_schemes.iter().any(|needle| {
        let scheme = needle.needle();
        starts(needle, lower).any(|at| {
            if !is_word_start(lower, at) {
                return false;
            }
            let rest = &lower[at + scheme.len()..];
            let Some(first) = rest.chars().next() else {
                return false;
            };
            if !(first.is_whitespace() || first == ':' || first == '=') {
                return false;
            }
            let credential: String = rest
                .trim_start_matches(|c: char| c.is_whitespace() || c == ':' || c == '=')
                .chars()
                .take_while(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '/' | '=')
                })
                .collect();
            // Prose ("the bearer of this certificate") has short words after the scheme
            // word; a credential is a long run (for `token`, one with a digit too).
            match scheme {
                b"authorization" => credential.len() >= 5,
                b"token" => credential.len() >= 8 && credential.chars().any(|c| c.is_ascii_digit()),
                _ => credential.len() >= 8,
            }
        })
    })
}

/// A run of JWT, cloud-key or private-key shapes in the original (case-sensitive) text.
fn has_token_shape(original: &str) -> bool {
    let runs = original.split(|c: char| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '/' | '='))
    });
    for run in runs {
        // JWT: three base64url parts, the first two JSON objects (`eyJ`).
        let mut parts = run.split('.');
        if let (Some(header), Some(claims)) = (parts.next(), parts.next())
            && header.starts_with("eyJ")
            && claims.starts_with("eyJ")
        {
            return true;
        }
        // AWS access key ids.
        for prefix in &NEEDLES.aws_key_prefixes {
            if let Some(pos) = prefix.find(run.as_bytes()) {
                let tail: String = run[pos + 4..].chars().take(16).collect();
                if tail.len() == 16
                    && tail
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                {
                    return true;
                }
            }
        }
        // Long base64 with both cases and `+` or `/`: key material without its PEM header.
        let separators = run.matches(['+', '/']).count();
        if run.len() >= 60
            && separators > 0
            && separators * 8 <= run.len()
            && !run.contains("//")
            && !run.contains('.')
            && run.chars().any(|c| c.is_ascii_digit())
            && run.chars().any(|c| c.is_ascii_uppercase())
            && run.chars().any(|c| c.is_ascii_lowercase())
        {
            return true;
        }
    }
    false
}

/// A host as a URL names it: a name starting with a letter (`db`, `db.internal`) or a dotted
/// IPv4 address, with an optional `:port`. A timestamp (`1970-01-31t00:00:00z`) is not one.
fn looks_like_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return false,
        None => host,
    };
    let named = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    let ipv4 = name.split('.').count() == 4
        && name.split('.').all(|part| {
            !part.is_empty() && part.len() <= 3 && part.bytes().all(|b| b.is_ascii_digit())
        });
    named || ipv4
}

/// Whether free text looks like it holds a secret (see the module documentation).
pub(crate) fn value_looks_secret(value: &str) -> bool {
    let normalised = normalise(value);
    if text_looks_secret(&normalised) {
        return true;
    }
    // Decoding changes nothing without a `%`: the same text is not screened twice.
    normalised.contains('%') && text_looks_secret(&percent_decode(&normalised))
}

fn text_looks_secret(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    // A connection URL with anything after its scheme (prose naming the scheme passes).
    if NEEDLES.schemes.iter().any(|scheme| {
        starts(scheme, &lower).any(|at| {
            lower[at + scheme.needle().len()..]
                .trim_start_matches('/')
                .chars()
                .next()
                .is_none_or(|c| !c.is_whitespace())
        })
    }) {
        return true;
    }
    let n = &*NEEDLES;
    if has(&n.pem_begin, &lower) && (has(&n.private_key, &lower) || has(&n.openssh, &lower))
        || has(&n.pem_private_key_end, &lower)
        || has(&n.openssh_key_base64, &lower)
    {
        return true;
    }
    if assigns_a_secret_word(&lower) || carries_an_authorization(&lower) {
        return true;
    }
    // A known key prefix at a word start, followed by a key-length run (16 or more).
    if n.token_prefixes.iter().any(|prefix| {
        starts(prefix, &lower).any(|at| {
            is_word_start(&lower, at)
                && lower[at + prefix.needle().len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
                    .count()
                    >= 16
        })
    }) || has(&n.slack_hook, &lower)
    {
        return true;
    }
    if has_token_shape(text) {
        return true;
    }
    // Keel's own API keys: `keel_`, a 12-hex-digit id, `_`, then the secret.
    if starts(&n.keel_api_key, &lower).any(|at| {
        let rest = &lower[at + n.keel_api_key.needle().len()..];
        let bytes = rest.as_bytes();
        // Bytes 0..13 checked as ASCII first, so 13 is a character boundary.
        is_word_start(&lower, at)
            && bytes.len() > 13
            && bytes[..12].iter().all(u8::is_ascii_hexdigit)
            && bytes[12] == b'_'
            && rest[13..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
                .count()
                >= 16
    }) {
        return true;
    }
    // Keel's own backend names embed the whole customer token.
    if starts(&n.backend_name, &lower).any(|at| {
        lower[at + n.backend_name.needle().len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .count()
            >= 8
    }) {
        return true;
    }
    // `user:password@host` without its scheme (half of a URL split across attributes).
    if text.split_whitespace().any(|word| {
        word.trim_start_matches('/')
            .split('/')
            .next()
            .and_then(|authority| authority.rsplit_once('@'))
            .is_some_and(|(userinfo, host)| {
                let userinfo_char =
                    |c: char| c.is_ascii_alphanumeric() || "._~!$&'()*+,;=%-".contains(c);
                userinfo.split_once(':').is_some_and(|(user, password)| {
                    !user.is_empty()
                        && !password.is_empty()
                        && user.chars().all(userinfo_char)
                        && password.chars().all(userinfo_char)
                }) && looks_like_host(host)
            })
    }) {
        return true;
    }
    // URLs: a password in the authority (`scheme:/user:pass@host`), or a signed / token-carrying
    // query. Only URL-shaped text counts: a scheme letter before `:/`, userinfo and host in
    // their own character sets.
    starts(&n.url_scheme_separator, &lower).any(|at| {
        if !lower[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphabetic())
        {
            return false;
        }
        let after = lower[at + 1..].trim_start_matches('/');
        let url = after.split(char::is_whitespace).next().unwrap_or("");
        let authority = url.split(['/', '?', '#']).next().unwrap_or("");
        let userinfo_char = |c: char| c.is_ascii_alphanumeric() || "._~!$&'()*+,;=%-".contains(c);
        let password_in_authority = authority.rsplit_once('@').is_some_and(|(userinfo, host)| {
            userinfo
                .split_once(':')
                .is_some_and(|(_, password)| !password.is_empty())
                && userinfo.chars().all(|c| c == ':' || userinfo_char(c))
                && looks_like_host(host)
        });
        let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
        let signed = query
            .split('&')
            .any(|pair| SECRET_QUERY_KEYS.iter().any(|k| pair.starts_with(k)));
        password_in_authority || signed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_needle() -> Vec<&'static Finder<'static>> {
        let n = &*NEEDLES;
        let mut all: Vec<&Finder<'static>> = Vec::new();
        for list in [
            &n.schemes,
            &n.assign_words,
            &n.authorization_schemes,
            &n.token_prefixes,
        ] {
            all.extend(list.iter());
        }
        all.extend(n.aws_key_prefixes.iter());
        all.extend([
            &n.pem_begin,
            &n.private_key,
            &n.openssh,
            &n.pem_private_key_end,
            &n.openssh_key_base64,
            &n.slack_hook,
            &n.backend_name,
            &n.keel_api_key,
            &n.url_scheme_separator,
        ]);
        all
    }

    /// Keel's own API keys (`keel_<12 hex>_<secret>`) are secrets wherever they appear, a
    /// request id included; names that merely start with `keel_` are not, and text with
    /// multi-byte characters right after the prefix is screened without a panic.
    #[test]
    fn keels_own_api_keys_look_secret() {
        let key = format!("keel_0123456789ab_{}", "A1b2-_".repeat(8));
        assert!(value_looks_secret(&key));
        assert!(value_looks_secret(&format!("sent {key} by mistake")));
        assert!(crate::RequestId::parse(&key).is_err());
        for plain in [
            "keel_installation",
            "keel_orphan_sweep_periods",
            "keel_0123456789ab",
            "keel_0123456789ab_short",
            "keel_éééééééééééééééééé",
            "keel_0123456789aé_xxxxxxxxxxxxxxxxxxxxxxxx",
        ] {
            assert!(!value_looks_secret(plain), "{plain}");
        }
    }

    /// The screen slices its text at the positions its searchers report, so every needle must
    /// be ASCII (a match then always starts on a character boundary), and the searchers must
    /// report the places `str::match_indices` reports: left to right, without overlaps.
    #[test]
    fn the_compiled_searchers_find_what_match_indices_finds() {
        let texts = [
            "",
            "password=passwordpassword=x",
            "tokentokentoken token: abc",
            "ｐａｓｓ：é password=ü bearer bearerbearer 12345678",
            "postgres:/postgres://postgresql:/x jdbc:postgresql://h",
            "AKIAAKIAIOSFODNN7EXAMPLE ASIA",
            "ghp_ghp_xoxb-xoxb- npm_pypi- sk_live_sk_test_",
            "-----begin openssh private key----- b3blbnnzac1rzxktdjeaaaaa",
            "https://hooks.slack.com/services/a instant-customer-instant-customer-a1",
            "::/ a:/b:/ é:/",
        ];
        for needle in every_needle() {
            let pattern = std::str::from_utf8(needle.needle()).expect("needles are text");
            assert!(pattern.is_ascii(), "{pattern:?} is not ASCII");
            for text in texts {
                let compiled: Vec<usize> = starts(needle, text).collect();
                let reference: Vec<usize> = text.match_indices(pattern).map(|(at, _)| at).collect();
                assert_eq!(compiled, reference, "{pattern:?} in {text:?}");
                assert_eq!(
                    has(needle, text),
                    text.contains(pattern),
                    "{pattern:?} in {text:?}"
                );
            }
        }
    }

    /// Screening the percent-decoded form only when there is a `%` changes no answer: without
    /// one, decoding returns the text unchanged.
    #[test]
    fn a_value_without_a_percent_decodes_to_itself() {
        for value in [
            "postgres:/app:hunter2@db/app",
            "plain",
            "tab\there",
            "ｐａｓｓ",
            "",
        ] {
            let normalised = normalise(value);
            assert_eq!(percent_decode(&normalised), normalised);
        }
        assert!(value_looks_secret(
            "postgres%3A%2F%2Fapp%3Ahunter2%40db%2Fapp"
        ));
    }
}
