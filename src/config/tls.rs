//! The optional `[tls]` table: where the gRPC port's certificate, key and
//! (for mTLS) client CA are read from. Absent, gRPC is served in plaintext.
//! The files themselves are read, checked and watched by `crate::tls`.

use std::path::PathBuf;

use serde::Deserialize;

/// TLS on the gRPC port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: PathBuf,
    /// Certificate authorities (PEM) of client certificates. When set, every
    /// client must present a certificate one of them signed (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn error_of(text: &str) -> String {
        match Config::parse(text) {
            Ok(c) => panic!("config should be rejected: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn absent_means_plaintext() {
        assert_eq!(Config::parse("").unwrap().tls, None);
    }

    #[test]
    fn cert_and_key_with_an_optional_client_ca() {
        let c =
            Config::parse("[tls]\ncert_file = \"/t/tls.crt\"\nkey_file = \"/t/tls.key\"").unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert_file.to_str(), Some("/t/tls.crt"));
        assert_eq!(tls.key_file.to_str(), Some("/t/tls.key"));
        assert_eq!(tls.client_ca_file, None);

        let c = Config::parse(
            "[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"/t/ca.crt\"",
        )
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(
            tls.client_ca_file.as_deref().and_then(|p| p.to_str()),
            Some("/t/ca.crt")
        );
    }

    #[test]
    fn the_commented_example_parses_once_uncommented() {
        let table = crate::config::tests::commented_example("# [tls]");
        let tls = Config::parse(&table)
            .unwrap()
            .tls
            .expect("the example has [tls]");
        assert_eq!(tls.key_file.to_str(), Some("/etc/oci-upstream/tls/tls.key"));
        assert!(tls.client_ca_file.is_some());
    }

    #[test]
    fn unknown_and_missing_keys_name_the_field() {
        let unknown = error_of("[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nca_file = \"x\"");
        assert!(
            unknown.contains("tls") && unknown.contains("ca_file"),
            "{unknown}"
        );
        let missing = error_of("[tls]\ncert_file = \"c\"");
        assert!(
            missing.contains("tls") && missing.contains("key_file"),
            "{missing}"
        );
        let wrong_type = error_of("[tls]\ncert_file = 1\nkey_file = \"k\"");
        assert!(wrong_type.contains("tls.cert_file"), "{wrong_type}");
    }
}
