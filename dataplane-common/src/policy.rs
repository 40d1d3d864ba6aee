//! The policy decision both the kernel programs and the agent's tests evaluate.
//!
//! Kept free of map access so it is unit-tested on the host and compiled unchanged into the
//! eBPF object.

use crate::maps::{MAX_PORT_RANGES, PolicyValue};

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// An inclusive range of destination ports (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRange {
    /// First port allowed.
    pub lo: u16,
    /// Last port allowed.
    pub hi: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: Self = Self {
        lo: 0,
        hi: u16::MAX,
    };

    /// Whether `port` lies in the range.
    #[must_use]
    #[inline(always)]
    pub const fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl PolicyValue {
    /// An entry that allows nothing.
    pub const EMPTY: Self = Self {
        count: 0,
        ranges: [PortRange { lo: 0, hi: 0 }; MAX_PORT_RANGES],
    };

    /// Whether this entry allows a packet of `proto` to destination port `port` (host order).
    /// ICMP has no ports: any entry with at least one range allows it.
    #[must_use]
    #[inline(always)]
    pub fn allows(&self, proto: u8, port: u16) -> bool {
        if self.count == 0 {
            return false;
        }
        if proto == PROTO_ICMP {
            return true;
        }
        let mut i = 0;
        // Bounded by the array length, which the verifier sees as a constant trip count.
        while i < MAX_PORT_RANGES {
            if i < self.count as usize && self.ranges[i].contains(port) {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(ranges: &[(u16, u16)]) -> PolicyValue {
        let mut v = PolicyValue::EMPTY;
        for (i, (lo, hi)) in ranges.iter().enumerate() {
            v.ranges[i] = PortRange { lo: *lo, hi: *hi };
        }
        v.count = u32::try_from(ranges.len()).unwrap();
        v
    }

    #[test]
    fn empty_allows_nothing() {
        assert!(!PolicyValue::EMPTY.allows(PROTO_TCP, 80));
        assert!(!PolicyValue::EMPTY.allows(PROTO_ICMP, 0));
    }

    #[test]
    fn ranges_are_inclusive() {
        let v = value(&[(80, 80), (8000, 8080)]);
        assert!(v.allows(PROTO_TCP, 80));
        assert!(!v.allows(PROTO_TCP, 81));
        assert!(!v.allows(PROTO_UDP, 7999));
        assert!(v.allows(PROTO_UDP, 8000));
        assert!(v.allows(PROTO_UDP, 8080));
        assert!(!v.allows(PROTO_UDP, 8081));
    }

    #[test]
    fn ranges_beyond_count_are_ignored() {
        let mut v = value(&[(22, 22)]);
        v.ranges[3] = PortRange::ANY;
        assert!(!v.allows(PROTO_TCP, 443));
    }

    #[test]
    fn icmp_needs_only_an_entry() {
        assert!(value(&[(1, 1)]).allows(PROTO_ICMP, 0));
    }
}
