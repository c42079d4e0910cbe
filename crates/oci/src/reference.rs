//! Image references (`host[:port]/path:tag@digest`) following the grammar of Docker's
//! `distribution/reference` package, with Docker Hub normalization, plus the name and tag
//! validators a registry server needs.
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [domain '/'] path
//! domain           := host [':' port]
//! host             := domain-name | IPv4 | '[' IPv6 ']'
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! path             := path-component ['/' path-component]*
//! path-component   := [a-z0-9]+ (separator [a-z0-9]+)*
//! separator        := [_.] | '__' | '-'+
//! tag              := [\w][\w.-]{0,127}
//! ```

use std::fmt;
use std::str::FromStr;

use crate::{Digest, Error};

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";
/// The name Docker Hub also answers to; normalized to [`DOCKER_HUB`].
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
/// The namespace of Docker Hub's official images (`debian` is `library/debian`).
const OFFICIAL_NAMESPACE: &str = "library/";
/// The tag a reference without tag and digest gets.
pub const DEFAULT_TAG: &str = "latest";
/// Longest name (domain and path, as written) the reference grammar allows.
pub const NAME_MAX_LEN: usize = 255;
/// Longest tag.
pub const TAG_MAX_LEN: usize = 128;

/// A parsed image reference: registry, repository, tag and/or digest.
///
/// [`Reference::parse`] applies Docker Hub defaults, so the registry is always set;
/// [`Reference::parse_local`] keeps a name without registry as it is (strata's local store names
/// images the way `docker images` shows them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: Option<String>,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parse a reference to pull or push: `debian` is `docker.io/library/debian:latest`,
    /// `foo/bar` is `docker.io/foo/bar:latest`, `localhost:5000/x@sha256:…` keeps its registry.
    /// The tag defaults to `latest` only when there is neither tag nor digest.
    pub fn parse(input: &str) -> Result<Reference, Error> {
        let raw = RawReference::parse(input)?;
        if raw.domain.is_none()
            && raw.tag.is_none()
            && raw.digest.is_none()
            && raw.path.len() == 64
            && raw.path.bytes().all(|b| b.is_ascii_hexdigit())
        {
            // Docker refuses these so that an image ID is never mistaken for a name.
            return Err(bad(
                input,
                "a 64-character hexadecimal string is an image ID, not a repository name",
            ));
        }
        let registry = match raw.domain {
            None => DOCKER_HUB.to_string(),
            Some(d) if d == DOCKER_HUB_LEGACY => DOCKER_HUB.to_string(),
            Some(d) => d.to_string(),
        };
        let repository = if registry == DOCKER_HUB && !raw.path.contains('/') {
            format!("{OFFICIAL_NAMESPACE}{}", raw.path)
        } else {
            raw.path.to_string()
        };
        let r = Reference::assemble(Some(registry), repository, raw.tag, raw.digest);
        // Like Docker's ParseNormalizedNamed, the limit also holds for the normalized name, so
        // that the full form always parses again.
        let full = r.name().len();
        if full > NAME_MAX_LEN {
            return Err(bad(
                input,
                &format!(
                    "the name with its registry (`{}`) is {full} characters long, the limit is {NAME_MAX_LEN}",
                    r.name()
                ),
            ));
        }
        Ok(r)
    }

    /// Parse a name for the local store, where no registry is implied: `myapp:1` is repository
    /// `myapp`, tag `1`, no registry. A name with a registry keeps it (`ghcr.io/a/b`), except
    /// Docker Hub, which is shortened the way Docker shows it (`docker.io/library/debian` is
    /// `debian`), so `parse_local(r.familiar())` names the same image as `r`.
    pub fn parse_local(input: &str) -> Result<Reference, Error> {
        let raw = RawReference::parse(input)?;
        let (registry, repository) = match raw.domain {
            Some(d) if d == DOCKER_HUB || d == DOCKER_HUB_LEGACY => (None, familiar_path(raw.path)),
            Some(d) => (Some(d.to_string()), raw.path),
            None => (None, raw.path),
        };
        Ok(Reference::assemble(
            registry,
            repository.to_string(),
            raw.tag,
            raw.digest,
        ))
    }

    fn assemble(
        registry: Option<String>,
        repository: String,
        tag: Option<&str>,
        digest: Option<Digest>,
    ) -> Reference {
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Reference {
            registry,
            repository,
            tag,
            digest,
        }
    }

    /// The registry host (with port), e.g. `docker.io` or `localhost:5000`; `None` only for a
    /// local name without registry (from [`Reference::parse_local`]).
    pub fn registry(&self) -> Option<&str> {
        self.registry.as_deref()
    }

    /// The repository path inside the registry, e.g. `library/debian`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag; `None` only when the reference was given by digest alone.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Whether this is a local name without registry.
    pub fn is_local(&self) -> bool {
        self.registry.is_none()
    }

    /// Registry and repository without tag or digest, e.g. `docker.io/library/debian`.
    pub fn name(&self) -> String {
        match &self.registry {
            Some(r) => format!("{r}/{}", self.repository),
            None => self.repository.clone(),
        }
    }

    /// The short form Docker prints: `debian:latest`, `foo/bar:1`, `ghcr.io/a/b:2`.
    pub fn familiar(&self) -> String {
        let name = match self.registry.as_deref() {
            None => self.repository.clone(),
            Some(DOCKER_HUB) => familiar_path(&self.repository).to_string(),
            Some(r) => format!("{r}/{}", self.repository),
        };
        self.with_suffix(name)
    }

    /// The same image with another tag (the digest, if any, is kept).
    pub fn with_tag(&self, tag: &str) -> Result<Reference, Error> {
        validate_tag(tag)?;
        Ok(Reference {
            tag: Some(tag.to_string()),
            ..self.clone()
        })
    }

    /// The same name pinned to `digest`.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same name without the digest; a reference by digest alone gets tag `latest`.
    pub fn without_digest(&self) -> Reference {
        Reference {
            digest: None,
            tag: Some(self.tag.clone().unwrap_or_else(|| DEFAULT_TAG.to_string())),
            ..self.clone()
        }
    }

    /// The reference to pull for a local name: a name without registry gets Docker Hub's
    /// defaults (`myapp` becomes `docker.io/library/myapp`); others are returned unchanged.
    pub fn to_remote(&self) -> Reference {
        match self.registry {
            Some(_) => self.clone(),
            None => Reference {
                registry: Some(DOCKER_HUB.to_string()),
                repository: if self.repository.contains('/') {
                    self.repository.clone()
                } else {
                    format!("{OFFICIAL_NAMESPACE}{}", self.repository)
                },
                ..self.clone()
            },
        }
    }

    fn with_suffix(&self, mut s: String) -> String {
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(&d.to_string());
        }
        s
    }
}

