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
mod tests;
