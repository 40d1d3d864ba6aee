//! Mirroring to a shadow generation: when the broker's grant says a service has one, the client
//! side of a lane copies a share of its requests to it, as a proxy mirrors traffic. The copies
//! go to a thread of their own over a lane of their own (opened at the first copy, asked for
//! with `mirror: true`); the caller never waits for the shadow and never sees its replies. A
//! full queue drops the copy; a shadow that goes away ends the mirroring.

use std::{
    path::PathBuf,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
};

use crate::client::LaneClient;

/// Copies waiting for the shadow at most; more are dropped.
const QUEUE: usize = 64;

const MILLION: u64 = 1_000_000;

/// Where the mirror lane goes.
#[derive(Debug)]
struct Target {
    broker: PathBuf,
    quadrant: String,
    service: String,
}

/// The mirroring state of one lane's client side.
#[derive(Debug)]
pub(crate) struct Mirror {
    fraction_ppm: u64,
    /// Parts per million owed: each request adds the fraction, each copy takes a million, so
    /// exactly the fraction of requests is copied, evenly spread.
    credit: u64,
    target: Option<Target>,
    copies: Option<SyncSender<Vec<u8>>>,
    dropped: u64,
}

impl Mirror {
    pub(crate) fn new(fraction_ppm: u32, broker: PathBuf, quadrant: &str, service: &str) -> Self {
        Self {
            fraction_ppm: u64::from(fraction_ppm).min(MILLION),
            credit: 0,
            target: Some(Target {
                broker,
                quadrant: quadrant.to_owned(),
                service: service.to_owned(),
            }),
            copies: None,
            dropped: 0,
        }
    }

    /// Copies dropped because the shadow was behind.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether this request is one to copy.
    fn due(&mut self) -> bool {
        self.credit += self.fraction_ppm;
        if self.credit < MILLION {
            return false;
        }
        self.credit -= MILLION;
        true
    }

    /// Hands a copy of `request` to the mirror thread when its share is due; never waits.
    pub(crate) fn offer(&mut self, request: &[u8]) {
        if !self.due() {
            return;
        }
        if self.copies.is_none() {
            let Some(target) = self.target.take() else {
                return;
            };
            let (tx, rx) = sync_channel(QUEUE);
            if std::thread::Builder::new()
                .name("lane-mirror".into())
                .spawn(move || run(&target, &rx))
                .is_err()
            {
                return;
            }
            self.copies = Some(tx);
        }
        let Some(copies) = &self.copies else { return };
        match copies.try_send(request.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped += 1,
            // The shadow went away (or refused the mirror lane): mirroring ends.
            Err(TrySendError::Disconnected(_)) => self.copies = None,
        }
    }
}

/// The mirror thread: one lane to the shadow, a round trip per copy, replies dropped; ends
/// when the client's lane is gone (the queue closes) or the shadow is.
fn run(target: &Target, copies: &Receiver<Vec<u8>>) {
    let Ok(mut client) = LaneClient::connect(Some(&target.broker)) else {
        return;
    };
    let Ok(mut lane) = client.open_mirror(&target.quadrant, &target.service) else {
        return;
    };
    let mut reply = Vec::new();
    while let Ok(copy) = copies.recv() {
        if lane.request(&copy, &mut reply).is_err() {
            return;
        }
    }
    let _ = lane.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_fraction_is_copied_evenly() {
        let mut m = Mirror::new(250_000, PathBuf::new(), "dg", "echo");
        let picks: Vec<bool> = (0..8).map(|_| m.due()).collect();
        assert_eq!(
            picks,
            [false, false, false, true, false, false, false, true]
        );
        let mut m = Mirror::new(100_000, PathBuf::new(), "dg", "echo");
        assert_eq!((0..1000).filter(|_| m.due()).count(), 100);
        let mut all = Mirror::new(1_000_000, PathBuf::new(), "dg", "echo");
        assert!((0..10).all(|_| all.due()));
    }
}
