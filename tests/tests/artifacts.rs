//! The artifact store through the `quadrant` CLI: add, idempotent add, list, verify, a tampered
//! artifact found by `verify`, and signatures checked per quadrant.

use quadrant_tests::bounded::Bounded as _;
use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf, process::Command};

use quadrant::config::Config;
use quadrant_tests::harness::{TEST_STATE_DIR, sibling_binary, test_config};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

/// The CLI on a configuration of its own, with its store under `dir`.
struct Cli {
    config: Config,
    config_path: PathBuf,
    dir: PathBuf,
}

impl Cli {
    fn new(what: &str) -> Self {
        let mut config = test_config(None);
        let dir = PathBuf::from(TEST_STATE_DIR).join(format!("{}-{what}", config.instance));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        config.artifacts_root = dir.join("store");
        config.trust_store = dir.join("trust");
        let config_path = dir.join("config.yaml");
        fs::write(&config_path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
        Self {
            config,
            config_path,
            dir,
        }
    }

    /// Runs `quadrant ARGS`: (success, stdout trimmed, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(sibling_binary(QPROBE, "quadrant"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output_bounded();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `quadrant artifact add` of the file `input` as package `name`.
    fn add(&self, input: &std::path::Path, name: &str) -> (bool, String, String) {
        self.run(&[
            "artifact",
            "add",
            input.to_str().expect("utf8"),
            "--name",
            name,
        ])
    }

    /// Stores a payload as package `payload`; returns the file it came from and its reference.
    fn add_payload(&self) -> (PathBuf, String) {
        let input = self.dir.join("payload.bin");
        fs::write(&input, b"quadrant payload").expect("write");
        let (ok, reference, err) = self.add(&input, "payload");
        assert!(ok, "{err}");
        (input, reference)
    }

    fn verify_says(&self) -> String {
        self.run(&["artifact", "verify"]).1
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn artifact_add_list_verify_and_tamper_detection() {
    let cli = Cli::new("artifacts");
    let (input, reference) = cli.add_payload();
    assert!(
        reference.starts_with("payload@sha256:") && reference.len() == "payload@sha256:".len() + 64,
        "{reference}"
    );
    let (ok, again, _) = cli.add(&input, "payload");
    assert!(ok);
    assert_eq!(again, format!("{reference} (already present)"));
    assert_eq!(cli.run(&["artifact", "list"]).1, reference);
    assert!(
        cli.verify_says()
            .starts_with("1 artifacts intact, 0 problems")
    );

    let stored = cli.config.artifacts_root.join(&reference);
    fs::set_permissions(&stored, fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::write(&stored, b"quadrant paylOad").expect("tamper");
    let (ok, out, err) = cli.run(&["artifact", "verify"]);
    assert!(!ok);
    assert!(
        out.contains(&format!("MISMATCH {}", stored.display())),
        "{out}"
    );
    assert!(err.contains("has 1 problems"), "{err}");
    let (ok, _, err) = cli.add(&input, "payload");
    assert!(
        !ok && err.contains("integrity error"),
        "re-adding over a tampered file: {err}"
    );
    let (ok, _, err) = cli.add(&input, "Bad/Name");
    assert!(!ok && err.contains("invalid package name"), "{err}");
}

#[test]
fn artifact_signatures_are_checked_per_quadrant() {
    let cli = Cli::new("artifact-signatures");
    let (_, reference) = cli.add_payload();
    // A development key cannot vouch for production; a production key can.
    let keys = cli.dir.join("keys");
    for (id, q) in [("dev", "dx"), ("prod", "px")] {
        let (ok, _, err) = cli.run(&[
            "keys",
            "generate",
            "--id",
            id,
            "--role",
            "artifact",
            "--quadrant",
            q,
            "--out",
            keys.to_str().expect("utf8"),
        ]);
        assert!(ok, "{err}");
        let trusted = keys.join(format!("{id}.json"));
        let (ok, _, err) = cli.run(&["keys", "trust", trusted.to_str().expect("utf8")]);
        assert!(ok, "{err}");
    }
    let mode = fs::metadata(keys.join("dev.pk8"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let check = || cli.run(&["artifact", "check-signed", &reference, "--quadrant", "px"]);
    let sign = |id: &str| {
        let key = keys.join(format!("{id}.pk8"));
        let (ok, _, err) = cli.run(&[
            "artifact",
            "sign",
            &reference,
            "--key",
            key.to_str().expect("utf8"),
        ]);
        assert!(ok, "{err}");
    };
    let (ok, _, err) = check();
    assert!(!ok && err.contains("no signature"), "{err}");
    sign("dev");
    let (ok, _, err) = check();
    assert!(
        !ok && err.contains("key dev may not sign artifact for quadrant px"),
        "{err}"
    );
    sign("prod");
    let (ok, out, err) = check();
    assert!(ok, "{err}");
    assert!(out.ends_with("signed for px by key prod"), "{out}");
    assert!(
        cli.verify_says()
            .starts_with("1 artifacts intact, 0 problems"),
        "signatures are not artifacts"
    );
}
