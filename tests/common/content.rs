//! Test content: the media types, an independent sha256 (the `sha2` crate,
//! not the service's digest code, so a bug there cannot hide in both),
//! deterministic incompressible bytes, and builders for image manifests and
//! indexes.
//!
//! ```ignore
//! let layer = pseudo_random_bytes(7, 3000);
//! let config = Descriptor::of(OCI_CONFIG, b"{}");
//! let manifest = manifest_json(OCI_MANIFEST, &config, &[Descriptor::of(OCI_LAYER, &layer)]);
//! let index = index_json(OCI_INDEX, &[Descriptor::of(OCI_MANIFEST, &manifest).platform("linux", "amd64", None)]);
//! ```

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker image manifest (schema 2) media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer media type.
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `sha256:<hex>` of what `hasher` has seen.
pub fn sha256_finish(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Deterministic incompressible bytes (xorshift64*), `len` of them.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    XorShift::new(seed).fill(&mut out);
    out
}

/// As [`pseudo_random_bytes`], as [`Bytes`].
pub fn random_blob(seed: u64, len: usize) -> Bytes {
    Bytes::from(pseudo_random_bytes(seed, len))
}

/// A tiny deterministic generator (xorshift64*): fast, reproducible, and its
/// output does not compress.
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> XorShift {
        XorShift((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf`; consecutive calls continue the same sequence as long as
    /// every buffer but the last has a length divisible by 8.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let word = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&word[..rest.len()]);
        }
    }
}

/// A stable seed from a string (FNV-1a).
pub fn seed_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An OCI content descriptor: media type, digest and size of some bytes,
/// and for an index entry its platform.
#[derive(Clone, Debug)]
pub struct Descriptor {
    /// `mediaType`.
    pub media_type: String,
    /// `digest` (`sha256:...`).
    pub digest: String,
    /// `size` in bytes.
    pub size: usize,
    /// `platform` (index entries only).
    pub platform: Option<serde_json::Value>,
}

impl Descriptor {
    /// The descriptor of `data` as `media_type`.
    pub fn of(media_type: &str, data: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest: sha256_digest(data),
            size: data.len(),
            platform: None,
        }
    }

    /// With a `platform` (`variant` left out when `None`).
    pub fn platform(mut self, os: &str, architecture: &str, variant: Option<&str>) -> Descriptor {
        let mut platform = json!({ "architecture": architecture, "os": os });
        if let Some(variant) = variant {
            platform["variant"] = variant.into();
        }
        self.platform = Some(platform);
        self
    }

    fn json(&self) -> serde_json::Value {
        let mut value = json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        });
        if let Some(platform) = &self.platform {
            value["platform"] = platform.clone();
        }
        value
    }
}

/// An image manifest (OCI or Docker schema 2, by `media_type`) over a config
/// and layers.
pub fn manifest_json(media_type: &str, config: &Descriptor, layers: &[Descriptor]) -> Bytes {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.json(),
        "layers": layers.iter().map(Descriptor::json).collect::<Vec<_>>(),
    });
    Bytes::from(serde_json::to_vec(&manifest).expect("JSON serializes"))
}

/// An index (OCI index or Docker manifest list, by `media_type`) over
/// `manifests`.
pub fn index_json(media_type: &str, manifests: &[Descriptor]) -> Bytes {
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests.iter().map(Descriptor::json).collect::<Vec<_>>(),
    });
    Bytes::from(serde_json::to_vec(&index).expect("JSON serializes"))
}

/// An image config for `os`/`architecture` (and `variant`) with `diff_ids`,
/// labelled with `label` so that different images differ.
pub fn config_json(
    os: &str,
    architecture: &str,
    variant: Option<&str>,
    diff_ids: &[String],
    label: &str,
) -> Bytes {
    let mut config = json!({
        "architecture": architecture,
        "os": os,
        "config": { "Labels": { "test.label": label } },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    if let Some(variant) = variant {
        config["variant"] = variant.into();
    }
    Bytes::from(serde_json::to_vec(&config).expect("JSON serializes"))
}

/// An image manifest of `media_type` (OCI or Docker schema 2) unique to
/// `seed`, whose config and `layers` layer entries describe small contents
/// derived from `seed` (not served anywhere: for upstreams that serve the
/// manifest alone).
pub fn image_manifest_of(media_type: &str, seed: &str, layers: usize) -> Bytes {
    let (config_type, layer_type) = if media_type == DOCKER_MANIFEST {
        (DOCKER_CONFIG, DOCKER_LAYER)
    } else {
        (OCI_CONFIG, OCI_LAYER)
    };
    let layers: Vec<Descriptor> = (0..layers)
        .map(|i| Descriptor::of(layer_type, format!("layer {i} of {seed}").as_bytes()))
        .collect();
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    let config = config_json("linux", "amd64", None, &diff_ids, seed);
    manifest_json(media_type, &Descriptor::of(config_type, &config), &layers)
}

/// An OCI image manifest unique to `seed` with `layers` layer entries; see
/// [`image_manifest_of`].
pub fn image_manifest(seed: &str, layers: usize) -> Bytes {
    image_manifest_of(OCI_MANIFEST, seed, layers)
}
