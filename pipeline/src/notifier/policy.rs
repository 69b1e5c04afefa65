//! Where callbacks may go: the operator's allowlist, and the refusal of
//! private, loopback, link-local and other non-public addresses unless an
//! allowed network holds them (SSRF protection).
//!
//! The gateway checks a callback at submission ([`Policy::check`]: the URL,
//! the host rule, and every address the name resolves to). The notifier
//! checks again at each attempt ([`Policy::check_url`]) and connects only
//! through [`PinnedResolver`], which resolves a name once per connection
//! and hands the HTTP client only addresses it has vetted: what is checked
//! is what is connected to, so a name that resolves to a public address
//! for the check and a private one for the connection (DNS rebinding)
//! gets nowhere. Redirects are never followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::config::CallbacksSection;

/// How long a name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a callback destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("callbacks are off on this deployment (callbacks.signing_key is not set)")]
    Off,
    #[error("{0}")]
    Invalid(String),
    #[error("host {0:?} is not allowed (callbacks.allow_hosts)")]
    Host(String),
    #[error("{host:?} is {addr}, a {kind} address, which callbacks.allow_networks does not allow")]
    Address { host: String, addr: IpAddr, kind: &'static str },
    #[error("{host:?} does not resolve: {why}")]
    Unresolvable { host: String, why: String },
}

/// A rule of `callbacks.allow_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    /// `*`: any host (its addresses must still be allowed).
    Any,
    /// `hooks.example.com` (or an address literal).
    Exact(String),
    /// `*.example.com`: `.example.com`, any subdomain.
    Subdomains(String),
}

/// The destinations callbacks may go to.
#[derive(Debug, Clone)]
pub struct Policy {
    hosts: Vec<HostRule>,
    networks: Vec<IpNet>,
}

impl Policy {
    /// From `callbacks.allow_hosts` and `callbacks.allow_networks`; an
    /// invalid network is a configuration error.
    pub fn from_config(c: &CallbacksSection) -> Result<Policy, String> {
        let hosts = c
            .allow_hosts
            .iter()
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                match h.strip_prefix("*.") {
                    _ if h == "*" => HostRule::Any,
                    Some(suffix) => HostRule::Subdomains(format!(".{suffix}")),
                    None => HostRule::Exact(h.trim_start_matches('[').trim_end_matches(']').to_owned()),
                }
            })
            .collect();
        let networks = c
            .allow_networks
            .iter()
            .map(|n| {
                let n = n.trim();
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|e| format!("callbacks.allow_networks: {n:?} is not a CIDR or an address ({e})"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Policy { hosts, networks })
    }

    /// Whether a connection to `addr` is allowed: a public address, or one
    /// inside an allowed network. `Err`: what kind of address it is.
    pub fn address_allowed(&self, addr: IpAddr) -> Result<(), &'static str> {
        let addr = canonical(addr);
        match non_public(addr) {
            None => Ok(()),
            Some(_) if self.networks.iter().any(|n| n.contains(&addr)) => Ok(()),
            Some(kind) => Err(kind),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        self.hosts.iter().any(|r| match r {
            HostRule::Any => true,
            HostRule::Exact(h) => h == host,
            HostRule::Subdomains(suffix) => host.ends_with(suffix.as_str()),
        })
    }

    /// What can be checked without resolving: a well-formed http(s) URL
    /// whose host is allowed, and, for an address literal, an allowed
    /// address (an address inside an allowed network needs no host rule).
    /// Returns the host and port, for a name still to resolve.
    pub fn check_url(&self, url: &str) -> Result<(String, u16), Refusal> {
        let parsed = url::Url::parse(url).map_err(|e| Refusal::Invalid(format!("{url:?} is not a URL ({e})")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Refusal::Invalid(format!("scheme {:?} is not http or https", parsed.scheme())));
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        let (name, literal) = match parsed.host() {
            Some(url::Host::Domain(d)) => (d.to_ascii_lowercase(), None),
            Some(url::Host::Ipv4(a)) => (a.to_string(), Some(IpAddr::V4(a))),
            Some(url::Host::Ipv6(a)) => (a.to_string(), Some(IpAddr::V6(a))),
            None => return Err(Refusal::Invalid(format!("{url:?} has no host"))),
        };
        if let Some(addr) = literal {
            let listed = self.networks.iter().any(|n| n.contains(&canonical(addr)));
            if !listed && !self.host_allowed(&name) {
                return Err(Refusal::Host(name));
            }
            self.address_allowed(addr).map_err(|kind| Refusal::Address { host: name.clone(), addr, kind })?;
        } else if !self.host_allowed(&name) {
            return Err(Refusal::Host(name));
        }
        Ok((name, port))
    }

    /// The whole check of a callback at submission: [`Policy::check_url`],
    /// then every address the host resolves to must be allowed.
    pub async fn check(&self, url: &str) -> Result<(), Refusal> {
        let (host, port) = self.check_url(url)?;
        if host.parse::<IpAddr>().is_ok() {
            return Ok(());
        }
        self.resolve(&host, port).await.map(|_| ())
    }

    /// The addresses of `host`, every one of them allowed; an error names
    /// the first that is not.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        let unresolvable = |why: String| Refusal::Unresolvable { host: host.to_owned(), why };
        let addrs: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| unresolvable(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs())))?
            .map_err(|e| unresolvable(e.to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(unresolvable("no addresses".into()));
        }
        for a in &addrs {
            self.address_allowed(a.ip()).map_err(|kind| Refusal::Address {
                host: host.to_owned(),
                addr: a.ip(),
                kind,
            })?;
        }
        Ok(addrs)
    }
}

