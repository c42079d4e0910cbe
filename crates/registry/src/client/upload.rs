//! Blob uploads: sessions, cross-repository mounts, monolithic and chunked `PUT`s, resume.

use super::*;

/// The content of a blob to upload.
#[derive(Debug, Clone)]
pub enum BlobData {
    /// In memory.
    Bytes(bytes::Bytes),
    /// A file, read from the offset the upload needs (so an upload can resume).
    File(std::path::PathBuf),
}

/// An upload session the registry opened (`POST /v2/<name>/blobs/uploads/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSession {
    /// Absolute URL of the session (the registry's latest `Location`).
    pub location: String,
    /// Bytes the registry has acknowledged.
    pub offset: u64,
    /// The registry's `OCI-Chunk-Min-Length`: it wants chunks at least this large.
    pub chunk_min: Option<u64>,
}

/// What a cross-repository mount request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// The blob is now in the target repository (201).
    Mounted,
    /// The registry declined and opened an upload session instead (202).
    Upload(UploadSession),
}

/// What [`Client::push_blob`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had it.
    Exists,
    /// Mounted from another repository.
    Mounted { from: String },
    /// Uploaded; `bytes_sent` counts what went over the wire (more than the size if a broken
    /// upload had to resend).
    Uploaded { bytes_sent: u64, resumed: u32 },
}

/// Parse an upload `Range` header (`0-1023`, or `bytes=0-1023`) into the number of bytes the
/// registry has. `0-0` is ambiguous in docker distribution (empty or one byte); it is read as
/// empty so that at worst a byte is resent, which the registry then refuses and we restart.
pub(super) fn parse_upload_range(v: &str) -> Option<u64> {
    let v = v.trim().trim_start_matches("bytes=");
    let (start, end) = v.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if start != 0 || end == 0 {
        return Some(0);
    }
    Some(end + 1)
}

impl Client {
    /// `POST /v2/<repo>/blobs/uploads/`: open an upload session.
    pub async fn start_upload(&self, repo: &str) -> Result<UploadSession> {
        let what = format!("start upload to {repo}");
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        let resp = self
            .send(&what, &[push_scope(repo)], true, || {
                self.http.post(&url).header(header::CONTENT_LENGTH, "0")
            })
            .await?;
        if resp.status().as_u16() != 202 {
            return Err(self.error_for(resp, &what).await);
        }
        self.session_from(resp.headers(), &what, 0)
    }

    fn session_from(&self, headers: &HeaderMap, what: &str, offset: u64) -> Result<UploadSession> {
        let loc = header_str(headers, "location")
            .ok_or_else(|| self.protocol(what, "202 without a Location header"))?;
        Ok(UploadSession {
            location: self.resolve_location(loc),
            offset: header_str(headers, "range")
                .and_then(parse_upload_range)
                .unwrap_or(offset),
            chunk_min: header_str(headers, "oci-chunk-min-length").and_then(|v| v.parse().ok()),
        })
    }

    /// Ask the registry to mount `digest` from repository `from` into `repo`.
    pub async fn mount_blob(&self, repo: &str, digest: &Digest, from: &str) -> Result<Mount> {
        let what = format!("mount {digest} from {from} into {repo}");
        let url = self.url(&format!(
            "/v2/{repo}/blobs/uploads/?mount={}&from={}",
            encode_query(&digest.to_string()),
            encode_query(from)
        ));
        let scopes = [push_scope(repo), pull_scope(from)];
        let resp = self
            .send(&what, &scopes, true, || {
                self.http.post(&url).header(header::CONTENT_LENGTH, "0")
            })
            .await?;
        match resp.status().as_u16() {
            201 => Ok(Mount::Mounted),
            202 => Ok(Mount::Upload(self.session_from(
                resp.headers(),
                &what,
                0,
            )?)),
            _ => Err(self.error_for(resp, &what).await),
        }
    }

    /// Where an upload session stands (`GET <location>`): the registry's offset and location.
    pub async fn upload_status(
        &self,
        repo: &str,
        session: &UploadSession,
    ) -> Result<UploadSession> {
        let what = format!("upload status in {repo}");
        let resp = self
            .send(&what, &[push_scope(repo)], true, || {
                self.http.get(&session.location)
            })
            .await?;
        if resp.status().as_u16() != 204 {
            return Err(self.error_for(resp, &what).await);
        }
        let mut s = self.session_from(resp.headers(), &what, 0)?;
        if header_str(resp.headers(), "range").is_none() {
            s.offset = 0;
        }
        s.chunk_min = s.chunk_min.or(session.chunk_min);
        Ok(s)
    }

