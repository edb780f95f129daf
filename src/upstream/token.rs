//! Bearer tokens: the token request to a challenge's realm (a GET with the
//! Basic credentials, or the OAuth2 refresh-token form), the lifetime of an
//! answer, and the per-scope cache that holds tokens until shortly before
//! they expire, sharing one token request among concurrent callers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT_ENCODING, AUTHORIZATION};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::auth::Authorization;
use super::challenge::Challenge;
use super::client::Upstream;
use super::error::{Fault, FaultKind};
use super::http::read_limited;
use crate::metrics::Operation;
use crate::secret::Secret;

/// Most bytes read from a token endpoint's answer.
const TOKEN_BODY_LIMIT: usize = 64 * 1024;
/// Token lifetime when the token endpoint does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest safety margin taken off a token's lifetime.
const MAX_MARGIN: Duration = Duration::from_secs(30);
/// Longest a token is kept, whatever its answer says (an `expires_in` of
/// 2^63 must not overflow a clock, nor keep a token for ever).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Scopes past which the cache is swept of slots that hold no live token
/// and nobody waits on: one slot per repository pulled, so it must not grow
/// with every name callers try.
const SWEEP_AT: usize = 4096;

#[derive(Debug)]
struct Cached {
    token: Secret,
    expires_at: Instant,
}

type Slot = Arc<Mutex<Option<Cached>>>;

/// Tokens by scope.
#[derive(Debug, Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Slot>>,
}

impl TokenCache {
    async fn slot(&self, scope: &str) -> Slot {
        let mut slots = self.slots.lock().await;
        if let Some(slot) = slots.get(scope) {
            return slot.clone();
        }
        if slots.len() >= SWEEP_AT {
            let now = Instant::now();
            // A slot in use (locked, or held by a caller) stays; an idle one
            // stays only while its token is live.
            slots.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot
                        .try_lock()
                        .map_or(true, |c| c.as_ref().is_some_and(|c| now < c.expires_at))
            });
        }
        slots.entry(scope.to_owned()).or_default().clone()
    }

    #[cfg(test)]
    async fn len(&self) -> usize {
        self.slots.lock().await.len()
    }

    /// The cached, unexpired token for `scope`, if any.
    pub async fn get(&self, scope: &str) -> Option<Secret> {
        let slot = self.slot(scope).await;
        let cached = slot.lock().await;
        cached
            .as_ref()
            .filter(|c| Instant::now() < c.expires_at)
            .map(|c| c.token.clone())
    }

    /// The cached token for `scope`, or a new one from `fetch` (which yields
    /// the token and its lifetime). Concurrent callers for one scope share a
    /// single `fetch`.
    pub async fn get_or_fetch<E, F, Fut>(&self, scope: &str, fetch: F) -> Result<Secret, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Secret, Duration), E>>,
    {
        let slot = self.slot(scope).await;
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.expires_at) {
            return Ok(c.token.clone());
        }
        let (token, lifetime) = fetch().await?;
        let margin = (lifetime / 4).min(MAX_MARGIN);
        *cached = Some(Cached {
            token: token.clone(),
            expires_at: Instant::now() + lifetime.saturating_sub(margin),
        });
        Ok(token)
    }

    /// Drops `token` for `scope` (the upstream refused it), unless another
    /// request already replaced it.
    pub async fn invalidate(&self, scope: &str, token: &Secret) {
        let slot = self.slot(scope).await;
        let mut cached = slot.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == *token) {
            *cached = None;
        }
    }
}

