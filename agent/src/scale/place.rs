//! Placing a workload on one of its quadrant's instances, as the Kubernetes scheduler places a
//! pod on a node: filter (not draining, labels matching the plan's `constraints`, free CPU and
//! memory against the plan's `resources` within the instance's `capacity`), then score (least
//! allocated by default; most allocated or balanced as the quadrant's `placement`), the lowest
//! instance winning a tie. A refusal says why each instance was left out, in the scheduler's
//! style: `0/4 px instances available: 1 draining, 2 insufficient memory (need 256 MiB, free 128
//! MiB), 1 didn't match constraint disk=ssd`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How the instances that fit are scored.
#[derive(
    Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The instance with the most free capacity (spreads work).
    #[default]
    LeastAllocated,
    /// The instance with the least free capacity that still fits (packs work).
    MostAllocated,
    /// The instance whose CPU and memory use stay closest to each other.
    Balanced,
}

/// One instance as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Instance index.
    pub index: u8,
    /// Receives no new work.
    pub draining: bool,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// CPU it may use, thousandths of a CPU (none: unlimited).
    pub cpu_millis: Option<u32>,
    /// Memory it may use (none: unlimited).
    pub memory_bytes: Option<u64>,
    /// CPU its placed workloads ask for, thousandths.
    pub used_cpu_millis: u32,
    /// Memory its placed workloads ask for.
    pub used_memory_bytes: u64,
}

/// What a workload asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// CPU, thousandths.
    pub cpu_millis: u32,
    /// Memory.
    pub memory_bytes: u64,
    /// `key=value` labels the instance must carry.
    pub constraints: Vec<String>,
}

/// Why one instance was or was not chosen.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Verdict {
    /// Instance index.
    pub index: u8,
    /// Left out for this reason; none: it fits.
    pub filtered: Option<String>,
    /// Its score (0..=100) when it fits.
    pub score: Option<u32>,
}

/// A placement decision and how it was reached (`quadrant place --explain`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Placement {
    /// Quadrant name.
    pub quadrant: String,
    /// The chosen instance, if any fits.
    pub chosen: Option<u8>,
    /// Every instance's verdict.
    pub instances: Vec<Verdict>,
    /// One line: which instance and why, or why none.
    pub summary: String,
    /// The scoring used.
    pub strategy: Strategy,
}

fn mib(b: u64) -> u64 {
    b >> 20
}

/// Why `c` cannot take `r`, if it cannot.
fn filter(c: &Candidate, r: &Request) -> Option<String> {
    if c.draining {
        return Some("draining".into());
    }
    for want in &r.constraints {
        let (k, v) = want.split_once('=').unwrap_or((want.as_str(), ""));
        if c.labels.get(k).map(String::as_str) != Some(v) {
            return Some(format!("didn't match constraint {want}"));
        }
    }
    if let Some(cap) = c.cpu_millis {
        let free = cap.saturating_sub(c.used_cpu_millis);
        if r.cpu_millis > free {
            return Some(format!(
                "insufficient cpu (need {}m, free {free}m)",
                r.cpu_millis
            ));
        }
    }
    if let Some(cap) = c.memory_bytes {
        let free = cap.saturating_sub(c.used_memory_bytes);
        if r.memory_bytes > free {
            return Some(format!(
                "insufficient memory (need {} MiB, free {} MiB)",
                mib(r.memory_bytes),
                mib(free)
            ));
        }
    }
    None
}

/// The share (0..=1) of a resource used once `r` is placed; an unlimited resource counts as
/// empty.
fn used_share(cap: Option<u64>, used: u64, more: u64) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "resource amounts far below 2^52"
    )]
    cap.filter(|&c| c > 0)
        .map_or(0.0, |c| ((used + more) as f64 / c as f64).min(1.0))
}

fn score(c: &Candidate, r: &Request, strategy: Strategy) -> u32 {
    let cpu = used_share(
        c.cpu_millis.map(u64::from),
        u64::from(c.used_cpu_millis),
        u64::from(r.cpu_millis),
    );
    let mem = used_share(c.memory_bytes, c.used_memory_bytes, r.memory_bytes);
    let s = match strategy {
        Strategy::LeastAllocated => 1.0 - f64::midpoint(cpu, mem),
        Strategy::MostAllocated => f64::midpoint(cpu, mem),
        Strategy::Balanced => 1.0 - (cpu - mem).abs(),
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "0..=100"
    )]
    let s = (s * 100.0).round().clamp(0.0, 100.0) as u32;
    s
}

