//! Where webhooks may connect to. Anyone who can configure a webhook
//! chooses its destination, so without a check Tally would probe and
//! reach its own network for them (loopback services, cloud metadata,
//! private ranges). Only public addresses are reached, unless the
//! operator's allow-list (`webhook_allow`) names the address's range or
//! the URL's host name.
//!
//! The address is checked where it is known:
//! - at configuration time for IP-literal hosts ([`EgressPolicy::refusal`]);
//! - at delivery time for names, by the client's resolver
//!   ([`PublicOnlyResolver`]), which drops refused addresses from every
//!   lookup, so a name that resolves to a public address when configured
//!   and to an internal one later (DNS rebinding) is still refused;
//! - at delivery time for IP literals too ([`EgressPolicy::refuses_literal`]),
//!   since the client does not ask the resolver about them.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The setting's name, for messages that tell how to allow an address.
pub const SETTING: &str = "webhook_allow (--webhook-allow, TALLY_WEBHOOK_ALLOW)";

/// IPv4 ranges that are not public, most specific first where they nest
/// (the first match names the range).
const NON_PUBLIC_V4: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 32), "unspecified"),
    (v4(255, 255, 255, 255, 32), "broadcast"),
    (v4(0, 0, 0, 0, 8), "\"this network\""),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(100, 64, 0, 0, 10), "carrier-grade NAT"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (v4(192, 0, 2, 0, 24), "documentation"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation"),
    (v4(203, 0, 113, 0, 24), "documentation"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
];

/// IPv6 ranges that are not public. Global unicast is only ever
/// allocated from 2000::/3, so anything else that is not one of the
/// embedded-IPv4 forms is refused as reserved; these are the named ones
/// (and the non-public parts of 2000::/3).
const NON_PUBLIC_V6: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        "IETF protocol assignments",
    ),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), "6to4"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique local (private)",
    ),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

const GLOBAL_UNICAST_V6: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);
/// The well-known NAT64 prefix: a translator forwards these to the IPv4
/// address in the last 32 bits, so they are as public as that address.
const NAT64_WELL_KNOWN: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(s: [u16; 8], prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        prefix,
    )
}

/// The name of the non-public range `ip` is in, or `None` for a public
/// address. IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`)
/// addresses are judged by the IPv4 address they reach.
pub fn non_public_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(mapped) = v6.to_ipv4_mapped() {
                return non_public_v4(mapped).map(|_| "IPv4-mapped non-public");
            }
            if NAT64_WELL_KNOWN.contains(&v6) {
                let [.., a, b, c, d] = v6.octets();
                return non_public_v4(Ipv4Addr::new(a, b, c, d)).map(|_| "NAT64 of non-public");
            }
            if let Some((_, name)) = NON_PUBLIC_V6.iter().find(|(net, _)| net.contains(&v6)) {
                return Some(name);
            }
            (!GLOBAL_UNICAST_V6.contains(&v6)).then_some("reserved")
        }
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    NON_PUBLIC_V4
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, name)| *name)
}

/// Why the webhook client's resolver gave no address (found again in the
/// client's error chain to tell the admin why, in a word).
#[derive(Debug, thiserror::Error)]
pub enum ResolveFailure {
    #[error("{host} resolves to no address that webhooks may reach (none is public or allowed by {SETTING})")]
    NotPublic { host: String },
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        source: std::io::Error,
    },
}

/// The operator's allow-list: destinations reached although not public.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EgressPolicy {
    nets: Vec<IpNet>,
    /// Lowercase, without a trailing dot.
    hosts: BTreeSet<String>,
}

