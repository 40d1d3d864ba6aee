//! Monotone generations: for each (quadrant, workload) the accepted plan generation only moves
//! forward, so older or replayed plans are refused. Persisted as JSON, replaced atomically.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

/// Errors of the generation store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GenerationError {
    /// Not newer than what was accepted.
    #[error(
        "generation {offered} of {key} is not newer than the accepted generation {current} (downgrade or replay); only a break-glass rollback goes back"
    )]
    NotNewer {
        /// `<quadrant>/<workload>`.
        key: String,
        /// Offered.
        offered: u64,
        /// Accepted so far.
        current: u64,
    },
    /// The store could not be read or written.
    #[error("generation store {path}: {reason}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
}

/// The persisted generations.
#[derive(Debug)]
pub struct Generations {
    path: PathBuf,
    accepted: BTreeMap<String, u64>,
}

impl Generations {
    /// Opens (or starts) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, GenerationError> {
        let io = |reason: String| GenerationError::Io {
            path: path.to_owned(),
            reason,
        };
        let accepted = match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| io(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e.to_string())),
        };
        Ok(Self {
            path: path.to_owned(),
            accepted,
        })
    }

    /// The accepted generation of `key`, if any.
    #[must_use]
    pub fn current(&self, key: &str) -> Option<u64> {
        self.accepted.get(key).copied()
    }

    /// Fails unless `generation` is newer than the accepted one for `key`.
    pub fn check(&self, key: &str, generation: u64) -> Result<(), GenerationError> {
        match self.current(key) {
            Some(current) if generation <= current => Err(GenerationError::NotNewer {
                key: key.to_owned(),
                offered: generation,
                current,
            }),
            _ => Ok(()),
        }
    }

    /// Records `generation` for `key` after [`Self::check`]; durable before it returns.
    pub fn accept(&mut self, key: &str, generation: u64) -> Result<(), GenerationError> {
        self.check(key, generation)?;
        self.store(key, generation)
    }

    /// Records `generation` for `key` unconditionally (break-glass rollback only).
    pub fn force(&mut self, key: &str, generation: u64) -> Result<(), GenerationError> {
        self.store(key, generation)
    }

    fn store(&mut self, key: &str, generation: u64) -> Result<(), GenerationError> {
        let io = |reason: String| GenerationError::Io {
            path: self.path.clone(),
            reason,
        };
        let mut next = self.accepted.clone();
        next.insert(key.to_owned(), generation);
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(|e| io(e.to_string()))?;
        f.write_all(&serde_json::to_vec_pretty(&next).map_err(|e| io(e.to_string()))?)
            .map_err(|e| io(e.to_string()))?;
        f.sync_all().map_err(|e| io(e.to_string()))?;
        fs::rename(&tmp, &self.path).map_err(|e| io(e.to_string()))?;
        self.accepted = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_only_move_forward_and_survive_reopening() {
        let path =
            std::env::temp_dir().join(format!("quadrant-generations-{}.json", std::process::id()));
        let _ = fs::remove_file(&path);
        let mut g = Generations::open(&path).unwrap();
        g.accept("px/api", 1).unwrap();
        g.accept("px/api", 5).unwrap();
        assert_eq!(
            g.accept("px/api", 5),
            Err(GenerationError::NotNewer {
                key: "px/api".into(),
                offered: 5,
                current: 5
            }),
            "replay"
        );
        assert!(
            matches!(g.accept("px/api", 4), Err(GenerationError::NotNewer { .. })),
            "downgrade"
        );
        g.accept("dx/api", 1).unwrap();
        let mut g = Generations::open(&path).unwrap();
        assert_eq!(g.current("px/api"), Some(5));
        assert!(g.check("px/api", 3).is_err());
        g.force("px/api", 3).unwrap();
        assert_eq!(Generations::open(&path).unwrap().current("px/api"), Some(3));
        fs::write(&path, "not json").unwrap();
        assert!(
            Generations::open(&path)
                .unwrap_err()
                .to_string()
                .contains(&path.display().to_string())
        );
        let _ = fs::remove_file(&path);
    }
}
