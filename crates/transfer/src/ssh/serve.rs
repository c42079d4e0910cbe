//! The host side: `strata serve --stdio` answers one client's requests against a store.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use strata_oci::Descriptor;
use strata_store::Store;

use super::proto::{BlobRef, Missing, PROTOCOL, Reply, Request, read_frame, write_frame};
use crate::error::{Error, Result};
use crate::import::local_name;

/// Buffer of the byte streams (blob bodies dominate).
pub(crate) const STREAM_BUFFER: usize = 1024 * 1024;

/// Called after a `tag` named an image: `(store, name, what the name was before)`. The binary
/// unpacks the image's layers here (as `docker load` does) and puts the old name back when that
/// fails; an error is sent to the client.
pub type OnTag<'a> =
    dyn Fn(&Store, &str, Option<Descriptor>) -> std::result::Result<(), String> + 'a;

/// Options of [`serve`].
pub struct ServeOptions<'a> {
    /// This binary's version, sent in the hello (clients replace a server of another version).
    pub version: String,
    pub on_tag: Option<&'a OnTag<'a>>,
}

impl std::fmt::Debug for ServeOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("version", &self.version)
            .finish()
    }
}

fn wire(e: io::Error) -> Error {
    Error::Io {
        op: "talk to the client over",
        path: "stdin/stdout".into(),
        source: e,
    }
}

/// Serve the protocol on `input`/`output` until the client says bye or goes away. Blobs the
/// client sends are verified and committed one by one (resumable: see
/// [`strata_store::PartialBlob`]); a name is set only after every blob of its image is here.
/// Returns an error only when the stream itself fails (a client that went away mid-blob).
pub fn serve(
    store: &Store,
    input: impl Read,
    output: impl Write,
    opts: &ServeOptions<'_>,
) -> Result<()> {
    // Held for the whole session: a gc on the host never takes blobs that arrived but are not
    // named yet.
    let _session = store.write_session()?;
    let mut input = BufReader::with_capacity(STREAM_BUFFER, input);
    let mut output = BufWriter::with_capacity(STREAM_BUFFER, output);
    write_frame(
        &mut output,
        &Reply::Hello {
            protocol: PROTOCOL,
            version: opts.version.clone(),
            arch: std::env::consts::ARCH.to_string(),
            store: store.root().display().to_string(),
        },
    )
    .map_err(wire)?;
    loop {
        let Some(req) = read_frame::<Request>(&mut input).map_err(wire)? else {
            return Ok(());
        };
        let reply = match req {
            Request::Have { blobs } => Reply::Have {
                missing: missing(store, &blobs),
            },
            Request::Put {
                digest,
                size,
                offset,
            } => receive(store, &mut input, &digest, size, offset)?,
            Request::Tag { name, manifests } => match tag(store, &name, &manifests, opts) {
                Ok(()) => Reply::Ok,
                Err(message) => Reply::Error { message },
            },
            Request::Resolve { name } => match local_name(&name) {
                Ok(n) => match store.find_ref(&n) {
                    Ok(descriptor) => Reply::Resolved {
                        descriptor: descriptor.map(Box::new),
                    },
                    Err(e) => Reply::Error {
                        message: e.to_string(),
                    },
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            },
            Request::Get { digest, offset } => {
                send(store, &mut output, &digest, offset)?;
                continue;
            }
            Request::Bye => {
                write_frame(&mut output, &Reply::Ok).map_err(wire)?;
                return Ok(());
            }
        };
        write_frame(&mut output, &reply).map_err(wire)?;
    }
}

fn missing(store: &Store, blobs: &[BlobRef]) -> Vec<Missing> {
    blobs
        .iter()
        .filter(|b| store.blob_size(&b.digest).ok() != Some(b.size))
        .map(|b| Missing {
            digest: b.digest.clone(),
            offset: store.partial_len(&b.digest).min(b.size),
        })
        .collect()
}

/// Read the `size - offset` bytes of a `put` into the store. The bytes are consumed whatever
/// happens, so the next request is read from the right place.
fn receive(
    store: &Store,
    input: &mut impl Read,
    digest: &strata_oci::Digest,
    size: u64,
    offset: u64,
) -> Result<Reply> {
    let Some(len) = size.checked_sub(offset) else {
        return Ok(Reply::Error {
            message: format!("blob {digest}: offset {offset} is past its size {size}"),
        });
    };
    // None when the blob is here already (its bytes are only read) or cannot be written.
    let mut partial = None;
    let mut failure: Option<String> = None;
    let mut skip = 0u64;
    if store.blob_size(digest).ok() != Some(size) {
        match store.partial_blob(digest, size) {
            Ok(p) => {
                // The client sends from what `have` said; another writer may have added more
                // since (skip those bytes) or the file may be gone (then it cannot resume).
                if p.offset() < offset {
                    failure = Some(format!(
                        "blob {digest}: the host holds {} bytes, the client sent from {offset}; \
                         send again",
                        p.offset()
                    ));
                } else {
                    skip = p.offset() - offset;
                    partial = Some(p);
                }
            }
            Err(e) => failure = Some(e.to_string()),
        }
    }
    let mut buf = vec![
        0u8;
        STREAM_BUFFER
            .min(usize::try_from(len).unwrap_or(usize::MAX))
            .max(1)
    ];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match input.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(wire(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the client went away {} bytes into blob {digest}",
                        len - left
                    ),
                )));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(wire(e)),
        };
        left -= n as u64;
        let mut chunk = &buf[..n];
        if skip > 0 {
            let s = skip.min(n as u64) as usize;
            skip -= s as u64;
            chunk = &chunk[s..];
        }
        if failure.is_none()
            && let Some(p) = &mut partial
            && let Err(e) = p.write_all(chunk)
        {
            failure = Some(format!("blob {digest}: {e}"));
        }
    }
    if let Some(message) = failure {
        return Ok(Reply::Error { message });
    }
    Ok(match partial.map(strata_store::PartialBlob::commit) {
        None | Some(Ok(_)) => Reply::Ok,
        Some(Err(e)) => Reply::Error {
            message: e.to_string(),
        },
    })
}