/// How long a token answer stays usable from `now`: `expires_in` seconds
/// (default 60) counted from `issued_at` when the answer has one (RFC 3339,
/// UTC). An `issued_at` in the future, or one older than the whole lifetime,
/// says more about the two clocks than about the token and is ignored (the
/// lifetime then counts from now; a token the registry refuses is dropped
/// and fetched again anyway).
fn token_lifetime(
    expires_in: Option<&serde_json::Number>,
    issued_at: Option<&str>,
    now: std::time::SystemTime,
) -> Duration {
    // Seconds as the answer wrote them: a whole number, or a fraction;
    // zero, negative or unusable means "not said".
    let seconds = expires_in.and_then(|n| {
        n.as_u64().map(Duration::from_secs).or_else(|| {
            let f = n.as_f64().filter(|f| *f > 0.0)?;
            // Too large for a Duration: as long as can be (clamped below).
            Some(Duration::try_from_secs_f64(f).unwrap_or(Duration::MAX))
        })
    });
    let lifetime = seconds
        .filter(|d| !d.is_zero())
        .map_or(DEFAULT_TOKEN_LIFETIME, |d| d.min(MAX_TOKEN_LIFETIME));
    let age = issued_at
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|issued| now.duration_since(issued).ok())
        .filter(|&age| age < lifetime);
    lifetime - age.unwrap_or_default()
}

impl Upstream {
    /// A token for `scope` from the cache or from the challenge's realm.
    pub(super) async fn token(&self, challenge: &Challenge, scope: &str) -> Result<Secret, Fault> {
        let realm = challenge.param("realm").unwrap_or_default();
        let realm = Url::parse(realm).map_err(|_| {
            Fault::unavailable(format!(
                "upstream `{}` sent an unusable token realm {realm:?}",
                self.name
            ))
        })?;
        self.check_realm(&realm).await?;
        let scope = if scope.is_empty() {
            challenge.param("scope").unwrap_or_default()
        } else {
            scope
        };
        let service = challenge.param("service");
        self.tokens
            .get_or_fetch(scope, || async move {
                let fetched = self.fetch_token(realm, service, scope).await;
                self.metrics.token_request(&self.name, fetched.is_ok());
                fetched
            })
            .await
    }

    /// The token request to `realm`: the OAuth2 refresh-token form when a
    /// refresh token is configured, else a GET with the Basic credentials
    /// (when any).
    fn token_request(
        &self,
        mut realm: Url,
        service: Option<&str>,
        scope: &str,
    ) -> Result<reqwest::RequestBuilder, Fault> {
        let credentials = self.resolved()?;
        Ok(if let Some(refresh) = &credentials.refresh_token {
            // OAuth2 form, as for a Docker config's `identitytoken`.
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", refresh.expose())
                .append_pair("client_id", "oci-upstream");
            if let Some(service) = service {
                form.append_pair("service", service);
            }
            if !scope.is_empty() {
                form.append_pair("scope", scope);
            }
            self.token_http
                .post(realm)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(form.finish())
        } else {
            {
                let mut query = realm.query_pairs_mut();
                if let Some(service) = service {
                    query.append_pair("service", service);
                }
                if !scope.is_empty() {
                    query.append_pair("scope", scope);
                }
            }
            let builder = self.token_http.get(realm);
            match credentials.basic {
                Some(basic) => builder.header(AUTHORIZATION, Authorization::Basic(basic).header()),
                None => builder,
            }
        })
    }

