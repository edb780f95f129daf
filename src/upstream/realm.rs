//! Where credentials may go: the token-realm policy. A realm must be the
//! upstream's own host, share its registrable domain (by the Public Suffix
//! List) or be listed in `realm_hosts`; https unless the upstream itself is
//! http; and never an internal address (by [`super::egress`]'s one
//! classification; literal or resolved, here and again when connecting)
//! unless the upstream is one, so a hostile upstream cannot aim our
//! requests or credentials elsewhere.

use std::net::IpAddr;

use url::Url;

use super::client::Upstream;
use super::egress::{is_internal_host as is_internal, is_internal_ip};
use super::error::Fault;

impl Upstream {
    /// A realm must pass [`realm_allowed`], and when the upstream is not
    /// itself on an internal address, the realm's host must not resolve to one.
    pub(super) async fn check_realm(&self, realm: &Url) -> Result<(), Fault> {
        let refuse = |why: &str| {
            Fault::unavailable(format!(
                "upstream `{}` sent token realm `{}`, which is refused: {why}",
                self.name,
                realm.origin().ascii_serialization()
            ))
        };
        realm_allowed(&self.base, &self.realm_hosts, realm).map_err(refuse)?;
        let base_host = self.base.host_str().unwrap_or_default();
        if self.guard.upstream_is_internal() || is_internal_resolved(base_host).await {
            return Ok(());
        }
        let host = realm.host_str().unwrap_or_default();
        if is_internal_resolved(host).await {
            return Err(refuse(
                "its host resolves to a loopback, private, link-local or otherwise internal address",
            ));
        }
        Ok(())
    }
}

/// The realm policy that needs no DNS: https unless the upstream itself is
/// http; the upstream's host, its registrable domain, or a `realm_hosts`
/// entry; never an internal address literal unless the upstream is internal.
pub(crate) fn realm_allowed(
    base: &Url,
    realm_hosts: &[String],
    realm: &Url,
) -> Result<(), &'static str> {
    match realm.scheme() {
        "https" => {}
        "http" if base.scheme() == "http" => {}
        _ => {
            return Err(
                "credentials go only over https (or http when the upstream itself is http)",
            );
        }
    }
    let (Some(realm_host), Some(base_host)) = (realm.host_str(), base.host_str()) else {
        return Err("it has no host");
    };
    let realm_host = realm_host.to_ascii_lowercase();
    let base_host = base_host.to_ascii_lowercase();
    if is_internal(&realm_host) && !is_internal(&base_host) {
        return Err("it is a loopback, private, link-local or otherwise internal address");
    }
    let allowed = realm_host == base_host
        || realm_hosts.contains(&realm_host)
        || registrable_domain(&realm_host)
            .is_some_and(|d| Some(d) == registrable_domain(&base_host));
    if allowed {
        Ok(())
    } else {
        Err("its host is not the upstream's host, domain, or in `realm_hosts`")
    }
}

/// True when `host` (a URL host) is internal or, as a DNS name, resolves
/// to any internal address. Names that do not resolve are not internal (the
/// request will fail on its own).
async fn is_internal_resolved(host: &str) -> bool {
    if is_internal(host) || host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
        return is_internal(host);
    }
    match tokio::net::lookup_host((host, 0)).await {
        Ok(mut addrs) => addrs.any(|a| is_internal_ip(a.ip())),
        Err(_) => false,
    }
}

/// The registrable domain of a DNS name by the Public Suffix List: one
/// label more than its public suffix (`auth.docker.io` → `docker.io`,
/// `registry.example.co.uk` → `example.co.uk`); none for IP literals, for
/// single-label names and for public suffixes themselves.
fn registrable_domain(host: &str) -> Option<&str> {
    if host.parse::<IpAddr>().is_ok() || host.starts_with('[') || !host.contains('.') {
        return None;
    }
    psl::domain_str(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::client::tests::build;

    fn allowed(upstream: &str, realm: &str) -> bool {
        let upstream = build(upstream, &["auth.example.net"]);
        realm_allowed(
            &upstream.base,
            &upstream.realm_hosts,
            &Url::parse(realm).unwrap(),
        )
        .is_ok()
    }

    #[tokio::test]
    async fn realms_resolving_to_internal_addresses_are_refused() {
        let hub = build("https://registry.example.com", &["localhost"]);
        let realm = Url::parse("https://localhost/token").unwrap();
        assert!(hub.check_realm(&realm).await.is_err());
        let local = build("http://localhost:5000", &[]);
        let realm = Url::parse("http://localhost:5001/token").unwrap();
        assert!(local.check_realm(&realm).await.is_ok());
    }

    #[test]
    fn realm_policy() {
        assert!(allowed(
            "https://registry-1.docker.io",
            "https://auth.docker.io/token"
        ));
        assert!(allowed("https://ghcr.io", "https://ghcr.io/token"));
        assert!(allowed(
            "https://r.example.com",
            "https://auth.example.net/token"
        ));
        assert!(!allowed("https://ghcr.io", "https://evil.example/token"));
        assert!(
            !allowed(
                "https://registry.example.co.uk",
                "https://auth.attacker.co.uk/token"
            ),
            "co.uk is a public suffix, not a shared domain"
        );
        assert!(allowed(
            "https://registry.example.co.uk",
            "https://auth.example.co.uk/token"
        ));
        assert!(
            !allowed("https://ghcr.io", "http://ghcr.io/token"),
            "https downgrade"
        );
        assert!(!allowed("https://ghcr.io", "https://169.254.169.254/token"));
        assert!(!allowed("https://ghcr.io", "https://127.0.0.1/token"));
        assert!(!allowed("https://ghcr.io", "https://localhost/token"));
        assert!(allowed(
            "http://127.0.0.1:5000",
            "http://127.0.0.1:5001/token"
        ));
        assert!(!allowed("http://127.0.0.1:5000", "http://10.0.0.1/token"));
    }

    #[test]
    fn registrable_domains() {
        for (host, domain) in [
            ("auth.docker.io", Some("docker.io")),
            ("docker.io", Some("docker.io")),
            ("registry.example.co.uk", Some("example.co.uk")),
            ("co.uk", None),
            ("registry.corp.internal", Some("corp.internal")),
            ("localhost", None),
            ("10.1.2.3", None),
        ] {
            assert_eq!(registrable_domain(host), domain, "{host}");
        }
    }
}
