//! Copies images between the store and the outside: tarball import, docker-archive and OCI
//! archive save/load, registries, hosts over SSH ([`ssh`]), and build caches kept in a
//! registry ([`cache`]).
//!
//! Every copy follows the store's contract: blobs are verified as they stream in, and an
//! image's name is set only after everything it references is in the store, while a
//! [`strata_store::WriteSession`] keeps a concurrent `gc` away from the new blobs.

mod archive;
pub mod cache;
mod error;
mod import;
mod registry;
pub mod ssh;

pub use archive::{
    ArchiveFormat, LoadedImage, load_archive, save_archive, write_archive, write_output,
};
pub use error::{Error, Result};
pub use import::{ImportOptions, Imported, import_tarball, local_name};
pub use registry::{
    BlobProgress, BlobState, DEFAULT_PARALLELISM, ProgressFn, PullOptions, PullReport, PushOptions,
    PushReport, fetch_image, known_repositories, pull, pulled_name, push, push_descriptor,
    push_parts,
};
