//! The registry's data model over a [`Backend`]: shared blobs, per-repository links, manifests,
//! tags, referrers and the catalog, plus upload sessions staged on local disk.
//!
//! Object keys (the same on every backend):
//!
//! ```text
//! blobs/<alg>/<hex>                                  content, shared by all repositories
//! repos/<name>/_links/<alg>/<hex>                    (empty) the repository may read this blob
//! repos/<name>/_manifests/<alg>/<hex>                the manifest's media type
//! repos/<name>/_tags/<tag>                           the tagged manifest's digest
//! repos/<name>/_referrers/<alg>/<hex>/<alg>-<hex>    a referrer's descriptor (JSON), by subject
//! catalog/<name>/_repo                               (empty) the repository exists
//! ```
//!
//! Repository path components never start with `_`, so `repos/a/b/_tags` cannot collide with a
//! repository named `a/b/_tags`; tags never start with `.`, digests are hex.
//!
//! ```text
//! _uploads/<id>/<offset>-<rand>                      one request's bytes of an upload
//! ```
//!
//! An upload session (repository, size, its parts in order) lives in the metadata store, so a
//! chunked upload may go to a different replica with every request; each request's body is
//! spooled to local disk, then stored as the next part. The closing `PUT` moves a lone part
//! into place (its digest was hashed as it arrived) or joins the parts, hashing them.

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use strata_oci::sync::MutexExt;
use strata_oci::{Algorithm, Descriptor, Digest, Hasher, ManifestOrIndex};

use crate::error::{Error, IoContext, Result};
use crate::meta::Meta;
use crate::storage::{Backend, ByteStream};
use crate::util;

pub(crate) fn blob_key(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())
}
fn link_key(repo: &str, d: &Digest) -> String {
    format!("repos/{repo}/_links/{}/{}", d.algorithm().as_str(), d.hex())
}
fn manifest_key(repo: &str, d: &Digest) -> String {
    format!(
        "repos/{repo}/_manifests/{}/{}",
        d.algorithm().as_str(),
        d.hex()
    )
}
fn tag_key(repo: &str, tag: &str) -> String {
    format!("repos/{repo}/_tags/{tag}")
}
fn referrers_prefix(repo: &str, subject: &Digest) -> String {
    format!(
        "repos/{repo}/_referrers/{}/{}/",
        subject.algorithm().as_str(),
        subject.hex()
    )
}
fn referrer_key(repo: &str, subject: &Digest, d: &Digest) -> String {
    format!(
        "{}{}-{}",
        referrers_prefix(repo, subject),
        d.algorithm().as_str(),
        d.hex()
    )
}
fn catalog_key(repo: &str) -> String {
    format!("catalog/{repo}/_repo")
}

/// A parsed key under `repos/`, as gc sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RepoKey {
    Link(String, Digest),
    Manifest(String, Digest),
    Tag(String, String),
    Referrer(String, Digest, Digest),
}

impl RepoKey {
    /// Parse a key relative to `repos/`.
    pub fn parse(rel: &str) -> Option<RepoKey> {
        for marker in ["/_links/", "/_manifests/", "/_tags/", "/_referrers/"] {
            let Some(at) = rel.find(marker) else {
                continue;
            };
            let repo = rel[..at].to_string();
            let rest = &rel[at + marker.len()..];
            let digest = |s: &str| s.replacen('/', ":", 1).parse::<Digest>().ok();
            return match marker {
                "/_links/" => Some(RepoKey::Link(repo, digest(rest)?)),
                "/_manifests/" => Some(RepoKey::Manifest(repo, digest(rest)?)),
                "/_tags/" => Some(RepoKey::Tag(repo, rest.to_string())),
                _ => {
                    let (subject, referrer) = rest.rsplit_once('/')?;
                    Some(RepoKey::Referrer(
                        repo,
                        digest(subject)?,
                        referrer.replacen('-', ":", 1).parse().ok()?,
                    ))
                }
            };
        }
        None
    }

    pub fn key(&self) -> String {
        match self {
            RepoKey::Link(r, d) => link_key(r, d),
            RepoKey::Manifest(r, d) => manifest_key(r, d),
            RepoKey::Tag(r, t) => tag_key(r, t),
            RepoKey::Referrer(r, s, d) => referrer_key(r, s, d),
        }
    }
}

