//! Connections to a service VIP from outside the quadrants — the host's own processes, or the
//! world forwarded by the host — translated per packet in tc (the quadrants' processes are
//! translated once per socket in `lb.rs` and never send a packet to a VIP).
//!
//! The agent routes each VIP to the host-side veth of its quadrant's first instance. There, tc
//! egress (into the quadrant) takes a packet to VIP:port from an outside source: at the
//! connection's first packet (a SYN, or any UDP datagram of a new flow) it picks a backend as
//! `connect4` does (least active connections per unit of capacity) and records the flow both
//! ways in `LB_FLOWS`; every packet of the flow then goes to that backend — its connection
//! affinity — with its destination rewritten and, if the backend is another instance, redirected
//! to that instance's veth. The backend's answers, leaving through tc ingress of its veth, get
//! the VIP back as their source. A TCP flow is counted in `LB_ACTIVE` from its SYN to its first
//! FIN or RST. The policy decides on the backend's address, as for every packet.
//!
//! A translated connection takes the tuple (source, backend) at the backend. A new flow passes
//! over a backend whose tuple a live flow holds (a direct connection, or another VIP's) for the
//! next ready backend when that one's is free; a SYN straight to an instance on the tuple of a live
//! translated connection is dropped (`drop_tuple_in_use`): the instance could not tell the two
//! apart, and the older connection's answers would leave with the VIP's address.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_redirect_neigh,
    macros::map,
    maps::LruHashMap,
    programs::TcContext,
};
use dataplane_common::{
    lb::{
        LB_FLOW_CLOSING, LB_FLOW_REDIRECTING, LB_FLOW_REVERSE, LB_FLOWS_MAX, LbBackend, LbFlow,
        LbFlowKey, LbServiceKey,
    },
    policy::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    lb::{LB_ACTIVE, LB_SERVICES, atomic_add, choose, next_ready},
    parse::Ipv4Flow,
};

/// Both directions of each translated flow. Writers: tc egress (creates), tc egress and
/// ingress (mark closing).
#[map(name = "LB_FLOWS")]
static LB_FLOWS: LruHashMap<LbFlowKey, LbFlow> = LruHashMap::with_max_entries(LB_FLOWS_MAX, 0);

/// Offset of the IPv4 header's checksum, source and destination in an Ethernet frame.
const IP_CSUM_OFF: usize = 14 + 10;
const IP_SRC_OFF: usize = 14 + 12;
const IP_DST_OFF: usize = 14 + 16;

/// What tc egress did to a packet.
pub enum Into {
    /// Not to a VIP (or not the start of a flow it knows): untouched.
    Untouched,
    /// Rewritten to its flow's backend, which is behind veth `ifindex`; the first packet of a
    /// flow brings the flow, which [`commit`] records once the policy passed the packet.
    Translated {
        /// The backend's host-side veth.
        ifindex: u32,
        /// A new flow.
        new: Option<NewFlow>,
    },
    /// To a VIP without a ready backend.
    NoBackend,
    /// A SYN straight to an instance on the tuple of a live translated connection.
    TupleInUse,
}

/// A flow chosen at its first packet, not yet recorded.
pub struct NewFlow {
    key: LbFlowKey,
    forward: LbFlow,
}

/// Records a new flow both ways (and counts a TCP one against its backend); `redirecting`: its
/// first packet goes on to the backend's veth (and passes tc egress there once more). A packet
/// the policy drops records nothing: no count waits for a connection that cannot happen.
#[inline(always)]
pub fn commit(new: &NewFlow, redirecting: bool) {
    let (key, f) = (&new.key, &new.forward);
    // A reused tuple's old flow ends here if it had not ended yet.
    close(key);
    let reverse = LbFlow {
        addr: key.daddr,
        port: key.dport,
        flags: if redirecting {
            LB_FLOW_REVERSE | LB_FLOW_REDIRECTING
        } else {
            LB_FLOW_REVERSE
        },
        slot: f.slot,
        ifindex: 0,
    };
    let rkey = key_of(f.addr, key.saddr, f.port, key.sport, key.proto);
    if LB_FLOWS.insert(key, f, 0).is_err() || LB_FLOWS.insert(rkey, reverse, 0).is_err() {
        return;
    }
    if key.proto == PROTO_TCP
        && let Some(c) = LB_ACTIVE.get_ptr_mut(f.slot)
    {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { atomic_add(c, 1) };
    }
}

