//! TLS 1.3 records of a TCP lane after its handshake.
//!
//! rustls runs the handshake (certificates, SPIFFE checks, key schedule) and then hands over the
//! connection's traffic keys and sequence numbers (`dangerous_extract_secrets`, the hand-over
//! kernel TLS uses; this kernel is built without it). From there this module protects and opens
//! application-data records (RFC 8446 §5.2) with ring's AEADs, reading from and writing to the
//! socket through two fixed buffers: no allocation per record, one copy in and one copy out
//! besides the kernel's. rustls's buffered stream allocated and freed every 16 KiB record, and
//! the allocator's trimming turned that into page faults on every message (BENCHMARKS.md).
//!
//! What a lane's peer may send after the handshake: application data, a `close_notify` alert
//! (end of stream) and session tickets (ignored; our servers send none). A `KeyUpdate` is refused
//! — the keys rustls hands over cannot be ratcheted — and instead each direction stops at the
//! AES-GCM data limit of RFC 8446 §5.5 (about 2^34 blocks), where the lane fails with a clear
//! error and the caller opens a new one.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
};

use ::ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// Record content types (RFC 8446 §5.1).
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// Handshake message types a lane may meet after the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Largest plaintext of one record, and the largest ciphertext a peer may send.
const MAX_PLAINTEXT: usize = 16 * 1024;
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Socket reads land in this buffer (records are opened where they lie).
const READ_BUF: usize = 256 * 1024;
/// Records are written to the socket once this much is queued, and at every flush.
const WRITE_AT: usize = 64 * 1024;
/// Blocks of 16 bytes (plus one per record) one key may protect: RFC 8446 §5.5's 2^24.5
/// full-size records, counted in the blocks the bound is about, so small records use it up no
/// faster than their size says.
const BLOCK_LIMIT: u64 = 1 << 34;

/// One direction: key, static IV, next sequence number and the blocks protected so far.
struct Direction {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    blocks: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Self> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => {
                return Err(invalid(
                    "the negotiated cipher suite is not supported on lanes",
                ));
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| invalid("the handshake produced a key of the wrong length"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| invalid("the handshake produced an IV of the wrong length"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
            blocks: 0,
        })
    }

    /// The nonce of the next record (the IV XOR the sequence number), and counts the record.
    fn next(&mut self, len: usize) -> io::Result<Nonce> {
        self.blocks += (len as u64).div_ceil(16) + 1;
        if self.blocks > BLOCK_LIMIT {
            return Err(invalid(
                "the lane's key has protected its limit of data (2^34 AES blocks, RFC 8446 \
                 §5.5); open a new lane",
            ));
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TCP lane: {why}"))
}

/// The stream of a TCP lane after its handshake: plaintext in, TLS 1.3 records out, and back.
pub(crate) struct RecordStream {
    sock: TcpStream,
    tx: Direction,
    rx: Direction,
    /// Bytes read from the socket: `[start..end]` not yet opened, `[plain.0..plain.1]` an
    /// opened record's plaintext not yet read.
    input: Vec<u8>,
    start: usize,
    end: usize,
    plain: (usize, usize),
    /// Protected records not yet written: `[sent..queued]`.
    output: Vec<u8>,
    sent: usize,
    queued: usize,
    /// The peer sent `close_notify`.
    closed: bool,
}

impl std::fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .finish_non_exhaustive()
    }
}

/// Runs `conn`'s handshake over `sock`, feeding rustls one whole record at a time so that
/// nothing after the last handshake record is taken into rustls's buffers, then takes the
/// connection's keys. Returns the stream and the peer's certificates.
pub(crate) fn handshake(
    mut conn: rustls::Connection,
    sock: TcpStream,
) -> Result<
    (
        RecordStream,
        Vec<rustls::pki_types::CertificateDer<'static>>,
    ),
    String,
> {
    let mut input = vec![0; READ_BUF];
    let (mut start, mut end) = (0, 0);
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(&mut &sock).map_err(|e| e.to_string())?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let len = loop {
            if let Some(len) = whole_record(&input[start..end]).map_err(|e| e.to_string())? {
                break len;
            }
            if start > 0 {
                input.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            match (&sock).read(&mut input[end..]) {
                Ok(0) => return Err("the peer closed the connection in the handshake".into()),
                Ok(n) => end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        };
        let mut record = &input[start..start + len];
        while !record.is_empty() {
            conn.read_tls(&mut record).map_err(|e| e.to_string())?;
        }
        start += len;
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (the alert rustls queued), then fail.
            let _ = conn.write_tls(&mut &sock);
            return Err(e.to_string());
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut &sock).map_err(|e| e.to_string())?;
    }
    let certs = conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| e.to_string())?;
    let mut stream = RecordStream::new(sock, secrets).map_err(|e| e.to_string())?;
    stream.input = input;
    stream.start = start;
    stream.end = end;
    Ok((stream, certs))
}

/// The length of the whole record at the front of `buf`, if it is all there.
fn whole_record(buf: &[u8]) -> io::Result<Option<usize>> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(invalid(&format!(
            "a record of {len} bytes (at most {MAX_CIPHERTEXT})"
        )));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