/// A stored manifest: its digest, media type and exact bytes.
pub(crate) struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// An upload in progress, as read from the metadata store at the start of a request.
pub(crate) struct Session {
    pub id: String,
    pub repo: String,
    /// Bytes received so far (the total size of `parts`).
    pub offset: u64,
    algorithm: Algorithm,
    /// Object names under `_uploads/<id>/`, in order.
    parts: Vec<String>,
    /// The whole upload, received by the closing request on this replica and not stored as a
    /// part: the spooled file and its digest, put straight into place by `finish`.
    local: Option<(PathBuf, Digest)>,
}

impl Session {
    /// Whether the upload's bytes are a local file of this request, not stored parts.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }
}

/// How a request body ended while being appended to an upload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AppendEnd {
    Complete,
    /// The client stopped sending (connection closed or broken); what arrived is kept.
    Broken,
    /// No byte for longer than the idle timeout.
    Idle,
    /// The upload would exceed the blob size limit; nothing past the limit was written.
    TooLarge,
    /// Another request (maybe on another replica) appended first; this body was dropped.
    Moved,
}

pub(crate) struct Registry {
    pub backend: Arc<dyn Backend>,
    pub meta: Arc<Meta>,
    /// Request bodies being received, before they become an upload's part.
    spool: PathBuf,
    /// Upload id → (offset, hash of the bytes up to it), for uploads whose bytes all came
    /// through this process; another replica (or a restart) recomputes it from the parts.
    hashers: Mutex<HashMap<String, (u64, Hasher, std::time::Instant)>>,
    /// Manifest bytes by digest (immutable), with their total size; see `cache_manifest`.
    manifest_cache: Mutex<(usize, HashMap<Digest, Bytes>)>,
    /// The media type each repository's manifest was pushed with, as last read here: with the
    /// bytes above, a GET by tag reads only the tag from storage (see
    /// [`Registry::get_manifest_by_tag`]).
    media_types: Mutex<HashMap<(String, Digest), String>>,
}

/// The object holding part `part` of upload `id`.
fn part_key(id: &str, part: &str) -> String {
    format!("_uploads/{id}/{part}")
}

fn is_upload_id(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit() && !b.is_ascii_uppercase()
            }
        })
}

