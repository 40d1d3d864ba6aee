//! Prometheus metrics (`metrics.listen`): what the agent and its kernel programs counted,
//! encoded with the Prometheus org's `prometheus-client` crate.
//!
//! Two kinds of source. Most figures already live somewhere — the per-CPU verdict counters in
//! the kernel, the lanes' shared SLI blocks, the breaker, SLO and instance state — and are read
//! when a scrape comes ([`collect`]), into [`Family`] values that the [`Families`] collector
//! hands to the encoder. What exists only as it happens (admission decisions and their latency,
//! policy activations) is counted live in [`Live`]. Every label takes values from a bounded set:
//! quadrants, hooks, reasons, transports, states, and the names of SLOs the configuration and
//! plans declare — never a workload, address or SPIFFE ID.

pub mod collect;
pub mod server;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family as LiveFamily,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};

/// Labels of one sample: (name, value).
pub type Labels = Vec<(&'static str, String)>;

/// What kind of metric a family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (the encoder appends `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Counts per upper bound, with a sum and a count.
    Histogram,
}

/// One sample's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An integer (counters, counts).
    Int(u64),
    /// A float (ratios, probabilities, burn rates).
    Float(f64),
    /// Counts per bucket (not cumulative; the encoder sums them), by inclusive upper bound.
    Histogram {
        /// Sum of the observations.
        sum: f64,
        /// Number of observations.
        count: u64,
        /// (upper bound, observations in this bucket only); the last bound may be +Inf.
        buckets: Vec<(f64, u64)>,
    },
}

/// One sample: labels and a value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Its labels.
    pub labels: Labels,
    /// Its value.
    pub value: Value,
}

/// A metric family read at scrape time.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// Name, without `_total` for counters.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Kind.
    pub kind: Kind,
    /// Its samples (a family without samples is still described).
    pub samples: Vec<Sample>,
}

impl Family {
    /// An empty family.
    #[must_use]
    pub const fn new(name: &'static str, help: &'static str, kind: Kind) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample.
    pub fn push(&mut self, labels: Labels, value: Value) {
        self.samples.push(Sample { labels, value });
    }

    /// Adds an integer sample.
    pub fn int(&mut self, labels: Labels, v: u64) {
        self.push(labels, Value::Int(v));
    }

    /// Adds a float sample.
    pub fn float(&mut self, labels: Labels, v: f64) {
        self.push(labels, Value::Float(v));
    }
}

/// The families read at scrape time, as a collector of the scrape's registry.
#[derive(Debug)]
pub struct Families(pub Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            // Help ends with a full stop, as the registry writes it for the live metrics.
            let help = format!("{}.", f.help);
            let mut metric = encoder.encode_descriptor(f.name, &help, None, kind)?;
            for s in &f.samples {
                let mut m = metric.encode_family(&s.labels)?;
                match (&s.value, f.kind) {
                    (Value::Int(v), Kind::Counter) => ConstCounter::new(*v).encode(m)?,
                    (Value::Float(v), Kind::Counter) => ConstCounter::new(*v).encode(m)?,
                    (Value::Int(v), _) => {
                        ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(m)?;
                    }
                    (Value::Float(v), _) => ConstGauge::new(*v).encode(m)?,
                    (
                        Value::Histogram {
                            sum,
                            count,
                            buckets,
                        },
                        _,
                    ) => m.encode_histogram::<Labels>(*sum, *count, buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

/// Admission decisions and their latency; policy activations.
#[derive(Clone, Debug)]
pub struct Live {
    /// `quadrant_admission_decisions_total{result}`.
    pub admission_decisions: LiveFamily<Labels, Counter>,
    /// `quadrant_admission_duration_seconds`.
    pub admission_duration: Histogram,
    /// `quadrant_policy_activations_total{result}`.
    pub policy_activations: LiveFamily<Labels, Counter>,
}

/// Upper bounds of the admission latency histogram, seconds (100 µs to about 0.8 s).
pub const ADMISSION_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_2, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
];

impl Default for Live {
    /// Every result starts at 0, so that each series exists before its first event (a rate
    /// over a series that appears with its first increment misses that increment).
    fn default() -> Self {
        let live = Self {
            admission_decisions: LiveFamily::default(),
            admission_duration: Histogram::new(ADMISSION_BUCKETS),
            policy_activations: LiveFamily::default(),
        };
        for result in ["allowed", "denied", "error"] {
            let _ = live
                .admission_decisions
                .get_or_create(&vec![("result", result.to_owned())]);
        }
        for result in ["ok", "failed"] {
            let _ = live
                .policy_activations
                .get_or_create(&vec![("result", result.to_owned())]);
        }
        live
    }
}

impl Live {
    /// Counts an admission decision: `allowed`, `denied` (constraints violated) or `error`
    /// (identity, review or engine: fail-closed), and how long it took.
    pub fn admission(&self, allowed: bool, violations: bool, took: std::time::Duration) {
        let result = match (allowed, violations) {
            (true, _) => "allowed",
            (false, true) => "denied",
            (false, false) => "error",
        };
        self.admission_decisions
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
        self.admission_duration.observe(took.as_secs_f64());
    }

    /// Counts a policy activation (start-up, reload): `ok` or `failed`.
    pub fn policy_activation(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.policy_activations
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }
}

/// What a scraper asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4 (what `promtool check metrics` reads; the default).
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    #[must_use]
    pub fn from_accept(accept: Option<&str>) -> Self {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    /// Its `Content-Type`.
    #[must_use]
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Encodes `families` and `live` in `format`.
///
/// # Errors
/// Only if a writer into a `String` fails, which it does not.
pub fn encode(
    families: Vec<Family>,
    live: &Live,
    format: Format,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register(
        "quadrant_admission_decisions",
        "Admission decisions by result: allowed, denied (constraints violated), error \
         (fail-closed: identity, review or policy engine)",
        live.admission_decisions.clone(),
    );
    registry.register(
        "quadrant_admission_duration_seconds",
        "Time to decide an admission review (identity check, Rego constraints, audit record)",
        live.admission_duration.clone(),
    );
    registry.register(
        "quadrant_policy_activations",
        "Policy bundle activations (start-up and reloads) by result",
        live.policy_activations.clone(),
    );
    registry.register_collector(Box::new(Families(families)));
    let mut out = String::new();
    match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
