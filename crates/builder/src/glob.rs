//! `COPY` source patterns with Go's `filepath.Match` semantics (what Docker uses): `*` any run
//! of non-`/` characters, `?` one, `[a-z]`/`[^a-z]` classes, `\` escapes. Matching is per path
//! component, like `filepath.Glob`.

/// Whether `pattern` holds a glob metacharacter (`filepath.Glob`'s `hasMeta`).
pub fn has_meta(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '\\'])
}

/// Go's `filepath.Match(pattern, name)` for one path component. `Err` for a malformed pattern.
pub fn matches(pattern: &str, name: &str) -> Result<bool, String> {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let ok = match_from(&p, &n)?;
    // Go reports a bad pattern even when the name decided the answer early.
    check_pattern(&p)?;
    Ok(ok)
}

fn check_pattern(p: &[char]) -> Result<(), String> {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => {
                if i + 1 >= p.len() {
                    return Err("trailing `\\` in pattern".into());
                }
                i += 2;
            }
            '[' => {
                let (_, next) = class(p, i, None)?;
                i = next;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn match_from(p: &[char], n: &[char]) -> Result<bool, String> {
    let (mut pi, mut ni) = (0, 0);
    // Backtracking point for the last `*`: (pattern index after it, name index it covers to).
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    while pi < p.len() && p[pi] == '*' {
                        pi += 1;
                    }
                    star = Some((pi, ni));
                    continue;
                }
                '?' if ni < n.len() && n[ni] != '/' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' if ni < n.len() => {
                    let (hit, next) = class(p, pi, Some(n[ni]))?;
                    if hit {
                        pi = next;
                        ni += 1;
                        continue;
                    }
                }
                '\\' if ni < n.len() => {
                    let c = *p.get(pi + 1).ok_or("trailing `\\` in pattern")?;
                    if c == n[ni] {
                        pi += 2;
                        ni += 1;
                        continue;
                    }
                }
                c if c != '?' && c != '[' && c != '\\' && ni < n.len() && c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        } else if ni == n.len() {
            return Ok(true);
        }
        // Mismatch: let the last `*` swallow one more character (never a `/`).
        match star {
            Some((sp, sn)) if sn < n.len() && n[sn] != '/' => {
                star = Some((sp, sn + 1));
                pi = sp;
                ni = sn + 1;
            }
            _ => return Ok(false),
        }
    }
}

/// Parses the class starting at `p[start] == '['`; returns whether `c` is in it (false when
/// `c` is `None`) and the index after `]`.
fn class(p: &[char], start: usize, c: Option<char>) -> Result<(bool, usize), String> {
    let mut i = start + 1;
    let negated = matches!(p.get(i), Some('^'));
    if negated {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let Some(&ch) = p.get(i) else {
            return Err("unterminated `[` in pattern".into());
        };
        if ch == ']' && !first {
            i += 1;
            break;
        }
        first = false;
        let (lo, next) = class_char(p, i)?;
        i = next;
        let mut hi = lo;
        if p.get(i) == Some(&'-') {
            let (h, next) = class_char(p, i + 1)?;
            hi = h;
            i = next;
        }
        if let Some(c) = c
            && lo <= c
            && c <= hi
        {
            hit = true;
        }
    }
    Ok((c.is_some() && hit != negated, i))
}

fn class_char(p: &[char], i: usize) -> Result<(char, usize), String> {
    match p.get(i) {
        None | Some('-') | Some(']') => Err("bad character range in pattern".into()),
        Some('\\') => p
            .get(i + 1)
            .map(|&c| (c, i + 2))
            .ok_or_else(|| "trailing `\\` in pattern".into()),
        Some(&c) => Ok((c, i + 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases from Go's `path/filepath` match_test.go.
    #[test]
    fn go_match_table() {
        let table: &[(&str, &str, Result<bool, ()>)] = &[
            ("abc", "abc", Ok(true)),
            ("*", "abc", Ok(true)),
            ("*c", "abc", Ok(true)),
            ("a*", "a", Ok(true)),
            ("a*", "abc", Ok(true)),
            ("a*", "ab/c", Ok(false)),
            ("a*/b", "abc/b", Ok(true)),
            ("a*/b", "a/c/b", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Ok(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Ok(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Ok(false)),
            ("ab[c]", "abc", Ok(true)),
            ("ab[b-d]", "abc", Ok(true)),
            ("ab[e-g]", "abc", Ok(false)),
            ("ab[^c]", "abc", Ok(false)),
            ("ab[^b-d]", "abc", Ok(false)),
            ("ab[^e-g]", "abc", Ok(true)),
            ("a\\*b", "a*b", Ok(true)),
            ("a\\*b", "ab", Ok(false)),
            ("a?b", "a☺b", Ok(true)),
            ("a[^a]b", "a☺b", Ok(true)),
            ("a???b", "a☺b", Ok(false)),
            ("[a-ζ]*", "α", Ok(true)),
            ("*[a-ζ]", "A", Ok(false)),
            ("a?b", "a/b", Ok(false)),
            ("a*b", "a/b", Ok(false)),
            ("[\\]a]", "]", Ok(true)),
            ("[\\-]", "-", Ok(true)),
            ("[x\\-]", "x", Ok(true)),
            ("[x\\-]", "-", Ok(true)),
            ("[x\\-]", "z", Ok(false)),
            ("[]a]", "]", Err(())),
            ("[-]", "-", Err(())),
            ("[x-]", "x", Err(())),
            ("[a-b-c]", "a", Err(())),
            ("[", "a", Err(())),
            ("[^", "a", Err(())),
            ("a[", "x", Err(())),
            ("\\", "a", Err(())),
            ("*x", "xxx", Ok(true)),
        ];
        for (pattern, name, want) in table {
            let got = matches(pattern, name).map_err(|_| ());
            assert_eq!(&got, want, "Match({pattern:?}, {name:?})");
        }
    }
}
