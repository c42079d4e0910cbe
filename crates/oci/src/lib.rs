//! The OCI / Docker image model: digests, descriptors, manifests, configs, references; no I/O.

mod descriptor;
mod digest;
mod error;
pub mod media_type;

pub use descriptor::{ANNOTATION_REF_NAME, Descriptor, Index, Manifest, Platform};
pub use digest::{Algorithm, Digest, Hasher, HashingWriter, chain_id};
pub use error::Error;
pub use media_type::Compression;
