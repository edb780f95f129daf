//! `cache.backend` and `[cache.s3]`: where the cache's shared tier lives
//! when replicas share one content store on S3-compatible object storage
//! (DESIGN §8). Credentials are not configured here: they come from the
//! usual AWS environment, web identity or instance metadata.

use serde::{Deserialize, Deserializer};
use url::Url;

use super::ConfigError;

/// `cache.backend`: the disk store alone, or the disk store in front of a
/// bucket shared by every replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// The disk store only (the default).
    #[default]
    Disk,
    /// The disk store as the hot tier, `[cache.s3]` behind it.
    S3,
}

/// `[cache.s3]`: the bucket the replicas share.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket (required).
    pub bucket: String,
    /// Key prefix of every object the service writes (`""`: the bucket's
    /// root).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The S3 API's URL (MinIO, Ceph RGW, GCS's S3 API); absent, AWS in
    /// `region`.
    #[serde(default, deserialize_with = "endpoint")]
    pub endpoint: Option<Url>,
    /// The region requests are signed for.
    #[serde(default = "default_region")]
    pub region: String,
    /// Whether an `http://` endpoint is allowed.
    #[serde(default)]
    pub allow_http: bool,
    /// Virtual-hosted-style requests (`bucket.host`) instead of path-style
    /// (`host/bucket`, what MinIO and Ceph RGW expect).
    #[serde(default)]
    pub virtual_hosted_style: bool,
}

fn default_prefix() -> String {
    "oci-upstream/".to_owned()
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

/// `""` is none; anything else an `http` or `https` URL with a host.
fn endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Url>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let url = Url::parse(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{e} (got {text:?}; a URL such as \"http://minio:9000\")"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(serde::de::Error::custom(format!(
            "an S3 endpoint is an http or https URL with a host (got {text:?})"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(serde::de::Error::custom(
            "an S3 endpoint carries no credentials: they come from the AWS environment",
        ));
    }
    Ok(Some(url))
}

impl S3Config {
    /// Where the objects go, for logs and `check-config`:
    /// `s3://BUCKET/PREFIX at ENDPOINT` (or `in REGION` for AWS).
    pub fn describe(&self) -> String {
        let place = match &self.endpoint {
            Some(endpoint) => format!("at {endpoint}"),
            None => format!("in {}", self.region),
        };
        format!("s3://{}/{} {place}", self.bucket, self.prefix)
    }

    /// The key prefix as path segments (no empty, `.` or `..` segment).
    pub fn prefix_segments(&self) -> impl Iterator<Item = &str> {
        self.prefix.split('/').filter(|s| !s.is_empty())
    }

    /// Checks what types alone cannot; `field` names a key of the table.
    pub(super) fn validate(&self, field: impl Fn(&str) -> String) -> Result<(), ConfigError> {
        if self.bucket.trim().is_empty() {
            return Err(ConfigError::invalid(field("bucket"), "must not be empty"));
        }
        if self.region.trim().is_empty() {
            return Err(ConfigError::invalid(field("region"), "must not be empty"));
        }
        if self.prefix.starts_with('/')
            || self.prefix.contains("//")
            || self.prefix_segments().any(|s| s == "." || s == "..")
        {
            return Err(ConfigError::invalid(
                field("prefix"),
                format!(
                    "a key prefix such as \"oci-upstream/\": no leading `/`, no empty, `.` or `..` segment (got {:?})",
                    self.prefix
                ),
            ));
        }
        if self.endpoint.as_ref().is_some_and(|u| u.scheme() == "http") && !self.allow_http {
            return Err(ConfigError::invalid(
                field("endpoint"),
                "an http:// endpoint needs allow_http = true",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{CacheBackend, Config};

    fn with_cache(cache: &str) -> Result<Config, String> {
        let text = format!("[[upstreams]]\nname = \"a\"\nurl = \"https://a.example\"\n{cache}");
        let config = Config::parse(&text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn the_s3_backend_takes_its_table_with_defaults() {
        let c =
            with_cache("[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"oci-cache\"\n").unwrap();
        assert_eq!(c.cache.backend, CacheBackend::S3);
        let s3 = c.cache.shared().unwrap();
        assert_eq!(s3.bucket, "oci-cache");
        assert_eq!(s3.prefix, "oci-upstream/");
        assert_eq!(s3.region, "us-east-1");
        assert_eq!(s3.endpoint, None);
        assert!(!s3.allow_http && !s3.virtual_hosted_style);
        let disk = with_cache("").unwrap();
        assert_eq!(disk.cache.backend, CacheBackend::Disk);
        assert!(disk.cache.shared().is_none());
    }

    #[test]
    fn the_commented_example_is_valid_once_uncommented() {
        let table = crate::config::tests::commented_example("# [cache.s3]");
        let c = with_cache(&format!("[cache]\nbackend = \"s3\"\n{table}")).unwrap();
        let s3 = c.cache.shared().unwrap();
        assert_eq!(s3.bucket, "oci-cache", "{table}");
        assert_eq!(
            s3.endpoint.as_ref().unwrap().as_str(),
            "http://minio.storage:9000/"
        );
    }

    #[test]
    fn a_bad_s3_table_names_the_key() {
        for (cache, wanted) in [
            (
                "[cache]\nbackend = \"s3\"\n",
                "cache.s3: backend = \"s3\" needs a [cache.s3] table",
            ),
            ("[cache.s3]\nbucket = \"b\"\n", "cache.backend"),
            (
                "[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"\"\n",
                "cache.s3.bucket",
            ),
            (
                "[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"b\"\nprefix = \"/x\"\n",
                "cache.s3.prefix",
            ),
            (
                "[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"b\"\nprefix = \"a/../b\"\n",
                "cache.s3.prefix",
            ),
            (
                "[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"b\"\nendpoint = \"http://minio:9000\"\n",
                "needs allow_http = true",
            ),
            (
                "[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"b\"\nendpoint = \"minio\"\n",
                "cache.s3.endpoint",
            ),
            (
                "[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"b\"\nendpoint = \"http://k:s@minio\"\n",
                "no credentials",
            ),
            (
                "[cache]\nbackend = \"s3\"\n[cache.s3]\nprefix = \"x/\"\n",
                "bucket",
            ),
            ("[cache]\nbackend = \"gcs\"\n", "cache.backend"),
            (
                "[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"b\"\nsecret = \"x\"\n",
                "secret",
            ),
        ] {
            let err = with_cache(cache).unwrap_err();
            assert!(err.contains(wanted), "{cache:?}: {err}");
        }
        let ok = with_cache(
            "[cache]\nbackend = \"s3\"\n[cache.s3]\nbucket = \"b\"\nprefix = \"\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n",
        )
        .unwrap();
        assert_eq!(ok.cache.shared().unwrap().prefix_segments().count(), 0);
    }
}
