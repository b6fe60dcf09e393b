//! The replica service: the socket driver on every node that holds copies of replicated
//! volumes. A primary connects, the session opens ([`crate::session`]), and the volume's frames
//! go through [`ReplicaVolume`] (fencing, bounds, write order) to engine IO on the local copy;
//! the replies go back on the same session.
//!
//! It is a [`fathom_net::server::Service`]: reactor 0 accepts and runs the opening, then the
//! session moves to the reactor that owns its volume, whose poller keeps the volume's
//! replica state ([`ReplicaLocal`]) for every session of it without a lock. A session carries
//! one volume (a primary opens one per volume). Each session holds at most [`SLOTS`] frames
//! in the engine; beyond that it stops reading and TCP pushes back on the primary.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fathom_dma::DmaBuf;
use fathom_engine::reactor::{IoContext, Rejected};
use fathom_engine::volume::{IoCompletion, IoError, IoRequest, VolumeId};
use fathom_engine::EngineStamps;
use fathom_net::server::{Connection, Served, Service};
use fathom_net::{BufferCache, Transport};
use fathom_telemetry::trace::TraceContext;

use crate::meta::{Role, Superblock, BLOCK_BYTES};
use crate::proto::{refusal, status, Header, Kind, HEADER_LEN};
use crate::replica::{Decision, Io, IoKind, ReplicaVolume};
use crate::role::VolumeRole;
use crate::session::{AcceptorSession, PeerAuth, Step};
use crate::stream::FrameStream;

/// Frames of one session in the engine at once.
pub const SLOTS: usize = 64;
/// Writes a volume tracks for ordering, over all its sessions.
const ORDER_CAPACITY: usize = 4 * SLOTS;
/// A peer has this long to open its session.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
/// A session whose peer stops in the middle of a frame for this long is closed.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One volume this node holds a copy of.
#[derive(Debug, Clone)]
pub struct HeldVolume {
    pub name: String,
    pub id: VolumeId,
    pub reactor: usize,
    pub block_size: u32,
    pub blocks: u64,
    /// Regions of `1 << region_shift` bytes, as the cluster's config has them.
    pub region_shift: u32,
    pub role: Arc<VolumeRole>,
}

/// The volumes a node holds copies of, by engine volume id (`None`: not one of them). Changed
/// when a volume comes or goes; read when a session opens.
pub type HeldTable = Arc<parking_lot::RwLock<Vec<Option<Arc<HeldVolume>>>>>;

/// What the replica service of a node is.
pub struct ReplicaService {
    node: String,
    cluster: String,
    auth: PeerAuth,
    /// Mutual TLS: sessions start with a TLS handshake that requires the peer's certificate.
    tls: Option<Arc<rustls::ServerConfig>>,
    max_payload: u32,
    volumes: HeldTable,
}

impl ReplicaService {
    /// `max_payload`: the largest write payload a frame may carry (the volumes' largest
    /// transfer).
    pub fn new(
        node: &str,
        cluster: &str,
        auth: PeerAuth,
        tls: Option<Arc<rustls::ServerConfig>>,
        max_payload: u32,
        volumes: HeldTable,
    ) -> Self {
        Self {
            node: node.into(),
            cluster: cluster.into(),
            auth,
            tls,
            max_payload,
            volumes,
        }
    }

    fn held(&self, name: &str) -> Option<Arc<HeldVolume>> {
        self.volumes
            .read()
            .iter()
            .flatten()
            .find(|held| held.name == name)
            .cloned()
    }

    /// Bytes a session may hold for its peer: every slot's reply at its largest.
    fn max_out(&self) -> usize {
        SLOTS * (HEADER_LEN + self.max_payload as usize)
    }
}

/// One volume's replica state on its reactor, shared by its sessions.
struct VolumeState {
    replica: ReplicaVolume,
    /// A superblock write is in flight (epochs are persisted one at a time).
    persisting: bool,
    role: Arc<VolumeRole>,
}

impl VolumeState {
    /// Takes an epoch raised elsewhere on this node (a promote here) before a frame is
    /// judged: the deposed primary's frames are then stale.
    fn sync_epoch(&mut self) {
        let known = self.role.epoch();
        if known > self.replica.epoch() {
            self.replica.raise_epoch(known);
        }
    }
}

/// The replica states of the volumes one reactor owns, by engine volume id.
pub struct ReplicaLocal {
    volumes: Vec<Option<VolumeState>>,
}

