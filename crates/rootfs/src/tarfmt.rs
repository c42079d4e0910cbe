//! The tar format at the byte level: building ustar+PAX headers and a reader that keeps
//! control of every size and offset (the `tar` crate buffers PAX and GNU long-name headers
//! without a limit, so we walk the blocks ourselves and use `tar::Header` only to decode fields).

use std::io::{self, Read, Write};

use crate::error::{Error, Refusal, Result};

pub(crate) const BLOCK: u64 = 512;
/// Largest PAX / GNU long-name header we accept. Real ones are a few hundred bytes; xattrs can
/// be bigger (ACLs), but nothing legitimate comes close to this.
pub(crate) const MAX_META_SIZE: u64 = 1 << 20;
/// Largest value that fits an 11-digit octal ustar number field.
const MAX_OCTAL_11: u64 = 0o777_7777_7777;
/// Largest value that fits a 7-digit octal ustar number field (uid, gid).
const MAX_OCTAL_7: u64 = 0o777_7777;

/// The kinds of entries a layer may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl Kind {
    fn typeflag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::Hardlink => b'1',
            Kind::Symlink => b'2',
            Kind::Char => b'3',
            Kind::Block => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Hardlink => "hard link",
            Kind::Symlink => "symlink",
            Kind::Char => "character device",
            Kind::Block => "block device",
            Kind::Dir => "directory",
            Kind::Fifo => "fifo",
        }
    }
}

/// One entry's metadata, as written or as read (after PAX / long-name headers are merged).
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    /// Entry name exactly as in the archive (for directories written by us, without the
    /// trailing slash; it is added on the wire).
    pub path: Vec<u8>,
    /// Link target for symlinks and hard links.
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub size: u64,
    pub major: u32,
    pub minor: u32,
    /// Extended attributes, sorted by name when written.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offset of the first header block of this entry in the uncompressed stream.
    pub offset: u64,
}

impl Meta {
    /// The entry's path as messages show it: control characters escaped (a crafted name
    /// must not drive the user's terminal) and a very long path cut in the middle.
    pub(crate) fn display_path(&self) -> String {
        printable_path(&self.path)
    }
}

/// Paths longer than this many characters are shown cut in the middle.
const SHOWN_PATH_CHARS: usize = 240;

/// `path` for a message: lossy UTF-8, control characters escaped (`\u{1b}`), and at most
/// [`SHOWN_PATH_CHARS`] characters, the middle replaced by how much was left out.
pub(crate) fn printable_path(path: &[u8]) -> String {
    let text = String::from_utf8_lossy(path);
    let escape = |s: &str| -> String { strata_oci::printable(s).into_owned() };
    let count = text.chars().count();
    if count <= SHOWN_PATH_CHARS {
        return escape(&text);
    }
    let half = SHOWN_PATH_CHARS / 2;
    let head: String = text.chars().take(half).collect();
    let tail: String = text.chars().skip(count - half).collect();
    format!("{}…[{} bytes]…{}", escape(&head), path.len(), escape(&tail))
}

