//! The harness's waits with a limit: a command that hangs fails its test, and the failure shows
//! where it hung.

use std::{process::Command, time::Duration};

use quadrant_tests::bounded::{output_within, stacks};

#[test]
fn a_command_past_its_limit_fails_with_its_stacks_and_is_killed() {
    let started = std::time::Instant::now();
    let hung = std::panic::catch_unwind(|| {
        let _ = output_within(
            Command::new("sh").args(["-c", "sleep 37.25; echo never"]),
            Duration::from_millis(300),
            &[],
        );
    })
    .expect_err("a command past its limit fails");
    let message = hung.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("did not finish within 300ms"), "{message}");
    // The shell and the sleep below it, each with its threads' stacks.
    assert!(message.contains("sh -c sleep 37.25"), "{message}");
    assert!(message.contains("sleep 37.25 "), "{message}");
    assert!(
        message.contains("#0 ") || message.contains("wchan="),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the command was not killed"
    );
    let sleeping = Command::new("pgrep")
        .args(["-f", "^sleep 37.25$"])
        .output()
        .expect("pgrep");
    assert!(!sleeping.status.success(), "the sleep below it lives on");

    let done = output_within(
        Command::new("sh").args(["-c", "echo out; echo err >&2"]),
        Duration::from_secs(10),
        &[],
    );
    assert!(done.status.success());
    assert_eq!(
        (&done.stdout[..], &done.stderr[..]),
        (&b"out\n"[..], &b"err\n"[..])
    );
}

#[test]
fn stacks_name_a_process_that_is_gone() {
    assert!(stacks(&[u32::MAX]).contains("(gone)"));
}