    pub(super) async fn fetch_token(
        &self,
        realm: Url,
        service: Option<&str>,
        scope: &str,
    ) -> Result<(Secret, Duration), Fault> {
        let what = format!("a token for `{scope}`");
        let builder = self.token_request(realm, service, scope)?;
        let builder = builder.header(ACCEPT_ENCODING, "identity");
        let started = Instant::now();
        let response = self.timed(&what, builder.send()).await;
        self.count(Operation::Token, response.as_ref().ok(), started);
        let response = response?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Fault::new(
                FaultKind::Denied,
                format!(
                    "token endpoint of upstream `{}` refused {what} (HTTP {})",
                    self.name,
                    status.as_u16()
                ),
            ));
        }
        if !status.is_success() {
            return Err(Fault::unavailable(format!(
                "token endpoint of upstream `{}` answered HTTP {} for {what}",
                self.name,
                status.as_u16()
            )));
        }
        let body = read_limited(response, TOKEN_BODY_LIMIT)
            .await
            .map_err(|e| self.read_fault(&what, e))?;
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<serde_json::Number>,
            issued_at: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            Fault::unavailable(format!(
                "token endpoint of upstream `{}` sent an answer that is not a token",
                self.name
            ))
        })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Fault::unavailable(format!(
                    "token endpoint of upstream `{}` sent no token",
                    self.name
                ))
            })?;
        let lifetime = token_lifetime(
            parsed.expires_in.as_ref(),
            parsed.issued_at.as_deref(),
            std::time::SystemTime::now(),
        );
        Ok((Secret::new(token), lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn caches_until_shortly_before_expiry() {
        let cache = TokenCache::default();
        let calls = AtomicUsize::new(0);
        let fetch = || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>((Secret::new(format!("t{n}")), Duration::from_secs(60)))
        };
        assert_eq!(cache.get_or_fetch("s", fetch).await.unwrap().expose(), "t0");
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(cache.get_or_fetch("s", fetch).await.unwrap().expose(), "t0");
        assert_eq!(cache.get("s").await.unwrap().expose(), "t0");
        // 60 s lifetime, 15 s margin: stale after 45 s.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(cache.get("s").await.is_none());
        assert_eq!(cache.get_or_fetch("s", fetch).await.unwrap().expose(), "t1");
        assert_eq!(
            cache.get_or_fetch("other", fetch).await.unwrap().expose(),
            "t2"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(TokenCache::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch("s", || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, ()>((Secret::new("t"), Duration::from_secs(60)))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().expose(), "t");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn invalidate_drops_only_the_refused_token() {
        let cache = TokenCache::default();
        let t = cache
            .get_or_fetch("s", || async {
                Ok::<_, ()>((Secret::new("a"), Duration::from_secs(60)))
            })
            .await
            .unwrap();
        cache.invalidate("s", &Secret::new("other")).await;
        assert!(cache.get("s").await.is_some());
        cache.invalidate("s", &t).await;
        assert!(cache.get("s").await.is_none());
    }

    #[test]
    fn token_lifetime_counts_from_issued_at_unless_the_clocks_disagree() {
        let now = humantime::parse_rfc3339("2026-11-29T10:00:00Z").unwrap();
        let secs = Duration::from_secs;
        for (expires_in, issued_at, want) in [
            (None, None, secs(60)),
            (Some("-5"), None, secs(60)),
            (Some("1.5"), None, Duration::from_millis(1500)),
            // Clamped: no overflow, no token kept for ever.
            (Some("9223372036854775808"), None, secs(24 * 3600)),
            (Some("1e300"), None, secs(24 * 3600)),
            (Some("0"), None, secs(60)),
            (Some("300"), None, secs(300)),
            (Some("300"), Some("2026-11-29T09:58:00Z"), secs(180)),
            (
                Some("300"),
                Some("2026-11-29T09:59:59.500Z"),
                Duration::from_millis(299_500),
            ),
            // In the future, or older than the lifetime: clock skew, ignored.
            (Some("300"), Some("2026-11-29T10:01:00Z"), secs(300)),
            (Some("300"), Some("2026-11-29T09:50:00Z"), secs(300)),
            // Not RFC 3339 in UTC: ignored.
            (Some("300"), Some("yesterday"), secs(300)),
        ] {
            assert_eq!(
                token_lifetime(
                    expires_in
                        .map(|n| n.parse::<serde_json::Number>().unwrap())
                        .as_ref(),
                    issued_at,
                    now
                ),
                want,
                "{expires_in:?} {issued_at:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_scopes_without_a_live_token_are_swept() {
        let cache = TokenCache::default();
        let fetch = || async { Ok::<_, ()>((Secret::new("t"), Duration::from_secs(60))) };
        for i in 0..SWEEP_AT {
            cache.get_or_fetch(&format!("s{i}"), fetch).await.unwrap();
        }
        // Every token is live: nothing may go.
        cache.get_or_fetch("one-more", fetch).await.unwrap();
        assert_eq!(cache.len().await, SWEEP_AT + 1);
        tokio::time::advance(Duration::from_secs(61)).await;
        for i in 0..10 * SWEEP_AT {
            assert!(cache.get(&format!("miss{i}")).await.is_none());
        }
        assert!(cache.len().await <= SWEEP_AT, "{} slots", cache.len().await);
    }
}