/// Appends one PAX record; the length prefix counts itself.
fn pax_record(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    buf.extend_from_slice(len.to_string().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(key);
    buf.push(b'=');
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

fn copy_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

fn padding(size: u64) -> usize {
    ((BLOCK - size % BLOCK) % BLOCK) as usize
}

/// Writes the header blocks (PAX extension header first when needed) for `meta`.
/// The caller then writes exactly `meta.size` data bytes and [`write_padding`].
pub(crate) fn write_header(out: &mut impl Write, meta: &Meta) -> io::Result<()> {
    let mut name = meta.path.clone();
    if meta.kind == Kind::Dir {
        name.push(b'/');
    }
    let mut pax = Vec::new();
    if name.len() > 100 {
        pax_record(&mut pax, b"path", &name);
    }
    if meta.link.len() > 100 {
        pax_record(&mut pax, b"linkpath", &meta.link);
    }
    if meta.uid > MAX_OCTAL_7 {
        pax_record(&mut pax, b"uid", meta.uid.to_string().as_bytes());
    }
    if meta.gid > MAX_OCTAL_7 {
        pax_record(&mut pax, b"gid", meta.gid.to_string().as_bytes());
    }
    if meta.size > MAX_OCTAL_11 {
        pax_record(&mut pax, b"size", meta.size.to_string().as_bytes());
    }
    if meta.mtime > MAX_OCTAL_11 {
        pax_record(&mut pax, b"mtime", meta.mtime.to_string().as_bytes());
    }
    for (k, v) in &meta.xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(k);
        pax_record(&mut pax, &key, v);
    }

    if !pax.is_empty() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        let base = name
            .rsplit(|b| *b == b'/')
            .find(|s| !s.is_empty())
            .unwrap_or(b"");
        let mut pax_name = b"PaxHeaders.0/".to_vec();
        pax_name.extend_from_slice(base);
        copy_field(&mut h.as_old_mut().name, &pax_name);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(pax.len() as u64);
        h.set_cksum();
        out.write_all(h.as_bytes())?;
        out.write_all(&pax)?;
        out.write_all(&[0u8; BLOCK as usize][..padding(pax.len() as u64)])?;
    }

    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::new(meta.kind.typeflag()));
    copy_field(&mut h.as_old_mut().name, &name);
    copy_field(&mut h.as_old_mut().linkname, &meta.link);
    h.set_mode(meta.mode & 0o7777);
    h.set_uid(if meta.uid > MAX_OCTAL_7 { 0 } else { meta.uid });
    h.set_gid(if meta.gid > MAX_OCTAL_7 { 0 } else { meta.gid });
    h.set_mtime(meta.mtime.min(MAX_OCTAL_11));
    h.set_size(if meta.size > MAX_OCTAL_11 {
        0
    } else {
        meta.size
    });
    if matches!(meta.kind, Kind::Char | Kind::Block) {
        h.set_device_major(meta.major)?;
        h.set_device_minor(meta.minor)?;
    }
    h.set_cksum();
    out.write_all(h.as_bytes())
}

/// Pads the data of an entry of `size` bytes to a block boundary.
pub(crate) fn write_padding(out: &mut impl Write, size: u64) -> io::Result<()> {
    out.write_all(&[0u8; BLOCK as usize][..padding(size)])
}

/// Writes the end-of-archive marker (two zero blocks).
pub(crate) fn write_end(out: &mut impl Write) -> io::Result<()> {
    out.write_all(&[0u8; 2 * BLOCK as usize])
}

/// Reads a tar stream entry by entry, merging PAX and GNU long-name headers into the
/// entry they describe. Offsets are of the uncompressed stream.
pub(crate) struct TarReader<R> {
    inner: R,
    offset: u64,
    /// Data bytes of the current entry not read yet.
    remaining: u64,
    /// Padding after the current entry's data.
    pad: u64,
    /// Name of the current entry, for error messages.
    current: String,
}

/// Splits PAX records by their length prefixes (`"%d %s=%s\n"`). Values may hold any byte,
/// newlines included (binary xattrs such as `security.capability`), so splitting on `\n` as
/// the `tar` crate does is wrong.
/// A PAX record's key and value.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

