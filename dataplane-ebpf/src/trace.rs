//! Flow events and the verdict trace. Every decision program writes one fixed-size
//! [`TraceRecord`] into the [`TRACE`] ring buffer for each drop, each flow a tc program starts
//! tracking and each FIN or RST of a tracked flow (the flow events, which the agent keeps for
//! `quadrant observe`), within each CPU's budget in [`EVENTS_LIMIT`]; and, while the agent has
//! the trace on (`quadrant trace drops|all`, `CONFIG.trace`), for every verdict it asks for. A
//! pass of an established flow with the trace off pays one read of the CONFIG value and a few
//! comparisons. For observing a live host, as Cilium's drop notifications and Hubble are.
//!
//! A fixed record and one `bpf_ringbuf_output` rather than aya-log: aya-log's formatted records
//! multiplied the verified instructions of every program tenfold with numbers only and a
//! hundredfold with names (XDP 3,614 → 40,782 and 411,597; tc past 680,000, near the kernel's
//! limit of one million), because the verifier checks the formatting code once for every path
//! that reaches it. Names are the agent's to print.

use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use dataplane_common::{
    Hook, Reason, Verdict,
    maps::{
        EVENT_FLOW_CLOSE, EVENT_FLOW_OPEN, EVENT_VERDICT, EventsLimit, TRACE_ALL, TRACE_BYTES,
        TRACE_DESTINATION, TRACE_DROPS, TRACE_NOTHING, TRACE_PACKET, TraceRecord,
    },
};

use crate::{decide::trace_mode, parse::Ipv4Flow};

/// [`TraceRecord`]s for the agent. Writer: every decision program.
#[map(name = "TRACE")]
static TRACE: RingBuf = RingBuf::with_byte_size(TRACE_BYTES, 0);

/// Each CPU's flow-event budget and counts. Writer: the agent (rate and burst, before
/// attaching), then the decision programs (each its own CPU's entry).
#[map(name = "EVENTS_LIMIT")]
static EVENTS_LIMIT: PerCpuArray<EventsLimit> = PerCpuArray::with_max_entries(1, 0);

/// What a decision was about: a packet's 5-tuple, a socket operation's destination, or neither.
#[derive(Clone, Copy)]
pub enum Subject {
    /// A packet (addresses and ports in network byte order).
    Packet(Ipv4Flow),
    /// `connect`/`sendmsg` to this address and port (network byte order), protocol.
    Destination(u32, u16, u8),
    /// Nothing parsed (a malformed frame, ARP, an unknown interface, `sock_create`).
    None,
}

/// Whether a verdict is traced under `mode`.
#[inline(always)]
fn traced(mode: u16, drop: bool) -> bool {
    mode == TRACE_ALL || (mode == TRACE_DROPS && drop)
}

/// The flow event a verdict is: a tc program's first allowed packet of a flow it now tracks
/// (`AllowPolicy` is its verdict for exactly those), an allowed TCP segment with FIN or RST, or
/// just a verdict.
#[inline(always)]
fn event_of(hook: Hook, reason: Reason, subject: &Subject) -> u8 {
    let Subject::Packet(f) = subject else {
        return EVENT_VERDICT;
    };
    if !matches!(hook, Hook::TcIngress | Hook::TcEgress) {
        return EVENT_VERDICT;
    }
    match reason {
        Reason::AllowPolicy => EVENT_FLOW_OPEN,
        Reason::AllowEstablished if f.closes => EVENT_FLOW_CLOSE,
        _ => EVENT_VERDICT,
    }
}

/// Takes one event from this CPU's budget; false (and counted) when it is spent.
#[inline(always)]
fn take(limit: *mut EventsLimit) -> bool {
    // SAFETY: a per-CPU entry from a successful lookup: only this CPU touches it while the
    // program runs (programs do not preempt each other on one CPU).
    unsafe {
        let cost = (*limit).cost_ns;
        // SAFETY: helper without preconditions.
        let now = bpf_ktime_get_coarse_ns();
        let credit = (*limit)
            .credit_ns
            .saturating_add(now.saturating_sub((*limit).last_ns))
            .min((*limit).cap_ns);
        (*limit).last_ns = now;
        if credit < cost {
            (*limit).credit_ns = credit;
            (*limit).lost_rate_limit += 1;
            return false;
        }
        (*limit).credit_ns = credit - cost;
        true
    }
}

/// Writes the record of one verdict if it is a flow event within this CPU's budget, or the
/// trace asks for it. A full ring loses the record (counted), never the verdict.
#[inline(always)]
pub fn verdict(hook: Hook, slot: u32, reason: Reason, subject: Subject) {
    let mode = trace_mode();
    let drop = matches!(reason.verdict(), Verdict::Drop);
    let event = event_of(hook, reason, &subject);
    let traced = traced(mode, drop);
    if !traced && !drop && event == EVENT_VERDICT {
        return;
    }
    let limit = EVENTS_LIMIT.get_ptr_mut(0);
    if !traced {
        // A flow event: written within this CPU's budget, if flow events are on.
        // SAFETY: this CPU's entry, read while the program runs.
        let Some(l) = limit.filter(|l| unsafe { (**l).per_sec } != 0) else {
            return;
        };
        if !take(l) {
            return;
        }
    }
    let (kind, proto, saddr, daddr, sport, dport, l4_flags) = match subject {
        Subject::Packet(f) => (
            TRACE_PACKET,
            f.proto,
            f.saddr,
            f.daddr,
            f.sport,
            f.dport,
            f.l4_flags,
        ),
        Subject::Destination(daddr, dport, proto) => {
            (TRACE_DESTINATION, proto, 0, daddr, 0, dport, 0)
        }
        Subject::None => (TRACE_NOTHING, 0, 0, 0, 0, 0, 0),
    };
    let record = TraceRecord {
        saddr,
        daddr,
        sport,
        dport,
        hook: hook as u8,
        #[expect(
            clippy::cast_possible_truncation,
            reason = "slots are below 5: four quadrants and the unattributed one"
        )]
        slot: slot as u8,
        reason: reason as u8,
        proto,
        kind,
        event,
        l4_flags,
        pad: 0,
    };
    let written = TRACE.output::<TraceRecord>(&record, 0).is_ok();
    if let Some(l) = limit {
        // SAFETY: as in `take`.
        unsafe {
            if written {
                (*l).written += 1;
            } else {
                (*l).lost_ring_full += 1;
            }
        }
    }
}