/// Name an image whose blobs are all here: each manifest is stored as a manifest (which checks
/// that what it references is present), then the name is set and `on_tag` runs.
fn tag(
    store: &Store,
    name: &str,
    manifests: &[Descriptor],
    opts: &ServeOptions<'_>,
) -> std::result::Result<(), String> {
    let name = local_name(name).map_err(|e| e.to_string())?;
    let top = manifests
        .last()
        .ok_or_else(|| "tag without a manifest".to_string())?;
    for d in manifests {
        let bytes = store.read_descriptor(d).map_err(|e| e.to_string())?;
        store
            .put_manifest_bytes(&bytes, &d.media_type)
            .map_err(|e| format!("manifest {}: {e}", d.digest))?;
    }
    let before = store.get_ref(&name).map_err(|e| e.to_string())?;
    if before.as_ref().is_some_and(|b| b.digest == top.digest) {
        return Ok(());
    }
    let mut named = top.clone();
    named.annotations = None;
    store.set_ref(&name, named).map_err(|e| e.to_string())?;
    if let Some(hook) = opts.on_tag {
        hook(store, &name, before)?;
    }
    Ok(())
}

/// Answer a `get`: a `data` frame and the bytes, or an `error` frame.
fn send(
    store: &Store,
    output: &mut impl Write,
    digest: &strata_oci::Digest,
    offset: u64,
) -> Result<()> {
    let opened = store
        .blob_size(digest)
        .map_err(|e| e.to_string())
        .and_then(|size| {
            if offset > size {
                return Err(format!(
                    "blob {digest}: offset {offset} is past its size {size}"
                ));
            }
            let path = store.blob_path(digest);
            let mut f = File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| format!("seek {}: {e}", path.display()))?;
            Ok((f, size))
        });
    let (file, size) = match opened {
        Ok(x) => x,
        Err(message) => {
            return write_frame(output, &Reply::Error { message }).map_err(wire);
        }
    };
    write_frame(output, &Reply::Data { size }).map_err(wire)?;
    let want = size - offset;
    let sent = io::copy(&mut file.take(want), output).map_err(wire)?;
    if sent != want {
        // The blob file is shorter than its size said: the stream cannot stay in step.
        return Err(wire(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("blob {digest} ended after {sent} of {want} bytes"),
        )));
    }
    output.flush().map_err(wire)
}
