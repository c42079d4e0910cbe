//! The layer engine: reproducible layer tars from trees or change lists, safe application of
//! layers to directories, tree diffs, and a chain-ID keyed cache of unpacked layers.
//!
//! Writing: [`write_layer`] turns a [`LayerSource`] into a compressed blob and returns
//! [`LayerInfo`] (diff_id, digest and size computed in the same pass).
//! Reading: [`apply_layer`] unpacks a blob into a directory; nothing in a layer can make it
//! write outside that directory. Diffs: [`diff_dirs`], [`changes_from_overlay_upper`].
//! Caching: [`SnapshotCache`], [`materialize`].

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod apply;
mod compress;
mod diff;
mod error;
mod fsmeta;
mod layers;
mod pargz;
mod recompress;
mod snapshot;
mod tarfmt;
mod write;

pub use apply::{
    ApplyOptions, ApplyStats, MAX_PATH_BYTES, WhiteoutMode, apply_layer, apply_layer_with,
};
pub use compress::{DEFAULT_GZIP_LEVEL, DEFAULT_ZSTD_LEVEL, GzMemberCache, decompress};
pub use diff::{Change, changes_from_overlay_upper, diff_dirs};
pub use error::{Error, Refusal, Result};
pub use layers::lookup_in_layers;
pub use pargz::{GzMember, MEMBER_SCHEME, MemberCache};
pub use recompress::{recompress_tar, sniff_compression};
pub use snapshot::{LayerRef, SnapshotCache, materialize, overlay_lowerdir, sync_filesystem};
pub use strata_oci::Compression;
pub use write::{
    HostFile, LayerInfo, LayerOptions, LayerSource, MtimePolicy, OPAQUE_MARKER, WHITEOUT_PREFIX,
    write_layer,
};
