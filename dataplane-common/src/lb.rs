//! Load balancing of services with a virtual address (VIP) across a quadrant's instances, done
//! once per socket in the cgroup hooks: `connect4` (and `sendmsg4` for unconnected UDP) turns
//! VIP:port into a ready instance's address, `getpeername4` and `recvmsg4` give the application
//! the VIP back. Packets never see the VIP, so the per-packet cost stays zero.
//!
//! The agent writes [`LB_SERVICES`], [`LB_BACKENDS`] and [`LB_PORTS`]; the programs keep the
//! active connection count of each backend in [`LB_ACTIVE`] and each translated socket in
//! [`LB_SOCKS`], and `sock_release` sets a backend's weight to 0 when the instance's listener
//! for the service goes (its process died or closed it): no new connection reaches it from that
//! instant, and the agent's next probe decides whether it comes back.

/// VIP, port and protocol ([`LbServiceKey`]) → [`LbService`].
pub const LB_SERVICES: &str = "LB_SERVICES";
/// `service * LB_BACKENDS_PER_SERVICE + slot` → [`LbBackend`].
pub const LB_BACKENDS: &str = "LB_BACKENDS";
/// Same index as [`LB_BACKENDS`] → active connections (`u64`, changed atomically).
pub const LB_ACTIVE: &str = "LB_ACTIVE";
/// Socket cookie → [`LbSock`]: which VIP a translated socket asked for and where it went.
pub const LB_SOCKS: &str = "LB_SOCKS";
/// [`LbPortKey`] → service index: which service an instance's listener on a port serves, so
/// that `sock_release` can take the instance out of it the moment that listener goes.
pub const LB_PORTS: &str = "LB_PORTS";
/// Socket cookie → backend slot of an instance's socket bound to a service's port (written at
/// `post_bind4`, read and removed at `sock_release`).
pub const LB_LISTENERS: &str = "LB_LISTENERS";
/// Sockets bound to service ports remembered at once.
pub const LB_LISTENERS_MAX: u32 = 4096;
/// `(service * 2 + table) * MAGLEV_SIZE + entry` → backend slot (`u8`, below
/// [`LB_BACKENDS_PER_SERVICE`]) of a service with affinity: two Maglev tables per service, the
/// live one named by [`LbService::maglev`]; the agent writes the other and then flips it in one
/// map update, so no lookup sees half a table.
pub const LB_MAGLEV: &str = "LB_MAGLEV";
/// Entries of one Maglev table: a prime, ~64 per possible backend, so that shares stay within
/// about 1 % of the weights (Maglev's paper: M > 100 N keeps it under 1 %).
pub const MAGLEV_SIZE: u32 = 1021;
/// Entries of [`LB_MAGLEV`].
pub const LB_MAGLEV_MAX: u32 = LB_SERVICES_MAX * 2 * MAGLEV_SIZE;
/// [`LbService::maglev`] of a service without affinity.
pub const MAGLEV_NONE: u8 = 0;

/// Connections from outside the quadrants (the host, or the world through the host) to a VIP,
/// translated per packet by the tcx programs of the quadrants' veths: [`LbFlowKey`] (the packet's
/// addresses and ports) → [`LbFlow`]. Each connection has two entries: its packets to the VIP
/// (forward: the backend they go to, kept for the connection's life — its affinity) and its
/// backend's answers (reverse: the VIP they come from). Writers: tc egress (creates both at the
/// connection's first packet), tc ingress and egress (mark a TCP connection closing).
pub const LB_FLOWS: &str = "LB_FLOWS";
/// Flows remembered at once (least recently used go first).
pub const LB_FLOWS_MAX: u32 = 65_536;
/// Same index as [`LB_ACTIVE`] → outside TCP flows the agent found ended without a FIN or RST
/// (their `CONNTRACK` entry expired) and removed from [`LB_FLOWS`], counted up (`u64`). A
/// backend's active connections are its `LB_ACTIVE` count less this one: each count has one
/// kind of writer (the programs add atomically, the agent alone writes this one), so neither
/// loses the other's updates.
pub const LB_EXPIRED: &str = "LB_EXPIRED";
/// [`LbFlow::flags`]: a reverse entry (its `addr`/`port` are the VIP's).
pub const LB_FLOW_REVERSE: u16 = 1;
/// [`LbFlow::flags`]: the TCP connection's FIN or RST was seen and its count released.
pub const LB_FLOW_CLOSING: u16 = 2;
/// [`LbFlow::flags`] of a reverse entry: the flow's opening SYN was redirected to its backend's
/// veth, where it passes tc egress once more; that pass clears it. A SYN on the same tuple
/// without it is a direct connection clashing with the live translated one.
pub const LB_FLOW_REDIRECTING: u16 = 4;

/// Key of [`LB_FLOWS`]: a packet's addresses and ports as they are on the wire (network byte
/// order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbFlowKey {
    /// Source address.
    pub saddr: u32,
    /// Destination address.
    pub daddr: u32,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding (zero).
    pub pad: [u8; 3],
}

/// Value of [`LB_FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbFlow {
    /// Forward: the backend's address; reverse: the VIP (network byte order).
    pub addr: u32,
    /// Forward: the backend's port; reverse: the VIP's port (network byte order).
    pub port: u16,
    /// [`LB_FLOW_REVERSE`], [`LB_FLOW_CLOSING`], [`LB_FLOW_REDIRECTING`].
    pub flags: u16,
    /// The backend's slot (its [`LB_ACTIVE`] count).
    pub slot: u32,
    /// Forward: the host-side veth the backend is behind (a packet routed to another instance's
    /// veth is redirected there).
    pub ifindex: u32,
}

