//! cgroup `connect4`/`connect6`/`sendmsg4`/`sendmsg6` on each quadrant's cgroup.
//!
//! A process in a quadrant that connects (or sends a datagram) to an identity the policy does not
//! allow gets `EPERM` from the system call at once, instead of a timeout from a dropped packet.
//! IPv4-mapped IPv6 addresses are decided as IPv4; other IPv6 addresses except loopback are
//! denied (quadrants are IPv4-only). Besides the quadrant-wide policy, a rule naming one
//! workload's SPIFFE ID allows that workload's cgroup (one level below the quadrant's) only.
//! What the policy allows then passes the caller quadrant's circuit breaker for the destination
//! ([`crate::breaker`]); an open one fails the call with `ECONNREFUSED`. Before all of that, a
//! service VIP is translated to one of its ready instances ([`crate::lb`]), and the policy
//! decides on the instance; a VIP without a ready instance fails with `ECONNREFUSED`.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use dataplane_common::{
    Hook, Reason, Verdict,
    breaker::BreakerKey,
    maps::CgroupValue,
    policy::{PROTO_TCP, PROTO_UDP},
    reason::UNATTRIBUTED_SLOT,
};

use crate::{
    breaker,
    decide::{
        caller_cgroup, cgroup_level, count, identity_of, is_loopback, is_reply,
        quadrant_policy_allows, workload_policy_allows,
    },
    lb,
    trace::{self, Subject},
};

/// Return value that lets the operation go on.
const ALLOW: i32 = 1;
/// Return value that makes the system call fail (with EPERM unless the program set another
/// error).
const REJECT: i32 = 0;
/// `ECONNREFUSED`, what a refusing circuit breaker makes the system call fail with.
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn quadrant_connect4(ctx: SockAddrContext) -> i32 {
    run(&ctx, Hook::Connect4, false)
}

#[cgroup_sock_addr(connect6)]
pub fn quadrant_connect6(ctx: SockAddrContext) -> i32 {
    run(&ctx, Hook::Connect6, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn quadrant_sendmsg4(ctx: SockAddrContext) -> i32 {
    run(&ctx, Hook::Sendmsg4, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn quadrant_sendmsg6(ctx: SockAddrContext) -> i32 {
    run(&ctx, Hook::Sendmsg6, true)
}

#[inline(always)]
fn run(ctx: &SockAddrContext, hook: Hook, v6: bool) -> i32 {
    let connect = matches!(hook, Hook::Connect4 | Hook::Connect6);
    // A service VIP becomes one of its ready instances first; the policy decides on that.
    let translated = if v6 {
        lb::Translated::No
    } else {
        lb::translate(ctx.sock_addr, connect)
    };
    let (slot, mut reason, subject) = classify(ctx.sock_addr, v6);
    if matches!(translated, lb::Translated::NoBackend) && reason != Reason::DenyUnknownCgroup {
        reason = Reason::RefuseNoBackend;
    }
    if let (
        Reason::AllowPolicy | Reason::AllowWorkloadPolicy,
        Subject::Destination(daddr, dport, proto),
    ) = (reason, subject)
        && (proto == PROTO_TCP || proto == PROTO_UDP)
    {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "quadrant slots are below 4 here"
        )]
        let key = BreakerKey {
            daddr,
            dport,
            proto,
            caller: slot as u8,
        };
        if let Some(refusal) = crate::chaos::at_connect(key.caller, daddr)
            .or_else(|| breaker::at_connect(ctx.sock_addr.cast(), key, connect))
        {
            reason = refusal;
        }
    }
    count(hook, slot, reason);
    trace::verdict(hook, slot, reason, subject);
    match reason.verdict() {
        Verdict::Pass => {
            if let lb::Translated::To(sock) = &translated {
                lb::commit(ctx.sock_addr, sock);
            }
            ALLOW
        }
        Verdict::Drop if reason.is_connection_refused() => {
            // SAFETY: helper without preconditions; the call fails with this error instead of
            // EPERM.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
        Verdict::Drop => REJECT,
    }
}

#[inline(always)]
fn classify(sa: *mut bpf_sock_addr, v6: bool) -> (u32, Reason, Subject) {
    let Some(CgroupValue { quadrant, addr, .. }) = caller_cgroup() else {
        return (UNATTRIBUTED_SLOT, Reason::DenyUnknownCgroup, Subject::None);
    };
    // SAFETY: the context fields read here are readable for every sock_addr attach type.
    let (daddr, dport, proto) = unsafe {
        // user_port holds a 16-bit port in network order in its low bytes; protocol is an
        // IPPROTO_* number below 256.
        let dport = (*sa).user_port.to_ne_bytes();
        let dport = u16::from_ne_bytes([dport[0], dport[1]]);
        let proto = (*sa).protocol.to_ne_bytes()[0];
        if v6 {
            let ip6 = (*sa).user_ip6;
            if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::to_be(1) {
                return (u32::from(quadrant), Reason::AllowLoopback, Subject::None);
            }
            if !(ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::to_be(0xffff)) {
                return (u32::from(quadrant), Reason::DenyIpv6, Subject::None);
            }
            (ip6[3], dport, proto)
        } else {
            ((*sa).user_ip4, dport, proto)
        }
    };
    let subject = Subject::Destination(daddr, dport, proto);
    if is_loopback(daddr) {
        return (u32::from(quadrant), Reason::AllowLoopback, subject);
    }
    let dst = identity_of(daddr);
    if quadrant_policy_allows(quadrant, dst, proto, dport) {
        return (u32::from(quadrant), Reason::AllowPolicy, subject);
    }
    // The caller's workload: its cgroup one level below the quadrant's (0 for a process of the
    // quadrant itself, which no workload rule names).
    // SAFETY: helper without preconditions.
    let workload =
        unsafe { bpf_get_current_ancestor_cgroup_id((cgroup_level() + 1).cast_signed()) };
    if workload != 0 && workload_policy_allows(workload, dst, proto, dport) {
        return (u32::from(quadrant), Reason::AllowWorkloadPolicy, subject);
    }
    // A datagram socket answering a flow the peer opened (allowed towards this quadrant), from
    // the address of the caller's instance.
    if addr != 0 {
        // SAFETY: `sk` is always set for sock_addr programs.
        // src_port is in host order and below 65536.
        let local_port = unsafe { (*(*sa).__bindgen_anon_1.sk).src_port };
        let local_port = u16::try_from(local_port).unwrap_or(0);
        if is_reply(addr, local_port.to_be(), daddr, dport, proto) {
            return (u32::from(quadrant), Reason::AllowEstablished, subject);
        }
    }
    (u32::from(quadrant), Reason::DenyPolicy, subject)
}
