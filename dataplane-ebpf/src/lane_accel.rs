//! Optional acceleration of TCP lanes between workloads on this host: `sock_ops` on each
//! quadrant's cgroup records every established IPv4 TCP socket in `LANE_SOCKS`; `sk_msg` on that
//! map hands each message straight to the peer socket's receive queue when the peer is a local
//! socket in the map, skipping the TCP/IP stack, the veths and the tc programs. Since tc never
//! sees those messages, `sk_msg` asks the policy itself, message by message, whether the flow
//! that opened the connection is still allowed (what tc would decide for its packets): after a
//! reload that revokes it, the sender gets `EACCES`. Messages whose peer is not in the map take
//! the normal path. The agent attaches these to the quadrants with `lanes.tcp_acceleration:
//! sk_msg`, or with `auto` where its start-up probe (which attaches them to a probe cgroup of
//! its own) found that they win.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        sk_action::{SK_DROP, SK_PASS},
    },
    macros::{map, sk_msg, sock_ops},
    maps::{LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use dataplane_common::{
    maps::{LANE_SOCKS_MAX, SockKey, lane_accel},
    policy::PROTO_TCP,
};

use crate::decide::{identity_of, is_loopback, policy_allows};

/// IPv4 address family.
const AF_INET: u32 = 2;

/// Established sockets of the quadrants' workloads. Writer: `quadrant_sockops`.
#[map(name = "LANE_SOCKS")]
pub static LANE_SOCKS: SockHash<SockKey> = SockHash::with_max_entries(LANE_SOCKS_MAX, 0);

/// Each socket's state: which end opened the connection (set by `quadrant_sockops`) and its
/// sending mode, fixed by its first message. Writers: both programs.
#[map(name = "LANE_SOCK_MODE")]
pub static LANE_SOCK_MODE: LruHashMap<SockKey, u32> =
    LruHashMap::with_max_entries(LANE_SOCKS_MAX, 0);

/// Counters, per CPU. Writer: both programs. Reader: agent.
#[map(name = "LANE_ACCEL")]
pub static LANE_ACCEL: PerCpuArray<u64> = PerCpuArray::with_max_entries(lane_accel::COUNT, 0);

#[inline(always)]
fn bump(slot: u32) {
    if let Some(c) = LANE_ACCEL.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

/// The remote port as `bpf_sock_ops`/`sk_msg_md` give it — network byte order, shifted into the
/// upper 16 bits on little-endian kernels (the lower 16 on some older ones) — in host order.
#[inline(always)]
fn remote_port(raw: u32) -> u32 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    #[expect(clippy::cast_possible_truncation, reason = "at most 16 bits are left")]
    u32::from(u16::from_be(be as u16))
}

#[sock_ops]
pub fn quadrant_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        || ctx.family() != AF_INET
    {
        return 0;
    }
    let mut key = SockKey {
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        local_port: ctx.local_port(),
        remote_port: remote_port(ctx.remote_port()),
    };
    // A new connection on this 4-tuple: which end opened it is known now, its first message
    // decides its mode again.
    let state = if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        lane_accel::OPENED_HERE
    } else {
        0
    };
    let _ = LANE_SOCK_MODE.insert(key, state, u64::from(BPF_ANY));
    // SAFETY: the context's pointer is the kernel's `bpf_sock_ops` for this call.
    let ops = unsafe { &mut *ctx.ops };
    if LANE_SOCKS.update(&mut key, ops, u64::from(BPF_ANY)).is_ok() {
        bump(lane_accel::ADDED);
    }
    0
}

#[sk_msg]
pub fn quadrant_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context's pointer is the kernel's `sk_msg_md` for this call.
    let md = unsafe { &*ctx.msg };
    if md.family != AF_INET {
        return SK_PASS;
    }
    let own = SockKey {
        local_ip4: md.local_ip4,
        remote_ip4: md.remote_ip4,
        local_port: md.local_port,
        remote_port: remote_port(md.remote_port),
    };
    // SAFETY: the value is a plain u32 read once.
    let Some(state) = unsafe { LANE_SOCK_MODE.get(own) }.copied() else {
        // Not recorded when it was established (it predates the acceleration, or its entry
        // was evicted): which end opened it is unknown, so it keeps to the stack, where tc
        // decides.
        let _ = LANE_SOCK_MODE.insert(own, lane_accel::MODE_STACK, u64::from(BPF_ANY));
        bump(lane_accel::PASSED);
        return SK_PASS;
    };
    let mode = state & lane_accel::MODE_MASK;
    if mode == lane_accel::MODE_STACK {
        bump(lane_accel::PASSED);
        return SK_PASS;
    }
    if !opening_flow_allowed(&own, state) {
        if mode == lane_accel::MODE_REDIRECT {
            // Revoked after its messages began to bypass tc: refused here instead.
            bump(lane_accel::REFUSED);
            return SK_DROP;
        }
        // Nothing redirected yet: the stack, where tc decides every packet.
        let _ = LANE_SOCK_MODE.insert(own, state | lane_accel::MODE_STACK, u64::from(BPF_ANY));
        bump(lane_accel::PASSED);
        return SK_PASS;
    }
    let mut peer = own.peer();
    // SK_PASS with the redirect recorded when the peer is in the map; otherwise the message
    // goes on as usual.
    let redirected =
        LANE_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS);
    if mode == 0 {
        let decided = if redirected {
            lane_accel::MODE_REDIRECT
        } else {
            lane_accel::MODE_STACK
        };
        let _ = LANE_SOCK_MODE.insert(own, state | decided, u64::from(BPF_ANY));
    }
    bump(if redirected {
        lane_accel::REDIRECTED
    } else {
        lane_accel::PASSED
    });
    SK_PASS
}

/// Whether the policy still allows the flow that opened the connection `own` belongs to — the
/// packet layer's decision, what tc would apply to the connection's packets. Loopback
/// connections never cross a quadrant's veth; `connect4` allows them, so does this.
#[inline(always)]
fn opening_flow_allowed(own: &SockKey, state: u32) -> bool {
    if is_loopback(own.local_ip4) || is_loopback(own.remote_ip4) {
        return true;
    }
    // (source, destination, destination port) of the flow that opened the connection.
    let (src, dst, port) = if state & lane_accel::OPENED_HERE != 0 {
        (own.local_ip4, own.remote_ip4, own.remote_port)
    } else {
        (own.remote_ip4, own.local_ip4, own.local_port)
    };
    #[expect(clippy::cast_possible_truncation, reason = "ports are below 65536")]
    let port = (port as u16).to_be();
    policy_allows(identity_of(src), identity_of(dst), PROTO_TCP, port)
}
