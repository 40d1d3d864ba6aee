//! The artifact store through the `quadrant` CLI: add, idempotent add, list, verify, and a
//! tampered artifact found by `verify`.

use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf, process::Command};

use quadrant_tests::harness::{TEST_STATE_DIR, sibling_binary, test_config};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end CLI scenario, step by step"
)]
fn artifact_add_list_verify_and_tamper_detection() {
    let dir = PathBuf::from(TEST_STATE_DIR).join("artifacts-cli");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("dir");
    let mut config = test_config(None);
    config.artifacts_root = dir.join("store");
    config.trust_store = dir.join("trust");
    let config_path = dir.join("config.yaml");
    fs::write(&config_path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
    let bin = sibling_binary(QPROBE, "quadrant");
    let run = |args: &[&str]| {
        let out = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .output()
            .expect("run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let input = dir.join("payload.bin");
    fs::write(&input, b"quadrant payload").expect("write");
    let (ok, reference, err) = run(&[
        "artifact",
        "add",
        input.to_str().expect("utf8"),
        "--name",
        "payload",
    ]);
    assert!(ok, "{err}");
    assert!(
        reference.starts_with("payload@sha256:") && reference.len() == "payload@sha256:".len() + 64,
        "{reference}"
    );
    let (ok, again, _) = run(&[
        "artifact",
        "add",
        input.to_str().expect("utf8"),
        "--name",
        "payload",
    ]);
    assert!(ok);
    assert_eq!(again, format!("{reference} (already present)"));
    assert_eq!(run(&["artifact", "list"]).1, reference);
    assert!(
        run(&["artifact", "verify"])
            .1
            .starts_with("1 artifacts intact, 0 problems")
    );

    // Signatures: a development key cannot vouch for production; a production key can.
    let keys = dir.join("keys");
    let keys_s = keys.to_str().expect("utf8");
    for (id, q) in [("dev", "dx"), ("prod", "px")] {
        let (ok, _, err) = run(&[
            "keys",
            "generate",
            "--id",
            id,
            "--role",
            "artifact",
            "--quadrant",
            q,
            "--out",
            keys_s,
        ]);
        assert!(ok, "{err}");
        let (ok, _, err) = run(&[
            "keys",
            "trust",
            keys.join(format!("{id}.json")).to_str().expect("utf8"),
        ]);
        assert!(ok, "{err}");
    }
    assert_eq!(
        fs::metadata(keys.join("dev.pk8"))
            .expect("key")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let (ok, _, err) = run(&["artifact", "check-signed", &reference, "--quadrant", "px"]);
    assert!(!ok && err.contains("no signature"), "{err}");
    assert!(
        run(&[
            "artifact",
            "sign",
            &reference,
            "--key",
            keys.join("dev.pk8").to_str().expect("utf8")
        ])
        .0
    );
    let (ok, _, err) = run(&["artifact", "check-signed", &reference, "--quadrant", "px"]);
    assert!(
        !ok && err.contains("key dev may not sign artifact for quadrant px"),
        "{err}"
    );
    assert!(
        run(&[
            "artifact",
            "sign",
            &reference,
            "--key",
            keys.join("prod.pk8").to_str().expect("utf8")
        ])
        .0
    );
    let (ok, out, err) = run(&["artifact", "check-signed", &reference, "--quadrant", "px"]);
    assert!(ok, "{err}");
    assert!(out.ends_with("signed for px by key prod"), "{out}");
    assert!(
        run(&["artifact", "verify"])
            .1
            .starts_with("1 artifacts intact, 0 problems"),
        "signatures are not artifacts"
    );

    let stored = config.artifacts_root.join(&reference);
    fs::set_permissions(&stored, fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::write(&stored, b"quadrant paylOad").expect("tamper");
    let (ok, out, err) = run(&["artifact", "verify"]);
    assert!(!ok);
    assert!(
        out.contains(&format!("MISMATCH {}", stored.display())),
        "{out}"
    );
    assert!(err.contains("has 1 problems"), "{err}");
    let (ok, _, err) = run(&[
        "artifact",
        "add",
        input.to_str().expect("utf8"),
        "--name",
        "payload",
    ]);
    assert!(
        !ok && err.contains("integrity error"),
        "re-adding over a tampered file: {err}"
    );
    let (ok, _, err) = run(&[
        "artifact",
        "add",
        input.to_str().expect("utf8"),
        "--name",
        "Bad/Name",
    ]);
    assert!(!ok && err.contains("invalid package name"), "{err}");
}