impl ReplicaLocal {
    /// The state of `held` here, made when its first session arrives (and again when the
    /// slot holds another volume than last time).
    fn ensure(&mut self, held: &HeldVolume) {
        let at = held.id.0 as usize;
        if at >= self.volumes.len() {
            self.volumes.resize_with(at + 1, || None);
        }
        let current = self.volumes[at]
            .as_ref()
            .is_some_and(|state| Arc::ptr_eq(&state.role, &held.role));
        if current {
            return;
        }
        let superblock = held.role.superblock();
        let mut replica = ReplicaVolume::new(
            0,
            superblock.epoch,
            held.block_size,
            held.blocks,
            superblock.applied,
            ORDER_CAPACITY,
        );
        replica.track_regions(held.region_shift);
        // No primary ever claimed this copy: it holds nothing yet.
        if superblock.epoch == 0 {
            replica.mark_new_copy();
        }
        self.volumes[at] = Some(VolumeState {
            replica,
            persisting: false,
            role: held.role.clone(),
        });
    }
}

impl Service for ReplicaService {
    type Connection = ReplicaConn;
    type Local = ReplicaLocal;
    const NAME: &'static str = "replication";
    const MAX_CONNECTIONS_KEY: &'static str = "replication.max_connections";

    fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<Box<ReplicaConn>> {
        let mut transport = Transport::plain(stream);
        if let Some(tls) = &self.tls {
            if let Err(error) = transport.start_tls(tls.clone(), &[]) {
                tracing::warn!(%peer, "replication: refusing a peer: TLS: {error}");
                return None;
            }
        }
        let session = AcceptorSession::new(&self.node, &self.cluster, self.auth.clone());
        Some(Box::new(ReplicaConn {
            stream: FrameStream::new(transport, self.max_payload + 4096, self.max_out()),
            peer,
            phase: Phase::Opening {
                session: Box::new(session),
                deadline: Instant::now() + OPENING_TIMEOUT,
            },
            slots: (0..SLOTS).map(|_| None).collect(),
            free: (0..SLOTS as u16).rev().collect(),
            ready: VecDeque::with_capacity(SLOTS),
            in_engine: 0,
            writable: true,
            close_reason: None,
            claimed: None,
            stalled: None,
            waiting: 0,
            held: None,
        }))
    }

    fn local(&self, _reactor: usize) -> ReplicaLocal {
        // Each volume's state is made on its reactor when its first session arrives there.
        ReplicaLocal {
            volumes: (0..self.volumes.read().len()).map(|_| None).collect(),
        }
    }
}

enum Phase {
    Opening {
        session: Box<AcceptorSession>,
        deadline: Instant,
    },
    Open {
        /// The peer's node id.
        peer: String,
        /// The volume (its engine id); [`ReplicaConn::held`] is its copy here.
        volume: usize,
    },
}

/// Where a frame's IO stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// To submit (again, after the engine was busy).
    Ready,
    /// Behind an earlier overlapping write.
    Held,
    /// A flush waiting for the writes it covers ([`ReplicaVolume::flush_ready`]).
    Waiting,
    /// In the engine.
    Submitted,
}

enum Work {
    Io(Io),
    /// A client's IO another node forwarded to this one, the primary: run through the
    /// volume's layers (replicated) as its own client's would be.
    Forward {
        kind: Kind,
        request_id: u64,
        lba: u64,
        blocks: u32,
        fua: bool,
        trace: Option<TraceContext>,
    },
    /// A new primary's Probe: answered once no write is in flight here.
    Probe {
        request_id: u64,
        first: u64,
        count: u32,
    },
    /// The primary's Handover: answered once no write is in flight here.
    Handover {
        request_id: u64,
        sequence: u64,
    },
    /// The superblock with a newer epoch, then the EpochOk.
    Epoch {
        epoch: u64,
        request_id: u64,
        base: u64,
        next: Option<(Superblock, usize)>,
    },
}

struct Pending {
    work: Work,
    stage: Stage,
    buf: Option<DmaBuf>,
}

/// One session from a primary.
pub struct ReplicaConn {
    stream: FrameStream,
    peer: SocketAddr,
    phase: Phase,
    /// The volume of an open session.
    held: Option<Arc<HeldVolume>>,
    slots: Vec<Option<Pending>>,
    free: Vec<u16>,
    /// Slots to submit, in arrival order.
    ready: VecDeque<u16>,
    in_engine: usize,
    writable: bool,
    close_reason: Option<String>,
    /// The epoch this session claimed (its frames of that epoch are taken).
    claimed: Option<u64>,
    /// Bytes of a partial frame, and since when no more came.
    stalled: Option<(usize, Instant)>,
    /// Flushes in [`Stage::Waiting`].
    waiting: usize,
}

impl ReplicaConn {
    fn closing(&self) -> bool {
        self.close_reason.is_some()
    }

    /// A peer that sends part of a frame and then nothing for [`STALL_TIMEOUT`] is gone or
    /// broken: its session closes (it holds nothing in the engine meanwhile).
    fn check_stall(&mut self) {
        let partial = self.stream.buffered();
        if partial == 0 {
            self.stalled = None;
            return;
        }
        let now = Instant::now();
        match self.stalled {
            Some((bytes, since)) if bytes == partial => {
                if now.duration_since(since) >= STALL_TIMEOUT {
                    self.close_with(format!(
                        "the primary sent {partial} bytes of a frame and then nothing for {} s",
                        STALL_TIMEOUT.as_secs()
                    ));
                }
            }
            _ => self.stalled = Some((partial, now)),
        }
    }

