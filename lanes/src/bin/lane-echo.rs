//! Example workload pair for RTT lanes: `lane-echo serve` offers an echo service, `lane-echo
//! call` opens a lane to it and checks every reply. Used by the integration tests, the lane
//! benchmark and README. Run inside a quadrant (`quadrant exec <q> --workload <name> -- …`),
//! which sets `QUADRANT_LANE_SOCKET`.

use std::{
    io::Write as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use quadrant_lanes::{Lane, LaneClient, LaneError, LaneListener, TransportChoice};

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

fn echo(mut lane: Lane, m: Misbehave) {
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

fn serve(service: &str, tcp_port: Option<u16>, misbehave: Misbehave) -> Result<(), LaneError> {
    let mut listener = LaneListener::listen(None, service, tcp_port)?;
    println!("listening as {}", listener.spiffe_id());
    let _ = std::io::stdout().flush();
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
                std::thread::spawn(move || echo(lane, misbehave));
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

fn hold(quadrant: &str, service: &str, choice: TransportChoice, max: usize) -> Result<(), String> {
    let mut client = LaneClient::connect(None).map_err(|e| e.to_string())?;
    let mut lanes = Vec::new();
    for _ in 0..max {
        match client.open(quadrant, service, choice) {
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
        } => serve(
            &service,
            tcp_port,
            Misbehave {
                drop_after,
                slow_shm_us,
                slow_us,
                invert,
            },
        )
        .map_err(|e| e.to_string()),
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
        } => transport(&t).and_then(|c| hold(&quadrant, &service, c, max)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lane-echo: {e}");
            ExitCode::FAILURE
        }
    }
}
