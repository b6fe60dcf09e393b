//! The NBD server: listeners, handshakes and connections, all polled by reactor tasks.
//!
//! One `Poller` task runs on every reactor. Reactor 0's also owns the listening sockets and
//! runs every handshake (not the data path); a connection that negotiated an export moves to
//! the poller of the reactor that owns the export's volume, so that its requests reach the
//! device queue without a cross-core hop. A poller reads each ready socket, parses as many
//! requests as its free request slots and buffers allow, submits them from the reactor's own
//! thread, and writes the replies of a loop iteration in one `writev` per connection.
//!
//! Per connection, request slots and the receive buffer are allocated when it starts serving;
//! DMA buffers come from a per-reactor cache by power-of-two size class, so steady-state IO
//! allocates nothing. When slots, buffers or the engine's queue run out, the poller stops
//! reading that socket (TCP pushes back on the client) and resumes after completions.
//!
//! Telemetry: the `receive` stage runs from just before the socket read that brought a request
//! to the moment it is submitted, `reply` from the end of the engine's callbacks to the socket
//! having taken the whole reply, and `total` from the first to the last.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::handshake::{ExportInfo, Handshake, HandshakeConfig, HandshakeError, State};
use super::proto::{
    self, cmd_flag, reply_flag, reply_type, transmission_flag, AfterRejection, Command, Errno,
    Limits, Request, REQUEST_HEADER_LEN,
};
use fathom_dma::DmaBuf;
use fathom_drivers::Op;
use fathom_engine::config::NbdConfig;
use fathom_engine::engine::Engine;
use fathom_engine::reactor::{IoContext, Rejected};
use fathom_engine::stats::stage;
use fathom_engine::volume::{IoCompletion, IoError, IoRequest, Volume, VolumeId};
use fathom_engine::{EngineStamps, FrontendTrace};
use fathom_net::server::{self, Connection, Served, Server, ServerError, Service};
use fathom_net::transport::{self, TlsError, Transport};
use fathom_net::BufferCache;
use parking_lot::RwLock;

