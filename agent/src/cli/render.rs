//! Tables for people: the status report and the workloads.

use quadrant::{control::StatusReport, workloads};

/// A status report for people.
#[must_use]
pub fn status(s: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "instance {} (agent pid {}), pins in {}",
        s.instance,
        s.pid,
        s.pin_dir.display()
    );
    let _ = writeln!(out, "policy {}", s.policy);
    if let Some(m) = s.metrics {
        let _ = writeln!(
            out,
            "metrics on http://{m}/metrics (health: /healthz, /readyz)"
        );
    }
    if let Some(c) = &s.carried {
        let _ = writeln!(
            out,
            "dataplane taken over from map layout {} (now {}): {} tracked flows carried, counters {}",
            c.from_map_layout,
            c.to_map_layout,
            c.flows,
            if c.counters {
                "carried"
            } else {
                "restarted from zero"
            }
        );
    }
    let _ = writeln!(
        out,
        "{:<4} {:<14} {:<16} {:<14} {:<10} {:<8} PROGRAM IDS (hook=id)",
        "QUAD", "NETNS", "PREFIX", "ADDRESS", "HOST-IF", "IFINDEX"
    );
    for q in &s.quadrants {
        let ids: Vec<String> = q
            .programs
            .iter()
            .map(|p| format!("{}={}", p.hook, p.program_id))
            .collect();
        let _ = writeln!(
            out,
            "{:<4} {:<14} {:<16} {:<14} {:<10} {:<8} {}",
            q.name,
            q.netns,
            q.prefix,
            q.address,
            q.host_interface,
            q.host_ifindex,
            ids.join(" ")
        );
    }
    let _ = writeln!(out, "\nverdicts (summed over CPUs):");
    if s.counters.is_empty() {
        let _ = writeln!(out, "  none yet");
    }
    let _ = writeln!(
        out,
        "{:<4} {:<12} {:<24} {:<6} {:>12}",
        "QUAD", "HOOK", "REASON", "VERDICT", "COUNT"
    );
    for c in &s.counters {
        let _ = writeln!(
            out,
            "{:<4} {:<12} {:<24} {:<6} {:>12}",
            c.quadrant, c.hook, c.reason, c.verdict, c.count
        );
    }
    out
}

/// The workloads as a table.
#[must_use]
pub fn workloads(list: &[workloads::Status]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>4} {:>8} {:<9} {:<12} {:>8} LIMITS",
        "NAME", "GEN", "PID", "STATE", "LAST EXIT", "RESTARTS"
    );
    for w in list {
        let _ = writeln!(
            out,
            "{:<24} {:>4} {:>8} {:<9} {:<12} {:>8} {}",
            w.name,
            w.generation,
            w.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            w.state,
            w.last_exit.clone().unwrap_or_else(|| "-".into()),
            w.restarts,
            w.limits
        );
    }
    out
}