    fn close_with(&mut self, reason: String) {
        if self.close_reason.is_none() {
            self.close_reason = Some(reason);
        }
    }

    fn serve_opening(&mut self, service: &ReplicaService) -> Served {
        let mut served = Served::default();
        let Phase::Opening { session, deadline } = &mut self.phase else {
            return served;
        };
        if Instant::now() >= *deadline {
            let reason = format!(
                "the peer did not open its session within {} s",
                OPENING_TIMEOUT.as_secs()
            );
            self.close_with(reason);
            return served;
        }
        match self.stream.fill() {
            Ok(read) => served.work |= read > 0,
            Err(error) => {
                self.close_with(format!("while opening: {error}"));
                return served;
            }
        }
        let step = match self.stream.next_frame() {
            None => return served,
            Some(Err(error)) => {
                self.close_with(format!("while opening: {error}"));
                return served;
            }
            Some(Ok(frame)) => session.on_frame(&frame, |name| service.held(name).is_some()),
        };
        served.work = true;
        let (bytes, opened) = match step {
            Step::Send(bytes) => (bytes, None),
            Step::Open(bytes, opened) => (bytes, Some(opened)),
            Step::Refuse(bytes, error) => {
                let _ = self.stream.queue(&bytes);
                let _ = self.stream.flush();
                self.close_with(format!("refused the session: {error}"));
                return served;
            }
        };
        if let Err(error) = self.stream.queue(&bytes) {
            self.close_with(format!("while opening: {error}"));
            return served;
        }
        if let Some(opened) = opened {
            let [name] = opened.volumes.as_slice() else {
                self.close_with(format!(
                    "peer {} opened a session for {} volumes; a session carries one",
                    opened.peer,
                    opened.volumes.len()
                ));
                return served;
            };
            let Some(held) = service.held(name) else {
                self.close_with(format!("volume {name} is no longer held here"));
                return served;
            };
            tracing::info!(peer = %self.peer, node = %opened.peer, volume = %name, "replication session open");
            served.hand_off = Some(held.reactor);
            self.phase = Phase::Open {
                peer: opened.peer,
                volume: held.id.0 as usize,
            };
            self.held = Some(held);
        }
        served
    }

    /// Takes the frames received while there is room for their IO and their replies.
    fn take_frames(
        &mut self,
        volume: usize,
        local: &mut ReplicaLocal,
        buffers: &mut BufferCache,
    ) -> Result<bool, String> {
        let mut work = false;
        let Some(state) = local.volumes.get_mut(volume).and_then(Option::as_mut) else {
            return Err("the volume is not on this reactor".into());
        };
        while !self.free.is_empty() {
            let (decision, buf) = {
                let frame = match self.stream.next_frame() {
                    None => break,
                    Some(Err(error)) => return Err(error.to_string()),
                    Some(Ok(frame)) => frame,
                };
                if frame.volume() != 0 {
                    return Err(format!(
                        "a frame for volume index {} on a session of one volume",
                        frame.volume()
                    ));
                }
                state.sync_epoch();
                let header = frame.header;
                let current = state.replica.epoch();
                if header.forwarded {
                    let buf = match header.kind {
                        Kind::Write => Some(payload_buf(buffers, frame.payload)?),
                        _ => None,
                    };
                    (forwarded(&header, state), buf)
                } else {
                    let peer = peer_node_of(&self.phase);
                    let decision =
                        match refuse_unclaimed(peer, self.claimed, &header, current, state) {
                            Some(refused) => refused,
                            None => state.replica.on_frame(&frame),
                        };
                    if header.kind == Kind::Epoch
                        && header.epoch == current
                        && state.replica.epoch() == current
                        && matches!(decision, Decision::Reply(_))
                        && !refused_claim(peer, &header, current, state)
                    {
                        // The epoch this copy holds, claimed again by its primary: this session
                        // is that primary's from here on.
                        self.claimed = Some(current);
                        state.role.set_in_sync(header.status == status::OK);
                    }
                    // A write's payload goes into a DMA buffer of its own now: the frame's bytes
                    // are the decoder's, reused by the next frame.
                    let buf = match &decision {
                        Decision::Submit(io) | Decision::Held(io)
                            if matches!(io.kind, IoKind::Write | IoKind::Resync) =>
                        {
                            Some(payload_buf(buffers, frame.payload)?)
                        }
                        _ => None,
                    };
                    (Taken::Decision(decision), buf)
                }
            };
            work = true;
            let decision = match decision {
                Taken::Decision(decision) => decision,
                Taken::Refused(bytes) => {
                    if let Some(buf) = buf {
                        buffers.put(buf);
                    }
                    self.stream
                        .queue(&bytes)
                        .map_err(|error| error.to_string())?;
                    continue;
                }
                Taken::Forward(forward) => {
                    let slot = self.free.pop().expect("checked above");
                    self.slots[slot as usize] = Some(Pending {
                        work: forward,
                        stage: Stage::Ready,
                        buf,
                    });
                    self.ready.push_back(slot);
                    continue;
                }
            };
            let (work_item, stage) = match decision {
                Decision::Reply(bytes) => {
                    self.stream
                        .queue(&bytes)
                        .map_err(|error| error.to_string())?;
                    continue;
                }
                Decision::Close(reason) => return Err(reason),
                Decision::Full => {
                    return Err(format!(
                        "the primary has more than {ORDER_CAPACITY} writes outstanding"
                    ))
                }
                Decision::Submit(io)
                    if io.kind == IoKind::Flush && !state.replica.flush_ready(io.sequence) =>
                {
                    self.waiting += 1;
                    (Work::Io(io), Stage::Waiting)
                }
                Decision::Submit(io) => (Work::Io(io), Stage::Ready),
                Decision::Held(io) => (Work::Io(io), Stage::Held),
                Decision::PersistEpoch {
                    epoch,
                    request_id,
                    base,
                } => (
                    Work::Epoch {
                        epoch,
                        request_id,
                        base,
                        next: None,
                    },
                    Stage::Ready,
                ),
                Decision::Probe {
                    request_id,
                    first,
                    count,
                } => (
                    Work::Probe {
                        request_id,
                        first,
                        count,
                    },
                    Stage::Ready,
                ),
                Decision::Handover {
                    request_id,
                    sequence,
                } => (
                    Work::Handover {
                        request_id,
                        sequence,
                    },
                    Stage::Ready,
                ),
            };
            let slot = self.free.pop().expect("checked above");
            self.slots[slot as usize] = Some(Pending {
                work: work_item,
                stage,
                buf,
            });
            if stage == Stage::Ready {
                self.ready.push_back(slot);
            }
        }
        Ok(work)
    }