/// Places `r` on one of `candidates` of quadrant `quadrant`.
#[must_use]
pub fn place(
    quadrant: &str,
    candidates: &[Candidate],
    r: &Request,
    strategy: Strategy,
) -> Placement {
    let instances: Vec<Verdict> = candidates
        .iter()
        .map(|c| {
            let filtered = filter(c, r);
            Verdict {
                index: c.index,
                score: filtered.is_none().then(|| score(c, r, strategy)),
                filtered,
            }
        })
        .collect();
    let chosen = instances
        .iter()
        .filter_map(|v| v.score.map(|s| (s, v.index)))
        // Highest score; on a tie the lowest instance.
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, i)| i);
    let summary = if let Some(i) = chosen {
        format!(
            "instance {i} of {quadrant} ({} fit; {strategy:?} score {})",
            instances.iter().filter(|v| v.score.is_some()).count(),
            instances
                .iter()
                .find(|v| v.index == i)
                .and_then(|v| v.score)
                .unwrap_or_default()
        )
    } else {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for v in &instances {
            if let Some(f) = &v.filtered {
                *reasons.entry(f.clone()).or_default() += 1;
            }
        }
        format!(
            "0/{} {quadrant} instances available: {}",
            instances.len(),
            reasons
                .iter()
                .map(|(why, n)| format!("{n} {why}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Placement {
        quadrant: quadrant.to_owned(),
        chosen,
        instances,
        summary,
        strategy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(index: u8, used_mem_mib: u64) -> Candidate {
        Candidate {
            index,
            draining: false,
            labels: BTreeMap::new(),
            cpu_millis: Some(1000),
            memory_bytes: Some(512 << 20),
            used_cpu_millis: 0,
            used_memory_bytes: used_mem_mib << 20,
        }
    }

    fn req(mem_mib: u64, constraints: &[&str]) -> Request {
        Request {
            cpu_millis: 100,
            memory_bytes: mem_mib << 20,
            constraints: constraints.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn least_allocated_spreads_most_allocated_packs_ties_go_low() {
        let cs = [c(0, 256), c(1, 0), c(2, 128), c(3, 0)];
        let p = place("px", &cs, &req(64, &[]), Strategy::LeastAllocated);
        assert_eq!(p.chosen, Some(1), "the emptiest, lowest on a tie: {p:?}");
        let p = place("px", &cs, &req(64, &[]), Strategy::MostAllocated);
        assert_eq!(p.chosen, Some(0), "{p:?}");
        let mut balanced = cs.clone();
        balanced[1].used_memory_bytes = 256 << 20;
        balanced[3].used_cpu_millis = 500;
        balanced[3].used_memory_bytes = 256 << 20;
        let p = place("px", &balanced, &req(64, &[]), Strategy::Balanced);
        assert_eq!(p.chosen, Some(3), "cpu and memory equally used: {p:?}");
    }

    #[test]
    fn a_refusal_explains_every_instance_in_the_schedulers_style() {
        let mut cs = [c(0, 0), c(1, 384), c(2, 384), c(3, 0)];
        cs[0].draining = true;
        cs[3].labels.insert("disk".into(), "hdd".into());
        cs[1].labels.insert("disk".into(), "ssd".into());
        cs[2].labels.insert("disk".into(), "ssd".into());
        let p = place(
            "px",
            &cs,
            &req(256, &["disk=ssd"]),
            Strategy::LeastAllocated,
        );
        assert_eq!(p.chosen, None);
        assert_eq!(
            p.summary,
            "0/4 px instances available: 1 didn't match constraint disk=ssd, 1 draining, \
             2 insufficient memory (need 256 MiB, free 128 MiB)"
        );
        let p = place("px", &cs, &req(64, &["disk=ssd"]), Strategy::LeastAllocated);
        assert_eq!(p.chosen, Some(1), "{p:?}");
        assert!(
            p.summary.starts_with("instance 1 of px (2 fit"),
            "{}",
            p.summary
        );
    }

    #[test]
    fn unlimited_instances_take_anything() {
        let mut u = c(0, 0);
        u.cpu_millis = None;
        u.memory_bytes = None;
        let p = place("px", &[u], &req(1 << 16, &[]), Strategy::LeastAllocated);
        assert_eq!(p.chosen, Some(0));
    }
}
