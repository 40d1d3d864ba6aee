//! Runtime authorization compiled for the kernel: the flows of the Rego decision (plus the
//! configuration's local rules) become policy-map entries. One merge of port ranges
//! ([`merge`]) with one fit check serves every join — rules with the same key, the packet
//! scope (a quadrant's flows joined with its workloads'), the local rules of the
//! configuration — and [`for_kernel`] resolves the workloads single-workload rules name to their
//! cgroups.

use std::collections::BTreeMap;

use dataplane_common::{
    Identity, Quadrant,
    maps::MAX_PORT_RANGES,
    policy::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, PortRange},
};
use serde_json::Value;

use super::{Flow, PolicyBundle, PolicyError};
use crate::config::{Config, ConfigError, OneOrMany, PolicyRule, PortSpec};

/// The policy compiled to map entries: (src, dst, proto) → port ranges.
pub type CompiledPolicy = BTreeMap<(Identity, Identity, u8), Vec<PortRange>>;

/// Policy entries of rules naming one workload's SPIFFE ID: (source quadrant, workload name,
/// destination identity, protocol) → allowed destination port ranges.
pub type WorkloadPolicy = BTreeMap<(Quadrant, String, Identity, u8), Vec<PortRange>>;

/// The runtime authorization compiled from a bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledFlows {
    /// Flows every process of the source may open (policy scope 0).
    pub quadrant: CompiledPolicy,
    /// The union of the workload flows per source quadrant; the cgroup programs allow it only
    /// to the named workloads.
    pub some_workload: CompiledPolicy,
    /// What a packet of the source may carry (policy scope 1): [`Self::quadrant`] joined with
    /// [`Self::some_workload`] (a packet does not say which process sent it).
    pub packet: CompiledPolicy,
    /// Per-workload flows.
    pub workloads: WorkloadPolicy,
}

/// One workload's allowance, its workload resolved to the cgroup the cgroup programs see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// The workload's cgroup id.
    pub cgroup_id: u64,
    /// Destination identity.
    pub dst: Identity,
    /// Protocol.
    pub proto: u8,
    /// Allowed destination port ranges.
    pub ranges: Vec<PortRange>,
}

/// Everything the kernel's policy maps hold, ready to write (the default allows nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Scope 0: what every process of a quadrant may do.
    pub quadrant: CompiledPolicy,
    /// Scope 1: what a packet of a quadrant may carry.
    pub packet: CompiledPolicy,
    /// What rules naming single workloads allow, per workload cgroup.
    pub workloads: Vec<WorkloadEntry>,
    /// Bit `1 << quadrant id`: that quadrant's policy names single workloads (raw sockets are
    /// refused there).
    pub raw_sockets_denied: u16,
    /// Entries of the union of the workload flows (for the status line).
    pub some_workload_entries: usize,
    /// The digest of the bundle it was compiled from, if any.
    pub bundle_digest: Option<String>,
}

impl KernelPolicy {
    /// A policy of quadrant-wide flows only (every packet scope is the quadrant's).
    #[must_use]
    pub fn quadrant_wide(policy: CompiledPolicy) -> Self {
        Self {
            packet: policy.clone(),
            quadrant: policy,
            ..Self::default()
        }
    }

    /// The status line of this policy, made live from `origin`.
    #[must_use]
    pub fn summary(&self, origin: &str) -> String {
        format!(
            "enforced: {} map entries, {} for single workloads, from {origin}",
            self.quadrant.len(),
            self.some_workload_entries + self.workloads.len()
        )
    }
}

/// Merges `ranges` into `entry` (each range once); `false` if the result holds more than
/// [`MAX_PORT_RANGES`], which one map value cannot.
#[must_use]
pub fn merge(entry: &mut Vec<PortRange>, ranges: &[PortRange]) -> bool {
    for r in ranges {
        if !entry.contains(r) {
            entry.push(*r);
        }
    }
    entry.len() <= MAX_PORT_RANGES
}

fn too_many(field: &str, (src, dst, proto): (Identity, Identity, u8)) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        reason: format!(
            "{} → {} {}: more than {MAX_PORT_RANGES} port ranges across all rules",
            src.name(),
            dst.name(),
            proto_name(proto)
        ),
    }
}

