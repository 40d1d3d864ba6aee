//! Verification of a presented X.509-SVID: the SPIFFE rules live with the lanes, whose TCP +
//! mTLS ends apply them too (`quadrant_lanes::svid`); admission uses them from here. The tests
//! need the agent's CA, so they live here.

pub use quadrant_lanes::svid::*;

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        time::{Duration, SystemTime},
    };

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256, SanType,
    };

    use dataplane_common::Quadrant;

    use super::*;
    use crate::identity::ca::Authority;

    const TD: &str = "quadrant.local";
    const PX_API: &str = "spiffe://quadrant.local/quadrant/px/workload/api";

    fn authority(name: &str) -> (Authority, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("quadrant-verify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Authority::load_or_create(&dir, TD, None).unwrap(), dir)
    }

    fn leaf(uris: &[&str], ca: bool, usages: Vec<KeyUsagePurpose>) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "forged");
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).to_owned().try_into().unwrap()))
            .collect();
        p.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        p.key_usages = usages;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    /// Asserts `chain` is refused with an error of `expected`'s kind, checked `at`.
    fn assert_refused(
        ca: &Authority,
        what: &str,
        chain: &[Vec<u8>],
        at: SystemTime,
        expected: &SvidError,
    ) {
        let err = verify_svid(chain, ca.roots(), TD, Some(Quadrant::Px), at).unwrap_err();
        assert_eq!(
            std::mem::discriminant(&err),
            std::mem::discriminant(expected),
            "{what}: {err}"
        );
    }

    #[test]
    fn an_svid_of_this_authority_verifies_and_one_of_another_does_not() {
        let (ca, dir) = authority("good");
        let now = SystemTime::now();
        let good = ca.mint_x509(PX_API, Duration::from_hours(1)).unwrap();
        let ok = verify_svid(&good.chain, ca.roots(), TD, Some(Quadrant::Px), now).unwrap();
        assert_eq!(
            (ok.spiffe_id.as_str(), ok.quadrant, ok.workload.as_str()),
            (PX_API, Quadrant::Px, "api")
        );
        // An SVID of another agent's CA (same trust domain name) does not chain to our bundle.
        let (other, other_dir) = authority("other");
        let foreign = other.mint_x509(PX_API, Duration::from_hours(1)).unwrap();
        assert_refused(
            &ca,
            "foreign CA",
            &foreign.chain,
            now,
            &SvidError::Chain(String::new()),
        );
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other_dir);
    }

    #[test]
    fn node_and_workload_svids_are_not_taken_for_each_other() {
        let (ca, dir) = authority("nodes");
        let now = SystemTime::now();
        let node = ca
            .mint_x509("spiffe://quadrant.local/node/n1", Duration::from_hours(1))
            .unwrap();
        assert_eq!(
            verify_node_svid(&node.chain, ca.roots(), TD, now).unwrap(),
            "spiffe://quadrant.local/node/n1"
        );
        assert!(matches!(
            verify_svid(&node.chain, ca.roots(), TD, None, now),
            Err(SvidError::NotQuadrantId(_))
        ));
        let workload = ca.mint_x509(PX_API, Duration::from_hours(1)).unwrap();
        assert!(matches!(
            verify_node_svid(&workload.chain, ca.roots(), TD, now),
            Err(SvidError::NotNodeId(_))
        ));
        for id in [
            "spiffe://quadrant.local/node/",
            "spiffe://quadrant.local/node/a/b",
        ] {
            let odd = ca.mint_x509(id, Duration::from_hours(1)).unwrap();
            assert!(
                matches!(
                    verify_node_svid(&odd.chain, ca.roots(), TD, now),
                    Err(SvidError::NotNodeId(_))
                ),
                "{id}"
            );
        }
        let (other, other_dir) = authority("other-nodes");
        let foreign = other
            .mint_x509("spiffe://quadrant.local/node/n1", Duration::from_hours(1))
            .unwrap();
        assert!(matches!(
            verify_node_svid(&foreign.chain, ca.roots(), TD, now),
            Err(SvidError::Chain(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other_dir);
    }

    #[test]
    fn forged_certificates_are_refused_by_rule() {
        let (ca, dir) = authority("forged");
        let ds = || vec![KeyUsagePurpose::DigitalSignature];
        let may_sign = || {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ]
        };
        let cases: Vec<(&str, Vec<Vec<u8>>, SvidError)> = vec![
            ("empty chain", vec![], SvidError::Missing),
            (
                "garbage",
                vec![b"not a certificate".to_vec()],
                SvidError::Malformed {
                    index: 0,
                    reason: String::new(),
                },
            ),
            (
                "self-signed",
                vec![leaf(&[PX_API], false, ds())],
                SvidError::Chain(String::new()),
            ),
            (
                "two URI SANs",
                vec![leaf(
                    &[PX_API, "spiffe://quadrant.local/quadrant/px/workload/b"],
                    false,
                    ds(),
                )],
                SvidError::UriSans(2),
            ),
            (
                "no URI SAN",
                vec![leaf(&[], false, ds())],
                SvidError::UriSans(0),
            ),
            (
                "CA certificate as leaf",
                vec![leaf(&[PX_API], true, may_sign())],
                SvidError::LeafIsCa,
            ),
            (
                "may sign certificates",
                vec![leaf(&[PX_API], false, may_sign())],
                SvidError::KeyUsage,
            ),
        ];
        for (what, chain, expected) in cases {
            assert_refused(&ca, what, &chain, SystemTime::now(), &expected);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn svids_of_this_authority_used_out_of_place_are_refused_by_rule() {
        let (ca, dir) = authority("misused");
        let now = SystemTime::now();
        let mint = |id: &str, life| ca.mint_x509(id, life).unwrap().chain;
        let hour = Duration::from_hours(1);
        let cases: Vec<(&str, Vec<Vec<u8>>, SystemTime, SvidError)> = vec![
            (
                "wrong trust domain",
                mint("spiffe://evil.example/quadrant/px/workload/api", hour),
                now,
                SvidError::TrustDomain {
                    id: String::new(),
                    trust_domain: String::new(),
                },
            ),
            (
                // A clock past the SVID's (zero-length) lifetime plus the backdating.
                "expired",
                mint(PX_API, Duration::ZERO),
                now + Duration::from_mins(2),
                SvidError::Validity {
                    index: 0,
                    what: "expired",
                    not_before: String::new(),
                    not_after: String::new(),
                },
            ),
            (
                "other quadrant's ID",
                mint("spiffe://quadrant.local/quadrant/dx/workload/api", hour),
                now,
                SvidError::WrongQuadrant {
                    id: String::new(),
                    actual: String::new(),
                    expected: String::new(),
                },
            ),
            (
                "not a quadrant ID",
                mint("spiffe://quadrant.local/ns/default/sa/api", hour),
                now,
                SvidError::NotQuadrantId(String::new()),
            ),
        ];
        for (what, chain, at, expected) in cases {
            assert_refused(&ca, what, &chain, at, &expected);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
