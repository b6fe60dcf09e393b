//! fathom-ctl as an operator runs it, against a control server with a scripted handler (no
//! node needed): what it sends, what it prints, its exit statuses. `trace` runs against a
//! real node, whose engine holds the settings it shows and changes.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fathom_control::proto::{self, RemoteError, Request, TraceRow};
use fathom_control::{
    ClientError, ControlClient, ControlServer, Handler, LayerRow, RuleRow, RunResult, VolumeRow,
};
use serde_json::{json, Value};

const CTL: &str = env!("CARGO_BIN_EXE_fathom-ctl");

#[derive(Default)]
struct Scripted {
    seen: Mutex<Vec<Request>>,
}

impl Handler for Scripted {
    fn handle(&self, request: Request) -> Result<Value, RemoteError> {
        self.seen.lock().unwrap().push(request.clone());
        let value = match request {
            Request::Volumes => serde_json::to_value(vec![VolumeRow {
                name: "vol0".into(),
                device: "nvme0".into(),
                nsid: 1,
                first_lba: 0,
                blocks: 262_144,
                block_size: 4096,
                size_bytes: 1 << 30,
                core: 0,
                stubs: vec!["queue".into()],
                rules: 1,
            }]),
            Request::Layers {
                volume: Some(volume),
            } => {
                return Err(RemoteError::new(
                    proto::UNKNOWN_VOLUME,
                    format!("no volume {volume:?}: this node has vol0 (fathom-ctl volumes)"),
                ))
            }
            Request::StubSet { volume, layer } => serde_json::to_value(LayerRow {
                volume,
                layer,
                state: "stub".into(),
                detail: String::new(),
            }),
            Request::InjectAdd {
                target,
                layer,
                rule,
            } => serde_json::to_value(RuleRow {
                target,
                layer: layer.unwrap_or_else(|| "device".into()),
                index: 0,
                rule,
            }),
            Request::InjectClear { .. } => Ok(json!({"cleared": 2})),
            Request::Run { volume, .. } => serde_json::to_value(RunResult {
                volume,
                core: 0,
                ios: 1000,
                bytes: 1000 * 4096,
                errors: 0,
                elapsed_ns: 10_000_000,
                cpu_ns: 10_000_000,
                waited_ios: 10,
                wait_ns: 1_000_000,
            }),
            _ => Ok(Value::Null),
        };
        Ok(value.unwrap())
    }
}

struct Node {
    dir: tempfile::TempDir,
    handler: Arc<Scripted>,
    _server: ControlServer,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let handler = Arc::new(Scripted::default());
    let server = ControlServer::start(&dir.path().join("control.sock"), handler.clone()).unwrap();
    Node {
        dir,
        handler,
        _server: server,
    }
}

/// Runs fathom-ctl against `node`: exit status, stdout, stderr.
fn ctl(node: &Node, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(CTL)
        .arg("--node")
        .arg(node.dir.path())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn tables_json_and_the_nodes_errors() {
    let node = node();
    let (status, out, err) = ctl(&node, &["volumes"]);
    assert_eq!(status, 0, "{err}");
    assert!(out.starts_with("NAME"), "{out}");
    assert!(
        out.contains("vol0") && out.contains("1GiB") && out.contains("queue"),
        "{out}"
    );

    let (status, out, _) = ctl(&node, &["volumes", "--json"]);
    assert_eq!(status, 0);
    let volumes: Vec<VolumeRow> = serde_json::from_str(&out).unwrap();
    assert_eq!(volumes[0].name, "vol0");

    let (status, out, err) = ctl(&node, &["layers", "nope"]);
    assert_eq!(status, 1);
    assert_eq!(out, "");
    assert_eq!(
        err,
        "fathom-ctl: no volume \"nope\": this node has vol0 (fathom-ctl volumes)\n"
    );

    let (status, _, err) = ctl(&node, &["stub", "set", "vol0", "cache"]);
    assert_eq!(status, 2, "{err}");
}

#[test]
fn inject_and_stub_send_what_the_flags_say() {
    let node = node();
    let (status, out, err) = ctl(
        &node,
        &[
            "inject",
            "add",
            "nvme0",
            "--layer",
            "media",
            "--ops",
            "read",
            "--latency",
            "fixed(50us)",
            "--fraction",
            "0.5",
        ],
    );
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        out,
        "added rule 0 at nvme0 media: ops=read fraction=0.5 latency=50us\n"
    );
    let (status, out, _) = ctl(&node, &["inject", "clear", "nvme0"]);
    assert_eq!(status, 0);
    assert_eq!(out, "cleared 2 rules from nvme0\n");
    let (status, out, _) = ctl(&node, &["stub", "set", "vol0", "queue"]);
    assert_eq!(status, 0);
    assert!(out.contains("vol0") && out.contains("stub"), "{out}");

    let seen = node.handler.seen.lock().unwrap();
    assert_eq!(
        seen[0],
        Request::InjectAdd {
            target: "nvme0".into(),
            layer: Some("media".into()),
            rule: json!({"ops": ["read"], "latency": "50us", "fraction": 0.5}),
        }
    );
    assert_eq!(
        seen[1],
        Request::InjectClear {
            target: "nvme0".into(),
            layer: None
        }
    );
}

