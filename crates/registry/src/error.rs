//! The crate's one error type.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use strata_oci::{Digest, printable};

/// Everything that can go wrong talking to a registry or reading credentials. Text the
/// registry supplied (its error messages, what a manifest or index says) is shown with
/// control characters escaped ([`printable`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry answered with an unexpected HTTP status; `errors` is its error JSON.
    #[error("{registry}: {}: HTTP {status}{}", printable(what), fmt_errors(errors))]
    Status {
        registry: String,
        /// The operation, naming the repository and tag / digest (`GET manifest app:1`).
        what: String,
        status: u16,
        errors: RegistryErrors,
    },

    /// Credentials were refused (HTTP 401 after authenticating) or are missing.
    #[error(
        "{registry}: {what}: unauthorized{}{}",
        fmt_errors(errors),
        hint_login(registry)
    )]
    Unauthorized {
        registry: String,
        what: String,
        errors: RegistryErrors,
    },

    /// The registry knows who we are but refuses the operation (HTTP 403).
    #[error("{registry}: {what}: access denied{}", fmt_errors(errors))]
    Denied {
        registry: String,
        what: String,
        errors: RegistryErrors,
    },

    /// The manifest, blob or repository does not exist.
    #[error("{registry}: {what}: not found{}", fmt_errors(errors))]
    NotFound {
        registry: String,
        what: String,
        errors: RegistryErrors,
    },

    /// The request could not be sent or its answer not read (after retries).
    #[error("{registry}: {what}: {source}")]
    Connection {
        registry: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },

    /// The registry sent nothing for [`crate::ClientOptions::timeout`]: no connection, no
    /// answer, or no next part of an answer's body.
    #[error("no answer from {registry} for {} while waiting for {waiting} {what}", fmt_duration(*after))]
    Timeout {
        registry: String,
        /// The operation (`GET manifest app:1`).
        what: String,
        /// `the answer to` or `more of the answer to`.
        waiting: &'static str,
        after: std::time::Duration,
    },

    /// Content does not hash to the digest it was asked for or announced with. `what` names
    /// registry, repository and object (`127.0.0.1:5000/org/app: manifest `1``).
    #[error("{what}: expected digest {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },

    /// A blob was shorter or longer than its descriptor says.
    #[error("{registry}/{repository}: blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        registry: String,
        repository: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    /// A manifest or index could not be understood.
    #[error("{registry}/{repository}: manifest `{}`: {}", printable(reference), printable(&source.to_string()))]
    Manifest {
        registry: String,
        repository: String,
        reference: String,
        // Boxed: the OCI error is large and this one is rare.
        #[source]
        source: Box<strata_oci::Error>,
    },

    /// An index has no image for the platform asked for.
    #[error(
        "{registry}/{repository}: `{}` has no image for {} (it has: {})",
        printable(reference),
        printable(platform),
        printable(available)
    )]
    NoMatchingPlatform {
        registry: String,
        repository: String,
        reference: String,
        platform: String,
        available: String,
    },

    /// The registry broke the protocol (missing header, bad JSON, bad `Location`...).
    #[error("{registry}: {}: {}", printable(what), printable(reason))]
    Protocol {
        registry: String,
        what: String,
        reason: String,
    },

    /// The authentication flow failed (bad challenge, token endpoint refused...).
    #[error("{registry}: authentication: {}", printable(reason))]
    Auth { registry: String, reason: String },

    /// A downloaded blob could not be written where the caller asked, or an upload source read.
    #[error("{registry}/{repository}: blob {digest}: {op}: {source}")]
    BlobIo {
        registry: String,
        repository: String,
        digest: Digest,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The Docker config file could not be read or written.
    #[error("docker config `{path}`: {reason}")]
    DockerConfig { path: PathBuf, reason: String },

    /// A `docker-credential-*` helper failed.
    #[error("credential helper `docker-credential-{helper}` ({action} for {server}): {reason}")]
    CredentialHelper {
        helper: String,
        action: &'static str,
        server: String,
        reason: String,
    },

    /// A registry name or URL is not usable.
    #[error("invalid registry `{registry}`: {reason}")]
    InvalidRegistry { registry: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The HTTP status the registry answered, if this error is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            Error::Unauthorized { .. } => Some(401),
            Error::Denied { .. } => Some(403),
            Error::NotFound { .. } => Some(404),
            _ => None,
        }
    }

    /// The registry's error codes (`MANIFEST_UNKNOWN`, `DENIED`...), if it sent any.
    pub fn codes(&self) -> Vec<&str> {
        match self {
            Error::Status { errors, .. }
            | Error::Unauthorized { errors, .. }
            | Error::Denied { errors, .. }
            | Error::NotFound { errors, .. } => errors.0.iter().map(|e| e.code.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

/// The `errors` array of a registry's error response (distribution spec, "Error Codes").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryErrors(pub Vec<RegistryError>);

/// One entry of a registry's error response.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegistryError {
    /// `BLOB_UNKNOWN`, `MANIFEST_INVALID`, `UNAUTHORIZED`...
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    /// Free-form; kept as JSON text.
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
}

impl RegistryErrors {
    /// Parse a response body; anything that is not the spec's JSON gives an empty list, except
    /// a short plain-text body, which is kept as the message (proxies answer like that).
    pub fn from_body(body: &[u8]) -> RegistryErrors {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            errors: Vec<RegistryError>,
        }
        if let Ok(b) = serde_json::from_slice::<Body>(body) {
            return RegistryErrors(b.errors);
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if !text.is_empty() && text.len() <= 200 && !text.starts_with('<') {
            return RegistryErrors(vec![RegistryError {
                code: String::new(),
                message: text.to_string(),
                detail: None,
            }]);
        }
        RegistryErrors::default()
    }
}

/// The registry wrote this text: control characters are escaped so that it cannot drive the
/// user's terminal.
impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (code, message) = (printable(&self.code), printable(&self.message));
        match (code.is_empty(), message.is_empty()) {
            (false, false) => write!(f, "{code}: {message}")?,
            (false, true) => f.write_str(&code)?,
            (true, _) => f.write_str(&message)?,
        }
        match &self.detail {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(serde_json::Value::String(s)) if s.is_empty() => Ok(()),
            Some(serde_json::Value::String(s)) => write!(f, " ({})", printable(s)),
            // JSON text: control characters are already written as `\u001b`.
            Some(other) => write!(f, " ({other})"),
        }
    }
}

/// `30 s`, `2.5 s`, `250 ms`.
fn fmt_duration(d: std::time::Duration) -> String {
    if d < std::time::Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn fmt_errors(errors: &RegistryErrors) -> String {
    if errors.0.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    format!(": {}", parts.join("; "))
}

fn hint_login(registry: &str) -> String {
    format!("\nhint: log in with `strata login {registry}`")
}
