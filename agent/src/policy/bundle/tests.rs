//! Tests of [`super`].

use super::*;

#[test]
fn embedded_bundle_lists_every_file_under_policies() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let on_disk = PolicyBundle::from_dir(&dir).unwrap();
    let mut disk: Vec<&str> = on_disk
        .rego
        .iter()
        .chain(&on_disk.data)
        .map(|(p, _)| p.as_str())
        .collect();
    let mut embedded: Vec<&str> = EMBEDDED.iter().map(|(p, _)| *p).collect();
    disk.sort_unstable();
    embedded.sort_unstable();
    assert_eq!(disk, embedded, "add new policy files to EMBEDDED");
}

#[test]
fn a_signed_policy_directory_is_verified_and_tampering_is_refused() {
    let tmp = std::env::temp_dir().join(format!("quadrant-policy-sign-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    let dir = tmp.join("policies");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    assert!(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(&src)
            .arg(&dir)
            .status()
            .unwrap()
            .success()
    );
    let (all, _) = SigningKey::generate("policy-admin").unwrap();
    let (dev_only, _) = SigningKey::generate("dev-admin").unwrap();
    fs::create_dir_all(tmp.join("trust")).unwrap();
    for (k, qs) in [(&all, &Quadrant::ALL[..]), (&dev_only, &[Quadrant::Dx][..])] {
        let doc = serde_json::to_string(&k.trusted(vec![Role::Policy], qs)).unwrap();
        fs::write(tmp.join("trust").join(format!("{}.json", k.id())), doc).unwrap();
    }
    let mut config = Config::embedded();
    config.policy_dir = Some(dir.clone());
    config.trust_store = tmp.join("trust");
    assert!(
        PolicyBundle::for_config(&config).is_ok(),
        "unsigned and not required"
    );
    config.require_signed_policy = true;
    let e = PolicyBundle::for_config(&config).unwrap_err().to_string();
    assert!(
        e.contains("is missing and require_signed_policy is set"),
        "{e}"
    );
    let bundle = PolicyBundle::from_dir(&dir).unwrap();
    fs::write(
        dir.join(SIGNATURE_FILE),
        serde_json::to_string(&bundle.sign(&all)).unwrap(),
    )
    .unwrap();
    assert!(
        PolicyBundle::for_config(&config).is_ok(),
        "signed by a key covering every quadrant"
    );
    fs::write(
        dir.join(SIGNATURE_FILE),
        serde_json::to_string(&bundle.sign(&dev_only)).unwrap(),
    )
    .unwrap();
    let e = PolicyBundle::for_config(&config).unwrap_err().to_string();
    assert!(
        e.contains("key dev-admin may not sign policy for quadrant dg"),
        "{e}"
    );
    fs::write(
        dir.join(SIGNATURE_FILE),
        serde_json::to_string(&bundle.sign(&all)).unwrap(),
    )
    .unwrap();
    let global = dir.join("runtime/global.rego");
    let text = fs::read_to_string(&global).unwrap();
    fs::write(&global, text.replace("deny contains", "# deny contains")).unwrap();
    let e = PolicyBundle::for_config(&config).unwrap_err().to_string();
    assert!(
        e.contains("for another bundle"),
        "an edited policy after signing: {e}"
    );
    let _ = fs::remove_dir_all(&tmp);
}

#[test]
fn broken_rego_names_the_file() {
    let mut b = PolicyBundle::embedded();
    b.rego.push((
        "runtime/broken.rego".into(),
        "package quadrant.broken\nallow if {".into(),
    ));
    let e = b.engine(&[]).unwrap_err().to_string();
    assert!(e.starts_with("policy runtime/broken.rego:"), "{e}");
}