fn new_upload_id() -> String {
    let h = util::random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl Registry {
    pub fn new(backend: Arc<dyn Backend>, meta: Arc<Meta>, root: &Path) -> Result<Registry> {
        let spool = root.join("tmp");
        std::fs::create_dir_all(&spool).at("create", &spool)?;
        crate::storage::remove_stale_temp_files(&spool);
        Ok(Registry {
            backend,
            meta,
            spool,
            hashers: Mutex::new(HashMap::new()),
            manifest_cache: Mutex::new((0, HashMap::new())),
            media_types: Mutex::new(HashMap::new()),
        })
    }

    // ---- blobs and links ----

    /// The blob's size when `repo` may read it (linked, or one of its manifests).
    pub async fn repo_blob_size(&self, repo: &str, d: &Digest) -> Result<Option<u64>> {
        let linked = self.backend.head(&link_key(repo, d)).await?.is_some()
            || self.backend.head(&manifest_key(repo, d)).await?.is_some();
        if !linked {
            return Ok(None);
        }
        Ok(self.backend.head(&blob_key(d)).await?.map(|i| i.size))
    }

    pub async fn blob_stream(&self, d: &Digest, range: Range<u64>) -> Result<ByteStream> {
        self.backend.get_range(&blob_key(d), range).await
    }

    /// The file holding blob `d` when the backend keeps blobs as local files.
    pub fn blob_file(&self, d: &Digest) -> Option<std::path::PathBuf> {
        self.backend.local_file(&blob_key(d))
    }

    pub async fn link_blob(&self, repo: &str, d: &Digest) -> Result<()> {
        self.backend.put(&link_key(repo, d), Bytes::new()).await?;
        self.mark_repo(repo).await
    }

    pub async fn unlink_blob(&self, repo: &str, d: &Digest) -> Result<bool> {
        self.backend.delete(&link_key(repo, d)).await
    }

    async fn mark_repo(&self, repo: &str) -> Result<()> {
        let key = catalog_key(repo);
        if self.backend.head(&key).await?.is_none() {
            self.backend.put(&key, Bytes::new()).await?;
        }
        Ok(())
    }

    pub async fn repo_exists(&self, repo: &str) -> Result<bool> {
        Ok(self.backend.head(&catalog_key(repo)).await?.is_some())
    }

    /// Every repository, sorted.
    pub async fn catalog(&self) -> Result<Vec<String>> {
        let mut repos: Vec<String> = self
            .backend
            .list("catalog/")
            .await?
            .into_iter()
            .filter_map(|o| o.key.strip_suffix("/_repo").map(str::to_string))
            .collect();
        repos.sort();
        Ok(repos)
    }

    // ---- manifests, tags, referrers ----

    pub async fn has_manifest(&self, repo: &str, d: &Digest) -> Result<bool> {
        Ok(self.backend.head(&manifest_key(repo, d)).await?.is_some())
    }

    pub async fn resolve_tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>> {
        let key = tag_key(repo, tag);
        let Some(v) = self.backend.get(&key).await? else {
            return Ok(None);
        };
        let s = String::from_utf8_lossy(&v);
        s.trim()
            .parse()
            .map(Some)
            .map_err(|e: strata_oci::Error| Error::Corrupt {
                what: "tag",
                key,
                reason: e.to_string(),
            })
    }

    pub async fn get_manifest(&self, repo: &str, d: &Digest) -> Result<Option<StoredManifest>> {
        let Some(mt) = self.backend.get(&manifest_key(repo, d)).await? else {
            return Ok(None);
        };
        let cached = self.manifest_cache.lock_ok().1.get(d).cloned();
        let bytes = match cached {
            Some(b) => b,
            None => {
                let Some(bytes) = self.backend.get(&blob_key(d)).await? else {
                    return Ok(None);
                };
                self.cache_manifest(d, &bytes);
                bytes
            }
        };
        let media_type = String::from_utf8_lossy(&mt).into_owned();
        self.remember_media_type(repo, d, &media_type);
        Ok(Some(StoredManifest {
            digest: d.clone(),
            media_type,
            bytes,
        }))
    }

    /// The manifest tag `tag` of `repo` names. A tag is only ever written after its
    /// manifest's entry and removed before it (`put_manifest`, `delete_manifest`), so a tag
    /// that exists names a manifest of the repository: when this replica has read that
    /// manifest before (its bytes, content-addressed, and its media type), the tag is the only
    /// read from storage. Any replica's delete removes the tag first, so it is seen at once.
    pub async fn get_manifest_by_tag(
        &self,
        repo: &str,
        tag: &str,
    ) -> Result<Option<StoredManifest>> {
        let Some(d) = self.resolve_tag(repo, tag).await? else {
            return Ok(None);
        };
        let known = self
            .media_types
            .lock_ok()
            .get(&(repo.to_string(), d.clone()))
            .cloned();
        if let Some(media_type) = known
            && let Some(bytes) = self.manifest_cache.lock_ok().1.get(&d).cloned()
        {
            return Ok(Some(StoredManifest {
                digest: d,
                media_type,
                bytes,
            }));
        }
        self.get_manifest(repo, &d).await
    }

    fn remember_media_type(&self, repo: &str, d: &Digest, media_type: &str) {
        const MAX: usize = 100_000;
        let mut known = self.media_types.lock_ok();
        if known.len() >= MAX {
            known.clear();
        }
        known.insert((repo.to_string(), d.clone()), media_type.to_string());
    }

    /// Keep a manifest's bytes in memory: content under its digest never changes, so only the
    /// repository's entry (and the tag) are read from storage on the next request. Checked
    /// against the digest first; the cache is emptied when it would pass its bound.
    fn cache_manifest(&self, d: &Digest, bytes: &Bytes) {
        const MAX_ONE: usize = 4 << 20;
        const MAX_ALL: usize = 64 << 20;
        if bytes.len() > MAX_ONE || Digest::of(d.algorithm(), bytes) != *d {
            return;
        }
        let mut cache = self.manifest_cache.lock_ok();
        if cache.0 + bytes.len() > MAX_ALL {
            *cache = (0, HashMap::new());
        }
        if cache.1.insert(d.clone(), bytes.clone()).is_none() {
            cache.0 += bytes.len();
        }
    }

    /// Store a validated manifest (its references already checked) and point `tags` at it.
    pub async fn put_manifest(
        &self,
        repo: &str,
        parsed: &ManifestOrIndex,
        bytes: Bytes,
        media_type: &str,
        digest: &Digest,
        tags: &[String],
    ) -> Result<()> {
        let size = bytes.len() as u64;
        let bkey = blob_key(digest);
        if self.backend.head(&bkey).await?.map(|i| i.size) != Some(size) {
            self.backend.put(&bkey, bytes).await?;
        }
        self.backend
            .put(
                &manifest_key(repo, digest),
                Bytes::from(media_type.to_string()),
            )
            .await?;
        self.remember_media_type(repo, digest, media_type);
        if let Some((subject, desc)) = referrer_descriptor(parsed, media_type, digest, size) {
            let json = serde_json::to_vec(&desc).unwrap_or_default();
            self.backend
                .put(&referrer_key(repo, &subject, digest), Bytes::from(json))
                .await?;
        }
        for tag in tags {
            self.backend
                .put(&tag_key(repo, tag), Bytes::from(digest.to_string()))
                .await?;
        }
        self.mark_repo(repo).await
    }

    pub async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        self.backend.delete(&tag_key(repo, tag)).await
    }

    /// Remove a manifest from `repo`, with the tags that point at it and its referrer entry.
    pub async fn delete_manifest(&self, repo: &str, d: &Digest) -> Result<bool> {
        let Some(m) = self.get_manifest(repo, d).await? else {
            return Ok(false);
        };
        for tag in self.tags(repo).await? {
            if self.resolve_tag(repo, &tag).await?.as_ref() == Some(d) {
                self.delete_tag(repo, &tag).await?;
            }
        }
        if let Ok(parsed) = ManifestOrIndex::from_slice(&m.bytes, Some(&m.media_type))
            && let Some(subject) = subject_of(&parsed)
        {
            self.backend
                .delete(&referrer_key(repo, &subject.digest, d))
                .await?;
        }
        self.media_types
            .lock_ok()
            .remove(&(repo.to_string(), d.clone()));
        self.backend.delete(&manifest_key(repo, d)).await
    }

    /// The repository's tags, sorted (byte order, as Go's `sort.Strings`).
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>> {
        let mut tags: Vec<String> = self
            .backend
            .list(&format!("repos/{repo}/_tags/"))
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| !k.contains('/'))
            .collect();
        tags.sort();
        Ok(tags)
    }

    /// Descriptors of the manifests in `repo` whose subject is `subject`, sorted by digest.
    pub async fn referrers(&self, repo: &str, subject: &Digest) -> Result<Vec<Descriptor>> {
        let prefix = referrers_prefix(repo, subject);
        let mut out = Vec::new();
        for o in self.backend.list(&prefix).await? {
            let key = format!("{prefix}{}", o.key);
            let Some(v) = self.backend.get(&key).await? else {
                continue; // deleted meanwhile
            };
            let desc: Descriptor = serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                what: "referrer descriptor",
                key: key.clone(),
                reason: e.to_string(),
            })?;
            // Skip entries whose manifest was deleted but whose entry survived a crash.
            if self.has_manifest(repo, &desc.digest).await? {
                out.push(desc);
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    // ---- uploads ----

    /// A new upload session, recorded in the metadata store so any replica can continue it.
    pub async fn start_upload(&self, repo: &str, algorithm: Algorithm) -> Result<Session> {
        let id = new_upload_id();
        self.meta
            .upload_create(&id, repo, algorithm.as_str())
            .await?;
        self.hashers.lock_ok().insert(
            id.clone(),
            (0, algorithm.hasher(), std::time::Instant::now()),
        );
        Ok(Session {
            id,
            repo: repo.to_string(),
            offset: 0,
            algorithm,
            parts: Vec::new(),
            local: None,
        })
    }

    /// The session `id` of `repo`, as the metadata store has it now.
    pub async fn session(&self, repo: &str, id: &str) -> Result<Option<Session>> {
        if !is_upload_id(id) {
            return Ok(None);
        }
        let Some(row) = self.meta.upload(id).await? else {
            self.hashers.lock_ok().remove(id);
            return Ok(None);
        };
        if row.repo != repo {
            return Ok(None);
        }
        let algorithm = match row.algorithm.as_str() {
            "sha512" => Algorithm::Sha512,
            _ => Algorithm::Sha256,
        };
        Ok(Some(Session {
            id: id.to_string(),
            repo: row.repo,
            offset: row.size,
            algorithm,
            parts: row.parts,
            local: None,
        }))
    }

    /// Append a request body to the upload: the body is spooled to a local file, then stored as
    /// the upload's next part and recorded only if the upload is still where this request found
    /// it. Bytes that arrived before a broken connection are kept so the client can resume from
    /// the offset (on any replica). `last`: the closing request of an upload that has no part
    /// yet, whose complete body is the whole blob, keeps it local for `finish` (no part, no
    /// copy in object storage).
    pub async fn append<S, E>(
        &self,
        s: &mut Session,
        mut body: S,
        max_total: u64,
        idle: Duration,
        last: bool,
    ) -> Result<AppendEnd>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    {
        let path = self
            .spool
            .join(format!("upload-{}-{}", s.id, util::random_hex(8)));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let mut hasher = {
            let mut map = self.hashers.lock_ok();
            match map.remove(&s.id) {
                Some((at, h, _)) if at == s.offset => Some(h),
                // Nothing received yet: nothing to have missed.
                _ if s.offset == 0 => Some(s.algorithm.hasher()),
                _ => None,
            }
        };
        let wpath = path.clone();
        // Hashing and writing run on a blocking thread so the socket keeps being read meanwhile.
        let writer = tokio::task::spawn_blocking(move || {
            let mut f = match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&wpath)
            {
                Ok(f) => f,
                Err(e) => return (None, Err(e)),
            };
            while let Some(chunk) = rx.blocking_recv() {
                if let Err(e) = f.write_all(&chunk) {
                    return (None, Err(e));
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&chunk);
                }
            }
            (hasher, Ok(()))
        });
        const BATCH: usize = 1 << 20;
        let mut buf = BytesMut::new();
        let mut total = s.offset;
        let mut end = AppendEnd::Complete;
        loop {
            let next = match tokio::time::timeout(idle, body.next()).await {
                Err(_) => {
                    end = AppendEnd::Idle;
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(_))) => {
                    end = AppendEnd::Broken;
                    break;
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            if total + next.len() as u64 > max_total {
                end = AppendEnd::TooLarge;
                break;
            }
            total += next.len() as u64;
            if buf.is_empty() && next.len() >= BATCH {
                if tx.send(next).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
                continue;
            }
            buf.extend_from_slice(&next);
            if buf.len() >= BATCH && tx.send(buf.split().freeze()).await.is_err() {
                break;
            }
        }
        if !buf.is_empty() {
            let _ = tx.send(buf.freeze()).await;
        }
        drop(tx);
        let (hasher, res) = writer.await?;
        let written = std::fs::metadata(&path).map(|m| m.len());
        let len = match (res, written) {
            (Ok(()), Ok(len)) => len,
            (Err(e), _) | (Ok(()), Err(e)) => {
                let _ = std::fs::remove_file(&path);
                return Err(e).at("write", &path);
            }
        };
        if len == 0 {
            let _ = std::fs::remove_file(&path);
            if let Some(h) = hasher {
                self.hashers
                    .lock_ok()
                    .insert(s.id.clone(), (s.offset, h, std::time::Instant::now()));
            }
            return Ok(end);
        }
        // The hash covers every byte of the upload only if nothing was lost writing.
        let hasher = hasher.filter(|_| len == total - s.offset);
        if last
            && end == AppendEnd::Complete
            && s.offset == 0
            && s.parts.is_empty()
            && let Some(h) = &hasher
        {
            s.offset = len;
            s.local = Some((path, h.clone().finish()));
            return Ok(end);
        }
        let part = format!("{:016x}-{}", s.offset, util::random_hex(4));
        let key = part_key(&s.id, &part);
        if let Err(e) = self.backend.put_file(&key, &path, len).await {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let to = s.offset + len;
        if !self.meta.upload_advance(&s.id, s.offset, to, &part).await? {
            // Lost the race (or the upload was cancelled): this part is nobody's.
            self.backend.delete(&key).await?;
            return Ok(AppendEnd::Moved);
        }
        s.offset = to;
        s.parts.push(part);
        if let Some(h) = hasher {
            self.hashers
                .lock_ok()
                .insert(s.id.clone(), (to, h, std::time::Instant::now()));
        }
        Ok(end)
    }

    /// Verify the upload against `expected` and move it into blob storage, linked to the
    /// session's repository. `Ok(Err(actual))` when the content has another digest.
    pub async fn finish(&self, s: &mut Session, expected: &Digest) -> Result<Result<u64, Digest>> {
        if let Some((path, actual)) = s.local.take() {
            // Hashed with the session's algorithm: another one is asked for, hash the file.
            let actual = if actual.algorithm() == expected.algorithm() {
                actual
            } else {
                let (p, alg) = (path.clone(), expected.algorithm());
                tokio::task::spawn_blocking(move || hash_file(&p, alg)).await??
            };
            if &actual != expected {
                let _ = std::fs::remove_file(&path);
                return Ok(Err(actual));
            }
            return self.store_verified(s, expected, Some(path)).await;
        }
        let known = {
            let map = self.hashers.lock_ok();
            map.get(&s.id)
                .filter(|(at, _, _)| *at == s.offset && s.algorithm == expected.algorithm())
                .map(|(_, h, _)| h.clone())
        };
        // Where the verified bytes are: the one part (or none) when every byte came through
        // here (its digest was hashed as it arrived), else a local file the parts were joined
        // into, hashing them.
        let joined = match (known, s.parts.len()) {
            (Some(h), n) if n <= 1 => {
                let actual = h.finish();
                if &actual != expected {
                    return Ok(Err(actual));
                }
                None
            }
            _ => {
                let path = self
                    .spool
                    .join(format!("join-{}-{}", s.id, util::random_hex(8)));
                let actual = self.join_parts(s, &path, expected.algorithm()).await;
                match actual {
                    Ok(d) if &d == expected => Some(path),
                    other => {
                        let _ = std::fs::remove_file(&path);
                        return other.map(Err);
                    }
                }
            }
        };
        self.store_verified(s, expected, joined).await
    }

    /// Put the verified upload (the local file `joined`, else its one part or none) into
    /// place, link it to the session's repository and forget the session.
    async fn store_verified(
        &self,
        s: &mut Session,
        expected: &Digest,
        joined: Option<PathBuf>,
    ) -> Result<Result<u64, Digest>> {
        let size = s.offset;
        let bkey = blob_key(expected);
        let used = match self.meta.protect(std::slice::from_ref(expected)).await {
            Ok(u) => u,
            Err(e) => {
                if let Some(path) = &joined {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        let stored = self.store_upload(s, &bkey, joined.as_deref()).await;
        if let Some(path) = &joined {
            let _ = std::fs::remove_file(path);
        }
        let linked = match stored {
            Ok(()) => self.link_blob(&s.repo, expected).await,
            Err(e) => Err(e),
        };
        self.meta.done(used).await?;
        linked?;
        self.discard(s).await?;
        Ok(Ok(size))
    }

    /// Put the upload's verified bytes at `bkey` unless an equal blob is there (a concurrent
    /// push of the same blob may have landed first; same digest, same bytes).
    async fn store_upload(&self, s: &Session, bkey: &str, joined: Option<&Path>) -> Result<()> {
        let size = s.offset;
        if self.backend.head(bkey).await?.map(|i| i.size) == Some(size) {
            return Ok(());
        }
        match (joined, s.parts.first()) {
            (Some(path), _) => self.backend.put_file(bkey, path, size).await,
            (None, None) => self.backend.put(bkey, Bytes::new()).await,
            (None, Some(p)) => {
                let moved = self.backend.rename(&part_key(&s.id, p), bkey).await;
                // A concurrent closing PUT of this session may have moved it first.
                if moved.is_err() && self.backend.head(bkey).await?.map(|i| i.size) == Some(size) {
                    return Ok(());
                }
                moved
            }
        }
    }

    /// Copy the session's parts, in order, into the new file `path`; their digest.
    async fn join_parts(&self, s: &Session, path: &Path, alg: Algorithm) -> Result<Digest> {
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .at("create", path)?;
        let mut h = alg.hasher();
        let mut total = 0u64;
        for p in &s.parts {
            let key = part_key(&s.id, p);
            let Some(info) = self.backend.head(&key).await? else {
                return Err(Error::Corrupt {
                    what: "upload part",
                    key,
                    reason: "missing".to_string(),
                });
            };
            let mut stream = self.backend.get_range(&key, 0..info.size).await?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.at("read", &key)?;
                h.update(&chunk);
                total += chunk.len() as u64;
                file.write_all(&chunk).await.at("write", path)?;
            }
        }
        if total != s.offset {
            return Err(Error::Corrupt {
                what: "upload",
                key: format!("_uploads/{}", s.id),
                reason: format!("parts hold {total} bytes, the session {}", s.offset),
            });
        }
        file.flush().await.at("write", path)?;
        Ok(h.finish())
    }

    /// Forget the session and delete its parts.
    pub async fn discard(&self, s: &Session) -> Result<()> {
        self.hashers.lock_ok().remove(&s.id);
        if let Some((path, _)) = &s.local {
            let _ = std::fs::remove_file(path);
        }
        let parts = self.meta.upload_delete(&s.id).await?.unwrap_or_default();
        for p in parts {
            self.backend.delete(&part_key(&s.id, &p)).await?;
        }
        Ok(())
    }

    /// Remove uploads untouched for longer than `max_age`; returns their ids.
    pub async fn clean_uploads(&self, max_age: Duration, dry_run: bool) -> Result<Vec<String>> {
        if !dry_run {
            // Hashes of uploads another replica finished, cancelled or cleaned up.
            self.hashers
                .lock_ok()
                .retain(|_, (_, _, touched)| touched.elapsed() <= max_age);
        }
        let stale = self.meta.uploads_stale(max_age).await?;
        let mut ids = Vec::with_capacity(stale.len());
        for (id, _) in stale {
            if !dry_run {
                self.hashers.lock_ok().remove(&id);
                // Parts as recorded when deleted: a request that appended meanwhile is covered.
                if let Some(parts) = self.meta.upload_delete(&id).await? {
                    for p in parts {
                        self.backend.delete(&part_key(&id, &p)).await?;
                    }
                }
            }
            ids.push(id);
        }
        Ok(ids)
    }
}

fn hash_file(path: &Path, alg: Algorithm) -> Result<Digest> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).at("open", path)?;
    let mut h = alg.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at("read", path)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

pub(crate) fn subject_of(m: &ManifestOrIndex) -> Option<&Descriptor> {
    match m {
        ManifestOrIndex::Manifest(m) => m.subject.as_ref(),
        ManifestOrIndex::Index(i) => i.subject.as_ref(),
    }
}

/// The descriptor the referrers API lists for a manifest with a subject (spec: artifactType from
/// the manifest, else the config's media type for an image manifest; annotations copied).
fn referrer_descriptor(
    m: &ManifestOrIndex,
    media_type: &str,
    digest: &Digest,
    size: u64,
) -> Option<(Digest, Descriptor)> {
    let subject = subject_of(m)?.digest.clone();
    let mut d = Descriptor::new(media_type, digest.clone(), size);
    match m {
        ManifestOrIndex::Manifest(m) => {
            d.artifact_type = m
                .artifact_type
                .clone()
                .filter(|a| !a.is_empty())
                .or_else(|| Some(m.config.media_type.clone()));
            d.annotations = m.annotations.clone();
        }
        ManifestOrIndex::Index(i) => {
            d.artifact_type = i.artifact_type.clone().filter(|a| !a.is_empty());
            d.annotations = i.annotations.clone();
        }
    }
    Some((subject, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_keys_round_trip() {
        let d = Digest::sha256(b"x");
        let s = Digest::sha256(b"s");
        for k in [
            RepoKey::Link("org/a/b".into(), d.clone()),
            RepoKey::Manifest("org/a".into(), d.clone()),
            RepoKey::Tag("org/a".into(), "v1.0".into()),
            RepoKey::Referrer("org/a".into(), s.clone(), d.clone()),
        ] {
            let key = k.key();
            let rel = key.strip_prefix("repos/").unwrap();
            assert_eq!(RepoKey::parse(rel), Some(k), "{key}");
        }
    }

    #[test]
    fn upload_ids_are_checked() {
        assert!(is_upload_id(&new_upload_id()));
        assert!(!is_upload_id("../../../../etc/passwd"));
        assert!(!is_upload_id("0123456789abcdef0123456789abcdef0123"));
    }
}
