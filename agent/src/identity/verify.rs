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

    #[test]
    #[expect(clippy::too_many_lines, reason = "one case table")]
    fn forged_and_misused_svids_are_refused_by_rule() {
        let (ca, dir) = authority("matrix");
        let roots = ca.roots().to_vec();
        let now = SystemTime::now();
        let verify = |chain: &[Vec<u8>], q| verify_svid(chain, &roots, TD, q, now);

        let good = ca.mint_x509(PX_API, Duration::from_hours(1)).unwrap();
        let ok = verify(&good.chain, Some(Quadrant::Px)).unwrap();
        assert_eq!(
            (ok.spiffe_id.as_str(), ok.quadrant, ok.workload.as_str()),
            (PX_API, Quadrant::Px, "api")
        );

        let ds = || vec![KeyUsagePurpose::DigitalSignature];
        let self_signed = leaf(&[PX_API], false, ds());
        let wrong_td = ca
            .mint_x509(
                "spiffe://evil.example/quadrant/px/workload/api",
                Duration::from_hours(1),
            )
            .unwrap();
        let expired = ca.mint_x509(PX_API, Duration::ZERO).unwrap();
        let dx_id = ca
            .mint_x509(
                "spiffe://quadrant.local/quadrant/dx/workload/api",
                Duration::from_hours(1),
            )
            .unwrap();
        let not_quadrant = ca
            .mint_x509(
                "spiffe://quadrant.local/ns/default/sa/api",
                Duration::from_hours(1),
            )
            .unwrap();
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
                vec![self_signed],
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
                vec![leaf(
                    &[PX_API],
                    true,
                    vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ],
                )],
                SvidError::LeafIsCa,
            ),
            (
                "may sign certificates",
                vec![leaf(
                    &[PX_API],
                    false,
                    vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ],
                )],
                SvidError::KeyUsage,
            ),
            (
                "wrong trust domain",
                wrong_td.chain,
                SvidError::TrustDomain {
                    id: String::new(),
                    trust_domain: String::new(),
                },
            ),
            (
                "expired",
                expired.chain,
                SvidError::Validity {
                    index: 0,
                    what: "expired",
                    not_before: String::new(),
                    not_after: String::new(),
                },
            ),
            (
                "other quadrant's ID",
                dx_id.chain,
                SvidError::WrongQuadrant {
                    id: String::new(),
                    actual: String::new(),
                    expected: String::new(),
                },
            ),
            (
                "not a quadrant ID",
                not_quadrant.chain,
                SvidError::NotQuadrantId(String::new()),
            ),
        ];
        for (what, chain, expected) in cases {
            // "expired" needs a clock past the SVID's (zero-length) lifetime plus the backdating.
            let at = if what == "expired" {
                now + Duration::from_mins(2)
            } else {
                now
            };
            let err = verify_svid(&chain, &roots, TD, Some(Quadrant::Px), at).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&err),
                std::mem::discriminant(&expected),
                "{what}: {err}"
            );
        }
        // An SVID of another agent's CA (same trust domain name) does not chain to our bundle.
        let (other, other_dir) = authority("other");
        let foreign = other.mint_x509(PX_API, Duration::from_hours(1)).unwrap();
        assert!(matches!(
            verify(&foreign.chain, Some(Quadrant::Px)),
            Err(SvidError::Chain(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other_dir);
    }
}
