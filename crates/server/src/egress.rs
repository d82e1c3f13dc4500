//! Where upstream connections may go: the public-address rule that keeps a
//! tenant's upstream out of the gateway's own network (loopback, private
//! ranges, link-local, cloud metadata addresses).
//!
//! Two checks, because either alone has a gap:
//! - [`private_destination`] refuses a URL whose host is such an address
//!   literally (or `localhost`). reqwest connects to literal addresses
//!   without resolving them, so the resolver never sees those.
//! - [`PublicOnlyResolver`] is the DNS resolver of the clients for
//!   `public_addresses_only` upstreams. It resolves a name on every new
//!   connection and keeps only public addresses, so a name that points
//!   inside, or that is changed to point inside after the upstream was
//!   accepted (DNS rebinding), is never connected to.

use std::net::{IpAddr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether `ip` is not a public address: loopback, private (RFC 1918, IPv6
/// unique local), link-local (including 169.254.169.254, the cloud metadata
/// service), carrier-grade NAT, unspecified or broadcast, and the same
/// inside an IPv4-mapped IPv6 address.
pub fn non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64
        }
        IpAddr::V6(ip) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| non_public(IpAddr::V4(v4)))
        }
    }
}

/// Why `url` may not be used by a tenant: it names this machine or a
/// non-public address literally (or as `localhost`). A name is left to
/// [`resolves_only_privately`] and, on every connection, [`PublicOnlyResolver`].
pub fn private_destination(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let raw = parsed.host_str()?;
    if let Some(why) = non_public_literal(url) {
        return Some(why);
    }
    let d = raw.trim_end_matches('.').to_ascii_lowercase();
    (d == "localhost" || d.ends_with(".localhost")).then(|| format!("`{d}` is this machine"))
}

/// Why `url` is refused to a `public_addresses_only` upstream without any
/// lookup: its host is a non-public address literal, which reqwest connects
/// to without asking the resolver.
pub fn non_public_literal(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let raw = parsed.host_str()?;
    let host = raw
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()?;
    non_public(host).then(|| format!("{host} is a loopback, private or link-local address"))
}

/// Why the host name in `url` may not be used by a tenant: every address it
/// resolves to now is non-public. `None` when it has a public address, is an
/// address literal, or does not resolve (yet): the connection-time check in
/// [`PublicOnlyResolver`] still applies to it.
pub async fn resolves_only_privately(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?;
    if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return None;
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    let lookup = tokio::net::lookup_host((host, port));
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(std::time::Duration::from_secs(5), lookup).await {
            Ok(Ok(a)) => a.collect(),
            _ => return None,
        };
    (!addrs.is_empty() && addrs.iter().all(|a| non_public(a.ip())))
        .then(|| refusal(host, addrs.iter().map(SocketAddr::ip)))
}

fn refusal(host: &str, addrs: impl Iterator<Item = IpAddr>) -> String {
    let list: Vec<String> = addrs.map(|a| a.to_string()).collect();
    format!(
        "`{host}` resolves only to loopback, private or link-local addresses ({}); an upstream with public_addresses_only connects to public addresses only",
        list.join(", ")
    )
}

/// The resolver of `public_addresses_only` clients: the system resolver,
/// minus every non-public address; a name with nothing left fails with an
/// error that names it and the addresses it resolved to.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublicOnlyResolver;

impl PublicOnlyResolver {
    /// The public addresses of `host` (port 0, as reqwest expects).
    pub async fn public_addresses(host: &str) -> Result<Vec<SocketAddr>, String> {
        let all: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
            .collect();
        let public: Vec<SocketAddr> = all
            .iter()
            .copied()
            .filter(|a| !non_public(a.ip()))
            .collect();
        if public.is_empty() {
            return Err(refusal(host, all.iter().map(SocketAddr::ip)));
        }
        Ok(public)
    }
}

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            match Self::public_addresses(&host).await {
                Ok(public) => Ok(Box::new(public.into_iter()) as Addrs),
                Err(why) => {
                    tracing::warn!(host = %host, "upstream connection refused: {why}");
                    Err(why.into())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_non_public_destinations_are_named() {
        for url in [
            "http://127.0.0.1:8080/mcp",
            "http://localhost/mcp",
            "http://LOCALHOST./mcp",
            "http://api.localhost/mcp",
            "http://169.254.169.254/latest/meta-data",
            "http://10.1.2.3/mcp",
            "http://172.16.0.1/mcp",
            "http://192.168.0.1/mcp",
            "http://100.64.0.1/mcp",
            "http://0x7f000001/mcp",
            "http://[::1]:9/mcp",
            "http://[fd00::1]/mcp",
            "http://[fe80::1]/mcp",
            "http://[::ffff:10.0.0.1]/mcp",
            "http://0.0.0.0/mcp",
        ] {
            assert!(private_destination(url).is_some(), "{url}");
        }
        for url in [
            "https://mcp.example.com/mcp",
            "http://93.184.216.34/mcp",
            "http://[2606:2800:220:1::]/mcp",
            "http://100.128.0.1/mcp",
        ] {
            assert!(private_destination(url).is_none(), "{url}");
        }
    }

    #[test]
    fn literals_are_refused_to_public_only_clients_before_any_connection() {
        let clients = crate::gateway::HttpClients::default();
        let err = clients
            .for_upstream("http://10.0.0.7:8080/mcp", true)
            .expect_err("a private literal");
        assert!(
            err.contains("10.0.0.7") && err.contains("public_addresses_only"),
            "{err}"
        );
        assert_eq!(
            non_public_literal("http://localhost/mcp"),
            None,
            "names go to the resolver"
        );
        assert!(
            clients
                .for_upstream("http://10.0.0.7:8080/mcp", false)
                .is_ok()
        );
        assert!(
            clients
                .for_upstream("https://mcp.example.com/mcp", true)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn names_resolving_only_inside_are_refused_before_and_at_connection() {
        let why = resolves_only_privately("http://localhost:9/mcp")
            .await
            .expect("localhost resolves to loopback only");
        assert!(
            why.contains("`localhost`") && why.contains("127.0.0.1"),
            "{why}"
        );
        let err = PublicOnlyResolver::public_addresses("localhost")
            .await
            .expect_err("no public address");
        assert!(
            err.contains("127.0.0.1") && err.contains("public_addresses_only"),
            "{err}"
        );
        // Literals are the literal check's business; unresolvable names are
        // checked again when connecting.
        assert_eq!(resolves_only_privately("http://127.0.0.1/mcp").await, None);
        assert_eq!(resolves_only_privately("http://[::1]/mcp").await, None);
        assert_eq!(
            resolves_only_privately("http://name-that-does-not-resolve.invalid/mcp").await,
            None
        );
    }
}
