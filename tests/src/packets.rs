//! Frames for the `BPF_PROG_TEST_RUN` fixture tables, built with etherparse and then bent into
//! the malformed shapes the dataplane must classify.

use std::net::Ipv4Addr;

use etherparse::{PacketBuilder, VlanId};

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Offset of the IPv4 header in an untagged frame.
pub const L3: usize = 14;
const PAYLOAD: &[u8] = b"quadrant";

/// A TCP SYN from `src:sport` to `dst:dport`.
#[must_use]
pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 1024)
        .syn();
    let mut out = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut out, PAYLOAD).expect("write tcp");
    out
}

/// A TCP segment of an established connection (ACK, no SYN) from `src:sport` to `dst:dport`.
#[must_use]
pub fn tcp_ack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 1024)
        .ack(1);
    let mut out = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut out, PAYLOAD).expect("write tcp");
    out
}

/// The last segment of a connection (FIN, ACK) from `src:sport` to `dst:dport`.
#[must_use]
pub fn tcp_fin(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 1024)
        .ack(1)
        .fin();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("write tcp");
    out
}

/// A UDP datagram.
#[must_use]
pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut out, PAYLOAD).expect("write udp");
    out
}

/// An ICMP echo request with identifier `id`.
#[must_use]
pub fn ping(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(id, 1);
    let mut out = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut out, PAYLOAD).expect("write icmp");
    out
}

/// An ICMP echo reply with identifier `id`.
#[must_use]
pub fn pong(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_reply(id, 1);
    let mut out = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut out, PAYLOAD).expect("write icmp");
    out
}

/// A UDP datagram inside an 802.1Q tag.
#[must_use]
pub fn vlan_udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .single_vlan(VlanId::try_new(10).expect("vlan id"))
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(1000, 2000);
    let mut out = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut out, PAYLOAD).expect("write vlan");
    out
}

/// An IPv6 UDP datagram.
#[must_use]
pub fn ipv6_udp() -> Vec<u8> {
    let mut src = [0u8; 16];
    src[0] = 0xfd;
    src[15] = 1;
    let mut dst = src;
    dst[15] = 2;
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv6(src, dst, 64)
        .udp(1000, 2000);
    let mut out = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut out, PAYLOAD).expect("write ipv6");
    out
}

/// An ARP request for `target` from `sender`.
#[must_use]
pub fn arp(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::with_capacity(42);
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&SRC_MAC);
    out.extend_from_slice(&0x0806u16.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    out.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    out.extend_from_slice(&[6, 4]);
    out.extend_from_slice(&1u16.to_be_bytes()); // request
    out.extend_from_slice(&SRC_MAC);
    out.extend_from_slice(&sender.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target.octets());
    out
}

/// A frame with another ethertype (LLDP), padded to minimum size.
#[must_use]
pub fn lldp() -> Vec<u8> {
    let mut out = Vec::with_capacity(60);
    out.extend_from_slice(&[0x01, 0x80, 0xc2, 0, 0, 0x0e]);
    out.extend_from_slice(&SRC_MAC);
    out.extend_from_slice(&0x88ccu16.to_be_bytes());
    out.resize(60, 0);
    out
}

/// Sets the IPv4 IHL nibble.
#[must_use]
pub fn with_ihl(mut frame: Vec<u8>, ihl: u8) -> Vec<u8> {
    frame[L3] = (frame[L3] & 0xf0) | (ihl & 0x0f);
    frame
}

/// Sets the IPv4 version nibble.
#[must_use]
pub fn with_version(mut frame: Vec<u8>, version: u8) -> Vec<u8> {
    frame[L3] = (frame[L3] & 0x0f) | (version << 4);
    frame
}

/// Sets the IPv4 flags/fragment-offset field (host order).
#[must_use]
pub fn with_frag(mut frame: Vec<u8>, frag: u16) -> Vec<u8> {
    frame[L3 + 6..L3 + 8].copy_from_slice(&frag.to_be_bytes());
    frame
}

/// Sets the IPv4 total length (host order).
#[must_use]
pub fn with_total_len(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
    frame[L3 + 2..L3 + 4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// Cuts the frame to `len` bytes.
#[must_use]
pub fn truncated(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

/// An ICMP port-unreachable from `from` to `to`, quoting (IPv4 header and the first 8 bytes) the
/// UDP datagram `quoted_src:40000 → quoted_dst:dport` it answers.
#[must_use]
pub fn port_unreachable(
    from: Ipv4Addr,
    to: Ipv4Addr,
    quoted_src: Ipv4Addr,
    quoted_dst: Ipv4Addr,
    dport: u16,
) -> Vec<u8> {
    let quoted = udp(quoted_src, 40_000, quoted_dst, dport);
    let payload = &quoted[14..14 + 28];
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(from.octets(), to.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ));
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("write icmp");
    out
}
