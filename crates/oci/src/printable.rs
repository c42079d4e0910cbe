//! Text from outside (a registry's error message, an image's labels, a layer's file names)
//! made safe to print on a terminal.

use std::borrow::Cow;

/// `text` with every control character (C0 such as ESC, BEL, CR and newline; DEL; C1 such as
/// CSI) escaped the way Rust writes it (`\u{1b}`, `\n`), so text a registry, an image or a
/// layer supplied can never move the cursor, retitle the window or hide what comes before it.
/// Everything else, non-ASCII letters included, stays as it is.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escapes_control_characters_only() {
        assert_eq!(printable("plain ünïcode"), "plain ünïcode");
        assert_eq!(
            printable("a\u{1b}]0;pwned\u{7}b\r\n\u{9b}2J\u{7f}"),
            "a\\u{1b}]0;pwned\\u{7}b\\r\\n\\u{9b}2J\\u{7f}"
        );
        // Printing the result again changes nothing.
        let once = printable("x\u{1b}[31m").into_owned();
        assert_eq!(printable(&once), once);
    }
}
