//! cgroup `sock_create` on each quadrant's cgroup.
//!
//! Rules naming one workload's SPIFFE ID are enforced at that workload's sockets (`connect`,
//! `sendmsg`); the packet programs pass the union of such flows, since a packet does not say which
//! process of the quadrant sent it. A raw IP socket could forge exactly those packets from any
//! process of the quadrant, so in a quadrant whose policy names single workloads raw `AF_INET` and
//! `AF_INET6` sockets are refused (`EPERM` from `socket(2)`). Everywhere else every socket is
//! created as usual. This hook does not see `AF_PACKET` sockets (the kernel runs it for inet
//! sockets only).

use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use dataplane_common::{Hook, Reason, maps::CgroupValue, reason::UNATTRIBUTED_SLOT};

use crate::{
    decide::{caller_cgroup, count, raw_sockets_denied},
    trace::{self, Subject},
};

/// Return value that lets the operation go on.
const ALLOW: i32 = 1;
/// Return value that makes `socket(2)` fail with EPERM.
const REJECT: i32 = 0;
const SOCK_RAW: u32 = 3;

#[cgroup_sock(sock_create)]
pub fn quadrant_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: `type` is readable in every sock_create context.
    if unsafe { (*ctx.sock).type_ } != SOCK_RAW {
        return ALLOW;
    }
    let Some(CgroupValue { quadrant, .. }) = caller_cgroup() else {
        count(
            Hook::SockCreate,
            UNATTRIBUTED_SLOT,
            Reason::DenyUnknownCgroup,
        );
        trace::verdict(
            Hook::SockCreate,
            UNATTRIBUTED_SLOT,
            Reason::DenyUnknownCgroup,
            Subject::None,
        );
        return REJECT;
    };
    if raw_sockets_denied(quadrant) {
        count(Hook::SockCreate, u32::from(quadrant), Reason::DenyRawSocket);
        trace::verdict(
            Hook::SockCreate,
            u32::from(quadrant),
            Reason::DenyRawSocket,
            Subject::None,
        );
        return REJECT;
    }
    ALLOW
}
