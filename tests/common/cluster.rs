//! Several fathom-node processes on loopback that replicate one volume: each on its own
//! directory, file media, NBD port and replication port, sharing a cluster key. Killed when
//! dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_hugepages, spawn, CTL};

/// The replicated volume's size, and the device's (room for its metadata after it).
pub const VOLUME_BYTES: u64 = 64 << 20;
const DEVICE_BYTES: u64 = 80 << 20;
/// Its block: the checker's 4 KiB, so a block the checker judges atomic is one device block.
pub const BLOCK_BYTES: u64 = 4096;

/// One node of a [`Cluster`].
pub struct ClusterNode {
    pub id: String,
    pub dir: PathBuf,
    pub replication: SocketAddr,
    /// Its NBD address while it runs.
    pub nbd: Option<SocketAddr>,
    child: Option<std::process::Child>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Nodes `a`, `b`, `c`... replicating `vol0` across all of them; the first is its first
/// primary.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    /// The cluster key every node holds.
    pub key: PathBuf,
    /// The control plane, when the nodes run on etcd.
    pub etcd: Option<fathom_cluster::local::LocalEtcd>,
    _dir: tempfile::TempDir,
}

/// Ports nobody listens on now, `count` different ones (all taken from the system before
/// any is let go, so that none is handed out twice).
fn free_ports(count: usize) -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

impl Cluster {
    /// Starts `count` nodes and waits until the primary's session to every replica is open.
    pub fn start(count: usize) -> Cluster {
        Self::start_with(count, "")
    }

    /// As [`Cluster::start`], with `extra` added to each node's config (its own sections).
    pub fn start_with(count: usize, extra: &str) -> Cluster {
        Self::start_full(count, extra, false, "")
    }

    /// As [`Cluster::start`], with `lines` added to each node's `[replication]` section.
    pub fn start_with_replication(count: usize, lines: &str) -> Cluster {
        Self::start_full(count, "", false, lines)
    }

    /// As [`Cluster::start`], each node serving /metrics on a port of its own
    /// ([`Cluster::metrics_address`]).
    pub fn start_with_metrics(count: usize) -> Cluster {
        Self::start_full(count, "", true, "")
    }

    /// As [`Cluster::start`], on a control plane: `members` etcd members on loopback, and each
    /// node under a lease of `lease_s` seconds. etcd names the first primary (node a, the one
    /// the config names, which seeds it).
    pub fn start_with_etcd(count: usize, members: usize, lease_s: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let etcd = fathom_cluster::local::LocalEtcd::start(dir.path(), members)
            .unwrap_or_else(|error| panic!("starting etcd: {error}"));
        let endpoints = etcd
            .endpoints()
            .iter()
            .map(|endpoint| format!("{endpoint:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let lines = format!("etcd = [{endpoints}]\nlease = \"{lease_s}s\"\n");
        Self::start_in(dir, count, "", true, "", &lines, Some(etcd))
    }

    /// As [`Cluster::start_with_etcd`] (one etcd member, a 2 s lease), each node with a pool
    /// of `pool_bytes` on a device of its own (`pool0`) for volumes made through etcd.
    pub fn start_with_pool(count: usize, pool_bytes: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let etcd = fathom_cluster::local::LocalEtcd::start(dir.path(), 1)
            .unwrap_or_else(|error| panic!("starting etcd: {error}"));
        let lines = format!("etcd = [{:?}]\nlease = \"2s\"\n", etcd.endpoints()[0]);
        let extra = format!(
            "[cluster.pool]\ndevice = \"pool0\"\nvolumes = 4\n\
             [[device]]\nname = \"pool0\"\ndriver = \"mem\"\nmedia = \"file\"\n\
             size = \"{pool_bytes}\"\nblock_size = {BLOCK_BYTES}\n"
        );
        Self::start_in(dir, count, &extra, true, "", &lines, Some(etcd))
    }

    fn start_full(count: usize, extra: &str, metrics: bool, replication: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, count, extra, metrics, replication, "", None)
    }

