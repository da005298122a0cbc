//! Text from the database shown on a terminal.

use std::borrow::Cow;

/// `text` with every control character shown as its escape (`\n`, `\u{1b}`): a value another
/// writer stored (a label, a reason, an error) can then neither break a line of a listing and
/// pose as another line, nor send escape sequences to the operator's terminal. Text without one
/// is returned as it is.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

#[cfg(test)]
mod tests {
    use super::printable;

    /// Control characters are escaped, everything else (quotes, backslashes, non-ASCII
    /// letters) is shown as it is, and clean text is not copied.
    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        assert_eq!(
            printable("evil\u{1b}[31m\nFAKE\r\t"),
            "evil\\u{1b}[31m\\nFAKE\\r\\t"
        );
        assert_eq!(printable("café \"x\" \\ 'y'"), "café \"x\" \\ 'y'");
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(printable("a\u{7f}b\u{85}c"), "a\\u{7f}b\\u{85}c");
    }
}
