//! The socket driver against a small handler: permissions, bad input on a live connection,
//! the idle limit, the connection limit, and the socket file's life cycle.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fathom_control::proto::{self, parse_response, RemoteError, Request};
use fathom_control::{
    ClientError, ControlClient, ControlServer, ControlServerError, Handler, Hello, Options,
};
use serde_json::{json, Value};

struct TestHandler;

impl Handler for TestHandler {
    fn handle(&self, request: Request) -> Result<Value, RemoteError> {
        match request {
            Request::Hello => Ok(serde_json::to_value(Hello {
                version: proto::VERSION,
                node_id: "test".into(),
                pid: std::process::id(),
                region: None,
                data_dir: "/tmp".into(),
            })
            .unwrap()),
            Request::Layers {
                volume: Some(volume),
            } if volume != "vol0" => Err(RemoteError::new(
                proto::UNKNOWN_VOLUME,
                format!("no volume {volume:?}: this node has vol0"),
            )),
            Request::Devices => panic!("the test handler panics on devices"),
            Request::Run { runtime_ms, .. } => {
                std::thread::sleep(Duration::from_millis(runtime_ms));
                Ok(json!({"slept_ms": runtime_ms}))
            }
            other => Ok(json!({"echo": other.command()})),
        }
    }
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("control.sock")
}

fn start(path: &Path, options: Options) -> ControlServer {
    ControlServer::start_with(path, Arc::new(TestHandler), options).unwrap()
}

/// A raw connection that reads answer lines.
struct Raw {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Self {
        let writer = UnixStream::connect(path).unwrap();
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(writer.try_clone().unwrap());
        Self { writer, reader }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn answer(&mut self) -> (Option<u64>, Result<Value, RemoteError>) {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "no answer line: {line:?}");
        parse_response(&line).unwrap()
    }

    fn error(&mut self) -> RemoteError {
        self.answer().1.unwrap_err()
    }

    fn hello(&mut self, id: u64) {
        self.send(proto::encode_request(Some(id), &Request::Hello).as_bytes());
        let (answer_id, result) = self.answer();
        assert_eq!(answer_id, Some(id));
        assert_eq!(result.unwrap()["node_id"], "test");
    }

    fn at_eof(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.reader.read_to_end(&mut rest), Ok(0))
    }
}

#[test]
fn the_socket_is_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let server = start(&path, Options::default());
    assert_eq!(server.path(), path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[test]
fn bad_lines_get_an_error_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let _server = start(&path, Options::default());
    let mut raw = Raw::connect(&path);

    raw.send(b"this is not json\n");
    let error = raw.error();
    assert_eq!(error.code, proto::BAD_REQUEST);
    assert!(error.message.contains("not JSON"), "{}", error.message);
    raw.hello(1);

    let mut long = vec![b'x'; proto::MAX_LINE + 10];
    long.push(b'\n');
    raw.send(&long);
    let error = raw.error();
    assert!(error.message.contains("longer than"), "{}", error.message);
    raw.hello(2);

    raw.send(b"{\"v\":2,\"id\":9,\"cmd\":\"hello\"}\n");
    let (id, result) = raw.answer();
    assert_eq!(id, Some(9), "the id of a refused request is echoed");
    assert_eq!(
        result.unwrap_err().message,
        "this node speaks control protocol version 1; request had v=2"
    );
    raw.hello(3);

    raw.send(b"{\"v\":1,\"cmd\":\"format\"}\n");
    let error = raw.error();
    assert!(
        error.message.contains("unknown command \"format\""),
        "{}",
        error.message
    );
    raw.hello(4);

    raw.send(b"\xff\xfe\n\n   \n");
    assert!(raw.error().message.contains("UTF-8"));
    raw.hello(5);

    // The handler's own errors, and a panic in it.
    raw.send(b"{\"v\":1,\"id\":6,\"cmd\":\"layers\",\"volume\":\"nope\"}\n");
    let error = raw.error();
    assert_eq!(error.code, proto::UNKNOWN_VOLUME);
    raw.send(b"{\"v\":1,\"id\":7,\"cmd\":\"devices\"}\n");
    let (id, result) = raw.answer();
    assert_eq!(id, Some(7));
    let error = result.unwrap_err();
    assert_eq!(error.code, proto::INTERNAL);
    assert!(
        error.message.contains("the test handler panics"),
        "{}",
        error.message
    );
    raw.hello(8);

    // Two requests in one write, answered in order.
    raw.send(b"{\"v\":1,\"id\":10,\"cmd\":\"volumes\"}\n{\"v\":1,\"id\":11,\"cmd\":\"hello\"}\n");
    assert_eq!(raw.answer().0, Some(10));
    assert_eq!(raw.answer().0, Some(11));
}

