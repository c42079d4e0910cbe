//! Re-check an image end to end: every manifest, index, config and layer blob against its
//! descriptor's digest and size, and every layer's uncompressed digest against the config's
//! `rootfs.diff_ids` (go-containerregistry's `validate.Image`, for our own store and tests).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read};

use crate::media_type::{self, Compression};
use crate::{
    Algorithm, Descriptor, Digest, Error, Hasher, ImageConfig, Index, Manifest, ManifestOrIndex,
};

/// Largest manifest, index or config read into memory (registries commonly cap manifests at
/// 4 MiB; configs of images with long histories can be bigger).
pub const MAX_METADATA_SIZE: u64 = 16 << 20;
/// How many indexes may nest inside one another.
pub const MAX_INDEX_DEPTH: usize = 8;

/// Where [`validate_image`] reads blobs from: a store, an archive, memory.
pub trait BlobSource {
    /// The blob's bytes as stored. A missing blob is an error of kind
    /// [`io::ErrorKind::NotFound`]; other errors are reported as read failures.
    fn open(&self, digest: &Digest) -> io::Result<Box<dyn Read + '_>>;
}

impl<S: BlobSource + ?Sized> BlobSource for &S {
    fn open(&self, digest: &Digest) -> io::Result<Box<dyn Read + '_>> {
        (**self).open(digest)
    }
}

impl BlobSource for BTreeMap<Digest, Vec<u8>> {
    fn open(&self, digest: &Digest) -> io::Result<Box<dyn Read + '_>> {
        match self.get(digest) {
            Some(b) => Ok(Box::new(b.as_slice())),
            None => Err(io::Error::new(io::ErrorKind::NotFound, digest.to_string())),
        }
    }
}

impl BlobSource for HashMap<Digest, Vec<u8>> {
    fn open(&self, digest: &Digest) -> io::Result<Box<dyn Read + '_>> {
        match self.get(digest) {
            Some(b) => Ok(Box::new(b.as_slice())),
            None => Err(io::Error::new(io::ErrorKind::NotFound, digest.to_string())),
        }
    }
}

/// What [`validate_image`] checked. Blobs shared between manifests are read once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationReport {
    /// Indexes / manifest lists.
    pub indexes: usize,
    /// Image manifests.
    pub manifests: usize,
    /// Config blobs (image configs and artifact configs).
    pub configs: usize,
    /// Layer blobs.
    pub layers: usize,
    /// Layers whose uncompressed digest was compared with a diff_id.
    pub diff_ids: usize,
    /// Index entries that are neither manifests nor indexes, checked by digest and size only.
    pub other_blobs: usize,
    /// Foreign / non-distributable layers absent from the source (allowed: they carry URLs).
    pub foreign_layers_skipped: usize,
    /// Bytes of blobs read and checked, as stored.
    pub bytes: u64,
    /// Bytes of layer content after decompression.
    pub uncompressed_bytes: u64,
    /// Every digest checked.
    pub digests: BTreeSet<Digest>,
}

/// Re-check the image or index `desc` points to, reading every blob from `src`. The first
/// problem found is returned; the error names the blob and what was expected.
pub fn validate_image<S: BlobSource + ?Sized>(
    src: &S,
    desc: &Descriptor,
) -> Result<ValidationReport, Error> {
    let mut v = Validator {
        src,
        report: ValidationReport::default(),
        sizes: HashMap::new(),
        layer_diff_ids: HashMap::new(),
        configs: HashMap::new(),
    };
    if !(media_type::is_manifest(&desc.media_type) || media_type::is_index(&desc.media_type)) {
        return Err(Error::UnsupportedMediaType {
            what: format!("image {}", desc.digest),
            media_type: desc.media_type.clone(),
        });
    }
    v.manifest_or_index(desc, "image", 0)?;
    Ok(v.report)
}

struct Validator<'a, S: ?Sized> {
    src: &'a S,
    report: ValidationReport,
    /// Size each checked blob had, so a second descriptor with another size is still caught.
    sizes: HashMap<Digest, u64>,
    /// Uncompressed digest of each checked layer, by blob digest, compression and algorithm.
    layer_diff_ids: HashMap<(Digest, Compression, Algorithm), Digest>,
    /// Image configs already checked, by digest.
    configs: HashMap<Digest, ImageConfig>,
}

fn label(kind: &str, digest: &Digest) -> String {
    format!("{kind} {}:{}", digest.algorithm().as_str(), digest.short())
}

