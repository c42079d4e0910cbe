//! Storage backends: a flat key space of objects, on a local filesystem or in S3.
//!
//! The registry keeps everything (blobs, links, manifests, tags) as objects under `/`-separated
//! keys that it composes itself from validated names, tags and digests; backends still refuse a
//! key with an empty, `.` or `..` component so that no key can leave the storage root.

use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};

use crate::error::{Error, IoContext, Result};

/// One stored object, as a listing shows it.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// The key (relative to the listed prefix in a listing).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last write.
    pub modified: SystemTime,
}

/// A stream of an object's bytes.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// Where the registry keeps its objects. Writes are atomic: a reader sees the old object, the new
/// one, or none, never a partial one.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Store `value` under `key`, replacing what is there.
    async fn put(&self, key: &str, value: Bytes) -> Result<()>;
    /// Move the finished local file `path` to `key` (the file is consumed).
    async fn put_file(&self, key: &str, path: &Path, size: u64) -> Result<()>;
    /// The whole object, or `None` when absent.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;
    /// `range` of the object as a stream; the range is within the object's size.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream>;
    /// Size and time of the object, or `None` when absent.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// Move the object at `from` to `to`, replacing what is there (S3: a server-side copy,
    /// then a delete).
    async fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// Remove the object; `false` when there was none.
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Every object whose key starts with `prefix` (which ends with `/`), at any depth.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// The local file holding the object at `key`, when this backend keeps objects as files
    /// (the HTTP layer then sends it with `sendfile`); `None` by default.
    fn local_file(&self, key: &str) -> Option<PathBuf> {
        let _ = key;
        None
    }
}

fn check_key(key: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::BadKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() || key.starts_with('/') {
        return bad("must be relative and non-empty");
    }
    for part in key.trim_end_matches('/').split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("has an empty, `.` or `..` component");
        }
        if part.bytes().any(|b| b == 0 || b == b'\\') {
            return bad("has a NUL or backslash");
        }
    }
    Ok(())
}

/// Objects as files under a directory; writes go through `<root>/tmp` (same filesystem), are
/// fsynced and renamed into place, and the directory is fsynced.
pub struct FsBackend {
    root: PathBuf,
    tmp: PathBuf,
    counter: AtomicU64,
}

impl FsBackend {
    /// A backend rooted at `root` (created if missing). Temporary files older than an hour,
    /// left by a crash mid-write, are removed.
    pub fn open(root: &Path) -> Result<FsBackend> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).at("create", &tmp)?;
        remove_stale_temp_files(&tmp);
        Ok(FsBackend {
            root: root.to_path_buf(),
            tmp,
            counter: AtomicU64::new(0),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!(
            "put-{}-{n}-{}",
            std::process::id(),
            crate::util::random_hex(8)
        ))
    }
}

/// Remove files older than an hour from `dir`: temporary files left by a crash mid-write.
pub(crate) fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let hour = std::time::Duration::from_secs(3600);
    for e in entries.flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > hour);
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Rename `from` to `to`, creating `to`'s parent, then fsync the parent so the rename is durable.
fn rename_durably(from: &Path, to: &Path) -> Result<()> {
    let parent = to.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).at("create", parent)?;
    std::fs::rename(from, to).at("rename into place", to)?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .at("fsync", parent)?;
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

