//! `WWW-Authenticate` challenges (RFC 7235 §4.1) as registries send them:
//! `Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull"`.

use std::collections::BTreeMap;

/// One challenge: a scheme and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme: `basic`, `bearer`...
    pub scheme: String,
    /// Parameters, keys lowercased, values unquoted.
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// A parameter by (lowercase) name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parse every challenge in a `WWW-Authenticate` header value. Several challenges may share one
/// header (`Basic realm="x", Bearer realm="y"`); parameters are `key=token` or
/// `key="quoted \"string\""`. Malformed parts are skipped rather than failing the whole header,
/// as clients of real registries must.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let s = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t') {
            *i += 1;
        }
    };
    while i < s.len() {
        skip_ws(&mut i);
        if i < s.len() && s[i] == b',' {
            i += 1;
            continue;
        }
        let start = i;
        while i < s.len() && !matches!(s[i], b' ' | b'\t' | b',' | b'=') {
            i += 1;
        }
        let token = &header[start..i];
        if token.is_empty() {
            // A stray `=` or similar: skip one byte to make progress.
            i += 1;
            continue;
        }
        let mut j = i;
        skip_ws(&mut j);
        if j < s.len() && s[j] == b'=' {
            // An auth-param of the current challenge (or a token68 tail like `abc==`).
            j += 1;
            skip_ws(&mut j);
            let value = if j < s.len() && s[j] == b'"' {
                j += 1;
                let mut v = String::new();
                while j < s.len() && s[j] != b'"' {
                    if s[j] == b'\\' && j + 1 < s.len() {
                        j += 1;
                    }
                    // Push whole UTF-8 characters, not bytes.
                    let ch = header[j..].chars().next().unwrap_or('\u{fffd}');
                    v.push(ch);
                    j += ch.len_utf8();
                }
                j += 1; // closing quote (or past the end)
                v
            } else {
                let vs = j;
                while j < s.len() && !matches!(s[j], b',' | b' ' | b'\t') {
                    j += 1;
                }
                header[vs..j].to_string()
            };
            i = j;
            if let Some(current) = out.last_mut() {
                current.params.insert(token.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_of_docker_hub() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/debian:pull"));
    }

    #[test]
    fn scope_with_comma_inside_quotes_and_spaces_between_params() {
        let c = parse_challenges(
            r#"Bearer realm="http://127.0.0.1:1/token", service="svc" , scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
        assert_eq!(c[0].param("service"), Some("svc"));
    }

    #[test]
    fn basic_and_several_challenges_in_one_header() {
        let c = parse_challenges(
            r#"Basic realm="Registry Realm", Bearer realm="https://x/token",error="invalid_token""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry Realm"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("https://x/token"));
        assert_eq!(c[1].param("error"), Some("invalid_token"));
    }

    #[test]
    fn case_escapes_and_unquoted_values() {
        let c = parse_challenges(r#"BEARER Realm=https://x/t,Service="a \"q\" b""#);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://x/t"));
        assert_eq!(c[0].param("service"), Some(r#"a "q" b"#));
    }

    #[test]
    fn garbage_does_not_panic() {
        for h in [
            "",
            "=",
            "Bearer realm=\"unterminated",
            "Bearer ,,, =x",
            "é=\"ü\"",
            "Negotiate abc==",
        ] {
            let _ = parse_challenges(h);
        }
        assert!(parse_challenges("").is_empty());
        assert_eq!(parse_challenges("Basic")[0].scheme, "basic");
    }
}
