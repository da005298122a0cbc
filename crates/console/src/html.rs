//! Server-rendered HTML: escaping, the page frame, RFC 3339 UTC times.

use std::fmt::Write as _;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `text` escaped for HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// `text` escaped for a URL query value (percent-encoding everything but unreserved bytes).
pub fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A time in RFC 3339, in UTC.
pub fn time(at: OffsetDateTime) -> String {
    at.checked_to_offset(time::UtcOffset::UTC)
        .unwrap_or(at)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "-".to_owned())
}

/// An optional time, `-` when absent.
pub fn maybe_time(at: Option<OffsetDateTime>) -> String {
    at.map_or_else(|| "-".to_owned(), time)
}

/// Seconds as a short human duration (`3d 4h`, `5m 2s`).
pub fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, 0, sec) => format!("{sec}s"),
        (0, 0, m, sec) => format!("{m}m {sec}s"),
        (0, h, m, _) => format!("{h}h {m}m"),
        (d, h, _, _) => format!("{d}d {h}h"),
    }
}

/// The navigation entries: path and title.
const NAV: &[(&str, &str)] = &[
    ("/", "Overview"),
    ("/dead-letters", "Dead letters"),
    ("/orphans", "Orphan review"),
    ("/rater-runs", "Rater runs"),
    ("/audit", "Audit trail"),
];

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}\
header{background:#1b2a3a;color:#fff;padding:.6rem 1rem;display:flex;gap:1.2rem;align-items:center;flex-wrap:wrap}\
header a{color:#dfe8f2;text-decoration:none}header a.here{color:#fff;font-weight:600;text-decoration:underline}\
header strong{margin-right:1rem}header form{margin-left:auto}\
main{padding:1rem 1.5rem;max-width:90rem}\
table{border-collapse:collapse;background:#fff;margin:.5rem 0 1.5rem;font-size:.9rem}\
th,td{border:1px solid #d5dae0;padding:.3rem .5rem;text-align:left;vertical-align:top}\
th{background:#eef1f4}code{font-size:.85rem}\
.flash{background:#e6f4ea;border:1px solid #9ccfa8;padding:.5rem 1rem}\
.error{background:#fdecea;border:1px solid #e5a39c;padding:.5rem 1rem}\
.muted{color:#5c6670}.page{color:#b3261e;font-weight:600}\
form.inline{display:inline}fieldset{border:1px solid #d5dae0;background:#fff;margin:.5rem 0}\
input,select,button{font:inherit}";

/// A whole page: the frame (with navigation and the sign-out form when `csrf` is given) around
/// `body`.
pub fn page(title: &str, current: &str, csrf: Option<&str>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Keel console</title><style>{STYLE}</style></head><body><header><strong>Keel console</strong>",
        escape(title)
    );
    if let Some(csrf) = csrf {
        for (path, name) in NAV {
            let class = if *path == current {
                " class=\"here\""
            } else {
                ""
            };
            let _ = write!(out, "<a href=\"{path}\"{class}>{name}</a>");
        }
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/sign-out\">{}<button type=\"submit\">Sign out</button></form>",
            csrf_field(csrf)
        );
    }
    let _ = write!(
        out,
        "</header><main><h1>{}</h1>{body}</main></body></html>",
        escape(title)
    );
    out
}

/// The hidden CSRF field every form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(csrf)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_and_quotes_are_escaped() {
        for (input, expected) in [
            ("<script>", "&lt;script&gt;"),
            ("a\"b'c", "a&quot;b&#39;c"),
            ("x & y", "x &amp; y"),
            ("plain", "plain"),
        ] {
            assert_eq!(escape(input), expected, "{input}");
        }
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_value("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(query_value("operator:key-1"), "operator%3Akey-1");
    }

    #[test]
    fn ages_read_in_the_largest_units() {
        for (seconds, expected) in [
            (5.0, "5s"),
            (65.0, "1m 5s"),
            (3700.0, "1h 1m"),
            (90_000.0, "1d 1h"),
            (-3.0, "0s"),
        ] {
            assert_eq!(age(seconds), expected, "{seconds}");
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let at = time::macros::datetime!(2026-01-02 03:04:05 +02:00);
        assert_eq!(time(at), "2026-01-02T01:04:05Z");
    }
}