/// Bytes of socket data a connection buffers for parsing (request headers and small payloads;
/// larger payloads are read straight into their DMA buffer).
const RECEIVE_BUFFER: usize = 256 << 10;
/// A WRITE payload at least this much short is read straight into its DMA buffer; a smaller
/// rest goes through the receive buffer, so that one read also brings the requests behind it.
const DIRECT_READ_MIN: usize = 64 << 10;
/// Bytes read from one connection per loop iteration, so that one busy client cannot starve
/// the others on the reactor.
const READ_BUDGET: usize = 1 << 20;
/// Replies gathered into one `writev`.
const REPLIES_PER_WRITE: usize = 64;
/// A client has this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest READ or WRITE the server advertises (the volume's own limit may be lower).
const MAX_BLOCK: u32 = 32 << 20;
/// DMA buffers a reactor keeps for reuse; more are returned to the pool.
const BUFFER_CACHE_BYTES: usize = 32 << 20;
/// Room for a reply header: a structured ERROR chunk with a message of up to 100 bytes.
const REPLY_HEADER_MAX: usize = 128;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("the volumes cannot be served over NBD")]
    Exports(#[source] HandshakeError),
    #[error("NBD over TLS (nbd.tls_cert, nbd.tls_key)")]
    Tls(#[from] TlsError),
}

/// One volume as clients see it.
struct Export {
    volume: VolumeId,
    reactor: usize,
    /// Largest WRITE_ZEROES one engine command carries; longer ones are split.
    max_zeroes: u64,
    info: ExportInfo,
    /// The volume is going away: its connections close.
    gone: AtomicBool,
}

impl Export {
    fn of(volume: &Volume) -> Self {
        let max_block = (volume.max_transfer_bytes as u64).min(MAX_BLOCK as u64) as u32;
        Export {
            volume: volume.id,
            reactor: volume.reactor,
            max_zeroes: 65536 * volume.block_size as u64,
            info: ExportInfo {
                name: volume.name.clone(),
                description: format!(
                    "Fathom volume {} on device {}",
                    volume.name, volume.device_name
                ),
                size_bytes: volume.size_bytes(),
                transmission_flags: transmission_flag::HAS_FLAGS
                    | transmission_flag::SEND_FLUSH
                    | transmission_flag::SEND_FUA
                    | transmission_flag::SEND_TRIM
                    | transmission_flag::SEND_WRITE_ZEROES
                    | transmission_flag::CAN_MULTI_CONN,
                min_block_bytes: volume.block_size,
                preferred_block_bytes: 4096.max(volume.block_size),
                max_block_bytes: max_block,
            },
            gone: AtomicBool::new(false),
        }
    }
}

/// What every NBD connection shares: the exports, TLS and the handshake's settings.
struct NbdService {
    /// The exports offered to a new connection (each connection keeps the one it chose).
    exports: RwLock<Vec<Arc<Export>>>,
    max_in_flight: usize,
    /// TLS for clients that ask for it (and, when required, the only way in).
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake: HandshakeConfig,
}

impl Service for NbdService {
    type Connection = Conn;
    type Local = ();
    const NAME: &'static str = "NBD";
    const MAX_CONNECTIONS_KEY: &'static str = "nbd.max_connections";

    fn local(&self, _reactor: usize) {}

    fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<Box<Conn>> {
        let exports = self.exports.read();
        let infos = exports.iter().map(|export| export.info.clone()).collect();
        let offered = exports.iter().map(Arc::downgrade).collect();
        drop(exports);
        match Handshake::new(infos, self.handshake) {
            Ok(handshake) => Some(Box::new(Conn::new(stream, peer, handshake, offered))),
            Err(error) => {
                // Checked when the server started: cannot happen.
                tracing::error!(%peer, "NBD: {error}");
                None
            }
        }
    }
}

/// A running NBD server. Dropping it stops it.
pub struct NbdServer {
    server: Server<NbdService>,
}

impl NbdServer {
    /// Serves every volume of `engine` as an export of the same name on `config.listen`.
    pub fn start(engine: &Engine, config: &NbdConfig) -> Result<Self, NbdError> {
        let listeners = server::listen::<NbdService>(&config.listen, "nbd.listen")?;
        let exports: Vec<Arc<Export>> = engine
            .volumes()
            .iter()
            .map(|volume| Arc::new(Export::of(volume)))
            .collect();
        // Every export is checked once here, so that a connection's handshake cannot fail on
        // the server's own description.
        let infos: Vec<ExportInfo> = exports.iter().map(|export| export.info.clone()).collect();
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(transport::server_config(cert, key)?),
            _ => None,
        };
        let handshake = HandshakeConfig {
            tls_offered: tls.is_some(),
            tls_required: tls.is_some() && config.tls_required,
            ..HandshakeConfig::default()
        };
        Handshake::new(infos, handshake).map_err(NbdError::Exports)?;
        let service = NbdService {
            exports: RwLock::new(exports),
            max_in_flight: config.max_in_flight,
            tls,
            handshake,
        };
        let limits = server::Limits {
            max_connections: config.max_connections,
            max_buffer: MAX_BLOCK,
            keep_buffers: BUFFER_CACHE_BYTES,
        };
        Ok(Self {
            server: Server::start(engine, listeners, service, limits)?,
        })
    }

    /// Serves `volume` (made while the node runs) to connections from now on.
    pub fn add_export(&self, volume: &Volume) -> Result<(), NbdError> {
        let export = Arc::new(Export::of(volume));
        let mut exports = self.server.service().exports.write();
        let infos: Vec<ExportInfo> = exports
            .iter()
            .filter(|other| other.info.name != volume.name)
            .chain(std::iter::once(&export))
            .map(|export| export.info.clone())
            .collect();
        Handshake::new(infos, self.server.service().handshake).map_err(NbdError::Exports)?;
        exports.retain(|other| other.info.name != volume.name);
        exports.push(export);
        Ok(())
    }

    /// Stops serving export `name`: new connections no longer see it, and its connections
    /// close. True once none is left (at once if there was no such export), false if some
    /// still had IO in the engine after `timeout`.
    pub fn remove_export(&self, name: &str, timeout: Duration) -> bool {
        let export = {
            let mut exports = self.server.service().exports.write();
            let Some(at) = exports.iter().position(|export| export.info.name == name) else {
                return true;
            };
            exports.remove(at)
        };
        export.gone.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        // Each connection that chose it holds it until it is gone.
        while Arc::strong_count(&export) > 1 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// The addresses it listens on (with the ports the system chose for port 0).
    pub fn addresses(&self) -> &[SocketAddr] {
        self.server.addresses()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.server.connections()
    }

    /// Stops listening, closes every connection once its IO in flight has finished (replies
    /// not yet written are dropped: the client sees the connection close and must retry), and
    /// waits up to `timeout` for the pollers to finish. True when they all did.
    pub fn stop(&self, timeout: Duration) -> bool {
        self.server.stop(timeout)
    }
}

enum Phase {
    Handshake {
        handshake: Box<Handshake>,
        deadline: Instant,
        /// The exports the handshake offers, in its order (weak: a volume deleted meanwhile
        /// is not held up by a handshake).
        offered: Vec<Weak<Export>>,
    },
    /// Serving [`Conn::export`].
    Serving,
    /// Closing once its IO in flight has come back.
    Closing,
}

/// What the bytes at the front of the receive buffer belong to.
#[derive(Clone, Copy)]
enum Incoming {
    Header,
    /// A WRITE's payload, `filled` bytes of it received.
    Payload {
        slot: u16,
        filled: usize,
    },
    /// An invalid WRITE's payload, dropped before its error reply.
    Discard {
        slot: u16,
        remaining: u64,
    },
}

/// One request of a connection, from its header to its reply.
struct Slot {
    cookie: u64,
    command: Command,
    offset: u64,
    len: u64,
    fua: bool,
    buf: Option<DmaBuf>,
    /// WRITE_ZEROES is split into commands the device takes: the next offset to submit.
    next: u64,
    /// Every engine command it needs is submitted (or an error ended it early).
    submitted: bool,
    /// Engine IOs in flight for it.
    pending: u32,
    /// The error to reply with.
    error: Option<Errno>,
    /// Stamps: the socket read that brought it, the start of its reply.
    received: u64,
    reply_start: u64,
    /// What the engine stamped on its IO (telemetry only), and the NVMe status of a failed
    /// one: for its trace.
    engine: EngineStamps,
    status: u16,
    /// Reply header (and an error's message), built when the request finished.
    header: [u8; REPLY_HEADER_MAX],
    header_len: u8,
    /// Whether the reply carries the buffer (a successful READ).
    with_data: bool,
}

impl Slot {
    fn empty() -> Self {
        Self {
            cookie: 0,
            command: Command::Flush,
            offset: 0,
            len: 0,
            fua: false,
            buf: None,
            next: 0,
            submitted: false,
            pending: 0,
            error: None,
            received: 0,
            reply_start: 0,
            engine: EngineStamps::default(),
            status: 0,
            header: [0; REPLY_HEADER_MAX],
            header_len: 0,
            with_data: false,
        }
    }

    /// The engine operation the request runs as; `None` for what never reaches the engine
    /// (TRIM and CACHE hints, refused requests' commands).
    fn op(&self) -> Option<Op> {
        match self.command {
            Command::Read => Some(Op::Read),
            Command::Write => Some(Op::Write),
            Command::Flush => Some(Op::Flush),
            Command::WriteZeroes => Some(Op::WriteZeroes),
            _ => None,
        }
    }

    /// The reply's bytes: header, then the data of a successful READ.
    fn reply_len(&self) -> usize {
        self.header_len as usize + if self.with_data { self.len as usize } else { 0 }
    }
}

struct Conn {
    transport: Transport,
    peer: SocketAddr,
    phase: Phase,
    structured: bool,
    /// What this connection's requests are checked against (from the handshake).
    limits: Limits,
    readable: bool,
    writable: bool,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    incoming: Incoming,
    slots: Box<[Slot]>,
    free_slots: Vec<u16>,
    /// Requests parsed and not yet (entirely) in the engine, in arrival order.
    to_submit: VecDeque<u16>,
    /// Replies to write, in completion order; `reply_sent` bytes of the first are written.
    replies: VecDeque<u16>,
    reply_sent: usize,
    /// Engine IOs in flight.
    in_engine: usize,
    /// The client sent NBD_CMD_DISC: nothing more is read; close once replies are out.
    disconnecting: bool,
    close_reason: Option<String>,
    /// The export it serves, once the handshake chose one.
    export: Option<Arc<Export>>,
}

impl Conn {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        handshake: Handshake,
        offered: Vec<Weak<Export>>,
    ) -> Self {
        Self {
            transport: Transport::plain(stream),
            peer,
            phase: Phase::Handshake {
                handshake: Box::new(handshake),
                deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                offered,
            },
            structured: false,
            limits: Limits::with_defaults(0),
            readable: true,
            writable: true,
            rx: vec![0; RECEIVE_BUFFER].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            incoming: Incoming::Header,
            slots: Box::new([]),
            free_slots: Vec::new(),
            to_submit: VecDeque::new(),
            replies: VecDeque::new(),
            reply_sent: 0,
            in_engine: 0,
            disconnecting: false,
            close_reason: None,
            export: None,
        }
    }

    fn export_name(&self) -> &str {
        self.export
            .as_ref()
            .map_or("-", |export| export.info.name.as_str())
    }

    fn closing(&self) -> bool {
        matches!(self.phase, Phase::Closing)
    }

    /// Stops serving: nothing more is read or written; the connection goes once the engine
    /// has given back its IO in flight.
    fn close(&mut self, reason: impl Into<String>) {
        if self.closing() {
            return;
        }
        self.phase = Phase::Closing;
        self.close_reason = Some(reason.into());
        let _ = self.transport.stream.shutdown(std::net::Shutdown::Both);
    }

    fn serve_io(
        &mut self,
        index: u32,
        io: &mut IoContext,
        shared: &NbdService,
        buffers: &mut BufferCache,
    ) -> Served {
        match &mut self.phase {
            Phase::Handshake { .. } => self.serve_handshake(shared),
            Phase::Closing => {
                // Drop what was queued: the client will not read it.
                while let Some(slot) = self.replies.pop_front() {
                    self.release(slot, buffers);
                }
                while let Some(slot) = self.to_submit.pop_front() {
                    self.release(slot, buffers);
                }
                Served {
                    work: false,
                    remove: self.in_engine == 0,
                    hand_off: None,
                }
            }
            Phase::Serving => {
                // Taken out while it is used, and put back: no reference count moves per poll.
                let export = self
                    .export
                    .take()
                    .expect("a serving connection has its export");
                if export.gone.load(Ordering::Acquire) {
                    self.export = Some(export);
                    self.close(format!("volume {} was deleted", self.export_name()));
                    return Served {
                        work: true,
                        remove: false,
                        hand_off: None,
                    };
                }
                let work = self.serve_export(index, io, &export, buffers);
                self.export = Some(export);
                Served {
                    work,
                    remove: false,
                    hand_off: None,
                }
            }
        }
    }

    /// One poll of a serving connection: submit, receive, reply.
    fn serve_export(
        &mut self,
        index: u32,
        io: &mut IoContext,
        export: &Export,
        buffers: &mut BufferCache,
    ) -> bool {
        let mut work = self.submit(index, io, export);
        if self.readable && !self.disconnecting && self.to_submit.is_empty() {
            work |= self.receive(index, io, export, buffers);
        }
        if !self.replies.is_empty() && self.writable {
            work |= self.send_replies(io, export, buffers);
        } else if self.writable && self.transport.is_tls() {
            // Replies rustls took but the socket did not yet.
            match self.transport.flush() {
                Ok(done) => self.writable = done,
                Err(error) => self.close(format!("writing to the socket failed: {error}")),
            }
        }
        if self.disconnecting
            && self.in_engine == 0
            && self.replies.is_empty()
            && self.to_submit.is_empty()
        {
            self.close("the client disconnected (NBD_CMD_DISC)");
        }
        work
    }

    fn serve_handshake(&mut self, shared: &NbdService) -> Served {
        let Phase::Handshake {
            handshake,
            deadline,
            ..
        } = &mut self.phase
        else {
            unreachable!("called in the handshake phase");
        };
        let mut served = Served::default();
        if Instant::now() >= *deadline {
            self.close("the handshake did not finish within 10 s");
            return served;
        }
        if self.writable {
            // TLS handshake messages the socket could not take before.
            match self.transport.flush() {
                Ok(done) => self.writable = done,
                Err(error) => {
                    self.close(format!("writing the handshake failed: {error}"));
                    return served;
                }
            }
        }
        // Read and feed in turn, so that a long run of options never has to fit the buffer
        // at once. Once the handshake is over (or TLS starts), what is left belongs to the
        // transmission phase (a client may send its first request right behind NBD_OPT_GO)
        // or to TLS.
        loop {
            if self.rx_end > self.rx_start {
                match handshake.input(&self.rx[self.rx_start..self.rx_end]) {
                    Ok(consumed) => self.rx_start += consumed,
                    Err(error) => {
                        // Send what the handshake queued (an error reply) before closing.
                        let _ = self.transport.write(handshake.output());
                        self.close(format!("handshake failed: {error}"));
                        return served;
                    }
                }
            }
            if !self.readable || *handshake.state() != State::Negotiating {
                break;
            }
            if self.rx_start > 0 {
                // What the handshake took is gone; keep what it has not.
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if self.rx_end == self.rx.len() {
                // The handshake holds back at most one option header's worth: a full buffer
                // is not NBD.
                self.close("handshake data larger than any valid option");
                return served;
            }
            match self.transport.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    self.close("the client closed the connection during the handshake");
                    return served;
                }
                Ok(n) => {
                    self.rx_end += n;
                    served.work = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.close(format!("reading the handshake failed: {error}"));
                    return served;
                }
            }
        }
        while !handshake.output().is_empty() {
            match self.transport.write(handshake.output()) {
                Ok(n) => {
                    handshake.consume_output(n);
                    served.work = true;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return served;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.close(format!("writing the handshake failed: {error}"));
                    return served;
                }
            }
        }
        match handshake.state() {
            State::Negotiating => {}
            State::Aborted => self.close("the client aborted the handshake (NBD_OPT_ABORT)"),
            State::Failed => self.close("handshake failed"),
            State::StartTls => {
                let Some(config) = shared.tls.clone() else {
                    self.close("STARTTLS acknowledged without a TLS configuration");
                    return served;
                };
                // Bytes behind the acknowledgement are the client's TLS handshake.
                let early = &self.rx[self.rx_start..self.rx_end];
                if let Err(error) = self.transport.start_tls(config, early) {
                    self.close(format!("TLS handshake failed: {error}"));
                    return served;
                }
                self.rx_start = 0;
                self.rx_end = 0;
                handshake.tls_started();
                served.work = true;
                // Options go on inside TLS: come back for them even if no new event arrives.
                self.readable = true;
            }
            State::Done(negotiated) => {
                let negotiated = *negotiated;
                let Phase::Handshake { offered, .. } = &self.phase else {
                    unreachable!("in the handshake phase");
                };
                let Some(export) = offered[negotiated.export_index]
                    .upgrade()
                    .filter(|export| !export.gone.load(Ordering::Acquire))
                else {
                    self.close("the volume was deleted during the handshake");
                    return served;
                };
                self.structured = negotiated.structured_replies;
                self.limits = negotiated.limits;
                self.slots = (0..shared.max_in_flight).map(|_| Slot::empty()).collect();
                self.free_slots = (0..shared.max_in_flight as u16).rev().collect();
                self.to_submit = VecDeque::with_capacity(shared.max_in_flight);
                self.replies = VecDeque::with_capacity(shared.max_in_flight);
                tracing::info!(
                    peer = %self.peer,
                    export = export.info.name,
                    structured_replies = self.structured,
                    tls = self.transport.is_tls(),
                    "NBD client connected"
                );
                served.work = true;
                served.hand_off = Some(export.reactor);
                self.export = Some(export);
                self.phase = Phase::Serving;
            }
        }
        served
    }

    /// Reads and parses requests while slots, buffers and the read budget allow.
    fn receive(
        &mut self,
        index: u32,
        io: &mut IoContext,
        export: &Export,
        buffers: &mut BufferCache,
    ) -> bool {
        let received = io.stamp();
        let mut budget = READ_BUDGET;
        let mut parsed_any = false;
        loop {
            // Parse everything buffered.
            match self.parse(export, buffers, received) {
                Parse::Progress => parsed_any = true,
                Parse::Blocked => break,
                Parse::NeedMore => {}
                Parse::Close(reason) => {
                    self.close(reason);
                    return true;
                }
            }
            if self.disconnecting || budget == 0 {
                break;
            }
            // Read more: a large payload straight into its buffer, anything else into rx.
            let result = match self.incoming {
                Incoming::Payload { slot, filled }
                    if self.rx_start == self.rx_end
                        && self.slots[slot as usize].len as usize - filled >= DIRECT_READ_MIN =>
                {
                    let buf = self.slots[slot as usize]
                        .buf
                        .as_mut()
                        .expect("a WRITE slot holds its buffer");
                    let result = self.transport.read(&mut buf.as_bytes_mut()[filled..]);
                    if let Ok(n) = result {
                        self.incoming = Incoming::Payload {
                            slot,
                            filled: filled + n,
                        };
                    }
                    result.map(|n| (n, false))
                }
                _ => {
                    if self.rx_start > 0 {
                        self.rx.copy_within(self.rx_start..self.rx_end, 0);
                        self.rx_end -= self.rx_start;
                        self.rx_start = 0;
                    }
                    self.transport
                        .read(&mut self.rx[self.rx_end..])
                        .map(|n| (n, true))
                }
            };
            match result {
                Ok((0, _)) => {
                    self.close(
                        if matches!(self.incoming, Incoming::Header) && self.rx_start == self.rx_end
                        {
                            "the client closed the connection without NBD_CMD_DISC"
                        } else {
                            "the client closed the connection in the middle of a request"
                        },
                    );
                    return true;
                }
                Ok((n, into_rx)) => {
                    if into_rx {
                        self.rx_end += n;
                    }
                    budget = budget.saturating_sub(n);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    break;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.close(format!("reading from the socket failed: {error}"));
                    return true;
                }
            }
        }
        // Requests parsed before a stop for want of slots or buffers count too.
        parsed_any |= !self.to_submit.is_empty();
        if parsed_any {
            // The end of `receive` for everything parsed now, and the engine's accept stamp.
            io.stamp();
            self.submit(index, io, export);
        }
        parsed_any
    }

    /// Parses the buffered bytes into requests.
    fn parse(&mut self, export: &Export, buffers: &mut BufferCache, received: u64) -> Parse {
        let mut progress = false;
        loop {
            let available = self.rx_end - self.rx_start;
            match self.incoming {
                Incoming::Payload { slot, filled } => {
                    let want = self.slots[slot as usize].len as usize - filled;
                    let take = want.min(available);
                    if take > 0 {
                        let from = &self.rx[self.rx_start..self.rx_start + take];
                        let buf = self.slots[slot as usize]
                            .buf
                            .as_mut()
                            .expect("a WRITE slot holds its buffer");
                        buf.as_bytes_mut()[filled..filled + take].copy_from_slice(from);
                        self.rx_start += take;
                    }
                    if take == want {
                        self.incoming = Incoming::Header;
                        self.to_submit.push_back(slot);
                        progress = true;
                        continue;
                    }
                    self.incoming = Incoming::Payload {
                        slot,
                        filled: filled + take,
                    };
                    return if progress {
                        Parse::Progress
                    } else {
                        Parse::NeedMore
                    };
                }
                Incoming::Discard { slot, remaining } => {
                    let take = (remaining.min(available as u64)) as usize;
                    self.rx_start += take;
                    if take as u64 == remaining {
                        self.incoming = Incoming::Header;
                        self.finish(slot);
                        progress = true;
                        continue;
                    }
                    self.incoming = Incoming::Discard {
                        slot,
                        remaining: remaining - take as u64,
                    };
                    return if progress {
                        Parse::Progress
                    } else {
                        Parse::NeedMore
                    };
                }
                Incoming::Header => {}
            }
            if self.disconnecting {
                return Parse::Progress;
            }
            if available < REQUEST_HEADER_LEN {
                return if progress {
                    Parse::Progress
                } else {
                    Parse::NeedMore
                };
            }
            let Some(&slot_index) = self.free_slots.last() else {
                return Parse::Blocked;
            };
            let header: &[u8; REQUEST_HEADER_LEN] = self.rx
                [self.rx_start..self.rx_start + REQUEST_HEADER_LEN]
                .try_into()
                .expect("header length");
            let request = match Request::parse(header) {
                Ok(request) => request,
                Err(error) => return Parse::Close(format!("bad request: {error}")),
            };
            let check = request.check(export.info.size_bytes, &self.limits);
            if let (Ok(()), Command::Read | Command::Write) = (check, request.command) {
                // Take the buffer before consuming the header: without one, wait.
                let Some(buf) = buffers.get(request.length as usize) else {
                    return Parse::Blocked;
                };
                self.slots[slot_index as usize].buf = Some(buf);
            }
            self.rx_start += REQUEST_HEADER_LEN;
            self.free_slots.pop();
            let slot = &mut self.slots[slot_index as usize];
            slot.cookie = request.cookie;
            slot.command = request.command;
            slot.offset = request.offset;
            slot.len = request.length as u64;
            slot.next = request.offset;
            slot.submitted = false;
            slot.fua = request.flags & cmd_flag::FUA != 0;
            slot.pending = 0;
            slot.error = None;
            slot.received = received;
            slot.reply_start = 0;
            slot.engine = EngineStamps::default();
            slot.status = 0;
            progress = true;
            if let Err(rejection) = check {
                slot.error = Some(rejection.errno());
                // The reason goes to the client in a structured error chunk (and nowhere
                // else: a client's mistakes are not the node's to log per request).
                let message = &mut slot.header[proto::STRUCTURED_HEADER_LEN + 6..];
                let room = message.len();
                let mut cursor = &mut message[..];
                let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{rejection}"));
                let written = room - cursor.len();
                slot.header_len = written as u8;
                match request.after_rejection(&self.limits) {
                    AfterRejection::Reply => self.finish(slot_index),
                    AfterRejection::DiscardThenReply { bytes } => {
                        self.incoming = Incoming::Discard {
                            slot: slot_index,
                            remaining: bytes as u64,
                        };
                    }
                    AfterRejection::Close => {
                        return Parse::Close(format!(
                            "refused a request whose payload is too large to skip: {rejection}"
                        ))
                    }
                }
                continue;
            }
            match request.command {
                Command::Write => {
                    self.incoming = Incoming::Payload {
                        slot: slot_index,
                        filled: 0,
                    };
                }
                Command::Read | Command::Flush | Command::WriteZeroes => {
                    self.to_submit.push_back(slot_index);
                }
                Command::Disc => {
                    // No reply: finish what is in flight, then close.
                    self.free_slots.push(slot_index);
                    self.disconnecting = true;
                    return Parse::Progress;
                }
                _ => {
                    // TRIM and CACHE are hints: acknowledged without touching the media.
                    self.finish(slot_index);
                }
            }
        }
    }

    /// Submits parsed requests in order until the engine pushes back.
    fn submit(&mut self, index: u32, io: &mut IoContext, export: &Export) -> bool {
        let mut work = false;
        let now = io.last_stamp();
        while let Some(&slot_index) = self.to_submit.front() {
            let tag = (index as u64) << 16 | slot_index as u64;
            let slot = &mut self.slots[slot_index as usize];
            if let (0, false, Some(op)) = (slot.pending, slot.submitted, slot.op()) {
                if slot.next == slot.offset {
                    io.record_stage(
                        export.volume,
                        op,
                        stage::RECEIVE,
                        now.saturating_sub(slot.received),
                        1,
                    );
                }
            }
            let request = match slot.command {
                Command::Read => IoRequest::read(
                    export.volume,
                    slot.offset,
                    slot.buf.take().expect("a READ slot holds its buffer"),
                    tag,
                ),
                Command::Write => {
                    let mut request = IoRequest::write(
                        export.volume,
                        slot.offset,
                        slot.buf.take().expect("a WRITE slot holds its buffer"),
                        tag,
                    );
                    request.fua = slot.fua;
                    request
                }
                Command::WriteZeroes => {
                    let chunk = (slot.offset + slot.len - slot.next).min(export.max_zeroes);
                    let mut request = IoRequest::write_zeroes(export.volume, slot.next, chunk, tag);
                    request.fua = slot.fua;
                    request
                }
                _ => IoRequest::flush(export.volume, tag),
            };
            let length = request.len;
            match io.submit_frontend(request) {
                Ok(()) => {
                    work = true;
                    slot.pending += 1;
                    self.in_engine += 1;
                    slot.next += length;
                    slot.submitted =
                        slot.command != Command::WriteZeroes || slot.next >= slot.offset + slot.len;
                    if slot.submitted {
                        self.to_submit.pop_front();
                    }
                }
                Err(Rejected {
                    request,
                    error: IoError::Busy,
                    ..
                }) => {
                    slot.buf = request.buf;
                    break;
                }
                Err(Rejected { request, error, .. }) => {
                    slot.buf = request.buf;
                    slot.error = Some(nbd_error(&error, slot.command));
                    slot.header_len = 0;
                    slot.submitted = true;
                    self.to_submit.pop_front();
                    if slot.pending == 0 {
                        self.finish(slot_index);
                    }
                }
            }
        }
        work
    }

    fn completed(
        &mut self,
        slot_index: u16,
        completion: IoCompletion,
        stamps: Option<EngineStamps>,
        buffers: &mut BufferCache,
    ) {
        self.in_engine -= 1;
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return;
        };
        slot.pending -= 1;
        if let Some(stamps) = stamps {
            // A request split into several IOs keeps the last one's, and the head
            // sampler's choice of any of them.
            let head = slot.engine.head;
            slot.engine = stamps;
            slot.engine.head |= head;
        }
        if let Err(error) = &completion.result {
            if slot.error.is_none() {
                slot.error = Some(nbd_error(error, slot.command));
                slot.header_len = 0;
            }
            if let IoError::Device { status, .. } = error {
                slot.status = (status.sct as u16) << 8 | status.sc as u16;
            }
        }
        if let Some(buf) = completion.buf {
            slot.buf = Some(buf);
        }
        if slot.pending > 0 || !slot.submitted {
            return;
        }
        if self.closing() {
            self.release(slot_index, buffers);
        } else {
            self.finish(slot_index);
        }
    }

    /// Builds the reply of a finished request and queues it. A refused request's message is
    /// already in place after the room of an ERROR chunk's header (`header_len` bytes of it).
    fn finish(&mut self, slot_index: u16) {
        let structured = self.structured;
        let slot = &mut self.slots[slot_index as usize];
        slot.with_data = slot.error.is_none() && slot.command == Command::Read;
        let header = &mut slot.header;
        slot.header_len = match slot.error {
            _ if !structured => {
                header[..proto::SIMPLE_REPLY_LEN]
                    .copy_from_slice(&proto::simple_reply(slot.cookie, slot.error));
                proto::SIMPLE_REPLY_LEN as u8
            }
            Some(error) => {
                let message = slot.header_len as usize;
                let start = proto::STRUCTURED_HEADER_LEN;
                header[..start].copy_from_slice(&proto::structured_header(
                    reply_flag::DONE,
                    reply_type::ERROR,
                    slot.cookie,
                    6 + message as u32,
                ));
                header[start..start + 4].copy_from_slice(&error.code().to_be_bytes());
                header[start + 4..start + 6].copy_from_slice(&(message as u16).to_be_bytes());
                (start + 6 + message) as u8
            }
            None if slot.with_data => {
                header[..proto::OFFSET_DATA_HEADER_LEN].copy_from_slice(
                    &proto::offset_data_header(slot.cookie, slot.offset, slot.len as u32, true),
                );
                proto::OFFSET_DATA_HEADER_LEN as u8
            }
            None => {
                header[..proto::STRUCTURED_HEADER_LEN]
                    .copy_from_slice(&proto::none_chunk(slot.cookie));
                proto::STRUCTURED_HEADER_LEN as u8
            }
        };
        self.replies.push_back(slot_index);
    }

    /// Frees a request slot and keeps its buffer for reuse.
    fn release(&mut self, slot_index: u16, buffers: &mut BufferCache) {
        if let Some(buf) = self.slots[slot_index as usize].buf.take() {
            buffers.put(buf);
        }
        self.free_slots.push(slot_index);
    }

    /// Writes queued replies, many per system call.
    fn send_replies(
        &mut self,
        io: &mut IoContext,
        export: &Export,
        buffers: &mut BufferCache,
    ) -> bool {
        // Also the end of the `complete` stage of the IOs whose callbacks just ran.
        let start = io.stamp();
        let mut work = false;
        while !self.replies.is_empty() {
            for &slot_index in self.replies.iter().take(REPLIES_PER_WRITE) {
                let slot = &mut self.slots[slot_index as usize];
                if slot.reply_start == 0 {
                    slot.reply_start = start;
                }
            }
            let mut slices = [IoSlice::new(&[]); 2 * REPLIES_PER_WRITE];
            let mut count = 0;
            let mut skip = self.reply_sent;
            for &slot_index in self.replies.iter().take(REPLIES_PER_WRITE) {
                let slot = &self.slots[slot_index as usize];
                let header = &slot.header[..slot.header_len as usize];
                let data = match (slot.with_data, &slot.buf) {
                    (true, Some(buf)) => buf.as_bytes(),
                    _ => &[][..],
                };
                for part in [header, data] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices[count] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    count += 1;
                }
            }
            let written = match self.transport.write_vectored(&slices[..count]) {
                Ok(0) => {
                    self.writable = false;
                    break;
                }
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    break;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.close(format!("writing to the socket failed: {error}"));
                    return true;
                }
            };
            work = true;
            let sent = io.stamp();
            let mut left = self.reply_sent + written;
            while let Some(&slot_index) = self.replies.front() {
                let slot = &self.slots[slot_index as usize];
                let len = slot.reply_len();
                if left < len {
                    break;
                }
                left -= len;
                self.replies.pop_front();
                if let Some(op) = slot.op() {
                    io.record_stage(
                        export.volume,
                        op,
                        stage::REPLY,
                        sent.saturating_sub(slot.reply_start),
                        1,
                    );
                    io.record_stage(
                        export.volume,
                        op,
                        stage::TOTAL,
                        sent.saturating_sub(slot.received),
                        1,
                    );
                    io.trace_frontend(&FrontendTrace {
                        volume: export.volume.0,
                        op,
                        offset: slot.offset,
                        len: slot.len,
                        // A request refused before the engine saw it is the client's
                        // mistake, answered in its reply: not traced as a failure.
                        ok: slot.error.is_none() || slot.engine.seen == 0,
                        status: slot.status,
                        received: slot.received,
                        reply_start: slot.reply_start,
                        sent,
                        engine: slot.engine,
                    });
                }
                self.release(slot_index, buffers);
            }
            // Part of a reply may remain: the next write takes it, or reports that the socket
            // is full (edge-triggered epoll reports writability again only after that).
            self.reply_sent = left;
        }
        work
    }
}

