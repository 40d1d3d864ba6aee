//! One policy activation reads the bundle once: a `policy_dir` edited between its steps leaves
//! the kernel, admission and the lane broker on the same bundle (the one read), and the next
//! activation moves all three to the edited one. Needs root (it loads the dataplane).

use std::{
    fs,
    path::Path,
    sync::{Arc, Mutex},
};

use quadrant::{
    admission::Admission,
    audit::AuditLog,
    config::Config,
    events::EventBus,
    generations::Generations,
    lanes::broker::Broker,
    loader::Dataplane,
    policy::{
        PolicyBundle,
        activate::{PolicyService, Step},
    },
};
use quadrant_tests::harness::{copy_of_policies, test_config};

/// The digests the kernel, admission and the broker run.
fn live_digests(
    dataplane: &Mutex<Dataplane>,
    admission: &Admission,
    broker: &Broker,
) -> [Option<String>; 3] {
    [
        dataplane
            .lock()
            .expect("dataplane")
            .policy_digest()
            .map(str::to_owned),
        admission.bundle_digest(),
        broker.report().policy_digest,
    ]
}

/// Adds a global deny to the bundle in `dir` (a real change: another digest, other flows).
fn edit(dir: &Path, nth: u32) {
    let global = dir.join("runtime/global.rego");
    let rego = fs::read_to_string(&global).expect("read global.rego");
    let deny =
        format!("deny contains {{\"from\": \"dx\", \"to\": \"dg\", \"reason\": \"edit {nth}\"}}");
    fs::write(&global, format!("{rego}\n{deny}\n")).expect("write global.rego");
}

fn digest_of(config: &Config) -> String {
    PolicyBundle::for_config(config).expect("bundle").digest()
}

#[test]
fn a_policy_dir_edited_during_an_activation_leaves_kernel_admission_and_broker_on_one_bundle() {
    let mut config = test_config(None);
    config.policy_dir = Some(copy_of_policies(&config.instance));
    let dir = config.policy_dir.clone().expect("policy_dir");

    let mut dataplane = Dataplane::load(None).expect("load the dataplane");
    dataplane
        .write_config(&config, quadrant::daemon::QUADRANT_CGROUP_LEVEL)
        .expect("config map");
    let dataplane = Mutex::new(dataplane);
    let events = Arc::new(EventBus::default());
    let admission = Arc::new(Admission::new(
        Err("no policy made live yet".into()),
        AuditLog::open(&config.audit_log).map_err(|e| e.to_string()),
    ));
    let broker = Arc::new(Broker::new(&config, None, Arc::clone(&events)));
    let generations = Arc::new(Mutex::new(Generations::open(
        &quadrant::daemon::state::generations_path(&config),
    )));
    let service = PolicyService::new(
        &config,
        Ok(()),
        generations,
        Arc::clone(&admission),
        Arc::clone(&broker),
        events,
    );
    assert_eq!(
        live_digests(&dataplane, &admission, &broker),
        [None, None, None],
        "nothing is live before the first activation"
    );

    // The files change right after the bundle was read, and again before the kernel flips.
    let original = digest_of(&config);
    let mut edits = 0;
    let first = service
        .activate_with(&dataplane, |step| {
            if matches!(step, Step::Read | Step::Derived) {
                edits += 1;
                edit(&dir, edits);
            }
        })
        .expect("first activation");
    assert_eq!(edits, 2, "both edits ran during the activation");
    assert_eq!(
        first.digest, original,
        "the activation runs the bundle it read"
    );
    assert_ne!(digest_of(&config), original, "the files did change");
    assert_eq!(
        live_digests(&dataplane, &admission, &broker),
        [
            Some(original.clone()),
            Some(original.clone()),
            Some(original)
        ],
        "kernel, admission and broker run the bundle that was read"
    );

    // The next activation (a reload) picks up the edited files — everywhere — and an edit
    // after the kernel flipped does not reach admission or the broker either.
    let edited = digest_of(&config);
    let second = service
        .activate_with(&dataplane, |step| {
            if step == Step::Kernel {
                edit(&dir, 3);
            }
        })
        .expect("second activation");
    assert_eq!(second.digest, edited);
    assert_eq!(
        live_digests(&dataplane, &admission, &broker),
        [Some(edited.clone()), Some(edited.clone()), Some(edited)],
    );
    assert_ne!(
        second.slot, first.slot,
        "the kernel flipped to the other slot"
    );
    let _ = fs::remove_dir_all(&dir);
}