/// Services with a VIP at most.
pub const LB_SERVICES_MAX: u32 = 64;
/// Backends (instances) of one service at most.
pub const LB_BACKENDS_PER_SERVICE: u32 = 16;
/// Entries of [`LB_BACKENDS`] and [`LB_ACTIVE`].
pub const LB_BACKENDS_MAX: u32 = LB_SERVICES_MAX * LB_BACKENDS_PER_SERVICE;
/// Translated sockets remembered at once (least recently used go first).
pub const LB_SOCKS_MAX: u32 = 65_536;

/// Key of [`LB_SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbServiceKey {
    /// The VIP (network byte order).
    pub vip: u32,
    /// Port (network byte order).
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding (zero).
    pub pad: u8,
}

/// Key of [`LB_PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbPortKey {
    /// The service's quadrant.
    pub quadrant: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Port on the instances (network byte order).
    pub port: u16,
}

/// Value of [`LB_SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbService {
    /// The service's index: its backends are at `index * LB_BACKENDS_PER_SERVICE ..`.
    pub index: u32,
    /// Backend slots in use (at most [`LB_BACKENDS_PER_SERVICE`]).
    pub backends: u16,
    /// Affinity by caller: [`MAGLEV_NONE`], or 1 + the live table (0 or 1) in [`LB_MAGLEV`].
    pub maglev: u8,
    /// Explicit padding (zero).
    pub pad: u8,
}

/// Entry of a Maglev table for `key` (a caller's workload cgroup id): a 64-bit mix of the key
/// (`SplitMix64`'s finalizer), so that neighbouring ids land far apart, modulo the table size.
#[must_use]
pub const fn maglev_entry(key: u64) -> u32 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    #[expect(clippy::cast_possible_truncation, reason = "below MAGLEV_SIZE, a u32")]
    let entry = (z % MAGLEV_SIZE as u64) as u32;
    entry
}

/// Value of [`LB_BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbBackend {
    /// The instance's address (network byte order).
    pub addr: u32,
    /// Port on the instance (network byte order).
    pub port: u16,
    /// Capacity weight; 0: not ready (draining, failed its probe, gone): receives nothing new.
    pub weight: u16,
    /// The instance's host-side veth (where packets translated in tc go); 0: an instance of a
    /// peer node, reached through the routes to its prefixes, which tc never chooses.
    pub ifindex: u32,
}

/// Value of [`LB_SOCKS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbSock {
    /// The VIP the socket asked for (network byte order).
    pub vip: u32,
    /// The backend it went to (network byte order).
    pub addr: u32,
    /// VIP port (network byte order).
    pub vip_port: u16,
    /// Backend port (network byte order).
    pub port: u16,
    /// Index in [`LB_ACTIVE`] counted for this socket; `u32::MAX` when nothing is counted.
    pub counted: u32,
}

/// Whether backend `a` (with `a_active` connections and weight `a_weight`) is a better choice
/// than `b`: fewer active connections per unit of capacity. Weights of 0 never win.
#[must_use]
pub const fn less_loaded(a_active: u32, a_weight: u16, b_active: u32, b_weight: u16) -> bool {
    if a_weight == 0 {
        return false;
    }
    if b_weight == 0 {
        return true;
    }
    // a/wa < b/wb  ⇔  a·wb < b·wa (no division, no overflow in u64).
    (a_active as u64) * (b_weight as u64) < (b_active as u64) * (a_weight as u64)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, no implicit padding (sizes asserted below).
    unsafe impl aya::Pod for super::LbServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LbService {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LbBackend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LbSock {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LbPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LbFlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LbFlow {}
}

const _: () = {
    assert!(size_of::<LbServiceKey>() == 8);
    assert!(size_of::<LbService>() == 8);
    assert!(size_of::<LbBackend>() == 12);
    assert!(size_of::<LbFlowKey>() == 16);
    assert!(size_of::<LbFlow>() == 16);
    assert!(size_of::<LbSock>() == 16);
    assert!(size_of::<LbPortKey>() == 4);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maglev_entries_are_in_the_table_and_spread() {
        let mut hits = [0u32; MAGLEV_SIZE as usize];
        for key in 0..100_000u64 {
            let e = maglev_entry(key);
            assert!(e < MAGLEV_SIZE);
            hits[e as usize] += 1;
        }
        // ~98 keys per entry; consecutive ids must not pile up.
        assert!(
            hits.iter().all(|&h| (40..200).contains(&h)),
            "{:?}",
            &hits[..8]
        );
    }

    #[test]
    fn fewer_connections_per_capacity_wins_and_unready_never_does() {
        assert!(less_loaded(0, 1, 1, 1));
        assert!(!less_loaded(1, 1, 1, 1), "a tie is not better");
        assert!(
            less_loaded(3, 4, 1, 1),
            "3 on capacity 4 beats 1 on capacity 1"
        );
        assert!(!less_loaded(0, 0, 100, 1), "not ready never wins");
        assert!(less_loaded(100, 1, 0, 0), "anything ready beats not ready");
        assert!(less_loaded(u32::MAX - 1, u16::MAX, u32::MAX, u16::MAX));
    }
}
