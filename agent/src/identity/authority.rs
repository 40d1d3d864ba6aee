//! HTTP/2 `:authority` repair on the Workload API's Unix sockets, so that every conforming gRPC
//! client can call it.
//!
//! gRPC C-core (Python, C++, Ruby, PHP), grpc-java and grpc-swift send the socket path,
//! percent-encoded, as `:authority` when they dial a Unix socket
//! (`run%2Fquadrant%2Fquadrant-workload%2Fdx.sock`). The HTTP/2 server under tonic (h2) checks
//! `:authority` against RFC 3986 and resets every such stream with `PROTOCOL_ERROR`
//! (hyperium/h2#487, hyperium/tonic#742); SPIRE's agent, on grpc-go, accepts them. The authority
//! names no host on a Unix socket and nothing here reads it, so before h2 sees a header block
//! this layer decodes it (HPACK, the client's dynamic table kept in step), replaces an
//! `:authority` that is not a valid RFC 3986 authority with `localhost` (what grpc-go sends on
//! Unix sockets), and re-encodes every field as a literal without indexing, so h2's own table is
//! never touched. Every other frame, and the server's side of the connection, passes unchanged.
//!
//! Bounds: a header block may be at most [`MAX_HEADER_BLOCK`] bytes and the client's HPACK table
//! at most [`HPACK_TABLE_SIZE`] (the size h2 advertises); a connection that breaks HTTP/2's
//! framing rules is closed, as h2 would close it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// What an HTTP/2 client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header length.
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest frame payload written towards h2: the protocol's initial `SETTINGS_MAX_FRAME_SIZE`,
/// which every HTTP/2 endpoint accepts.
const MAX_OUT_FRAME: usize = 16_384;
/// Largest header block accepted from a client (gRPC clients limit metadata to 8 KiB by
/// default).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// The HPACK dynamic table size the client may use: h2's `SETTINGS_HEADER_TABLE_SIZE`, the
/// protocol default, which tonic leaves as it is.
pub const HPACK_TABLE_SIZE: usize = 4096;
/// What replaces an authority that is not one.
const REPLACEMENT: &[u8] = b"localhost";
/// Bytes read from the socket at once.
const READ_CHUNK: usize = 16 * 1024;

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the connection preface.
    Preface,
    /// At a frame boundary.
    Frame,
    /// Inside a frame that passes unchanged: this many payload bytes still to pass.
    Passing(usize),
    /// The client did not speak HTTP/2: everything passes unchanged (h2 refuses it).
    Opaque,
}

/// A header block being collected over HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    fragment: Vec<u8>,
}

