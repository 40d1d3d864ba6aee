//! Request ids on a lane: with `request_ids` in its grant (the [`crate::Caller`]'s lanes) every
//! message starts with a 16-byte envelope, little-endian:
//!
//! ```text
//! 0    8         12         16
//! | id | attempt | reserved |  message
//! ```
//!
//! The caller chooses the id and counts the attempts; the service's end of the lane answers
//! each request under the id it came with. The library adds and strips the envelope, so the
//! application's messages are 16 bytes shorter than the lane's limit.
//!
//! A request whose instance went away is sent again — same id, next attempt — to another
//! instance, so a service can see it twice. Handlers must tolerate a repeat: instances share no
//! state, so exactly-once delivery is not offered; [`crate::Lane::request_id`] lets a handler
//! recognise a repeat it keeps track of.

use std::collections::VecDeque;

use super::lane::{LaneError, Side};

/// Bytes of the envelope in front of each message of a lane with request ids.
pub const ENVELOPE_LEN: usize = 16;

/// A request's identity on a lane with request ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// The caller's number for the request (unique per caller).
    pub id: u64,
    /// Sends of this request before this one (0: the first).
    pub attempt: u32,
}

impl RequestId {
    /// Writes the envelope into the first [`ENVELOPE_LEN`] bytes of `out`.
    pub(crate) fn encode(self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..12].copy_from_slice(&self.attempt.to_le_bytes());
        out[12..ENVELOPE_LEN].fill(0);
    }

    /// The envelope's bytes.
    pub(crate) fn bytes(self) -> [u8; ENVELOPE_LEN] {
        let mut b = [0; ENVELOPE_LEN];
        self.encode(&mut b);
        b
    }

    /// Reads the envelope at the start of `message` (from the peer: checked).
    pub(crate) fn decode(message: &[u8]) -> Result<Self, LaneError> {
        let Some(b) = message.get(..ENVELOPE_LEN) else {
            return Err(LaneError::Protocol(format!(
                "a message of {} bytes on a lane with request ids, which carries a \
                 {ENVELOPE_LEN}-byte envelope in front of each",
                message.len()
            )));
        };
        if b[12..] != [0; 4] {
            return Err(LaneError::Protocol(
                "the request envelope's reserved bytes are not zero".into(),
            ));
        }
        let mut id = [0; 8];
        id.copy_from_slice(&b[..8]);
        let mut attempt = [0; 4];
        attempt.copy_from_slice(&b[8..12]);
        Ok(Self {
            id: u64::from_le_bytes(id),
            attempt: u32::from_le_bytes(attempt),
        })
    }
}

/// The requests one end of a lane with request ids has not seen answered.
#[derive(Debug)]
pub(crate) struct Ids {
    side: Side,
    /// Client: sent, not answered. Service: received, not answered. Oldest first.
    pending: VecDeque<RequestId>,
    /// The id the client's next plain `send` takes.
    next: u64,
    /// Most requests a service holds unanswered (the grant's `max_in_flight`).
    limit: usize,
}

impl Ids {
    pub(crate) fn new(side: Side, max_in_flight: u32) -> Self {
        Self {
            side,
            pending: VecDeque::new(),
            next: 0,
            limit: usize::try_from(max_in_flight.max(1)).unwrap_or(usize::MAX),
        }
    }

    /// The envelope of the next plain `send`: a new request (client), or the answer to the
    /// oldest request waiting for one (service).
    pub(crate) fn outgoing(&self) -> Result<RequestId, LaneError> {
        match self.side {
            Side::Client => Ok(RequestId {
                id: self.next,
                attempt: 0,
            }),
            Side::Server => self.oldest().ok_or_else(|| {
                LaneError::Protocol(
                    "on a lane with request ids each message of the service answers a request, \
                     and no request is waiting for an answer"
                        .into(),
                )
            }),
        }
    }

    /// The oldest request not yet answered.
    pub(crate) fn oldest(&self) -> Option<RequestId> {
        self.pending.front().copied()
    }

    /// Books a message sent under `env`.
    pub(crate) fn sent(&mut self, env: RequestId) {
        match self.side {
            Side::Client => {
                self.pending.push_back(env);
                self.next = self.next.max(env.id.wrapping_add(1));
            }
            Side::Server => {
                if let Some(i) = self.pending.iter().position(|p| *p == env) {
                    self.pending.remove(i);
                }
            }
        }
    }

    /// Books a message received under `env`.
    pub(crate) fn received(&mut self, env: RequestId) -> Result<(), LaneError> {
        match self.side {
            Side::Server => {
                if self.pending.len() >= self.limit {
                    return Err(LaneError::Protocol(format!(
                        "the client sent more than {} requests without waiting for their \
                         answers (the lane's max_in_flight)",
                        self.limit
                    )));
                }
                self.pending.push_back(env);
            }
            Side::Client => {
                let Some(i) = self.pending.iter().position(|p| p.id == env.id) else {
                    return Err(LaneError::Protocol(format!(
                        "an answer to request {}, which is not waiting for one",
                        env.id
                    )));
                };
                self.pending.remove(i);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_survives_its_wire_form_and_bad_ones_are_named() {
        let id = RequestId {
            id: 0x0102_0304_0506_0708,
            attempt: 3,
        };
        let mut msg = id.bytes().to_vec();
        msg.extend_from_slice(b"hello");
        assert_eq!(RequestId::decode(&msg).unwrap(), id);
        assert_eq!(msg[0], 0x08, "little-endian");
        let short = RequestId::decode(&msg[..15]).unwrap_err().to_string();
        assert!(
            short.contains("15 bytes") && short.contains("16-byte"),
            "{short}"
        );
        msg[14] = 1;
        let reserved = RequestId::decode(&msg).unwrap_err().to_string();
        assert!(reserved.contains("reserved"), "{reserved}");
    }

    #[test]
    fn a_service_answers_what_it_received_within_its_limit() {
        let mut ids = Ids::new(Side::Server, 2);
        assert!(ids.outgoing().is_err(), "nothing to answer yet");
        let (a, b, c) = (
            RequestId { id: 7, attempt: 0 },
            RequestId { id: 8, attempt: 1 },
            RequestId { id: 9, attempt: 0 },
        );
        ids.received(a).unwrap();
        ids.received(b).unwrap();
        let over = ids.received(c).unwrap_err().to_string();
        assert!(over.contains("more than 2"), "{over}");
        assert_eq!(ids.outgoing().unwrap(), a, "oldest first");
        ids.sent(a);
        assert_eq!(ids.outgoing().unwrap(), b);
    }

    #[test]
    fn a_client_takes_only_answers_to_what_it_sent() {
        let mut ids = Ids::new(Side::Client, 4);
        let first = ids.outgoing().unwrap();
        ids.sent(first);
        ids.sent(RequestId { id: 41, attempt: 2 });
        assert_eq!(ids.outgoing().unwrap().id, 42, "after the highest sent");
        ids.received(RequestId { id: 41, attempt: 2 }).unwrap();
        let stray = ids.received(RequestId { id: 41, attempt: 2 }).unwrap_err();
        assert!(stray.to_string().contains("request 41"), "{stray}");
        ids.received(first).unwrap();
    }
}