impl EgressPolicy {
    /// Parses the comma-separated setting: CIDRs (a bare address is one
    /// address) and exact host names. Reports every bad entry.
    pub fn parse(list: &str) -> Result<EgressPolicy, Vec<String>> {
        let mut policy = EgressPolicy::default();
        let mut problems = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry.contains('/') {
                match entry.parse::<IpNet>() {
                    Ok(net) => policy.nets.push(net.trunc()),
                    Err(e) => problems.push(format!(
                        "{entry:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8 ({e})"
                    )),
                }
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy.nets.push(IpNet::from(ip));
            } else if is_host_name(entry) {
                policy.hosts.insert(normalize_host(entry));
            } else {
                problems.push(format!(
                    "{entry:?} is neither a CIDR (such as 10.0.0.0/8) nor a host name"
                ));
            }
        }
        if problems.is_empty() {
            Ok(policy)
        } else {
            Err(problems)
        }
    }

    /// Whether `ip` may be connected to for any host.
    pub fn permits_address(&self, ip: IpAddr) -> bool {
        // `::ffff:127.0.0.1` is allowed by 127.0.0.1/32, as it reaches it.
        let canonical = ip.to_canonical();
        non_public_range(ip).is_none()
            || self
                .nets
                .iter()
                .any(|net| net.contains(&ip) || net.contains(&canonical))
    }

    /// Whether the operator named this host: all its addresses may be
    /// connected to.
    pub fn permits_host(&self, host: &str) -> bool {
        self.hosts.contains(&normalize_host(host))
    }

    /// Why a configured URL is refused, if it is: its host is an IP
    /// literal that is not public and not allowed. Names are judged when
    /// delivering (what they resolve to may change).
    pub fn refusal(&self, url: &reqwest::Url) -> Option<String> {
        let ip = literal_ip(url)?;
        if self.permits_address(ip) {
            return None;
        }
        let range = non_public_range(ip).unwrap_or("non-public");
        Some(format!(
            "{ip} is not a public address ({range}); webhooks reach only public addresses unless the operator allows it in {SETTING}"
        ))
    }

    /// Whether a URL's IP-literal host is refused (checked before every
    /// delivery: the client resolves no literal, so the resolver cannot).
    pub fn refuses_literal(&self, url: &reqwest::Url) -> bool {
        literal_ip(url).is_some_and(|ip| !self.permits_address(ip))
    }

    /// The addresses of `host` that may be connected to.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        if self.permits_host(host) {
            return addrs;
        }
        addrs
            .into_iter()
            .filter(|a| self.permits_address(a.ip()))
            .collect()
    }
}

