//! Fuzzes the DSSE envelope decoder and plan verification: arbitrary envelopes are refused by an
//! empty trust store without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quadrant::signing::{Envelope, TrustStore};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = serde_json::from_slice::<Envelope>(data) {
        assert!(quadrant::plans::verify(&envelope, &TrustStore::default()).is_err());
        let _ = quadrant::plans::verify_rollback(&envelope, &TrustStore::default(), 0);
    }
});
