//! The node's Prometheus endpoint: `GET /metrics` renders the stats region (read through the
//! same reader `fathom-stat` uses) in the text exposition format.
//!
//! One thread, one connection at a time, requests bounded in size and time: a scrape every
//! few seconds needs no more, and nothing here touches the data path. Each scrape opens the
//! region afresh, so it names the volumes the node has at that moment (created or deleted
//! while it runs) and follows a node that restarted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fathom_telemetry::region::RegionReader;
use fathom_telemetry::Clock;

const MAX_REQUEST_BYTES: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// More metrics text, rendered at each scrape (replication's, from live state in the node).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

pub struct MetricsServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `listen` and serves the region at `region` until dropped.
    pub fn start(listen: SocketAddr, region: PathBuf) -> std::io::Result<Self> {
        Self::start_with(listen, region, None)
    }

    /// As [`MetricsServer::start`], with `extra` text after the region's.
    pub fn start_with(
        listen: SocketAddr,
        region: PathBuf,
        extra: Option<ExtraMetrics>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_for_thread = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop_for_thread.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        if let Err(error) = serve(stream, &region, extra.as_ref()) {
                            tracing::debug!("metrics request: {error}");
                        }
                    }
                }
            })?;
        Ok(Self {
            address,
            stop,
            thread: Some(thread),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.address, IO_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    mut stream: TcpStream,
    region: &std::path::Path,
    extra: Option<&ExtraMetrics>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..read]);
        if request.len() > MAX_REQUEST_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            );
        }
    }
    let line = request
        .split(|&byte| byte == b'\r')
        .next()
        .unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => match RegionReader::open(region) {
            Ok(reader) => {
                let directory = reader.directory();
                let clock = Clock::recorded(directory.clock_source, directory.tsc_hz);
                let mut body =
                    fathom_telemetry::prometheus::render(directory, &reader.snapshot(clock.now()));
                if let Some(extra) = extra {
                    body.push_str(&extra());
                }
                respond(
                    &mut stream,
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    &body,
                )
            }
            Err(error) => respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                &format!("{error}\n"),
            ),
        },
        (Some("GET"), Some("/")) => respond(
            &mut stream,
            "200 OK",
            "text/plain",
            "fathom-node: metrics at /metrics\n",
        ),
        (Some("GET"), _) => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n",
        ),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n",
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    write!(stream, "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    stream.flush()
}

/// Replication's metrics for the volumes this node holds copies of: epoch and role, and on
/// the primary each replica's session, sync, lag and resync, in the text exposition format.
pub fn replication_metrics(
    node: &str,
    roles: &[Arc<fathom_replication::role::VolumeRole>],
) -> String {
    use std::fmt::Write as _;
    let mut volumes = String::new();
    let mut replicas: [(&str, &str, &str, String); 9] = [
        (
            "fathom_replica_connected",
            "gauge",
            "1 if the primary's session to the replica is open.",
            String::new(),
        ),
        (
            "fathom_replica_in_sync",
            "gauge",
            "1 if the replica lacks no region (it counts for majorities and flushes).",
            String::new(),
        ),
        (
            "fathom_replica_behind_writes",
            "gauge",
            "Writes the primary began that the replica has not acknowledged.",
            String::new(),
        ),
        (
            "fathom_replica_dirty_bytes",
            "gauge",
            "Bytes in the regions the replica may lack (not yet durable there).",
            String::new(),
        ),
        (
            "fathom_replica_resync_left_bytes",
            "gauge",
            "Bytes in the regions the replica missed while away, still to be resynchronised.",
            String::new(),
        ),
        (
            "fathom_replica_resync_bytes_total",
            "counter",
            "Bytes resynchronised to the replica since the primary started (apart from client writes).",
            String::new(),
        ),
        (
            "fathom_replication_fenced",
            "gauge",
            "1 if this primary learned another node took the volume over.",
            String::new(),
        ),
        (
            "fathom_replication_resync_rate_bytes",
            "gauge",
            "The resync rate in force on this primary, bytes per second (0: no limit).",
            String::new(),
        ),
        (
            "fathom_replication_lease_left_seconds",
            "gauge",
            "On a control plane: how much longer this primary may acknowledge IO without renewing its etcd lease (0: it holds IO).",
            String::new(),
        ),
    ];
    let _ = writeln!(
        volumes,
        "# HELP fathom_replication_epoch The volume's epoch as this node knows it.\n\
         # TYPE fathom_replication_epoch gauge"
    );
    let mut primary = String::from(
        "# HELP fathom_replication_primary 1 if this node is the volume's primary.\n\
         # TYPE fathom_replication_primary gauge\n",
    );
    for role in roles {
        let volume = &role.volume;
        let _ = writeln!(
            volumes,
            "fathom_replication_epoch{{node=\"{node}\",volume=\"{volume}\"}} {}",
            role.epoch()
        );
        let status = role.primary_status();
        let _ = writeln!(
            primary,
            "fathom_replication_primary{{node=\"{node}\",volume=\"{volume}\"}} {}",
            status.is_some() as u8
        );
        let Some(status) = status else {
            continue;
        };
        let _ = writeln!(
            replicas[6].3,
            "fathom_replication_fenced{{node=\"{node}\",volume=\"{volume}\"}} {}",
            status.fenced() as u8
        );
        let _ = writeln!(
            replicas[7].3,
            "fathom_replication_resync_rate_bytes{{node=\"{node}\",volume=\"{volume}\"}} {}",
            status.resync_pace()
        );
        if let Some(left) = role.lease_left(std::time::Instant::now()) {
            let _ = writeln!(
                replicas[8].3,
                "fathom_replication_lease_left_seconds{{node=\"{node}\",volume=\"{volume}\"}} {:.3}",
                left.as_secs_f64()
            );
        }
        for peer in &status.peers {
            let labels = format!(
                "node=\"{node}\",volume=\"{volume}\",replica=\"{}\"",
                peer.node
            );
            let values = [
                (peer.state() == fathom_replication::layer::PeerState::Open) as u64,
                peer.in_sync() as u64,
                status.sequence().saturating_sub(peer.acknowledged()),
                peer.dirty_regions() * status.region_bytes,
                peer.stale_regions() * status.region_bytes,
                peer.resynced_bytes(),
            ];
            for (metric, value) in replicas.iter_mut().zip(values) {
                let _ = writeln!(metric.3, "{}{{{labels}}} {value}", metric.0);
            }
        }
    }
    let mut text = volumes + &primary;
    for (name, kind, help, lines) in &replicas {
        if !lines.is_empty() {
            let _ = write!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{lines}");
        }
    }
    text
}

