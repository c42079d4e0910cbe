//! The wire format of `strata serve --stdio`: frames of JSON messages, with blob bytes raw
//! between them.
//!
//! A frame is a 4-byte big-endian length and that many bytes of JSON (one [`Request`] or
//! [`Reply`]). The only bytes outside frames are blob contents, and their length is always
//! known from the frame before them: after [`Request::Put`] the client writes `size - offset`
//! bytes; after [`Reply::Data`] the server writes `size - offset` bytes. Raw bytes, not frames,
//! because a layer is most of what moves and framing it would only add copies.
//!
//! The server speaks first ([`Reply::Hello`]); a client that does not know the server's
//! [`PROTOCOL`] version stops there. Requests are answered in order, one reply each, so a
//! client may send several before reading (pushes pipeline every blob this way).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use strata_oci::{Descriptor, Digest};

/// The protocol version. A change that an older peer would misread bumps it.
pub const PROTOCOL: u32 = 1;

/// The largest frame either side accepts (a `have` of thousands of blobs fits many times).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A blob one side asks about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
}

/// A blob the server lacks, and how much of it an interrupted transfer left there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missing {
    pub digest: Digest,
    /// Bytes the server already holds: the client sends from here.
    pub offset: u64,
}

/// Client to server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Which of these blobs does the store lack? → [`Reply::Have`].
    Have { blobs: Vec<BlobRef> },
    /// The bytes of `digest` from `offset` follow (`size - offset` of them). → [`Reply::Ok`]
    /// once verified and stored, or [`Reply::Error`] (the bytes are read either way).
    Put {
        digest: Digest,
        size: u64,
        offset: u64,
    },
    /// Store these manifests (blobs already sent or present; children before the index that
    /// lists them) and name the last one `name`. → [`Reply::Ok`].
    Tag {
        name: String,
        manifests: Vec<Descriptor>,
    },
    /// What does `name` point at? → [`Reply::Resolved`].
    Resolve { name: String },
    /// Send the blob `digest` from `offset`. → [`Reply::Data`] and the bytes, or
    /// [`Reply::Error`].
    Get { digest: Digest, offset: u64 },
    /// End of the session. → [`Reply::Ok`], then the server exits.
    Bye,
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The first frame of every session.
    Hello {
        protocol: u32,
        /// The server binary's version (`strata version`).
        version: String,
        /// The server's architecture, as Rust names it (`x86_64`, `aarch64`).
        arch: String,
        /// The store it serves.
        store: String,
    },
    Have {
        missing: Vec<Missing>,
    },
    Ok,
    Resolved {
        descriptor: Option<Box<Descriptor>>,
    },
    /// `size - offset` bytes of the blob follow.
    Data {
        size: u64,
    },
    /// The request failed; the session goes on.
    Error {
        message: String,
    },
}

/// Write one frame and flush.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::other("frame too large"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Read one frame; `Ok(None)` at a clean end of stream (before the length).
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes (at most {MAX_FRAME}): not strata's protocol"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad frame: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_round_trip_and_a_clean_end_is_none() {
        let d = Digest::sha256(b"x");
        let mut buf = Vec::new();
        let put = Request::Put {
            digest: d.clone(),
            size: 10,
            offset: 3,
        };
        write_frame(&mut buf, &put).unwrap();
        write_frame(&mut buf, &Request::Bye).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), Some(put));
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), Some(Request::Bye));
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), None);
    }

    #[test]
    fn a_huge_or_cut_frame_is_an_error_not_an_allocation() {
        let mut r = &[0xffu8, 0xff, 0xff, 0xff, b'{'][..];
        let e = read_frame::<Request>(&mut r).unwrap_err();
        assert!(e.to_string().contains("not strata's protocol"), "{e}");
        let mut r = &[0u8, 0, 0, 10, b'{'][..];
        assert_eq!(
            read_frame::<Request>(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let mut r = &[0u8, 0][..];
        assert_eq!(
            read_frame::<Request>(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