#[test]
fn run_prints_rates_and_waits() {
    let node = node();
    let (status, out, err) = ctl(
        &node,
        &["run", "vol0", "--runtime", "0.01", "--ramp_time", "0"],
    );
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("IOPS 100000"), "{out}");
    assert!(
        out.contains("waited 10 IOs (1.00%), mean wait 100.0 us"),
        "{out}"
    );
    let seen = node.handler.seen.lock().unwrap();
    assert!(
        matches!(
            seen[0],
            Request::Run {
                runtime_ms: 10,
                ramp_ms: 0,
                bs: 4096,
                iodepth: 32,
                ..
            }
        ),
        "{:?}",
        seen[0]
    );
}

#[test]
fn no_node_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(CTL)
        .arg("--node")
        .arg(dir.path())
        .arg("volumes")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.starts_with("fathom-ctl: no node control socket at ")
            && err.contains("control.sock: is fathom-node running with this data_dir?"),
        "{err}"
    );
}

/// Two volumes over a ram device: vol0 takes `[telemetry.trace]`'s sampling, vol1 its own.
fn tracing_node(trace: &str) -> common::Node {
    common::Node::start_config(
        tempfile::tempdir().unwrap(),
        &format!(
            "[telemetry.trace]\n{trace}\n\
             [nbd]\nlisten = [\"127.0.0.1:0\"]\n\
             [[device]]\nname = \"nvme0\"\ndriver = \"mem\"\nmedia = \"ram\"\nsize = \"128MiB\"\n\
             [[volume]]\nname = \"vol0\"\ndevice = \"nvme0\"\nsize = \"64MiB\"\n\
             [[volume]]\nname = \"vol1\"\ndevice = \"nvme0\"\noffset = \"64MiB\"\nsize = \"64MiB\"\n\
             [volume.trace]\nrate = 8\ntail = \"off\"\n"
        ),
    )
}

/// fathom-ctl against a real node, which may refuse: exit status, stdout, stderr.
fn node_ctl(node: &common::Node, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(common::CTL)
        .arg("--node")
        .arg(node.dir.path())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn trace_rows(node: &common::Node, args: &[&str]) -> Vec<TraceRow> {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&node.ctl(&args)).unwrap()
}

