//! A fathom-node started by a test, on its own directory and ports, stopped when dropped.
#![allow(dead_code)]

pub mod cluster;
pub mod health;
pub mod otlp;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const NODE: &str = env!("CARGO_BIN_EXE_fathom-node");
pub const CTL: &str = env!("CARGO_BIN_EXE_fathom-ctl");

pub const VOLUME_BYTES: u64 = 64 << 20;

/// A fathom-node serving two 64 MiB volumes (vol0, vol1) on a ram device over NBD on a port
/// of its own. Stopped (SIGTERM) when dropped.
pub struct Node {
    pub child: Child,
    pub address: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn start() -> Node {
        Self::start_with(tempfile::tempdir().unwrap(), "")
    }

    /// A node whose `[nbd]` section also holds `nbd_extra`.
    pub fn start_with(dir: tempfile::TempDir, nbd_extra: &str) -> Node {
        Self::start_config(
            dir,
            &format!(
                "[nbd]\nlisten = [\"127.0.0.1:0\"]\n{nbd_extra}\n\
                 [[device]]\nname = \"nvme0\"\ndriver = \"mem\"\nmedia = \"ram\"\nsize = \"128MiB\"\n\
                 [[volume]]\nname = \"vol0\"\ndevice = \"nvme0\"\nsize = \"64MiB\"\n\
                 [[volume]]\nname = \"vol1\"\ndevice = \"nvme0\"\noffset = \"64MiB\"\nsize = \"64MiB\"\n"
            ),
        )
    }

    /// A node with `[node]`, `[dma]` and `[telemetry]` made here (its own directory, region
    /// and no metrics port) and the rest from `body` (which must listen for NBD on a port).
    pub fn start_config(dir: tempfile::TempDir, body: &str) -> Node {
        let config = dir.path().join("node.toml");
        let hugepages = free_hugepages() >= 64;
        std::fs::write(
            &config,
            format!(
                "[node]\nid = \"test\"\ndata_dir = {dir:?}\n[dma]\nsize = \"64MiB\"\nhugepages = {hugepages}\n\
                 [telemetry]\nregion = {region:?}\nmetrics = \"\"\n{body}",
                dir = dir.path().display().to_string(),
                region = dir.path().join("stats").display().to_string(),
            ),
        )
        .unwrap();
        let (child, address, log) = spawn(&config);
        Node {
            child,
            address,
            log,
            dir,
        }
    }

    /// Stops the node (SIGTERM) and starts it again on the same directory, config and
    /// region paths (a new NBD port).
    pub fn restart(mut self) -> Node {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "node exit status {status}:\n{}",
            self.log()
        );
        let (child, address, log) = spawn(&self.dir.path().join("node.toml"));
        self.child = child;
        self.address = address;
        self.log = log;
        self
    }

    /// Kills the node with SIGKILL (a crash: no flush, no clean shutdown), unless something
    /// killed it already, and starts it again on the same directory, config and region paths
    /// (a new NBD port). Fails unless SIGKILL is what ended it.
    pub fn restart_after_kill(self) -> Node {
        self.restart_after_kill_with(|_| {})
    }

    /// As [`Node::restart_after_kill`], calling `while_down` with the node's directory once the
    /// process is gone and before it starts again (to damage its media, say).
    pub fn restart_after_kill_with(mut self, while_down: impl FnOnce(&std::path::Path)) -> Node {
        // SAFETY: sending a signal to our own child process; it has not been waited for, so
        // its pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let status = self.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "node exit status {status}, not SIGKILL:\n{}",
            self.log()
        );
        while_down(self.dir.path());
        let (child, address, log) = spawn(&self.dir.path().join("node.toml"));
        self.child = child;
        self.address = address;
        self.log = log;
        self
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.address)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `fathom-ctl --node DIR ARGS` against this node, which must succeed: its output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let output = Command::new(CTL)
            .arg("--node")
            .arg(self.dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "fathom-ctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Stops the node and returns its whole log.
    pub fn stop(mut self) -> String {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log();
        assert!(status.success(), "node exit status {status}:\n{log}");
        log
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts fathom-node on `config`; returns it, its NBD address and its log (kept drained).
pub fn spawn(config: &std::path::Path) -> (Child, SocketAddr, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(NODE)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    // Keeps draining the log so the node never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line
                .split("NBD: serving nbd://")
                .nth(1)
                .or_else(|| line.split("NBD: serving nbds://").nth(1))
            {
                let address = rest.split('/').next().unwrap().to_string();
                let _ = tx.send(address);
            }
            sink.lock().unwrap().push(line);
        }
    });
    let address: SocketAddr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(address) => address.parse().unwrap(),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "the node did not start serving NBD:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
    };
    (child, address, log)
}

pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Panics unless promtool takes `body` as metrics text.
pub fn promtool_check(body: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