    /// Submits what is ready, in order, until the engine is busy.
    fn submit_ready(
        &mut self,
        index: u32,
        (at, volume): (usize, &HeldVolume),
        io: &mut IoContext,
        local: &mut ReplicaLocal,
        buffers: &mut BufferCache,
    ) -> Result<bool, String> {
        let mut work = false;
        let Some(state) = local.volumes.get_mut(at).and_then(Option::as_mut) else {
            return Err("the volume is not on this reactor".into());
        };
        if self.waiting > 0 {
            self.release_flushes(state);
        }
        while let Some(&slot) = self.ready.front() {
            let pending = self.slots[slot as usize]
                .as_mut()
                .expect("a ready slot is in use");
            let tag = (index as u64) << 16 | slot as u64;
            let request = match &mut pending.work {
                Work::Io(replica_io) => {
                    let block = volume.block_size as u64;
                    let offset = replica_io.lba * block;
                    let len = replica_io.blocks as u64 * block;
                    match replica_io.kind {
                        IoKind::Write | IoKind::Resync => {
                            let buf = pending.buf.take().expect("a write has its payload");
                            IoRequest {
                                // A resync's data is durable before its Ack: its region is
                                // then clean for this replica.
                                fua: replica_io.fua || replica_io.kind == IoKind::Resync,
                                ..IoRequest::write(volume.id, offset, buf, tag)
                            }
                        }
                        IoKind::WriteZeroes => IoRequest {
                            fua: replica_io.fua,
                            ..IoRequest::write_zeroes(volume.id, offset, len, tag)
                        },
                        IoKind::Flush => {
                            // It covers every write applied before it runs.
                            replica_io.sequence = state.replica.applied();
                            IoRequest::flush(volume.id, tag)
                        }
                        IoKind::Read => {
                            let buf = buffers
                                .get(len as usize)
                                .ok_or("no DMA memory for a read (raise dma.size)")?;
                            IoRequest::read(volume.id, offset, buf, tag)
                        }
                        IoKind::Trim => {
                            // The media keep no allocation map: a trim changes nothing here,
                            // as on the primary (NBD acknowledges TRIM the same way).
                            self.ready.pop_front();
                            let replica_io = *replica_io;
                            self.finish_io(slot, replica_io, true, state, buffers)?;
                            work = true;
                            continue;
                        }
                    }
                }
                Work::Forward {
                    kind,
                    lba,
                    blocks,
                    fua,
                    ..
                } => {
                    let block = volume.block_size as u64;
                    let (offset, len) = (*lba * block, *blocks as u64 * block);
                    match kind {
                        Kind::Write => IoRequest {
                            fua: *fua,
                            ..IoRequest::write(
                                volume.id,
                                offset,
                                pending.buf.take().expect("a write has its payload"),
                                tag,
                            )
                        },
                        Kind::WriteZeroes => IoRequest {
                            fua: *fua,
                            ..IoRequest::write_zeroes(volume.id, offset, len, tag)
                        },
                        Kind::Read => {
                            let buf = buffers
                                .get(len as usize)
                                .ok_or("no DMA memory for a read (raise dma.size)")?;
                            IoRequest::read(volume.id, offset, buf, tag)
                        }
                        _ => IoRequest::flush(volume.id, tag),
                    }
                }
                Work::Probe {
                    request_id,
                    first,
                    count,
                } => {
                    if state.replica.writing() {
                        // Every write the session delivered counts: after they are done.
                        break;
                    }
                    let reply = state.replica.probe_reply(*request_id, *first, *count);
                    self.answer_ready(slot, &reply)?;
                    work = true;
                    continue;
                }
                Work::Handover {
                    request_id,
                    sequence,
                } => {
                    if state.replica.writing() {
                        break;
                    }
                    let applied = state.replica.applied();
                    let refusal = if state.role.primary_here() {
                        Some("this node is the volume's primary already".to_string())
                    } else if !state.role.in_sync() {
                        Some("this copy is not in sync (a resync is due or running)".to_string())
                    } else if applied < *sequence {
                        Some(format!(
                            "this copy applied writes up to {applied}, not up to {sequence}"
                        ))
                    } else {
                        None
                    };
                    match &refusal {
                        None => {
                            tracing::warn!(
                                volume = %state.role.volume,
                                sequence = *sequence,
                                "replication: the primary hands the volume over to this node"
                            );
                            state.role.ask_handover(state.replica.epoch());
                        }
                        Some(reason) => tracing::warn!(
                            volume = %state.role.volume,
                            "replication: handover refused: {reason}"
                        ),
                    }
                    let reply = state
                        .replica
                        .handover_reply(*request_id, refusal.as_deref());
                    self.answer_ready(slot, &reply)?;
                    work = true;
                    continue;
                }
                Work::Epoch { epoch, next, .. } => {
                    if next.is_none() {
                        if state.persisting {
                            // Another session's epoch is being written: after it.
                            break;
                        }
                        let peer = peer_node_of(&self.phase).to_string();
                        let handed_over =
                            state.role.handing_over_to().as_deref() == Some(peer.as_str());
                        if state.role.superblock().role == Role::Primary && !handed_over {
                            // This copy was the primary's: it may hold writes of its own no
                            // majority took, so the new primary rebuilds it in full.
                            state.replica.mark_new_copy();
                        }
                        *next = Some(state.role.next_superblock(|superblock| {
                            superblock.epoch = *epoch;
                            superblock.role = Role::Replica;
                            superblock.primary = peer;
                        }));
                    }
                    let (superblock, copy) = next.as_ref().expect("set above");
                    let block = superblock
                        .encode()
                        .map_err(|error| format!("cannot write the superblock: {error}"))?;
                    let mut buf = buffers
                        .get(BLOCK_BYTES)
                        .ok_or("no DMA memory for the superblock (raise dma.size)")?;
                    buf.as_bytes_mut().copy_from_slice(&block);
                    let request = IoRequest {
                        fua: true,
                        ..IoRequest::write(volume.id, (*copy * BLOCK_BYTES) as u64, buf, tag)
                    };
                    match io.submit_metadata(request) {
                        Ok(()) => {
                            state.persisting = true;
                            pending.stage = Stage::Submitted;
                            self.ready.pop_front();
                            self.in_engine += 1;
                            work = true;
                            continue;
                        }
                        Err(rejected) => {
                            if let Some(buf) = rejected.request.buf {
                                buffers.put(buf);
                            }
                            if rejected.error == IoError::Busy {
                                break;
                            }
                            return Err(format!("cannot write the superblock: {}", rejected.error));
                        }
                    }
                }
            };
            let submitted = match &pending.work {
                // Run only while this node still serves as the primary (a stack change comes
                // after the role's, on this reactor): else the old primary's forwarder would
                // have it reach this copy alone.
                Work::Forward { request_id, .. } if !serving_primary(state) => {
                    let reply = not_primary(state, *request_id);
                    if let Some(buf) = request.buf {
                        buffers.put(buf);
                    }
                    self.answer_ready(slot, &reply)?;
                    work = true;
                    continue;
                }
                // Its span here joins the trace of the primary's (or forwarder's) IO.
                Work::Io(Io { trace, .. }) | Work::Forward { trace, .. } => {
                    io.submit_in_trace(request, *trace)
                }
                _ => io.submit(request),
            };
            match submitted {
                Ok(()) => {
                    pending.stage = Stage::Submitted;
                    self.ready.pop_front();
                    self.in_engine += 1;
                    work = true;
                }
                Err(Rejected {
                    request,
                    error: IoError::Busy,
                    ..
                }) => {
                    // Every slot of the reactor is in use: again after a completion. A write
                    // keeps its payload; a read takes a buffer again then.
                    if let Some(buf) = request.buf {
                        match pending.work {
                            Work::Io(Io {
                                kind: IoKind::Write | IoKind::Resync,
                                ..
                            }) => pending.buf = Some(buf),
                            _ => buffers.put(buf),
                        }
                    }
                    break;
                }
                Err(rejected) => {
                    // The volume refused it (cannot happen for frames ReplicaVolume checked):
                    // the primary gets an error status for it.
                    tracing::warn!(peer = %self.peer, "replication: {}", rejected.error);
                    if let Some(buf) = rejected.request.buf {
                        buffers.put(buf);
                    }
                    self.ready.pop_front();
                    if let Work::Io(replica_io) = pending.work {
                        self.finish_io(slot, replica_io, false, state, buffers)?;
                    }
                }
            }
        }
        Ok(work)
    }

