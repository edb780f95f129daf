//! Where an upstream's requests may go. One classification of internal
//! addresses ([`is_internal_ip`], and [`is_internal_host`] for URL hosts),
//! used by the token-realm policy ([`super::realm`]), the content-redirect
//! policy ([`redirect_allowed`]) and [`Guard`], the DNS resolver of both of
//! an upstream's HTTP clients, which holds the classification at connect
//! time: a name that passed a check cannot resolve to an internal address
//! on the next lookup (DNS rebinding).
//!
//! Internal means: loopback, private (RFC 1918), link-local (which holds
//! the cloud metadata address 169.254.169.254), unspecified and "this
//! network" (0.0.0.0/8), broadcast, shared CGNAT space (100.64.0.0/10: carrier
//! NAT, overlay networks such as Tailscale, and Alibaba Cloud's metadata at
//! 100.100.100.200), IPv6 unique-local (fc00::/7, which holds AWS's
//! fd00:ec2::254), link-local (fe80::/10) and deprecated site-local
//! (fec0::/10); IPv4-mapped IPv6 addresses and NAT64 (64:ff9b::/96)
//! addresses count as the IPv4 address they carry. `localhost` and
//! `*.localhost` are internal names. None of this applies to an upstream
//! that is itself internal (a registry on the local network may send its
//! clients anywhere on it).
//!
//! With a `proxy`, the proxy resolves the names it is asked for, so only
//! address literals are checked for those requests; the proxy's own host
//! is never refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// True for an address a public upstream may not aim our requests at (see
/// the module documentation for the table).
pub(crate) fn is_internal_ip(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(ip) => is_internal_v4(ip),
        IpAddr::V6(ip) => is_internal_v6(ip),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || a == 0
        || (a == 100 && (b & 0xc0) == 64)
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    ip.is_loopback()
        || ip.is_unspecified()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || (nat64 && is_internal_v4(Ipv4Addr::from_bits(ip.to_bits() as u32)))
}

/// True when a URL host (`host_str`: a name, an IPv4 literal or a bracketed
/// IPv6 literal) is an internal address literal or an internal name.
pub(crate) fn is_internal_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(is_internal_ip)
}

/// True when `url`'s host is internal by [`is_internal_host`].
pub(crate) fn is_internal_url(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => is_internal_ip(ip.into()),
        Some(Host::Ipv6(ip)) => is_internal_ip(ip.into()),
        Some(Host::Domain(name)) => is_internal_host(name),
        None => false,
    }
}

/// The policy for one content redirect hop from `from` to `to`: http or
/// https, never https to http, and no internal address literal or name
/// unless the upstream itself is internal. (Whether the hop may carry
/// `Authorization` is [`same_origin`]'s question; names that resolve to an
/// internal address are refused by [`Guard`] when connecting.)
pub(crate) fn redirect_allowed(
    from: &Url,
    to: &Url,
    upstream_internal: bool,
) -> Result<(), &'static str> {
    match (from.scheme(), to.scheme()) {
        ("https", "https") | ("http", "http" | "https") => {}
        ("https", "http") => return Err("it downgrades https to http"),
        _ => return Err("only http and https are followed"),
    }
    if to.host().is_none() {
        return Err("it has no host");
    }
    if !upstream_internal && is_internal_url(to) {
        return Err(
            "it is a loopback, private, link-local or otherwise internal address, and the upstream is not",
        );
    }
    Ok(())
}

/// True when `a` and `b` have the same scheme, host and port: only then
/// may a redirected request keep its `Authorization`.
pub(crate) fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

/// A name refused by [`Guard`]: it resolved to an internal address for an
/// upstream that is not internal.
#[derive(Debug, thiserror::Error)]
#[error("`{host}` resolves to {ip}, an internal address, and the upstream is not on one")]
pub(crate) struct RefusedAddress {
    host: String,
    ip: IpAddr,
}

/// The DNS resolver of an upstream's HTTP clients: resolves with the
/// system resolver, and refuses a name that resolves to any internal
/// address, unless it is the upstream's own host or its proxy's, or the
/// upstream itself is internal (by its URL, or as its host last resolved).
#[derive(Debug, Clone)]
pub(crate) struct Guard(Arc<GuardState>);

#[derive(Debug)]
struct GuardState {
    /// The upstream's host, lowercased, without a trailing dot.
    base_host: String,
    /// The proxy's host, likewise.
    proxy_host: Option<String>,
    /// The upstream's URL names an internal address or name.
    base_literal_internal: bool,
    /// The upstream's host resolved to an internal address the last time.
    base_resolved_internal: AtomicBool,
}

