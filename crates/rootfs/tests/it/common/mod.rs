//! Helpers shared by the integration tests: tree snapshots for comparison, raw tar building.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use strata_oci::Digest;

/// What we compare about one path of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub content: Option<Digest>,
    pub link: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub mtime: Option<i64>,
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v: Vec<_> = xattr::list(p)
        .map(|l| {
            l.filter(|n| n.as_bytes() != b"security.selinux")
                .filter_map(|n| {
                    xattr::get(p, &n)
                        .ok()
                        .flatten()
                        .map(|v| (n.as_bytes().to_vec(), v))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every path under `root` (root excluded) with its metadata. Directory mtimes are left out
/// when `with_mtime` is false.
pub fn tree(root: &Path, with_mtime: bool) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, with_mtime, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, with_mtime: bool, out: &mut BTreeMap<Vec<u8>, Node>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "file"
        };
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        out.insert(
            rel,
            Node {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                content: ft
                    .is_file()
                    .then(|| Digest::sha256(&std::fs::read(&p).unwrap())),
                link: ft.is_symlink().then(|| {
                    std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                }),
                rdev: if ft.is_char_device() || ft.is_block_device() {
                    md.rdev()
                } else {
                    0
                },
                xattrs: if ft.is_symlink() {
                    Vec::new()
                } else {
                    xattrs(&p)
                },
                mtime: (with_mtime && !ft.is_dir()).then(|| md.mtime()),
            },
        );
        if ft.is_dir() {
            walk(root, &p, with_mtime, out);
        }
    }
}

/// Asserts two trees are equal, showing the first difference.
pub fn assert_same_tree(a: &BTreeMap<Vec<u8>, Node>, b: &BTreeMap<Vec<u8>, Node>) {
    for (k, v) in a {
        match b.get(k) {
            None => panic!(
                "`{}` missing from the second tree",
                String::from_utf8_lossy(k)
            ),
            Some(w) => assert_eq!(v, w, "`{}` differs", String::from_utf8_lossy(k)),
        }
    }
    for k in b.keys() {
        assert!(
            a.contains_key(k),
            "`{}` only in the second tree",
            String::from_utf8_lossy(k)
        );
    }
}

/// Builds tar streams byte by byte, including ones the `tar` crate refuses to write.
#[derive(Default)]
pub struct RawTar {
    pub bytes: Vec<u8>,
}

pub fn header(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    {
        let old = h.as_old_mut();
        old.name[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        old.linkname[..link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    }
    h.set_entry_type(tar::EntryType::new(typeflag));
    h.set_mode(if typeflag == b'5' { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_000_000);
    h.set_size(size);
    h.set_cksum();
    let mut out = [0u8; 512];
    out.copy_from_slice(h.as_bytes());
    out
}

impl RawTar {
    pub fn entry(mut self, name: &[u8], typeflag: u8, data: &[u8], link: &[u8]) -> Self {
        self.bytes
            .extend_from_slice(&header(name, typeflag, data.len() as u64, link));
        self.bytes.extend_from_slice(data);
        self.pad();
        self
    }
    pub fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name.as_bytes(), b'0', data, b"")
    }
    pub fn dir(self, name: &str) -> Self {
        self.entry(name.as_bytes(), b'5', b"", b"")
    }
    pub fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name.as_bytes(), b'2', b"", target.as_bytes())
    }
    pub fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(name.as_bytes(), b'1', b"", target.as_bytes())
    }
    pub fn pax(self, records: &[u8]) -> Self {
        self.entry(b"PaxHeaders/x", b'x', records, b"")
    }
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.bytes.extend_from_slice(bytes);
        self
    }
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(512) {
            self.bytes.push(0);
        }
    }
    pub fn end(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&[0u8; 1024]);
        self.bytes
    }
}
