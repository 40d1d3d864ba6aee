//! Example workload pair for RTT lanes: `lane-echo serve` offers an echo service, `lane-echo
//! call` opens a lane to it and checks every reply. Used by the integration tests, the lane
//! benchmark and README. Run inside a quadrant (`quadrant exec <q> --workload <name> -- …`),
//! which sets `QUADRANT_LANE_SOCKET`.

use std::{
    io::Write as _,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use quadrant_lanes::{
    CallError, Caller, Lane, LaneClient, LaneError, LaneListener, RetryPolicy, TransportChoice,
    Workers,
};

#[derive(Parser)]
#[command(about = "RTT lane echo service and client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offer SERVICE in this quadrant and echo every message on every lane.
    Serve {
        /// Service name.
        service: String,
        /// Also accept TCP + mTLS lanes on this port.
        #[arg(long)]
        tcp_port: Option<u16>,
        /// Misbehave for tests and demonstrations: on each lane, answer this many requests,
        /// then take the next one and close the lane without answering it.
        #[arg(long)]
        drop_after: Option<u64>,
        /// Misbehave for tests and demonstrations: answer shared-memory lanes this many
        /// microseconds late (the other transports at once).
        #[arg(long)]
        slow_shm_us: Option<u64>,
        /// Misbehave for tests and demonstrations: answer every lane this many microseconds
        /// late.
        #[arg(long)]
        slow_us: Option<u64>,
        /// Misbehave for tests and demonstrations: answer with every byte inverted (a caller
        /// that checks its echoes fails at the first such answer).
        #[arg(long)]
        invert: bool,
        /// Append one line per request handled on a lane with request ids to FILE: its
        /// attempt and its message (the loss checker compares them with what its callers got).
        #[arg(long)]
        ledger: Option<std::path::PathBuf>,
    },
    /// Open a lane to SERVICE in QUADRANT, send COUNT messages of SIZE bytes, check each echo,
    /// print a JSON summary.
    Call {
        /// The service's quadrant.
        quadrant: String,
        /// Service name.
        service: String,
        /// auto, shm, uds or tcp.
        #[arg(long, default_value = "auto")]
        transport: String,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Number of round trips.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Keep the lane open this many seconds after the round trips.
        #[arg(long, default_value_t = 0)]
        hold: u64,
        /// Pause between round trips, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Send numbered requests (`TAG-N`) to SERVICE at a fixed rate through a retrying caller
    /// (a lane with request ids, re-opened on another instance and re-sent when an instance
    /// goes away); classify each as ok, not sent or indeterminate and print a JSON summary.
    Steady {
        /// The service's quadrant.
        quadrant: String,
        /// Service name.
        service: String,
        /// auto, shm, uds or tcp.
        #[arg(long, default_value = "auto")]
        transport: String,
        /// Requests per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// How long to send.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Each request's deadline after its intended send time, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        deadline_ms: u64,
        /// How long the oldest request waits for its answer before its instance counts as
        /// hung, in milliseconds.
        #[arg(long, default_value_t = 500)]
        per_try_ms: u64,
        /// Sends of one request at most.
        #[arg(long, default_value_t = 4)]
        attempts: u32,
        /// Prefix of each request's message.
        #[arg(long, default_value = "r")]
        tag: String,
    },
    /// Open lanes to SERVICE one after another and keep them open, printing each outcome;
    /// stops at the first refusal or after MAX lanes, then waits until killed.
    Hold {
        /// The service's quadrant.
        quadrant: String,
        /// Service name.
        service: String,
        /// auto, shm, uds or tcp.
        #[arg(long, default_value = "auto")]
        transport: String,
        /// Most lanes to open.
        #[arg(long, default_value_t = 1)]
        max: usize,
        /// Open every lane with this affinity key (same key, same instance).
        #[arg(long)]
        key: Option<String>,
    },
}

fn transport(s: &str) -> Result<TransportChoice, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("unknown transport {s:?}: use auto, shm, uds or tcp"))
}

