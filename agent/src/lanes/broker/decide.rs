//! The broker's decisions as pure functions of what it knows — the caller's declared lanes, the
//! policy's lane rules, the opener quadrant's limits — each refusal named from the registry
//! (`quadrant_lanes::control::Refusal`).

use dataplane_common::Quadrant;

use super::DeclaredLane;
use crate::{
    config::LaneLimits,
    lanes::{Transport, TransportChoice, control::Refusal},
    policy::LaneRule,
};

/// A refused request: its reason, the message the caller gets, and the limit if one was hit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// From the registry.
    pub reason: Refusal,
    /// For the caller.
    pub message: String,
    /// The configuration field of the limit hit.
    pub limit: Option<String>,
    /// When asking again may succeed, ms from now.
    pub retry_after_ms: Option<u64>,
}

/// A refusal without a limit.
pub fn refuse(reason: Refusal, message: String) -> Refused {
    Refused {
        reason,
        message,
        limit: None,
        retry_after_ms: None,
    }
}

/// Applies the caller's plan (`declared`: the lanes it declares, `None` when its plan declares
/// none): the lane must be declared, and a declared transport replaces `auto` (any other choice
/// is refused). `who` names the caller in messages.
pub fn declared_transport(
    declared: Option<&[DeclaredLane]>,
    who: &str,
    to_q: Quadrant,
    service: &str,
    choice: TransportChoice,
) -> Result<TransportChoice, Refused> {
    let Some(lanes) = declared else {
        return Ok(choice);
    };
    let Some(lane) = lanes
        .iter()
        .find(|l| l.quadrant == to_q && l.service == service)
    else {
        let list: Vec<String> = lanes
            .iter()
            .map(|l| format!("{}/{}", l.quadrant.name(), l.service))
            .collect();
        return Err(refuse(
            Refusal::Plan,
            format!(
                "the plan of {who} declares lanes to {} only, not to {}/{service}",
                list.join(", "),
                to_q.name()
            ),
        ));
    };
    match (lane.transport, choice) {
        (None, c) => Ok(c),
        (Some(t), TransportChoice::Auto) => Ok(t.into()),
        (Some(t), c) if c.candidates() == [t] => Ok(c),
        (Some(t), c) => Err(refuse(
            Refusal::Plan,
            format!(
                "the plan of {who} requires {} for its lane to {}/{service}; {} was asked",
                t.name(),
                to_q.name(),
                serde_json::to_value(c)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
        )),
    }
}

/// What the open needs to know about the service and the agent.
#[derive(Clone, Copy, Debug)]
pub struct Offer {
    /// The service takes TCP lanes.
    pub has_tcp: bool,
    /// The identity service runs (TCP lanes need SVIDs).
    pub identity: bool,
    /// For `auto`: the transport tried first (the service was re-routed to it because its
    /// latency SLO burnt on another).
    pub preferred: Option<Transport>,
}

/// The transport of a lane from `from_id` (quadrant `from_q`) to `service` in `to_q`: the
/// first of `choice`'s candidates (shared memory, then a Unix socket, then TCP) that a rule
/// covering both ends allows and that the service and the agent can carry. `rules` is `Err`
/// with the reason when the policy's lane rules are unavailable.
pub fn choose_transport(
    rules: Result<&[LaneRule], &str>,
    from_q: Quadrant,
    from_id: &str,
    to_q: Quadrant,
    service: &str,
    choice: TransportChoice,
    offer: Offer,
) -> Result<Transport, Refused> {
    let rules = rules.map_err(|e| {
        refuse(
            Refusal::Policy,
            format!("lane policy unavailable, every lane is refused: {e}"),
        )
    })?;
    let matching: Vec<&LaneRule> = rules
        .iter()
        .filter(|r| r.covers_source(from_q, from_id) && r.covers_service(to_q, service))
        .collect();
    if matching.is_empty() {
        return Err(refuse(
            Refusal::Policy,
            format!(
                "policy allows no lane from {from_id} to service {service} in {}",
                to_q.name()
            ),
        ));
    }
    let mut reasons = Vec::new();
    let first = offer
        .preferred
        .filter(|p| choice == TransportChoice::Auto && choice.candidates().contains(p));
    let order = first.into_iter().chain(
        choice
            .candidates()
            .iter()
            .copied()
            .filter(|t| Some(*t) != first),
    );
    for t in order {
        if !matching.iter().any(|r| r.allows_transport(t.name())) {
            reasons.push(format!("{} is not allowed by the policy", t.name()));
        } else if t == Transport::Tcp && !offer.has_tcp {
            reasons.push("the service takes no TCP lanes".to_owned());
        } else if t == Transport::Tcp && !offer.identity {
            reasons.push("TCP lanes need the identity service, which is unavailable".to_owned());
        } else {
            return Ok(t);
        }
    }
    Err(refuse(
        Refusal::Policy,
        format!(
            "no transport for a lane from {from_id} to {service} in {}: {}",
            to_q.name(),
            reasons.join("; ")
        ),
    ))
}

/// Whether quadrant `q`, holding `(lanes, shm)` now, may open one more lane of `shm_bytes`.
pub fn within_limits(
    q: Quadrant,
    (lanes, shm): (u32, u64),
    shm_bytes: u64,
    limits: &LaneLimits,
) -> Result<(), Refused> {
    if lanes >= limits.max_lanes {
        return Err(Refused {
            reason: Refusal::MaxLanes,
            message: format!(
                "lane limit reached: quadrant {} has {lanes} open lanes, max_lanes is {}",
                q.name(),
                limits.max_lanes
            ),
            limit: Some("max_lanes".into()),
            retry_after_ms: None,
        });
    }
    if shm + shm_bytes > limits.max_shm_bytes {
        return Err(Refused {
            reason: Refusal::MaxShmBytes,
            message: format!(
                "lane limit reached: quadrant {} holds {shm} bytes of lane memory, this lane needs {shm_bytes} more, max_shm_bytes is {}",
                q.name(),
                limits.max_shm_bytes
            ),
            limit: Some("max_shm_bytes".into()),
            retry_after_ms: None,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DX_API: &str = "spiffe://quadrant.local/quadrant/dx/workload/api";
    const OFFER: Offer = Offer {
        has_tcp: true,
        identity: true,
        preferred: None,
    };

    fn rule(
        from: &str,
        to: &str,
        services: Option<&[&str]>,
        transports: Option<&[&str]>,
    ) -> LaneRule {
        let list = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect();
        LaneRule {
            from: from.into(),
            to: to.into(),
            services: services.map(list),
            transports: transports.map(list),
            layer: "dg".into(),
        }
    }

    fn choose(
        rules: &[LaneRule],
        service: &str,
        choice: TransportChoice,
        offer: Offer,
    ) -> Result<Transport, Refused> {
        choose_transport(
            Ok(rules),
            Quadrant::Dx,
            DX_API,
            Quadrant::Dg,
            service,
            choice,
            offer,
        )
    }

    #[test]
    fn auto_takes_the_fastest_transport_the_rules_allow() {
        let all = [rule("dx", "dg", None, None)];
        assert_eq!(
            choose(&all, "echo", TransportChoice::Auto, OFFER),
            Ok(Transport::Shm)
        );
        let uds_tcp = [rule("dx", "dg", None, Some(&["uds", "tcp"]))];
        assert_eq!(
            choose(&uds_tcp, "echo", TransportChoice::Auto, OFFER),
            Ok(Transport::Uds)
        );
        let tcp = [rule("dx", "dg", None, Some(&["tcp"]))];
        assert_eq!(
            choose(&tcp, "echo", TransportChoice::Auto, OFFER),
            Ok(Transport::Tcp)
        );
        assert_eq!(
            choose(&all, "echo", TransportChoice::Tcp, OFFER),
            Ok(Transport::Tcp)
        );
    }

    #[test]
    fn rules_match_by_quadrant_spiffe_id_pattern_and_service() {
        for from in [
            "dx",
            DX_API,
            "spiffe://quadrant.local/quadrant/dx/workload/*",
        ] {
            let r = [rule(from, "dg", Some(&["echo"]), None)];
            assert_eq!(
                choose(&r, "echo", TransportChoice::Auto, OFFER),
                Ok(Transport::Shm),
                "{from}"
            );
            let e = choose(&r, "other", TransportChoice::Auto, OFFER).unwrap_err();
            assert_eq!(e.reason, Refusal::Policy);
            assert!(e.message.contains("policy allows no lane"), "{}", e.message);
        }
        for from in [
            "dg",
            "spiffe://quadrant.local/quadrant/dx/workload/web",
            "spiffe://quadrant.local/quadrant/dg/workload/*",
        ] {
            let r = [rule(from, "dg", None, None)];
            assert_eq!(
                choose(&r, "echo", TransportChoice::Auto, OFFER)
                    .unwrap_err()
                    .reason,
                Refusal::Policy,
                "{from}"
            );
        }
    }

    #[test]
    fn tcp_needs_a_tcp_service_and_the_identity_service() {
        let tcp = [rule("dx", "dg", None, Some(&["tcp"]))];
        let no_port = Offer {
            has_tcp: false,
            identity: true,
            preferred: None,
        };
        let e = choose(&tcp, "echo", TransportChoice::Auto, no_port).unwrap_err();
        assert!(
            e.message.contains("the service takes no TCP lanes"),
            "{}",
            e.message
        );
        let no_identity = Offer {
            has_tcp: true,
            identity: false,
            preferred: None,
        };
        let e = choose(&tcp, "echo", TransportChoice::Tcp, no_identity).unwrap_err();
        assert!(
            e.message.contains("need the identity service"),
            "{}",
            e.message
        );
        let shm_only = [rule("dx", "dg", None, Some(&["shm"]))];
        let e = choose(&shm_only, "echo", TransportChoice::Uds, OFFER).unwrap_err();
        assert!(
            e.message.contains("uds is not allowed by the policy"),
            "{}",
            e.message
        );
    }

    #[test]
    fn without_lane_rules_every_lane_is_refused() {
        let e = choose_transport(
            Err("bundle broken"),
            Quadrant::Dx,
            DX_API,
            Quadrant::Dg,
            "echo",
            TransportChoice::Auto,
            OFFER,
        )
        .unwrap_err();
        assert_eq!(e.reason, Refusal::Policy);
        assert!(e.message.contains("bundle broken"), "{}", e.message);
    }

    #[test]
    fn a_plan_limits_lanes_and_their_transport() {
        let declared = [
            DeclaredLane {
                quadrant: Quadrant::Dg,
                service: "echo".into(),
                transport: Some(Transport::Tcp),
            },
            DeclaredLane {
                quadrant: Quadrant::Dg,
                service: "cache".into(),
                transport: None,
            },
        ];
        let d = |service, choice| {
            declared_transport(Some(&declared), "dx/api", Quadrant::Dg, service, choice)
        };
        assert_eq!(d("echo", TransportChoice::Auto), Ok(TransportChoice::Tcp));
        assert_eq!(d("echo", TransportChoice::Tcp), Ok(TransportChoice::Tcp));
        assert_eq!(d("cache", TransportChoice::Shm), Ok(TransportChoice::Shm));
        let e = d("echo", TransportChoice::Shm).unwrap_err();
        assert_eq!(e.reason, Refusal::Plan);
        assert!(e.message.contains("requires tcp"), "{}", e.message);
        let e = d("db", TransportChoice::Auto).unwrap_err();
        assert!(
            e.message
                .contains("declares lanes to dg/echo, dg/cache only"),
            "{}",
            e.message
        );
        assert_eq!(
            declared_transport(None, "dx/api", Quadrant::Dg, "db", TransportChoice::Uds),
            Ok(TransportChoice::Uds)
        );
    }

    #[test]
    fn limits_name_what_was_reached() {
        let limits = LaneLimits {
            max_lanes: 2,
            max_shm_bytes: 1000,
            max_in_flight: 8,
        };
        assert_eq!(within_limits(Quadrant::Dx, (1, 400), 600, &limits), Ok(()));
        let e = within_limits(Quadrant::Dx, (2, 0), 0, &limits).unwrap_err();
        assert_eq!(
            (e.reason, e.limit.as_deref()),
            (Refusal::MaxLanes, Some("max_lanes"))
        );
        let e = within_limits(Quadrant::Dx, (1, 400), 601, &limits).unwrap_err();
        assert_eq!(
            (e.reason, e.limit.as_deref()),
            (Refusal::MaxShmBytes, Some("max_shm_bytes"))
        );
        assert!(e.message.contains("holds 400 bytes"), "{}", e.message);
    }
}