impl Connection for Conn {
    type Service = NbdService;

    fn stream(&self) -> &TcpStream {
        &self.transport.stream
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn set_ready(&mut self, readable: bool, writable: bool) {
        self.readable |= readable;
        self.writable |= writable;
    }

    fn serve(
        &mut self,
        index: u32,
        io: &mut IoContext,
        service: &NbdService,
        _local: &mut (),
        buffers: &mut BufferCache,
    ) -> Served {
        self.serve_io(index, io, service, buffers)
    }

    fn complete(
        &mut self,
        slot: u16,
        completion: IoCompletion,
        stamps: Option<EngineStamps>,
        _local: &mut (),
        buffers: &mut BufferCache,
    ) {
        self.completed(slot, completion, stamps, buffers);
    }

    fn close(&mut self, reason: &str) {
        Conn::close(self, reason);
    }

    fn removed(self: Box<Self>, _service: &NbdService, buffers: &mut BufferCache) {
        let export = self.export_name();
        match &self.close_reason {
            Some(reason) => {
                tracing::info!(peer = %self.peer, export, "NBD connection closed: {reason}")
            }
            None => tracing::info!(peer = %self.peer, export, "NBD connection closed"),
        }
        for slot in Vec::from(self.slots).into_iter() {
            if let Some(buf) = slot.buf {
                buffers.put(buf);
            }
        }
    }
}

enum Parse {
    /// Requests were parsed.
    Progress,
    /// Nothing complete yet.
    NeedMore,
    /// A request is waiting for a free slot or a buffer.
    Blocked,
    Close(String),
}

/// The NBD error for an engine error.
fn nbd_error(error: &IoError, command: Command) -> Errno {
    match error {
        IoError::OutOfRange { .. } if matches!(command, Command::Write | Command::WriteZeroes) => {
            Errno::NoSpc
        }
        IoError::OutOfRange { .. }
        | IoError::Misaligned { .. }
        | IoError::TooLarge { .. }
        | IoError::Empty { .. }
        | IoError::MissingBuffer { .. }
        | IoError::BufferMisaligned { .. } => Errno::Inval,
        IoError::Stopped => Errno::Shutdown,
        IoError::Device { .. }
        | IoError::NoQuorum { .. }
        | IoError::NotPrimary { .. }
        | IoError::Forwarded { .. }
        | IoError::Busy
        | IoError::UnknownVolume(_)
        | IoError::WrongCore { .. } => Errno::Io,
    }
}