fn parse_pax(mut data: &[u8]) -> Result<Vec<PaxRecord<'_>>, &'static str> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data.iter().position(|b| *b == b' ').ok_or("no length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("bad length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("length does not match the record");
        }
        let record = &data[space + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or("no `=`")?;
        out.push((&record[..eq], &record[eq + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    // PAX times may carry a fraction ("1700000000.123"); we keep whole seconds, and clamp
    // times before the epoch to 0.
    let s = std::str::from_utf8(v).ok()?;
    let whole = s.split('.').next()?;
    if whole.starts_with('-') {
        return Some(0);
    }
    whole.parse().ok()
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        TarReader {
            inner,
            offset: 0,
            remaining: 0,
            pad: 0,
            current: String::from("(start of stream)"),
        }
    }

    /// Bytes of the stream consumed so far.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    fn truncated(&self) -> Error {
        Error::Truncated {
            entry: self.current.clone(),
            offset: self.offset,
        }
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
    fn read_block(&mut self, buf: &mut [u8]) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(self.truncated()),
                Ok(n) => {
                    got += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.stream_err(e)),
            }
        }
        Ok(true)
    }

    fn stream_err(&self, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return self.truncated();
        }
        Error::Stream {
            offset: self.offset,
            source: e,
        }
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(self.truncated()),
                Ok(k) => {
                    n -= k as u64;
                    self.offset += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.stream_err(e)),
            }
        }
        Ok(())
    }

    fn read_meta_data(&mut self, kind: &'static str, size: u64) -> Result<Vec<u8>> {
        if size > MAX_META_SIZE {
            return Err(Error::Refused {
                entry: self.current.clone(),
                offset: self.offset - BLOCK,
                reason: Refusal::HeaderTooLarge {
                    kind,
                    size,
                    limit: MAX_META_SIZE,
                },
            });
        }
        let mut v = vec![0u8; size as usize];
        if !self.read_block(&mut v)? && size > 0 {
            return Err(self.truncated());
        }
        self.skip(padding(size) as u64)?;
        Ok(v)
    }

    /// The next entry, or `None` at the end-of-archive marker. Skips whatever of the
    /// previous entry's data was not read.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Meta>> {
        self.skip(self.remaining + self.pad)?;
        self.remaining = 0;
        self.pad = 0;

        let mut pax: Option<Vec<u8>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut first_offset = None;
        loop {
            let header_offset = self.offset;
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? {
                // A layer always ends with zero blocks; a stream that stops at a header
                // boundary has lost its tail.
                return Err(self.truncated());
            }
            if block.iter().all(|b| *b == 0) {
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(Error::BadHeader {
                        offset: header_offset,
                        reason: "extension header describes no entry".into(),
                    });
                }
                return Ok(None);
            }
            let first_offset = *first_offset.get_or_insert(header_offset);
            let h = tar::Header::from_byte_slice(&block);
            let bad = |reason: String| Error::BadHeader {
                offset: header_offset,
                reason,
            };
            let stored = h.cksum().map_err(|e| bad(e.to_string()))?;
            let sum: u32 = block[..148]
                .iter()
                .chain(&block[156..])
                .map(|b| u32::from(*b))
                .sum::<u32>()
                + 8 * 32;
            if sum != stored {
                return Err(bad("checksum mismatch".into()));
            }
            let typeflag = block[156];
            let header_size = h.entry_size().map_err(|e| bad(e.to_string()))?;
            self.current = String::from_utf8_lossy(&h.path_bytes()).into_owned();
            match typeflag {
                b'x' => {
                    if pax.is_some() {
                        return Err(self.refused(first_offset, Refusal::DuplicateExtension("PAX")));
                    }
                    pax = Some(self.read_meta_data("PAX", header_size)?);
                    continue;
                }
                b'g' => {
                    // Global PAX headers carry nothing a layer needs (comments, charset).
                    self.read_meta_data("PAX global", header_size)?;
                    continue;
                }
                b'L' => {
                    if long_name.is_some() {
                        return Err(
                            self.refused(first_offset, Refusal::DuplicateExtension("long name"))
                        );
                    }
                    let mut v = self.read_meta_data("GNU long name", header_size)?;
                    while v.last() == Some(&0) {
                        v.pop();
                    }
                    long_name = Some(v);
                    continue;
                }
                b'K' => {
                    if long_link.is_some() {
                        return Err(
                            self.refused(first_offset, Refusal::DuplicateExtension("long link"))
                        );
                    }
                    let mut v = self.read_meta_data("GNU long link", header_size)?;
                    while v.last() == Some(&0) {
                        v.pop();
                    }
                    long_link = Some(v);
                    continue;
                }
                _ => {}
            }

            let mut meta = Meta {
                path: long_name
                    .take()
                    .unwrap_or_else(|| h.path_bytes().into_owned()),
                link: long_link
                    .take()
                    .or_else(|| h.link_name_bytes().map(|b| b.into_owned()))
                    .unwrap_or_default(),
                kind: Kind::File,
                mode: h.mode().map_err(|e| bad(e.to_string()))? & 0o7777,
                uid: h.uid().map_err(|e| bad(e.to_string()))?,
                gid: h.gid().map_err(|e| bad(e.to_string()))?,
                mtime: h.mtime().map_err(|e| bad(e.to_string()))?,
                size: header_size,
                major: 0,
                minor: 0,
                xattrs: Vec::new(),
                offset: first_offset,
            };
            if let Some(pax) = &pax {
                for (key, value) in parse_pax(pax).map_err(|r| bad(format!("PAX record: {r}")))? {
                    let num = || {
                        parse_decimal(value).ok_or_else(|| {
                            bad(format!(
                                "PAX {} is not a number",
                                String::from_utf8_lossy(key)
                            ))
                        })
                    };
                    match key {
                        b"path" => meta.path = value.to_vec(),
                        b"linkpath" => meta.link = value.to_vec(),
                        b"size" => meta.size = num()?,
                        b"uid" => meta.uid = num()?,
                        b"gid" => meta.gid = num()?,
                        b"mtime" => meta.mtime = num()?,
                        _ => {
                            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                                meta.xattrs.push((name.to_vec(), value.to_vec()));
                            }
                        }
                    }
                }
            }
            self.current = meta.display_path();
            meta.kind = match typeflag {
                // Pre-POSIX tars mark directories by a trailing slash on a NUL typeflag
                // (Go's archive/tar does the same); an explicit '0' stays a file.
                0 if meta.path.ends_with(b"/") => Kind::Dir,
                b'0' | 0 | b'7' => Kind::File,
                b'1' => Kind::Hardlink,
                b'2' => Kind::Symlink,
                b'3' => Kind::Char,
                b'4' => Kind::Block,
                b'5' => Kind::Dir,
                b'6' => Kind::Fifo,
                other => {
                    return Err(
                        self.refused(first_offset, Refusal::UnsupportedType(char::from(other)))
                    );
                }
            };
            if matches!(meta.kind, Kind::Char | Kind::Block) {
                meta.major = h
                    .device_major()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or(0);
                meta.minor = h
                    .device_minor()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or(0);
            }
            // Only regular files carry data; a size on anything else is still skipped over
            // (that is where the next header is), but never written anywhere.
            self.remaining = meta.size;
            self.pad = padding(meta.size) as u64;
            return Ok(Some(meta));
        }
    }

    fn refused(&self, offset: u64, reason: Refusal) -> Error {
        Error::Refused {
            entry: self.current.clone(),
            offset,
            reason,
        }
    }

    /// Copies the current entry's data (all of it) into `out`; returns the byte count.
    pub(crate) fn copy_data(
        &mut self,
        out: &mut impl Write,
        buf: &mut [u8],
    ) -> Result<u64, DataError> {
        let mut total = 0;
        while self.remaining > 0 {
            let want = self.remaining.min(buf.len() as u64) as usize;
            let n = match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(DataError::Read(self.truncated())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DataError::Read(self.stream_err(e))),
            };
            self.remaining -= n as u64;
            self.offset += n as u64;
            total += n as u64;
            out.write_all(&buf[..n]).map_err(DataError::Write)?;
        }
        Ok(total)
    }
}