/// The HTTP client's resolver: a name's addresses, only when every one of
/// them is allowed ([`Policy::resolve`]); the connection is made to exactly
/// these.
pub struct PinnedResolver(pub Arc<Policy>);

impl reqwest::dns::Resolve for PinnedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_ascii_lowercase();
        Box::pin(async move {
            if !policy.host_allowed(&host) {
                return Err(Box::new(Refusal::Host(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            // The port is the client's to fill in: 0 here.
            let addrs =
                policy.resolve(&host, 0).await.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`) is that IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// What kind of non-public address `addr` is; `None` for a public one.
/// (std's `is_global` is not stable yet; these are IANA's special-purpose
/// registries.)
pub fn non_public(addr: IpAddr) -> Option<&'static str> {
    match canonical(addr) {
        IpAddr::V4(a) => non_public_v4(a),
        IpAddr::V6(a) => non_public_v6(a),
    }
}

fn non_public_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, o2, _] = a.octets();
    Some(match () {
        _ if a.is_loopback() => "loopback",
        _ if a.is_private() => "private",
        _ if a.is_link_local() => "link-local",
        _ if a.is_unspecified() || o0 == 0 => "unspecified",
        _ if a.is_broadcast() => "broadcast",
        _ if a.is_multicast() => "multicast",
        _ if o0 == 100 && (64..128).contains(&o1) => "shared (carrier-grade NAT)",
        _ if o0 == 192 && o1 == 0 && o2 == 0 => "IETF protocol assignment",
        _ if a.is_documentation() => "documentation",
        _ if o0 == 198 && (o1 == 18 || o1 == 19) => "benchmarking",
        _ if o0 >= 240 => "reserved",
        _ => return None,
    })
}

fn non_public_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    Some(match () {
        _ if a.is_loopback() => "loopback",
        _ if a.is_unspecified() => "unspecified",
        _ if a.is_multicast() => "multicast",
        _ if (s[0] & 0xfe00) == 0xfc00 => "private (unique local)",
        _ if (s[0] & 0xffc0) == 0xfe80 => "link-local",
        _ if s[0] == 0x2001 && s[1] == 0x0db8 => "documentation",
        // NAT64 (64:ff9b::/96) reaches the IPv4 address it embeds.
        _ if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] => {
            let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            return non_public_v4(v4);
        }
        // 6to4 (2002::/16) embeds an IPv4 address too.
        _ if s[0] == 0x2002 => {
            let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
            return non_public_v4(v4);
        }
        _ => return None,
    })
}
