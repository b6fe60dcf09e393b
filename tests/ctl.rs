//! fathom-ctl as an operator runs it, against a control server with a scripted handler (no
//! node needed): what it sends, what it prints, its exit statuses.

use std::process::Command;
use std::sync::{Arc, Mutex};

use fathom_control::proto::{self, RemoteError, Request};
use fathom_control::{ControlServer, Handler, LayerRow, RuleRow, RunResult, VolumeRow};
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
