//! Content digests (`algorithm:hex`) and the incremental verifier that hashes
//! bytes as they stream past.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use super::ParseError;

/// A digest algorithm the service can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// SHA-256, the algorithm every registry uses.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The algorithm's name in a digest string.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// A fresh incremental hasher for this algorithm.
    pub fn verifier(self) -> Verifier {
        match self {
            Algorithm::Sha256 => Verifier::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Verifier::Sha512(sha2::Sha512::new()),
        }
    }

    /// The digest of `bytes` under this algorithm.
    pub fn digest(self, bytes: &[u8]) -> Digest {
        let mut verifier = self.verifier();
        verifier.update(bytes);
        verifier.finish()
    }
}

/// A validated content digest such as `sha256:6c3c...`: a known algorithm and
/// exactly as many lowercase hex digits as it produces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    algorithm: Algorithm,
    /// The whole `algorithm:hex` string.
    text: String,
}

impl Digest {
    /// Parses `algorithm:hex`.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(ParseError::new(
                "digest must be algorithm:hex, e.g. sha256:<64 hex digits>",
                s,
            ));
        };
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => {
                return Err(ParseError::new(
                    "unknown digest algorithm (sha256 and sha512 are supported)",
                    s,
                ));
            }
        };
        if hex.len() != algorithm.hex_len() {
            return Err(ParseError::new(
                match algorithm {
                    Algorithm::Sha256 => "sha256 digest must have 64 hex digits",
                    Algorithm::Sha512 => "sha512 digest must have 128 hex digits",
                },
                s,
            ));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(ParseError::new(
                "digest hex must be lowercase hexadecimal digits",
                s,
            ));
        }
        Ok(Self {
            algorithm,
            text: s.to_owned(),
        })
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The full `algorithm:hex` string.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.text[self.algorithm.name().len() + 1..]
    }

    /// True when `bytes` hash to this digest.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        self.algorithm.digest(bytes) == *self
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Hashes bytes incrementally as they pass, then yields their digest.
#[derive(Clone)]
pub enum Verifier {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl Verifier {
    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Verifier::Sha256(h) => h.update(bytes),
            Verifier::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Verifier::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Verifier::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest {
            algorithm,
            text: format!("{}:{hex}", algorithm.name()),
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verifier::Sha256(_) => f.write_str("Verifier(sha256)"),
            Verifier::Sha512(_) => f.write_str("Verifier(sha512)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_valid_digests() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex().len(), 64);
        let long = format!("sha512:{}", "a".repeat(128));
        assert_eq!(Digest::parse(&long).unwrap().algorithm(), Algorithm::Sha512);
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &EMPTY_SHA256.to_uppercase().replace("SHA256", "sha256"),
            &format!("md5:{}", "a".repeat(32)),
            &format!("sha256:{}", "a".repeat(65)),
            &format!("sha512:{}", "a".repeat(64)),
            &format!("sha256:{}g", "a".repeat(63)),
            &format!("sha256:{}/", "a".repeat(63)),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn verifier_matches_one_shot_hash() {
        let mut v = Algorithm::Sha256.verifier();
        v.update(b"");
        assert_eq!(v.finish().as_str(), EMPTY_SHA256);
        let mut v = Algorithm::Sha256.verifier();
        v.update(b"hello ");
        v.update(b"world");
        assert_eq!(v.finish(), Algorithm::Sha256.digest(b"hello world"));
        assert!(Digest::parse(EMPTY_SHA256).unwrap().matches(b""));
        assert!(!Digest::parse(EMPTY_SHA256).unwrap().matches(b"x"));
    }
}