fn info_of(key: String, meta: &std::fs::Metadata) -> ObjectInfo {
    ObjectInfo {
        key,
        size: meta.len(),
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

#[async_trait]
impl Backend for FsBackend {
    fn local_file(&self, key: &str) -> Option<PathBuf> {
        self.path(key).ok()
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<()> {
        let dest = self.path(key)?;
        let tmp = self.tmp_path();
        blocking(move || {
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&value)?;
                f.sync_all()
            };
            if let Err(e) = write() {
                let _ = std::fs::remove_file(&tmp);
                return Err(e).at("write", &tmp);
            }
            rename_durably(&tmp, &dest).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
        })
        .await
    }

    async fn put_file(&self, key: &str, path: &Path, _size: u64) -> Result<()> {
        let dest = self.path(key)?;
        let src = path.to_path_buf();
        blocking(move || {
            std::fs::File::open(&src)
                .and_then(|f| f.sync_all())
                .at("fsync", &src)?;
            rename_durably(&src, &dest)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        blocking(move || match std::fs::read(&path) {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(e).at("read", &path),
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream> {
        let path = self.path(key)?;
        let mut file = std::fs::File::open(&path).at("open", &path)?;
        file.seek(SeekFrom::Start(range.start)).at("seek", &path)?;
        // One bounded read per chunk the response asks for, on the blocking pool only while it
        // reads: a client that stops reading holds no thread and at most one chunk (the one the
        // HTTP layer is sending), however large the blob.
        struct St {
            file: Option<std::fs::File>,
            left: u64,
        }
        let st = St {
            file: Some(file),
            left: range.end.saturating_sub(range.start),
        };
        let stream = futures_util::stream::try_unfold(st, |mut st| async move {
            if st.left == 0 {
                return Ok(None);
            }
            let Some(mut file) = st.file.take() else {
                return Ok(None);
            };
            let want = st.left.min(READ_CHUNK);
            let (file, buf) = tokio::task::spawn_blocking(move || {
                // `read_to_end` reads into the spare capacity: the chunk is not zeroed first
                // (a memset of every byte served, on the download path).
                let mut buf = Vec::with_capacity(want as usize);
                let r = (&mut file).take(want).read_to_end(&mut buf);
                r.map(|_| (file, buf))
            })
            .await
            .map_err(std::io::Error::other)??;
            if buf.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob shorter than its recorded size",
                ));
            }
            st.left -= buf.len() as u64;
            st.file = Some(file);
            Ok(Some((Bytes::from(buf), st)))
        });
        Ok(stream.boxed())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(info_of(key, &m))),
            Ok(_) => Ok(None),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(e).at("stat", &path),
        })
        .await
    }

    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (src, dest) = (self.path(from)?, self.path(to)?);
        let root = self.root.clone();
        blocking(move || {
            rename_durably(&src, &dest)?;
            remove_empty_parents(&src, &root);
            Ok(())
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        let root = self.root.clone();
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => {
                remove_empty_parents(&path, &root);
                Ok(true)
            }
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => Err(e).at("remove", &path),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let dir = self.path(prefix)?;
        blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![(dir, String::new())];
            while let Some((d, rel)) = stack.pop() {
                let entries = match std::fs::read_dir(&d) {
                    Ok(e) => e,
                    Err(e) if is_absent(&e) => continue,
                    Err(e) => return Err(e).at("list", &d),
                };
                for entry in entries {
                    let entry = entry.at("list", &d)?;
                    let Ok(name) = entry.file_name().into_string() else {
                        continue; // not a key we wrote
                    };
                    let key = if rel.is_empty() {
                        name
                    } else {
                        format!("{rel}/{name}")
                    };
                    let meta = entry.metadata().at("stat", entry.path())?;
                    if meta.is_dir() {
                        stack.push((entry.path(), key));
                    } else if meta.is_file() {
                        out.push(info_of(key, &meta));
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Empty directories left behind by a removed file are removed so listings stay cheap; failure
/// just means something else lives there.
fn remove_empty_parents(path: &Path, root: &Path) {
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == root || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// The most a blob download reads (and holds) at a time; see [`FsBackend::get_range`].
pub(crate) const READ_CHUNK: u64 = 128 << 10;

/// How to reach an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// The bucket (it must exist).
    pub bucket: String,
    /// e.g. `http://127.0.0.1:9000`; `None` for AWS itself.
    pub endpoint: Option<String>,
    /// e.g. `us-east-1`.
    pub region: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
    /// Allow a plain-HTTP endpoint (local MinIO, moto, s3s-fs).
    pub allow_http: bool,
}

/// Objects in an S3 bucket through `object_store`; large files go up as multipart uploads.
pub struct S3Backend {
    store: Arc<dyn object_store::ObjectStore>,
}

impl S3Backend {
    /// A client for the bucket; nothing is contacted until the first request.
    pub fn open(cfg: &S3Config) -> Result<S3Backend> {
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key)
            .with_secret_access_key(&cfg.secret_key)
            .with_allow_http(cfg.allow_http);
        if let Some(ep) = &cfg.endpoint {
            // Path-style requests: local S3 servers rarely resolve bucket subdomains.
            b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
        }
        let store = b.build().map_err(|source| Error::S3Config {
            bucket: cfg.bucket.clone(),
            source,
        })?;
        Ok(S3Backend {
            store: Arc::new(store),
        })
    }

    fn path(key: &str) -> Result<object_store::path::Path> {
        check_key(key)?;
        object_store::path::Path::parse(key).map_err(|_| Error::BadKey {
            key: key.to_string(),
            reason: "not a valid object key",
        })
    }
}

fn os_err(op: &'static str, key: &str) -> impl FnOnce(object_store::Error) -> Error {
    let key = key.to_string();
    move |source| Error::ObjectStore { op, key, source }
}

#[async_trait]
impl Backend for S3Backend {
    async fn put(&self, key: &str, value: Bytes) -> Result<()> {
        let p = Self::path(key)?;
        self.store
            .put(&p, value.into())
            .await
            .map_err(os_err("put", key))?;
        Ok(())
    }

    async fn put_file(&self, key: &str, path: &Path, size: u64) -> Result<()> {
        let p = Self::path(key)?;
        const PART: usize = 16 << 20;
        if size <= PART as u64 {
            let bytes = tokio::fs::read(path).await.at("read", path)?;
            self.put(key, Bytes::from(bytes)).await?;
        } else {
            let upload = self
                .store
                .put_multipart(&p)
                .await
                .map_err(os_err("start multipart upload", key))?;
            let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
            let mut file = tokio::fs::File::open(path).await.at("open", path)?;
            let mut buf = vec![0u8; PART];
            loop {
                use tokio::io::AsyncReadExt;
                let n = file.read(&mut buf).await.at("read", path)?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(os_err("upload part", key))?;
                writer.write(&buf[..n]);
            }
            writer
                .finish()
                .await
                .map_err(os_err("finish upload", key))?;
        }
        tokio::fs::remove_file(path).await.at("remove", path)?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let p = Self::path(key)?;
        match self.store.get(&p).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(os_err("read", key))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err("get", key)(e)),
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream> {
        let p = Self::path(key)?;
        if range.is_empty() {
            return Ok(futures_util::stream::empty().boxed());
        }
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(range)),
            ..Default::default()
        };
        let r = self
            .store
            .get_opts(&p, opts)
            .await
            .map_err(os_err("get", key))?;
        Ok(r.into_stream()
            .map(|r| r.map_err(std::io::Error::other))
            .boxed())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let p = Self::path(key)?;
        match self.store.head(&p).await {
            Ok(m) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: m.size,
                modified: m.last_modified.into(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err("head", key)(e)),
        }
    }

    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (src, dest) = (Self::path(from)?, Self::path(to)?);
        self.store
            .rename(&src, &dest)
            .await
            .map_err(os_err("rename", from))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let p = Self::path(key)?;
        // S3 DELETE succeeds on absent keys; a HEAD first tells the caller whether it existed.
        let existed = self.head(key).await?.is_some();
        match self.store.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(existed),
            Err(e) => Err(os_err("delete", key)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let p = Self::path(prefix.trim_end_matches('/'))?;
        let base = format!("{}/", p.as_ref());
        let mut stream = self.store.list(Some(&p));
        let mut out = Vec::new();
        while let Some(m) = stream.next().await {
            let m = m.map_err(os_err("list", prefix))?;
            let full = m.location.as_ref();
            let Some(rel) = full.strip_prefix(&base) else {
                continue;
            };
            out.push(ObjectInfo {
                key: rel.to_string(),
                size: m.size,
                modified: m.last_modified.into(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for k in ["", "/etc/passwd", "a/../b", "a//b", "./a", "a/.", "a\\b"] {
            assert!(check_key(k).is_err(), "{k}");
        }
        for k in ["blobs/sha256/ab", "repos/org/app/_tags/v1", "catalog/"] {
            assert!(check_key(k).is_ok(), "{k}");
        }
    }
}
