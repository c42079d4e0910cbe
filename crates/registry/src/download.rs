//! Blob downloads: streamed into the caller's writer, verified, resumed with `Range` when the
//! connection breaks.

use std::io::Write;
use std::sync::Arc;

use reqwest::header;
use strata_oci::Digest;

use crate::client::{BlobFetch, Client, Progress, header_str, pull_scope};
use crate::error::{Error, Result};

/// `bytes 100-199/200` → 100.
fn content_range_start(v: &str) -> Option<u64> {
    let v = v.trim().strip_prefix("bytes")?.trim_start();
    v.split('-').next()?.trim().parse().ok()
}

impl Client {
    /// Stream blob `digest` of `repo` into `sink`, checking its digest (and `size`, if given)
    /// as it goes. If the connection breaks, the download goes on from the last byte received
    /// (`Range: bytes=N-`); a registry that ignores `Range` resends from the start and the bytes
    /// we already have are skipped. `progress` gets the bytes written so far. On error, `sink`
    /// may hold a partial blob: the caller discards it (a store `BlobWriter` does on drop).
    pub async fn fetch_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: Option<u64>,
        sink: &mut (dyn Write + Send),
        progress: Option<&Arc<Progress>>,
    ) -> Result<BlobFetch> {
        let what = format!("GET blob {repo}@{digest}");
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let scopes = [pull_scope(repo)];
        let mut hasher = digest.algorithm().hasher();
        let mut written: u64 = 0;
        let mut received: u64 = 0;
        let mut resumed: u32 = 0;
        // Consecutive attempts that brought nothing new; bounded like other retries.
        let mut fruitless: u32 = 0;
        let max = self.opts.max_attempts.max(1);
        let io_err = |op, source| Error::BlobIo {
            registry: self.registry.clone(),
            repository: repo.to_string(),
            digest: digest.clone(),
            op,
            source,
        };
        loop {
            let from = written;
            let sent = self
                .send(&what, &scopes, true, || {
                    let rb = self.http.get(&url);
                    if from > 0 {
                        rb.header(header::RANGE, format!("bytes={from}-"))
                    } else {
                        rb
                    }
                })
                .await;
            let mut resp = match sent {
                Ok(r) => r,
                // Resuming: the registry may be briefly unreachable; that counts as no progress.
                Err(Error::Connection { .. }) if from > 0 && fruitless + 1 < max => {
                    fruitless += 1;
                    tokio::time::sleep(self.backoff(fruitless, None)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut skip: u64 = 0;
            match resp.status().as_u16() {
                200 => skip = from,
                206 if from > 0 => {
                    let start =
                        header_str(resp.headers(), "content-range").and_then(content_range_start);
                    if start != Some(from) {
                        return Err(self.protocol(
                            &what,
                            format!("asked for bytes from {from}, got Content-Range {start:?}"),
                        ));
                    }
                }
                _ => return Err(self.error_for(resp, &what).await),
            }
            let before = written;
            let mut broken = false;
            loop {
                // A stall counts as a broken connection: the download resumes from here.
                match self.chunk_within(&mut resp, &what).await {
                    Ok(Some(chunk)) => {
                        received += chunk.len() as u64;
                        let mut c: &[u8] = &chunk;
                        if skip > 0 {
                            let n = (skip as usize).min(c.len());
                            c = &c[n..];
                            skip -= n as u64;
                        }
                        if c.is_empty() {
                            continue;
                        }
                        if let Some(s) = size
                            && written + c.len() as u64 > s
                        {
                            return Err(Error::SizeMismatch {
                                registry: self.registry.clone(),
                                repository: repo.to_string(),
                                digest: digest.clone(),
                                expected: s,
                                actual: written + c.len() as u64,
                            });
                        }
                        hasher.update(c);
                        sink.write_all(c).map_err(|e| io_err("write", e))?;
                        written += c.len() as u64;
                        if let Some(p) = progress {
                            p(written);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            // A connection closed before the announced size is as broken as an error.
            if !broken && size.is_some_and(|s| written < s) {
                broken = true;
            }
            if !broken {
                break;
            }
            fruitless = if written > before { 0 } else { fruitless + 1 };
            if fruitless >= max {
                return Err(self.protocol(
                    &what,
                    format!("the connection broke {resumed} times; stopped at byte {written}"),
                ));
            }
            resumed += 1;
            if fruitless > 0 {
                tokio::time::sleep(self.backoff(fruitless, None)).await;
            }
        }
        sink.flush().map_err(|e| io_err("flush", e))?;
        if let Some(s) = size
            && s != written
        {
            return Err(Error::SizeMismatch {
                registry: self.registry.clone(),
                repository: repo.to_string(),
                digest: digest.clone(),
                expected: s,
                actual: written,
            });
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(Error::DigestMismatch {
                what: format!("{}/{repo}: blob", self.registry),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(BlobFetch {
            size: written,
            bytes_received: received,
            resumed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::content_range_start;

    #[test]
    fn content_range() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("100-199"), None);
    }
}
