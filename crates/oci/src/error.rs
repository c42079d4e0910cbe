/// Everything that can be wrong with image metadata.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid digest `{digest}`: {reason}")]
    InvalidDigest { digest: String, reason: String },
}