    /// Flushes whose writes are applied now go to the ready queue.
    fn release_flushes(&mut self, state: &VolumeState) {
        for (slot, pending) in self.slots.iter_mut().enumerate() {
            let Some(pending) = pending else { continue };
            if let (Stage::Waiting, Work::Io(flush)) = (pending.stage, &pending.work) {
                if state.replica.flush_ready(flush.sequence) {
                    pending.stage = Stage::Ready;
                    self.ready.push_back(slot as u16);
                    self.waiting -= 1;
                }
            }
        }
    }

    /// Answers the first ready slot, `slot`, with `reply`, without the engine, and frees it.
    fn answer_ready(&mut self, slot: u16, reply: &[u8]) -> Result<(), String> {
        self.ready.pop_front();
        self.slots[slot as usize] = None;
        self.free.push(slot);
        self.stream.queue(reply).map_err(|error| error.to_string())
    }

    /// IO `io` of slot `slot` finished: its reply, and the held writes it lets go.
    fn finish_io(
        &mut self,
        slot: u16,
        io: Io,
        ok: bool,
        state: &mut VolumeState,
        buffers: &mut BufferCache,
    ) -> Result<(), String> {
        let pending = self.slots[slot as usize].take().expect("in use");
        self.free.push(slot);
        let data = match (&pending.buf, io.kind) {
            (Some(buf), IoKind::Read) if ok => buf.as_bytes(),
            _ => &[],
        };
        let (reply, ready) = state.replica.completed(&io, ok, data);
        state.role.set_applied(state.replica.applied());
        if let Some(buf) = pending.buf {
            buffers.put(buf);
        }
        if self.closing() {
            // The peer is gone; what it held behind this write is let go, or it would block
            // the volume's later writes that overlap it.
            release_held(ready, state);
            return Ok(());
        }
        self.stream
            .queue(&reply)
            .map_err(|error| error.to_string())?;
        for arrival in ready {
            let mine = self.slots.iter().position(|pending| {
                pending.as_ref().is_some_and(|pending| {
                    pending.stage == Stage::Held
                        && matches!(pending.work, Work::Io(io) if io.arrival == arrival)
                })
            });
            match mine {
                Some(held) => {
                    self.slots[held].as_mut().expect("found").stage = Stage::Ready;
                    self.ready.push_back(held as u16);
                }
                // Held by a session that has closed since.
                None => release_held(vec![arrival], state),
            }
        }
        Ok(())
    }

