//! Weighted Maglev tables (Eisenbud et al., NSDI 2016) for services with affinity: every entry
//! of a [`MAGLEV_SIZE`]-entry table names a backend, each backend fills entries in the order of
//! its own permutation (offset and skip from two hashes of its name), taking turns in proportion
//! to its weight. A backend that comes or goes moves few entries of the others.

use dataplane_common::lb::MAGLEV_SIZE;

/// A backend taking part in a table: its slot (the instance index) and weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// What the table's entries hold for it (the instance index).
    pub slot: u8,
    /// A stable name (the instance's, `px-2`): the permutation depends only on it.
    pub name: String,
    /// Capacity weight (above 0).
    pub weight: u16,
}

/// FNV-1a over `bytes` from `seed`: two independent seeds give Maglev's offset and skip.
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The table for `members` (empty: no members).
#[must_use]
pub fn table(members: &[Member]) -> Vec<u8> {
    let m = u64::from(MAGLEV_SIZE);
    let Some(max) = members.iter().map(|b| b.weight).max().filter(|&w| w > 0) else {
        return Vec::new();
    };
    let perms: Vec<(u64, u64)> = members
        .iter()
        .map(|b| {
            let offset = fnv(0xcbf2_9ce4_8422_2325, b.name.as_bytes()) % m;
            let skip = fnv(0x8422_2325_cbf2_9ce4, b.name.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; members.len()];
    let mut credit = vec![0u32; members.len()];
    let mut entries: Vec<Option<u8>> = vec![None; MAGLEV_SIZE as usize];
    let mut filled = 0;
    while filled < entries.len() {
        for (i, b) in members.iter().enumerate() {
            // A backend takes a turn each time its credit reaches the largest weight: shares
            // follow the weights.
            credit[i] += u32::from(b.weight);
            if credit[i] < u32::from(max) {
                continue;
            }
            credit[i] -= u32::from(max);
            let (offset, skip) = perms[i];
            loop {
                let e = usize::try_from((offset + next[i] * skip) % m).unwrap_or(0);
                next[i] += 1;
                if entries[e].is_none() {
                    entries[e] = Some(b.slot);
                    filled += 1;
                    break;
                }
            }
            if filled == entries.len() {
                break;
            }
        }
    }
    entries.into_iter().map(|e| e.unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(slots: &[u8], weight: u16) -> Vec<Member> {
        slots
            .iter()
            .map(|&k| Member {
                slot: k,
                name: format!("px-{k}"),
                weight,
            })
            .collect()
    }

    fn shares(t: &[u8]) -> std::collections::BTreeMap<u8, usize> {
        let mut s = std::collections::BTreeMap::new();
        for &e in t {
            *s.entry(e).or_default() += 1;
        }
        s
    }

    #[test]
    fn entries_are_shared_evenly_and_by_weight() {
        let t = table(&members(&[0, 1, 2, 3], 1000));
        assert_eq!(t.len(), MAGLEV_SIZE as usize);
        for (_, n) in shares(&t) {
            // 1021 / 4 = 255.25
            assert!((250..=260).contains(&n), "{n}");
        }
        let mut weighted = members(&[0, 1], 1000);
        weighted[1].weight = 500;
        let s = shares(&table(&weighted));
        assert!((675..=687).contains(&s[&0]), "{s:?}");
        assert!(table(&[]).is_empty());
    }

    #[test]
    fn an_unrelated_backend_leaving_moves_few_entries() {
        let before = table(&members(&[0, 1, 2, 3], 1000));
        let after = table(&members(&[0, 1, 3], 1000));
        let stayed: Vec<(u8, u8)> = before
            .iter()
            .zip(&after)
            .filter(|(b, _)| **b != 2)
            .map(|(b, a)| (*b, *a))
            .collect();
        let moved = stayed.iter().filter(|(b, a)| b != a).count();
        // Maglev's bound is small, not zero: 19 of the 766 entries of the three that stay move
        // (2.5 %).
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        let share = moved as f64 / stayed.len() as f64;
        assert!(share < 0.05, "{moved} of {} entries moved", stayed.len());
        assert!(
            after.iter().all(|&e| e != 2),
            "the one that left has no entry"
        );
    }
}
