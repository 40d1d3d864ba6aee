//! The verdict trace: while the agent has it on (`quadrant trace drops|all`, `CONFIG.trace`),
//! every decision program writes one fixed-size [`TraceRecord`] per verdict into the [`TRACE`]
//! ring buffer, which the agent reads and logs. Off, a decision pays one read of the CONFIG value
//! and one comparison. For debugging a policy on a live host, as `cilium monitor` is.
//!
//! A fixed record and one `bpf_ringbuf_output` rather than aya-log: aya-log's formatted records
//! multiplied the verified instructions of every program tenfold with numbers only and a
//! hundredfold with names (XDP 3,614 → 40,782 and 411,597; tc past 680,000, near the kernel's
//! limit of one million), because the verifier checks the formatting code once for every path
//! that reaches it. Names are the agent's to print.

use aya_ebpf::{macros::map, maps::RingBuf};
use dataplane_common::{
    Hook, Reason, Verdict,
    maps::{
        TRACE_ALL, TRACE_BYTES, TRACE_DESTINATION, TRACE_DROPS, TRACE_NOTHING, TRACE_PACKET,
        TraceRecord,
    },
};

use crate::{decide::trace_mode, parse::Ipv4Flow};

/// [`TraceRecord`]s for the agent. Writer: every decision program while the trace is on.
#[map(name = "TRACE")]
static TRACE: RingBuf = RingBuf::with_byte_size(TRACE_BYTES, 0);

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
fn wanted(mode: u16, reason: Reason) -> bool {
    mode == TRACE_ALL || (mode == TRACE_DROPS && matches!(reason.verdict(), Verdict::Drop))
}

/// Traces one verdict if the trace is on for it. A full ring loses the record, never the
/// verdict.
#[inline(always)]
pub fn verdict(hook: Hook, slot: u32, reason: Reason, subject: Subject) {
    if !wanted(trace_mode(), reason) {
        return;
    }
    let (kind, proto, saddr, daddr, sport, dport) = match subject {
        Subject::Packet(f) => (TRACE_PACKET, f.proto, f.saddr, f.daddr, f.sport, f.dport),
        Subject::Destination(daddr, dport, proto) => (TRACE_DESTINATION, proto, 0, daddr, 0, dport),
        Subject::None => (TRACE_NOTHING, 0, 0, 0, 0, 0),
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
        pad: [0; 3],
    };
    let _ = TRACE.output::<TraceRecord>(&record, 0);
}
