//! Replica and auditor placement: which workers count as "the same place" and must not verify each other's work
//! (docs/PROTOCOL.md, Verification, "Placement").

use std::net::IpAddr;

/// How replicas and auditors of one unit are kept apart (`--placement`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Never two workers of one IPv4 /24 or one IPv6 /48 on a unit (the production default): one household or
    /// one rented block of addresses cannot hold every replica of a unit, nor audit itself.
    #[default]
    Subnet,
    /// Never two workers of one address (for networks where a /24 is shared by strangers, and tests that bind
    /// distinct loopback addresses inside 127.0.0.0/8).
    Address,
    /// Only never the same worker twice (all local tests run from 127.0.0.1).
    Off,
}

impl Placement {
    /// Whether workers at `a` and `b` may not share a unit under this rule. Loopback is one machine: workers on
    /// the default loopback address (127.0.0.1, ::1) are a local demo or test run and are never kept apart, and
    /// other loopback addresses (tests and the swarm bench bind `127.x.y.z` source addresses) are compared whole,
    /// as under `address`.
    pub fn same_place(self, a: IpAddr, b: IpAddr) -> bool {
        let (a, b) = (canonical(a), canonical(b));
        let demo = |x: IpAddr| {
            x == IpAddr::from([127, 0, 0, 1]) || x == IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        };
        if demo(a) && demo(b) {
            return false;
        }
        match self {
            Self::Off => false,
            Self::Address => a == b,
            Self::Subnet if a.is_loopback() && b.is_loopback() => a == b,
            Self::Subnet => match (a, b) {
                (IpAddr::V4(a), IpAddr::V4(b)) => a.octets()[..3] == b.octets()[..3],
                (IpAddr::V6(a), IpAddr::V6(b)) => a.segments()[..3] == b.segments()[..3],
                _ => false,
            },
        }
    }

    /// Whether `addr` may join a unit whose workers so far are at `taken`.
    pub fn apart(self, addr: IpAddr, taken: impl IntoIterator<Item = IpAddr>) -> bool {
        taken.into_iter().all(|t| !self.same_place(addr, t))
    }
}

/// Partners remembered per worker: among units equally short of replicas, one whose workers include none of a
/// worker's last this many partners is preferred, so no two workers are paired again and again.
pub const RECENT_PARTNERS: usize = 16;

impl super::State {
    /// Records that `worker` joins a unit held by `others`.
    pub(super) fn met(
        &mut self,
        worker: starling_core::protocol::WorkerId,
        others: &[starling_core::protocol::WorkerId],
    ) {
        for &o in others.iter().filter(|o| **o != worker) {
            for (a, b) in [(worker, o), (o, worker)] {
                let recent = self.partners.entry(a).or_default();
                recent.retain(|p| *p != b);
                recent.push_back(b);
                if recent.len() > RECENT_PARTNERS {
                    recent.pop_front();
                }
            }
        }
    }

    /// Whether `worker` met `other` on one of its last [`RECENT_PARTNERS`] partnerships.
    pub(super) fn met_lately(
        &self,
        worker: starling_core::protocol::WorkerId,
        other: starling_core::protocol::WorkerId,
    ) -> bool {
        self.partners
            .get(&worker)
            .is_some_and(|r| r.contains(&other))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (a dual-stack listener reports IPv4 peers that way).
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn subnets_are_ipv4_slash_24_and_ipv6_slash_48() {
        let p = Placement::Subnet;
        assert!(p.same_place(ip("10.1.2.3"), ip("10.1.2.200")));
        assert!(!p.same_place(ip("10.1.2.3"), ip("10.1.3.3")));
        assert!(p.same_place(ip("2001:db8:1::1"), ip("2001:db8:1:ffff::2")));
        assert!(!p.same_place(ip("2001:db8:1::1"), ip("2001:db8:2::1")));
        assert!(p.same_place(ip("::ffff:10.1.2.3"), ip("10.1.2.9")));
        assert!(!p.same_place(ip("10.1.2.3"), ip("::1")));
    }

    #[test]
    fn address_and_off_rules() {
        assert!(Placement::Address.same_place(ip("10.0.0.1"), ip("10.0.0.1")));
        assert!(!Placement::Subnet.same_place(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(!Placement::Subnet.same_place(ip("::1"), ip("::1")));
        assert!(Placement::Subnet.same_place(ip("127.0.5.5"), ip("127.0.5.5")));
        assert!(!Placement::Subnet.same_place(ip("127.0.5.5"), ip("127.0.5.6")));
        assert!(!Placement::Address.same_place(ip("127.0.0.1"), ip("127.0.0.2")));
        assert!(!Placement::Off.same_place(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(Placement::Subnet.apart(ip("10.0.1.1"), [ip("10.0.2.1"), ip("10.0.3.1")]));
        assert!(!Placement::Subnet.apart(ip("10.0.1.1"), [ip("10.0.2.1"), ip("10.0.1.7")]));
    }
}
