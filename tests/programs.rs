//! The programs as a user runs them: fathom-node's life cycle and errors, fathom-bench's
//! workloads and argument checks.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NODE: &str = env!("CARGO_BIN_EXE_fathom-node");
const BENCH: &str = env!("CARGO_BIN_EXE_fathom-bench");

fn hugepages_flag() -> Option<&'static str> {
    // The test script reserves hugepages for the run; without them, say so and use normal pages.
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
    (free < 64).then(|| {
        eprintln!("note: fewer than 64 free hugepages; running with --no-hugepages");
        "--no-hugepages"
    })
}

/// Runs fathom-bench with `args` (on hugepages when reserved), fails the test with its stderr
/// if it fails, and returns its JSON output.
fn bench_json(what: &str, args: &[&str]) -> serde_json::Value {
    let mut command = Command::new(BENCH);
    command.args(args);
    if let Some(flag) = hugepages_flag() {
        command.arg(flag);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("{what}: output is not JSON ({error})"))
}

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("node.toml");
    std::fs::write(
        &path,
        // Its own stats region, no metrics port and no NBD port, so tests never touch a real
        // node's.
        format!(
            "[node]\nid = \"prog\"\ndata_dir = {:?}\n[telemetry]\nregion = {:?}\nmetrics = \"\"\n[nbd]\nlisten = []\n{body}",
            dir.display().to_string(),
            dir.join("stats").display().to_string()
        ),
    )
    .unwrap();
    path
}

const ONE_VOLUME: &str = "[dma]\nsize = \"16MiB\"\n[[device]]\nname = \"nvme0\"\ndriver = \"mem\"\nmedia = \"file\"\nsize = \"64MiB\"\n[[volume]]\nname = \"vol0\"\ndevice = \"nvme0\"\nsize = \"64MiB\"\n";

#[test]
fn the_node_starts_logs_its_layout_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), ONE_VOLUME);
    let mut command = Command::new(NODE);
    command
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .env("NO_COLOR", "1");
    if let Some(flag) = hugepages_flag() {
        command.arg(flag);
    }
    let mut child = command.spawn().unwrap();
    let mut log = Vec::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = Instant::now();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let ready = line.contains("ready;");
        log.push(line);
        if ready {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node did not get ready:\n{}",
            log.join("\n")
        );
    }
    let text = log.join("\n");
    for expect in [
        "reactors on cores [0]",
        "DMA memory: 16 MiB",
        "device nvme0: driver mem",
        "model \"Fathom mem NVMe\"",
        "volume vol0: 64 MiB",
    ] {
        assert!(
            text.contains(expect),
            "start-up log lacks {expect:?}:\n{text}"
        );
    }
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let rest: Vec<String> = lines.map(|line| line.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "exit status {status}: {}",
        rest.join("\n")
    );
    assert!(
        rest.iter().any(|line| line.contains("stopped cleanly")),
        "{}",
        rest.join("\n")
    );
    let image = std::fs::metadata(dir.path().join("nvme0.img")).unwrap();
    assert_eq!(
        image.len(),
        64 << 20,
        "the media file is created at the configured size"
    );
}

fn run_failing(args: &[&str]) -> String {
    let output = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(!output.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bad_config_names_the_key_the_value_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &ONE_VOLUME.replace(
            "size = \"64MiB\"\n[[volume]]",
            "size = \"64MiB\"\nblock_size = 520\n[[volume]]",
        ),
    );
    let error = run_failing(&[NODE, "--config", config.to_str().unwrap()]);
    assert!(
        error.contains("device[0].block_size")
            && error.contains("520")
            && error.contains("512 or 4096"),
        "{error}"
    );
    let config = write_config(dir.path(), "[reactor]\ncores = [4096]\n");
    let error = run_failing(&[NODE, "--config", config.to_str().unwrap()]);
    assert!(
        error.contains("reactor.cores[0]") && error.contains("this machine has cores"),
        "{error}"
    );
    let error = run_failing(&[NODE, "--config", "/nonexistent/fathom.toml"]);
    assert!(error.contains("/nonexistent/fathom.toml"), "{error}");
}

#[test]
fn missing_hugepages_are_explained_with_the_command_to_reserve_them() {
    let dir = tempfile::tempdir().unwrap();
    // Far more hugepages than any test machine reserves.
    let config = write_config(dir.path(), "[dma]\nsize = \"4TiB\"\n");
    let error = run_failing(&[NODE, "--config", config.to_str().unwrap()]);
    assert!(
        error.contains("vm.nr_hugepages=") && error.contains("--no-hugepages"),
        "{error}"
    );
}