    fn completed(
        &mut self,
        slot: u16,
        completion: IoCompletion,
        local: &mut ReplicaLocal,
        buffers: &mut BufferCache,
    ) {
        self.in_engine -= 1;
        let Phase::Open { volume, .. } = self.phase else {
            return;
        };
        let Some(state) = local.volumes.get_mut(volume).and_then(Option::as_mut) else {
            return;
        };
        let ok = completion.result.is_ok();
        if let Some(buf) = completion.buf {
            match self.slots[slot as usize].as_mut() {
                Some(pending)
                    if matches!(
                        pending.work,
                        Work::Io(Io {
                            kind: IoKind::Read,
                            ..
                        }) | Work::Forward {
                            kind: Kind::Read,
                            ..
                        }
                    ) =>
                {
                    pending.buf = Some(buf)
                }
                _ => buffers.put(buf),
            }
        }
        let Some(pending) = self.slots[slot as usize].take() else {
            return;
        };
        let result = match pending.work {
            // Answered without the engine: never here.
            Work::Probe { .. } | Work::Handover { .. } => {
                self.free.push(slot);
                Ok(())
            }
            Work::Forward {
                kind,
                request_id,
                lba,
                blocks,
                ..
            } => {
                self.free.push(slot);
                let code = match completion.result {
                    Ok(()) => Some(status::OK),
                    // Not run: this node stopped being the primary (a reparent paused it).
                    // The forwarder sends it again, to the primary named.
                    Err(IoError::NotPrimary { .. }) => None,
                    Err(IoError::OutOfRange { .. }) => Some(status::OUT_OF_RANGE),
                    Err(_) => Some(status::IO_ERROR),
                };
                let reply = match code {
                    None => not_primary(state, request_id),
                    Some(code) => {
                        let data = pending.buf.as_ref().map_or(&[][..], |buf| buf.as_bytes());
                        state
                            .replica
                            .forwarded_reply(kind, request_id, code, lba, blocks, data)
                    }
                };
                if let Some(buf) = pending.buf {
                    buffers.put(buf);
                }
                self.stream.queue(&reply).map_err(|error| error.to_string())
            }
            Work::Io(io) => {
                self.slots[slot as usize] = Some(pending);
                self.finish_io(slot, io, ok, state, buffers)
            }
            Work::Epoch {
                epoch,
                request_id,
                base,
                next,
            } => {
                state.persisting = false;
                self.free.push(slot);
                match (ok, next) {
                    (true, Some(_)) => {
                        state.role.raise_epoch(epoch);
                        state.role.set_in_sync(false);
                        if state.role.primary_here() {
                            state.role.set_primary_here(false);
                            tracing::warn!(
                                volume = %state.role.volume,
                                "replication: node {} took the volume over at epoch {epoch}; this node is a replica now",
                                peer_node_of(&self.phase)
                            );
                        }
                        self.claimed = Some(epoch);
                        tracing::info!(peer = %self.peer, epoch, "replication: adopted epoch {epoch}");
                        let reply = state.replica.epoch_durable(epoch, request_id, base);
                        self.stream.queue(&reply).map_err(|error| error.to_string())
                    }
                    _ => Err(format!(
                        "could not record epoch {epoch} durably: {:?}",
                        completion.result
                    )),
                }
            }
        };
        if let Err(reason) = result {
            self.close_with(reason);
        }
    }
}