    fn start_in(
        dir: tempfile::TempDir,
        count: usize,
        extra: &str,
        metrics: bool,
        replication: &str,
        cluster_lines: &str,
        etcd: Option<fathom_cluster::local::LocalEtcd>,
    ) -> Cluster {
        let key = dir.path().join("cluster.key");
        std::fs::write(
            &key,
            (0..32u8)
                .map(|i| i.wrapping_mul(37) ^ 0x5c)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let ids: Vec<String> = (0..count)
            .map(|index| ((b'a' + index as u8) as char).to_string())
            .collect();
        let addresses = free_ports(ids.len());
        let table: String = ids
            .iter()
            .zip(&addresses)
            .map(|(id, address)| {
                format!("[[cluster.node]]\nid = \"{id}\"\nreplication = \"{address}\"\n")
            })
            .collect();
        let replicas = ids
            .iter()
            .map(|id| format!("\"{id}\""))
            .collect::<Vec<_>>()
            .join(", ");
        // Two nodes per core at most: the test machine has two.
        let hugepages = free_hugepages() >= 32 * count as u64;
        let mut nodes = Vec::new();
        for (index, (id, address)) in ids.iter().zip(&addresses).enumerate() {
            let node_dir = dir.path().join(id);
            std::fs::create_dir_all(&node_dir).unwrap();
            let config = format!(
                "[node]\nid = \"{id}\"\ndata_dir = {data:?}\n\
                 [dma]\nsize = \"64MiB\"\nhugepages = {hugepages}\n\
                 [reactor]\ncores = [{core}]\npoll = \"shared\"\n\
                 [telemetry]\nregion = {region:?}\nmetrics = \"{metrics}\"\n\
                 [nbd]\nlisten = [\"127.0.0.1:0\"]\n\
                 [cluster]\nname = \"test\"\n{cluster_lines}{table}\
                 [replication]\nlisten = [\"{address}\"]\nkey_file = {key:?}\n{replication}\n\
                 [[device]]\nname = \"nvme0\"\ndriver = \"mem\"\nmedia = \"file\"\n\
                 size = \"{DEVICE_BYTES}\"\nblock_size = {BLOCK_BYTES}\n\
                 [[volume]]\nname = \"vol0\"\ndevice = \"nvme0\"\nsize = \"{VOLUME_BYTES}\"\n\
                 replicas = [{replicas}]\nprimary = \"{primary}\"\n{extra}",
                data = node_dir.display().to_string(),
                core = index % 2,
                region = node_dir.join("stats").display().to_string(),
                metrics = if metrics { "127.0.0.1:0" } else { "" },
                key = key.display().to_string(),
                primary = ids[0],
            );
            std::fs::write(node_dir.join("node.toml"), config).unwrap();
            nodes.push(ClusterNode {
                id: id.clone(),
                dir: node_dir,
                replication: *address,
                nbd: None,
                child: None,
                log: Default::default(),
            });
        }
        let mut cluster = Cluster {
            nodes,
            key,
            etcd,
            _dir: dir,
        };
        // Replicas first, so the primary finds them listening.
        for index in (0..count).rev() {
            cluster.start_node(index);
        }
        cluster.wait_open(0, Duration::from_secs(30));
        cluster
    }

    /// Starts node `index` (again) on its directory and config.
    pub fn start_node(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        assert!(node.child.is_none(), "node {} runs already", node.id);
        let (child, address, log) = spawn(&node.dir.join("node.toml"));
        node.child = Some(child);
        node.nbd = Some(address);
        node.log = log;
    }

    /// Kills node `index` with SIGKILL: no flush, no clean shutdown.
    pub fn kill(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let mut child = node.child.take().expect("the node runs");
        // SAFETY: sending a signal to our own child process, not yet waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        node.nbd = None;
    }

    /// Node `index`'s process id.
    pub fn pid(&self, index: usize) -> i32 {
        self.nodes[index]
            .child
            .as_ref()
            .expect("the node runs")
            .id() as i32
    }

    /// Waits for node `index`, killed from elsewhere, to be gone.
    pub fn reap(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if let Some(mut child) = node.child.take() {
            child.wait().unwrap();
        }
        node.nbd = None;
    }

    /// Sends `signal` to node `index` (SIGSTOP, SIGCONT).
    pub fn signal(&self, index: usize, signal: i32) {
        let child = self.nodes[index].child.as_ref().expect("the node runs");
        // SAFETY: sending a signal to our own child process, not yet waited for.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    pub fn uri(&self, index: usize) -> String {
        self.uri_of(index, "vol0")
    }

    /// Node `index`'s NBD export of `volume`.
    pub fn uri_of(&self, index: usize, volume: &str) -> String {
        format!(
            "nbd://{}/{volume}",
            self.nodes[index].nbd.expect("the node runs")
        )
    }

    pub fn log(&self, index: usize) -> String {
        self.nodes[index].log.lock().unwrap().join("\n")
    }

    /// Every running node's log, for a failure's message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.child.is_some())
            .map(|(index, node)| format!("--- node {}:\n{}", node.id, self.log(index)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `fathom-ctl --node DIR ARGS` against node `index`: its exit success and output.
    pub fn ctl(&self, index: usize, args: &[&str]) -> (bool, String) {
        run_ctl(
            Command::new(CTL)
                .arg("--node")
                .arg(&self.nodes[index].dir)
                .args(args),
        )
    }

    /// A checker client on node `index`'s NBD export, writing the first 4 MiB of the volume
    /// (blocks are overwritten many times).
    pub fn checker(&self, index: usize, seed: u64) -> fathom::checker::Client {
        let uri = fathom::nbd_client::NbdUri::parse(&self.uri(index)).unwrap();
        fathom::checker::Client::connect(
            &uri,
            fathom::checker::ClientOptions {
                seed,
                blocks: 1024,
                ..fathom::checker::ClientOptions::default()
            },
        )
        .unwrap()
    }

    /// Panics unless every node's copy of the volume is node `reference`'s, byte for byte;
    /// each copy's checksum.
    pub fn assert_copies_identical(&self, reference: usize) -> Vec<String> {
        let expected = self.volume_data(reference);
        let mut checksums = Vec::new();
        for index in 0..self.nodes.len() {
            let data = self.volume_data(index);
            if let Some(block) = first_difference(&expected, &data) {
                panic!(
                    "node {} differs from node {} first at block {block} (byte {})",
                    self.nodes[index].id,
                    self.nodes[reference].id,
                    block * BLOCK_BYTES
                );
            }
            checksums.push(format!(
                "{}={:08x}",
                self.nodes[index].id,
                crc32c::crc32c(&data)
            ));
        }
        checksums
    }

    /// `fathom-ctl --etcd ... --cluster test ARGS` against the control plane: its exit
    /// success and output.
    pub fn ctl_etcd(&self, args: &[&str]) -> (bool, String) {
        let endpoints = self.etcd.as_ref().expect("on etcd").endpoints().join(",");
        run_ctl(
            Command::new(CTL)
                .args(["--etcd", &endpoints, "--cluster", "test"])
                .args(args),
        )
    }

    /// `fathom-ctl --json replication` on node `index`: its one volume's row.
    pub fn replication(&self, index: usize) -> Value {
        let (ok, text) = self.ctl(index, &["--json", "replication"]);
        assert!(ok, "fathom-ctl replication: {text}");
        let rows: Value = serde_json::from_str(&text).unwrap();
        rows[0].clone()
    }

    /// Waits until node `index`, the primary, has every replica's session open and serves.
    pub fn wait_open(&self, index: usize, timeout: Duration) {
        self.wait_peers(index, timeout, "open", |peer| peer["state"] == "open");
        self.wait_serving(index, timeout);
    }

    /// Waits until node `index` is the primary and serves (a majority took its epoch).
    pub fn wait_serving(&self, index: usize, timeout: Duration) {
        let started = Instant::now();
        loop {
            let row = self.replication(index);
            if serves(&row) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "node {} does not serve as the primary after {timeout:?}: {row}\n{}",
                self.nodes[index].id,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Which of `candidates` serves as the primary, if one does.
    pub fn serving(&self, candidates: &[usize]) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .find(|&index| serves(&self.replication(index)))
    }

    /// Waits until every replica of primary `index` passes `check`.
    pub fn wait_peers(
        &self,
        index: usize,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) {
        let started = Instant::now();
        loop {
            let row = self.replication(index);
            let peers = row["peers"].as_array().cloned().unwrap_or_default();
            if !peers.is_empty() && peers.iter().all(&check) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the replicas of node {} are not all {what} after {timeout:?}: {row}\n{}",
                self.nodes[index].id,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where node `index` serves /metrics (from its log).
    pub fn metrics_address(&self, index: usize) -> SocketAddr {
        let log = self.log(index);
        let line = log
            .lines()
            .find_map(|line| line.split("Prometheus metrics on http://").nth(1))
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
        line.split('/').next().unwrap().parse().unwrap()
    }

    /// Node `index`'s /metrics body.
    pub fn scrape(&self, index: usize) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics_address(index)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap()
    }

    /// Node `index`'s media file.
    pub fn media(&self, index: usize) -> PathBuf {
        self.nodes[index].dir.join("nvme0.img")
    }

    /// The volume's bytes as node `index`'s media hold them (the volume starts at offset 0).
    pub fn volume_data(&self, index: usize) -> Vec<u8> {
        read_prefix(&self.media(index), VOLUME_BYTES)
    }
}

/// A node's `fathom-ctl replication` row says it is the primary and serves (a majority took
/// its epoch).
fn serves(row: &Value) -> bool {
    row["role"] == "primary" && row["in_sync"] == true
}

/// `fathom-ctl` as `command` runs it: its exit success and output.
fn run_ctl(command: &mut Command) -> (bool, String) {
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn read_prefix(path: &Path, bytes: u64) -> Vec<u8> {
    let mut data = std::fs::read(path).unwrap();
    data.resize(bytes as usize, 0);
    data
}

/// The first block where `a` and `b` differ, if any.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(BLOCK_BYTES as usize)
        .zip(b.chunks(BLOCK_BYTES as usize))
        .position(|(x, y)| x != y)
        .map(|block| block as u64)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
