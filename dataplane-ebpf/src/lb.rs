//! Service VIPs (see `dataplane_common::lb`): `connect4`/`sendmsg4` turn VIP:port into a ready
//! instance of the service once per socket, `getpeername4`/`recvmsg4` give the application the
//! VIP back, and the breaker `sock_ops` program keeps each backend's count of active TCP
//! connections (counted when the connection reaches TCP, released at `CLOSE`).
//!
//! The choice: least active connections per unit of capacity among the ready backends (weight
//! above 0), ties broken by a random starting point so that idle backends share new
//! connections evenly. The policy then decides on the instance's address, as for any connect.

use aya_ebpf::{
    bindings::{BPF_TCP_LISTEN, bpf_sock_addr},
    cty::c_void,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockContext},
};
use dataplane_common::{
    lb::{
        LB_BACKENDS_MAX, LB_BACKENDS_PER_SERVICE, LB_LISTENERS_MAX, LB_MAGLEV_MAX, LB_SERVICES_MAX,
        LB_SOCKS_MAX, LbBackend, LbPortKey, LbService, LbServiceKey, LbSock, MAGLEV_NONE,
        MAGLEV_SIZE, less_loaded, maglev_entry,
    },
    policy::{PROTO_TCP, PROTO_UDP},
};

use crate::decide::cgroup_level;

/// (VIP, port, protocol) → the service's backend range. Writer: agent.
#[map(name = "LB_SERVICES")]
pub(crate) static LB_SERVICES: HashMap<LbServiceKey, LbService> =
    HashMap::with_max_entries(LB_SERVICES_MAX, 0);

/// Backend slots of every service. Writer: agent.
#[map(name = "LB_BACKENDS")]
static LB_BACKENDS: Array<LbBackend> = Array::with_max_entries(LB_BACKENDS_MAX, 0);

/// (quadrant, protocol, port) → the service an instance's listener there serves. Writer: agent.
#[map(name = "LB_PORTS")]
static LB_PORTS: HashMap<LbPortKey, u32> = HashMap::with_max_entries(LB_SERVICES_MAX, 0);

/// The Maglev tables of services with affinity (two per service, one live). Writer: agent.
#[map(name = "LB_MAGLEV")]
static LB_MAGLEV: Array<u8> = Array::with_max_entries(LB_MAGLEV_MAX, 0);

/// Socket cookie → backend slot of an instance's socket bound to a service's port. Writers:
/// `post_bind4` (insert), `sock_release` (remove).
#[map(name = "LB_LISTENERS")]
static LB_LISTENERS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(LB_LISTENERS_MAX, 0);

/// Active TCP connections per backend slot. Writer: the breaker `sock_ops` program (atomic).
#[map(name = "LB_ACTIVE")]
pub(crate) static LB_ACTIVE: Array<u64> = Array::with_max_entries(LB_BACKENDS_MAX, 0);

/// Outside flows per backend slot the agent expired (see `dataplane_common::lb::LB_EXPIRED`).
/// Writer: agent.
#[map(name = "LB_EXPIRED")]
static LB_EXPIRED: Array<u64> = Array::with_max_entries(LB_BACKENDS_MAX, 0);

/// Socket cookie → the VIP it asked for and the backend it got. Writers: `connect4`,
/// `sendmsg4`; the breaker `sock_ops` program removes a TCP socket's entry at `CLOSE`.
#[map(name = "LB_SOCKS")]
static LB_SOCKS: LruHashMap<u64, LbSock> = LruHashMap::with_max_entries(LB_SOCKS_MAX, 0);

/// Nothing counted in `LbSock::counted` (a datagram socket).
const NOT_COUNTED: u32 = u32::MAX;

/// What translation did to a `connect4`/`sendmsg4`.
pub enum Translated {
    /// Not a VIP: nothing changed.
    No,
    /// Rewritten to this backend; [`commit`] records it once the call is allowed.
    To(LbSock),
    /// A VIP without a ready backend.
    NoBackend,
}