/// The client → server half of a connection, rewritten frame by frame.
struct Rewriter {
    stage: Stage,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<PendingBlock>,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("stage", &self.stage)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Self {
            stage: Stage::Preface,
            decoder,
            pending: None,
        }
    }

    /// Consumes what it can of `input` (complete frames, or the passing part of one) and appends
    /// what h2 should read to `out`; leaves an incomplete frame header or header frame in
    /// `input`.
    fn process(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> io::Result<()> {
        let mut at = 0;
        loop {
            let rest = &input[at..];
            match self.stage {
                Stage::Opaque => {
                    out.extend_from_slice(rest);
                    at = input.len();
                    break;
                }
                Stage::Preface => {
                    let n = rest.len().min(PREFACE.len());
                    if rest[..n] != PREFACE[..n] {
                        self.stage = Stage::Opaque;
                        continue;
                    }
                    if n < PREFACE.len() {
                        break;
                    }
                    out.extend_from_slice(PREFACE);
                    at += PREFACE.len();
                    self.stage = Stage::Frame;
                }
                Stage::Passing(0) => self.stage = Stage::Frame,
                Stage::Passing(remaining) => {
                    if rest.is_empty() {
                        break;
                    }
                    let n = rest.len().min(remaining);
                    out.extend_from_slice(&rest[..n]);
                    at += n;
                    self.stage = Stage::Passing(remaining - n);
                }
                Stage::Frame => {
                    let Some(header) = rest.get(..FRAME_HEADER) else {
                        break;
                    };
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let kind = header[3];
                    let flags = header[4];
                    let stream_id =
                        u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                            & 0x7fff_ffff;
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.pending.is_some() {
                            return Err(invalid("a header block was interrupted by another frame"));
                        }
                        out.extend_from_slice(header);
                        at += FRAME_HEADER;
                        self.stage = Stage::Passing(len);
                        continue;
                    }
                    if len > MAX_HEADER_BLOCK {
                        return Err(invalid(format!(
                            "header frame of {len} bytes (at most {MAX_HEADER_BLOCK})"
                        )));
                    }
                    let Some(payload) = rest.get(FRAME_HEADER..FRAME_HEADER + len) else {
                        break;
                    };
                    self.header_frame(kind, flags, stream_id, payload, out)?;
                    at += FRAME_HEADER + len;
                }
            }
        }
        input.drain(..at);
        Ok(())
    }

    /// A HEADERS or CONTINUATION frame: collects its fragment; at the end of the block,
    /// rewrites it.
    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        if kind == HEADERS {
            if self.pending.is_some() {
                return Err(invalid("a HEADERS frame inside another header block"));
            }
            let mut fragment = payload;
            let mut padding = 0;
            if flags & PADDED != 0 {
                let (&pad, rest) = fragment
                    .split_first()
                    .ok_or_else(|| invalid("padded HEADERS frame without its pad length"))?;
                padding = usize::from(pad);
                fragment = rest;
            }
            if flags & PRIORITY != 0 {
                // Stream dependency and weight: deprecated (RFC 9113 §5.3.2), dropped.
                fragment = fragment
                    .get(5..)
                    .ok_or_else(|| invalid("HEADERS frame too short for its priority"))?;
            }
            let end = fragment
                .len()
                .checked_sub(padding)
                .ok_or_else(|| invalid("HEADERS padding longer than the frame"))?;
            self.pending = Some(PendingBlock {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                fragment: fragment[..end].to_vec(),
            });
        } else {
            let block = self
                .pending
                .as_mut()
                .filter(|b| b.stream_id == stream_id)
                .ok_or_else(|| invalid("CONTINUATION frame without its header block"))?;
            if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
                return Err(invalid(format!(
                    "header block over {MAX_HEADER_BLOCK} bytes"
                )));
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & END_HEADERS != 0
            && let Some(block) = self.pending.take()
        {
            self.rewrite(&block, out)?;
        }
        Ok(())
    }

    /// Decodes a complete header block, repairs `:authority` and writes it as HEADERS and
    /// CONTINUATION frames of literal fields.
    fn rewrite(&mut self, block: &PendingBlock, out: &mut Vec<u8>) -> io::Result<()> {
        let fields = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| invalid(format!("header block does not decode (HPACK): {e:?}")))?;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &fields {
            let value: &[u8] = if name == b":authority" && !is_authority(value) {
                REPLACEMENT
            } else {
                value
            };
            encode_literal(name, value, &mut encoded);
        }
        let mut chunks = encoded.chunks(MAX_OUT_FRAME).peekable();
        let mut kind = HEADERS;
        // An empty block still needs its one HEADERS frame.
        let first: &[u8] = chunks.next().unwrap_or_default();
        let mut chunk = first;
        loop {
            let last = chunks.peek().is_none();
            let mut flags = if last { END_HEADERS } else { 0 };
            if kind == HEADERS && block.end_stream {
                flags |= END_STREAM;
            }
            write_frame_header(out, chunk.len(), kind, flags, block.stream_id);
            out.extend_from_slice(chunk);
            match chunks.next() {
                Some(next) => {
                    chunk = next;
                    kind = CONTINUATION;
                }
                None => break,
            }
        }
        Ok(())
    }
}

/// Whether h2 accepts `value` as `:authority`: the same RFC 3986 check it applies.
fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn write_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// An HPACK integer with an `prefix_bits`-bit prefix, the first byte's other bits `first`
/// (RFC 7541 §5.1).
fn encode_integer(mut value: usize, prefix_bits: u32, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | u8::try_from(value).unwrap_or(u8::MAX));
        return;
    }
    out.push(first | u8::try_from(max).unwrap_or(u8::MAX));
    value -= max;
    while value >= 0x80 {
        out.push(u8::try_from(value & 0x7f).unwrap_or(0) | 0x80);
        value >>= 7;
    }
    out.push(u8::try_from(value).unwrap_or(0));
}

/// A literal header field without indexing, new name, both strings plain (RFC 7541 §6.2.2).
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        encode_integer(s.len(), 7, 0x00, out);
        out.extend_from_slice(s);
    }
}

