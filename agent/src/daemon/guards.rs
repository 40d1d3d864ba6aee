//! Guards that run before anything is loaded: the eBPF object's detached signature (when
//! configured, required with `require_signed_dataplane`) and forward-only program set and map
//! layout versions.

use std::fs;

use dataplane_common::Quadrant;

use super::DaemonError;
use crate::{
    config::Config,
    generations::{GenerationError, Generations},
    signing::TrustStore,
};

/// Generation-store keys of the highest eBPF program set and map layout versions run here.
const PROGRAM_SET_KEY: &str = "dataplane/program-set";
const MAP_LAYOUT_KEY: &str = "dataplane/map-layout";

/// Before anything is loaded: the object's detached signature when configured (required with
/// `require_signed_dataplane`), then forward-only program set and map layout versions, which
/// are recorded once they pass.
pub fn check_dataplane(
    config: &Config,
    generations: &mut Result<Generations, GenerationError>,
) -> Result<(), DaemonError> {
    use dataplane_common::{MAP_LAYOUT_VERSION, PROGRAM_SET_VERSION};
    let refuse = DaemonError::Dataplane;
    match &config.dataplane_signature {
        Some(path) => {
            let text = fs::read_to_string(path)
                .map_err(|e| refuse(format!("cannot read {}: {e}", path.display())))?;
            let envelope: crate::signing::Envelope = serde_json::from_str(&text)
                .map_err(|e| refuse(format!("{}: {e}", path.display())))?;
            let trust = TrustStore::load(&config.trust_store).map_err(|e| refuse(e.to_string()))?;
            let statement = crate::loader::object_statement();
            for q in Quadrant::ALL {
                let (payload, key) = trust
                    .verify(
                        &envelope,
                        crate::signing::DATAPLANE_PAYLOAD_TYPE,
                        crate::signing::Role::Dataplane,
                        q,
                    )
                    .map_err(|e| refuse(format!("{}: {e}", path.display())))?;
                if payload != statement.as_bytes() {
                    return Err(refuse(format!(
                        "{} (by {key}) signs {:?}, this agent's object is {statement:?}",
                        path.display(),
                        String::from_utf8_lossy(&payload)
                    )));
                }
            }
        }
        None if config.require_signed_dataplane => {
            return Err(refuse(
                "require_signed_dataplane is set but no dataplane_signature is configured; sign with `quadrant dataplane sign`".into(),
            ));
        }
        None => {}
    }
    let store = generations.as_mut().map_err(|e| {
        refuse(format!(
            "cannot check the dataplane versions (fail-closed): {e}"
        ))
    })?;
    for (key, ours, what) in [
        (PROGRAM_SET_KEY, PROGRAM_SET_VERSION, "eBPF program set"),
        (MAP_LAYOUT_KEY, MAP_LAYOUT_VERSION, "map layout"),
    ] {
        if let Some(seen) = store.current(key).filter(|&seen| seen > u64::from(ours)) {
            return Err(refuse(format!(
                "this agent's {what} is version {ours}, older than version {seen} that ran on this host; upgrades only move forward"
            )));
        }
    }
    for (key, ours) in [
        (PROGRAM_SET_KEY, PROGRAM_SET_VERSION),
        (MAP_LAYOUT_KEY, MAP_LAYOUT_VERSION),
    ] {
        store
            .force(key, u64::from(ours))
            .map_err(|e| refuse(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> Result<Generations, GenerationError> {
        let path =
            std::env::temp_dir().join(format!("quadrant-guard-{name}-{}.json", std::process::id()));
        let _ = fs::remove_file(&path);
        Generations::open(&path)
    }

    #[test]
    fn versions_only_move_forward_and_are_recorded() {
        use dataplane_common::{MAP_LAYOUT_VERSION, PROGRAM_SET_VERSION};
        let config = Config::embedded();
        let mut generations = store("versions");
        check_dataplane(&config, &mut generations).unwrap();
        let g = generations.as_ref().unwrap();
        assert_eq!(
            g.current(PROGRAM_SET_KEY),
            Some(u64::from(PROGRAM_SET_VERSION))
        );
        assert_eq!(
            g.current(MAP_LAYOUT_KEY),
            Some(u64::from(MAP_LAYOUT_VERSION))
        );
        // A newer program set ran here: this one is refused.
        generations
            .as_mut()
            .unwrap()
            .force(PROGRAM_SET_KEY, u64::from(PROGRAM_SET_VERSION) + 1)
            .unwrap();
        let e = check_dataplane(&config, &mut generations)
            .unwrap_err()
            .to_string();
        assert!(e.contains("older than version"), "{e}");
        // Without a generation store there is no check: fail-closed.
        let gone = GenerationError::Io {
            path: "/gone".into(),
            reason: "disk gone".into(),
        };
        let e = check_dataplane(&config, &mut Err(gone))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fail-closed"), "{e}");
    }

    #[test]
    fn a_required_signature_must_be_configured() {
        let mut config = Config::embedded();
        config.require_signed_dataplane = true;
        let e = check_dataplane(&config, &mut store("required"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no dataplane_signature is configured"), "{e}");
    }
}