#[inline(always)]
fn backend(index: u32) -> Option<LbBackend> {
    LB_BACKENDS.get(index).copied()
}

#[inline(always)]
fn active(index: u32) -> u32 {
    let n = LB_ACTIVE.get(index).copied().unwrap_or(0);
    let expired = LB_EXPIRED.get(index).copied().unwrap_or(0);
    u32::try_from(n.saturating_sub(expired)).unwrap_or(u32::MAX)
}

/// The ready backend after slot `slot` of `service` (wrapping), if it is ready and on this node
/// (tc, its only caller, can hand a packet only to a local veth).
#[inline(always)]
pub(crate) fn next_ready(service: &LbService, slot: u32) -> Option<(u32, LbBackend)> {
    let n = u32::from(service.backends);
    let base = service.index.checked_mul(LB_BACKENDS_PER_SERVICE)?;
    if n < 2 || slot < base {
        return None;
    }
    let next = base + (slot - base + 1) % n;
    let b = backend(next)?;
    (b.weight != 0 && b.ifindex != 0).then_some((next, b))
}

/// The ready backend with the fewest active connections per unit of capacity, or `None`.
#[inline(always)]
pub(crate) fn choose(service: &LbService, local_only: bool) -> Option<(u32, LbBackend)> {
    let n = u32::from(service.backends);
    if n == 0 || n > LB_BACKENDS_PER_SERVICE {
        return None;
    }
    let base = service.index.checked_mul(LB_BACKENDS_PER_SERVICE)?;
    // SAFETY: helper without preconditions.
    let start = unsafe { bpf_get_prandom_u32() } % n;
    // Plain values rather than an `Option` of the tuple: an `Option` left `None` has an
    // undefined payload, which the compiler may copy from a register the verifier calls
    // unreadable.
    let (mut best_slot, mut best, mut best_active) = (u32::MAX, LbBackend::default(), 0u32);
    for i in 0..LB_BACKENDS_PER_SERVICE {
        if i >= n {
            break;
        }
        let slot = base + (start + i) % n;
        let Some(b) = backend(slot) else { continue };
        // A backend without a veth is an instance of a peer node.
        if b.weight == 0 || (local_only && b.ifindex == 0) {
            continue;
        }
        let a = active(slot);
        if best_slot == u32::MAX || less_loaded(a, b.weight, best_active, best.weight) {
            (best_slot, best, best_active) = (slot, b, a);
        }
    }
    (best_slot != u32::MAX).then_some((best_slot, best))
}

/// For a service with affinity: the backend the live Maglev table gives the caller's workload
/// (its cgroup one level below the quadrant's; the quadrant's own for its other processes),
/// if that backend is ready; otherwise the least-loaded choice decides.
#[inline(always)]
fn by_affinity(service: &LbService) -> Option<(u32, LbBackend)> {
    if service.maglev == MAGLEV_NONE {
        return None;
    }
    let level = cgroup_level();
    // SAFETY: helper without preconditions.
    let workload = unsafe { bpf_get_current_ancestor_cgroup_id((level + 1).cast_signed()) };
    let key = if workload == 0 {
        // SAFETY: as above.
        unsafe { bpf_get_current_ancestor_cgroup_id(level.cast_signed()) }
    } else {
        workload
    };
    let table = service
        .index
        .checked_mul(2)?
        .checked_add(u32::from(service.maglev - 1) & 1)?;
    let entry = table.checked_mul(MAGLEV_SIZE)? + maglev_entry(key);
    let k = u32::from(*LB_MAGLEV.get(entry)?);
    if k >= u32::from(service.backends) {
        return None;
    }
    let slot = service.index.checked_mul(LB_BACKENDS_PER_SERVICE)? + k;
    let b = backend(slot)?;
    (b.weight != 0).then_some((slot, b))
}