/// `library/debian` → `debian`; other paths unchanged.
fn familiar_path(path: &str) -> &str {
    match path.strip_prefix(OFFICIAL_NAMESPACE) {
        Some(rest) if !rest.contains('/') => rest,
        _ => path,
    }
}

impl fmt::Display for Reference {
    /// The full form: `docker.io/library/debian:latest`, or the name as given for a local one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.with_suffix(self.name()))
    }
}

impl FromStr for Reference {
    type Err = Error;

    /// Same as [`Reference::parse`].
    fn from_str(s: &str) -> Result<Self, Error> {
        Reference::parse(s)
    }
}

/// A reference split and checked, before any normalization.
struct RawReference<'a> {
    domain: Option<&'a str>,
    path: &'a str,
    tag: Option<&'a str>,
    digest: Option<Digest>,
}

impl<'a> RawReference<'a> {
    fn parse(input: &'a str) -> Result<RawReference<'a>, Error> {
        if input.is_empty() {
            return Err(bad(input, "the name is empty"));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => {
                let digest = d
                    .parse::<Digest>()
                    .map_err(|e| bad(input, &format!("bad digest: {e}")))?;
                (n, Some(digest))
            }
            None => (input, None),
        };
        // A `:` after the last `/` starts the tag; one before it belongs to `host:port`.
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if name_tag[i..].find('/').is_none() => {
                (&name_tag[..i], Some(&name_tag[i + 1..]))
            }
            _ => (name_tag, None),
        };
        if let Some(t) = tag {
            tag_problem(t).map_err(|why| bad(input, &format!("tag `{t}` {why}")))?;
        }
        if name.is_empty() {
            return Err(bad(input, "the name is empty"));
        }
        if name.len() > NAME_MAX_LEN {
            return Err(bad(
                input,
                &format!(
                    "the name is {} characters long, the limit is {NAME_MAX_LEN}",
                    name.len()
                ),
            ));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest)) if looks_like_domain(first) => (Some(first), rest),
            _ => (None, name),
        };
        if let Some(d) = domain {
            domain_problem(d).map_err(|why| bad(input, &format!("registry `{d}` {why}")))?;
        }
        path_problem(path).map_err(|why| bad(input, &format!("repository `{path}` {why}")))?;
        Ok(RawReference {
            domain,
            path,
            tag,
            digest,
        })
    }
}