impl<S: BlobSource + ?Sized> Validator<'_, S> {
    /// Whether `desc` was checked before; errors if it was, with another size.
    fn seen(&self, desc: &Descriptor, what: &str) -> Result<bool, Error> {
        match self.sizes.get(&desc.digest) {
            Some(&actual) if actual != desc.size => Err(Error::SizeMismatch {
                what: what.to_string(),
                digest: desc.digest.clone(),
                expected: desc.size,
                actual,
            }),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    /// Note a checked blob; `false` if it had been checked before.
    fn record(&mut self, desc: &Descriptor, bytes: u64) -> bool {
        if self.sizes.insert(desc.digest.clone(), bytes).is_some() {
            return false;
        }
        self.report.digests.insert(desc.digest.clone());
        self.report.bytes += bytes;
        true
    }

    fn open(&self, desc: &Descriptor, what: &str) -> Result<Box<dyn Read + '_>, Error> {
        self.src.open(&desc.digest).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::MissingBlob {
                    what: what.to_string(),
                    digest: desc.digest.clone(),
                }
            } else {
                Error::BlobRead {
                    what: what.to_string(),
                    digest: desc.digest.clone(),
                    source: e,
                }
            }
        })
    }

    /// Read a small blob fully and check its size and digest.
    fn read_metadata(&mut self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, Error> {
        let too_large = || Error::TooLarge {
            what: what.to_string(),
            digest: desc.digest.clone(),
            limit: MAX_METADATA_SIZE,
        };
        if desc.size > MAX_METADATA_SIZE {
            return Err(too_large());
        }
        let mut buf = Vec::new();
        self.open(desc, what)?
            .take(MAX_METADATA_SIZE + 1)
            .read_to_end(&mut buf)
            .map_err(|source| Error::BlobRead {
                what: what.to_string(),
                digest: desc.digest.clone(),
                source,
            })?;
        let size = buf.len() as u64;
        if size > MAX_METADATA_SIZE {
            return Err(too_large());
        }
        let mut h = desc.digest.algorithm().hasher();
        h.update(&buf);
        check_size_and_digest(desc, what, size, h.finish())?;
        let _first_time = self.record(desc, size);
        Ok(buf)
    }

    fn manifest_or_index(
        &mut self,
        desc: &Descriptor,
        what: &str,
        depth: usize,
    ) -> Result<(), Error> {
        if depth > MAX_INDEX_DEPTH {
            return Err(Error::TooDeep {
                digest: desc.digest.clone(),
                limit: MAX_INDEX_DEPTH,
            });
        }
        if self.seen(desc, what)? {
            return Ok(());
        }
        let bytes = self.read_metadata(desc, what)?;
        let parsed = ManifestOrIndex::from_slice(&bytes, Some(&desc.media_type)).map_err(|e| {
            // Say which document was bad, keeping the cause.
            match e {
                Error::Json { source, .. } => Error::Json {
                    what: format!("{what} ({})", desc.digest),
                    source,
                },
                Error::MediaTypeMismatch {
                    descriptor,
                    content,
                    ..
                } => Error::MediaTypeMismatch {
                    what: format!("{what} ({})", desc.digest),
                    descriptor,
                    content,
                },
                other => other,
            }
        })?;
        match parsed {
            ManifestOrIndex::Manifest(m) => self.manifest(desc, &m),
            ManifestOrIndex::Index(i) => self.index(desc, &i, depth),
        }
    }

    fn index(&mut self, desc: &Descriptor, index: &Index, depth: usize) -> Result<(), Error> {
        self.report.indexes += 1;
        let me = label("index", &desc.digest);
        for (n, entry) in index.manifests.iter().enumerate() {
            let what = format!("entry {n} of {me}");
            if media_type::is_manifest(&entry.media_type) || media_type::is_index(&entry.media_type)
            {
                self.manifest_or_index(entry, &what, depth + 1)?;
            } else if !self.seen(entry, &what)? {
                let Streamed { size, digest, .. } = self.stream(entry, &what, None)?;
                check_size_and_digest(entry, &what, size, digest)?;
                if self.record(entry, size) {
                    self.report.other_blobs += 1;
                }
            }
        }
        Ok(())
    }

    fn manifest(&mut self, desc: &Descriptor, manifest: &Manifest) -> Result<(), Error> {
        self.report.manifests += 1;
        let me = label("manifest", &desc.digest);

        let config_what = format!("config of {me}");
        let config = if media_type::is_image_config(&manifest.config.media_type) {
            Some(self.image_config(&manifest.config, &config_what)?)
        } else {
            // An artifact's config: opaque bytes.
            if !self.seen(&manifest.config, &config_what)? {
                self.read_metadata(&manifest.config, &config_what)?;
                self.report.configs += 1;
            }
            None
        };

        if let Some(config) = &config
            && config.diff_ids().len() != manifest.layers.len()
        {
            return Err(Error::DiffIdCount {
                config: manifest.config.digest.clone(),
                manifest: desc.digest.clone(),
                diff_ids: config.diff_ids().len(),
                layers: manifest.layers.len(),
            });
        }

        for (n, layer) in manifest.layers.iter().enumerate() {
            let what = format!("layer {n} of {me}");
            let expected_diff_id = config.as_ref().map(|c| &c.diff_ids()[n]);
            self.layer(layer, &what, n, expected_diff_id)?;
        }
        Ok(())
    }

    /// Read, check and parse an image config, once per digest.
    fn image_config(&mut self, desc: &Descriptor, what: &str) -> Result<ImageConfig, Error> {
        if self.seen(desc, what)?
            && let Some(c) = self.configs.get(&desc.digest)
        {
            return Ok(c.clone());
        }
        let bytes = self.read_metadata(desc, what)?;
        let config = ImageConfig::from_slice(&bytes).map_err(|e| match e {
            Error::Json { source, .. } => Error::Json {
                what: format!("{what} ({})", desc.digest),
                source,
            },
            other => other,
        })?;
        self.report.configs += 1;
        self.configs.insert(desc.digest.clone(), config.clone());
        Ok(config)
    }

    fn layer(
        &mut self,
        layer: &Descriptor,
        what: &str,
        index: usize,
        expected_diff_id: Option<&Digest>,
    ) -> Result<(), Error> {
        let decode = match expected_diff_id {
            None => None,
            Some(d) => Some((
                media_type::layer_compression(&layer.media_type).ok_or_else(|| {
                    Error::UnsupportedMediaType {
                        what: what.to_string(),
                        media_type: layer.media_type.clone(),
                    }
                })?,
                d.algorithm(),
            )),
        };
        let key = decode.map(|(c, a)| (layer.digest.clone(), c, a));
        let cached = key
            .as_ref()
            .and_then(|k| self.layer_diff_ids.get(k).cloned());
        let diff_id = match (self.seen(layer, what)?, decode, cached) {
            (true, None, _) => return Ok(()),
            (true, Some(_), Some(d)) => d,
            _ => {
                let streamed = match self.stream(layer, what, decode) {
                    Err(Error::MissingBlob { .. })
                        if media_type::is_foreign_layer(&layer.media_type)
                            && layer.urls.as_ref().is_some_and(|u| !u.is_empty()) =>
                    {
                        self.report.foreign_layers_skipped += 1;
                        return Ok(());
                    }
                    other => other?,
                };
                let Streamed {
                    size,
                    digest,
                    uncompressed,
                } = streamed;
                check_size_and_digest(layer, what, size, digest)?;
                if self.record(layer, size) {
                    self.report.layers += 1;
                }
                match (key, uncompressed) {
                    (Some(k), Some((d, n))) => {
                        self.report.uncompressed_bytes += n;
                        self.layer_diff_ids.insert(k, d.clone());
                        d
                    }
                    _ => return Ok(()),
                }
            }
        };
        if let Some(expected) = expected_diff_id {
            if *expected != diff_id {
                return Err(Error::DiffIdMismatch {
                    what: what.to_string(),
                    index,
                    expected: expected.clone(),
                    actual: diff_id,
                });
            }
            self.report.diff_ids += 1;
        }
        Ok(())
    }

    /// Read a blob to its end, returning its size and digest and, when `compression` is given,
    /// the digest (with the given algorithm) and size of its decompressed content. Decompression problems are reported only
    /// when the stored bytes themselves are right, since a damaged blob explains them.
    fn stream(
        &self,
        desc: &Descriptor,
        what: &str,
        decode: Option<(Compression, Algorithm)>,
    ) -> Result<Streamed, Error> {
        let mut raw = HashingReader {
            inner: self.open(desc, what)?,
            hasher: desc.digest.algorithm().hasher(),
            len: 0,
            error: None,
        };
        let decompressed = decode.map(|(c, alg)| {
            let mut out = CountingHasher {
                hasher: alg.hasher(),
                len: 0,
            };
            let result = match c {
                Compression::None => io::copy(&mut raw, &mut out),
                Compression::Gzip => {
                    io::copy(&mut flate2::read::MultiGzDecoder::new(&mut raw), &mut out)
                }
                Compression::Zstd => zstd::stream::read::Decoder::new(&mut raw)
                    .and_then(|mut d| io::copy(&mut d, &mut out)),
            };
            (c, result.map(|_| out))
        });
        // Whatever the decoder left (trailing bytes, or all of it after an error) is part of
        // the blob too.
        let drained = io::copy(&mut raw, &mut io::sink());
        let read_error = |source| Error::BlobRead {
            what: what.to_string(),
            digest: desc.digest.clone(),
            source,
        };
        if let Some(source) = raw.error.take() {
            return Err(read_error(source));
        }
        drained.map_err(read_error)?;
        let (size, digest) = (raw.len, raw.hasher.finish());
        let uncompressed = match decompressed {
            None => None,
            Some((c, result)) => match result {
                Ok(out) => Some((out.hasher.finish(), out.len)),
                Err(source) => {
                    check_size_and_digest(desc, what, size, digest)?;
                    return Err(Error::Decompress {
                        what: what.to_string(),
                        digest: desc.digest.clone(),
                        compression: c,
                        source,
                    });
                }
            },
        };
        Ok(Streamed {
            size,
            digest,
            uncompressed,
        })
    }
}