/// Lets go of held writes (by arrival) whose session is gone: they fail there (their primary
/// resynchronises what they held), and what they held back in turn goes too.
fn release_held(mut arrivals: Vec<u64>, state: &mut VolumeState) {
    while let Some(arrival) = arrivals.pop() {
        let io = Io {
            kind: IoKind::Resync,
            arrival,
            request_id: 0,
            lba: 0,
            blocks: 0,
            sequence: 0,
            fua: false,
            trace: None,
        };
        let (_, more) = state.replica.completed(&io, false, &[]);
        arrivals.extend(more);
    }
}

impl Connection for ReplicaConn {
    type Service = ReplicaService;

    fn stream(&self) -> &TcpStream {
        &self.stream.transport().stream
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn set_ready(&mut self, readable: bool, writable: bool) {
        if readable {
            self.stream.set_readable();
        }
        self.writable |= writable;
    }

    fn serve(
        &mut self,
        index: u32,
        io: &mut IoContext,
        service: &ReplicaService,
        local: &mut ReplicaLocal,
        buffers: &mut BufferCache,
    ) -> Served {
        let mut served = Served::default();
        if !self.closing() {
            match self.phase {
                Phase::Opening { .. } => served = self.serve_opening(service),
                Phase::Open { volume, .. } => {
                    // Taken out while it is used, and put back: no reference count moves per
                    // poll.
                    let held = self.held.take().expect("an open session has its volume");
                    if !held.role.removed() {
                        local.ensure(&held);
                    }
                    let result = self.stream.fill_from("primary").and_then(|read| {
                        if held.role.removed() {
                            return Err(format!("volume {} was deleted here", held.name));
                        }
                        let held = &*held;
                        let taken = self.take_frames(volume, local, buffers)?;
                        if taken {
                            // The engine's accept stamp of what arrived now (the reactor's last
                            // may be from before the frames came, as the NBD server's would).
                            io.stamp();
                        }
                        let submitted =
                            self.submit_ready(index, (volume, held), io, local, buffers)?;
                        Ok(read > 0 || taken || submitted)
                    });
                    self.held = Some(held);
                    match result {
                        Ok(work) => served.work = work,
                        Err(reason) => self.close_with(reason),
                    }
                    self.check_stall();
                }
            }
        }
        if self.stream.unsent() > 0 || self.writable {
            match self.stream.flush() {
                Ok(done) => self.writable = done,
                Err(error) => self.close_with(format!("writing to the primary: {error}")),
            }
        }
        if self.closing() {
            // Frames taken but not in the engine fail here; what is in the engine comes back
            // first.
            if let Phase::Open { volume, .. } = self.phase {
                // Its own volume's state only (not a volume made since in the same slot).
                let state = local
                    .volumes
                    .get_mut(volume)
                    .and_then(Option::as_mut)
                    .filter(|state| {
                        self.held
                            .as_ref()
                            .is_some_and(|held| Arc::ptr_eq(&held.role, &state.role))
                    });
                if let Some(state) = state {
                    while let Some(slot) = self.ready.pop_front() {
                        if let Some(pending) = self.slots[slot as usize].take() {
                            self.free.push(slot);
                            if let Some(buf) = pending.buf {
                                buffers.put(buf);
                            }
                            if let Work::Io(replica_io) = pending.work {
                                if replica_io.kind != IoKind::Read
                                    && replica_io.kind != IoKind::Flush
                                {
                                    release_held(vec![replica_io.arrival], state);
                                }
                            }
                        }
                    }
                }
            }
            served.remove = self.in_engine == 0;
        }
        served
    }

    fn complete(
        &mut self,
        slot: u16,
        completion: IoCompletion,
        _stamps: Option<EngineStamps>,
        local: &mut ReplicaLocal,
        buffers: &mut BufferCache,
    ) {
        self.completed(slot, completion, local, buffers);
    }

    fn close(&mut self, reason: &str) {
        self.close_with(reason.to_string());
    }

    fn removed(self: Box<Self>, _service: &ReplicaService, buffers: &mut BufferCache) {
        let node = match &self.phase {
            Phase::Open { peer, .. } => peer.as_str(),
            Phase::Opening { .. } => "(not identified)",
        };
        tracing::warn!(
            peer = %self.peer,
            node,
            "replication session closed: {}",
            self.close_reason.as_deref().unwrap_or("(no reason)")
        );
        for pending in self.slots.into_iter().flatten() {
            if let Some(buf) = pending.buf {
                buffers.put(buf);
            }
        }
    }
}

/// The node a session is from (once open).
fn peer_node_of(phase: &Phase) -> &str {
    match phase {
        Phase::Open { peer, .. } => peer,
        Phase::Opening { .. } => "",
    }
}

/// Whether `header` claims the epoch this copy holds, for another node than the one that
/// claimed it (`peer` is the session's node).
fn refused_claim(peer: &str, header: &Header, current: u64, state: &VolumeState) -> bool {
    header.kind == Kind::Epoch
        && header.epoch == current
        && current > 0
        && state.role.superblock().primary != peer
}

/// The refusal of a frame a session may not send: a claim of an epoch another node holds,
/// or a frame of the current epoch before the session (`claimed`) claimed it.
fn refuse_unclaimed(
    peer: &str,
    claimed: Option<u64>,
    header: &Header,
    current: u64,
    state: &VolumeState,
) -> Option<Decision> {
    if refused_claim(peer, header, current, state) {
        let holder = state.role.superblock().primary;
        return Some(Decision::Reply(state.replica.refusal(
            header.request_id,
            refusal::EPOCH_TAKEN,
            &format!("epoch {current} of this volume is node {holder:?}'s"),
        )));
    }
    // The primary this copy follows may hand it the volume over on a session of its own.
    let handover = header.kind == Kind::Handover && state.role.superblock().primary == peer;
    if header.kind != Kind::Epoch
        && !handover
        && header.epoch == current
        && claimed != Some(current)
    {
        return Some(Decision::Close(format!(
            "a {} frame of epoch {current} before the session claimed it",
            header.kind.name()
        )));
    }
    None
}

/// What a frame taken from a session asks for.
enum Taken {
    /// A replica's frame, as [`ReplicaVolume::on_frame`] decided.
    Decision(Decision),
    /// A forwarded IO this node runs (it is the primary).
    Forward(Work),
    /// A forwarded IO this node refuses (it is not the primary): the refusal names the
    /// primary it knows.
    Refused(Vec<u8>),
}

/// Whether this node serves the volume as its primary now.
fn serving_primary(state: &VolumeState) -> bool {
    state.role.primary_here()
        && state
            .role
            .primary_status()
            .is_some_and(|status| status.serving() && !status.fenced())
}

/// The refusal of forwarded request `request_id` by a node that is not the primary: it names
/// the primary this node knows, for the forwarder to send it there.
fn not_primary(state: &VolumeState, request_id: u64) -> Vec<u8> {
    let primary = state.role.superblock().primary;
    state
        .replica
        .refusal(request_id, refusal::NOT_PRIMARY, &primary)
}

/// A write's payload in a DMA buffer of its own (the frame's bytes are the decoder's, reused
/// by the next frame).
fn payload_buf(buffers: &mut BufferCache, payload: &[u8]) -> Result<DmaBuf, String> {
    let mut buf = buffers
        .get(payload.len())
        .ok_or("no DMA memory for a write's payload (raise dma.size)")?;
    buf.as_bytes_mut().copy_from_slice(payload);
    Ok(buf)
}

/// A forwarded client IO: run here if this node serves as the primary at the epoch the
/// forwarder knows, else refused with the primary's node id.
fn forwarded(header: &Header, state: &VolumeState) -> Taken {
    if !serving_primary(state) || header.epoch != state.role.epoch() {
        return Taken::Refused(not_primary(state, header.request_id));
    }
    Taken::Forward(Work::Forward {
        kind: header.kind,
        request_id: header.request_id,
        lba: header.lba,
        blocks: header.block_count,
        fua: header.fua,
        trace: header.trace,
    })
}
