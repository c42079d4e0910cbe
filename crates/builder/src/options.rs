//! What a build is asked ([`BuildOptions`]) and what it made ([`BuildOutcome`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use strata_oci::{Compression, Descriptor, Digest};
use strata_transfer::{PullOptions, PullReport};

/// Everything a single build needs besides the store.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The build context directory.
    pub context: PathBuf,
    /// The Dockerfile (default: `<context>/Dockerfile`).
    pub dockerfile: Option<PathBuf>,
    /// The Dockerfile's text, read elsewhere (`-f -`: from stdin); used instead of a file,
    /// and its errors name it `<stdin>`.
    pub dockerfile_text: Option<String>,
    /// `--build-arg K=V`.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// `-t` names (`myapp`, `myapp:1`); stored as refs.
    pub tags: Vec<String>,
    /// Leave the refs to the caller: [`BuildOutcome::tags`] are not set in the store, and the
    /// caller must hold a [`strata_store::WriteSession`] from before the build until it sets
    /// them. A project sets a whole wave's refs in one `index.json` write this way.
    pub defer_refs: bool,
    /// Name used for the content tag's repository and for `explain`'s record (default: the
    /// first tag's repository, else `strata-build`).
    pub name: Option<String>,
    /// `--no-cache`: run every step (results are still stored for later builds).
    pub no_cache: bool,
    /// `--explain`: emit an [`crate::Event::Explain`] for each step that missed.
    pub explain: bool,
    /// `--secret id=…,src=…`: secret id → file.
    pub secrets: BTreeMap<String, PathBuf>,
    /// Also tag `<name>:deployment-<ULID>`.
    pub deployment_tag: bool,
    /// Replace the first stage's `FROM` image (strata.toml `from`).
    pub from_override: Option<String>,
    /// Part of the first stage's base key (strata.toml `from_cache_version`).
    pub from_cache_version: Option<String>,
    /// Labels added to the final image (strata.toml `labels`).
    pub labels: BTreeMap<String, String>,
    /// Ignore patterns added to `.dockerignore`'s (strata.toml `ignore`).
    pub extra_ignore: Vec<String>,
    /// Image names resolved to exact manifests instead of the store's refs (project
    /// dependencies, `strata.lock`). Keys are local names (`busybox:latest`).
    pub pinned: BTreeMap<String, Descriptor>,
    /// Image names locked to a manifest digest (`strata.lock`); keys are local names. A locked
    /// image missing from the store is pulled by that digest, so a tag moved upstream does not
    /// change the build.
    pub locked: BTreeMap<String, Digest>,
    /// How to pull a base (or `--from` image) that is not in the store (registry auth,
    /// `insecure`, retries, platform).
    pub pull: PullOptions,
    /// Layer compression.
    pub compression: Compression,
    /// runc to use (default: found by [`strata_runtime::RuntimeConfig::detect`]).
    pub runc: Option<PathBuf>,
    /// Follow a moved base without running steps when that gives the image a rebuild would
    /// (docs/rebase.md); strata.toml `rebase = false` turns it off.
    pub rebase: bool,
    /// A build cache in a registry (`--cache-from`, `--cache-to`; docs/cache.md).
    pub shared_cache: Option<std::sync::Arc<crate::shared_cache::SharedCache>>,
    /// What runs RUN steps (default: runc, as [`crate::executor::Runc`]).
    pub executor: Option<Arc<dyn crate::executor::Executor>>,
    /// Layers found in the registry cache stay there unless a step reads them: an image that
    /// lacks some is kept by digest, unnamed (its content tag is `name@sha256:…`), for a push
    /// to the same registry that mounts them (`strata deploy --build-only --push`).
    pub remote_layers: bool,
    /// `--network`: RUN steps' network unless a step says (default: the host's).
    pub network: crate::plan::NetworkMode,
    /// `--pull`: pull every base named by tag again, even when the store has it.
    pub pull_always: bool,
}

impl BuildOptions {
    /// Options for building `context` with its `Dockerfile`, everything else default.
    pub fn new(context: impl Into<PathBuf>) -> Self {
        BuildOptions {
            context: context.into(),
            dockerfile: None,
            dockerfile_text: None,
            build_args: BTreeMap::new(),
            target: None,
            tags: Vec::new(),
            defer_refs: false,
            name: None,
            no_cache: false,
            explain: false,
            secrets: BTreeMap::new(),
            deployment_tag: false,
            from_override: None,
            from_cache_version: None,
            labels: BTreeMap::new(),
            extra_ignore: Vec::new(),
            pinned: BTreeMap::new(),
            locked: BTreeMap::new(),
            pull: PullOptions::default(),
            compression: Compression::Gzip,
            runc: None,
            rebase: true,
            shared_cache: None,
            executor: None,
            remote_layers: false,
            network: crate::plan::NetworkMode::Host,
            pull_always: false,
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The image manifest's descriptor.
    pub descriptor: Descriptor,
    /// The config blob's digest.
    pub config_digest: Digest,
    /// The final step's cache key (hex).
    pub cache_key: String,
    /// `<name>:strata-<16 hex of the key>`: the same inputs give the same tag anywhere.
    pub content_tag: String,
    /// Every ref set (user tags, content tag, deployment tag), as local names.
    pub tags: Vec<String>,
    /// The `deployment-<ULID>` ref, when asked.
    pub deployment_tag: Option<String>,
    /// Steps that ran.
    pub steps_run: usize,
    /// Steps answered by the cache.
    pub steps_cached: usize,
    /// Bytes of the layer blobs written by the steps that ran (compressed sizes).
    pub layer_bytes_written: u64,
    /// `(step text, reason)` for each step that missed.
    pub explanations: Vec<(String, String)>,
    /// External images the build read (`FROM`, `--from`), by local name.
    pub images_used: BTreeMap<String, Digest>,
    /// Images pulled from a registry because they were not in the store, in pull order.
    pub pulled: Vec<PullReport>,
    /// `base@sha256:…` when the image was rebased onto a moved base: no step ran, every
    /// layer is the last build's (docs/rebase.md).
    pub rebased_onto: Option<String>,
    /// Context files read to hash them (the others' digests came from the stat cache).
    pub context_files_read: usize,
    /// Selections of context files (a `COPY`'s, a bind mount's) whose key was a known one:
    /// every stat unchanged, so neither the files nor their stat cache entries were read.
    pub context_known_keys: usize,
}
