//! What to store from a request body: the capture step in front of `io_log`.
//!
//! Pure: no I/O, no allocation beyond the stored body, and the forwarded request is never
//! touched — [`capture`] borrows the body and returns a new `String`.

/// What [`capture`] keeps of a request body for storage. Only [`capture`] makes one, so a
/// stored body is always sanitized (RATER-M7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    body: String,
    original_len: usize,
    truncated: bool,
}

impl Captured {
    /// The body to store: valid UTF-8 without NUL characters, at most the cap in bytes.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The byte length of the body as received, before any sanitizing or cutting.
    pub fn original_len(&self) -> usize {
        self.original_len
    }

    /// Whether [`body`](Self::body) is a cut of the sanitized body, i.e. the sanitized body was
    /// longer than the cap. Sanitizing alone (replacing invalid UTF-8, dropping NULs) is not
    /// truncation.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

/// Longest request id stored, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 256;

/// A caller-supplied request id made storable: invalid UTF-8 and NULs handled as for the body,
/// and cut to [`MAX_REQUEST_ID_LEN`] bytes on a character boundary. Never panics.
pub fn sanitize_request_id(request_id: &str) -> String {
    sanitize_and_cut(request_id.as_bytes(), MAX_REQUEST_ID_LEN).0
}

/// Captures a request body for storage, keeping at most `cap` bytes.
///
/// The body is sanitized the way Postgres `text` needs it, then cut:
///
/// 1. invalid UTF-8 sequences become U+FFFD, exactly as [`String::from_utf8_lossy`] does (so an
///    invalid byte can grow to three bytes);
/// 2. NUL characters are removed, since Postgres `text` cannot hold `\0`;
/// 3. the result is cut at the last character boundary at or below `cap` bytes, so a
///    multi-byte character is kept whole or not at all.
///
/// [`Captured::truncated`] is true if and only if step 3 dropped something. Removing NULs or
/// replacing invalid bytes is not truncation: nothing the caller would read is cut off, and
/// [`Captured::original_len`] still records the received size. Because replacement can grow the
/// text, a body whose original length is within the cap can still be truncated.
///
/// When — and only when — it truncates, it logs one `WARN` with the fields `request_id`,
/// `original_len` and `cap`, so a cut body is never silent. It never panics, whatever the body
/// or cap (including a cap of 0).
///
/// # Example
///
/// ```
/// use keel_rater::capture;
///
/// // "é" is two bytes: a cap of 4 cannot split it, so the cut falls before it.
/// let captured = capture("req-1", "abcé\0".as_bytes(), 4);
/// assert_eq!(
///     (captured.body(), captured.original_len(), captured.truncated()),
///     ("abc", 6, true)
/// );
///
/// // Only a NUL was dropped: not truncated.
/// let captured = capture("req-2", b"ok\0", 2);
/// assert_eq!(captured.body(), "ok");
/// assert!(!captured.truncated());
/// ```
pub fn capture(request_id: &str, body: &[u8], cap: usize) -> Captured {
    let original_len = body.len();
    let (stored, truncated) = sanitize_and_cut(body, cap);
    if truncated {
        tracing::warn!(
            request_id,
            original_len,
            cap,
            "request body truncated for capture: {original_len} → {cap} bytes"
        );
    }
    Captured {
        body: stored,
        original_len,
        truncated,
    }
}

/// The longest prefix (at most `cap` bytes) of the sanitized body, and whether it is shorter
/// than the sanitized body. Stops reading as soon as the cap is reached, so a huge body costs no
/// more than the cap.
fn sanitize_and_cut(body: &[u8], cap: usize) -> (String, bool) {
    let mut out = String::with_capacity(body.len().min(cap));
    // Each chunk is a run of valid UTF-8 followed by an invalid sequence (possibly empty);
    // `from_utf8_lossy` replaces each non-empty invalid sequence with one U+FFFD.
    for chunk in body.utf8_chunks() {
        for piece in chunk.valid().split('\0') {
            if !push_within(&mut out, piece, cap) {
                return (out, true);
            }
        }
        if !chunk.invalid().is_empty()
            && !push_within(
                &mut out,
                char::REPLACEMENT_CHARACTER.encode_utf8(&mut [0; 4]),
                cap,
            )
        {
            return (out, true);
        }
    }
    (out, false)
}

/// Appends `piece` if it fits within `cap` bytes; otherwise appends its longest prefix that ends
/// on a character boundary and fits, and returns false (the text was cut).
fn push_within(out: &mut String, piece: &str, cap: usize) -> bool {
    // `out.len() <= cap` always holds, so this cannot underflow.
    let room = cap.saturating_sub(out.len());
    if piece.len() <= room {
        out.push_str(piece);
        return true;
    }
    // `room < piece.len()` here, and 0 is always a boundary, so this ends in range.
    let mut end = room;
    while !piece.is_char_boundary(end) {
        end -= 1;
    }
    out.push_str(piece.get(..end).unwrap_or_default());
    false
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Captures `body` with `cap` and checks the stored body, the truncation flag, and the
    /// invariants every capture must hold.
    #[track_caller]
    fn check(body: &[u8], cap: usize, expected_body: &str, expected_truncated: bool) {
        let captured = capture("req-test", body, cap);
        assert_eq!(
            captured,
            Captured {
                body: expected_body.to_owned(),
                original_len: body.len(),
                truncated: expected_truncated,
            },
            "body {body:?}, cap {cap}"
        );
        assert!(captured.body.len() <= cap, "stored body exceeds the cap");
        assert!(!captured.body.contains('\0'), "stored body holds a NUL");
        let sanitized = String::from_utf8_lossy(body).replace('\0', "");
        assert!(
            sanitized.starts_with(&captured.body),
            "stored body is not a prefix of the sanitized body"
        );
        assert_eq!(captured.truncated, captured.body.len() < sanitized.len());
    }

    #[test]
    fn a_body_at_or_under_the_cap_is_kept_whole_and_one_over_is_cut() {
        check(b"hello", 5, "hello", false);
        check(b"hello", 6, "hello", false);
        check(b"hello", 4, "hell", true);
        check(b"", 0, "", false);
        check(b"", 10, "", false);
    }

    #[test]
    fn a_cap_of_zero_stores_nothing_and_truncates_any_text() {
        check(b"x", 0, "", true);
        check("€".as_bytes(), 0, "", true);
        check(b"\0\0", 0, "", false);
        check(&[0xff], 0, "", true);
    }

    #[test]
    fn a_multi_byte_character_is_never_split() {
        // 2 bytes: é
        check("aé".as_bytes(), 1, "a", true);
        check("aé".as_bytes(), 2, "a", true);
        check("aé".as_bytes(), 3, "aé", false);
        // 3 bytes: €
        check("€€".as_bytes(), 2, "", true);
        check("€€".as_bytes(), 4, "€", true);
        check("€€".as_bytes(), 5, "€", true);
        check("€€".as_bytes(), 6, "€€", false);
        // 4 bytes: 🦀, with the cap landing on each of its inner bytes
        check("a🦀".as_bytes(), 2, "a", true);
        check("a🦀".as_bytes(), 3, "a", true);
        check("a🦀".as_bytes(), 4, "a", true);
        check("a🦀".as_bytes(), 5, "a🦀", false);
        // Only multi-byte characters.
        check("🦀🦀🦀".as_bytes(), 11, "🦀🦀", true);
        check("ééé".as_bytes(), 5, "éé", true);
    }

    #[test]
    fn nuls_are_dropped_and_dropping_them_is_not_truncation() {
        // NULs before the cut do not use up the cap.
        check(b"\0\0abc", 3, "abc", false);
        check(b"\0\0abcd", 3, "abc", true);
        // NULs after the cut.
        check(b"abc\0\0", 3, "abc", false);
        check(b"abcd\0", 3, "abc", true);
        // NULs straddling the cut.
        check(b"ab\0\0c", 3, "abc", false);
        check(b"ab\0c\0d", 3, "abc", true);
        check(b"a\0b\0c\0d\0", 2, "ab", true);
        // Only NULs.
        check(&[0; 64], 0, "", false);
        check(&[0; 64], 8, "", false);
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters_as_from_utf8_lossy_does() {
        check(b"a\xffb", 10, "a\u{fffd}b", false);
        // A truncated 3-byte sequence is one replacement, not two.
        check(b"a\xe2\x82b", 10, "a\u{fffd}b", false);
        // An invalid byte grows to three: a body within the cap can still be cut.
        check(b"a\xff", 2, "a", true);
        check(b"\xff\xff\xff", 3, "\u{fffd}", true);
        check(b"\xff\xff\xff", 9, "\u{fffd}\u{fffd}\u{fffd}", false);
        // Invalid bytes and NULs together.
        check(b"\0\xff\0x", 4, "\u{fffd}x", false);
        // A 4-byte sequence cut short by the end of the body.
        check(b"ok\xf0\x9f\xa6", 5, "ok\u{fffd}", false);
    }

    /// A cloneable in-memory writer for the fmt subscriber.
    #[derive(Clone, Default)]
    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("log buffer poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Runs a capture under a subscriber that records every level and returns its output lines.
    fn logged_lines(request_id: &str, body: &[u8], cap: usize) -> Vec<String> {
        let buffer = SharedBuffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || capture(request_id, body, cap));
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn truncation_logs_exactly_one_warning_and_nothing_else_logs_at_all() {
        let lines = logged_lines("req-cut-7", &[b'x'; 1000], 300);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        let line = &lines[0];
        assert!(
            line.starts_with("WARN") || line.contains(" WARN "),
            "{line}"
        );
        assert!(line.contains("req-cut-7"), "{line}");
        assert!(line.contains("original_len=1000"), "{line}");
        assert!(line.contains("cap=300"), "{line}");

        for (body, cap) in [
            (&b"short"[..], 300),
            (&b"exact"[..], 5),
            (&b"nul\0s only\0"[..], 9),
            (&b""[..], 0),
        ] {
            let lines = logged_lines("req-whole", body, cap);
            assert!(lines.is_empty(), "{body:?} cap {cap}: {lines:#?}");
        }
    }
}
