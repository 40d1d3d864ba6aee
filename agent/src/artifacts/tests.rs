//! Tests of [`super`].

use super::*;

fn temp(name: &str) -> (ArtifactStore, PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("quadrant-artifacts-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    (ArtifactStore::new(&dir.join("store")), dir)
}

fn input(dir: &Path, content: &[u8]) -> PathBuf {
    let p = dir.join(format!("input-{}", content.len()));
    fs::write(&p, content).unwrap();
    p
}

const HELLO_SHA256: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

#[test]
fn add_stores_read_only_under_its_digest_and_is_idempotent() {
    let (store, dir) = temp("add");
    let file = input(&dir, b"hello");
    let Added::Stored(r) = store.add(&file, "greeter").unwrap() else {
        panic!("not stored")
    };
    assert_eq!(r.to_string(), format!("greeter@sha256:{HELLO_SHA256}"));
    let path = store.path_of(&r);
    assert_eq!(fs::read(&path).unwrap(), b"hello");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o555
    );
    assert_eq!(
        store.add(&file, "greeter").unwrap(),
        Added::AlreadyPresent(r.clone())
    );
    assert_eq!(store.list().unwrap(), vec![r.clone()]);
    assert_eq!(store.open_verified(&r.to_string()).unwrap(), path);
    // No temporary files are left behind.
    assert_eq!(fs::read_dir(store.root()).unwrap().count(), 1);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn other_content_at_the_path_is_an_integrity_error_and_is_kept() {
    let (store, dir) = temp("conflict");
    fs::create_dir_all(store.root()).unwrap();
    let squatter = store.root().join(format!("greeter@sha256:{HELLO_SHA256}"));
    fs::write(&squatter, b"not hello").unwrap();
    let e = store.add(&input(&dir, b"hello"), "greeter").unwrap_err();
    assert!(matches!(e, ArtifactError::Integrity { .. }), "{e}");
    assert!(e.to_string().contains(&squatter.display().to_string()));
    assert_eq!(
        fs::read(&squatter).unwrap(),
        b"not hello",
        "never overwritten"
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_flipped_byte_is_found_by_verify_and_refused_for_execution() {
    let (store, dir) = temp("flip");
    let Added::Stored(r) = store.add(&input(&dir, b"hello"), "greeter").unwrap() else {
        panic!()
    };
    store.add(&input(&dir, b"other bytes"), "other").unwrap();
    let path = store.path_of(&r);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, b"hellp").unwrap();
    fs::write(store.root().join("stray-file"), b"x").unwrap();
    let (ok, findings) = store.verify_all().unwrap();
    assert_eq!(ok, 1);
    assert_eq!(findings.len(), 2, "{findings:?}");
    assert!(
        findings
            .iter()
            .any(|f| matches!(f, Finding::Mismatch { path: p, .. } if *p == path))
    );
    assert!(
        findings
            .iter()
            .any(|f| matches!(f, Finding::Unexpected(p) if p.ends_with("stray-file")))
    );
    let e = store.open_verified(&r.to_string()).unwrap_err().to_string();
    assert!(
        e.starts_with("integrity error:") && e.contains("greeter@sha256:"),
        "{e}"
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn detached_signatures_are_checked_offline_per_quadrant() {
    let (store, dir) = temp("sign");
    let Added::Stored(r) = store.add(&input(&dir, b"hello"), "greeter").unwrap() else {
        panic!()
    };
    let (prod, _) = SigningKey::generate("prod").unwrap();
    let (dev, _) = SigningKey::generate("dev").unwrap();
    let trust = TrustStore::new(vec![
        prod.trusted(vec![Role::Artifact], &[Quadrant::Px, Quadrant::Pg]),
        dev.trusted(vec![Role::Artifact], &[Quadrant::Dx]),
    ]);
    let unsigned = store
        .check_signed(&r, Quadrant::Px, &trust)
        .unwrap_err()
        .to_string();
    assert!(unsigned.ends_with("no signature"), "{unsigned}");
    store.sign(&r, &dev).unwrap();
    let e = store
        .check_signed(&r, Quadrant::Px, &trust)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("key dev may not sign artifact for quadrant px"),
        "{e}"
    );
    store.sign(&r, &prod).unwrap();
    assert_eq!(
        store.check_signed(&r, Quadrant::Px, &trust).unwrap(),
        "prod"
    );
    // The signature directory is not an artifact.
    assert_eq!(store.verify_all().unwrap(), (1, vec![]));
    // A signature copied onto another artifact does not vouch for it.
    let Added::Stored(other) = store.add(&input(&dir, b"other"), "other").unwrap() else {
        panic!()
    };
    let sigs = store.root().join(SIGNATURES_DIR);
    fs::copy(
        sigs.join(format!("{r}.prod.dsse.json")),
        sigs.join(format!("{other}.prod.dsse.json")),
    )
    .unwrap();
    let e = store
        .check_signed(&other, Quadrant::Px, &trust)
        .unwrap_err()
        .to_string();
    assert!(e.contains("signs another artifact"), "{e}");
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn references_and_names_are_checked() {
    let bad = |s: &str| s.parse::<ArtifactRef>().unwrap_err().to_string();
    assert!(bad("greeter:latest").contains("expected <pkg>@sha256:<digest>"));
    assert!(bad("greeter@sha256:abc").contains("64 lowercase hex"));
    assert!(
        bad(&format!("greeter@sha256:{}", HELLO_SHA256.to_uppercase()))
            .contains("64 lowercase hex")
    );
    assert!(bad(&format!("../etc@sha256:{HELLO_SHA256}")).contains("package name"));
    assert!(bad(&format!("@sha256:{HELLO_SHA256}")).contains("package name"));
    let (store, dir) = temp("names");
    for name in ["", "Greeter", "a/b", ".hidden", "x@y"] {
        assert!(
            matches!(
                store.add(&input(&dir, b"x"), name),
                Err(ArtifactError::BadName { .. })
            ),
            "{name:?}"
        );
    }
    let e = store
        .open_verified(&format!("absent@sha256:{HELLO_SHA256}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not in the store"), "{e}");
    let e = store
        .add(&dir.join("no-such-input"), "x")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("cannot read"), "{e}");
    let _ = fs::remove_dir_all(dir);
}