/// How `serve` misbehaves on purpose.
#[derive(Clone, Copy, Debug, Default)]
struct Misbehave {
    drop_after: Option<u64>,
    slow_shm_us: Option<u64>,
    slow_us: Option<u64>,
    invert: bool,
}

/// Echoes every request of a lane with request ids, writing each to the ledger before it is
/// answered (one `write` per line on a file opened for appending: lines of concurrent lanes
/// and of earlier runs do not mix).
fn echo_recorded(lane: &mut Lane, ledger: &std::fs::File, delay: Option<Duration>) -> String {
    let mut request = Vec::new();
    loop {
        match lane.recv(&mut request) {
            Ok(true) => {}
            Ok(false) => return "closed by the peer".to_owned(),
            Err(e) => return format!("error: {e}"),
        }
        let attempt = lane.request_id().map_or(0, |r| r.attempt);
        let entry = format!("{attempt} {}\n", String::from_utf8_lossy(&request));
        if let Err(e) = (&mut &*ledger).write_all(entry.as_bytes()) {
            return format!("error: cannot write the ledger: {e}");
        }
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        if let Err(e) = lane.send(&request) {
            return format!("error: {e}");
        }
    }
}

fn echo(mut lane: Lane, m: Misbehave, ledger: Option<&std::fs::File>) {
    let id = lane.id();
    let peer = lane.peer_id().to_owned();
    let Misbehave {
        drop_after,
        slow_shm_us,
        slow_us,
        invert,
    } = m;
    let delay = slow_shm_us
        .filter(|_| lane.transport() == quadrant_lanes::Transport::Shm)
        .or(slow_us)
        .map(Duration::from_micros);
    let mut answered = 0;
    if let (Some(file), true) = (&ledger, lane.has_request_ids()) {
        let outcome = echo_recorded(&mut lane, file, delay);
        println!("lane {id} from {peer}: {outcome}");
        let _ = std::io::stdout().flush();
        return;
    }
    // Each request is answered from where it lies in the lane: one copy per echo.
    let outcome = loop {
        if drop_after == Some(answered) {
            let mut request = Vec::new();
            let _ = lane.recv(&mut request);
            let _ = lane.close();
            break format!("dropped after {answered} answers");
        }
        let answer = |request: &[u8], out: &mut [u8]| {
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            out.copy_from_slice(request);
            if invert {
                for b in out.iter_mut() {
                    *b = !*b;
                }
            }
        };
        match lane.respond_with(<[u8]>::len, answer) {
            Ok(true) => answered += 1,
            Ok(false) => break "closed by the peer".to_owned(),
            Err(e) => break format!("error: {e}"),
        }
    };
    println!("lane {id} from {peer}: {outcome}");
    let _ = std::io::stdout().flush();
}

fn serve(
    service: &str,
    tcp_port: Option<u16>,
    misbehave: Misbehave,
    ledger: Option<&std::path::Path>,
) -> Result<(), LaneError> {
    let ledger = ledger
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(Arc::new)
        })
        .transpose()?;
    let mut listener = LaneListener::listen(None, service, tcp_port)?;
    println!("listening as {}", listener.spiffe_id());
    let _ = std::io::stdout().flush();
    // Each lane on a thread of its own; a thread whose lane ended takes the next one.
    let workers = Workers::new("lane-echo", Duration::from_secs(10));
    loop {
        match listener.accept() {
            Ok(lane) => {
                println!(
                    "lane {} open: {} from {}",
                    lane.id(),
                    lane.transport().name(),
                    lane.peer_id()
                );
                let _ = std::io::stdout().flush();
                let ledger = ledger.clone();
                workers.spawn(move || echo(lane, misbehave, ledger.as_deref()))?;
            }
            // A refused TCP connection is reported and the service goes on.
            Err(e @ LaneError::Tls(_)) => {
                println!("{e}");
                let _ = std::io::stdout().flush();
            }
            Err(e) => return Err(e),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank among at most a few million samples"
    )]
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

