//! Caller access (`[[callers]]`): who a call comes from (a bearer token,
//! compared in constant time, or a SAN of the client certificate) and what
//! it may do (read the repositories its globs admit; AdminService when it is
//! `admin`). Token files are re-read when they change. With no callers
//! configured, access is open. Knows nothing of gRPC.

use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::config::{CallerConfig, CallerCredential};
use crate::glob::Rules;
use crate::oci::Repository;
use crate::secret::SecretSource;

/// How long a token read from its file is trusted before the file is read
/// again (a rotated Secret takes effect within this).
const TOKEN_RECHECK: Duration = Duration::from_secs(1);

/// Why a call is refused.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// The call names no caller.
    #[error(
        "this service requires a caller: send `authorization: Bearer <token>` metadata or a client certificate"
    )]
    NoCredentials,
    /// The token or certificate is not a caller's.
    #[error("the token or client certificate is not one of this service's callers")]
    Unknown,
    /// The caller may not read the repository.
    #[error("caller `{caller}` may not read `{repository}`")]
    Repository {
        /// The caller's name.
        caller: String,
        /// The repository.
        repository: String,
    },
    /// The caller may not use AdminService.
    #[error("caller `{0}` may not use AdminService")]
    NotAdmin(String),
}

impl Denied {
    /// True when the caller is not known at all (UNAUTHENTICATED), false
    /// when it is known but refused (PERMISSION_DENIED).
    pub fn is_authentication(&self) -> bool {
        matches!(self, Self::NoCredentials | Self::Unknown)
    }
}

/// What a call presents. `Debug` never shows the token.
#[derive(Clone, Copy, Default)]
pub struct Presented<'a> {
    /// The token of `authorization: Bearer <token>`.
    pub bearer: Option<&'a str>,
    /// URI and DNS SANs of the verified client certificate.
    pub certificate_sans: &'a [String],
}

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presented")
            .field("bearer", &self.bearer.map(|_| "<redacted>"))
            .field("certificate_sans", &self.certificate_sans)
            .finish()
    }
}

/// A token's SHA-256: tokens are compared by their hashes, which have one
/// length, so the time a comparison takes does not tell a token's length.
fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// A token from a file (re-read when [`TOKEN_RECHECK`] has passed) or the
/// environment.
#[derive(Debug)]
struct Token {
    source: SecretSource,
    /// The hash of the value last read and when; `None` inside when it
    /// could not be read.
    read: Mutex<Option<(Option<[u8; 32]>, Instant)>>,
}

impl Token {
    fn new(source: SecretSource) -> Self {
        Self {
            source,
            read: Mutex::new(None),
        }
    }

    /// True when the token with hash `presented` is the current token (in
    /// constant time).
    fn matches(&self, presented: &[u8; 32], caller: &str) -> bool {
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let stale = read
            .as_ref()
            .is_none_or(|(_, at)| now.duration_since(*at) >= TOKEN_RECHECK);
        if stale {
            let value = match self.source.read() {
                Ok(secret) if !secret.expose().is_empty() => {
                    Some(token_hash(secret.expose().as_bytes()))
                }
                Ok(_) => {
                    tracing::warn!(caller, "the caller's token is empty; it matches nothing");
                    None
                }
                Err(why) => {
                    tracing::warn!(caller, error = %why, "cannot read the caller's token");
                    None
                }
            };
            *read = Some((value, now));
        }
        match read.as_ref().and_then(|(value, _)| value.as_ref()) {
            Some(token) => bool::from(token.ct_eq(presented)),
            None => false,
        }
    }
}

#[derive(Debug)]
enum Credential {
    Token(Token),
    CertificateSan(String),
}

/// One configured caller.
#[derive(Debug)]
pub struct Caller {
    name: String,
    credential: Credential,
    rules: Rules,
    admin: bool,
}

/// Who a call comes from.
#[derive(Debug, Clone, Copy)]
pub enum Identity<'a> {
    /// No callers are configured: anyone may do anything.
    Anyone,
    /// A configured caller.
    Caller(&'a Caller),
}

impl Identity<'_> {
    /// The caller's name, when callers are configured.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Anyone => None,
            Self::Caller(c) => Some(&c.name),
        }
    }

    /// May this caller read `repository`?
    pub fn may_read(&self, repository: &Repository) -> Result<(), Denied> {
        match self {
            Self::Anyone => Ok(()),
            Self::Caller(c) if c.rules.admits(repository) => Ok(()),
            Self::Caller(c) => Err(Denied::Repository {
                caller: c.name.clone(),
                repository: repository.to_string(),
            }),
        }
    }

    /// May this caller use AdminService?
    pub fn may_administer(&self) -> Result<(), Denied> {
        match self {
            Self::Anyone => Ok(()),
            Self::Caller(c) if c.admin => Ok(()),
            Self::Caller(c) => Err(Denied::NotAdmin(c.name.clone())),
        }
    }
}

/// The token of an `authorization` value `Bearer <token>` (the scheme in
/// any case), as gRPC metadata and the mirror's HTTP header carry it.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The configured callers.
#[derive(Debug, Default)]
pub struct Access {
    callers: Vec<Caller>,
}

impl Access {
    /// The callers of the config; none means open access.
    pub fn new(callers: &[CallerConfig]) -> Self {
        Self {
            callers: callers
                .iter()
                .map(|c| Caller {
                    name: c.name.clone(),
                    credential: match &c.credential {
                        CallerCredential::Token(source) => {
                            Credential::Token(Token::new(source.clone()))
                        }
                        CallerCredential::CertificateSan(san) => {
                            Credential::CertificateSan(san.clone())
                        }
                    },
                    rules: Rules::new(c.repositories.clone(), c.exclude.clone()),
                    admin: c.admin,
                })
                .collect(),
        }
    }

