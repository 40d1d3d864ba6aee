use std::{
    net::{TcpListener, TcpStream},
    sync::Arc,
    thread,
};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use super::*;
use crate::tls::{self, Svid};

const CLIENT_ID: &str = "spiffe://test.local/quadrant/dx/workload/client";
const SERVER_ID: &str = "spiffe://test.local/quadrant/dg/workload/server";

/// SVIDs for a client and a server under one test CA.
fn svids() -> (Svid, Svid) {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.subject_alt_names = vec![SanType::URI("spiffe://test.local".try_into().unwrap())];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |id: &str| {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let cert = p.signed_by(&key, &issuer).unwrap();
        let material = Svid::material(
            &[cert.der().to_vec()],
            &key.serialize_der(),
            &[ca_cert.der().to_vec()],
            "test.local",
        );
        Svid::from_material(&material).unwrap()
    };
    (leaf(CLIENT_ID), leaf(SERVER_ID))
}

fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

fn client_conn(client: &Svid) -> rustls::ClientConnection {
    rustls::ClientConnection::new(tls::client_config(client, SERVER_ID).unwrap(), tls::sni())
        .unwrap()
}

/// Both ends through `handshake`.
fn pair() -> (RecordStream, RecordStream) {
    let (client, server) = svids();
    let (c, s) = connected();
    let config = tls::server_config(&server).unwrap();
    let srv = thread::spawn(move || {
        let conn = rustls::ServerConnection::new(config).unwrap();
        handshake(conn.into(), s).unwrap()
    });
    let (c, _) = handshake(client_conn(&client).into(), c).unwrap();
    let (s, certs) = srv.join().unwrap();
    assert_eq!(
        certs.first().and_then(tls::spiffe_id_of).as_deref(),
        Some(CLIENT_ID)
    );
    (c, s)
}

/// A message of `len` bytes that says where each byte was.
fn message(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap() ^ salt)
        .collect()
}

const SIZES: [usize; 5] = [
    1,
    MAX_PLAINTEXT - 1,
    MAX_PLAINTEXT,
    MAX_PLAINTEXT + 1,
    1 << 20,
];

/// Sends every size from `a` to `b` and back, each checked byte for byte.
fn exchange(a: &mut (impl Read + Write + Send), b: &mut (impl Read + Write + Send)) {
    for (i, len) in SIZES.into_iter().enumerate() {
        let salt = u8::try_from(i).unwrap();
        thread::scope(|s| {
            let a = &mut *a;
            s.spawn(move || {
                a.write_all(&message(len, salt)).unwrap();
                a.flush().unwrap();
                let mut got = vec![0; len];
                a.read_exact(&mut got).unwrap();
                assert!(
                    got == message(len, salt ^ 0x5a),
                    "{len} bytes b -> a differ"
                );
            });
            let mut got = vec![0; len];
            b.read_exact(&mut got).unwrap();
            assert!(got == message(len, salt), "{len} bytes a -> b differ");
            b.write_all(&message(len, salt ^ 0x5a)).unwrap();
            b.flush().unwrap();
        });
    }
}

#[test]
fn both_ends_carry_every_size_both_ways() {
    let (mut c, mut s) = pair();
    exchange(&mut c, &mut s);
}

/// The records are TLS 1.3 as rustls speaks it: each end talks to a plain rustls peer (whose
/// server sends session tickets, which the record layer skips).
#[test]
fn records_interoperate_with_rustls_at_either_end() {
    let (client, server) = svids();

    // Our client, rustls's server (with tickets).
    let (c, s) = connected();
    let mut config = (*tls::server_config(&server).unwrap()).clone();
    config.send_tls13_tickets = 2;
    let config = Arc::new(config);
    let srv = thread::spawn(move || {
        let mut conn = rustls::ServerConnection::new(config).unwrap();
        let mut s = s;
        while conn.is_handshaking() || conn.wants_write() {
            conn.complete_io(&mut s).unwrap();
        }
        rustls::StreamOwned::new(conn, s)
    });
    let (mut ours, _) = handshake(client_conn(&client).into(), c).unwrap();
    let mut theirs = srv.join().unwrap();
    exchange(&mut ours, &mut theirs);
    // close_notify from rustls ends our stream cleanly.
    theirs.conn.send_close_notify();
    theirs.conn.complete_io(&mut theirs.sock).unwrap();
    let mut rest = [0; 8];
    assert_eq!(ours.read(&mut rest).unwrap(), 0);

    // rustls's client, our server.
    let (c, s) = connected();
    let config = tls::server_config(&server).unwrap();
    let srv = thread::spawn(move || {
        let conn = rustls::ServerConnection::new(config).unwrap();
        handshake(conn.into(), s).unwrap().0
    });
    let mut theirs = rustls::StreamOwned::new(client_conn(&client), c);
    // rustls's client handshakes on its first write.
    theirs.write_all(b"x").unwrap();
    theirs.flush().unwrap();
    let mut ours = srv.join().unwrap();
    let mut x = [0; 1];
    ours.read_exact(&mut x).unwrap();
    assert_eq!(&x, b"x");
    exchange(&mut theirs, &mut ours);
}

/// Raw bytes of one record `from` would send, taken before they reach the socket.
fn sealed(from: &mut RecordStream, data: &[u8]) -> Vec<u8> {
    from.seal(APPLICATION_DATA, data).unwrap();
    let raw = from.output[..from.queued].to_vec();
    from.output.clear();
    from.queued = 0;
    raw
}

