//! A caller whose requests outlive the instance that serves them. [`Caller`] numbers every
//! request and sends it over a lane with request ids ([`crate::envelope`]); when the lane's
//! instance goes away — the peer hangs up (`PeerGone`), the connection resets, the service
//! closes the lane, or the oldest request gets no answer within the per-try timeout (a hung
//! instance) — it opens a new lane through the broker (which hands it to another instance of the
//! service) and sends every unanswered request again, under the same id and the next attempt,
//! until each is answered, has been sent `max_attempts` times, or reaches its deadline. Opens the
//! broker refuses for a passing reason (no instance offers the service yet, busy, an open
//! breaker, a limit) are retried after a jittered, doubling pause; the others (policy, plan)
//! end the requests at once.
//!
//! Every request ends in exactly one of: an answer, [`CallError::NotSent`] (no service saw
//! it) or [`CallError::Indeterminate`] (sent, not answered: a service may have handled it).
//! A request can be handled twice — once by the instance that died before answering, once by
//! the one that took over — so handlers must tolerate a repeat (see [`crate::envelope`]).

use std::{
    collections::VecDeque,
    path::Path,
    time::{Duration, Instant},
};

use super::{
    client::LaneClient,
    control::{Refusal, TransportChoice},
    envelope::RequestId,
    lane::{Lane, LaneError},
};

/// How a [`Caller`] retries.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Sends of one request at most, the first included.
    pub max_attempts: u32,
    /// How long the oldest unanswered request waits for its answer before its instance counts
    /// as hung and the requests go to another one.
    pub per_try_timeout: Duration,
    /// The first pause after an open that failed for a passing reason; it doubles per failure
    /// up to `max_backoff`, and each pause is drawn between half and all of it.
    pub backoff: Duration,
    /// The longest pause.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            per_try_timeout: Duration::from_secs(1),
            backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(100),
        }
    }
}

/// What became of a request that got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No service saw the request: every lane for it was refused (the error says why) or its
    /// deadline passed before it could be sent. Safe to send again.
    #[error("request {id} was not sent: {error}")]
    NotSent {
        /// The request.
        id: u64,
        /// Why.
        error: LaneError,
    },
    /// Sent `attempts` times and not answered: a service may have handled it.
    #[error("request {id} got no answer after {attempts} sends: {why}")]
    Indeterminate {
        /// The request.
        id: u64,
        /// Sends made.
        attempts: u32,
        /// What happened last.
        why: String,
    },
    /// Not accepted: larger than the lane carries.
    #[error("request refused: {0}")]
    Rejected(LaneError),
    /// Not accepted: `max` requests are unanswered already (the lane's `max_in_flight`).
    #[error("request refused: {max} requests are unanswered already (the lane's max_in_flight)")]
    WindowFull {
        /// The limit.
        max: usize,
    },
}

/// An answered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The request.
    pub id: u64,
    /// Sends it took (1: the first).
    pub attempts: u32,
}

/// What a [`Caller`] did to keep its requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerStats {
    /// Lanes opened.
    pub opens: u64,
    /// Lanes given up (their instance went away or hung).
    pub failovers: u64,
    /// Requests sent again.
    pub resent: u64,
}

#[derive(Debug)]
struct Unanswered {
    id: u64,
    msg: Vec<u8>,
    deadline: Instant,
    /// Sends so far.
    sends: u32,
    /// Sent on the current lane.
    on_lane: bool,
    sent_at: Instant,
}

/// A client of one service that keeps its requests through the loss of an instance.
#[derive(Debug)]
pub struct Caller {
    client: LaneClient,
    quadrant: String,
    service: String,
    transport: TransportChoice,
    policy: RetryPolicy,
    lane: Option<Lane>,
    window: usize,
    max_message: usize,
    next_id: u64,
    unanswered: VecDeque<Unanswered>,
    ended: VecDeque<CallError>,
    stats: CallerStats,
    rng: u64,
    /// The instance the last lane given up was on: the next open passes it over.
    avoid: Option<u8>,
    /// The affinity key every open carries.
    key: Option<String>,
}

