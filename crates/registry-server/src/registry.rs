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
//! Uploads always live under `<root>/uploads/<id>/` (`data` and `info.json`), also when blobs go
//! to S3: a chunked upload spans requests and its bytes are hashed as they arrive.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use strata_oci::sync::MutexExt;
use strata_oci::{Algorithm, Descriptor, Digest, Hasher, ManifestOrIndex};

use crate::error::{Error, IoContext, Result};
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

#[derive(Serialize, Deserialize)]
struct UploadInfo {
    repo: String,
    algorithm: String,
    created: u64,
}

/// An upload in progress.
pub(crate) struct Session {
    pub id: String,
    pub repo: String,
    dir: PathBuf,
    /// Bytes received so far (the size of `data`).
    pub offset: u64,
    /// Hash of `data` so far; `None` after a restart or a failed write (then recomputed at the
    /// end from the file).
    hasher: Option<Hasher>,
    algorithm: Algorithm,
}

impl Session {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
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
}

pub(crate) type SessionRef = Arc<tokio::sync::Mutex<Session>>;

pub(crate) struct Registry {
    pub backend: Arc<dyn Backend>,
    uploads: PathBuf,
    /// id → (repository, session)
    sessions: Mutex<HashMap<String, (String, SessionRef)>>,
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
    pub fn new(backend: Arc<dyn Backend>, root: &Path) -> Result<Registry> {
        let uploads = root.join("uploads");
        std::fs::create_dir_all(&uploads).at("create", &uploads)?;
        Ok(Registry {
            backend,
            uploads,
            sessions: Mutex::new(HashMap::new()),
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
        let Some(bytes) = self.backend.get(&blob_key(d)).await? else {
            return Ok(None);
        };
        Ok(Some(StoredManifest {
            digest: d.clone(),
            media_type: String::from_utf8_lossy(&mt).into_owned(),
            bytes,
        }))
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

    pub fn start_upload(&self, repo: &str, algorithm: Algorithm) -> Result<SessionRef> {
        let id = new_upload_id();
        let dir = self.uploads.join(&id);
        std::fs::create_dir(&dir).at("create", &dir)?;
        std::fs::File::create(dir.join("data")).at("create", dir.join("data"))?;
        let info = UploadInfo {
            repo: repo.to_string(),
            algorithm: algorithm.as_str().to_string(),
            created: util::unix_now(),
        };
        let info_path = dir.join("info.json");
        std::fs::write(&info_path, serde_json::to_vec(&info).unwrap_or_default())
            .at("write", &info_path)?;
        let s = Arc::new(tokio::sync::Mutex::new(Session {
            id: id.clone(),
            repo: repo.to_string(),
            dir,
            offset: 0,
            hasher: Some(algorithm.hasher()),
            algorithm,
        }));
        self.sessions_map()
            .insert(id, (repo.to_string(), s.clone()));
        Ok(s)
    }

    fn sessions_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, SessionRef)>> {
        self.sessions.lock_ok()
    }

    /// The session `id` of `repo`, from memory or (after a restart) from disk.
    pub fn session(&self, repo: &str, id: &str) -> Result<Option<SessionRef>> {
        if !is_upload_id(id) {
            return Ok(None);
        }
        let dir = self.uploads.join(id);
        let known = self.sessions_map().get(id).cloned();
        if let Some((r, s)) = known {
            // Another process (gc, the cleaner of another server) may have removed it.
            if dir.join("info.json").exists() {
                return Ok((r == repo).then_some(s));
            }
            self.sessions_map().remove(id);
            return Ok(None);
        }
        let info_path = dir.join("info.json");
        let info: UploadInfo = match std::fs::read(&info_path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(i) => i,
                Err(_) => return Ok(None),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at("read", &info_path),
        };
        if info.repo != repo {
            return Ok(None);
        }
        let algorithm = match info.algorithm.as_str() {
            "sha512" => Algorithm::Sha512,
            _ => Algorithm::Sha256,
        };
        let data = dir.join("data");
        let offset = match std::fs::metadata(&data) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at("stat", &data),
        };
        let s = Arc::new(tokio::sync::Mutex::new(Session {
            id: id.to_string(),
            repo: info.repo.clone(),
            dir,
            offset,
            hasher: None,
            algorithm,
        }));
        // Another request may have loaded it meanwhile: keep one.
        let mut map = self.sessions_map();
        Ok(Some(
            map.entry(id.to_string())
                .or_insert((info.repo, s))
                .1
                .clone(),
        ))
    }

    /// Append a request body to the upload. Bytes that arrived before a broken connection are
    /// kept so the client can resume from the offset.
    pub async fn append<S, E>(
        &self,
        s: &mut Session,
        mut body: S,
        max_total: u64,
        idle: Duration,
    ) -> Result<AppendEnd>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    {
        let path = s.data();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let mut hasher = s.hasher.take();
        let wpath = path.clone();
        // Hashing and writing run on a blocking thread so the socket keeps being read meanwhile.
        let writer = tokio::task::spawn_blocking(move || {
            let mut f = match std::fs::OpenOptions::new().append(true).open(&wpath) {
                Ok(f) => f,
                Err(e) => return (hasher, Err(e)),
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
        // The file is the truth: after a failed write the hash state cannot be trusted.
        let len = std::fs::metadata(&path).at("stat", &path)?.len();
        s.hasher = if res.is_ok() && len == total {
            hasher
        } else {
            None
        };
        s.offset = len;
        res.at("write", &path)?;
        Ok(end)
    }

    /// Verify the upload against `expected` and move it into blob storage, linked to the
    /// session's repository. `Ok(Err(actual))` when the content has another digest.
    pub async fn finish(&self, s: &mut Session, expected: &Digest) -> Result<Result<u64, Digest>> {
        let path = s.data();
        let actual = match s.hasher.clone() {
            Some(h) if s.algorithm == expected.algorithm() => h.finish(),
            _ => {
                let alg = expected.algorithm();
                let p = path.clone();
                tokio::task::spawn_blocking(move || hash_file(&p, alg)).await??
            }
        };
        if &actual != expected {
            return Ok(Err(actual));
        }
        let size = s.offset;
        let bkey = blob_key(expected);
        // A concurrent push of the same blob may have landed first; same digest, same bytes.
        if self.backend.head(&bkey).await?.map(|i| i.size) != Some(size) {
            self.backend.put_file(&bkey, &path, size).await?;
        }
        self.link_blob(&s.repo, expected).await?;
        self.discard(s).await;
        Ok(Ok(size))
    }

    /// Forget the session and delete its files.
    pub async fn discard(&self, s: &Session) {
        self.sessions_map().remove(&s.id);
        let dir = s.dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }

    /// Remove uploads created longer than `max_age` ago; returns their ids.
    pub async fn clean_uploads(&self, max_age: Duration, dry_run: bool) -> Result<Vec<String>> {
        let uploads = self.uploads.clone();
        let stale: Vec<String> = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let mut out = Vec::new();
            let now = SystemTime::now();
            for entry in std::fs::read_dir(&uploads).at("list", &uploads)? {
                let entry = entry.at("list", &uploads)?;
                let Ok(id) = entry.file_name().into_string() else {
                    continue;
                };
                let info = entry.path().join("info.json");
                let created = std::fs::read(&info)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<UploadInfo>(&b).ok())
                    .map(|i| SystemTime::UNIX_EPOCH + Duration::from_secs(i.created))
                    .or_else(|| entry.metadata().ok()?.modified().ok());
                // The last write counts too: a slow chunked upload that is still moving is alive.
                let touched = std::fs::metadata(entry.path().join("data"))
                    .ok()
                    .and_then(|m| m.modified().ok());
                let last = match (created, touched) {
                    (Some(a), Some(b)) => a.max(b),
                    (a, b) => a.or(b).unwrap_or(SystemTime::UNIX_EPOCH),
                };
                if now.duration_since(last).unwrap_or(Duration::ZERO) > max_age {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await??;
        if !dry_run {
            for id in &stale {
                self.sessions_map().remove(id);
                let dir = self.uploads.join(id);
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            }
        }
        Ok(stale)
    }
}

fn hash_file(path: &Path, alg: Algorithm) -> Result<Digest> {
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
