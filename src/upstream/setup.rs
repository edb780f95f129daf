//! What setting up an upstream can fail on ([`ClientError`]), and reading
//! its `ca_file`: a PEM bundle trusted on top of the built-in roots.

use std::path::{Path, PathBuf};

/// Why an upstream could not be set up. The text names the upstream and
/// the key at fault; the source says why.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// `ca_file` could not be used.
    #[error("upstream `{name}`: ca_file {}: {source}", path.display())]
    CaFile {
        /// The upstream.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why it could not be used.
        source: CaFileError,
    },
    /// `proxy` is not a usable proxy URL.
    #[error("upstream `{name}`: invalid proxy: {source}")]
    Proxy {
        /// The upstream.
        name: String,
        /// The client's complaint.
        source: reqwest::Error,
    },
    /// The HTTP client could not be built (no TLS backend, for one).
    #[error("upstream `{name}`: cannot build HTTP client: {source}")]
    Client {
        /// The upstream.
        name: String,
        /// The client's complaint.
        source: reqwest::Error,
    },
}

/// Why a `ca_file` could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaFileError {
    /// The file could not be read.
    #[error(transparent)]
    Read(#[from] std::io::Error),
    /// The PEM could not be parsed.
    #[error(transparent)]
    Pem(#[from] reqwest::Error),
    /// The file holds no certificate (a typo must not silently trust nothing).
    #[error("no PEM certificate in the file")]
    Empty,
}

/// The certificates of a PEM bundle.
pub(crate) fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, CaFileError> {
    let pem = std::fs::read(path)?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)?;
    if certs.is_empty() {
        return Err(CaFileError::Empty);
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use crate::config::UpstreamConfig;
    use crate::upstream::client::Upstream;

    fn build_with_ca_file(contents: Option<&str>) -> Result<Upstream, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        if let Some(contents) = contents {
            std::fs::write(&path, contents).unwrap();
        }
        let mut config = UpstreamConfig::docker_hub();
        config.ca_file = Some(path);
        Upstream::new(&config, 0, Default::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn ca_file_that_is_missing_or_holds_no_certificate_is_refused() {
        for (contents, why) in [
            (None, "No such file"),
            (Some(""), "no PEM certificate"),
            (Some("not a certificate\n"), "no PEM certificate"),
        ] {
            let err = build_with_ca_file(contents).map(drop).expect_err("refused");
            assert!(err.contains("ca_file") && err.contains(why), "{err}");
        }
        let garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = build_with_ca_file(Some(garbled))
            .map(drop)
            .expect_err("refused");
        assert!(err.contains("upstream `hub`"), "{err}");
    }
}
