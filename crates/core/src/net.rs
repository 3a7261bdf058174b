//! Which addresses webhooks may reach (DESIGN §11): the ranges refused as webhook targets, the
//! exceptions `PICLOUD_WEBHOOK_ALLOW_NETS` lists, and the verdict on one address or on a URL's
//! host. Pure functions: the API judges literal hosts at registration, the webhook executor
//! judges every address it would connect to.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The error code of a refused webhook target: the API answers it, and the webhook executor's
/// error texts start with it.
pub const TARGET_REFUSED: &str = "webhook_target_refused";

/// The variable that lists the networks webhooks may reach although they are not public.
pub const ALLOW_NETS_VAR: &str = "PICLOUD_WEBHOOK_ALLOW_NETS";

/// What kind of non-public address a refused one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressKind {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 (RFC 1918), fc00::/7 (RFC 4193).
    Private,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// A cloud's instance metadata service: 169.254.169.254, fd00:ec2::254, 100.100.100.200.
    CloudMetadata,
    /// 0.0.0.0, ::.
    Unspecified,
    /// 0.0.0.0/8 ("this network", RFC 1122): Linux connects 0.x.y.z to this host.
    ThisNetwork,
    /// 100.64.0.0/10 (RFC 6598), the carrier-grade NAT space clouds also use inside.
    SharedAddressSpace,
    /// 192.0.0.0/24 (RFC 6890).
    ProtocolAssignments,
    /// 198.18.0.0/15 (RFC 2544).
    Benchmarking,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 240.0.0.0/4.
    Reserved,
    /// 255.255.255.255.
    Broadcast,
    /// fec0::/10 (deprecated by RFC 3879, still private where used).
    SiteLocal,
    /// A local-use IPv4/IPv6 translation address (64:ff9b:1::/48, RFC 8215): whatever the
    /// operator's translator maps it to, private addresses included.
    LocalTranslation,
}

impl AddressKind {
    /// The kind in words, with its article: "a loopback address".
    pub fn describe(self) -> &'static str {
        match self {
            AddressKind::Loopback => "a loopback address",
            AddressKind::Private => "a private address",
            AddressKind::LinkLocal => "a link-local address",
            AddressKind::CloudMetadata => "a cloud metadata address",
            AddressKind::Unspecified => "the unspecified address",
            AddressKind::ThisNetwork => "a \"this network\" address (0.0.0.0/8)",
            AddressKind::SharedAddressSpace => "a shared (carrier-grade NAT) address",
            AddressKind::ProtocolAssignments => "an IETF protocol assignment address (192.0.0.0/24)",
            AddressKind::Benchmarking => "a benchmarking address (198.18.0.0/15)",
            AddressKind::Multicast => "a multicast address",
            AddressKind::Reserved => "a reserved address (240.0.0.0/4)",
            AddressKind::Broadcast => "the broadcast address",
            AddressKind::SiteLocal => "a site-local address",
            AddressKind::LocalTranslation => "a local-use translation address (64:ff9b:1::/48)",
        }
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(s: [u16; 8], prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]), prefix)
}

/// The refused IPv4 ranges, the more specific before the ranges that hold them: the first that
/// contains an address names its kind.
const REFUSED_V4: [(Ipv4Net, AddressKind); 15] = [
    (v4(0, 0, 0, 0, 32), AddressKind::Unspecified),
    (v4(255, 255, 255, 255, 32), AddressKind::Broadcast),
    (v4(169, 254, 169, 254, 32), AddressKind::CloudMetadata),
    (v4(100, 100, 100, 200, 32), AddressKind::CloudMetadata),
    (v4(0, 0, 0, 0, 8), AddressKind::ThisNetwork),
    (v4(10, 0, 0, 0, 8), AddressKind::Private),
    (v4(100, 64, 0, 0, 10), AddressKind::SharedAddressSpace),
    (v4(127, 0, 0, 0, 8), AddressKind::Loopback),
    (v4(169, 254, 0, 0, 16), AddressKind::LinkLocal),
    (v4(172, 16, 0, 0, 12), AddressKind::Private),
    (v4(192, 0, 0, 0, 24), AddressKind::ProtocolAssignments),
    (v4(192, 168, 0, 0, 16), AddressKind::Private),
    (v4(198, 18, 0, 0, 15), AddressKind::Benchmarking),
    (v4(224, 0, 0, 0, 4), AddressKind::Multicast),
    (v4(240, 0, 0, 0, 4), AddressKind::Reserved),
];

