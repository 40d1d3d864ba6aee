//! Threads kept for the next lane. A service that serves each lane on a thread of its own
//! (every lane blocks in `recv` for as long as it lives) would start and end a thread per
//! lane; [`Workers`] hands a new lane to a thread whose lane has ended, and starts a thread
//! only when every kept one is busy, so lanes never wait for each other. A thread left without
//! work for `keep` ends.
//!
//! Why: starting and ending a thread per lane (`clone`, a stack mapped and unmapped) is work
//! the service does on every open, beside the opener and the broker. On a two-CPU machine it
//! was measured as the larger part of the lane-open tail (`BENCHMARKS.md`, lanes).

use std::{
    collections::VecDeque,
    io,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread,
    time::Duration,
};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A set of threads that run jobs (typically: serve one lane until it ends), kept for the next
/// job while idle.
#[derive(Clone)]
pub struct Workers {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    keep: Duration,
    name: String,
}

#[derive(Default)]
struct State {
    /// Jobs handed to idle threads and not yet taken (never more than `idle`).
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads alive.
    threads: usize,
}

impl Workers {
    /// Threads named `name` that wait `keep` for a next job before they end.
    #[must_use]
    pub fn new(name: &str, keep: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                keep,
                name: name.to_owned(),
            }),
        }
    }

    /// Runs `job` on an idle thread, or on a new one if every thread is busy. A job that
    /// panics ends itself only; its thread goes on to the next job.
    ///
    /// # Errors
    ///
    /// The thread could not be started (the job is not run).
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut state = self.shared.lock();
        if state.idle > state.jobs.len() {
            state.jobs.push_back(Box::new(job));
            drop(state);
            self.shared.work.notify_one();
            return Ok(());
        }
        state.threads += 1;
        drop(state);
        let shared = Arc::clone(&self.shared);
        let first: Job = Box::new(job);
        thread::Builder::new()
            .name(self.shared.name.clone())
            .spawn(move || shared.serve(first))
            .map(drop)
            .inspect_err(|_| self.shared.lock().threads -= 1)
    }

    /// Threads alive (busy or idle).
    #[must_use]
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }

    /// Threads waiting for a job.
    #[must_use]
    pub fn idle(&self) -> usize {
        let state = self.shared.lock();
        state.idle - state.jobs.len()
    }
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Workers")
            .field("name", &self.shared.name)
            .field("threads", &state.threads)
            .field("idle", &(state.idle - state.jobs.len()))
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A thread's life: its first job, then each job handed to it, until it waits `keep` in
    /// vain.
    fn serve(&self, first: Job) {
        let mut job = first;
        loop {
            // A panic is the job's own; the payload was already reported by the panic hook.
            let _ = catch_unwind(AssertUnwindSafe(job));
            let mut state = self.lock();
            state.idle += 1;
            job = loop {
                if let Some(next) = state.jobs.pop_front() {
                    state.idle -= 1;
                    break next;
                }
                let (s, waited) = self
                    .work
                    .wait_timeout(state, self.keep)
                    .unwrap_or_else(PoisonError::into_inner);
                state = s;
                if waited.timed_out() && state.jobs.is_empty() {
                    state.idle -= 1;
                    state.threads -= 1;
                    return;
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::mpsc,
        time::{Duration, Instant},
    };

    use super::*;

    /// Waits until `check` holds, at most 5 s.
    fn eventually(what: &str, check: impl Fn() -> bool) {
        let start = Instant::now();
        while !check() {
            assert!(start.elapsed() < Duration::from_secs(5), "never: {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_thread_whose_job_ended_takes_the_next_one() {
        let workers = Workers::new("test-worker", Duration::from_secs(10));
        let (tx, rx) = mpsc::channel();
        for _ in 0..3 {
            let tx = tx.clone();
            workers
                .spawn(move || tx.send(thread::current().id()).unwrap())
                .unwrap();
            let _ = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            eventually("the thread is idle again", || workers.idle() == 1);
        }
        assert_eq!(workers.threads(), 1, "one thread served all three jobs");
    }

    #[test]
    fn a_busy_thread_holds_up_no_other_job() {
        let workers = Workers::new("test-worker", Duration::from_secs(10));
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        // The first job blocks until released, as a lane does until it ends.
        workers
            .spawn(move || {
                let _ = release_rx.recv();
            })
            .unwrap();
        workers.spawn(move || done_tx.send(()).unwrap()).unwrap();
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the second job ran while the first still blocked");
        assert_eq!(workers.threads(), 2);
        release_tx.send(()).unwrap();
        eventually("both threads idle", || workers.idle() == 2);
    }

    #[test]
    fn an_idle_thread_ends_after_its_keep() {
        let workers = Workers::new("test-worker", Duration::from_millis(20));
        workers.spawn(|| {}).unwrap();
        eventually("the idle thread ended", || workers.threads() == 0);
        // And a job after that starts a thread again.
        let (tx, rx) = mpsc::channel();
        workers.spawn(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn a_panicking_job_leaves_its_thread_serving() {
        let workers = Workers::new("test-worker", Duration::from_secs(10));
        workers.spawn(|| panic!("a job's own failure")).unwrap();
        eventually("the thread is idle after the panic", || workers.idle() == 1);
        let (tx, rx) = mpsc::channel();
        workers.spawn(move || tx.send(()).unwrap()).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(workers.threads(), 1);
    }
}