#[test]
fn a_silent_client_is_closed_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let idle = Duration::from_millis(400);
    let _server = start(
        &path,
        Options {
            idle_timeout: idle,
            ..Options::default()
        },
    );
    let mut silent = Raw::connect(&path);
    let mut active = Raw::connect(&path);
    // The active client keeps talking for twice the idle limit and is served throughout.
    for id in 0..8 {
        active.hello(id);
        std::thread::sleep(idle / 4);
        if id == 1 {
            // Half the limit: the silent one is still open.
            silent.writer.set_nonblocking(true).unwrap();
            let error = silent.writer.read(&mut [0u8; 16]).unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock);
            silent.writer.set_nonblocking(false).unwrap();
        }
    }
    active.hello(99);
    let error = silent.error();
    assert_eq!(error.code, proto::BAD_REQUEST);
    assert!(
        error.message.contains("nothing received for 400ms"),
        "{}",
        error.message
    );
    assert!(silent.at_eof());
}

#[test]
fn one_connection_over_the_limit_is_told_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let _server = start(&path, Options::default());
    let mut open: Vec<Raw> = (0..16).map(|_| Raw::connect(&path)).collect();
    for (id, raw) in open.iter_mut().enumerate() {
        raw.hello(id as u64); // each has been admitted
    }
    let mut extra = Raw::connect(&path);
    let error = extra.error();
    assert_eq!(error.code, proto::BUSY);
    assert!(error.message.contains("16"), "{}", error.message);
    assert!(extra.at_eof());

    // The client sees it as the node's error.
    let mut client = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
    match client.call(&Request::Hello) {
        Err(ClientError::Remote { code, .. }) => assert_eq!(code, proto::BUSY),
        other => panic!("expected busy, got {other:?}"),
    }

    // Once one closes, there is room again.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut client = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
        match client.call(&Request::Hello) {
            Ok(hello) => {
                assert_eq!(hello["node_id"], "test");
                break;
            }
            Err(ClientError::Remote { code, .. }) if code == proto::BUSY => {
                assert!(Instant::now() < deadline, "no room after a close");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(other) => panic!("{other}"),
        }
    }
}

#[test]
fn stop_removes_the_socket_and_closes_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let server = start(&path, Options::default());
    let mut raw = Raw::connect(&path);
    raw.hello(1);
    let started = Instant::now();
    server.stop();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!path.exists());
    assert!(raw.at_eof());
    server.stop(); // idempotent
    drop(server);

    let server = start(&path, Options::default());
    drop(server);
    assert!(!path.exists(), "drop stops too");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    drop(UnixListener::bind(&path).unwrap()); // leaves the file, nothing listening
    assert!(path.exists());
    let server = start(&path, Options::default());
    Raw::connect(&path).hello(1);

    let error = ControlServer::start(&path, Arc::new(TestHandler)).unwrap_err();
    assert!(
        matches!(error, ControlServerError::InUse { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "another node serves {}: stop it or use another data_dir",
            path.display()
        )
    );
    // The refused start left the live server alone.
    Raw::connect(&path).hello(2);
    drop(server);

    std::fs::write(&path, b"not a socket").unwrap();
    let error = ControlServer::start(&path, Arc::new(TestHandler)).unwrap_err();
    assert!(error.to_string().contains("is not a socket"), "{error}");
    assert!(path.exists(), "a file that is not a socket is left alone");
}

#[test]
fn stop_leaves_a_socket_that_is_not_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let server = start(&path, Options::default());
    std::fs::remove_file(&path).unwrap();
    let _other = UnixListener::bind(&path).unwrap();
    server.stop();
    assert!(path.exists());
}

#[test]
fn the_client_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let error = ControlClient::connect(&path, Duration::from_secs(1)).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "no node control socket at {}: is fathom-node running with this data_dir? (--node DIR|SOCKET)",
            path.display()
        )
    );
    drop(UnixListener::bind(&path).unwrap());
    let error = ControlClient::connect(&path, Duration::from_secs(1)).unwrap_err();
    assert!(matches!(error, ClientError::Refused { .. }), "{error:?}");
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"").unwrap();
    let error = ControlClient::connect(&path, Duration::from_secs(1)).unwrap_err();
    assert!(matches!(error, ClientError::NotASocket { .. }), "{error:?}");
    std::fs::remove_file(&path).unwrap();

    let _server = start(&path, Options::default());
    let mut client = ControlClient::connect(&path, Duration::from_secs(5)).unwrap();
    let hello: Hello = serde_json::from_value(client.call(&Request::Hello).unwrap()).unwrap();
    assert_eq!(hello.version, proto::VERSION);
    match client.call(&Request::Layers {
        volume: Some("nope".into()),
    }) {
        Err(ClientError::Remote { code, message }) => {
            assert_eq!(code, proto::UNKNOWN_VOLUME);
            assert_eq!(message, "no volume \"nope\": this node has vol0");
        }
        other => panic!("{other:?}"),
    }
    // A call that outlasts its timeout, then the late answer is skipped by the next call.
    let run = Request::Run {
        volume: "vol0".into(),
        rw: "randread".into(),
        bs: 4096,
        iodepth: 1,
        runtime_ms: 300,
        ramp_ms: 0,
        size: None,
        seed: None,
        rwmixread: None,
    };
    let error = client
        .call_with_timeout(&run, Duration::from_millis(50))
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error:?}");
    assert!(error.to_string().contains("--timeout"), "{error}");
    assert_eq!(client.call(&Request::Volumes).unwrap()["echo"], "volumes");
    assert_eq!(client.call(&run).unwrap()["slept_ms"], 300);
}
