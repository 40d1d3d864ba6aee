//! Unit tests of the broker's request parsing.

use super::*;

#[test]
fn requests_are_validated_with_field_names() {
    let ok = parse_request(br#"{"kind":"open","quadrant":"dg","service":"echo"}"#).unwrap();
    assert_eq!(
        ok,
        LaneRequest::Open {
            quadrant: "dg".into(),
            service: "echo".into(),
            transport: TransportChoice::Auto
        }
    );
    for (bad, needle) in [
        (
            &br#"{"kind":"open","quadrant":"zz","service":"echo"}"#[..],
            "/quadrant",
        ),
        (
            br#"{"kind":"open","quadrant":"dg","service":"Echo!"}"#,
            "/service",
        ),
        (
            br#"{"kind":"open","quadrant":"dg","service":"e","transport":"udp"}"#,
            "/transport",
        ),
        (
            br#"{"kind":"listen","service":"e","tcp_port":0}"#,
            "/tcp_port",
        ),
        (
            br#"{"kind":"open","quadrant":"dg","service":"e","extra":1}"#,
            "extra",
        ),
        (br#"{"kind":"fly"}"#, "kind"),
        (b"not json", "not JSON"),
    ] {
        let e = parse_request(bad).unwrap_err().to_string();
        assert!(e.contains(needle), "{e} should name {needle}");
    }
}