/// The IP address a URL's host is written as, if it is one. (The URL
/// parser already turned `http://2130706433/` and `http://0x7f.1/` into
/// `127.0.0.1`, and brackets an IPv6 literal.)
fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens
/// (underscores too, as some internal names have them).
fn is_host_name(text: &str) -> bool {
    let name = text.strip_suffix('.').unwrap_or(text);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// The webhook client's resolver: the system's lookup, less the
/// addresses the policy refuses; a name left with none fails with
/// [`ResolveFailure::NotPublic`].
pub struct PublicOnlyResolver {
    pub policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for PublicOnlyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            // Port 0: the client puts the URL's port in.
            let looked_up = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map(|found| found.collect::<Vec<SocketAddr>>());
            let found = match looked_up {
                Ok(found) => found,
                Err(source) => return Err(Box::new(ResolveFailure::Lookup { host, source }) as _),
            };
            let allowed = policy.filter(&host, found);
            if allowed.is_empty() {
                return Err(Box::new(ResolveFailure::NotPublic { host }) as _);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn every_non_public_ipv4_range_is_named_and_its_neighbours_are_public() {
        // (address, expected range); each range's first and last address
        // where the next one outside is public.
        let refused = [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "\"this network\""),
            ("10.0.0.0", "private"),
            ("10.255.255.255", "private"),
            ("100.64.0.0", "carrier-grade NAT"),
            ("100.127.255.255", "carrier-grade NAT"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.169.254", "link-local"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.0.0.8", "IETF protocol assignments"),
            ("192.0.2.1", "documentation"),
            ("192.88.99.1", "6to4 relay anycast"),
            ("192.168.1.1", "private"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
        ];
        for (addr, range) in refused {
            assert_eq!(non_public_range(ip(addr)), Some(range), "{addr}");
        }
        let public = [
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.255",
            "192.0.3.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "93.184.215.14",
            "223.255.255.255",
        ];
        for addr in public {
            assert_eq!(non_public_range(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn every_non_public_ipv6_range_is_named_and_global_unicast_is_public() {
        let refused = [
            ("::", "unspecified"),
            ("::1", "loopback"),
            // IPv4-compatible (deprecated) and everything else below 2000::/3.
            ("::7f00:1", "reserved"),
            ("::2", "reserved"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("100::1", "discard-only"),
            ("2001:db8::1", "documentation"),
            ("2001::1", "IETF protocol assignments"),
            ("2001:1ff:ffff::1", "IETF protocol assignments"),
            ("2002:7f00:1::1", "6to4"),
            ("3fff:fff::1", "documentation"),
            ("4000::1", "reserved"),
            ("5f00::1", "reserved"),
            ("fc00::1", "unique local (private)"),
            ("fdff:ffff::1", "unique local (private)"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
        ];
        for (addr, range) in refused {
            assert_eq!(non_public_range(ip(addr)), Some(range), "{addr}");
        }
        let public = [
            "2000::1",
            "2001:200::1",
            "2001:db7:ffff::1",
            "2001:db9::1",
            "2003::1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "3fff:1000::1",
        ];
        for addr in public {
            assert_eq!(non_public_range(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn ipv4_mapped_and_nat64_addresses_are_judged_by_the_ipv4_address_they_reach() {
        for addr in [
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:100.64.0.1",
            "::ffff:0.0.0.0",
            "64:ff9b::10.1.2.3",
            "64:ff9b::7f00:1",
        ] {
            assert!(non_public_range(ip(addr)).is_some(), "{addr}");
        }
        for addr in ["::ffff:1.1.1.1", "::ffff:93.184.215.14", "64:ff9b::808:808"] {
            assert_eq!(non_public_range(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn the_allow_list_takes_cidrs_bare_addresses_and_host_names_and_reports_every_bad_entry() {
        let p = EgressPolicy::parse(" 127.0.0.1/32, ::1/128,10.1.2.3/8,fd00::5,Hooks.Internal. ,,")
            .unwrap();
        assert!(p.permits_address(ip("127.0.0.1")));
        assert!(!p.permits_address(ip("127.0.0.2")));
        assert!(p.permits_address(ip("::1")));
        // Host bits in a CIDR are dropped: 10.1.2.3/8 is 10.0.0.0/8.
        assert!(p.permits_address(ip("10.200.0.1")));
        assert!(!p.permits_address(ip("172.16.0.1")));
        assert!(p.permits_address(ip("fd00::5")));
        assert!(!p.permits_address(ip("fd00::6")));
        // The mapped form of an allowed IPv4 address reaches it: allowed.
        assert!(p.permits_address(ip("::ffff:127.0.0.1")));
        assert!(!p.permits_address(ip("::ffff:127.0.0.2")));
        assert!(p.permits_host("hooks.internal"));
        assert!(p.permits_host("HOOKS.internal."));
        assert!(!p.permits_host("internal"));
        assert!(!p.permits_host("x.hooks.internal"));
        // Public addresses need no entry.
        assert!(EgressPolicy::default().permits_address(ip("1.1.1.1")));

        let problems =
            EgressPolicy::parse("10.0.0.0/33,ok.example,not a host,::1/200,-bad-.x").unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("\"10.0.0.0/33\""), "{problems:?}");
        assert!(problems[1].contains("\"not a host\""), "{problems:?}");
        assert_eq!(EgressPolicy::parse(""), Ok(EgressPolicy::default()));
    }

    #[test]
    fn only_ip_literal_hosts_are_refused_when_configured() {
        let none = EgressPolicy::default();
        let refusal = |url: &str| none.refusal(&reqwest::Url::parse(url).unwrap());
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:9/",
            "http://[fc00::1]/",
            "http://[::ffff:127.0.0.1]/",
            // The URL parser's other spellings of 127.0.0.1.
            "http://2130706433/",
            "http://0x7f.1/",
        ] {
            let why = refusal(url).unwrap_or_default();
            assert!(why.contains("not a public address"), "{url}: {why:?}");
            assert!(why.contains("webhook_allow"), "{url}: {why:?}");
        }
        assert_eq!(refusal("https://93.184.215.14/hook"), None);
        assert_eq!(refusal("https://[2606:4700:4700::1111]/"), None);
        // Names are judged at delivery.
        assert_eq!(refusal("http://localhost:8080/hook"), None);
        let allowed = EgressPolicy::parse("127.0.0.0/8").unwrap();
        let url = reqwest::Url::parse("http://127.0.0.1:8080/hook").unwrap();
        assert_eq!(allowed.refusal(&url), None);
        assert!(!allowed.refuses_literal(&url));
        assert!(none.refuses_literal(&url));
    }

    #[test]
    fn lookups_keep_only_permitted_addresses_unless_the_host_is_named() {
        let addrs: Vec<SocketAddr> = ["127.0.0.1:0", "[::1]:0", "93.184.215.14:0"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let none = EgressPolicy::default();
        assert_eq!(none.filter("rebind.example", addrs.clone()), vec![addrs[2]]);
        let loopback_v4 = EgressPolicy::parse("127.0.0.1/32").unwrap();
        assert_eq!(
            loopback_v4.filter("localhost", addrs[..2].to_vec()),
            vec![addrs[0]]
        );
        let named = EgressPolicy::parse("localhost").unwrap();
        assert_eq!(named.filter("LOCALHOST", addrs.clone()), addrs);
    }

    #[tokio::test]
    async fn the_resolver_refuses_a_name_left_without_addresses() {
        use reqwest::dns::Resolve;
        let resolver = PublicOnlyResolver {
            policy: Arc::new(EgressPolicy::default()),
        };
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = match resolver.resolve(name).await {
            Ok(addrs) => panic!("localhost passed: {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        assert!(
            matches!(
                err.downcast_ref::<ResolveFailure>(),
                Some(ResolveFailure::NotPublic { .. })
            ),
            "{err}"
        );

        let resolver = PublicOnlyResolver {
            policy: Arc::new(EgressPolicy::parse("127.0.0.1/32").unwrap()),
        };
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let got: Vec<SocketAddr> = resolver.resolve(name).await.unwrap().collect();
        assert!(!got.is_empty());
        assert!(got.iter().all(|a| a.ip() == ip("127.0.0.1")), "{got:?}");
    }
}