/// Translates a `connect4` (`connect`) or `sendmsg4` to a VIP. A datagram socket that sent to
/// the VIP before keeps its backend while that one stays ready.
#[inline(always)]
pub fn translate(sa: *mut bpf_sock_addr, connect: bool) -> Translated {
    // SAFETY: the context fields read here are readable for connect4 and sendmsg4.
    let (vip, port, proto) = unsafe {
        let port = (*sa).user_port.to_ne_bytes();
        (
            (*sa).user_ip4,
            u16::from_ne_bytes([port[0], port[1]]),
            (*sa).protocol.to_ne_bytes()[0],
        )
    };
    let key = LbServiceKey {
        vip,
        port,
        proto,
        pad: 0,
    };
    // SAFETY: read-only lookup of a plain value.
    let Some(service) = (unsafe { LB_SERVICES.get(key) }) else {
        return Translated::No;
    };
    let cookie = || {
        // SAFETY: the context pointer is the kernel's `bpf_sock_addr` for this call.
        unsafe { bpf_get_socket_cookie(sa.cast::<c_void>()) }
    };
    let mut chosen = None;
    if !connect {
        // SAFETY: read-only lookup of a plain value.
        if let Some(s) = unsafe { LB_SOCKS.get(cookie()) }
            && s.vip == vip
            && s.vip_port == port
        {
            let base = service.index.saturating_mul(LB_BACKENDS_PER_SERVICE);
            let mut i = 0;
            while i < LB_BACKENDS_PER_SERVICE {
                if i >= u32::from(service.backends) {
                    break;
                }
                if let Some(b) = backend(base + i)
                    && b.weight != 0
                    && b.addr == s.addr
                    && b.port == s.port
                {
                    chosen = Some((base + i, b));
                    break;
                }
                i += 1;
            }
        }
    }
    let Some((slot, b)) = chosen
        .or_else(|| by_affinity(service))
        .or_else(|| choose(service, false))
    else {
        return Translated::NoBackend;
    };
    // SAFETY: connect4 and sendmsg4 may rewrite the destination.
    unsafe {
        (*sa).user_ip4 = b.addr;
        (*sa).user_port = u32::from(b.port);
    }
    Translated::To(LbSock {
        vip,
        addr: b.addr,
        vip_port: port,
        port: b.port,
        // A TCP socket is counted against its backend once it reaches TCP (`connecting`).
        counted: if connect && proto == PROTO_TCP {
            slot
        } else {
            NOT_COUNTED
        },
    })
}

/// Adds `v` (wrapping: `u64::MAX` subtracts one) to `*c` atomically across CPUs (`BPF_ATOMIC`
/// add; the bpf target's `core::sync::atomic` has loads and stores only).
///
/// # Safety
/// `c` points to a live map value.
#[inline(always)]
pub(crate) unsafe fn atomic_add(c: *mut u64, v: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            c, v,
        );
    }
}

/// Records an allowed translation for the socket.
#[inline(always)]
pub fn commit(sa: *mut bpf_sock_addr, sock: &LbSock) {
    // SAFETY: the context pointer is the kernel's `bpf_sock_addr` for this call.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast::<c_void>()) };
    let _ = LB_SOCKS.insert(cookie, sock, 0);
}