/// A Unix-socket connection of the Workload API with the client's `:authority` repaired.
#[derive(Debug)]
pub struct AuthorityRepair {
    inner: UnixStream,
    rewriter: Rewriter,
    raw: Vec<u8>,
    out: Vec<u8>,
    out_at: usize,
    eof: bool,
}

impl AuthorityRepair {
    /// Wraps an accepted connection.
    #[must_use]
    pub fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            raw: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            eof: false,
        }
    }
}

impl AsyncRead for AuthorityRepair {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_at);
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                if this.out_at == this.out.len() {
                    this.out.clear();
                    this.out_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return if this.raw.is_empty() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a frame",
                    )))
                };
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let filled = read.filled();
                    if filled.is_empty() {
                        this.eof = true;
                    } else {
                        this.raw.extend_from_slice(filled);
                        this.rewriter.process(&mut this.raw, &mut this.out)?;
                    }
                }
            }
        }
    }
}

impl AsyncWrite for AuthorityRepair {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for AuthorityRepair {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    /// Splits rewritten output into frames: (kind, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    /// Runs `input` through a rewriter, fed in pieces of `step` bytes.
    fn rewrite(input: &[u8], step: usize) -> io::Result<Vec<u8>> {
        let mut r = Rewriter::new();
        let (mut raw, mut out) = (Vec::new(), Vec::new());
        for piece in input.chunks(step.max(1)) {
            raw.extend_from_slice(piece);
            r.process(&mut raw, &mut out)?;
        }
        assert!(raw.is_empty(), "{} bytes left unprocessed", raw.len());
        Ok(out)
    }

    /// A request as gRPC C-core sends it on a Unix socket, HPACK-encoded by an indexing encoder
    /// (the client's dynamic table in use).
    fn grpc_request(encoder: &mut loona_hpack::Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        encoder.encode([
            (&b":scheme"[..], &b"http"[..]),
            (b":method", b"POST"),
            (b":authority", authority),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (b"workload.spiffe.io", b"true"),
        ])
    }