#[test]
fn an_altered_record_is_refused() {
    let (mut c, mut s) = pair();
    let mut raw = sealed(&mut c, b"pay 10");
    raw[HEADER + 4] ^= 1;
    (&c.sock).write_all(&raw).unwrap();
    let err = s.read(&mut [0; 16]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("failed authentication"), "{err}");
}

#[test]
fn a_replayed_or_reordered_record_is_refused() {
    let (mut c, mut s) = pair();
    let first = sealed(&mut c, b"first");
    let second = sealed(&mut c, b"second");
    // In order, then the first again.
    (&c.sock).write_all(&first).unwrap();
    (&c.sock).write_all(&second).unwrap();
    (&c.sock).write_all(&first).unwrap();
    let mut buf = [0; 16];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"first");
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"second");
    let err = s.read(&mut buf).unwrap_err();
    assert!(err.to_string().contains("failed authentication"), "{err}");

    // Out of order.
    let (mut c, mut s) = pair();
    let first = sealed(&mut c, b"first");
    let second = sealed(&mut c, b"second");
    (&c.sock).write_all(&second).unwrap();
    (&c.sock).write_all(&first).unwrap();
    let err = s.read(&mut buf).unwrap_err();
    assert!(err.to_string().contains("failed authentication"), "{err}");
}

#[test]
fn oversized_and_foreign_records_are_refused() {
    let (c, mut s) = pair();
    // A header announcing more than a record may hold.
    (&c.sock)
        .write_all(&[APPLICATION_DATA, 3, 3, 0xff, 0xff])
        .unwrap();
    let err = s.read(&mut [0; 16]).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");

    let (c, mut s) = pair();
    // A plaintext handshake record after the handshake.
    (&c.sock).write_all(&[HANDSHAKE, 3, 3, 0, 20]).unwrap();
    (&c.sock).write_all(&[0; 20]).unwrap();
    let err = s.read(&mut [0; 16]).unwrap_err();
    assert!(err.to_string().contains("outer type 22"), "{err}");
}

#[test]
fn a_key_update_is_refused_and_tickets_are_skipped() {
    assert!(post_handshake(&[NEW_SESSION_TICKET, 0, 0, 2, 7, 7]).is_ok());
    let err = post_handshake(&[KEY_UPDATE, 0, 0, 1, 0]).unwrap_err();
    assert!(err.to_string().contains("KeyUpdate"), "{err}");
    assert!(post_handshake(&[NEW_SESSION_TICKET, 0, 0, 9, 1]).is_err());
}

#[test]
fn a_key_stops_at_its_data_limit() {
    let (mut c, _s) = pair();
    c.tx.blocks = BLOCK_LIMIT - 2;
    sealed(&mut c, b"fits");
    let err = c.write(b"one more").unwrap_err();
    assert!(err.to_string().contains("limit of data"), "{err}");
}

#[test]
fn alerts_end_the_stream_or_name_the_peers_error() {
    let (mut c, mut s) = pair();
    let raw = {
        c.seal(ALERT, &[2, 42]).unwrap();
        let raw = c.output[..c.queued].to_vec();
        c.output.clear();
        c.queued = 0;
        raw
    };
    (&c.sock).write_all(&raw).unwrap();
    let err = s.read(&mut [0; 16]).unwrap_err();
    assert!(err.to_string().contains("BadCertificate"), "{err}");

    let (mut c, mut s) = pair();
    c.write_all(b"last words").unwrap();
    c.seal(ALERT, &[1, 0]).unwrap();
    c.flush().unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
}

mod properties {
    use std::net::Shutdown;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Records cut anywhere by the network (here: written in random pieces) come out whole
        /// and in order, across the read buffer's compaction.
        #[test]
        fn records_cut_anywhere_arrive_whole(
            sizes in prop::collection::vec(1usize..40_000, 1..24),
            pieces in prop::collection::vec(1usize..6_000, 1..64),
        ) {
            let (mut c, mut s) = pair();
            let mut want = Vec::new();
            let mut raw = Vec::new();
            for (i, len) in sizes.iter().enumerate() {
                let m = message(*len, u8::try_from(i % 256).unwrap());
                for chunk in m.chunks(MAX_PLAINTEXT) {
                    raw.extend(sealed(&mut c, chunk));
                }
                want.extend(m);
            }
            let sock = c.sock.try_clone().unwrap();
            let writer = thread::spawn(move || {
                let mut at = 0;
                for p in pieces.iter().cycle() {
                    if at == raw.len() {
                        break;
                    }
                    let end = (at + p).min(raw.len());
                    (&sock).write_all(&raw[at..end]).unwrap();
                    at = end;
                    thread::yield_now();
                }
            });
            let mut got = vec![0; want.len()];
            s.read_exact(&mut got).unwrap();
            writer.join().unwrap();
            prop_assert!(got == want);
        }

        /// Bytes that are not records from the peer's key never come out as data.
        #[test]
        fn foreign_bytes_never_read_as_data(garbage in prop::collection::vec(any::<u8>(), 0..70_000)) {
            let (c, mut s) = pair();
            (&c.sock).write_all(&garbage).unwrap();
            c.sock.shutdown(Shutdown::Write).unwrap();
            let mut buf = vec![0; 1 << 16];
            let got = s.read(&mut buf);
            prop_assert!(!matches!(got, Ok(n) if n > 0), "{got:?}");
        }
    }
}
