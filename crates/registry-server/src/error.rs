//! The crate's error type, and the HTTP error a request handler answers with.

use std::path::PathBuf;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// What can go wrong while serving, storing or administering a registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("object storage, {op} `{key}`: {source}")]
    ObjectStore {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },

    #[error("cannot configure S3 bucket `{bucket}`: {source}")]
    S3Config {
        bucket: String,
        #[source]
        source: object_store::Error,
    },

    #[error("metadata database {}: {what}: {source}", path.display())]
    Db {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },

    #[error("PostgreSQL metadata database: {what}: {source}")]
    Postgres {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("PostgreSQL metadata database: no connection: {0}")]
    PgPool(String),

    #[error("invalid `[postgres] url`: {0}")]
    PgConfig(String),

    #[error(
        "another gc is running (lease held by `{holder}`); hint: wait for it, or for its lease to expire"
    )]
    GcBusy { holder: String },

    #[error(
        "gc lost its lease in the metadata database (too slow or disconnected); nothing more was deleted"
    )]
    GcLeaseLost,

    #[error("gc is deleting `{digest}` and did not finish within {secs} s")]
    GcStuck { digest: String, secs: u64 },

    #[error("invalid storage key `{key}`: {reason}")]
    BadKey { key: String, reason: &'static str },

    #[error("stored {what} at `{key}` is corrupt: {reason}")]
    Corrupt {
        what: &'static str,
        key: String,
        reason: String,
    },

    #[error(transparent)]
    Oci(#[from] strata_oci::Error),

    #[error("invalid org name `{name}`: {reason}")]
    InvalidOrg { name: String, reason: String },

    #[error("invalid user name `{name}`: {reason}")]
    InvalidUser { name: String, reason: String },

    #[error("org `{org}` already exists")]
    OrgExists { org: String },

    #[error("org `{org}` does not exist; hint: create it with `strata registry org create {org}`")]
    UnknownOrg { org: String },

    #[error("user `{user}` already exists")]
    UserExists { user: String },

    #[error("password hashing failed: {0}")]
    Password(String),

    #[error("cannot get random bytes from the OS: {0}")]
    Random(String),

    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),

    #[error("cannot accept connections on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// This crate's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.into(),
            source,
        })
    }
}

/// The error codes of the distribution spec (`spec.md`, "Error Codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    // The spec's list is kept whole; this server has no rate limit yet.
    #[allow(dead_code)]
    TooManyRequests,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
        }
    }

    fn default_message(self) -> &'static str {
        match self {
            Code::BlobUnknown => "blob unknown to registry",
            Code::BlobUploadInvalid => "blob upload invalid",
            Code::BlobUploadUnknown => "blob upload unknown to registry",
            Code::DigestInvalid => "provided digest did not match uploaded content",
            Code::ManifestBlobUnknown => {
                "manifest references a manifest or blob unknown to registry"
            }
            Code::ManifestInvalid => "manifest invalid",
            Code::ManifestUnknown => "manifest unknown to registry",
            Code::NameInvalid => "invalid repository name",
            Code::NameUnknown => "repository name not known to registry",
            Code::SizeInvalid => "provided length did not match content length",
            Code::Unauthorized => "authentication required",
            Code::Denied => "requested access to the resource is denied",
            Code::Unsupported => "the operation is unsupported",
            Code::TooManyRequests => "too many requests",
        }
    }
}

/// One entry of the `errors` array.
#[derive(Debug, Clone)]
pub(crate) struct ApiErrorEntry {
    code: Code,
    message: String,
    detail: serde_json::Value,
}

/// An HTTP error response: a status, the spec's JSON body and extra headers (boxed: handlers
/// return it in every `Result`, and the happy path should stay small).
#[derive(Debug)]
pub(crate) struct ApiError(Box<ApiErrorInner>);

#[derive(Debug)]
pub(crate) struct ApiErrorInner {
    status: StatusCode,
    errors: Vec<ApiErrorEntry>,
    headers: HeaderMap,
}

impl std::ops::Deref for ApiError {
    type Target = ApiErrorInner;
    fn deref(&self) -> &ApiErrorInner {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ApiErrorInner {
        &mut self.0
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> ApiError {
        let message = message.into();
        ApiError(Box::new(ApiErrorInner {
            status,
            errors: vec![ApiErrorEntry {
                code,
                message: if message.is_empty() {
                    code.default_message().to_string()
                } else {
                    message
                },
                detail: serde_json::Value::Null,
            }],
            headers: HeaderMap::new(),
        }))
    }

    /// The status the spec pairs with `code` in the common case.
    pub fn code(code: Code, message: impl Into<String>) -> ApiError {
        let status = match code {
            Code::BlobUnknown
            | Code::BlobUploadUnknown
            | Code::ManifestUnknown
            | Code::NameUnknown => StatusCode::NOT_FOUND,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Denied => StatusCode::FORBIDDEN,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, code, message)
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        if let Some(e) = self.errors.last_mut() {
            e.detail = detail;
        }
        self
    }

    /// Add another error entry (e.g. one `MANIFEST_BLOB_UNKNOWN` per missing blob).
    pub fn and(
        mut self,
        code: Code,
        message: impl Into<String>,
        detail: serde_json::Value,
    ) -> Self {
        self.errors.push(ApiErrorEntry {
            code,
            message: message.into(),
            detail,
        });
        self
    }

    pub fn header(mut self, name: HeaderName, value: &str) -> ApiError {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.append(name, v);
        }
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        tracing::error!("internal error: {e}");
        let mut err = ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unsupported,
            "internal server error",
        );
        // The `code` must be one of the spec's; the message says what happened without paths.
        if let Some(entry) = err.errors.last_mut() {
            entry.message = format!("internal server error: {}", short_reason(&e));
        }
        err
    }
}

/// A reason to show a client: the error without host paths or keys.
fn short_reason(e: &Error) -> &'static str {
    match e {
        Error::Io { .. } => "storage I/O failed",
        Error::ObjectStore { .. } | Error::S3Config { .. } => "object storage failed",
        Error::Db { .. } | Error::Postgres { .. } | Error::PgPool(_) => "metadata database failed",
        Error::Corrupt { .. } => "stored metadata is corrupt",
        _ => "unexpected failure",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "errors": self.errors.iter().map(|e| json!({
                "code": e.code.as_str(),
                "message": e.message,
                "detail": e.detail,
            })).collect::<Vec<_>>()
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (k, v) in self.headers.iter() {
            resp.headers_mut().append(k.clone(), v.clone());
        }
        resp
    }
}