/// The refused IPv6 ranges, as [`REFUSED_V4`]. The forms that embed an IPv4 address are judged
/// by that address ([`embedded_ipv4`]).
const REFUSED_V6: [(Ipv6Net, AddressKind); 8] = [
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), AddressKind::Unspecified),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), AddressKind::Loopback),
    (v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128), AddressKind::CloudMetadata),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), AddressKind::Private),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), AddressKind::LinkLocal),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), AddressKind::SiteLocal),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), AddressKind::LocalTranslation),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), AddressKind::Multicast),
];

/// The IPv4 address an IPv6 address reaches: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-translated
/// (`::ffff:0:a.b.c.d`, SIIT), IPv4-compatible (`::a.b.c.d`, deprecated), NAT64
/// (`64:ff9b::a.b.c.d`, RFC 6052) and 6to4
/// (`2002:aabb:ccdd::/48`, RFC 3056). `::` and `::1` are judged as IPv6 before this is asked.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    match ip.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _]
        | [0, 0, 0, 0, 0xffff, 0, _, _]
        | [0, 0, 0, 0, 0, 0, _, _]
        | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(Ipv4Addr::new(o[12], o[13], o[14], o[15])),
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

/// What the refusal hints at, after saying why.
const HINT: &str = "webhooks must reach public addresses unless PICLOUD_WEBHOOK_ALLOW_NETS allows it";

/// Why a webhook target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// An address of a refused kind.
    #[error("{address} is {}; {HINT}", kind.describe())]
    Address {
        /// The address.
        address: IpAddr,
        /// Its kind.
        kind: AddressKind,
    },
    /// An IPv6 address that reaches an IPv4 address of a refused kind.
    #[error("{address} reaches {ipv4}, {}; {HINT}", kind.describe())]
    Embedded {
        /// The IPv6 address.
        address: Ipv6Addr,
        /// The IPv4 address it reaches.
        ipv4: Ipv4Addr,
        /// The IPv4 address's kind.
        kind: AddressKind,
    },
    /// `localhost` or a name under it, which name loopback addresses (RFC 6761).
    #[error("{0} is a loopback name (RFC 6761); {HINT}")]
    LocalhostName(String),
}

impl Refusal {
    /// The kind of address refused.
    pub fn kind(&self) -> AddressKind {
        match self {
            Refusal::Address { kind, .. } | Refusal::Embedded { kind, .. } => *kind,
            Refusal::LocalhostName(_) => AddressKind::Loopback,
        }
    }
}

/// An entry of `PICLOUD_WEBHOOK_ALLOW_NETS` that is neither a network nor an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is neither an IP address nor a network in CIDR notation")]
pub struct AllowNetsError {
    /// The entry.
    pub entry: String,
}

/// `PICLOUD_WEBHOOK_ALLOW_NETS`: the networks webhooks may reach although they are not public.
/// An address inside one is accepted whatever kind it is. Empty by default: nothing private.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowNets(Vec<IpNet>);

impl AllowNets {
    /// Parses a comma-separated list of networks in CIDR notation (`10.0.0.0/8`, `fd00::/8`) and
    /// addresses (`10.1.2.3` is `10.1.2.3/32`, `::1` is `::1/128`); blank entries are skipped.
    pub fn parse(list: &str) -> Result<AllowNets, AllowNetsError> {
        list.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .map(|net| net.trunc())
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| AllowNetsError { entry: entry.to_owned() })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(AllowNets)
    }

    /// Whether one of the networks contains `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// Whether a webhook may connect to `ip`: it is in an allowed network, or of no refused
    /// kind. An IPv6 address that reaches an IPv4 address is judged by that address.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.contains(ip) {
            return Ok(());
        }
        let ip6 = match ip {
            IpAddr::V4(ip4) => {
                return match REFUSED_V4.iter().find(|(net, _)| net.contains(&ip4)) {
                    Some(&(_, kind)) => Err(Refusal::Address { address: ip, kind }),
                    None => Ok(()),
                };
            }
            IpAddr::V6(ip6) => ip6,
        };
        if let Some(&(_, kind)) = REFUSED_V6.iter().find(|(net, _)| net.contains(&ip6)) {
            return Err(Refusal::Address { address: ip, kind });
        }
        match embedded_ipv4(ip6) {
            Some(ip4) => self.check(IpAddr::V4(ip4)).map_err(|refusal| Refusal::Embedded {
                address: ip6,
                ipv4: ip4,
                kind: refusal.kind(),
            }),
            None => Ok(()),
        }
    }

    /// Judges a URL's host before anything is resolved: a literal address as [`Self::check`]
    /// does, `localhost` and the names under it as loopback; other names are accepted here and
    /// judged by the addresses they resolve to.
    pub fn check_host(&self, host: &str) -> Result<(), Refusal> {
        if let Some(ip) = literal_address(host) {
            return self.check(ip);
        }
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let loopback_allowed = || {
            self.check(Ipv4Addr::LOCALHOST.into()).is_ok() || self.check(Ipv6Addr::LOCALHOST.into()).is_ok()
        };
        if (name == "localhost" || name.ends_with(".localhost")) && !loopback_allowed() {
            return Err(Refusal::LocalhostName(host.to_owned()));
        }
        Ok(())
    }
}

