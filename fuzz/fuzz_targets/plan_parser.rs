//! Fuzzes the plan parser: any bytes are a valid plan or a named error, never a panic, and a
//! plan that parses serializes back to a document that parses to the same plan.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(plan) = quadrant::plans::parse(text)
    {
        let again = serde_json::to_string(&plan).expect("a parsed plan serializes");
        assert_eq!(quadrant::plans::parse(&again).expect("round trip"), plan);
    }
});