/// Opens a lane, makes `count` round trips of `size` bytes (`interval` apart), prints a
/// summary, keeps the lane `hold` seconds, closes it.
fn call(
    quadrant: &str,
    service: &str,
    choice: TransportChoice,
    size: usize,
    count: usize,
    (interval, hold): (Duration, u64),
) -> Result<(), String> {
    let mut client = LaneClient::connect(None).map_err(|e| e.to_string())?;
    let mut lane = client
        .open(quadrant, service, choice)
        .map_err(|e| e.to_string())?;
    let mut msg = vec![0u8; size];
    let mut reply = Vec::with_capacity(size);
    let mut rtts = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        for (j, b) in msg.iter_mut().enumerate() {
            #[expect(clippy::cast_possible_truncation, reason = "a byte pattern")]
            let v = (i + j) as u8;
            *b = v;
        }
        let rtt = lane
            .request(&msg, &mut reply)
            .map_err(|e| format!("round trip {i}: {e}"))?;
        if reply != msg {
            return Err(format!(
                "round trip {i}: the echo differs from what was sent"
            ));
        }
        rtts.push(rtt);
        std::thread::sleep(interval);
    }
    let elapsed = start.elapsed();
    rtts.sort();
    let summary = serde_json::json!({
        "lane": lane.id(),
        "transport": lane.transport().name(),
        "local": lane.local_id(),
        "peer": lane.peer_id(),
        "size": size,
        "count": count,
        "p50_us": percentile(&rtts, 0.50),
        "p99_us": percentile(&rtts, 0.99),
        "seconds": elapsed.as_secs_f64(),
        "mirror_dropped": lane.mirror_dropped(),
    });
    println!("{summary}");
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(hold));
    lane.close().map_err(|e| e.to_string())
}

/// What `steady` sends and how.
struct Steady {
    rate: u32,
    seconds: u64,
    deadline: Duration,
    tag: String,
}