#[inline(always)]
fn key_of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> LbFlowKey {
    LbFlowKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        pad: [0; 3],
    }
}

/// Marks the flow of forward entry `key` closing and releases its count, once.
#[inline(always)]
fn close(key: &LbFlowKey) {
    let Some(f) = LB_FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let f = unsafe { &mut *f };
    if f.flags & LB_FLOW_CLOSING != 0 {
        return;
    }
    f.flags |= LB_FLOW_CLOSING;
    if key.proto == PROTO_TCP
        && let Some(c) = LB_ACTIVE.get_ptr_mut(f.slot)
    {
        // SAFETY: a map value pointer; the flow was counted once at its SYN. Two CPUs closing
        // the same flow at once could both get here: the count never goes below zero.
        unsafe {
            if core::ptr::read_volatile(c) > 0 {
                atomic_add(c, u64::MAX);
            }
        }
    }
}

/// A SYN straight to an instance's address on the tuple a translated connection to a VIP has
/// or had. Closed (the host reuses the source port once it is free): the old flow's entries
/// would give this connection's answers the VIP as their source, so they go. Live: once, the
/// translated SYN itself passing the backend's veth after its redirect (the flag its commit
/// set); otherwise a direct connection clashing with it — `true`.
#[inline(always)]
fn direct_syn_clashes(flow: &Ipv4Flow) -> bool {
    let rkey = key_of(flow.daddr, flow.saddr, flow.dport, flow.sport, flow.proto);
    let Some(r) = LB_FLOWS.get_ptr_mut(rkey) else {
        return false;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let r = unsafe { &mut *r };
    if r.flags & LB_FLOW_REVERSE == 0 {
        return false;
    }
    let fkey = key_of(flow.saddr, r.addr, flow.sport, r.port, flow.proto);
    // SAFETY: read-only lookup of a plain value.
    let live = unsafe { LB_FLOWS.get(fkey) }.is_some_and(|fw| fw.flags & LB_FLOW_CLOSING == 0);
    if !live {
        let _ = LB_FLOWS.remove(rkey);
        let _ = LB_FLOWS.remove(fkey);
        return false;
    }
    if r.flags & LB_FLOW_REDIRECTING != 0 {
        r.flags &= !LB_FLOW_REDIRECTING;
        return false;
    }
    true
}

/// Whether a live flow other than one of the VIP `(vip, vport)` holds the tuple (`saddr`,
/// `sport`) → backend `b`: another VIP's translated connection, or a direct one the flow table
/// tracks.
#[inline(always)]
fn tuple_taken(flow: &Ipv4Flow, b: &LbBackend) -> bool {
    let rkey = key_of(b.addr, flow.saddr, b.port, flow.sport, flow.proto);
    // SAFETY: read-only lookup of a plain value.
    if let Some(r) = unsafe { LB_FLOWS.get(rkey) }.copied()
        && r.flags & LB_FLOW_REVERSE != 0
    {
        if r.addr == flow.daddr && r.port == flow.dport {
            // This VIP's own (a retransmitted SYN, a reused tuple): no clash.
            return false;
        }
        let fkey = key_of(flow.saddr, r.addr, flow.sport, r.port, flow.proto);
        // SAFETY: read-only lookup of a plain value.
        return unsafe { LB_FLOWS.get(fkey) }.is_some_and(|fw| fw.flags & LB_FLOW_CLOSING == 0);
    }
    crate::decide::tracked(flow.saddr, b.addr, flow.sport, b.port, flow.proto)
}

/// Rewrites one address (at `addr_off`) and the port at `port_off` of the packet, fixing the
/// IPv4 and TCP/UDP checksums (a UDP datagram without a checksum keeps none).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    (addr_off, old_addr, new_addr): (usize, u32, u32),
    (port_off, old_port, new_port): (usize, u16, u16),
) -> Result<(), i64> {
    let l4 = usize::from(flow.l4);
    let (csum_off, mangled) = if flow.proto == PROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))
    };
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_addr),
            u64::from(new_addr),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4)?;
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port),
            mangled | 2,
        )?;
        ctx.store(l4 + port_off, &new_port, 0)?;
    }
    Ok(())
}