    /// Who `presented` is. A bearer token, when sent, decides alone; else
    /// the client certificate's SANs.
    pub fn identify(&self, presented: Presented<'_>) -> Result<Identity<'_>, Denied> {
        if self.callers.is_empty() {
            return Ok(Identity::Anyone);
        }
        if let Some(bearer) = presented.bearer {
            // Every token's hash is compared, so the time taken tells
            // neither which caller's token came closest nor a length.
            let bearer = token_hash(bearer.as_bytes());
            let mut found = None;
            for caller in &self.callers {
                if let Credential::Token(token) = &caller.credential {
                    if token.matches(&bearer, &caller.name) && found.is_none() {
                        found = Some(caller);
                    }
                }
            }
            return found.map(Identity::Caller).ok_or(Denied::Unknown);
        }
        if presented.certificate_sans.is_empty() {
            return Err(Denied::NoCredentials);
        }
        self.callers
            .iter()
            .find(|c| {
                matches!(&c.credential, Credential::CertificateSan(san)
                    if presented.certificate_sans.iter().any(|s| s == san))
            })
            .map(Identity::Caller)
            .ok_or(Denied::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_taken_from_the_authorization_value() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }
    use crate::config::Config;

    fn access(callers: &str, dir: &std::path::Path) -> Access {
        let text = callers.replace("DIR", &dir.display().to_string());
        let config = Config::parse(&text).unwrap();
        config.validate().unwrap();
        Access::new(&config.callers)
    }

    fn repo(name: &str) -> Repository {
        Repository::parse(name).unwrap()
    }

    const CALLERS: &str = "[[callers]]\nname = \"a\"\ntoken_file = \"DIR/a\"\nrepositories = [\"team-a/**\"]\n\
        [[callers]]\nname = \"ops\"\ntoken_file = \"DIR/ops\"\nadmin = true\n\
        [[callers]]\nname = \"builder\"\ncertificate_san = \"spiffe://c/sa/builder\"\nexclude = [\"private/**\"]\n\
        [tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\nclient_ca_file = \"/ca\"";

    #[tokio::test]
    async fn tokens_and_certificates_name_callers_and_globs_decide() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "token-a\n").unwrap();
        std::fs::write(dir.path().join("ops"), "token-ops").unwrap();
        let access = access(CALLERS, dir.path());
        let bearer = |t| Presented {
            bearer: Some(t),
            certificate_sans: &[],
        };
        let a = access.identify(bearer("token-a")).unwrap();
        assert_eq!(a.name(), Some("a"));
        assert!(a.may_read(&repo("team-a/x")).is_ok());
        let denied = a.may_read(&repo("private/x")).unwrap_err();
        assert!(!denied.is_authentication());
        assert!(a.may_administer().is_err());
        assert!(
            access
                .identify(bearer("token-ops"))
                .unwrap()
                .may_administer()
                .is_ok()
        );
        let unknown = access.identify(bearer("token-b")).unwrap_err();
        assert!(matches!(unknown, Denied::Unknown) && unknown.is_authentication());
        let none = access.identify(Presented::default()).unwrap_err();
        assert!(matches!(none, Denied::NoCredentials));
        let sans = ["dns:x".to_owned(), "spiffe://c/sa/builder".to_owned()];
        let builder = access
            .identify(Presented {
                bearer: None,
                certificate_sans: &sans,
            })
            .unwrap();
        assert_eq!(builder.name(), Some("builder"));
        assert!(builder.may_read(&repo("team-a/x")).is_ok());
        assert!(builder.may_read(&repo("private/x")).is_err());
        let stranger = ["spiffe://c/sa/other".to_owned()];
        assert!(
            access
                .identify(Presented {
                    bearer: None,
                    certificate_sans: &stranger,
                })
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_token_file_takes_effect_after_the_recheck() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "old").unwrap();
        std::fs::write(dir.path().join("ops"), "x").unwrap();
        let access = access(CALLERS, dir.path());
        let bearer = |t| Presented {
            bearer: Some(t),
            certificate_sans: &[],
        };
        assert!(access.identify(bearer("old")).is_ok());
        std::fs::write(dir.path().join("a"), "new").unwrap();
        tokio::time::advance(TOKEN_RECHECK).await;
        assert!(access.identify(bearer("old")).is_err());
        assert!(access.identify(bearer("new")).is_ok());
        // An empty or missing file matches nothing (not even "").
        std::fs::remove_file(dir.path().join("a")).unwrap();
        tokio::time::advance(TOKEN_RECHECK).await;
        assert!(access.identify(bearer("new")).is_err());
        assert!(access.identify(bearer("")).is_err());
    }

    #[test]
    fn the_token_never_prints() {
        let presented = Presented {
            bearer: Some("hunter2"),
            certificate_sans: &[],
        };
        assert!(!format!("{presented:?}").contains("hunter2"));
    }

    #[test]
    fn no_callers_is_open() {
        let access = Access::new(&[]);
        let anyone = access.identify(Presented::default()).unwrap();
        assert!(anyone.may_read(&repo("private/x")).is_ok());
        assert!(anyone.may_administer().is_ok());
        assert_eq!(anyone.name(), None);
    }
}