    fn decoded(block: &[u8], decoder: &mut loona_hpack::Decoder<'_>) -> Vec<(String, String)> {
        decoder
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_everything_else_stays() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        let path = b"run%2Fquadrant%2Fquadrant-workload%2Fdx.sock";
        // Twice on two streams: the second block refers to the client's dynamic table.
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &grpc_request(&mut enc, path),
        ));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])); // DATA
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &grpc_request(&mut enc, path),
        ));
        for step in [1, 7, 4096] {
            let out = rewrite(&input, step).unwrap();
            assert!(out.starts_with(PREFACE));
            let got = frames(&out[PREFACE.len()..]);
            assert_eq!(got.len(), 4, "step {step}");
            assert_eq!(
                (got[0].0, got[0].3.as_slice()),
                (0x4, &[0, 3, 0, 0, 0, 100][..])
            );
            assert_eq!((got[2].0, got[2].1, got[2].2), (0x0, END_STREAM, 1));
            // h2 decodes what it reads with a table of its own, which literals never touch.
            let mut server = loona_hpack::Decoder::new();
            for (i, stream) in [(1, 1), (3, 3)] {
                let (kind, flags, id, block) = &got[i];
                assert_eq!((*kind, *flags, *id), (HEADERS, END_HEADERS, stream));
                let fields = decoded(block, &mut server);
                assert!(fields.contains(&(":authority".into(), "localhost".into())));
                assert!(fields.contains(&("workload.spiffe.io".into(), "true".into())));
                assert!(
                    fields.contains(&(":path".into(), "/SpiffeWorkloadAPI/FetchX509SVID".into()))
                );
                assert_eq!(fields.len(), 7);
            }
        }
    }

    #[test]
    fn a_valid_authority_is_kept() {
        for authority in [&b"localhost"[..], b"spire-agent:8081", b"[::1]:9000"] {
            let mut enc = loona_hpack::Encoder::new();
            let mut input = PREFACE.to_vec();
            input.extend(frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &grpc_request(&mut enc, authority),
            ));
            let out = rewrite(&input, 5).unwrap();
            let got = frames(&out[PREFACE.len()..]);
            assert_eq!(got[0].1, END_HEADERS | END_STREAM);
            let fields = decoded(&got[0].3, &mut loona_hpack::Decoder::new());
            let want = String::from_utf8(authority.to_vec()).unwrap();
            assert!(fields.contains(&(":authority".into(), want)), "{fields:?}");
        }
    }

    #[test]
    fn padding_priority_and_continuations_are_unwrapped() {
        let mut enc = loona_hpack::Encoder::new();
        let block = grpc_request(&mut enc, b"%2Ftmp%2Fs.sock");
        let (a, b) = block.split_at(10);
        let mut headers = vec![3]; // pad length
        headers.extend([0, 0, 0, 0, 16]); // dependency + weight
        headers.extend_from_slice(a);
        headers.extend([0, 0, 0]); // padding
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let out = rewrite(&input, 3).unwrap();
        let got = frames(&out[PREFACE.len()..]);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0, got[0].1, got[0].2),
            (HEADERS, END_HEADERS | END_STREAM, 5)
        );
        let fields = decoded(&got[0].3, &mut loona_hpack::Decoder::new());
        assert!(fields.contains(&(":authority".into(), "localhost".into())));
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let big = vec![b'x'; 40_000];
        let mut block = Vec::new();
        encode_literal(b":authority", b"%2Fa", &mut block);
        encode_literal(b"x-big", &big, &mut block);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = rewrite(&input, 4096).unwrap();
        let got = frames(&out[PREFACE.len()..]);
        let kinds: Vec<(u8, u8)> = got.iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(
            kinds,
            [(HEADERS, 0), (CONTINUATION, 0), (CONTINUATION, END_HEADERS)]
        );
        assert!(got.iter().all(|f| f.3.len() <= MAX_OUT_FRAME));
        let joined: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
        let fields = decoded(&joined, &mut loona_hpack::Decoder::new());
        assert_eq!(fields[0], (":authority".into(), "localhost".into()));
        assert_eq!(fields[1].1.len(), 40_000);
    }

    #[test]
    fn broken_framing_closes_the_connection() {
        let mut enc = loona_hpack::Encoder::new();
        let block = grpc_request(&mut enc, b"%2Fa");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "interrupted block",
                [frame(HEADERS, 0, 1, &block[..4]), frame(0x0, 0, 1, b"x")].concat(),
            ),
            (
                "stray continuation",
                frame(CONTINUATION, END_HEADERS, 1, &block),
            ),
            (
                "continuation of another stream",
                [
                    frame(HEADERS, 0, 1, &block[..4]),
                    frame(CONTINUATION, END_HEADERS, 3, &block[4..]),
                ]
                .concat(),
            ),
            (
                "padding longer than the frame",
                frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 1, 2]),
            ),
            (
                "not HPACK",
                frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                ),
            ),
            (
                "table larger than advertised",
                frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0xff, 0x03, 0x82]),
            ),
            ("oversized header frame", {
                let mut h = Vec::new();
                write_frame_header(&mut h, MAX_HEADER_BLOCK + 1, HEADERS, END_HEADERS, 1);
                h
            }),
        ];
        for (what, bytes) in cases {
            let mut input = PREFACE.to_vec();
            input.extend(bytes);
            let mut r = Rewriter::new();
            let (mut raw, mut out) = (input, Vec::new());
            assert!(r.process(&mut raw, &mut out).is_err(), "{what}");
        }
    }

    #[test]
    fn a_client_that_is_not_http2_passes_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(rewrite(input, 2).unwrap(), input);
    }

    proptest! {
        /// Any fields survive the re-encoding as they were, but for a repaired authority.
        #[test]
        fn fields_survive_reencoding(
            fields in proptest::collection::vec(
                ("[a-z0-9:-]{1,20}", proptest::collection::vec(any::<u8>(), 0..300)), 0..12),
            step in 1usize..64,
        ) {
            let mut enc = loona_hpack::Encoder::new();
            let block = enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())));
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, &block));
            let out = rewrite(&input, step).unwrap();
            let got = frames(&out[PREFACE.len()..]);
            let joined: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
            let back = loona_hpack::Decoder::new().decode(&joined).unwrap();
            prop_assert_eq!(back.len(), fields.len());
            for ((n, v), (bn, bv)) in fields.iter().zip(&back) {
                prop_assert_eq!(n.as_bytes(), bn.as_slice());
                if n != ":authority" {
                    prop_assert_eq!(v, bv);
                }
            }
        }

        /// Arbitrary bytes after the preface never panic: they pass, or close the connection.
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut input = PREFACE.to_vec();
            input.extend(bytes);
            let mut r = Rewriter::new();
            let (mut raw, mut out) = (input, Vec::new());
            let _ = r.process(&mut raw, &mut out);
        }
    }
}