/// Docker's rule (`splitDockerDomain`): the first component names a registry when it has a `.`
/// or `:`, is `localhost`, or has uppercase letters (which a path component cannot have).
fn looks_like_domain(first: &str) -> bool {
    first.contains(['.', ':'])
        || first == "localhost"
        || first.bytes().any(|b| b.is_ascii_uppercase())
}

fn bad(input: &str, reason: &str) -> Error {
    Error::InvalidReference {
        reference: input.to_string(),
        reason: reason.to_string(),
    }
}

/// Check a repository name as a registry sees it (`library/debian`, no registry host):
/// lowercase path components joined by `/`, at most 255 characters.
pub fn validate_repository_name(name: &str) -> Result<(), Error> {
    let problem = if name.len() > NAME_MAX_LEN {
        Err(format!(
            "is {} characters long, the limit is {NAME_MAX_LEN}",
            name.len()
        ))
    } else {
        path_problem(name)
    };
    problem.map_err(|reason| Error::InvalidRepositoryName {
        name: name.to_string(),
        reason,
    })
}

/// Check a tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), Error> {
    tag_problem(tag).map_err(|reason| Error::InvalidTag {
        tag: tag.to_string(),
        reason,
    })
}

fn tag_problem(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let Some(&first) = b.first() else {
        return Err("is empty".to_string());
    };
    if b.len() > TAG_MAX_LEN {
        return Err(format!(
            "is {} characters long, the limit is {TAG_MAX_LEN}",
            b.len()
        ));
    }
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if !word(first) {
        return Err("must start with a letter, digit or `_`".to_string());
    }
    if let Some(c) = tag
        .chars()
        .find(|&c| !(c.is_ascii() && (word(c as u8) || c == '.' || c == '-')))
    {
        return Err(format!(
            "contains `{c}`; only letters, digits, `_`, `.` and `-` are allowed"
        ));
    }
    Ok(())
}

fn path_problem(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty".to_string());
    }
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("must be lowercase".to_string());
    }
    for component in path.split('/') {
        component_problem(component).map_err(|why| {
            if component.is_empty() {
                why
            } else {
                format!("has component `{component}` that {why}")
            }
        })?;
    }
    Ok(())
}

/// `[a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*`
fn component_problem(c: &str) -> Result<(), String> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    if b.is_empty() {
        return Err("has an empty path component (`//` or a leading/trailing `/`)".to_string());
    }
    if let Some(ch) = c
        .chars()
        .find(|&ch| !(ch.is_ascii() && (alnum(ch as u8) || matches!(ch, '.' | '_' | '-'))))
    {
        return Err(format!("contains `{ch}`"));
    }
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err("must start and end with a lowercase letter or digit".to_string());
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|s| s == b'-');
        if !ok {
            return Err(format!(
                "has separator `{sep}`; allowed are `.`, `_`, `__` or dashes"
            ));
        }
    }
    Ok(())
}

