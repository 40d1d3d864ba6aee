//! The content-addressed artifact store: `<root>/<pkg>@sha256:<digest>` (root `/opt/mcp` by
//! default).
//!
//! Adding streams the file through SHA-256 into a temporary file in the root, syncs it, makes it
//! read-only (0555: executable artifacts run from the store) and renames it into place without replacing anything (`RENAME_NOREPLACE`), then
//! syncs the directory: an artifact is either fully there or not at all. The same name and digest
//! twice is a no-op; a path that already holds other content is an integrity error and is never
//! overwritten. Every read for execution hashes the file again.

use std::{
    fmt, fs,
    io::{self, Read, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
};

use dataplane_common::Quadrant;
use ring::digest::{Context, SHA256};

use crate::signing::{
    ARTIFACT_PAYLOAD_TYPE, Envelope, Role, SignatureError, SigningKey, TrustStore,
};

/// Default store root.
pub const DEFAULT_ROOT: &str = "/opt/mcp";
const DIGEST_PREFIX: &str = "@sha256:";
const MAX_NAME: usize = 128;
const READ_CHUNK: usize = 64 * 1024;
/// Prefix of in-flight temporary files (never a valid reference: names cannot start with '.').
const TMP_PREFIX: &str = ".tmp-";
/// Directory of detached signatures (DSSE envelopes) inside the root.
const SIGNATURES_DIR: &str = ".signatures";

/// Errors of the artifact store; each names the file or reference at fault.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A reference that is not `<pkg>@sha256:<64 lowercase hex>`.
    #[error("invalid artifact reference {reference:?}: {reason}")]
    BadReference {
        /// What was given.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A package name that cannot be stored.
    #[error(
        "invalid package name {name:?}: use 1-{MAX_NAME} characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    BadName {
        /// What was given.
        name: String,
    },
    /// A file's content does not match the digest in its name.
    #[error("integrity error: {path} should have digest sha256:{expected} but has sha256:{actual}")]
    Integrity {
        /// The file.
        path: PathBuf,
        /// Digest in its name.
        expected: String,
        /// Digest of its content.
        actual: String,
    },
    /// The referenced artifact is not in the store.
    #[error("artifact {reference} is not in the store {root}; add it with `quadrant artifact add`")]
    Missing {
        /// The reference.
        reference: String,
        /// The store root.
        root: PathBuf,
    },
    /// No acceptable signature.
    #[error("artifact {reference} is not signed for this use: {reason}")]
    Signature {
        /// The reference.
        reference: String,
        /// Why (the last signature's problem, or none found).
        reason: String,
    },
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArtifactError + 'a {
    move |source| ArtifactError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// `<pkg>@sha256:<digest>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactRef {
    /// Package name.
    pub name: String,
    /// 64 lowercase hex digits.
    pub digest: String,
}

impl fmt::Display for ArtifactRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{DIGEST_PREFIX}{}", self.name, self.digest)
    }
}

/// Whether `name` is a valid package name.
#[must_use]
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

impl FromStr for ArtifactRef {
    type Err = ArtifactError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ArtifactError::BadReference {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (name, digest) = s
            .split_once(DIGEST_PREFIX)
            .ok_or_else(|| bad("expected <pkg>@sha256:<digest>"))?;
        if !valid_name(name) {
            return Err(bad(
                "package name must be a-z, 0-9, '.', '_', '-' and start with a letter or digit",
            ));
        }
        if digest.len() != 64
            || !digest
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(bad("digest must be 64 lowercase hex digits"));
        }
        Ok(Self {
            name: name.to_owned(),
            digest: digest.to_owned(),
        })
    }
}

/// What `add` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Added {
    /// Stored now.
    Stored(ArtifactRef),
    /// The same name and digest were already there (content checked).
    AlreadyPresent(ArtifactRef),
}

