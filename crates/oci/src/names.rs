//! File names that are not UTF-8, carried through strata's `String` paths.
//!
//! A Linux file name is bytes, and Docker copies any of them. strata keeps paths as `String`s
//! in many places: the build's walk of a context, `.dockerignore` matching, cache keys, the
//! staging of a layer, and the paths `strata dev` syncs into machines. A name that is not
//! UTF-8 is carried in such a string with each byte that is not part of valid UTF-8 written as one
//! character of a reserved range: U+10FF80 + (byte − 0x80), the last 128 code points of plane
//! 16's private use area. A name that holds one of those characters itself has its UTF-8
//! bytes written the same way, so every byte string has exactly one form and comes back
//! unchanged ([`decode`]). Every other name (all of them, in practice) is its own form.
//!
//! Written here, not taken from a crate: the well-kept crates for this (`os_str_bytes`,
//! `bstr`) give lossy or unchecked conversions, not a reversible one into a plain `String`.

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// First code point of the reserved range; byte `b` (≥ 0x80) is `BASE + (b - 0x80)`.
const BASE: u32 = 0x10_FF80;

/// The UTF-8 lead byte of every reserved character (U+10xxxx starts with 0xF4).
const LEAD: u8 = 0xF4;

fn reserved(c: char) -> bool {
    (BASE..=BASE + 0x7F).contains(&(c as u32))
}

fn push_byte(out: &mut String, b: u8) {
    debug_assert!(b >= 0x80, "ASCII is always valid UTF-8");
    out.push(char::from_u32(BASE + u32::from(b - 0x80)).expect("a plane 16 code point"));
}

/// The string form of a file name (or a path: `/` is ASCII and stays as it is).
pub fn encode(name: OsString) -> String {
    match name.into_string() {
        Ok(s) if !s.as_bytes().contains(&LEAD) || !s.chars().any(reserved) => s,
        Ok(s) => encode_bytes(s.as_bytes()),
        Err(name) => encode_bytes(&name.into_vec()),
    }
}

/// [`encode`] of a borrowed name.
pub fn encode_os(name: &OsStr) -> Cow<'_, str> {
    match name.to_str() {
        Some(s) if !s.as_bytes().contains(&LEAD) || !s.chars().any(reserved) => Cow::Borrowed(s),
        _ => Cow::Owned(encode_bytes(name.as_bytes())),
    }
}

fn encode_bytes(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    while !bytes.is_empty() {
        let (valid, rest) = match std::str::from_utf8(bytes) {
            Ok(s) => (s, &[][..]),
            Err(e) => {
                let (v, r) = bytes.split_at(e.valid_up_to());
                // The first `valid_up_to` bytes are valid UTF-8: this never falls back.
                (std::str::from_utf8(v).unwrap_or_default(), r)
            }
        };
        for c in valid.chars() {
            if reserved(c) {
                let mut buf = [0u8; 4];
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    push_byte(&mut out, b);
                }
            } else {
                out.push(c);
            }
        }
        if rest.is_empty() {
            break;
        }
        // One byte that does not start valid UTF-8 here (error_len is at least 1).
        let bad = std::str::from_utf8(rest)
            .err()
            .and_then(|e| e.error_len())
            .unwrap_or(rest.len());
        for &b in &rest[..bad] {
            push_byte(&mut out, b);
        }
        bytes = &rest[bad..];
    }
    out
}

/// The name (or path) a string form stands for.
pub fn decode(s: &str) -> Cow<'_, OsStr> {
    if !s.as_bytes().contains(&LEAD) || !s.chars().any(reserved) {
        return Cow::Borrowed(OsStr::new(s));
    }
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        if reserved(c) {
            out.push((c as u32 - BASE) as u8 + 0x80);
        } else {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    Cow::Owned(OsString::from_vec(out))
}

/// A string form as a person reads it: bytes that are not UTF-8 shown as `\xNN`.
pub fn display(s: &str) -> Cow<'_, str> {
    match decode(s) {
        Cow::Borrowed(_) => Cow::Borrowed(s),
        Cow::Owned(raw) => Cow::Owned(
            raw.as_bytes()
                .utf8_chunks()
                .map(|c| {
                    let mut out = c.valid().to_string();
                    for b in c.invalid() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                    out
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(bytes: &[u8]) -> String {
        let s = encode(OsString::from_vec(bytes.to_vec()));
        assert_eq!(encode_os(OsStr::from_bytes(bytes)), s, "{bytes:x?}");
        assert_eq!(decode(&s).as_bytes(), bytes, "{bytes:x?} → {s:?}");
        s
    }

    #[test]
    fn utf8_names_are_their_own_form() {
        for name in [
            "",
            "a.txt",
            "dir/sub/é ü.go",
            "日本語",
            "\u{10FF7F}",
            "\u{F4}",
        ] {
            let s = round_trip(name.as_bytes());
            assert_eq!(s, name);
            assert!(matches!(decode(&s), Cow::Borrowed(_)));
            assert!(matches!(display(&s), Cow::Borrowed(_)));
        }
    }

    #[test]
    fn every_byte_string_comes_back_and_forms_differ() {
        let mut seen = std::collections::HashMap::new();
        let mut cases: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b'a', b, b'z']).collect();
        cases.push(b"bad\xffname".to_vec());
        cases.push(b"\xc3".to_vec()); // a truncated two-byte sequence
        cases.push(b"\xe6\x97".to_vec()); // a truncated three-byte one
        cases.push(b"\xed\xa0\x80".to_vec()); // an encoded surrogate
        cases.push("x\u{10FF80}y\u{10FFFF}".as_bytes().to_vec()); // reserved, as UTF-8
        cases.push(b"\xf4\x8f\xbe\x80".to_vec()); // the same bytes, written out
        cases.push(b"dir\xfe/in\x80ner/\xff".to_vec());
        for c in &cases {
            let s = round_trip(c);
            if let Some(other) = seen.insert(s.clone(), c.clone()) {
                assert_eq!(&other, c, "two names, one form {s:?}");
            }
        }
    }

    #[test]
    fn bad_bytes_become_reserved_characters_and_show_as_escapes() {
        let s = round_trip(b"bad\xffname/\x80");
        assert_eq!(s, "bad\u{10FFFF}name/\u{10FF80}");
        assert_eq!(display(&s), "bad\\xffname/\\x80");
        // A real reserved character is written as its bytes: shown as they are (valid UTF-8).
        let r = round_trip("x\u{10FF80}".as_bytes());
        assert_ne!(r, "x\u{10FF80}");
        assert_eq!(display(&r), "x\u{10FF80}");
    }
}