#[test]
fn the_embedded_default_config_is_printed_and_valid() {
    let output = Command::new(NODE).arg("--print-config").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("media = \"file\""));
    let output = Command::new(NODE).arg("--check").output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn bench_runs_every_media_and_mode_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    for (media, mode, rw) in [
        ("null", "inline", "randread"),
        ("ram", "thread", "randwrite"),
        ("file", "inline", "write"),
        ("ram", "inline", "read"),
    ] {
        let file = dir.path().join("bench.img");
        let file = file.to_str().unwrap();
        let args = [
            "--media",
            media,
            "--mode",
            mode,
            "--rw",
            rw,
            "--bs",
            "4k",
            "--iodepth",
            "8",
            "--size",
            "8M",
        ];
        let mut args = args.to_vec();
        args.extend([
            "--runtime",
            "0.3",
            "--ramp_time",
            "0",
            "--json",
            "--filename",
            file,
        ]);
        let report = bench_json(&format!("{media}/{mode}"), &args);
        assert!(report["iops"].as_f64().unwrap() > 0.0, "{report}");
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(
            report["bw_bytes"].as_f64().unwrap().round(),
            (report["iops"].as_f64().unwrap() * 4096.0).round()
        );
    }
}

#[test]
fn bench_refuses_bad_arguments_before_any_io() {
    for (args, expect) in [
        (vec!["--iodepth", "0"], "--iodepth 0"),
        (
            vec!["--bs", "1000"],
            "not a multiple of the 512-byte sector",
        ),
        (vec!["--size", "6k", "--bs", "4k"], "multiple of --bs"),
        (vec!["--cores", "4096"], "this machine has"),
        (vec!["--rw", "sideways"], "possible values"),
    ] {
        let mut full = vec![BENCH, "--runtime", "0.1"];
        full.extend(args.iter().copied());
        let error = run_failing(&full);
        assert!(error.contains(expect), "{args:?}: {error}");
    }
}

#[test]
fn verify_finds_what_was_written_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let targets: [(&str, &[&str]); 3] = [
        ("mem ram inline", &["--media", "ram", "--mode", "inline"]),
        ("mem file thread", &["--media", "file", "--mode", "thread"]),
        ("uring file", &["--driver", "uring"]),
    ];
    for (name, target) in targets {
        for rw in [
            "read",
            "write",
            "randread",
            "randwrite",
            "readwrite",
            "randrw",
        ] {
            let file = dir
                .path()
                .join(format!("{}-{rw}.img", name.replace(' ', "-")));
            let mut args = target.to_vec();
            args.extend([
                "--verify",
                "--rw",
                rw,
                "--bs",
                "8k",
                "--iodepth",
                "16",
                "--size",
                "4M",
                "--json",
                "--filename",
            ]);
            args.push(file.to_str().unwrap());
            let report = bench_json(&format!("{name} {rw}"), &args);
            assert_eq!(report["mismatches"], 0, "{name} {rw}: {report}");
            assert_eq!(
                report["verify"][0]["blocks_written"], 512,
                "{name} {rw}: every 8 KiB block of 4 MiB"
            );
            assert_eq!(report["verify"][0]["blocks_read"], 512, "{name} {rw}");
        }
    }
    let error = run_failing(&[BENCH, "--verify", "--media", "null"]);
    assert!(
        error.contains("--verify needs media that store data"),
        "{error}"
    );
}

#[test]
fn bench_plots_the_latency_distribution_of_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("latency.svg");
    let svg_path = svg.to_str().unwrap();
    bench_json(
        "--plot",
        &[
            "--media",
            "ram",
            "--mode",
            "thread",
            "--runtime",
            "0.5",
            "--ramp_time",
            "0",
            "--json",
            "--plot",
            svg_path,
        ],
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert_eq!(text.matches("<polyline").count(), 5, "one curve per stage");
    for stage in ["queue", "submit", "device", "complete", "total"] {
        assert!(
            text.contains(&format!("<title>{stage}</title>")),
            "{stage} curve"
        );
    }
    let error = run_failing(&[
        BENCH,
        "--runtime",
        "0.2",
        "--telemetry",
        "off",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(error.contains("--plot needs telemetry"), "{error}");
}

/// A loop block device over a temporary file, detached when dropped.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn new(backing: &std::path::Path, bytes: u64) -> Self {
        std::fs::File::create(backing)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let output = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .expect("losetup (util-linux)");
        assert!(
            output.status.success(),
            "losetup needs root and the loop driver: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self {
            path: String::from_utf8(output.stdout).unwrap().trim().to_string(),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

#[test]
fn bench_on_a_block_device_verifies_and_refuses_a_size_beyond_it() {
    let dir = tempfile::tempdir().unwrap();
    let device = LoopDevice::new(&dir.path().join("backing.img"), 8 << 20);
    let error = run_failing(&[
        BENCH,
        "--driver",
        "uring",
        "--filename",
        &device.path,
        "--size",
        "16M",
        "--runtime",
        "0.2",
    ]);
    assert!(
        error.contains("holds 8388608 bytes, less than device.size 16777216"),
        "{error}"
    );
    let args = [
        "--driver",
        "uring",
        "--filename",
        &device.path,
        "--size",
        "8M",
        "--rw",
        "randrw",
        "--verify",
        "--json",
    ];
    let report = bench_json("verify on the block device", &args);
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(
        report["verify"][0]["blocks_read"], 2048,
        "every 4 KiB block of the 8 MiB device"
    );
}