/// tc egress into a quadrant, for a packet from outside the quadrants: translates a packet to
/// a VIP (see the module). `flow` is updated to the translated addresses.
#[inline(always)]
pub fn into_quadrant(ctx: &TcContext, flow: &mut Ipv4Flow) -> Into {
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return Into::Untouched;
    }
    let key = key_of(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    // A SYN starts a new connection on the tuple: it chooses afresh.
    let known = if flow.opens {
        None
    } else {
        // SAFETY: read-only lookup of a plain value.
        unsafe { LB_FLOWS.get(key) }.copied()
    };
    let mut new = None;
    let f = match known {
        Some(f) if f.flags & LB_FLOW_REVERSE == 0 => f,
        _ => {
            if flow.proto == PROTO_TCP && !flow.opens {
                // The middle of a connection this table never saw (or forgot): left as it is
                // (the host's connections to quadrant addresses pay no more than this).
                return Into::Untouched;
            }
            let skey = LbServiceKey {
                vip: flow.daddr,
                port: flow.dport,
                proto: flow.proto,
                pad: 0,
            };
            // SAFETY: read-only lookup of a plain value.
            let Some(service) = (unsafe { LB_SERVICES.get(skey) }) else {
                if flow.opens && flow.proto == PROTO_TCP && direct_syn_clashes(flow) {
                    return Into::TupleInUse;
                }
                return Into::Untouched;
            };
            // Only this node's instances: a packet can be handed only to a local veth.
            let Some((mut slot, mut b)) = choose(service, true) else {
                return Into::NoBackend;
            };
            // A backend whose tuple a live flow holds: the next ready one if its tuple is free
            // (else this one, as before).
            if tuple_taken(flow, &b)
                && let Some((next_slot, next)) = next_ready(service, slot)
                && !tuple_taken(flow, &next)
            {
                (slot, b) = (next_slot, next);
            }
            let f = LbFlow {
                addr: b.addr,
                port: b.port,
                flags: 0,
                slot,
                ifindex: b.ifindex,
            };
            new = Some(NewFlow { key, forward: f });
            f
        }
    };
    if flow.closes && new.is_none() {
        close(&key);
    }
    if rewrite(
        ctx,
        flow,
        (IP_DST_OFF, flow.daddr, f.addr),
        (2, flow.dport, f.port),
    )
    .is_err()
    {
        return Into::NoBackend;
    }
    flow.daddr = f.addr;
    flow.dport = f.port;
    Into::Translated {
        ifindex: f.ifindex,
        new,
    }
}

/// tc ingress from a quadrant, for a packet to outside the quadrants that the policy passed:
/// an answer of a translated flow gets the VIP back as its source.
#[inline(always)]
pub fn from_quadrant(ctx: &TcContext, flow: &Ipv4Flow) {
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return;
    }
    let key = key_of(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    // SAFETY: read-only lookup of a plain value.
    let Some(f) = (unsafe { LB_FLOWS.get(key) }).copied() else {
        return;
    };
    if f.flags & LB_FLOW_REVERSE == 0 {
        return;
    }
    if flow.closes {
        close(&key_of(flow.daddr, f.addr, flow.dport, f.port, flow.proto));
    }
    let _ = rewrite(
        ctx,
        flow,
        (IP_SRC_OFF, flow.saddr, f.addr),
        (0, flow.sport, f.port),
    );
}

/// Sends a translated packet on to the veth of its backend's instance (the neighbour lookup
/// fills in its Ethernet addresses); `None` if it is already on it.
#[inline(always)]
pub fn redirect(current: u32, ifindex: u32) -> Option<i32> {
    if ifindex == 0 || ifindex == current {
        return None;
    }
    // SAFETY: no parameters (the packet's destination is the next hop); flags must be 0.
    let r = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    #[expect(clippy::cast_possible_truncation, reason = "TC_ACT_* codes are small")]
    Some(r as i32)
}
