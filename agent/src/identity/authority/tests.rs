//! Tests of [`super`].

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
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
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
            assert!(fields.contains(&(":path".into(), "/SpiffeWorkloadAPI/FetchX509SVID".into())));
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