/// `a` joined with `b`, key by key.
pub fn join(
    a: &CompiledPolicy,
    b: &CompiledPolicy,
    field: &str,
) -> Result<CompiledPolicy, ConfigError> {
    let mut out = a.clone();
    for (&key, ranges) in b {
        if !merge(out.entry(key).or_default(), ranges) {
            return Err(too_many(field, key));
        }
    }
    Ok(out)
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Compiles flow rules into map entries, merging rules with the same key.
pub fn compile_rules(rules: &[PolicyRule]) -> Result<CompiledPolicy, ConfigError> {
    let mut out = CompiledPolicy::new();
    for (i, rule) in rules.iter().enumerate() {
        let from = identities(&rule.from, &format!("policy[{i}].from"))?;
        let to = identities(&rule.to, &format!("policy[{i}].to"))?;
        let protos = protocols(rule.protocols.as_deref(), i)?;
        let ports = match &rule.ports {
            None => vec![PortRange::ANY],
            Some(specs) => {
                if protos.iter().all(|p| *p == PROTO_ICMP) {
                    return Err(invalid(
                        format!("policy[{i}].ports"),
                        "icmp has no ports; remove ports or add tcp/udp",
                    ));
                }
                if specs.is_empty() {
                    return Err(invalid(
                        format!("policy[{i}].ports"),
                        "empty list; omit the field to allow every port",
                    ));
                }
                specs
                    .iter()
                    .enumerate()
                    .map(|(j, s)| parse_port(s, &format!("policy[{i}].ports[{j}]")))
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        for &src in &from {
            for &dst in &to {
                for &proto in &protos {
                    let ranges = if proto == PROTO_ICMP {
                        &[PortRange::ANY][..]
                    } else {
                        &ports
                    };
                    if !merge(out.entry((src, dst, proto)).or_default(), ranges) {
                        return Err(too_many(&format!("policy[{i}]"), (src, dst, proto)));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn identities(names: &OneOrMany, field: &str) -> Result<Vec<Identity>, ConfigError> {
    if names.names().is_empty() {
        return Err(invalid(field, "empty list"));
    }
    names
        .names()
        .iter()
        .map(|n| {
            Identity::from_name(n).ok_or_else(|| {
                invalid(
                    field,
                    format!("unknown identity {n:?}; expected dx, dg, px, pg, host or world"),
                )
            })
        })
        .collect()
}

fn protocols(names: Option<&[String]>, rule: usize) -> Result<Vec<u8>, ConfigError> {
    let Some(names) = names else {
        return Ok(vec![PROTO_TCP, PROTO_UDP, PROTO_ICMP]);
    };
    if names.is_empty() {
        return Err(invalid(
            format!("policy[{rule}].protocols"),
            "empty list; omit the field to allow all",
        ));
    }
    names
        .iter()
        .enumerate()
        .map(|(j, n)| match n.to_ascii_lowercase().as_str() {
            "tcp" => Ok(PROTO_TCP),
            "udp" => Ok(PROTO_UDP),
            "icmp" => Ok(PROTO_ICMP),
            _ => Err(invalid(
                format!("policy[{rule}].protocols[{j}]"),
                format!("unknown protocol {n:?}; expected tcp, udp or icmp"),
            )),
        })
        .collect()
}

/// Name of an IP protocol number the policy knows.
#[must_use]
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMP => "icmp",
        _ => "other",
    }
}

fn parse_port(spec: &PortSpec, field: &str) -> Result<PortRange, ConfigError> {
    let text = match spec {
        PortSpec::Port(p) => return Ok(PortRange { lo: *p, hi: *p }),
        PortSpec::Range(s) => s.trim(),
    };
    let num = |s: &str| {
        s.trim().parse::<u16>().map_err(|_| {
            invalid(
                field,
                format!("{text:?} is not a port (0-65535) or a range like \"8000-8080\""),
            )
        })
    };
    let (lo, hi) = if let Some((a, b)) = text.split_once('-') {
        (num(a)?, num(b)?)
    } else {
        let p = num(text)?;
        (p, p)
    };
    if lo > hi {
        return Err(invalid(
            field,
            format!("range {text:?} ends before it starts"),
        ));
    }
    Ok(PortRange { lo, hi })
}

impl PolicyBundle {
    /// Compiles the quadrant-wide runtime authorization into policy-map entries (flows naming a
    /// single workload are left out; [`Self::compile_all`] has them).
    pub fn compile(&self, config: &Config) -> Result<CompiledPolicy, PolicyError> {
        self.compile_all(config).map(|c| c.quadrant)
    }

    /// Compiles the runtime authorization: quadrant-wide entries, the flows that rules naming
    /// one workload's SPIFFE ID allow (per workload and as their union per quadrant), and the
    /// packet scope joining both.
    pub fn compile_all(&self, config: &Config) -> Result<CompiledFlows, PolicyError> {
        let td = &config.identity.trust_domain;
        let mut quadrant = Vec::new();
        let mut per_workload: BTreeMap<(Quadrant, String), Vec<PolicyRule>> = BTreeMap::new();
        for f in self.flows(&config.policy)? {
            match flow_to_rule(&f, td)? {
                (rule, None) => quadrant.push(rule),
                (rule, Some((q, workload))) => {
                    per_workload.entry((q, workload)).or_default().push(rule);
                }
            }
        }
        let merged = |what: &str| {
            let what = what.to_owned();
            move |e| PolicyError::Flow {
                flow: what,
                source: Box::new(e),
            }
        };
        let mut workloads = WorkloadPolicy::new();
        for ((q, workload), rules) in &per_workload {
            let compiled = compile_rules(rules).map_err(merged(&format!(
                "(flows of workload {}/{workload})",
                q.name()
            )))?;
            for ((_, dst, proto), ranges) in compiled {
                workloads.insert((*q, workload.clone(), dst, proto), ranges);
            }
        }
        let all: Vec<PolicyRule> = per_workload.into_values().flatten().collect();
        let quadrant = compile_rules(&quadrant).map_err(merged("(merged flows)"))?;
        let some_workload = compile_rules(&all).map_err(merged("(merged workload flows)"))?;
        // The packet programs decide with one entry per key holding both: it must fit.
        let packet = join(&quadrant, &some_workload, "packet scope").map_err(merged(
            "(flows a packet may carry: the quadrant's and its workloads' rules joined)",
        ))?;
        Ok(CompiledFlows {
            quadrant,
            some_workload,
            packet,
            workloads,
        })
    }
}

/// The kernel's entries for `flows`: each workload a rule names resolved to its cgroup id
/// through `cgroup_of` (which the agent makes create the workload's cgroup, as `quadrant exec
/// --workload` and the supervisor do, so that its id is fixed before the workload starts).
pub fn for_kernel(
    flows: CompiledFlows,
    mut cgroup_of: impl FnMut(Quadrant, &str) -> Result<u64, PolicyError>,
) -> Result<KernelPolicy, PolicyError> {
    let mut workloads = Vec::with_capacity(flows.workloads.len());
    for ((q, workload, dst, proto), ranges) in flows.workloads {
        workloads.push(WorkloadEntry {
            cgroup_id: cgroup_of(q, &workload)?,
            dst,
            proto,
            ranges,
        });
    }
    let raw_sockets_denied = flows
        .some_workload
        .keys()
        .filter_map(|(src, _, _)| Quadrant::from_id(*src as u8))
        .fold(0u16, |mask, q| mask | 1 << (q as u16));
    Ok(KernelPolicy {
        quadrant: flows.quadrant,
        packet: flows.packet,
        workloads,
        raw_sockets_denied,
        some_workload_entries: flows.some_workload.len(),
        bundle_digest: None,
    })
}

/// The configuration's local rules as flows the Rego layers would write, one per (from, to).
pub(super) fn rule_to_flows(r: &PolicyRule) -> Vec<Value> {
    let one = |o: &OneOrMany| match o {
        OneOrMany::One(s) => vec![s.clone()],
        OneOrMany::Many(v) => v.clone(),
    };
    // One flow per (from, to) pair, as the Rego layers write them.
    let mut flows = Vec::new();
    for from in one(&r.from) {
        for to in one(&r.to) {
            let mut f = serde_json::json!({
                "from": from,
                "to": to,
                "protocols": r.protocols.clone().unwrap_or_else(|| vec!["tcp".into(), "udp".into(), "icmp".into()]),
            });
            if let Some(ports) = &r.ports {
                f["ports"] = ports
                    .iter()
                    .map(|p| match p {
                        PortSpec::Port(n) => Value::String(n.to_string()),
                        PortSpec::Range(s) => Value::String(s.clone()),
                    })
                    .collect();
            }
            flows.push(f);
        }
    }
    flows
}

/// Maps a flow's source to an identity the kernel knows. A quadrant-wide SPIFFE ID pattern
/// (`spiffe://<td>/quadrant/<q>/workload/*`) is quadrant `<q>`; a single workload's SPIFFE ID
/// (`…/workload/<name>`) is quadrant `<q>` restricted to workload `<name>` (returned beside the
/// rule), which the cgroup programs tell apart by the workload's cgroup.
fn flow_to_rule(
    f: &Flow,
    trust_domain: &str,
) -> Result<(PolicyRule, Option<(Quadrant, String)>), PolicyError> {
    let flow_err = |reason: &str| PolicyError::Flow {
        flow: serde_json::to_string(f).unwrap_or_default(),
        source: Box::new(ConfigError::Invalid {
            field: "from".into(),
            reason: reason.to_owned(),
        }),
    };
    let from = if let Some(rest) = f.from.strip_prefix("spiffe://") {
        let prefix = format!("{trust_domain}/quadrant/");
        let Some(path) = rest.strip_prefix(&prefix) else {
            return Err(flow_err(&format!(
                "SPIFFE ID outside trust domain {trust_domain}"
            )));
        };
        let Some((q, workload)) = path.split_once("/workload/") else {
            return Err(flow_err(
                "expected spiffe://<trust domain>/quadrant/<q>/workload/<name or *>",
            ));
        };
        let Some(quadrant) = Quadrant::from_name(q) else {
            return Err(flow_err(&format!(
                "unknown quadrant {q:?} in the SPIFFE ID"
            )));
        };
        if workload == "*" {
            (q.to_owned(), None)
        } else if crate::identity::attest::valid_workload_name(workload) {
            (q.to_owned(), Some((quadrant, workload.to_owned())))
        } else {
            return Err(flow_err(&format!(
                "invalid workload name {workload:?} in the SPIFFE ID (1-64 of a-z, 0-9, '-', '_', '.')"
            )));
        }
    } else {
        (f.from.clone(), None)
    };
    let (from, workload) = from;
    Ok((
        PolicyRule {
            from: OneOrMany::One(from),
            to: OneOrMany::One(f.to.clone()),
            protocols: Some(f.protocols.clone()),
            ports: f
                .ports
                .as_ref()
                .map(|p| p.iter().map(|s| PortSpec::Range(s.clone())).collect()),
        },
        workload,
    ))
}

#[cfg(test)]
mod tests;
