//! Fuzzes everything that reads lane frames written by a peer: the header decoder, the stream
//! framing of Unix-socket and TCP lanes, and the shared-memory ring consumer over a control
//! block and ring contents the peer controls. None may panic, read outside its buffer or hand
//! out a payload over the lane's limit.
#![no_main]

use std::alloc::{Layout, alloc_zeroed, dealloc};

use libfuzzer_sys::fuzz_target;
use quadrant::lanes::{
    frame::Header,
    lane::Framed,
    ring::{CTRL_OFFSET, HEAD, PAGE, Received, Region, TAIL, mapping_len},
};

const MAX: u32 = 4096;
const CAP: usize = 256;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data, MAX) {
        assert!(h.len <= MAX);
    }

    let mut framed = Framed::new(std::io::Cursor::new(data.to_vec()), MAX);
    let mut out = Vec::new();
    for _ in 0..64 {
        match framed.recv(&mut out) {
            Ok(Some(_)) => assert!(out.len() <= MAX as usize),
            _ => break,
        }
    }

    // The peer's bytes: its tail, the consumer's head, then the ring's data.
    let len = mapping_len(CAP);
    let layout = Layout::from_size_align(len, 4096).unwrap();
    // SAFETY: non-zero size; freed below.
    let base = unsafe { alloc_zeroed(layout) };
    // SAFETY: `base` holds `len` bytes and outlives `region`.
    let region = unsafe { Region::new(base, len, CAP) }.unwrap();
    region.initialize();
    let word = |i: usize| {
        let mut w = [0u8; 8];
        for (j, b) in w.iter_mut().enumerate() {
            *b = data.get(i * 8 + j).copied().unwrap_or(0);
        }
        w
    };
    // SAFETY: all offsets are within the allocation.
    unsafe {
        base.add(CTRL_OFFSET + TAIL).copy_from_nonoverlapping(word(0).as_ptr(), 8);
        base.add(CTRL_OFFSET + HEAD).copy_from_nonoverlapping((u64::from_le_bytes(word(1)) & !7).to_le_bytes().as_ptr(), 8);
        let rest = data.get(16..).unwrap_or_default();
        base.add(PAGE).copy_from_nonoverlapping(rest.as_ptr(), rest.len().min(CAP));
    }
    let mut consumer = region.consumer(0, 120);
    for _ in 0..64 {
        match consumer.try_recv_with(<[u8]>::len) {
            Ok(Received::Data { value, .. }) => assert!(value <= 120),
            _ => break,
        }
    }
    // SAFETY: allocated above with this layout.
    unsafe { dealloc(base, layout) };
});