#[test]
fn trace_show_and_set_on_a_real_node() {
    let node = tracing_node("rate = 64\ntail = \"2ms\"");
    let shown = node.ctl(&["trace", "show"]);
    assert_eq!(
        shown,
        "VOLUME  RATE  TAIL  READ  WRITE  FLUSH  WRITE_ZEROES\n\
         vol0    1/64  2ms   2ms   2ms    2ms    2ms\n\
         vol1    1/8   off   -     -      -      -\n",
        "{}",
        node.log()
    );
    let rows = trace_rows(&node, &["trace", "show", "vol1"]);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].rate, rows[0].tail.as_str()), (8, "off"));
    assert_eq!(rows[0].thresholds_ns.len(), 4);
    assert!(
        rows[0].thresholds_ns.values().all(Option::is_none),
        "{rows:?}"
    );

    // One volume, both settings: the other volume keeps its own.
    let out = node.ctl(&["trace", "set", "vol0", "--tail", "500us", "--rate", "0"]);
    assert!(
        out.starts_with("set rate off, tail 500us on vol0\nVOLUME"),
        "{out}"
    );
    let shown = node.ctl(&["trace", "show"]);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(
        lines[1], "vol0    off   500us  500us  500us  500us  500us",
        "{shown}"
    );
    assert_eq!(
        lines[2], "vol1    1/8   off    -      -      -      -",
        "{shown}"
    );
    let rows = trace_rows(&node, &["trace", "show", "vol0"]);
    for (op, threshold) in &rows[0].thresholds_ns {
        let ns = threshold.unwrap_or_else(|| panic!("{op}: no threshold: {rows:?}"));
        assert!(ns.abs_diff(500_000) <= 1_000, "{op}: {ns} ns");
    }

    // Every volume: p99.9, learned from IOs. Nothing has run yet, so none is in force.
    let out = node.ctl(&["trace", "set", "--tail", "p99.9"]);
    assert!(out.starts_with("set tail p99.9 on vol0, vol1\n"), "{out}");
    let rows = trace_rows(&node, &["trace", "show"]);
    assert_eq!(
        rows.iter()
            .map(|row| (row.volume.as_str(), row.rate, row.tail.as_str()))
            .collect::<Vec<_>>(),
        [("vol0", 0, "p99.9"), ("vol1", 8, "p99.9")]
    );
    assert!(
        rows.iter()
            .all(|row| row.thresholds_ns.values().all(Option::is_none)),
        "{rows:?}"
    );
    // Reads on vol0 teach it a read threshold (at most a second after 1000 IOs); its writes
    // and vol1 still have none.
    node.ctl(&[
        "run",
        "vol0",
        "--rw",
        "randread",
        "--iodepth",
        "4",
        "--runtime",
        "0.5",
        "--ramp_time",
        "0",
    ]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let read = loop {
        let rows = trace_rows(&node, &["trace", "show", "vol0"]);
        if let Some(ns) = rows[0].thresholds_ns["read"] {
            break ns;
        }
        assert!(Instant::now() < deadline, "no p99.9 learned: {rows:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(read > 0);
    let shown = node.ctl(&["trace", "show"]);
    let lines: Vec<&str> = shown.lines().collect();
    assert!(
        lines[1].starts_with("vol0    off   p99.9")
            && lines[1].contains(" (p99.9)  -      -      -"),
        "{shown}"
    );
    assert!(lines[2].starts_with("vol1    1/8   p99.9"), "{shown}");
    assert!(
        lines[3].contains("a p99.9 is learned once the op has 1000 IOs"),
        "{shown}"
    );

    // A bad tail is a usage error, with the accepted forms; nothing changed.
    let (status, out, err) = node_ctl(&node, &["trace", "set", "vol0", "--tail", "fast"]);
    assert_eq!((status, out.as_str()), (2, ""), "{err}");
    assert!(
        err.contains("\"fast\" is not a duration")
            && err.contains("500ns, 200us, 1.5ms, 2s")
            && err.contains("\"p99.9\"")
            && err.contains("\"off\""),
        "{err}"
    );
    // The node refuses it too, whole: the rate given with it is not applied either.
    let mut client = ControlClient::connect(
        &fathom_control::socket_path(node.dir.path()),
        Duration::from_secs(10),
    )
    .unwrap();
    let refused = client.call(&Request::TraceSet {
        volume: Some("vol0".into()),
        rate: Some(5),
        tail: Some("fast".into()),
    });
    let Err(ClientError::Remote { code, message }) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(code, proto::BAD_REQUEST);
    assert!(
        message.starts_with("trace_set: tail: \"fast\" is not a duration")
            && message.contains("\"p99.9\"")
            && message.contains("\"off\""),
        "{message}"
    );
    let refused = client.call(&Request::TraceSet {
        volume: None,
        rate: None,
        tail: None,
    });
    let Err(ClientError::Remote { code, message }) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(code, proto::BAD_REQUEST);
    assert!(message.contains("nothing to change"), "{message}");
    let rows = trace_rows(&node, &["trace", "show", "vol0"]);
    assert_eq!((rows[0].rate, rows[0].tail.as_str()), (0, "p99.9"));

    // An unknown volume is refused, with the volumes there are.
    for args in [
        &["trace", "set", "vol9", "--rate", "1"][..],
        &["trace", "show", "vol9"][..],
    ] {
        let (status, out, err) = node_ctl(&node, args);
        assert_eq!((status, out.as_str()), (1, ""), "{args:?}: {err}");
        assert_eq!(
            err, "fathom-ctl: no volume \"vol9\"; the volumes are: vol0, vol1\n",
            "{args:?}"
        );
    }
    let rows = trace_rows(&node, &["trace", "show"]);
    assert_eq!((rows[0].rate, rows[1].rate), (0, 8));
    node.stop();
}

#[test]
fn trace_on_a_node_without_tracing_says_how_to_turn_it_on() {
    let node = tracing_node("enabled = false");
    let (status, out, err) = node_ctl(&node, &["trace", "show"]);
    assert_eq!((status, out.as_str()), (1, ""), "{err}");
    assert!(
        err.contains("tracing is off on this node")
            && err.contains("[telemetry.trace] enabled = true"),
        "{err}"
    );
    let (status, _, err) = node_ctl(&node, &["trace", "set", "--rate", "1"]);
    assert_eq!(status, 1, "{err}");
    assert!(err.contains("tracing is off"), "{err}");
    node.stop();
}
