//! The node's Prometheus endpoint: `GET /metrics` renders the stats region (read through the
//! same reader `fathom-stat` uses) in the text exposition format.
//!
//! One thread, one connection at a time, requests bounded in size and time: a scrape every
//! few seconds needs no more, and nothing here touches the data path.

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

pub struct MetricsServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `listen` and serves the region at `region` until dropped.
    pub fn start(listen: SocketAddr, region: PathBuf) -> std::io::Result<Self> {
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
                        if let Err(error) = serve(stream, &region) {
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

fn serve(mut stream: TcpStream, region: &std::path::Path) -> std::io::Result<()> {
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
                let body =
                    fathom_telemetry::prometheus::render(directory, &reader.snapshot(clock.now()));
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