/// What reading a blob to its end found.
struct Streamed {
    size: u64,
    digest: Digest,
    /// Digest and size of the decompressed content, when asked for.
    uncompressed: Option<(Digest, u64)>,
}

fn check_size_and_digest(
    desc: &Descriptor,
    what: &str,
    size: u64,
    digest: Digest,
) -> Result<(), Error> {
    if size != desc.size {
        return Err(Error::SizeMismatch {
            what: what.to_string(),
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: size,
        });
    }
    if digest != desc.digest {
        return Err(Error::DigestMismatch {
            what: what.to_string(),
            expected: desc.digest.clone(),
            actual: digest,
        });
    }
    Ok(())
}

/// Hashes and counts what is read through it; keeps the source's own error aside so that it is
/// not mistaken for a decompression error when a decoder sits on top.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    len: u64,
    error: Option<io::Error>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.error.is_some() {
            return Err(io::Error::other("blob read failed earlier"));
        }
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.len += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kind = e.kind();
                self.error = Some(e);
                Err(io::Error::new(kind, "blob read failed"))
            }
        }
    }
}

struct CountingHasher {
    hasher: Hasher,
    len: u64,
}

impl io::Write for CountingHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Platform, to_canonical_json};
    use std::io::Write;

    type Blobs = BTreeMap<Digest, Vec<u8>>;

    fn put(blobs: &mut Blobs, media_type: &str, bytes: Vec<u8>) -> Descriptor {
        let d = Descriptor::new(media_type, Digest::sha256(&bytes), bytes.len() as u64);
        blobs.insert(d.digest.clone(), bytes);
        d
    }

    /// A real one-file layer tar.
    fn tar_of(name: &str, content: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, content).unwrap();
        b.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    struct Image {
        blobs: Blobs,
        index: Descriptor,
        manifest: Descriptor,
        layers: Vec<Descriptor>,
        tars: Vec<Vec<u8>>,
    }

    /// An index → manifest → config + three layers (gzip, zstd, plain), with hooks to damage it.
    fn image(
        config_hook: impl FnOnce(&mut ImageConfig),
        manifest_hook: impl FnOnce(&mut Manifest, &mut Blobs),
    ) -> Image {
        let mut blobs = Blobs::new();
        let tars = vec![
            tar_of("etc/hello", b"hello\n"),
            tar_of("bin/app", &[7u8; 3000]),
            tar_of("srv/data", b"plain"),
        ];
        let layers = vec![
            put(&mut blobs, media_type::OCI_LAYER_GZIP, gzip(&tars[0])),
            put(
                &mut blobs,
                media_type::OCI_LAYER_ZSTD,
                zstd::encode_all(tars[1].as_slice(), 3).unwrap(),
            ),
            put(&mut blobs, media_type::OCI_LAYER_TAR, tars[2].clone()),
        ];
        let mut config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..ImageConfig::default()
        };
        config.rootfs.diff_ids = tars.iter().map(|t| Digest::sha256(t)).collect();
        config_hook(&mut config);
        let config = put(
            &mut blobs,
            media_type::OCI_CONFIG,
            to_canonical_json(&config),
        );
        let mut m = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            artifact_type: None,
            config,
            layers: layers.clone(),
            subject: None,
            annotations: None,
        };
        manifest_hook(&mut m, &mut blobs);
        let manifest = put(&mut blobs, media_type::OCI_MANIFEST, to_canonical_json(&m));
        let mut entry = manifest.clone();
        entry.platform = Some(Platform::host());
        let index = index_of(&mut blobs, vec![entry]);
        Image {
            blobs,
            index,
            manifest,
            layers,
            tars,
        }
    }

    fn index_of(blobs: &mut Blobs, entries: Vec<Descriptor>) -> Descriptor {
        let mut i = Index::new();
        i.manifests = entries;
        put(blobs, media_type::OCI_INDEX, to_canonical_json(&i))
    }

    fn intact() -> Image {
        image(|_| {}, |_, _| {})
    }

    #[test]
    fn a_sound_image_passes_and_the_report_counts_everything() {
        let img = intact();
        let r = validate_image(&img.blobs, &img.index).unwrap();
        assert_eq!(
            (r.indexes, r.manifests, r.configs, r.layers, r.diff_ids),
            (1, 1, 1, 3, 3)
        );
        assert_eq!(
            r.bytes,
            img.blobs.values().map(|b| b.len() as u64).sum::<u64>()
        );
        assert_eq!(
            r.uncompressed_bytes,
            img.tars.iter().map(|t| t.len() as u64).sum::<u64>()
        );
        assert_eq!(r.digests, img.blobs.keys().cloned().collect());

        // Starting at the manifest works too.
        let r = validate_image(&img.blobs, &img.manifest).unwrap();
        assert_eq!((r.indexes, r.manifests, r.layers), (0, 1, 3));

        // A manifest listed twice (two platforms) is read once, and so are its layers.
        let mut blobs = img.blobs.clone();
        let twice = index_of(&mut blobs, vec![img.manifest.clone(), img.manifest.clone()]);
        let r = validate_image(&blobs, &twice).unwrap();
        assert_eq!((r.manifests, r.layers), (1, 3));
    }

    #[test]
    fn a_changed_layer_byte_is_a_digest_mismatch() {
        let mut img = intact();
        let blob = img.blobs.get_mut(&img.layers[0].digest).unwrap();
        let mid = blob.len() / 2;
        blob[mid] ^= 0x40;
        let e = validate_image(&img.blobs, &img.index).unwrap_err();
        match &e {
            Error::DigestMismatch {
                what,
                expected,
                actual,
            } => {
                assert!(what.starts_with("layer 0 of manifest"), "{what}");
                assert_eq!(expected, &img.layers[0].digest);
                assert_ne!(actual, expected);
            }
            other => panic!("wrong error: {other}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&img.layers[0].digest.to_string()), "{msg}");
    }

    #[test]
    fn a_wrong_size_is_reported_with_both_sizes() {
        let img = image(|_| {}, |m, _| m.layers[1].size += 1);
        let real = img.layers[1].size;
        let e = validate_image(&img.blobs, &img.index).unwrap_err();
        match &e {
            Error::SizeMismatch {
                what,
                digest,
                expected,
                actual,
            } => {
                assert!(what.starts_with("layer 1 of"), "{what}");
                assert_eq!(digest, &img.layers[1].digest);
                assert_eq!((*expected, *actual), (real + 1, real));
            }
            other => panic!("wrong error: {other}"),
        }
    }

    #[test]
    fn a_wrong_diff_id_is_caught_for_each_compression() {
        for n in 0..3 {
            let bogus = Digest::sha256(b"not this layer");
            let img = image(|c| c.rootfs.diff_ids[n] = bogus.clone(), |_, _| {});
            let e = validate_image(&img.blobs, &img.index).unwrap_err();
            match &e {
                Error::DiffIdMismatch {
                    what,
                    index,
                    expected,
                    actual,
                } => {
                    assert!(what.starts_with(&format!("layer {n} of")), "{what}");
                    assert_eq!(*index, n);
                    assert_eq!(expected, &bogus);
                    assert_eq!(actual, &Digest::sha256(&img.tars[n]));
                }
                other => panic!("layer {n}: wrong error: {other}"),
            }
        }
    }

    #[test]
    fn a_diff_id_count_that_does_not_match_the_layers_is_refused() {
        let img = image(|c| drop(c.rootfs.diff_ids.pop()), |_, _| {});
        let e = validate_image(&img.blobs, &img.index).unwrap_err();
        assert!(
            matches!(
                e,
                Error::DiffIdCount {
                    diff_ids: 2,
                    layers: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn missing_blobs_are_named() {
        let mut img = intact();
        img.blobs.remove(&img.layers[2].digest);
        let e = validate_image(&img.blobs, &img.index).unwrap_err();
        match &e {
            Error::MissingBlob { what, digest } => {
                assert!(what.starts_with("layer 2 of"), "{what}");
                assert_eq!(digest, &img.layers[2].digest);
            }
            other => panic!("wrong error: {other}"),
        }

        let mut img = intact();
        img.blobs.remove(&img.manifest.digest);
        let e = validate_image(&img.blobs, &img.index).unwrap_err();
        assert!(
            matches!(&e, Error::MissingBlob { what, .. } if what.starts_with("entry 0 of index")),
            "{e}"
        );
    }

    #[test]
    fn a_layer_that_does_not_decompress_is_reported_as_such() {
        // Digest and size are right, but the bytes are not gzip.
        let img = image(
            |_| {},
            |m, blobs| {
                m.layers[0] = put(
                    blobs,
                    media_type::OCI_LAYER_GZIP,
                    b"not gzip at all".to_vec(),
                );
            },
        );
        let e = validate_image(&img.blobs, &img.index).unwrap_err();
        assert!(
            matches!(&e, Error::Decompress { compression: Compression::Gzip, what, .. } if what.starts_with("layer 0")),
            "{e}"
        );
    }

    #[test]
    fn a_descriptor_media_type_that_contradicts_the_manifest_is_refused() {
        let mut img = intact();
        let mut entry = img.manifest.clone();
        entry.media_type = media_type::DOCKER_MANIFEST.into();
        let index = index_of(&mut img.blobs, vec![entry]);
        let e = validate_image(&img.blobs, &index).unwrap_err();
        assert!(matches!(e, Error::MediaTypeMismatch { .. }), "{e}");
    }

    #[test]
    fn a_failing_source_is_a_read_error_not_a_decompression_error() {
        struct Failing<'a>(&'a Blobs, Digest);
        struct HalfThenFail<'a>(&'a [u8]);
        impl Read for HalfThenFail<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0.len()).min(10);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        impl BlobSource for Failing<'_> {
            fn open(&self, d: &Digest) -> io::Result<Box<dyn Read + '_>> {
                let bytes = self.0.open(d)?;
                if *d == self.1 {
                    let blob = &self.0[d];
                    Ok(Box::new(HalfThenFail(&blob[..blob.len() / 2])))
                } else {
                    Ok(bytes)
                }
            }
        }
        let img = intact();
        let src = Failing(&img.blobs, img.layers[0].digest.clone());
        let e = validate_image(&src, &img.index).unwrap_err();
        match &e {
            Error::BlobRead { what, source, .. } => {
                assert!(what.starts_with("layer 0"), "{what}");
                assert_eq!(source.to_string(), "disk on fire");
            }
            other => panic!("wrong error: {other}"),
        }
    }

    #[test]
    fn a_docker_image_with_a_foreign_layer_validates() {
        // Docker media types throughout; the foreign layer is absent but has URLs.
        let mut blobs = Blobs::new();
        let tar = tar_of("a", b"a");
        let layer = put(&mut blobs, media_type::DOCKER_LAYER_GZIP, gzip(&tar));
        let mut foreign = Descriptor::new(
            media_type::DOCKER_FOREIGN_LAYER_GZIP,
            Digest::sha256(b"elsewhere"),
            9,
        );
        foreign.urls = Some(vec!["https://example.com/layer".into()]);
        let mut config = ImageConfig::default();
        config.rootfs.diff_ids = vec![Digest::sha256(&tar), Digest::sha256(b"x")];
        let config = put(
            &mut blobs,
            media_type::DOCKER_CONFIG,
            to_canonical_json(&config),
        );
        let m = Manifest {
            schema_version: 2,
            media_type: Some(media_type::DOCKER_MANIFEST.into()),
            artifact_type: None,
            config,
            layers: vec![layer, foreign],
            subject: None,
            annotations: None,
        };
        let desc = put(
            &mut blobs,
            media_type::DOCKER_MANIFEST,
            to_canonical_json(&m),
        );
        let r = validate_image(&blobs, &desc).unwrap();
        assert_eq!((r.layers, r.diff_ids, r.foreign_layers_skipped), (1, 1, 1));
    }
}