/// The health monitor's view as metrics: each volume's state (one series per state, 1 for
/// the current one, as kube-state-metrics does), the detector's peer ratio, smoke write and
/// oldest op, the canaries per stage and drift, and whether the node is slow as a whole.
pub fn health_metrics(health: &crate::health::monitor::NodeHealth) -> String {
    use std::fmt::Write as _;
    const STATES: [&str; 4] = ["healthy", "suspect", "degraded", "recovering"];
    let node = &health.node;
    let mut families: Vec<(&str, &str, &str, String)> = vec![
        ("fathom_volume_health", "gauge", "1 for the volume's health state (healthy, suspect, degraded, recovering), 0 for the others.", String::new()),
        ("fathom_volume_health_peer_ratio", "gauge", "On a primary: its own write latency over its replicas' median for the same writes, at p50 and p99 (quantile), last second.", String::new()),
        ("fathom_volume_health_peer_ratio_baseline", "gauge", "The peer ratio learned while healthy.", String::new()),
        ("fathom_volume_health_smoke_seconds", "gauge", "The last smoke write's time, write to read-back.", String::new()),
        ("fathom_volume_health_oldest_op_seconds", "gauge", "A lower bound of the age of the oldest IO in flight on the volume's device queue (or of its smoke write).", String::new()),
        ("fathom_volume_health_degradations", "gauge", "Times the volume was degraded within the last hour.", String::new()),
        ("fathom_volume_health_replace", "gauge", "1 once the volume degraded so often that its device should be replaced.", String::new()),
        ("fathom_volume_drift", "gauge", "1 while the clients' IO shape differs from its recent past (drift, not a regression).", String::new()),
        ("fathom_canary_red", "gauge", "1 while the volume's canary is red: a stage's p99 over its baseline beyond the noise band.", String::new()),
        ("fathom_canary_failures_total", "counter", "Canary rounds that failed (an IO error, or data read back wrong).", String::new()),
        ("fathom_canary_stage_seconds", "gauge", "The canary's p50, p90 and p99 (quantile) per stage over its last interval.", String::new()),
        ("fathom_canary_stage_baseline_seconds", "gauge", "The canary's learned baseline per stage and quantile (p50 and p90, the ones judged).", String::new()),
    ];
    let mut put = |family: usize, labels: &str, value: f64| {
        let (name, _, _, lines) = &mut families[family];
        let _ = writeln!(lines, "{name}{{{labels}}} {value}");
    };
    for volume in &health.volumes {
        let labels = format!("node=\"{node}\",volume=\"{}\"", volume.volume);
        for state in STATES {
            put(
                0,
                &format!("{labels},state=\"{state}\""),
                (volume.health == state) as u8 as f64,
            );
        }
        let inputs = &volume.inputs;
        for peer in &inputs.peer_ratios {
            let labels = format!("{labels},quantile=\"{}\"", peer.quantile.fraction());
            if let Some(ratio) = peer.ratio {
                put(1, &labels, ratio);
            }
            if let Some(baseline) = peer.baseline {
                put(2, &labels, baseline);
            }
        }
        if let Some(smoke) = inputs.smoke_ms {
            put(3, &labels, smoke / 1e3);
        }
        put(4, &labels, inputs.oldest_op_ms / 1e3);
        put(5, &labels, volume.degradations as f64);
        put(6, &labels, volume.replace as u8 as f64);
        put(7, &labels, !volume.drift.is_empty() as u8 as f64);
        if let Some(canary) = &volume.canary {
            put(8, &labels, canary.red as u8 as f64);
            put(9, &labels, canary.failures as f64);
            for stage in &canary.stages {
                let at = [
                    ("0.5", stage.p50_us, stage.baseline_p50_us),
                    ("0.9", stage.p90_us, stage.baseline_p90_us),
                    ("0.99", stage.p99_us, None),
                ];
                for (quantile, value, baseline) in at {
                    let labels =
                        format!("{labels},stage=\"{}\",quantile=\"{quantile}\"", stage.stage);
                    put(10, &labels, value / 1e6);
                    if let Some(baseline) = baseline {
                        put(11, &labels, baseline / 1e6);
                    }
                }
            }
        }
    }
    let mut text = format!(
        "# HELP fathom_node_fault 1 while every volume of the node with IO is slow alike (a node fault, or node-wide load).\n\
         # TYPE fathom_node_fault gauge\n\
         fathom_node_fault{{node=\"{node}\"}} {}\n",
        health.node_fault.is_some() as u8
    );
    for (name, kind, help, lines) in &families {
        if !lines.is_empty() {
            let _ = write!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{lines}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_telemetry::region::{RegionSpec, StatsRegion, VolumeEntry};

    fn scrape(server: &MetricsServer) -> String {
        let mut stream = TcpStream::connect(server.address()).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    /// The value of `series` in a scrape, if it is there.
    fn value<'a>(body: &'a str, series: &str) -> Option<&'a str> {
        body.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn a_volume_created_while_the_node_runs_is_scraped_and_a_deleted_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats");
        let volume = |name: &str| VolumeEntry {
            name: name.into(),
            core_index: 0,
            block_size: 4096,
            size_bytes: 1 << 30,
            generation: 0,
        };
        let spec = RegionSpec {
            node_id: "n1".into(),
            cores: vec![0],
            volumes: vec![volume("vol0")],
            spare_volumes: 1,
            ops: vec!["read".into(), "write".into()],
            stages: vec!["device".into(), "total".into()],
            queues: Vec::new(),
        };
        let region = StatsRegion::create(&path, &spec, &Clock::monotonic()).unwrap();
        let reads = |slot: usize, ios: u64| {
            let recorder = region.series_recorder(slot, 0);
            recorder.record(1, 50_000, ios);
            recorder.publish_counts(ios, ios * 4096, 0);
        };
        let ios = |volume: &str| {
            format!("fathom_volume_ios_total{{node=\"n1\",volume=\"{volume}\",op=\"read\"}}")
        };
        let total = |volume: &str| {
            format!(
                "fathom_io_stage_seconds_count{{node=\"n1\",volume=\"{volume}\",op=\"read\",stage=\"total\"}}"
            )
        };
        reads(0, 10);
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), path).unwrap();
        let body = scrape(&server);
        assert_eq!(value(&body, &ios("vol0")), Some("10"), "{body}");
        assert!(!body.contains("volume=\"late\""), "{body}");

        region.set_volume(1, Some(&volume("late"))).unwrap();
        reads(1, 3);
        let body = scrape(&server);
        assert_eq!(value(&body, &ios("late")), Some("3"), "{body}");
        assert_eq!(value(&body, &total("late")), Some("3"), "{body}");
        assert_eq!(value(&body, &ios("vol0")), Some("10"), "{body}");

        region.set_volume(1, None).unwrap();
        let body = scrape(&server);
        assert!(!body.contains("volume=\"late\""), "{body}");
        assert_eq!(value(&body, &ios("vol0")), Some("10"), "{body}");
    }
}