    /// Cancel an upload session (best effort: errors are ignored).
    pub async fn cancel_upload(&self, repo: &str, session: &UploadSession) {
        let what = format!("cancel upload in {repo}");
        let _ = self
            .send(&what, &[push_scope(repo)], false, || {
                self.http.delete(&session.location)
            })
            .await;
    }

    /// Push one blob: nothing if `repo` has it, else a mount from the first of `mount_from`
    /// that the registry accepts, else an upload (into the session a refused mount opened).
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        data: &BlobData,
        mount_from: &[String],
        progress: Option<&Arc<Progress>>,
    ) -> Result<BlobPush> {
        if self.head_blob(repo, digest).await?.is_some() {
            if let Some(p) = progress {
                p(size);
            }
            return Ok(BlobPush::Exists);
        }
        let mut session = None;
        for from in mount_from.iter().filter(|f| f.as_str() != repo) {
            match self.mount_blob(repo, digest, from).await {
                Ok(Mount::Mounted) => {
                    if let Some(p) = progress {
                        p(size);
                    }
                    return Ok(BlobPush::Mounted { from: from.clone() });
                }
                Ok(Mount::Upload(s)) => {
                    if let Some(old) = session.replace(s) {
                        self.cancel_upload(repo, &old).await;
                    }
                }
                // A refused mount (no access to `from`...) is not fatal: upload instead.
                Err(Error::Denied { .. } | Error::NotFound { .. } | Error::Unauthorized { .. }) => {
                }
                Err(e) => return Err(e),
            }
        }
        let (bytes_sent, resumed) = self
            .upload_blob(repo, digest, size, data, session, progress)
            .await?;
        Ok(BlobPush::Uploaded {
            bytes_sent,
            resumed,
        })
    }

    /// Upload a blob: monolithic (`PUT` with the content) unless the registry wants chunks or
    /// the blob is larger than [`ClientOptions::chunk_threshold`]. A broken upload asks the
    /// registry for its offset and goes on from there; if the session is gone it starts over.
    /// Returns the bytes sent and how many times it resumed.
    pub async fn upload_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        data: &BlobData,
        session: Option<UploadSession>,
        progress: Option<&Arc<Progress>>,
    ) -> Result<(u64, u32)> {
        let mut session = match session {
            Some(s) => s,
            None => self.start_upload(repo).await?,
        };
        let sent = Arc::new(AtomicU64::new(0));
        let mut failures = 0u32;
        loop {
            match self
                .upload_from(repo, digest, size, data, &mut session, &sent, progress)
                .await
            {
                Ok(()) => return Ok((sent.load(Ordering::Relaxed), failures)),
                Err(e) if is_transient(&e) && failures + 1 < self.opts.max_attempts.max(1) => {
                    failures += 1;
                    tokio::time::sleep(self.backoff(failures, None)).await;
                    session = match self.upload_status(repo, &session).await {
                        Ok(s) if s.offset <= size => s,
                        // The session is gone or confused (docker distribution cannot resume
                        // after a broken request): start a new one.
                        _ => self.start_upload(repo).await?,
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_from(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        data: &BlobData,
        session: &mut UploadSession,
        sent: &Arc<AtomicU64>,
        progress: Option<&Arc<Progress>>,
    ) -> Result<()> {
        let what = format!("upload {digest} to {repo}");
        let chunked = session.chunk_min.is_some() || size > self.opts.chunk_threshold;
        if let Some(p) = progress {
            p(session.offset);
        }
        if !chunked && session.offset == 0 {
            // Monolithic: one PUT with everything.
            return self
                .put_upload(repo, digest, session, data, 0, size, sent, progress)
                .await;
        }
        let chunk = if chunked {
            self.opts
                .chunk_size
                .max(session.chunk_min.unwrap_or(0))
                .max(1)
        } else {
            u64::MAX
        };
        while session.offset < size {
            let start = session.offset;
            let end = start.saturating_add(chunk).min(size);
            let body = self.body(data, start, end, sent, progress);
            let url = session.location.clone();
            let resp = self
                .send_with(
                    &what,
                    &[push_scope(repo)],
                    false,
                    Some(sent.as_ref()),
                    || {
                        self.http
                            .patch(&url)
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header("Content-Range", format!("{start}-{}", end - 1))
                            .header(header::CONTENT_LENGTH, end - start)
                            .body(body())
                    },
                )
                .await?;
            if resp.status().as_u16() != 202 {
                return Err(self.error_for(resp, &what).await);
            }
            let next = self.session_from(resp.headers(), &what, end)?;
            if next.offset <= start {
                return Err(self.protocol(
                    &what,
                    format!(
                        "the registry acknowledged {} bytes after a chunk ending at {end}",
                        next.offset
                    ),
                ));
            }
            session.location = next.location;
            session.offset = next.offset;
        }
        self.put_upload(repo, digest, session, data, size, size, sent, progress)
            .await
    }

    /// The closing `PUT ?digest=`, carrying `data[start..end]` (empty after chunks).
    #[allow(clippy::too_many_arguments)]
    async fn put_upload(
        &self,
        repo: &str,
        digest: &Digest,
        session: &UploadSession,
        data: &BlobData,
        start: u64,
        end: u64,
        sent: &Arc<AtomicU64>,
        progress: Option<&Arc<Progress>>,
    ) -> Result<()> {
        let what = format!("upload {digest} to {repo}");
        let sep = if session.location.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}{sep}digest={}",
            session.location,
            encode_query(&digest.to_string())
        );
        let body = self.body(data, start, end, sent, progress);
        let resp = self
            .send_with(
                &what,
                &[push_scope(repo)],
                false,
                Some(sent.as_ref()),
                || {
                    self.http
                        .put(&url)
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header(header::CONTENT_LENGTH, end - start)
                        .body(body())
                },
            )
            .await?;
        if resp.status().as_u16() != 201 {
            return Err(self.error_for(resp, &what).await);
        }
        if let Some(d) = header_str(resp.headers(), "docker-content-digest")
            && let Ok(got) = d.parse::<Digest>()
            && got != *digest
        {
            return Err(Error::DigestMismatch {
                what: format!("{}/{repo}: uploaded blob", self.registry),
                expected: digest.clone(),
                actual: got,
            });
        }
        Ok(())
    }

    /// A factory of request bodies for `data[start..end]` that count what they send and report
    /// the position reached to `progress`.
    fn body(
        &self,
        data: &BlobData,
        start: u64,
        end: u64,
        sent: &Arc<AtomicU64>,
        progress: Option<&Arc<Progress>>,
    ) -> impl Fn() -> reqwest::Body + use<> {
        let data = data.clone();
        let sent = Arc::clone(sent);
        let progress = progress.cloned();
        move || {
            stream_body(
                data.clone(),
                start,
                end,
                Arc::clone(&sent),
                progress.clone(),
            )
        }
    }
}

fn stream_body(
    data: BlobData,
    start: u64,
    end: u64,
    counter: Arc<AtomicU64>,
    progress: Option<Arc<Progress>>,
) -> reqwest::Body {
    const CHUNK: u64 = 256 * 1024;
    if start >= end {
        return reqwest::Body::from(Vec::new());
    }
    struct St {
        data: BlobData,
        file: Option<tokio::fs::File>,
        pos: u64,
        end: u64,
        counter: Arc<AtomicU64>,
        progress: Option<Arc<Progress>>,
    }
    let st = St {
        data,
        file: None,
        pos: start,
        end,
        counter,
        progress,
    };
    let stream = futures_util::stream::try_unfold(st, |mut st| async move {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        if st.pos >= st.end {
            return Ok::<_, std::io::Error>(None);
        }
        let want = (st.end - st.pos).min(CHUNK);
        let chunk = match &st.data {
            BlobData::Bytes(b) => {
                let s = usize::try_from(st.pos).unwrap_or(usize::MAX);
                let e = usize::try_from(st.pos + want).unwrap_or(usize::MAX);
                if e > b.len() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "blob data shorter than its size",
                    ));
                }
                b.slice(s..e)
            }
            BlobData::File(path) => {
                if st.file.is_none() {
                    let mut f = tokio::fs::File::open(path).await?;
                    f.seek(std::io::SeekFrom::Start(st.pos)).await?;
                    st.file = Some(f);
                }
                let f = st
                    .file
                    .as_mut()
                    .ok_or_else(|| std::io::Error::other("file handle vanished"))?;
                let mut buf = vec![0u8; want as usize];
                let mut got = 0;
                while got < buf.len() {
                    let n = f.read(&mut buf[got..]).await?;
                    if n == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("`{}` is shorter than the blob size", path.display()),
                        ));
                    }
                    got += n;
                }
                bytes::Bytes::from(buf)
            }
        };
        st.pos += chunk.len() as u64;
        st.counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if let Some(p) = &st.progress {
            p(st.pos);
        }
        Ok(Some((chunk, st)))
    });
    reqwest::Body::wrap_stream(stream)
}