/// `host[:port]`, host a DNS name, IPv4 address or `[IPv6]`.
fn domain_problem(domain: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| "has `[` without `]`".to_string())?;
        if v6.is_empty() || !v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(format!("has an invalid IPv6 address `{v6}`"));
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err("has text after `]` that is not `:port`".to_string()),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        for label in host.split('.') {
            let b = label.as_bytes();
            let ok = !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-');
            if !ok {
                return Err(format!("has an invalid host label `{label}`"));
            }
        }
    }
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("has an invalid port `{port}`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    fn sha(hex: &str) -> String {
        format!("sha256:{hex}")
    }

    /// (input, registry, repository, tag, digest) for valid inputs, following the table in
    /// distribution/reference's `reference_test.go` plus Docker Hub normalization.
    #[test]
    #[allow(clippy::type_complexity)]
    fn valid_references() {
        let d = sha(HEX);
        // 4 + 1 + 250 = 255 characters of name: exactly the limit.
        let long_path = format!("{}aa", "a/".repeat(124));
        let cases: Vec<(String, &str, &str, Option<&str>, Option<&str>)> = vec![
            (
                "test_com".into(),
                "docker.io",
                "library/test_com",
                Some("latest"),
                None,
            ),
            (
                "test.com:tag".into(),
                "docker.io",
                "library/test.com",
                Some("tag"),
                None,
            ),
            (
                "test.com:5000".into(),
                "docker.io",
                "library/test.com",
                Some("5000"),
                None,
            ),
            (
                "test.com/repo:tag".into(),
                "test.com",
                "repo",
                Some("tag"),
                None,
            ),
            (
                "test:5000/repo".into(),
                "test:5000",
                "repo",
                Some("latest"),
                None,
            ),
            (
                "test:5000/repo:tag".into(),
                "test:5000",
                "repo",
                Some("tag"),
                None,
            ),
            (
                format!("test:5000/repo@{d}"),
                "test:5000",
                "repo",
                None,
                Some(&d),
            ),
            (
                format!("test:5000/repo:tag@{d}"),
                "test:5000",
                "repo",
                Some("tag"),
                Some(&d),
            ),
            (
                "lowercase:Uppercase".into(),
                "docker.io",
                "library/lowercase",
                Some("Uppercase"),
                None,
            ),
            (
                format!("x.io/{long_path}:tag-puts-this-over-max"),
                "x.io",
                &long_path,
                Some("tag-puts-this-over-max"),
                None,
            ),
            (
                "sub-dom1.foo.com/bar/baz/quux".into(),
                "sub-dom1.foo.com",
                "bar/baz/quux",
                Some("latest"),
                None,
            ),
            (
                "sub-dom1.foo.com/bar/baz/quux:some-long-tag".into(),
                "sub-dom1.foo.com",
                "bar/baz/quux",
                Some("some-long-tag"),
                None,
            ),
            (
                "b.gcr.io/test.example.com/my-app:test.example.com".into(),
                "b.gcr.io",
                "test.example.com/my-app",
                Some("test.example.com"),
                None,
            ),
            (
                "xn--n3h.com/myimage:xn--n3h.com".into(),
                "xn--n3h.com",
                "myimage",
                Some("xn--n3h.com"),
                None,
            ),
            (
                "foo_bar.com:8080".into(),
                "docker.io",
                "library/foo_bar.com",
                Some("8080"),
                None,
            ),
            (
                "foo/foo_bar.com:8080".into(),
                "docker.io",
                "foo/foo_bar.com",
                Some("8080"),
                None,
            ),
            (
                "192.168.1.1".into(),
                "docker.io",
                "library/192.168.1.1",
                Some("latest"),
                None,
            ),
            (
                "192.168.1.1:tag".into(),
                "docker.io",
                "library/192.168.1.1",
                Some("tag"),
                None,
            ),
            (
                "192.168.1.1:5000".into(),
                "docker.io",
                "library/192.168.1.1",
                Some("5000"),
                None,
            ),
            (
                "192.168.1.1/repo".into(),
                "192.168.1.1",
                "repo",
                Some("latest"),
                None,
            ),
            (
                "192.168.1.1:5000/repo".into(),
                "192.168.1.1:5000",
                "repo",
                Some("latest"),
                None,
            ),
            (
                "[2001:db8::1]/repo".into(),
                "[2001:db8::1]",
                "repo",
                Some("latest"),
                None,
            ),
            (
                "[2001:db8:1:2:3:4:5:6]/repo:tag".into(),
                "[2001:db8:1:2:3:4:5:6]",
                "repo",
                Some("tag"),
                None,
            ),
            (
                "[2001:db8::1]:5000/repo".into(),
                "[2001:db8::1]:5000",
                "repo",
                Some("latest"),
                None,
            ),
            (
                format!("[2001:db8::1]:5000/repo:tag@{d}"),
                "[2001:db8::1]:5000",
                "repo",
                Some("tag"),
                Some(&d),
            ),
            (
                "[::1]:5000/repo".into(),
                "[::1]:5000",
                "repo",
                Some("latest"),
                None,
            ),
            (
                "debian".into(),
                "docker.io",
                "library/debian",
                Some("latest"),
                None,
            ),
            (
                "foo/bar".into(),
                "docker.io",
                "foo/bar",
                Some("latest"),
                None,
            ),
            (
                "docker.io/debian:12".into(),
                "docker.io",
                "library/debian",
                Some("12"),
                None,
            ),
            (
                "index.docker.io/library/debian".into(),
                "docker.io",
                "library/debian",
                Some("latest"),
                None,
            ),
            (
                "localhost/foo".into(),
                "localhost",
                "foo",
                Some("latest"),
                None,
            ),
            (
                "localhost:5000/a/b/c:v1".into(),
                "localhost:5000",
                "a/b/c",
                Some("v1"),
                None,
            ),
            (
                "a__b/c-----d/e.f:_x".into(),
                "docker.io",
                "a__b/c-----d/e.f",
                Some("_x"),
                None,
            ),
            ("Foo.com/bar".into(), "Foo.com", "bar", Some("latest"), None),
        ];
        for (input, registry, repository, tag, digest) in &cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry(), Some(*registry), "{input}");
            assert_eq!(r.repository(), *repository, "{input}");
            assert_eq!(r.tag(), *tag, "{input}");
            assert_eq!(
                r.digest().map(|d| d.to_string()).as_deref(),
                *digest,
                "{input}"
            );
            // The full form parses back to the same reference.
            assert_eq!(Reference::parse(&r.to_string()).unwrap(), r, "{input}");
        }
    }

    #[test]
    fn invalid_references_say_what_is_wrong() {
        let d = sha(HEX);
        let long_ok = format!("{}a:tag-puts-this-over-max", "a/".repeat(127));
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "empty"),
            (":justtag".into(), "name is empty"),
            (format!("@{d}"), "name is empty"),
            (
                "repo@sha256:ffffffffffffffffffffffffffffffffff".into(),
                "bad digest",
            ),
            (
                format!("validname@invaliddigest:{HEX}"),
                "unsupported algorithm",
            ),
            ("Uppercase:tag".into(), "lowercase"),
            ("test:5000/Uppercase/lowercase:tag".into(), "lowercase"),
            (format!("{}a:tag", "a/".repeat(128)), "limit is 255"),
            ("aa/asdf$$^/aa".into(), "contains `$`"),
            ("[2001:db8::1]".into(), "`]`"),
            ("[2001:db8::1]:5000".into(), "repository"),
            ("[2001:db8::1]:tag".into(), "repository"),
            ("[fe80::1%eth0]:5000/repo".into(), "IPv6"),
            ("[2001:db8::1]:5000:tag/repo".into(), "registry"),
            ("foo/../bar".into(), "must start and end"),
            ("a..b".into(), "separator `..`"),
            ("a___b".into(), "separator `___`"),
            ("a-_b".into(), "separator `-_`"),
            ("-foo".into(), "must start and end"),
            ("foo-".into(), "must start and end"),
            ("foo//bar".into(), "empty path component"),
            ("foo/".into(), "empty path component"),
            ("foo:".into(), "tag `` is empty"),
            ("foo:-x".into(), "must start with"),
            (format!("foo:{}", "x".repeat(129)), "limit is 128"),
            ("foo:a+b".into(), "contains `+`"),
            ("host:port/x".into(), "invalid port"),
            ("-bad.com/x".into(), "host label"),
            (HEX.into(), "image ID"),
            (format!("x.io/{}aaa", "a/".repeat(124)), "limit is 255"),
            // 255 as written, but 265 once `docker.io/` is added.
            (long_ok.clone(), "(`docker.io/a/a/"),
        ];
        for (input, want) in &cases {
            let err = match Reference::parse(input) {
                Ok(r) => panic!("{input:?} parsed as {r}"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains(want),
                "{input:?}: {err:?} should mention {want:?}"
            );
            assert!(
                err.contains(&format!("`{input}`")),
                "{err} should name the input"
            );
        }
    }

    #[test]
    fn display_and_familiar_forms() {
        let r = Reference::parse("debian").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/debian:latest");
        assert_eq!(r.familiar(), "debian:latest");
        assert_eq!(r.name(), "docker.io/library/debian");
        let r = Reference::parse("foo/bar:1").unwrap();
        assert_eq!(r.familiar(), "foo/bar:1");
        let r = Reference::parse("docker.io/library/a/b").unwrap();
        assert_eq!(r.familiar(), "library/a/b:latest");
        let d = sha(HEX);
        let r = Reference::parse(&format!("ghcr.io/a/b@{d}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.familiar(), format!("ghcr.io/a/b@{d}"));
        assert_eq!(r.to_string(), format!("ghcr.io/a/b@{d}"));
        let r = Reference::parse("localhost:5000/x:y")
            .unwrap()
            .with_tag("z")
            .unwrap();
        assert_eq!(r.to_string(), "localhost:5000/x:z");
        assert!(r.with_tag("bad tag").is_err());
    }

    #[test]
    fn local_names_keep_what_was_written() {
        let r = Reference::parse_local("myapp:1").unwrap();
        assert_eq!(r.registry(), None);
        assert!(r.is_local());
        assert_eq!(r.repository(), "myapp");
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.to_string(), "myapp:1");

        let r = Reference::parse_local("myapp").unwrap();
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.familiar(), "myapp:latest");

        let r = Reference::parse_local("ghcr.io/a/b:2").unwrap();
        assert_eq!(r.registry(), Some("ghcr.io"));
        assert_eq!(r.repository(), "a/b");

        // Docker Hub names are stored in their familiar form, like `docker images` shows them.
        let remote = Reference::parse("docker.io/library/debian:12").unwrap();
        let local = Reference::parse_local(&remote.familiar()).unwrap();
        assert_eq!(
            local,
            Reference::parse_local("docker.io/library/debian:12").unwrap()
        );
        assert_eq!(local.repository(), "debian");
        assert_eq!(local.to_remote(), remote);

        // distribution/reference's limit applies to the name as written.
        let long = format!("{}a", "a/".repeat(127));
        let r = Reference::parse_local(&format!("{long}:tag-puts-this-over-max")).unwrap();
        assert_eq!(r.repository(), long);
        assert!(Reference::parse_local(&format!("a/{long}")).is_err());

        assert!(Reference::parse_local("My/App").is_err());
        assert!(Reference::parse_local("app:").is_err());
    }

    #[test]
    fn registry_validators() {
        for ok in [
            "a",
            "library/debian",
            "a/b/c",
            "a.b_c__d---e/f0",
            &"a".repeat(255),
        ] {
            validate_repository_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "A", "a/", "/a", "a//b", "a..b", "a:b", &"a".repeat(256)] {
            let e = validate_repository_name(bad).unwrap_err();
            assert!(
                matches!(e, Error::InvalidRepositoryName { .. }),
                "{bad}: {e}"
            );
        }
        for ok in ["latest", "_x", "1.0-rc.1", "UPPER", &"t".repeat(128)] {
            validate_tag(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "é", &"t".repeat(129)] {
            let e = validate_tag(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidTag { .. }), "{bad}: {e}");
        }
    }
}
