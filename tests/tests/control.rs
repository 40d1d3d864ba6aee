//! The control socket under bad input: requests that are too large, not UTF-8, not JSON or of
//! the wrong shape each get an error naming the problem (and the limit), and the agent keeps
//! serving. Needs root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use quadrant::control::MAX_REQUEST_BYTES;
use quadrant_tests::harness::{Instance, TEST_STATE_DIR, test_config};

const QPROBE: &str = env!("CARGO_BIN_EXE_qprobe");

/// Writes `bytes` to the control socket (ignoring a write the agent cut short) and returns its
/// one answer line.
fn exchange(socket: &Path, bytes: &[u8]) -> serde_json::Value {
    let stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // An oversized request is answered before it is read to its end: the write fails with
    // EPIPE once the agent closes, and the answer is waiting.
    let _ = (&stream).write_all(bytes);
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .expect("an answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

#[test]
fn bad_control_requests_get_errors_naming_the_problem_and_the_agent_keeps_serving() {
    let inst = Instance::up(test_config(None), QPROBE);
    let socket = inst.config.socket_path();

    let mut huge = b"{\"request\":\"submit\",\"envelope\":{\"payload\":\"".to_vec();
    huge.resize(4 * MAX_REQUEST_BYTES, b'A');
    huge.extend_from_slice(b"\"}}\n");
    let cases: Vec<(&str, Vec<u8>, Vec<String>)> = vec![
        (
            "4 MiB request",
            huge,
            vec![
                "too large".into(),
                format!("at most {MAX_REQUEST_BYTES} bytes"),
            ],
        ),
        (
            "a request one byte over the limit",
            [vec![b' '; MAX_REQUEST_BYTES], b"{}\n".to_vec()].concat(),
            vec!["too large".into()],
        ),
        (
            "not UTF-8",
            b"{\"request\":\"st\xffatus\"}\n".to_vec(),
            vec!["not UTF-8".into()],
        ),
        ("not JSON", b"{status\n".to_vec(), vec!["not JSON".into()]),
        (
            "unknown request",
            b"{\"request\":\"format_disk\"}\n".to_vec(),
            vec!["invalid request".into()],
        ),
        (
            "a field of the wrong type",
            b"{\"request\":\"stop\",\"name\":7}\n".to_vec(),
            vec!["invalid request".into(), "name".into()],
        ),
    ];
    for (what, bytes, needles) in cases {
        let answer = exchange(&socket, &bytes);
        assert_eq!(answer["response"], "error", "{what}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        for needle in &needles {
            assert!(message.contains(needle.as_str()), "{what}: {message}");
        }
        // Still serving: a genuine request right after is answered.
        let status = exchange(&socket, b"{\"request\":\"status\"}\n");
        assert_eq!(status["response"], "status", "after {what}: {status}");
    }
    // A request just under the limit is read whole (and refused for what it is, not its size).
    let mut big = b"{\"request\":\"stop\",\"name\":\"".to_vec();
    big.resize(MAX_REQUEST_BYTES - 3, b'x');
    big.extend_from_slice(b"\"}\n");
    assert_eq!(big.len(), MAX_REQUEST_BYTES);
    let answer = exchange(&socket, &big);
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(!message.contains("too large"), "{message}");

    // The CLI refuses a plan too large to send, naming the limit, before it connects.
    let dir = Path::new(TEST_STATE_DIR).join(format!("{}-control", inst.config.instance));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let envelope = serde_json::json!({
        "payloadType": "application/vnd.quadrant.plan+json",
        "payload": "A".repeat(2 * MAX_REQUEST_BYTES),
        "signatures": [],
    });
    let path = dir.join("envelope.json");
    std::fs::write(&path, envelope.to_string()).expect("write");
    let out = inst.quadrant(&["submit", path.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("at most {MAX_REQUEST_BYTES} bytes"))
            && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
}
