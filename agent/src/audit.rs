//! The append-only, hash-chained audit log: one JSON object per line, each carrying the SHA-256
//! of the previous record, so an edited, removed, reordered or truncated record is detected by
//! [`verify`] (`quadrant audit verify`).
//!
//! `hash = SHA-256(prev || "\n" || body)` where `body` is the compact JSON of
//! `{"event", "kind", "seq", "time"}` (keys sorted); the first record's `prev` is 64 zeros.
//! A head file beside the log (`<log>.head`: count and last hash, replaced atomically after
//! every append) makes records cut from the end detectable too.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log could not be opened, read or written.
    #[error("audit log {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The log was tampered with or damaged.
    #[error("audit log {path} line {line}: {reason}")]
    Tampered {
        /// File.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What does not match.
        reason: String,
    },
}

/// One record as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Position, from 0.
    pub seq: u64,
    /// Unix seconds.
    pub time: u64,
    /// What kind of event (`admission`, …).
    pub kind: String,
    /// The event.
    pub event: Value,
    /// Hash of the previous record.
    pub prev: String,
    /// Hash of this record.
    pub hash: String,
}

fn hash_of(prev: &str, seq: u64, time: u64, kind: &str, event: &Value) -> String {
    // Canonical JSON (keys sorted at every level), whatever order the event was built in.
    let body = serde_json::json!({ "event": event, "kind": kind, "seq": seq, "time": time });
    let mut input = format!("{prev}\n").into_bytes();
    input.extend(crate::plans::canonical(&body));
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    crate::artifacts::hex(digest.as_ref())
}

/// The head file of the log at `path`.
#[must_use]
pub fn head_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".head");
    p.into()
}

#[derive(Serialize, Deserialize)]
struct Head {
    count: u64,
    hash: String,
}

/// Checks every record of the log at `path` (and its head file); returns how many there are.
pub fn verify(path: &Path) -> Result<u64, AuditError> {
    let count = verify_chain(path)?;
    let head = head_path(path);
    match fs::read_to_string(&head) {
        Ok(text) => {
            let h: Head = serde_json::from_str(&text).map_err(|e| AuditError::Tampered {
                path: head.clone(),
                line: 1,
                reason: format!("not a head record: {e}"),
            })?;
            let last = last_hash(path)?;
            if h.count != count || h.hash != last {
                return Err(AuditError::Tampered {
                    path: path.to_owned(),
                    line: usize::try_from(count).unwrap_or(usize::MAX),
                    reason: format!(
                        "the log ends after {count} records but {} were written (records were cut from the end)",
                        h.count
                    ),
                });
            }
            Ok(count)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && count == 0 => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(AuditError::Tampered {
            path: head,
            line: 0,
            reason: "head file missing".into(),
        }),
        Err(source) => Err(AuditError::Io { path: head, source }),
    }
}

fn last_hash(path: &Path) -> Result<String, AuditError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<Record>(l).ok())
            .map_or_else(|| GENESIS.to_owned(), |r| r.hash)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(GENESIS.to_owned()),
        Err(source) => Err(AuditError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn verify_chain(path: &Path) -> Result<u64, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    let mut prev = GENESIS.to_owned();
    let mut seq = 0u64;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        let bad = |reason: String| AuditError::Tampered {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let r: Record =
            serde_json::from_str(&line).map_err(|e| bad(format!("not a record: {e}")))?;
        if r.seq != seq {
            return Err(bad(format!(
                "sequence {} where {seq} was expected (a record was removed or reordered)",
                r.seq
            )));
        }
        if r.prev != prev {
            return Err(bad("does not chain to the previous record".into()));
        }
        if hash_of(&r.prev, r.seq, r.time, &r.kind, &r.event) != r.hash {
            return Err(bad(
                "content does not match its hash (the record was edited)".into(),
            ));
        }
        prev = r.hash;
        seq += 1;
    }
    Ok(seq)
}

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    /// (next seq, hash of the last record).
    tail: Mutex<(u64, String)>,
}

impl AuditLog {
    /// Opens (creating) the log at `path` after verifying what it holds; a damaged log is not
    /// appended to.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| AuditError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let count = verify(path)?;
        let last = last_hash(path)?;
        Ok(Self {
            path: path.to_owned(),
            tail: Mutex::new((count, last)),
        })
    }

    /// Where the log is.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and syncs it to disk before returning.
    pub fn append(&self, kind: &str, event: Value) -> Result<Record, AuditError> {
        let mut tail = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (seq, prev) = (tail.0, tail.1.clone());
        let hash = hash_of(&prev, seq, time, kind, &event);
        let record = Record {
            seq,
            time,
            kind: kind.to_owned(),
            event,
            prev,
            hash,
        };
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(io)?;
        let mut line = serde_json::to_vec(&record).map_err(|e| io(e.into()))?;
        line.push(b'\n');
        f.write_all(&line).map_err(io)?;
        f.sync_data().map_err(io)?;
        let head = head_path(&self.path);
        let tmp = head.with_extension("head.tmp");
        let text = serde_json::to_vec(&Head {
            count: seq + 1,
            hash: record.hash.clone(),
        })
        .map_err(|e| io(e.into()))?;
        fs::write(&tmp, text).map_err(io)?;
        fs::rename(&tmp, &head).map_err(io)?;
        *tail = (seq + 1, record.hash.clone());
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn temp(name: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("quadrant-audit-{name}-{}.log", std::process::id()));
        let _ = fs::remove_file(&p);
        p
    }

    fn three(path: &Path) {
        let log = AuditLog::open(path).unwrap();
        for i in 0..3 {
            log.append("admission", json!({"n": i, "decision": "admit"}))
                .unwrap();
        }
    }

    #[test]
    fn records_chain_and_survive_reopening() {
        let p = temp("chain");
        three(&p);
        assert_eq!(verify(&p).unwrap(), 3);
        let log = AuditLog::open(&p).unwrap();
        assert_eq!(log.append("admission", json!({"n": 3})).unwrap().seq, 3);
        assert_eq!(verify(&p).unwrap(), 4);
        let _ = fs::remove_file(&p);
    }

    #[test]
    fn every_kind_of_tampering_is_detected() {
        let p = temp("tamper");
        three(&p);
        let original = fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = original.lines().collect();
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "edited",
                original.replacen("\"decision\":\"admit\"", "\"decision\":\"reject\"", 1),
                "edited",
            ),
            (
                "removed",
                format!("{}\n{}\n", lines[0], lines[2]),
                "removed or reordered",
            ),
            (
                "reordered",
                format!("{}\n{}\n{}\n", lines[1], lines[0], lines[2]),
                "removed or reordered",
            ),
            ("garbage", format!("{original}not json\n"), "not a record"),
        ];
        for (what, text, needle) in cases {
            fs::write(&p, text).unwrap();
            let e = verify(&p).unwrap_err().to_string();
            assert!(e.contains(needle), "{what}: {e}");
            assert!(
                AuditLog::open(&p).is_err(),
                "{what}: a damaged log is not appended to"
            );
        }
        fs::write(&p, format!("{}\n", lines[0])).unwrap();
        let e = verify(&p).unwrap_err().to_string();
        assert!(e.contains("cut from the end"), "truncated: {e}");
        fs::write(&p, &original[..original.len() - 10]).unwrap();
        assert!(verify(&p).is_err(), "cut mid-record");
        fs::write(&p, &original).unwrap();
        fs::remove_file(head_path(&p)).unwrap();
        assert!(
            verify(&p)
                .unwrap_err()
                .to_string()
                .contains("head file missing")
        );
        let _ = fs::remove_file(&p);
    }
}