impl RecordStream {
    fn new(sock: TcpStream, secrets: ExtractedSecrets) -> io::Result<Self> {
        Ok(Self {
            sock,
            tx: Direction::new(secrets.tx)?,
            rx: Direction::new(secrets.rx)?,
            input: vec![0; READ_BUF],
            start: 0,
            end: 0,
            plain: (0, 0),
            output: Vec::with_capacity(WRITE_AT + MAX_CIPHERTEXT + HEADER),
            sent: 0,
            queued: 0,
            closed: false,
        })
    }

    /// Protects `data` (at most one record's worth) as one record of `kind` into the output.
    fn seal(&mut self, kind: u8, data: &[u8]) -> io::Result<()> {
        let inner = data.len() + 1;
        let len = u16::try_from(inner + TAG).map_err(|_| invalid("record too long"))?;
        let [hi, lo] = len.to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        let nonce = self.tx.next(inner)?;
        self.output.truncate(self.queued);
        self.output.extend_from_slice(&header);
        let body = self.output.len();
        self.output.extend_from_slice(data);
        self.output.push(kind);
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut self.output[body..])
            .map_err(|_| invalid("sealing a record failed"))?;
        self.output.extend_from_slice(tag.as_ref());
        self.queued = self.output.len();
        Ok(())
    }

    /// Writes every queued record to the socket; on an error (a write timeout) what was not
    /// written stays queued.
    fn send_queued(&mut self) -> io::Result<()> {
        while self.sent < self.queued {
            match (&self.sock).write(&self.output[self.sent..self.queued]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.sent = 0;
        self.queued = 0;
        Ok(())
    }

    /// Opens the record at `input[start..]` (whole) and makes its content available.
    fn open(&mut self, len: usize) -> io::Result<()> {
        let rec = self.start;
        self.start += len;
        let header: [u8; HEADER] = self.input[rec..rec + HEADER]
            .try_into()
            .unwrap_or_else(|_| unreachable!());
        if header[0] != APPLICATION_DATA {
            return Err(invalid(&format!(
                "a record of outer type {} after the handshake",
                header[0]
            )));
        }
        if len < HEADER + TAG + 1 {
            return Err(invalid(&format!("a record of {} bytes", len - HEADER)));
        }
        let nonce = self.rx.next(len - HEADER - TAG)?;
        let body = rec + HEADER;
        let plain = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), &mut self.input[body..rec + len])
            .map_err(|_| invalid("a record failed authentication (altered, replayed or lost)"))?;
        // The content type is the last non-zero byte; zeros after it are padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(invalid("a record without a content type"));
        };
        let (kind, content) = (plain[at], body..body + at);
        match kind {
            APPLICATION_DATA => self.plain = (content.start, content.end),
            ALERT => {
                // close_notify (level warning or fatal, description 0) ends the stream; any
                // other alert is the peer's error.
                match self.input[content] {
                    [_, 0] => self.closed = true,
                    [_, d] => {
                        return Err(invalid(&format!(
                            "the peer sent the TLS alert {:?}",
                            rustls::AlertDescription::from(d)
                        )));
                    }
                    _ => return Err(invalid("a malformed alert")),
                }
            }
            HANDSHAKE => post_handshake(&self.input[content])?,
            other => return Err(invalid(&format!("a record of content type {other}"))),
        }
        Ok(())
    }
}

/// Handshake messages after the handshake: session tickets are ignored (a lane never resumes),
/// anything else is refused.
fn post_handshake(mut msgs: &[u8]) -> io::Result<()> {
    while !msgs.is_empty() {
        let [kind, a, b, c, ..] = *msgs else {
            return Err(invalid("a truncated handshake message"));
        };
        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        let Some(rest) = msgs.get(4 + len..) else {
            return Err(invalid("a handshake message split across records"));
        };
        match kind {
            NEW_SESSION_TICKET => {}
            KEY_UPDATE => {
                return Err(invalid(
                    "the peer updated its keys (KeyUpdate), which lanes do not support",
                ));
            }
            other => {
                return Err(invalid(&format!(
                    "handshake message {other} after the handshake"
                )));
            }
        }
        msgs = rest;
    }
    Ok(())
}

impl Read for RecordStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let (from, to) = self.plain;
            if from < to {
                let n = buf.len().min(to - from);
                buf[..n].copy_from_slice(&self.input[from..from + n]);
                self.plain.0 += n;
                return Ok(n);
            }
            if self.closed || buf.is_empty() {
                return Ok(0);
            }
            if let Some(len) = whole_record(&self.input[self.start..self.end])? {
                self.open(len)?;
                continue;
            }
            // Room for at least one more whole record.
            if self.input.len() - self.start < HEADER + MAX_CIPHERTEXT {
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let got = (&self.sock).read(&mut self.input[self.end..])?;
            if got == 0 {
                // The connection ended without close_notify: fine between records (the lane
                // layer decides whether a frame was cut), not inside one.
                return if self.start == self.end {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.end += got;
        }
    }
}

impl Write for RecordStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A write left queued by an earlier error goes first.
        if self.sent > 0 {
            self.send_queued()?;
        }
        let mut taken = 0;
        while taken < buf.len() && self.queued < WRITE_AT {
            let n = (buf.len() - taken).min(MAX_PLAINTEXT);
            self.seal(APPLICATION_DATA, &buf[taken..taken + n])?;
            taken += n;
        }
        if self.queued >= WRITE_AT {
            self.send_queued()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_queued()
    }
}

#[cfg(test)]
mod tests;
