//! The frame header every lane transport uses: 8 bytes, little-endian, in front of each message.
//!
//! ```text
//! 0      4      5        6          8
//! | len  | kind | version | reserved |  payload (len bytes)
//! ```
//!
//! A header comes from the peer, so it is never trusted: the decoder checks the version, the kind,
//! that the reserved bytes are zero and that the length is within the lane's limit before anyone
//! acts on it.

/// Size of a frame header.
pub const HEADER_LEN: usize = 8;
/// The header version this code writes and accepts.
pub const VERSION: u8 = 1;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An application message.
    Data = 1,
    /// The sender closes the lane; nothing follows.
    Close = 2,
    /// First frame of a TCP lane: lane id and token (see `tls`).
    Hello = 3,
    /// The server accepted the `Hello`.
    Accept = 4,
    /// The server refused the `Hello`; the payload says why.
    Refuse = 5,
    /// Ring padding up to the end of the ring (shared-memory lanes only).
    Pad = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::Close,
            3 => Self::Hello,
            4 => Self::Accept,
            5 => Self::Refuse,
            6 => Self::Pad,
            _ => return None,
        })
    }
}

/// A decoded, validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Payload length in bytes.
    pub len: u32,
    /// What the frame carries.
    pub kind: Kind,
}

/// Why a header was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("truncated frame header: {0} of 8 bytes")]
    Truncated(usize),
    /// Unknown header version.
    #[error("frame header version {0} is not supported (expected {VERSION})")]
    Version(u8),
    /// Unknown kind.
    #[error("frame kind {0} is unknown")]
    Kind(u8),
    /// Reserved bytes are not zero.
    #[error("frame header reserved bytes are not zero")]
    Reserved,
    /// Longer than the lane allows.
    #[error("frame of {len} bytes exceeds the lane's limit of {max} bytes")]
    TooLong {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
}

impl Header {
    /// A data header for `len` payload bytes.
    #[must_use]
    pub fn data(len: u32) -> Self {
        Self {
            len,
            kind: Kind::Data,
        }
    }

    /// The wire form.
    #[must_use]
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&self.len.to_le_bytes());
        b[4] = self.kind as u8;
        b[5] = VERSION;
        b
    }

    /// Decodes and validates the first [`HEADER_LEN`] bytes of `bytes`; payloads longer than
    /// `max_len` are refused.
    pub fn decode(bytes: &[u8], max_len: u32) -> Result<Self, FrameError> {
        let Some(b) = bytes.get(..HEADER_LEN) else {
            return Err(FrameError::Truncated(bytes.len()));
        };
        if b[5] != VERSION {
            return Err(FrameError::Version(b[5]));
        }
        let kind = Kind::from_u8(b[4]).ok_or(FrameError::Kind(b[4]))?;
        if b[6] != 0 || b[7] != 0 {
            return Err(FrameError::Reserved);
        }
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if len > max_len {
            return Err(FrameError::TooLong { len, max: max_len });
        }
        Ok(Self { len, kind })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn each_malformed_header_names_its_problem() {
        let good = Header::data(5).encode();
        assert_eq!(Header::decode(&good, 16), Ok(Header::data(5)));
        assert_eq!(
            Header::decode(&good[..3], 16),
            Err(FrameError::Truncated(3))
        );
        let mut v = good;
        v[5] = 2;
        assert_eq!(Header::decode(&v, 16), Err(FrameError::Version(2)));
        let mut k = good;
        k[4] = 0;
        assert_eq!(Header::decode(&k, 16), Err(FrameError::Kind(0)));
        let mut r = good;
        r[7] = 1;
        assert_eq!(Header::decode(&r, 16), Err(FrameError::Reserved));
        assert_eq!(
            Header::decode(&good, 4),
            Err(FrameError::TooLong { len: 5, max: 4 })
        );
    }

    proptest! {
        #[test]
        fn round_trip(len in 0u32..=1 << 20, kind in 1u8..=6) {
            let h = Header { len, kind: Kind::from_u8(kind).unwrap() };
            prop_assert_eq!(Header::decode(&h.encode(), 1 << 20), Ok(h));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_accepted_ones_re_encode(bytes in proptest::collection::vec(any::<u8>(), 0..16), max in any::<u32>()) {
            if let Ok(h) = Header::decode(&bytes, max) {
                prop_assert!(h.len <= max);
                prop_assert_eq!(&h.encode()[..], &bytes[..HEADER_LEN]);
            }
        }
    }
}