impl Caller {
    /// Connects to the broker (at `path`, or `$QUADRANT_LANE_SOCKET`) and opens the first lane
    /// to `service` in `quadrant`; its refusal is returned as it is.
    pub fn open(
        path: Option<&Path>,
        (quadrant, service): (&str, &str),
        transport: TransportChoice,
        policy: RetryPolicy,
    ) -> Result<Self, LaneError> {
        Self::open_keyed(path, (quadrant, service), transport, policy, None)
    }

    /// [`Self::open`] with an affinity key: every lane of this caller goes to the instance the
    /// key maps to while it takes lanes (a fail-over to the key's next instance).
    pub fn open_keyed(
        path: Option<&Path>,
        (quadrant, service): (&str, &str),
        transport: TransportChoice,
        policy: RetryPolicy,
        key: Option<&str>,
    ) -> Result<Self, LaneError> {
        let mut client = LaneClient::connect(path)?;
        let lane = client.open_with_ids((quadrant, service), transport, (None, key))?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            ^ u64::from(std::process::id()).rotate_left(32);
        Ok(Self {
            client,
            quadrant: quadrant.to_owned(),
            service: service.to_owned(),
            transport,
            policy: RetryPolicy {
                max_attempts: policy.max_attempts.max(1),
                ..policy
            },
            window: usize::try_from(lane.max_in_flight().max(1)).unwrap_or(usize::MAX),
            max_message: lane.max_message(),
            lane: Some(lane),
            next_id: 0,
            unanswered: VecDeque::new(),
            ended: VecDeque::new(),
            stats: CallerStats {
                opens: 1,
                ..CallerStats::default()
            },
            rng: seed | 1,
            avoid: None,
            key: key.map(ToOwned::to_owned),
        })
    }

    /// What it did so far.
    #[must_use]
    pub fn stats(&self) -> CallerStats {
        self.stats
    }

    /// The lane requests go over now (`None` between an instance's loss and the next open).
    #[must_use]
    pub fn lane(&self) -> Option<&Lane> {
        self.lane.as_ref()
    }

    /// Requests sent and not yet answered or ended.
    #[must_use]
    pub fn outstanding(&self) -> usize {
        self.unanswered.len() + self.ended.len()
    }

