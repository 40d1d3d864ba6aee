//! The content-addressed artifact store, offline: `artifact add|list|verify|sign|check-signed`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use dataplane_common::Quadrant;
use quadrant::config::Config;

#[derive(Debug, Subcommand)]
pub enum ArtifactCommand {
    /// Store FILE as package NAME; prints its reference `<name>@sha256:<digest>`.
    Add {
        /// The file.
        file: PathBuf,
        /// Package name (a-z, 0-9, '.', '_', '-').
        #[arg(long)]
        name: String,
    },
    /// List the stored references.
    List,
    /// Re-hash every artifact and report mismatches; fails if there are any.
    Verify,
    /// Sign a stored artifact with a key (detached DSSE envelope beside it).
    Sign {
        /// `<pkg>@sha256:<digest>`.
        reference: String,
        /// Ed25519 PKCS#8 key file (its stem is the key id).
        #[arg(long)]
        key: PathBuf,
    },
    /// Check an artifact's content and that a trusted key signed it for QUADRANT.
    CheckSigned {
        /// `<pkg>@sha256:<digest>`.
        reference: String,
        /// dx, dg, px or pg.
        #[arg(long)]
        quadrant: String,
    },
}

pub fn artifact(config: &Config, command: ArtifactCommand) -> anyhow::Result<()> {
    use quadrant::artifacts::{Added, ArtifactStore, Finding};
    let store = ArtifactStore::new(&config.artifacts_root);
    match command {
        ArtifactCommand::Add { file, name } => {
            match store.add(&file, &name)? {
                Added::Stored(r) => println!("{r}"),
                Added::AlreadyPresent(r) => println!("{r} (already present)"),
            }
            Ok(())
        }
        ArtifactCommand::List => {
            for r in store.list()? {
                println!("{r}");
            }
            Ok(())
        }
        ArtifactCommand::Sign { reference, key } => {
            let key = quadrant::signing::SigningKey::load(&key)?;
            let path = store.sign(&reference.parse()?, &key)?;
            println!(
                "signed {reference} with key {}: {}",
                key.id(),
                path.display()
            );
            Ok(())
        }
        ArtifactCommand::CheckSigned {
            reference,
            quadrant,
        } => {
            let q = Quadrant::from_name(&quadrant)
                .with_context(|| format!("unknown quadrant {quadrant:?}"))?;
            let trust = quadrant::signing::TrustStore::load(&config.trust_store)?;
            let key = store.check_signed(&reference.parse()?, q, &trust)?;
            println!(
                "{reference}: content intact, signed for {} by key {key}",
                q.name()
            );
            Ok(())
        }
        ArtifactCommand::Verify => {
            let (ok, findings) = store.verify_all()?;
            for f in &findings {
                match f {
                    Finding::Mismatch { path, actual } => {
                        println!("MISMATCH {} (content is sha256:{actual})", path.display());
                    }
                    Finding::Unexpected(path) => {
                        println!("UNEXPECTED {} (not an artifact reference)", path.display());
                    }
                }
            }
            println!(
                "{ok} artifacts intact, {} problems in {}",
                findings.len(),
                store.root().display()
            );
            if !findings.is_empty() {
                bail!(
                    "the artifact store {} has {} problems",
                    store.root().display(),
                    findings.len()
                );
            }
            Ok(())
        }
    }
}