/// `sock_ops` at `TCP_CONNECT_CB`: whether the socket was translated; its backend's count goes
/// up by one and the caller asks for the state callback that releases it.
#[inline(always)]
pub fn connecting(cookie: u64) -> bool {
    let Some(s) = LB_SOCKS.get_ptr_mut(cookie) else {
        return false;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let s = unsafe { &mut *s };
    if s.counted == NOT_COUNTED {
        return false;
    }
    if let Some(c) = LB_ACTIVE.get_ptr_mut(s.counted) {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { atomic_add(c, 1) };
    }
    true
}

/// `sock_ops` at `CLOSE`: releases the count of a translated socket and forgets it.
#[inline(always)]
pub fn closed(cookie: u64) {
    // SAFETY: read-only lookup of a plain value.
    let Some(s) = (unsafe { LB_SOCKS.get(cookie) }) else {
        return;
    };
    if s.counted != NOT_COUNTED
        && let Some(c) = LB_ACTIVE.get_ptr_mut(s.counted)
    {
        // SAFETY: a map value pointer, valid for this program run. Each counted socket was
        // added once at `connecting`, so the count does not go below zero.
        unsafe {
            if core::ptr::read_volatile(c) > 0 {
                atomic_add(c, u64::MAX);
            }
        }
    }
    let _ = LB_SOCKS.remove(cookie);
}

/// Gives a translated socket's peer (or a datagram's source) the VIP back.
#[inline(always)]
fn restore(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is the kernel's `bpf_sock_addr` for this call.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast::<c_void>()) };
    // SAFETY: read-only lookup of a plain value.
    if let Some(s) = unsafe { LB_SOCKS.get(cookie) } {
        // SAFETY: getpeername4 and recvmsg4 may read and rewrite the address.
        unsafe {
            let port = (*sa).user_port.to_ne_bytes();
            if (*sa).user_ip4 == s.addr && u16::from_ne_bytes([port[0], port[1]]) == s.port {
                (*sa).user_ip4 = s.vip;
                (*sa).user_port = u32::from(s.vip_port);
            }
        }
    }
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn quadrant_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn quadrant_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}

/// An instance's socket bound to a service's port: recorded (by cookie) as the listener whose
/// release takes the instance out of that service. `sock_release` cannot read a socket's port,
/// `post_bind4` can.
#[cgroup_sock(post_bind4)]
pub fn quadrant_post_bind4(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: protocol and src_port are readable in post_bind4.
    let (proto, port) = unsafe { ((*sk).protocol, (*sk).src_port) };
    if proto != u32::from(PROTO_TCP) && proto != u32::from(PROTO_UDP) {
        return 1;
    }
    let Some(cv) = crate::decide::caller_cgroup() else {
        return 1;
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "protocol numbers and ports fit (src_port is a 16-bit port in host order)"
    )]
    let key = LbPortKey {
        quadrant: cv.quadrant,
        proto: proto as u8,
        port: (port as u16).to_be(),
    };
    // SAFETY: read-only lookup of a plain value.
    let Some(&index) = (unsafe { LB_PORTS.get(key) }) else {
        return 1;
    };
    if let Some(slot) = index
        .checked_mul(LB_BACKENDS_PER_SERVICE)
        .and_then(|b| b.checked_add(u32::from(cv.instance)))
    {
        // SAFETY: the context pointer is the kernel's `bpf_sock` for this call.
        let cookie = unsafe { bpf_get_socket_cookie(sk.cast::<c_void>()) };
        let _ = LB_LISTENERS.insert(cookie, slot, 0);
    }
    1
}

/// A socket [`quadrant_post_bind4`] recorded goes (its process closed it or died): if it was a
/// TCP listener (still in `LISTEN`: this runs before the kernel closes it) or a UDP socket, the
/// instance leaves the service's backends at once (weight 0); the agent's next probe decides
/// when it comes back.
#[cgroup_sock(sock_release)]
pub fn quadrant_sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the context pointer is the kernel's `bpf_sock` for this call.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast::<c_void>()) };
    // SAFETY: read-only lookup of a plain value.
    let Some(&slot) = (unsafe { LB_LISTENERS.get(cookie) }) else {
        return 1;
    };
    let _ = LB_LISTENERS.remove(cookie);
    // SAFETY: protocol and state are readable in sock_release.
    let (proto, state) = unsafe { ((*sk).protocol, (*sk).state) };
    if proto == u32::from(PROTO_TCP) && state != BPF_TCP_LISTEN {
        // Bound but never listening (or a connection): no listener went.
        return 1;
    }
    if let Some(b) = LB_BACKENDS.get_ptr_mut(slot) {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { (*b).weight = 0 };
    }
    1
}
