//! The OCI / Docker image model: digests, descriptors, manifests, configs, references and
//! validation; no file or network I/O (blobs are read through [`BlobSource`]).
//!
//! Also home to [`sync`], the poison-tolerant lock helpers every strata crate shares.

// Tests may unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod canonical;
mod config;
mod descriptor;
mod digest;
mod error;
pub mod media_type;
pub mod names;
mod printable;
pub mod reference;
pub mod sync;
pub mod validate;

pub use canonical::{to_canonical_json, try_to_canonical_json};
pub use config::{ContainerConfig, EmptyObject, Extra, HealthConfig, History, ImageConfig, RootFs};
pub use descriptor::{ANNOTATION_REF_NAME, Descriptor, Index, Manifest, ManifestOrIndex, Platform};
pub use digest::{Algorithm, Digest, Hasher, HashingWriter, chain_id};
pub use error::Error;
pub use media_type::Compression;
pub use printable::printable;
pub use reference::{Reference, validate_repository_name, validate_tag};
pub use validate::{BlobSource, ValidationReport, validate_image};
