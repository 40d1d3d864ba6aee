//! Draining the ring buffers the programs write fixed-size records into (the verdict trace, the
//! breakers' transitions).

use std::future::Future;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracing::warn;

/// One record of type `T` from a ring buffer item (`None` if the item is shorter).
#[must_use]
pub fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `T` is plain old data (any bit pattern is valid) of at most this many bytes; an
    // unaligned read of them.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// Until `stop` fires, hands each batch of records read from `ring` to `each` and awaits it
/// before reading on. `what` names the ring in the warning when it cannot be watched.
pub async fn drain<T, F>(
    ring: RingBuf<MapData>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    what: &str,
    mut each: impl FnMut(Vec<T>) -> F,
) where
    T: aya::Pod,
    F: Future<Output = ()>,
{
    // SAFETY: the ring buffer owns its map descriptor for as long as it lives, and always
    // returns that same descriptor.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot watch {what}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            guard = fd.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                let mut batch = Vec::new();
                {
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        batch.extend(read::<T>(&item));
                    }
                }
                guard.clear_ready();
                if !batch.is_empty() {
                    each(batch).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use dataplane_common::breaker::{BreakerEvent, BreakerKey};

    use super::*;

    #[test]
    fn records_are_read_unaligned_and_short_items_are_skipped() {
        let e = BreakerEvent {
            at_ns: 7,
            key: BreakerKey {
                daddr: 1,
                dport: 2,
                proto: 6,
                caller: 3,
            },
            failures: 4,
            ejection_ms: 5,
            from: 0,
            to: 1,
            cause: 2,
            pad: [0; 5],
        };
        let mut bytes = vec![0u8; 1];
        // SAFETY: BreakerEvent is 32 bytes of plain integers.
        bytes.extend_from_slice(&unsafe { std::mem::transmute::<BreakerEvent, [u8; 32]>(e) });
        assert_eq!(read::<BreakerEvent>(&bytes[1..]), Some(e));
        assert_eq!(read::<BreakerEvent>(&bytes[1..32]), None);
    }
}
