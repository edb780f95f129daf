//! One `[[callers]]` entry: who may call the service (a bearer token read
//! from a file or the environment, or a client certificate's SAN), which
//! repositories it may read, and whether it may use AdminService.

use std::path::PathBuf;

use serde::Deserialize;

use super::upstream::{all_repositories, secret_source};
use crate::glob::Glob;
use crate::secret::SecretSource;

/// How a caller proves who it is.
#[derive(Debug, Clone)]
pub enum CallerCredential {
    /// `authorization: Bearer <token>` with the token read from here
    /// (`token_file`, re-read when it changes, or `token_env`).
    Token(SecretSource),
    /// A client certificate (mTLS) naming this URI or DNS SAN.
    CertificateSan(String),
}

/// One caller of the service.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawCaller")]
pub struct CallerConfig {
    /// Unique name, shown in logs.
    pub name: String,
    /// How it authenticates.
    pub credential: CallerCredential,
    /// Repository globs it may read.
    pub repositories: Vec<Glob>,
    /// Globs it may not read.
    pub exclude: Vec<Glob>,
    /// May call AdminService.
    pub admin: bool,
}

/// `[[callers]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: String,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    certificate_san: Option<String>,
    #[serde(default = "all_repositories")]
    repositories: Vec<Glob>,
    #[serde(default)]
    exclude: Vec<Glob>,
    #[serde(default)]
    admin: bool,
}

impl TryFrom<RawCaller> for CallerConfig {
    type Error = String;

    fn try_from(raw: RawCaller) -> Result<Self, String> {
        if raw.name.is_empty() {
            return Err("name must not be empty".to_owned());
        }
        let credential = match raw.certificate_san {
            Some(_) if raw.token_file.is_some() || raw.token_env.is_some() => {
                return Err(
                    "set either a token (token_file or token_env) or certificate_san, not both"
                        .to_owned(),
                );
            }
            Some(san) if san.is_empty() => {
                return Err("certificate_san must not be empty".to_owned());
            }
            Some(san) => CallerCredential::CertificateSan(san),
            None => CallerCredential::Token(
                secret_source(raw.token_file, raw.token_env, "token")
                    .map_err(|e| format!("{e} (or certificate_san)"))?,
            ),
        };
        Ok(Self {
            name: raw.name,
            credential,
            repositories: raw.repositories,
            exclude: raw.exclude,
            admin: raw.admin,
        })
    }
}
