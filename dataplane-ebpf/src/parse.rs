//! Header parsing shared by the XDP and tc programs, by direct packet access.
//!
//! Every early return names a [`Reason`]: malformed input has a defined verdict, never an
//! accidental pass.

use dataplane_common::{
    Reason,
    policy::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_IPV6: u16 = 0x86dd;
/// ARP for IPv4 over Ethernet: 8 fixed bytes + 2 × (6 + 4) addresses.
const ARP_LEN: usize = 28;
const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_MIN_HLEN: usize = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// IPv4 `frag_off`: more-fragments flag and fragment offset.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The fields of an IPv4 packet the policy needs. Addresses and ports in network byte order.
#[derive(Clone, Copy)]
pub struct Ipv4Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// A TCP segment with SYN and without ACK: it opens a connection, so it belongs to no
    /// tracked flow and only the policy decides it.
    pub opens: bool,
    /// A TCP segment with FIN or RST: its connection ends.
    pub closes: bool,
    /// The TCP flags byte, or the ICMP type (0 for other protocols).
    pub l4_flags: u8,
    /// Offset of the TCP/UDP/ICMP header from the frame's start.
    pub l4: u16,
}

/// What a frame is.
pub enum Frame {
    Ipv4(Ipv4Flow),
    Arp,
}

/// Returns the `N` bytes at `offset`, if they all lie before `end`.
///
/// The bounds check and every later read go through the one pointer this returns: the verifier
/// tracks packet bounds per pointer, so a read through a separately computed address (even an
/// equal one) would be rejected.
#[inline(always)]
fn bytes_at<const N: usize>(
    start: usize,
    end: usize,
    offset: usize,
) -> Result<&'static [u8; N], Reason> {
    let p = start + offset;
    if p + N > end {
        return Err(Reason::DropTruncated);
    }
    // SAFETY: [p, p + N) lies inside the packet, which outlives the program invocation.
    Ok(unsafe { &*(p as *const [u8; N]) })
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Two bytes as they lie in the packet (network order kept).
#[inline(always)]
fn raw16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// Four bytes as they lie in the packet (network order kept).
#[inline(always)]
fn raw32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A UDP datagram refused by its destination: the frame in `[start, end)` (already parsed as
/// IPv4 ICMP by [`parse_frame`]) is an ICMP port-unreachable whose outer source is the
/// datagram's destination itself. Returns the datagram's (source address, destination address,
/// destination port), network order; `None` for anything else. An error a third host claims on
/// the destination's behalf is not taken (quadrants cannot forge their source address).
#[inline(always)]
pub fn port_unreachable_udp(start: usize, end: usize) -> Option<(u32, u32, u16)> {
    let ip = bytes_at::<IPV4_MIN_HLEN>(start, end, ETH_HLEN).ok()?;
    if ip[9] != PROTO_ICMP {
        return None;
    }
    let l4 = ETH_HLEN + usize::from(ip[0] & 0x0f) * 4;
    let icmp = bytes_at::<ICMP_MIN_HLEN>(start, end, l4).ok()?;
    if icmp[0] != ICMP_DEST_UNREACH || icmp[1] != ICMP_PORT_UNREACH {
        return None;
    }
    let inner = l4 + ICMP_MIN_HLEN;
    let quoted = bytes_at::<IPV4_MIN_HLEN>(start, end, inner).ok()?;
    let quoted_hlen = usize::from(quoted[0] & 0x0f) * 4;
    if quoted[9] != PROTO_UDP || quoted_hlen < IPV4_MIN_HLEN {
        return None;
    }
    let udp = bytes_at::<UDP_HLEN>(start, end, inner + quoted_hlen).ok()?;
    let (source, destination) = (raw32(quoted, 12), raw32(quoted, 16));
    (raw32(ip, 12) == destination).then_some((source, destination, raw16(udp, 2)))
}

/// Parses an Ethernet frame in `[start, end)`.
#[inline(always)]
pub fn parse_frame(start: usize, end: usize) -> Result<Frame, Reason> {
    let eth = bytes_at::<ETH_HLEN>(start, end, 0)?;
    match be16(eth, 12) {
        ETH_P_IP => parse_ipv4(start, end, ETH_HLEN).map(Frame::Ipv4),
        ETH_P_ARP => bytes_at::<ARP_LEN>(start, end, ETH_HLEN).map(|_| Frame::Arp),
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::DropVlan),
        ETH_P_IPV6 => Err(Reason::DropIpv6),
        _ => Err(Reason::DropUnknownL3),
    }
}

#[inline(always)]
fn parse_ipv4(start: usize, end: usize, l3: usize) -> Result<Ipv4Flow, Reason> {
    let ip = bytes_at::<IPV4_MIN_HLEN>(start, end, l3)?;
    let ver_ihl = ip[0];
    if ver_ihl >> 4 != 4 {
        return Err(Reason::DropBadVersion);
    }
    // Masked to 4 bits, so the verifier knows hlen ≤ 60.
    let hlen = usize::from(ver_ihl & 0x0f) * 4;
    if hlen < IPV4_MIN_HLEN {
        return Err(Reason::DropBadIhl);
    }
    if usize::from(be16(ip, 2)) < hlen {
        return Err(Reason::DropBadIhl);
    }
    if be16(ip, 6) & IP_MF_OFFSET_MASK != 0 {
        return Err(Reason::DropFragment);
    }
    let proto = ip[9];
    let saddr = raw32(ip, 12);
    let daddr = raw32(ip, 16);
    let l4 = l3 + hlen;
    // The options IHL claims must be present.
    if start + l4 > end {
        return Err(Reason::DropBadIhl);
    }
    let mut opens = false;
    let mut closes = false;
    let mut l4_flags = 0;
    let (sport, dport) = match proto {
        PROTO_TCP => {
            let tcp = bytes_at::<TCP_MIN_HLEN>(start, end, l4)?;
            l4_flags = tcp[13];
            opens = tcp[13] & (TCP_SYN | TCP_ACK) == TCP_SYN;
            closes = tcp[13] & (TCP_FIN | TCP_RST) != 0;
            (raw16(tcp, 0), raw16(tcp, 2))
        }
        PROTO_UDP => {
            let udp = bytes_at::<UDP_HLEN>(start, end, l4)?;
            (raw16(udp, 0), raw16(udp, 2))
        }
        PROTO_ICMP => {
            let icmp = bytes_at::<ICMP_MIN_HLEN>(start, end, l4)?;
            l4_flags = icmp[0];
            if icmp[0] == ICMP_ECHO_REQUEST || icmp[0] == ICMP_ECHO_REPLY {
                // Echo identifier on both sides, so request and reply map to one flow.
                let id = raw16(icmp, 4);
                (id, id)
            } else {
                (0, 0)
            }
        }
        _ => (0, 0),
    };
    Ok(Ipv4Flow {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        opens,
        closes,
        l4_flags,
        // At most 14 + 60.
        #[expect(clippy::cast_possible_truncation, reason = "at most 74")]
        l4: l4 as u16,
    })
}