impl FromStr for AllowNets {
    type Err = AllowNetsError;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        AllowNets::parse(list)
    }
}

impl fmt::Display for AllowNets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// The address a URL's host is when it is one: `127.0.0.1`, or `[::1]` (bracketed, as
/// `url::Url::host_str` gives it); `None` for a name.
pub fn literal_address(host: &str) -> Option<IpAddr> {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => host.parse::<IpAddr>().ok(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn kind(allow: &AllowNets, ip: &str) -> Option<AddressKind> {
        allow.check(ip.parse().unwrap()).err().map(|r| r.kind())
    }

    #[test]
    fn every_refused_range_and_some_public_neighbours_are_judged_by_the_table() {
        use AddressKind::*;
        let none = AllowNets::default();
        for (ip, expected) in [
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.15.255.255", None),
            ("172.32.0.0", None),
            ("192.168.1.1", Some(Private)),
            ("192.169.0.1", None),
            ("fc00::1", Some(Private)),
            ("fdff:ffff::1", Some(Private)),
            ("169.254.0.1", Some(LinkLocal)),
            ("169.254.169.254", Some(CloudMetadata)),
            ("fd00:ec2::254", Some(CloudMetadata)),
            ("100.100.100.200", Some(CloudMetadata)),
            ("fe80::1", Some(LinkLocal)),
            ("febf:ffff::1", Some(LinkLocal)),
            ("0.0.0.0", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("0.1.2.3", Some(ThisNetwork)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.255", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("192.0.0.8", Some(ProtocolAssignments)),
            ("192.0.1.1", None),
            ("198.18.0.1", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("198.20.0.0", None),
            ("240.0.0.1", Some(Reserved)),
            ("255.255.255.255", Some(Broadcast)),
            ("fec0::1", Some(SiteLocal)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(CloudMetadata)),
            ("::ffff:8.8.8.8", None),
            ("::10.0.0.1", Some(Private)),
            ("64:ff9b::a9fe:a9fe", Some(CloudMetadata)),
            ("64:ff9b:1::808:808", Some(LocalTranslation)),
            ("::ffff:0:7f00:1", Some(Loopback)),
            ("64:ff9b::808:808", None),
            ("2002:c0a8:0101::1", Some(Private)),
            ("2002:0808:0808::1", None),
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("11.0.0.1", None),
            ("223.255.255.255", None),
            ("2606:4700:4700::1111", None),
            ("2001:db8::1", None),
        ] {
            assert_eq!(kind(&none, ip), expected, "{ip}");
        }
    }

    #[test]
    fn an_allowed_net_admits_addresses_of_any_kind_and_only_those() {
        let allow = AllowNets::parse("127.0.0.0/8, ::1/128,10.1.2.3,fd00::/8,169.254.169.254").unwrap();
        for ip in
            ["127.0.0.1", "127.9.9.9", "::1", "10.1.2.3", "fd12::1", "169.254.169.254", "::ffff:127.0.0.1"]
        {
            assert_eq!(kind(&allow, ip), None, "{ip}");
        }
        assert_eq!(kind(&allow, "10.1.2.4"), Some(AddressKind::Private));
        assert_eq!(kind(&allow, "fc00::1"), Some(AddressKind::Private));
        assert_eq!(kind(&allow, "169.254.169.253"), Some(AddressKind::LinkLocal));
    }

    #[test]
    fn the_allow_list_parses_networks_and_bare_addresses_and_names_a_bad_entry() {
        let allow = AllowNets::parse(" 127.0.0.0/8 ,::1, 10.9.8.7/8,,").unwrap();
        assert_eq!(allow.to_string(), "127.0.0.0/8,::1/128,10.0.0.0/8");
        assert_eq!(AllowNets::parse("").unwrap(), AllowNets::default());
        for bad in ["localhost", "10.0.0.0/33", "10.0.0/8", "::1/129", "*"] {
            let err = AllowNets::parse(&format!("127.0.0.0/8,{bad}")).unwrap_err();
            assert_eq!(err.entry, bad);
        }
    }

    #[test]
    fn refusals_say_what_the_address_is_and_how_to_allow_it() {
        let none = AllowNets::default();
        assert_eq!(
            none.check("127.0.0.1".parse().unwrap()).unwrap_err().to_string(),
            "127.0.0.1 is a loopback address; webhooks must reach public addresses unless \
             PICLOUD_WEBHOOK_ALLOW_NETS allows it"
        );
        let embedded = none.check("::ffff:a9fe:a9fe".parse().unwrap()).unwrap_err().to_string();
        assert!(
            embedded.starts_with("::ffff:169.254.169.254 reaches 169.254.169.254, a cloud metadata address")
        );
        let name = none.check_host("localhost").unwrap_err().to_string();
        assert!(name.starts_with("localhost is a loopback name"), "{name}");
    }

    #[test]
    fn hosts_are_judged_when_they_are_addresses_or_localhost_names() {
        let none = AllowNets::default();
        for host in ["127.0.0.1", "[::1]", "[::ffff:10.0.0.1]", "localhost", "LOCALHOST.", "api.localhost"] {
            assert!(none.check_host(host).is_err(), "{host}");
        }
        for host in
            ["example.com", "8.8.8.8", "[2606:4700:4700::1111]", "localhost.example.com", "mylocalhost"]
        {
            assert_eq!(none.check_host(host), Ok(()), "{host}");
        }
        let loopback = AllowNets::parse("::1").unwrap();
        assert_eq!(loopback.check_host("localhost"), Ok(()));
        assert!(loopback.check_host("127.0.0.1").is_err());
    }

    #[test]
    fn literal_addresses_are_told_from_names() {
        assert_eq!(literal_address("10.0.0.1"), Some(IpAddr::from([10, 0, 0, 1])));
        assert_eq!(literal_address("[::1]"), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(literal_address("example.com"), None);
        assert_eq!(literal_address("[example.com]"), None);
    }

    fn allow_lists() -> impl Strategy<Value = AllowNets> {
        prop_oneof![
            Just(AllowNets::default()),
            (any::<u32>(), 0u8..=32).prop_map(|(ip, prefix)| {
                AllowNets(vec![IpNet::V4(Ipv4Net::new(Ipv4Addr::from(ip), prefix).unwrap().trunc())])
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_ipv6_form_that_embeds_an_ipv4_address_is_judged_like_it(
            ip4 in any::<u32>(),
            suffix in any::<u64>(),
            allow in allow_lists(),
        ) {
            let v4 = Ipv4Addr::from(ip4);
            let expected = allow.check(v4.into()).err().map(|r| r.kind());
            let [a, b, c, d] = v4.octets();
            let mapped = v4.to_ipv6_mapped();
            let nat64 = Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(ip4));
            let translated = Ipv6Addr::from((0xffff_u128 << 48) | u128::from(ip4));
            let six_to_four = Ipv6Addr::from(
                (0x2002_u128 << 112) | (u128::from(ip4) << 80) | (u128::from(suffix) & ((1 << 80) - 1)),
            );
            for v6 in [mapped, translated, nat64, six_to_four] {
                prop_assert_eq!(allow.check(v6.into()).err().map(|r| r.kind()), expected, "{} {}", v6, v4);
            }
            prop_assert_eq!(&six_to_four.octets()[2..6], &[a, b, c, d][..]);
            if ip4 > 1 {
                let compatible = v4.to_ipv6_compatible();
                prop_assert_eq!(allow.check(compatible.into()).err().map(|r| r.kind()), expected);
            }
        }

        #[test]
        fn an_address_inside_an_allowed_net_is_accepted(ip in any::<u128>(), prefix in 0u8..=128, v4 in any::<bool>()) {
            let (ip, net) = if v4 {
                let ip = Ipv4Addr::from(ip as u32);
                (IpAddr::V4(ip), IpNet::V4(Ipv4Net::new(ip, prefix.min(32)).unwrap()))
            } else {
                let ip = Ipv6Addr::from(ip);
                (IpAddr::V6(ip), IpNet::V6(Ipv6Net::new(ip, prefix).unwrap()))
            };
            let allow = AllowNets::parse(&net.to_string()).unwrap();
            prop_assert_eq!(allow.check(ip), Ok(()));
        }
    }
}