    /// Sends `msg` as a new request that must be answered by `deadline`; returns its id. Its
    /// outcome comes from [`Self::next`].
    pub fn submit(&mut self, msg: &[u8], deadline: Instant) -> Result<u64, CallError> {
        if msg.len() > self.max_message {
            return Err(CallError::Rejected(LaneError::TooLarge {
                len: msg.len(),
                max: self.max_message,
            }));
        }
        if self.unanswered.len() >= self.window {
            return Err(CallError::WindowFull { max: self.window });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.unanswered.push_back(Unanswered {
            id,
            msg: msg.to_vec(),
            deadline,
            sends: 0,
            on_lane: false,
            sent_at: Instant::now(),
        });
        self.deliver();
        Ok(id)
    }

    /// The next outcome: an answer (in `out`) or the end of a request that got none. `None`
    /// when nothing is outstanding.
    pub fn next(&mut self, out: &mut Vec<u8>) -> Option<Result<Answer, CallError>> {
        loop {
            if let Some(e) = self.ended.pop_front() {
                return Some(Err(e));
            }
            let oldest = self.unanswered.front()?;
            let now = Instant::now();
            if oldest.deadline <= now {
                let u = self.unanswered.pop_front()?;
                self.ended.push_back(expired(&u));
                continue;
            }
            self.deliver();
            let Some(oldest) = self.unanswered.front() else {
                continue;
            };
            if !oldest.on_lane {
                // Not sent (no lane could be opened yet): wait for the next try.
                continue;
            }
            let per_try_end = oldest.sent_at + self.policy.per_try_timeout;
            let until = oldest.deadline.min(per_try_end);
            let Some(lane) = self.lane.as_mut() else {
                continue;
            };
            match lane.recv_answer(out, until) {
                Ok(Some(env)) => {
                    let Some(i) = self.unanswered.iter().position(|u| u.id == env.id) else {
                        // An answer to a request that ended meanwhile (its deadline passed).
                        continue;
                    };
                    let u = self.unanswered.remove(i)?;
                    let rtt = u.sent_at.elapsed();
                    lane.record_sli(true, rtt);
                    lane.record_rtt(rtt);
                    return Some(Ok(Answer {
                        id: u.id,
                        attempts: u.sends,
                    }));
                }
                Ok(None) => self.fail_over("the service closed the lane"),
                Err(LaneError::TimedOut(_)) if Instant::now() < per_try_end => {
                    // The request's own deadline: ended at the top of the loop. A stream lane
                    // that timed out is closed and is replaced at the next delivery.
                    if self.lane.as_ref().is_some_and(Lane::is_closed) {
                        self.fail_over("the lane timed out");
                    }
                }
                Err(LaneError::TimedOut(_)) => self.fail_over(&format!(
                    "no answer within the per-try timeout of {:?}",
                    self.policy.per_try_timeout
                )),
                Err(e) => self.fail_over(&e.to_string()),
            }
        }
    }

    /// Sends `msg` and waits for its answer (into `out`) until `deadline`; for callers that
    /// do not pipeline (nothing else may be outstanding).
    pub fn call(
        &mut self,
        msg: &[u8],
        out: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<Answer, CallError> {
        let outstanding = self.outstanding();
        if outstanding > 0 {
            return Err(CallError::Rejected(LaneError::Protocol(format!(
                "call waits for its own answer, and {outstanding} requests are outstanding \
                 (take their outcomes with next)"
            ))));
        }
        let id = self.submit(msg, deadline)?;
        self.next(out).unwrap_or_else(|| {
            Err(CallError::Indeterminate {
                id,
                attempts: 0,
                why: "the request vanished".into(),
            })
        })
    }

    /// Gives the current lane up: its unanswered requests are sent again on the next lane,
    /// or end if they were sent `max_attempts` times.
    fn fail_over(&mut self, why: &str) {
        self.stats.failovers += 1;
        if let Some(lane) = self.lane.take() {
            self.avoid = Some(lane.instance());
            for u in self.unanswered.iter().filter(|u| u.on_lane) {
                lane.record_sli(false, u.sent_at.elapsed());
            }
        }
        let max = self.policy.max_attempts;
        let mut kept = VecDeque::with_capacity(self.unanswered.len());
        for mut u in self.unanswered.drain(..) {
            if u.on_lane && u.sends >= max {
                self.ended.push_back(CallError::Indeterminate {
                    id: u.id,
                    attempts: u.sends,
                    why: why.to_owned(),
                });
            } else {
                u.on_lane = false;
                kept.push_back(u);
            }
        }
        self.unanswered = kept;
    }

    /// Sends what is not on the current lane, opening one first if there is none.
    fn deliver(&mut self) {
        while self.unanswered.iter().any(|u| !u.on_lane) {
            if self.lane.is_none() && !self.reopen() {
                return;
            }
            let Some(lane) = self.lane.as_mut() else {
                return;
            };
            let mut failed = None;
            for u in self.unanswered.iter_mut().filter(|u| !u.on_lane) {
                let env = RequestId {
                    id: u.id,
                    attempt: u.sends,
                };
                // A send that fails may still have reached the service: it counts.
                u.sends += 1;
                if u.sends > 1 {
                    self.stats.resent += 1;
                }
                u.on_lane = true;
                u.sent_at = Instant::now();
                if let Err(e) = lane.send_as(Some(env), &u.msg) {
                    failed = Some(e.to_string());
                    break;
                }
            }
            if let Some(why) = failed {
                self.fail_over(&why);
            }
        }
    }

    /// Opens a new lane, pausing and trying again while the broker refuses for a passing
    /// reason and the oldest waiting request's deadline allows. `false` if there is none (the
    /// requests that cannot wait have ended).
    fn reopen(&mut self) -> bool {
        let mut pause = self.policy.backoff;
        loop {
            let Some(deadline) = self
                .unanswered
                .iter()
                .filter(|u| !u.on_lane)
                .map(|u| u.deadline)
                .min()
            else {
                return false;
            };
            let error = match self.client.open_with_ids(
                (&self.quadrant, &self.service),
                self.transport,
                (self.avoid, self.key.as_deref()),
            ) {
                Ok(lane) => {
                    self.stats.opens += 1;
                    self.window =
                        usize::try_from(lane.max_in_flight().max(1)).unwrap_or(usize::MAX);
                    self.max_message = lane.max_message();
                    self.lane = Some(lane);
                    return true;
                }
                Err(e) => e,
            };
            if !passing(&error) {
                self.end_waiting(|u| {
                    Some(if u.sends == 0 {
                        CallError::NotSent {
                            id: u.id,
                            error: LaneError::Broker(error.to_string()),
                        }
                    } else {
                        CallError::Indeterminate {
                            id: u.id,
                            attempts: u.sends,
                            why: error.to_string(),
                        }
                    })
                });
                return false;
            }
            let wait = match &error {
                LaneError::Refused {
                    retry_after_ms: Some(ms),
                    ..
                } => Duration::from_millis(*ms).max(self.jitter(pause)),
                _ => self.jitter(pause),
            };
            let now = Instant::now();
            if now + wait >= deadline {
                // The first deadline comes before the next try: what reaches it ends.
                std::thread::sleep(deadline.saturating_duration_since(now));
                let now = Instant::now();
                self.end_waiting(|u| (u.deadline <= now).then(|| expired(u)));
            } else {
                std::thread::sleep(wait);
            }
            pause = (pause * 2).min(self.policy.max_backoff);
        }
    }

    /// Ends the requests not on a lane that `end` gives an end to.
    fn end_waiting(&mut self, end: impl Fn(&Unanswered) -> Option<CallError>) {
        let mut kept = VecDeque::with_capacity(self.unanswered.len());
        for u in self.unanswered.drain(..) {
            match (u.on_lane, end(&u)) {
                (false, Some(e)) => self.ended.push_back(e),
                _ => kept.push_back(u),
            }
        }
        self.unanswered = kept;
    }

    /// A pause between half and all of `pause` (xorshift: the spread matters, not secrecy).
    fn jitter(&mut self, pause: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = pause / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(self.rng % nanos)
    }
}

/// The end of a request whose deadline passed.
fn expired(u: &Unanswered) -> CallError {
    if u.sends == 0 {
        CallError::NotSent {
            id: u.id,
            error: LaneError::TimedOut(Duration::ZERO),
        }
    } else {
        CallError::Indeterminate {
            id: u.id,
            attempts: u.sends,
            why: "its deadline passed".into(),
        }
    }
}

/// Whether an open that failed with `e` may succeed if made again shortly: the broker or the
/// instance going away, or a refusal for a passing reason. Policy, plan, attestation and
/// malformed requests do not pass.
fn passing(e: &LaneError) -> bool {
    match e {
        LaneError::Refused {
            reason: Some(r), ..
        } => matches!(
            r,
            Refusal::NoService
                | Refusal::Busy
                | Refusal::Io
                | Refusal::MaxLanes
                | Refusal::MaxShmBytes
                | Refusal::BreakerOpen
        ),
        LaneError::TooLarge { .. } => false,
        // Also a refusal without a reason: a TCP service that does not know the lane (it
        // restarted meanwhile).
        _ => true,
    }
}
