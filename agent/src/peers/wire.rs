//! The link between two nodes' agents: TLS 1.3 with both node SVIDs, and on it length-prefixed
//! JSON messages (a 4-byte big-endian length, at most [`MAX_FRAME`] bytes). The linking agent
//! asks, the accepting one answers each request in order.
//!
//! Fields are added with defaults, and a reader passes over the fields it does not know, so the
//! agents of two neighbouring versions keep their links while a rolling upgrade runs (a
//! DaemonSet replaces one node's agent at a time).

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    time::Instant,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::lanes::control::Refusal;

/// The largest message either side sends or takes.
pub const MAX_FRAME: usize = 64 * 1024;

/// What the linking agent asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// Who it is, its quadrants' prefixes and its pods; repeated as the link's keep-alive.
    Hello {
        /// Its name (its node SVID's).
        node: String,
        /// Each quadrant's prefix on that node.
        prefixes: BTreeMap<String, Ipv4Net>,
        /// The pods `quadrant-cni` attached on that node, each as its quadrant.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pods: Vec<PodAddress>,
    },
    /// A lane for a workload on the asking node to a service of this one.
    Open(RemoteOpen),
}

/// A pod of the telling node: one of its addresses and its quadrant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodAddress {
    /// The pod's address.
    pub address: std::net::Ipv4Addr,
    /// `dx`, `dg`, `px` or `pg`.
    pub quadrant: String,
}

/// An instance of the telling node ready for one of its services with a VIP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceBackend {
    /// The service's name.
    pub service: String,
    /// The instance's address.
    pub address: std::net::Ipv4Addr,
    /// The service's port on it.
    pub port: u16,
    /// Its capacity weight.
    pub weight: u16,
}

/// A lane a workload on another node asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteOpen {
    /// The opener's quadrant.
    pub from_quadrant: String,
    /// The opener's SPIFFE ID (the asking agent attested it).
    pub from_id: String,
    /// The service's quadrant.
    pub quadrant: String,
    /// The service.
    pub service: String,
    /// Every message carries a request envelope.
    #[serde(default)]
    pub request_ids: bool,
    /// An instance of this node to pass over if another offers the service.
    #[serde(default)]
    pub avoid_instance: Option<u8>,
    /// Lanes with the same key go to the same instance.
    #[serde(default)]
    pub affinity_key: Option<String>,
}

/// What the accepting agent answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// Its own name, prefixes, pods and ready instances.
    Hello {
        /// Its name (its node SVID's).
        node: String,
        /// Each quadrant's prefix on that node.
        prefixes: BTreeMap<String, Ipv4Net>,
        /// The pods `quadrant-cni` attached on that node, each as its quadrant.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pods: Vec<PodAddress>,
        /// Its instances ready for each service with a VIP (the asking node balances its own
        /// VIP of a service of that name over them too).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        backends: Vec<ServiceBackend>,
    },
    /// The lane exists: its service has its end and waits for the opener's TCP connection.
    Granted(RemoteGrant),
    /// No lane, and why.
    Refused {
        /// The reason, as the broker gives it to a local opener.
        reason: Refusal,
        /// What happened.
        message: String,
        /// For a passing refusal, when to try again.
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
}

/// A lane the accepting node built for a remote opener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteGrant {
    /// The lane's id on the service's node.
    pub lane: u64,
    /// Where the opener connects: the instance's address and the service's port.
    pub address: String,
    /// The one-time token the service expects.
    pub token: String,
    /// The service's SPIFFE ID, which the opener requires of the server.
    pub server_id: String,
    /// The instance of the service's quadrant on that node.
    pub instance: u8,
    /// The largest message the service takes.
    pub max_message: u32,
}

/// Writes one message.
///
/// # Errors
/// If it does not serialize, is larger than [`MAX_FRAME`], or the write fails.
pub fn write<W: Write, T: Serialize>(out: &mut W, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("message of {} bytes; at most {MAX_FRAME}", body.len()),
        ));
    }
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    out.write_all(&frame)?;
    out.flush()
}

/// Reads messages from a stream whose reads time out, keeping a partial frame across timeouts.
#[derive(Debug, Default)]
pub struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// The next message; `Ok(None)` when `deadline` passed first (the partial frame is kept)
    /// or, with no deadline, when a read timed out. `UnexpectedEof` when the peer closed.
    ///
    /// # Errors
    /// On a read error, a frame over [`MAX_FRAME`] or a message that does not parse.
    pub fn next<R: Read, T: DeserializeOwned>(
        &mut self,
        input: &mut R,
        deadline: Option<Instant>,
    ) -> io::Result<Option<T>> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("peer message of {len} bytes; at most {MAX_FRAME}"),
                    ));
                }
                if self.buf.len() >= 4 + len {
                    let msg = serde_json::from_slice(&self.buf[4..4 + len]).map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("peer message: {e}"))
                    });
                    self.buf.drain(..4 + len);
                    return msg.map(Some);
                }
            }
            let mut chunk = [0u8; 8192];
            match input.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the link",
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if deadline.is_none_or(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_versions_fields_are_passed_over() {
        let reply: Reply = serde_json::from_str(
            r#"{"kind":"hello","node":"b","prefixes":{"px":"10.250.2.0/24"},
                "pods":[{"address":"10.243.0.5","quadrant":"px","labels":{}}],
                "backends":[{"service":"api","address":"10.250.2.2","port":80,"weight":1,"zone":"a"}],
                "later":1}"#,
        )
        .expect("a hello of a later version");
        let Reply::Hello { pods, backends, .. } = reply else {
            panic!("not a hello")
        };
        assert_eq!((pods.len(), backends.len()), (1, 1));
        let earlier: Reply =
            serde_json::from_str(r#"{"kind":"hello","node":"b","prefixes":{}}"#).expect("earlier");
        assert!(
            matches!(earlier, Reply::Hello { pods, backends, .. } if pods.is_empty() && backends.is_empty())
        );
    }

    /// A reader that hands out its bytes in pieces and times out between them.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
        stall: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.stall = !self.stall;
            if self.stall {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.step.min(out.len()).min(self.data.len() - self.at);
            out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn a_frame_split_by_timeouts_is_read_whole() {
        let hello = Request::Hello {
            node: "n1".into(),
            prefixes: BTreeMap::from([("px".into(), "10.1.2.0/24".parse().expect("net"))]),
            pods: vec![PodAddress {
                address: "10.243.0.5".parse().expect("ip"),
                quadrant: "px".into(),
            }],
        };
        let mut data = Vec::new();
        write(&mut data, &hello).expect("write");
        write(&mut data, &hello).expect("write");
        let mut input = Trickle {
            data,
            at: 0,
            step: 3,
            stall: false,
        };
        let mut frames = Frames::default();
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(m) = frames.next::<_, Request>(&mut input, None).expect("read") {
                got.push(m);
            }
        }
        assert_eq!(got, vec![hello.clone(), hello]);
        let end = loop {
            match frames.next::<_, Request>(&mut input, None) {
                Ok(None) => {}
                other => break other,
            }
        };
        assert!(
            matches!(end, Err(ref e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{end:?}"
        );
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        let mut data = u32::try_from(MAX_FRAME + 1)
            .expect("fits")
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(b"{}");
        let err = Frames::default()
            .next::<_, Request>(&mut data.as_slice(), None)
            .expect_err("too large");
        assert!(err.to_string().contains("at most 65536"), "{err}");
        let big = Request::Hello {
            node: "x".repeat(MAX_FRAME),
            prefixes: BTreeMap::new(),
            pods: Vec::new(),
        };
        assert!(write(&mut Vec::new(), &big).is_err());
    }
}