/// A failure while copying entry data: reading the stream or writing the destination.
pub(crate) enum DataError {
    Read(Error),
    Write(io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself_across_digit_boundaries() {
        for vlen in [0usize, 1, 88, 89, 90, 91, 95, 96, 990, 995, 996, 1000] {
            let mut buf = Vec::new();
            pax_record(&mut buf, b"path", &vec![b'x'; vlen]);
            let space = buf.iter().position(|b| *b == b' ').unwrap();
            let declared: usize = std::str::from_utf8(&buf[..space]).unwrap().parse().unwrap();
            assert_eq!(declared, buf.len(), "value length {vlen}");
        }
    }

    #[test]
    fn written_headers_read_back_with_pax_overrides() {
        let meta = Meta {
            path: [&b"a/"[..], &[b'n'; 150][..]].concat(),
            link: vec![b'l'; 120],
            kind: Kind::Symlink,
            mode: 0o7777,
            uid: 1 << 30,
            gid: 5,
            mtime: 1_700_000_000,
            size: 0,
            major: 0,
            minor: 0,
            xattrs: vec![(b"user.k".to_vec(), b"v\n\0=".to_vec())],
            offset: 0,
        };
        let mut buf = Vec::new();
        write_header(&mut buf, &meta).unwrap();
        write_end(&mut buf).unwrap();
        let mut r = TarReader::new(&buf[..]);
        let got = r.next_entry().unwrap().unwrap();
        assert_eq!(got.path, meta.path);
        assert_eq!(got.link, meta.link);
        assert_eq!(
            (got.kind, got.mode, got.uid, got.gid, got.mtime),
            (Kind::Symlink, 0o7777, 1 << 30, 5, 1_700_000_000)
        );
        assert_eq!(got.xattrs, meta.xattrs);
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn pax_times_keep_whole_seconds_and_clamp_negative() {
        assert_eq!(parse_decimal(b"1700000000.123456"), Some(1_700_000_000));
        assert_eq!(parse_decimal(b"-5.5"), Some(0));
        assert_eq!(parse_decimal(b"abc"), None);
    }
}