/// Sends numbered requests at a fixed rate through a [`Caller`] and classifies each; latency
/// counts from the request's intended send time (a request held up by a fail-over is late by
/// the time it waited).
fn steady(
    (quadrant, service): (&str, &str),
    choice: TransportChoice,
    policy: RetryPolicy,
    plan: &Steady,
) -> Result<(), String> {
    let mut caller =
        Caller::open(None, (quadrant, service), choice, policy).map_err(|e| e.to_string())?;
    let period = Duration::from_secs(1) / plan.rate.max(1);
    let start = Instant::now();
    let end = start + Duration::from_secs(plan.seconds);
    let mut sent = std::collections::HashMap::new();
    let (mut ok, mut not_sent, mut indeterminate, mut wrong) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut retried = 0u64;
    // Why the first request that ended without an answer ended.
    let mut first_failure: Option<String> = None;
    let mut latencies = Vec::new();
    let mut reply = Vec::new();
    let mut n: u32 = 0;
    loop {
        let due = start + period * n;
        let now = Instant::now();
        if due < end && now >= due {
            let msg = format!("{}-{n}", plan.tag);
            match caller.submit(msg.as_bytes(), due + plan.deadline) {
                Ok(id) => {
                    sent.insert(id, (n, due, msg));
                    n += 1;
                    continue;
                }
                Err(CallError::WindowFull { .. }) => {}
                Err(e) => return Err(format!("request {n}: {e}")),
            }
        }
        if caller.outstanding() == 0 {
            if due >= end {
                break;
            }
            std::thread::sleep(due.saturating_duration_since(now));
            continue;
        }
        let Some(outcome) = caller.next(&mut reply) else {
            continue;
        };
        match outcome {
            Ok(answer) => {
                let Some((number, due, msg)) = sent.remove(&answer.id) else {
                    return Err(format!("an answer to request {}, never sent", answer.id));
                };
                latencies.push(due.elapsed());
                if answer.attempts > 1 {
                    retried += 1;
                }
                if reply == msg.as_bytes() {
                    ok.push(number);
                } else {
                    wrong.push(number);
                }
            }
            Err(e @ CallError::NotSent { id, .. }) => {
                first_failure.get_or_insert_with(|| e.to_string());
                if let Some((number, ..)) = sent.remove(&id) {
                    not_sent.push(number);
                }
            }
            Err(e @ CallError::Indeterminate { id, .. }) => {
                first_failure.get_or_insert_with(|| e.to_string());
                if let Some((number, ..)) = sent.remove(&id) {
                    indeterminate.push(number);
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    latencies.sort();
    let stats = caller.stats();
    let summary = serde_json::json!({
        "transport": caller.lane().map(|l| l.transport().name()),
        "submitted": n,
        "ok": ok.len(),
        "not_sent": not_sent,
        "indeterminate": indeterminate,
        "wrong_answer": wrong,
        "unresolved": sent.len(),
        "answered_after_a_resend": retried,
        "opens": stats.opens,
        "failovers": stats.failovers,
        "resent": stats.resent,
        "first_failure": first_failure,
        "p50_us": percentile(&latencies, 0.50),
        "p99_us": percentile(&latencies, 0.99),
        "max_us": latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e6),
        "ok_numbers": ok,
    });
    println!("{summary}");
    let _ = std::io::stdout().flush();
    Ok(())
}

fn hold(
    (quadrant, service): (&str, &str),
    choice: TransportChoice,
    max: usize,
    key: Option<&str>,
) -> Result<(), String> {
    let mut client = LaneClient::connect(None).map_err(|e| e.to_string())?;
    let mut lanes = Vec::new();
    for _ in 0..max {
        let opened = match key {
            Some(k) => client.open_keyed((quadrant, service), choice, k),
            None => client.open(quadrant, service, choice),
        };
        match opened {
            Ok(lane) => {
                println!("open {} {}", lane.id(), lane.transport().name());
                lanes.push(lane);
            }
            Err(e) => {
                println!("refused: {e}");
                break;
            }
        }
        let _ = std::io::stdout().flush();
    }
    println!("holding {}", lanes.len());
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_hours(1));
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            service,
            tcp_port,
            drop_after,
            slow_shm_us,
            slow_us,
            invert,
            ledger,
        } => serve(
            &service,
            tcp_port,
            Misbehave {
                drop_after,
                slow_shm_us,
                slow_us,
                invert,
            },
            ledger.as_deref(),
        )
        .map_err(|e| e.to_string()),
        Command::Steady {
            quadrant,
            service,
            transport: t,
            rate,
            seconds,
            deadline_ms,
            per_try_ms,
            attempts,
            tag,
        } => transport(&t).and_then(|c| {
            steady(
                (&quadrant, &service),
                c,
                RetryPolicy {
                    max_attempts: attempts,
                    per_try_timeout: Duration::from_millis(per_try_ms),
                    ..RetryPolicy::default()
                },
                &Steady {
                    rate,
                    seconds,
                    deadline: Duration::from_millis(deadline_ms),
                    tag,
                },
            )
        }),
        Command::Call {
            quadrant,
            service,
            transport: t,
            size,
            count,
            hold,
            interval_ms,
        } => transport(&t).and_then(|c| {
            call(
                &quadrant,
                &service,
                c,
                size,
                count,
                (Duration::from_millis(interval_ms), hold),
            )
        }),
        Command::Hold {
            quadrant,
            service,
            transport: t,
            max,
            key,
        } => transport(&t).and_then(|c| hold((&quadrant, &service), c, max, key.as_deref())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lane-echo: {e}");
            ExitCode::FAILURE
        }
    }
}