fn normalized(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl Guard {
    /// The guard for an upstream at `base`, reached through `proxy` if set.
    pub(crate) fn new(base: &Url, proxy: Option<&Url>) -> Self {
        Self(Arc::new(GuardState {
            base_host: normalized(base.host_str().unwrap_or_default()),
            proxy_host: proxy.and_then(Url::host_str).map(normalized),
            base_literal_internal: is_internal_url(base),
            base_resolved_internal: AtomicBool::new(false),
        }))
    }

    /// Whether the upstream itself is internal: by its URL, or because its
    /// host resolved to an internal address when last connected to.
    pub(crate) fn upstream_is_internal(&self) -> bool {
        self.0.base_literal_internal || self.0.base_resolved_internal.load(Ordering::Relaxed)
    }

    /// Applies the policy to the addresses `host` resolved to.
    fn check(&self, host: &str, addrs: &[SocketAddr]) -> Result<(), RefusedAddress> {
        let state = &self.0;
        let internal = addrs
            .iter()
            .map(SocketAddr::ip)
            .find(|ip| is_internal_ip(*ip));
        if host == state.base_host {
            state
                .base_resolved_internal
                .store(internal.is_some(), Ordering::Relaxed);
            return Ok(());
        }
        match internal {
            Some(ip)
                if state.proxy_host.as_deref() != Some(host) && !self.upstream_is_internal() =>
            {
                Err(RefusedAddress {
                    host: host.to_owned(),
                    ip,
                })
            }
            _ => Ok(()),
        }
    }
}

impl Resolve for Guard {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.clone();
        let host = normalized(name.as_str());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            guard.check(&host, &addrs)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The [`RefusedAddress`] somewhere in `e`'s source chain, if any.
pub(crate) fn refused_address<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a RefusedAddress> {
    let mut current = Some(e);
    while let Some(e) = current {
        if let Some(refused) = e.downcast_ref::<RefusedAddress>() {
            return Some(refused);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classification_table() {
        for (addr, internal) in [
            // IPv4
            ("127.0.0.1", true),
            ("127.255.0.7", true),
            ("10.0.0.1", true),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("172.32.0.1", false),
            ("192.168.1.1", true),
            ("169.254.169.254", true), // cloud metadata
            ("169.254.0.1", true),
            ("0.0.0.0", true),
            ("0.1.2.3", true),
            ("255.255.255.255", true),
            ("100.64.0.1", true), // CGNAT
            ("100.100.100.200", true),
            ("100.127.255.255", true),
            ("100.63.255.255", false),
            ("100.128.0.0", false),
            ("8.8.8.8", false),
            ("140.82.112.3", false),
            ("192.0.2.1", false),
            // IPv6
            ("::1", true),
            ("::", true),
            ("fc00::1", true),
            ("fd00:ec2::254", true), // AWS metadata
            ("fe80::1", true),
            ("febf::1", true),
            ("fec0::1", true),
            ("2606:4700::1111", false),
            ("2001:db8::1", false),
            ("ff02::1", false),
            // IPv4-mapped IPv6 and NAT64
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.1.2.3", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:8.8.8.8", false),
            ("64:ff9b::10.0.0.1", true),
            ("64:ff9b::8.8.8.8", false),
        ] {
            assert_eq!(is_internal_ip(ip(addr)), internal, "{addr}");
        }
    }

    #[test]
    fn hosts_and_urls() {
        for (host, internal) in [
            ("localhost", true),
            ("LOCALHOST.", true),
            ("registry.localhost", true),
            ("[::1]", true),
            ("[::ffff:7f00:1]", true),
            ("127.0.0.1", true),
            ("registry.example.com", false),
            ("[2606:4700::1111]", false),
        ] {
            assert_eq!(is_internal_host(host), internal, "{host}");
        }
        for (url, internal) in [
            ("http://127.0.0.1:5000/", true),
            ("http://2130706433/", true), // 127.0.0.1 in decimal
            ("http://0x7f.1/", true),
            ("http://[::ffff:127.0.0.1]/", true),
            ("http://169.254.169.254/latest/meta-data", true),
            ("http://localhost:80/", true),
            ("https://cdn.example.net/blob", false),
        ] {
            assert_eq!(
                is_internal_url(&Url::parse(url).unwrap()),
                internal,
                "{url}"
            );
        }
    }

    fn redirect(from: &str, to: &str, internal: bool) -> Result<(), &'static str> {
        redirect_allowed(
            &Url::parse(from).unwrap(),
            &Url::parse(to).unwrap(),
            internal,
        )
    }

    #[test]
    fn redirect_policy_for_a_public_upstream() {
        let from = "https://registry.example.com/v2/a/blobs/sha256:00";
        assert!(redirect(from, "https://cdn.example.net/x?sig=1", false).is_ok());
        assert!(redirect(from, "https://registry.example.com:8443/x", false).is_ok());
        let downgrade = redirect(from, "http://cdn.example.net/x", false).unwrap_err();
        assert!(downgrade.contains("downgrade"), "{downgrade}");
        for internal in [
            "https://127.0.0.1:4000/x",
            "https://localhost/x",
            "https://10.0.0.1/x",
            "https://169.254.169.254/latest/meta-data",
            "https://[::ffff:169.254.169.254]/x",
            "https://[fd00:ec2::254]/x",
            "https://100.100.100.200/x",
            "https://[::1]/x",
            "https://0.0.0.0/x",
        ] {
            let why = redirect(from, internal, false).unwrap_err();
            assert!(why.contains("internal"), "{internal}: {why}");
        }
        assert!(redirect(from, "ftp://cdn.example.net/x", false).is_err());
        assert!(
            redirect(
                "http://registry.example.com/",
                "https://cdn.example.net/",
                false
            )
            .is_ok()
        );
        assert!(
            redirect(
                "http://registry.example.com/",
                "http://cdn.example.net/",
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn redirect_policy_for_an_internal_upstream() {
        let from = "http://127.0.0.1:5000/v2/a/blobs/sha256:00";
        assert!(redirect(from, "http://localhost:5001/x", true).is_ok());
        assert!(redirect(from, "http://10.0.0.1/x", true).is_ok());
        assert!(
            redirect("https://127.0.0.1:5000/", "http://127.0.0.1:5001/", true).is_err(),
            "no downgrade, internal or not"
        );
    }

    #[test]
    fn same_origin_means_scheme_host_and_port() {
        let same = |a: &str, b: &str| same_origin(&Url::parse(a).unwrap(), &Url::parse(b).unwrap());
        assert!(same("https://r.example/v2/", "https://r.example:443/x"));
        assert!(!same("https://r.example/", "https://r.example:8443/"));
        assert!(!same("http://r.example:5000/", "https://r.example:5000/"));
        assert!(!same("https://r.example/", "https://cdn.r.example/"));
    }

    fn guard(base: &str, proxy: Option<&str>) -> Guard {
        Guard::new(
            &Url::parse(base).unwrap(),
            proxy.map(|p| Url::parse(p).unwrap()).as_ref(),
        )
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| SocketAddr::new(ip(a), 0)).collect()
    }

    #[test]
    fn guard_refuses_internal_addresses_for_a_public_upstream() {
        let g = guard(
            "https://registry.example.com",
            Some("http://proxy.corp.example:3128"),
        );
        assert!(
            g.check("cdn.example.net", &addrs(&["140.82.112.3"]))
                .is_ok()
        );
        let err = g
            .check("cdn.example.net", &addrs(&["140.82.112.3", "10.0.0.7"]))
            .unwrap_err();
        assert!(err.to_string().contains("10.0.0.7"), "{err}");
        assert!(
            g.check("rebind.example.net", &addrs(&["::ffff:127.0.0.1"]))
                .is_err()
        );
        assert!(
            g.check("proxy.corp.example", &addrs(&["10.1.1.1"])).is_ok(),
            "the proxy may be internal"
        );
        assert!(!g.upstream_is_internal());
        // The upstream's own host resolving to an internal address makes the
        // upstream internal, and internal targets are then allowed.
        assert!(
            g.check("registry.example.com", &addrs(&["10.0.0.5"]))
                .is_ok()
        );
        assert!(g.upstream_is_internal());
        assert!(g.check("cdn.example.net", &addrs(&["10.0.0.7"])).is_ok());
        assert!(
            g.check("registry.example.com", &addrs(&["140.82.112.3"]))
                .is_ok()
        );
        assert!(g.check("cdn.example.net", &addrs(&["10.0.0.7"])).is_err());
    }

    #[test]
    fn guard_allows_everything_for_an_internal_upstream() {
        let g = guard("http://127.0.0.1:5000", None);
        assert!(g.upstream_is_internal());
        assert!(g.check("localhost", &addrs(&["127.0.0.1"])).is_ok());
    }

    #[tokio::test]
    async fn a_client_with_the_guard_does_not_connect_to_a_refused_name() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(guard("https://registry.example.com", None)))
            .build()
            .unwrap();
        let err = client
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap_err();
        let refused = refused_address(&err).expect("the guard's refusal in the chain");
        assert!(refused.to_string().contains("`localhost`"), "{refused}");
        let pending = listener.accept().map(drop).unwrap_err();
        assert_eq!(
            pending.kind(),
            std::io::ErrorKind::WouldBlock,
            "nothing connected"
        );
    }
}