/// One problem `verify_all` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Content does not match the digest in the name.
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The digest of its content.
        actual: String,
    },
    /// A file whose name is not a reference (not created by the store).
    Unexpected(PathBuf),
}

/// Hex SHA-256 of everything `reader` yields.
pub fn sha256_hex(mut reader: impl Read) -> io::Result<String> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// Lowercase hex of `bytes` (digests throughout the agent).
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A store rooted at a directory.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    /// The store at `root` (created on first add).
    #[must_use]
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    /// The root.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `reference` lives.
    #[must_use]
    pub fn path_of(&self, reference: &ArtifactRef) -> PathBuf {
        self.root.join(reference.to_string())
    }

    /// Stores the content of `file` as package `name`.
    pub fn add(&self, file: &Path, name: &str) -> Result<Added, ArtifactError> {
        if !valid_name(name) {
            return Err(ArtifactError::BadName {
                name: name.to_owned(),
            });
        }
        fs::create_dir_all(&self.root).map_err(io_err("cannot create", &self.root))?;
        let mut src = fs::File::open(file).map_err(io_err("cannot read", file))?;
        let mut nonce = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).map_err(
            |_| ArtifactError::Io {
                what: "no randomness for",
                path: self.root.clone(),
                source: io::Error::other("rng"),
            },
        )?;
        let tmp = self.root.join(format!("{TMP_PREFIX}{}", hex(&nonce)));
        let result = self.store_from(&mut src, &tmp, file, name);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn store_from(
        &self,
        src: &mut fs::File,
        tmp: &Path,
        file: &Path,
        name: &str,
    ) -> Result<Added, ArtifactError> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)
            .map_err(io_err("cannot create", tmp))?;
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = src.read(&mut buf).map_err(io_err("cannot read", file))?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io_err("cannot write", tmp))?;
        }
        out.sync_all().map_err(io_err("cannot sync", tmp))?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o555))
            .map_err(io_err("cannot make read-only", tmp))?;
        let reference = ArtifactRef {
            name: name.to_owned(),
            digest: hex(ctx.finish().as_ref()),
        };
        let dest = self.path_of(&reference);
        match nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            tmp,
            nix::fcntl::AT_FDCWD,
            &dest,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {
                let dir = fs::File::open(&self.root).map_err(io_err("cannot open", &self.root))?;
                dir.sync_all().map_err(io_err("cannot sync", &self.root))?;
                Ok(Added::Stored(reference))
            }
            Err(nix::errno::Errno::EEXIST) => {
                let _ = fs::remove_file(tmp);
                // Something is already at this path: it must be this very content.
                self.check(&reference)?;
                Ok(Added::AlreadyPresent(reference))
            }
            Err(e) => Err(ArtifactError::Io {
                what: "cannot move into place",
                path: dest,
                source: e.into(),
            }),
        }
    }

    /// Hashes the stored file of `reference` and checks it against the digest in its name.
    pub fn check(&self, reference: &ArtifactRef) -> Result<PathBuf, ArtifactError> {
        let path = self.path_of(reference);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ArtifactError::Missing {
                    reference: reference.to_string(),
                    root: self.root.clone(),
                });
            }
            Err(e) => {
                return Err(ArtifactError::Io {
                    what: "cannot read",
                    path,
                    source: e,
                });
            }
        };
        let actual = sha256_hex(file).map_err(io_err("cannot read", &path))?;
        if actual != reference.digest {
            return Err(ArtifactError::Integrity {
                path,
                expected: reference.digest.clone(),
                actual,
            });
        }
        Ok(path)
    }

    /// The path of `reference` for execution, after hashing its content again.
    pub fn open_verified(&self, reference: &str) -> Result<PathBuf, ArtifactError> {
        self.check(&reference.parse()?)
    }

    /// Signs `reference` (after checking its content) with `key`; the detached envelope is
    /// stored beside it. Returns the envelope's path.
    pub fn sign(
        &self,
        reference: &ArtifactRef,
        key: &SigningKey,
    ) -> Result<PathBuf, ArtifactError> {
        self.check(reference)?;
        let dir = self.root.join(SIGNATURES_DIR);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let envelope = key.sign(ARTIFACT_PAYLOAD_TYPE, reference.to_string().as_bytes());
        let path = dir.join(format!("{reference}.{}.dsse.json", key.id()));
        let text = serde_json::to_vec_pretty(&envelope).map_err(|e| ArtifactError::Io {
            what: "cannot encode",
            path: path.clone(),
            source: e.into(),
        })?;
        fs::write(&path, text).map_err(io_err("cannot write", &path))?;
        Ok(path)
    }

    /// Checks the content of `reference` and that a key the trust store allows to sign
    /// artifacts for `quadrant` signed it (offline). Returns the key id.
    pub fn check_signed(
        &self,
        reference: &ArtifactRef,
        quadrant: Quadrant,
        trust: &TrustStore,
    ) -> Result<String, ArtifactError> {
        self.check(reference)?;
        let dir = self.root.join(SIGNATURES_DIR);
        let prefix = format!("{reference}.");
        let mut last = None;
        if let Ok(rd) = fs::read_dir(&dir) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with(&prefix) || !name.ends_with(".dsse.json") {
                    continue;
                }
                let path = entry.path();
                let text = fs::read_to_string(&path).map_err(io_err("cannot read", &path))?;
                let result = serde_json::from_str::<Envelope>(&text)
                    .map_err(|e| SignatureError::Malformed(e.to_string()))
                    .and_then(|env| {
                        trust.verify(&env, ARTIFACT_PAYLOAD_TYPE, Role::Artifact, quadrant)
                    });
                match result {
                    Ok((payload, key)) if payload == reference.to_string().as_bytes() => {
                        return Ok(key);
                    }
                    Ok((_, key)) => {
                        last = Some(SignatureError::BadSignature(format!(
                            "{key} (signs another artifact)"
                        )));
                    }
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(ArtifactError::Signature {
            reference: reference.to_string(),
            reason: last.map_or_else(|| "no signature".to_owned(), |e| e.to_string()),
        })
    }

    /// Every stored reference, sorted.
    pub fn list(&self) -> Result<Vec<ArtifactRef>, ArtifactError> {
        let mut out: Vec<ArtifactRef> =
            self.entries()?.into_iter().filter_map(|(_, r)| r).collect();
        out.sort();
        Ok(out)
    }

    fn entries(&self) -> Result<Vec<(PathBuf, Option<ArtifactRef>)>, ArtifactError> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => {
                return Err(ArtifactError::Io {
                    what: "cannot list",
                    path: self.root.clone(),
                    source: e,
                });
            }
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io_err("cannot list", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temporary files and the signatures directory; references never start with '.'.
            if name.starts_with('.') {
                continue;
            }
            out.push((entry.path(), name.parse().ok()));
        }
        Ok(out)
    }

    /// Re-hashes every artifact; returns what does not match (and files that are not
    /// artifacts), plus how many artifacts checked out.
    pub fn verify_all(&self) -> Result<(usize, Vec<Finding>), ArtifactError> {
        let mut ok = 0;
        let mut findings = Vec::new();
        for (path, reference) in self.entries()? {
            let Some(reference) = reference else {
                findings.push(Finding::Unexpected(path));
                continue;
            };
            match self.check(&reference) {
                Ok(_) => ok += 1,
                Err(ArtifactError::Integrity { path, actual, .. }) => {
                    findings.push(Finding::Mismatch { path, actual });
                }
                Err(e) => return Err(e),
            }
        }
        findings.sort_by_key(|f| match f {
            Finding::Mismatch { path, .. } | Finding::Unexpected(path) => path.clone(),
        });
        Ok((ok, findings))
    }
}

#[cfg(test)]
mod tests;
