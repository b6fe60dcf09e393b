//! The replication layer on a volume's primary: an engine [`Layer`] that sends every write,
//! write-zeroes and flush to the local device (a child IO) and to every replica (a frame on
//! the session to that node) in parallel, and completes the client's IO when
//! [`PrimaryVolume`] says a majority of copies has it. Reads pass on to the local device;
//! while the health monitor has them hedged ([`VolumeStatus::set_hedge`], a primary found
//! slow), a read is read into a bounce buffer here and, once late, asked of an in-sync
//! replica holding every write to its blocks: the first good answer is the client's.
//!
//! The layer owns its sessions, one per replica: non-blocking sockets in an epoll set the
//! reactor sleeps on ([`Layer::wake_fd`]), polled every loop iteration. A session opens with
//! Hello ([`crate::session`]), then an Epoch frame claiming the volume's epoch (which the
//! replica makes durable), then a second Epoch frame with the base its stream starts after
//! ([`PrimaryVolume::replica_rejoined`]); writes follow. A replica that is down or whose
//! session breaks falls behind: its writes fail there and keep their dirty bits, and the
//! layer dials it again with a growing pause. Connecting runs on a short-lived thread, so
//! the reactor never blocks on a dead peer.
//!
//! A replica that refuses the epoch as stale says another node took the volume over: the
//! layer is then fenced, and fails every write from then on ([`IoError::NotPrimary`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use fathom_dma::{DmaBuf, DmaPool};
use fathom_drivers::{IoCommand, IoFlags, Op};
use fathom_engine::layer::{Down, Layer, LayerCtx, LayerName, OwnIo, Up};
use fathom_engine::poll::Epoll;
use fathom_engine::volume::IoError;

use crate::dial::{open_stream, Dialed, Dialer, Identity};
use crate::meta::BLOCK_BYTES;
use crate::pace::ResyncPace;
use crate::primary::{Answer, Copy, PrimaryVolume};
use crate::proto::{refusal, status, Header, Kind};
use crate::resync::{Chunk, Resync};
use crate::role::VolumeRole;
use crate::session::{ConnectorSession, PeerAuth};
use crate::stream::FrameStream;

/// How long a replica has to open its session and take the epoch.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a session may hold for a replica that does not read: beyond it, the replica is
/// dropped (it falls behind and is caught up later) rather than holding writes back.
const MAX_UNSENT: usize = 64 << 20;

/// One replica's node.
#[derive(Debug, Clone)]
pub struct PeerAddress {
    pub node: String,
    pub address: SocketAddr,
}

/// What a replication layer is built from.
pub struct Settings {
    pub node: String,
    pub cluster: String,
    pub auth: PeerAuth,
    /// Mutual TLS: this node's client side (its certificate, the cluster's CA).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub volume: String,
    pub epoch: u64,
    /// The volume's first namespace LBA, size and block.
    pub first_lba: u64,
    pub blocks: u64,
    pub block_size: u32,
    pub region_shift: u32,
    /// The last write sequence known here.
    pub sequence: u64,
    pub peers: Vec<PeerAddress>,
    /// The largest payload a frame carries (the volume's largest transfer).
    pub max_payload: u32,
    /// The owning reactor's IO slots.
    pub slots: usize,
    /// Where resync buffers come from.
    pub pool: DmaPool,
    /// Resync bytes per second to one replica; 0: as fast as it goes.
    pub resync_rate: u64,
    /// The client write p99 a resync keeps to ([`crate::pace`]); `None`: no bound.
    pub resync_p99: Option<Duration>,
    /// Per replica: the namespace LBA of its dirty-region bitmap's first 4 KiB block in the
    /// metadata area, and the blocks as stored there at start.
    pub bitmap_lbas: Vec<u64>,
    pub bitmaps: Vec<Vec<Vec<u8>>>,
    /// This primary's copy was new at this start (the volume's first epoch): until its first
    /// write, a replica's new copy needs no rebuild (every copy starts alike).
    pub fresh: bool,
    /// What this node is for the volume (shared with its replica service).
    pub role: Arc<VolumeRole>,
    /// The epoch is durable on a majority already (a promote did it): serve at once. Else
    /// the layer serves once a majority of copies took `epoch` and it made it durable here.
    pub serving: bool,
    /// The namespace LBA of the volume's metadata area (its two superblocks first).
    pub meta_lba: u64,
    /// Per replica, regions it lacks from the start (a promote's reconciliation).
    pub stale: Vec<Vec<u64>>,
    /// Per replica, its `replicate:NODE` telemetry stage ([`fathom_engine::Engine::stage`]).
    pub replicate_stages: Vec<Option<usize>>,
}

/// Own IO tags: a dirty-bitmap block write (replica << 32 | block), a resync read
/// (replica << 48 | volume block).
const BITMAP_TAG: u64 = 1 << 63;
/// Own IO tag of the superblock write that makes a new epoch durable here.
const SUPERBLOCK_TAG: u64 = 1 << 61;
const RESYNC_TAG: u64 = 1 << 62;
/// Own IO tag of a hedged read's local half (the hedge's id below it).
const HEDGE_TAG: u64 = 1 << 60;

/// Hedged reads in flight at most; beyond, reads pass to the local copy alone.
const MAX_HEDGED: usize = 64;
/// Hedged reads whose local half is out at most; beyond, they go to a replica alone.
const MAX_LOCAL_HEDGED: usize = 8;

/// Resync chunks read or sent and not yet answered, per replica.
const RESYNC_WINDOW: usize = 8;
/// The largest resync chunk.
const RESYNC_CHUNK_BYTES: u64 = 256 << 10;

/// A replica's session as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PeerState {
    Down = 0,
    Connecting = 1,
    Open = 2,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Down => "down",
            PeerState::Connecting => "connecting",
            PeerState::Open => "open",
        }
    }
}

/// One replica, as the layer last published it.
#[derive(Debug)]
pub struct PeerStatus {
    pub node: String,
    state: AtomicU8,
    in_sync: AtomicBool,
    /// The highest sequence it acknowledged.
    acknowledged: AtomicU64,
    /// Regions it may lack.
    dirty_regions: AtomicU64,
    /// Regions it lacks writes in from before its session (to resync), and bytes resynced.
    stale_regions: AtomicU64,
    resynced_bytes: AtomicU64,
}

impl PeerStatus {
    pub fn state(&self) -> PeerState {
        match self.state.load(Ordering::Relaxed) {
            2 => PeerState::Open,
            1 => PeerState::Connecting,
            _ => PeerState::Down,
        }
    }
    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::Relaxed)
    }
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }
    pub fn dirty_regions(&self) -> u64 {
        self.dirty_regions.load(Ordering::Relaxed)
    }
    pub fn stale_regions(&self) -> u64 {
        self.stale_regions.load(Ordering::Relaxed)
    }
    pub fn resynced_bytes(&self) -> u64 {
        self.resynced_bytes.load(Ordering::Relaxed)
    }
}

/// A replicated volume on its primary, as the layer last published it (read by the control
/// channel and telemetry on other threads).
#[derive(Debug)]
pub struct VolumeStatus {
    pub volume: String,
    /// Bytes a dirty region stands for.
    pub region_bytes: u64,
    epoch: AtomicU64,
    sequence: AtomicU64,
    fenced: AtomicBool,
    serving: AtomicBool,
    /// Set by a reparent: new IO is paused (held, not failed) until the layer leaves the
    /// stack (its IO then goes to the new primary) or the flag is cleared (it goes on here).
    draining: AtomicBool,
    /// Client IO the layer holds in flight (not counting what is paused).
    in_flight: AtomicU64,
    /// The resync rate in force (bytes per second, 0: no limit), and the client write p99
    /// (µs) of the last window that decided it ([`crate::pace`]).
    resync_pace: AtomicU64,
    resync_client_p99_us: AtomicU64,
    /// Reads are hedged to an in-sync replica when the local copy has not answered within
    /// this (ns); `u64::MAX`: not hedged. Set by the health monitor for a suspect primary.
    hedge_after_ns: AtomicU64,
    /// Reads asked of a replica too, and those the replica answered first.
    hedges: AtomicU64,
    hedge_wins: AtomicU64,
    pub peers: Vec<PeerStatus>,
}

impl VolumeStatus {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }
    /// The last write sequence begun.
    pub fn sequence(&self) -> u64 {
        self.sequence.load(Ordering::Relaxed)
    }
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }
    /// A majority took its epoch: it serves client IO.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
    /// Pauses new IO (true) or lets it go on (false), for a reparent.
    pub fn set_draining(&self, draining: bool) {
        if draining {
            // Unknown until the layer's next loop publishes it.
            self.in_flight.store(u64::MAX, Ordering::Release);
        }
        self.draining.store(draining, Ordering::Release);
    }
    /// The resync rate in force, bytes per second (0: no limit).
    pub fn resync_pace(&self) -> u64 {
        self.resync_pace.load(Ordering::Relaxed)
    }
    /// The client write p99 (µs) of the last window that decided the resync rate (0: no
    /// bound, or no window yet).
    pub fn resync_client_p99_us(&self) -> u64 {
        self.resync_client_p99_us.load(Ordering::Relaxed)
    }
    /// Client writes and flushes in flight (published every loop while draining; `u64::MAX`
    /// until the first loop after the drain began).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }
    /// Hedges reads (`Some`: a read the local copy has not answered within that time is
    /// asked of an in-sync replica too, and the first answer is the client's) or stops.
    pub fn set_hedge(&self, after: Option<Duration>) {
        let ns = after.map_or(u64::MAX, |after| {
            after.as_nanos().min(u64::MAX as u128 - 1) as u64
        });
        self.hedge_after_ns.store(ns, Ordering::Relaxed);
    }
    /// When reads are hedged, after how long.
    pub fn hedge_after(&self) -> Option<Duration> {
        match self.hedge_after_ns.load(Ordering::Relaxed) {
            u64::MAX => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
    /// Reads asked of a replica too, and of those the ones it answered first.
    pub fn hedged_reads(&self) -> (u64, u64) {
        (
            self.hedges.load(Ordering::Relaxed),
            self.hedge_wins.load(Ordering::Relaxed),
        )
    }
}

/// What was sent to a replica and waits for its answer.
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// A write of `op` (write or write-zeroes) of volume blocks `lba..lba + blocks`, sent at
    /// `sent` (clock ticks).
    Write {
        sequence: u64,
        op: Op,
        sent: u64,
        lba: u64,
        blocks: u32,
    },
    /// Hedged read `hedge` ([`Hedge`]).
    Read {
        hedge: u64,
    },
    /// A flush asking for every write up to `target`.
    Flush {
        sent: u64,
        target: u64,
    },
    Resync(Chunk),
}

enum Link {
    Down,
    Opening {
        stream: Box<FrameStream>,
        session: Box<ConnectorSession>,
        deadline: Instant,
    },
    /// The epoch claim is out; writes wait for its answer.
    Claiming {
        stream: Box<FrameStream>,
        request_id: u64,
        deadline: Instant,
    },
    Open {
        stream: Box<FrameStream>,
    },
}

struct Peer {
    node: String,
    address: SocketAddr,
    link: Link,
    /// By request id.
    outstanding: HashMap<u64, Sent>,
    dialer: Dialer,
    /// Its `replicate:NODE` stage.
    stage: Option<usize>,
    resync: Resync,
    /// Chunks being copied: waiting for the primary's writes to them, or being read. Client
    /// writes to them wait meanwhile (`blocked`), so the Resync frame goes out before them.
    copying: Vec<Copying>,
    /// Resync buffers free to read into.
    buffers: Vec<DmaBuf>,
    /// Resync bytes it may be sent now (the rate's token bucket), and when it was filled.
    tokens: f64,
    filled: Instant,
}

/// A chunk on its way from the primary's copy to a replica's session.
struct Copying {
    chunk: Chunk,
    /// The read is out (else it waits for writes in flight to the chunk).
    reading: bool,
    /// The session broke meanwhile: the read's data goes nowhere.
    abandoned: bool,
}

impl Peer {
    fn stream(&mut self) -> Option<&mut FrameStream> {
        match &mut self.link {
            Link::Opening { stream, .. }
            | Link::Claiming { stream, .. }
            | Link::Open { stream } => Some(stream),
            Link::Down => None,
        }
    }

    fn copying_overlaps(&self, lba: u64, blocks: u32) -> bool {
        self.copying
            .iter()
            .any(|copying| overlaps(copying.chunk.lba, copying.chunk.blocks, lba, blocks))
    }
}

/// Whether volume blocks `a..a + a_blocks` and `b..b + b_blocks` share one.
fn overlaps(a: u64, a_blocks: u32, b: u64, b_blocks: u32) -> bool {
    a < b + b_blocks as u64 && b < a + a_blocks as u64
}

/// A client IO the layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parent {
    None,
    Write {
        sequence: u64,
        /// Volume blocks, and whether the primary's own copy has it (a resync read of
        /// these blocks waits until it does).
        lba: u64,
        blocks: u32,
        local_done: bool,
        /// When the layer took it (clock ticks): its answer's latency paces resyncs.
        began: u64,
    },
    Flush {
        id: u64,
        target: u64,
    },
}

/// A client read asked of the local copy (into a bounce buffer, so that the client's buffer
/// is free the moment either copy answers) and, once it is late, of an in-sync replica: the
/// first good answer is the client's, the other is dropped when it comes.
#[derive(Debug)]
struct Hedge {
    /// The client's read, until it is answered.
    slot: Option<u32>,
    /// Namespace LBA and blocks.
    slba: u64,
    blocks: u32,
    /// When the layer took it (clock ticks).
    began: u64,
    /// The local read is out (its buffer comes back to `own_done`).
    local_out: bool,
    /// The local read failed, and how.
    local_error: Option<IoError>,
    /// A replica was asked and has not answered.
    replica_out: bool,
    replica_failed: bool,
}

/// How long a new primary holds writes while its sessions to the replicas open.
const WARM_UP: Duration = Duration::from_secs(3);

/// The replication layer of one volume on its primary.
pub struct ReplicationLayer {
    identity: Identity,
    volume: String,
    epoch: u64,
    first_lba: u64,
    primary: PrimaryVolume,
    peers: Vec<Peer>,
    epoll: Epoll,
    /// By reactor slot.
    parents: Vec<Parent>,
    by_sequence: HashMap<u64, u32>,
    by_flush: HashMap<u64, u32>,
    held: usize,
    /// IO that arrived while a reparent drains this primary, in arrival order.
    paused: VecDeque<(u32, IoCommand, bool)>,
    /// Until then, a new primary (a promote, a reparent) holds writes and flushes rather
    /// than fail them while its sessions to a majority open.
    warm_until: Option<Instant>,
    /// The control plane's lease allowed acknowledging IO at the last poll. While it does not,
    /// new IO is paused and completed IO waits in `unacknowledged`.
    lease_ok: bool,
    unacknowledged: VecDeque<(u32, Result<(), IoError>)>,
    /// Client writes waiting for a resync chunk they overlap to go out, in arrival order.
    blocked: VecDeque<(u32, IoCommand)>,
    next_request: u64,
    /// A replica refused this epoch as stale: another node is primary now.
    fenced: bool,
    status: Arc<VolumeStatus>,
    /// How fast resyncs copy now.
    pace: ResyncPace,
    block_size: u32,
    fresh: bool,
    /// The dirty bitmaps on the device (activity-log semantics: a bit set before the write
    /// it covers goes to any replica): where each lies, the blocks changed since the last
    /// batch, the batch being written, and how many batches were started and finished.
    bitmap_lbas: Vec<u64>,
    bitmap_changed: std::collections::BTreeSet<(usize, usize)>,
    batch: Vec<(usize, usize)>,
    batch_in_flight: usize,
    batches_started: u64,
    batches_done: u64,
    bitmap_buffers: Vec<DmaBuf>,
    pool: DmaPool,
    /// Writes whose frames wait for a bitmap batch (and those behind them, to keep the
    /// sequence order): slot, sequence, command, the batch they need.
    waiting_sends: VecDeque<(u32, u64, IoCommand, u64)>,
    /// When the peers' status was last published for other threads.
    published: Instant,
    role: Arc<VolumeRole>,
    /// A majority of copies holds the epoch, durably here: client IO is served.
    serving: bool,
    /// The superblock write that makes the epoch durable here is out.
    persisting: bool,
    /// Replicas that took this epoch.
    claimed: u64,
    node_id: String,
    meta_lba: u64,
    /// Hedged reads by id, while either half is out.
    hedges: HashMap<u64, Hedge>,
    next_hedge: u64,
    late_hedges: Vec<u64>,
    /// Hedged reads whose local half is out.
    local_hedged: usize,
}

/// How often the layer publishes its replicas' lag for the control channel and telemetry.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

impl ReplicationLayer {
    pub fn new(settings: Settings) -> io::Result<Self> {
        let status = Arc::new(VolumeStatus {
            volume: settings.volume.clone(),
            region_bytes: 1 << settings.region_shift,
            epoch: AtomicU64::new(settings.epoch),
            sequence: AtomicU64::new(settings.sequence),
            fenced: AtomicBool::new(false),
            serving: AtomicBool::new(settings.serving),
            draining: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            resync_pace: AtomicU64::new(settings.resync_rate),
            resync_client_p99_us: AtomicU64::new(0),
            hedge_after_ns: AtomicU64::new(u64::MAX),
            hedges: AtomicU64::new(0),
            hedge_wins: AtomicU64::new(0),
            peers: settings
                .peers
                .iter()
                .map(|peer| PeerStatus {
                    node: peer.node.clone(),
                    state: AtomicU8::new(PeerState::Down as u8),
                    in_sync: AtomicBool::new(false),
                    acknowledged: AtomicU64::new(0),
                    dirty_regions: AtomicU64::new(0),
                    stale_regions: AtomicU64::new(0),
                    resynced_bytes: AtomicU64::new(0),
                })
                .collect(),
        });
        let now = Instant::now();
        let chunk_bytes = RESYNC_CHUNK_BYTES
            .min(1 << settings.region_shift)
            .min(settings.max_payload as u64)
            .max(settings.block_size as u64);
        let chunk_blocks = (chunk_bytes / settings.block_size as u64) as u32;
        let remotes = settings.peers.len();
        let node_id = settings.node.clone();
        let mut peers = Vec::with_capacity(remotes);
        for (peer, stage) in settings.peers.into_iter().zip(
            settings
                .replicate_stages
                .iter()
                .copied()
                .chain(std::iter::repeat(None)),
        ) {
            let buffers = (0..RESYNC_WINDOW)
                .map(|_| settings.pool.alloc(chunk_bytes as usize))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| {
                    io::Error::other(format!("no DMA memory for resync buffers: {error}"))
                })?;
            peers.push(Peer {
                node: peer.node,
                address: peer.address,
                link: Link::Down,
                outstanding: HashMap::with_capacity(settings.slots),
                dialer: Dialer::new(now),
                stage,
                resync: Resync::new(chunk_blocks, RESYNC_WINDOW),
                copying: Vec::with_capacity(RESYNC_WINDOW),
                buffers,
                tokens: 0.0,
                filled: now,
            });
        }
        let mut primary = PrimaryVolume::new(
            remotes,
            settings.blocks,
            settings.block_size,
            settings.region_shift,
            settings.sequence,
        );
        for (replica, blocks) in settings.bitmaps.iter().enumerate() {
            for (index, block) in blocks.iter().enumerate() {
                primary.load_dirty(replica, index, block).map_err(|error| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the dirty bitmap of replica {}: {error}",
                            peers[replica].node
                        ),
                    )
                })?;
            }
        }
        for (replica, regions) in settings.stale.iter().enumerate() {
            primary.mark_stale(replica, regions);
        }
        let bitmap_buffers = (0..4)
            .map(|_| settings.pool.alloc(BLOCK_BYTES))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| {
                io::Error::other(format!("no DMA memory for bitmap writes: {error}"))
            })?;
        let layer = Self {
            primary,
            peers,
            epoll: Epoll::new(16)?,
            parents: vec![Parent::None; settings.slots],
            by_sequence: HashMap::with_capacity(settings.slots),
            by_flush: HashMap::with_capacity(settings.slots),
            held: 0,
            paused: VecDeque::with_capacity(settings.slots),
            warm_until: Some(Instant::now() + WARM_UP),
            lease_ok: true,
            unacknowledged: VecDeque::new(),
            blocked: VecDeque::with_capacity(settings.slots),
            next_request: 1,
            fenced: false,
            identity: Identity {
                node: settings.node,
                cluster: settings.cluster,
                auth: settings.auth,
                tls: settings.tls,
                max_payload: settings.max_payload,
            },
            volume: settings.volume,
            epoch: settings.epoch,
            first_lba: settings.first_lba,
            status,
            pace: ResyncPace::new(settings.resync_rate, settings.resync_p99, Instant::now()),
            block_size: settings.block_size,
            fresh: settings.fresh,
            bitmap_lbas: settings.bitmap_lbas,
            bitmap_changed: Default::default(),
            batch: Vec::new(),
            batch_in_flight: 0,
            batches_started: 0,
            batches_done: 0,
            bitmap_buffers,
            pool: settings.pool,
            waiting_sends: VecDeque::with_capacity(settings.slots),
            published: now,
            role: settings.role,
            serving: settings.serving,
            persisting: false,
            claimed: 0,
            node_id,
            meta_lba: settings.meta_lba,
            hedges: HashMap::with_capacity(MAX_HEDGED),
            next_hedge: 0,
            late_hedges: Vec::with_capacity(MAX_HEDGED),
            local_hedged: 0,
        };
        // What the bitmaps say each replica lacks shows from the start.
        for index in 0..layer.peers.len() {
            layer.publish_peer(index);
        }
        Ok(layer)
    }

    /// What the layer publishes, for the control channel and telemetry.
    pub fn status(&self) -> Arc<VolumeStatus> {
        self.status.clone()
    }

    fn request_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    /// Completes the client IOs `answers` decided.
    fn answer_writes(&mut self, ctx: &mut LayerCtx<'_>, answers: impl IntoIterator<Item = Answer>) {
        for answer in answers {
            let (sequence, result) = match answer {
                Answer::Done { sequence } => (sequence, Ok(())),
                Answer::Failed { sequence } => (sequence, Err(IoError::NoQuorum { op: Op::Write })),
            };
            if let Some(slot) = self.by_sequence.remove(&sequence) {
                if let Parent::Write { began, .. } = self.parents[slot as usize] {
                    let ticks = ctx.now().saturating_sub(began);
                    self.pace.record(ctx.clock().ticks_to_ns(ticks) / 1000);
                }
                self.finish(ctx, slot, result);
            }
        }
    }

    fn answer_flushes(&mut self, ctx: &mut LayerCtx<'_>, answers: Vec<(u64, Answer)>) {
        for (id, answer) in answers {
            let result = match answer {
                Answer::Done { .. } => Ok(()),
                Answer::Failed { .. } => Err(IoError::NoQuorum { op: Op::Flush }),
            };
            if let Some(slot) = self.by_flush.remove(&id) {
                self.finish(ctx, slot, result);
            }
        }
    }

    /// A new primary whose sessions to a majority of in-sync copies are not open yet, for
    /// [`WARM_UP`] at most.
    fn warming(&self) -> bool {
        let Some(until) = self.warm_until else {
            return false;
        };
        if !self.serving || Instant::now() >= until {
            return false;
        }
        let open = self
            .peers
            .iter()
            .enumerate()
            .filter(|(index, peer)| {
                matches!(peer.link, Link::Open { .. }) && self.primary.in_sync(*index)
            })
            .count() as u32;
        1 + open < self.primary.majority()
    }

    fn finish(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, result: Result<(), IoError>) {
        if !self.lease_ok && result.is_ok() {
            // No acknowledgement after the lease ran out: another node may be the primary.
            self.unacknowledged.push_back((slot, result));
            return;
        }
        self.parents[slot as usize] = Parent::None;
        self.held -= 1;
        ctx.complete(slot, result);
    }

    /// Replica `index`'s session is gone: what it had not answered failed there.
    fn lose(&mut self, ctx: &mut LayerCtx<'_>, index: usize, reason: &str) {
        let peer = &mut self.peers[index];
        if let Some(stream) = peer.stream() {
            let fd = stream.transport().stream.as_fd();
            let _ = self.epoll.delete(fd);
        }
        tracing::warn!(
            volume = %self.volume,
            replica = %peer.node,
            "replication: session to {} lost: {reason}; it falls behind and is caught up when it is back",
            peer.address
        );
        peer.link = Link::Down;
        peer.dialer.failed(Instant::now());
        let reads: Vec<u64> = peer
            .outstanding
            .values()
            .filter_map(|sent| match sent {
                Sent::Read { hedge } => Some(*hedge),
                _ => None,
            })
            .collect();
        peer.outstanding.clear();
        for hedge in reads {
            self.hedge_replica_done(ctx, hedge, false);
        }
        let peer = &mut self.peers[index];
        peer.resync.reset();
        for copying in &mut peer.copying {
            copying.abandoned = true;
        }
        // Chunks not read yet are dropped now; those being read come back to chunk_read.
        peer.copying.retain(|copying| copying.reading);
        for (flush, answer) in self.primary.replica_lost(index) {
            match flush {
                Some(id) => self.answer_flushes(ctx, vec![(id, answer)]),
                None => self.answer_writes(ctx, [answer]),
            }
        }
        self.publish_peer(index);
        self.release_blocked(ctx);
    }

    fn publish_peer(&self, index: usize) {
        let status = &self.status.peers[index];
        let state = match self.peers[index].link {
            Link::Down => PeerState::Down,
            Link::Opening { .. } | Link::Claiming { .. } => PeerState::Connecting,
            Link::Open { .. } => PeerState::Open,
        };
        status.state.store(state as u8, Ordering::Relaxed);
        // A replica that is away is behind by whatever it misses meanwhile.
        status.in_sync.store(
            state == PeerState::Open && self.primary.in_sync(index),
            Ordering::Relaxed,
        );
        status
            .dirty_regions
            .store(self.primary.dirty(index).count(), Ordering::Relaxed);
        status
            .stale_regions
            .store(self.primary.stale(index).len() as u64, Ordering::Relaxed);
    }

    /// Starts or finishes a connection attempt to a replica that is down.
    fn dial(&mut self, index: usize, now: Instant) -> Result<bool, String> {
        let peer = &mut self.peers[index];
        if !matches!(peer.link, Link::Down) {
            return Ok(false);
        }
        let socket = match peer.dialer.poll(&peer.node, peer.address, now) {
            Dialed::Waiting => return Ok(false),
            Dialed::Started => return Ok(true),
            Dialed::Failed(reason) => {
                tracing::debug!(replica = %peer.node, "replication: {reason}");
                return Ok(true);
            }
            Dialed::Connected(socket) => socket,
        };
        let opened = open_stream(
            &self.identity,
            socket,
            &peer.node,
            peer.address,
            &self.volume,
            MAX_UNSENT,
        )
        .and_then(|(stream, session)| {
            self.epoll
                .add(stream.transport().stream.as_fd(), index as u64, true)
                .map_err(|error| format!("cannot watch the socket: {error}"))?;
            Ok((stream, session))
        });
        match opened {
            Ok((stream, session)) => {
                peer.link = Link::Opening {
                    stream: Box::new(stream),
                    session: Box::new(session),
                    deadline: now + OPENING_TIMEOUT,
                };
                self.publish_peer(index);
                Ok(true)
            }
            Err(reason) => {
                peer.dialer.failed(now);
                Err(reason)
            }
        }
    }

    /// Reads and handles what replica `index` sent, and writes what waits for it.
    fn serve_peer(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        index: usize,
        now: Instant,
    ) -> Result<bool, String> {
        let mut work = false;
        let peer = &mut self.peers[index];
        match &peer.link {
            Link::Opening { deadline, .. } | Link::Claiming { deadline, .. }
                if now >= *deadline =>
            {
                return Err(format!(
                    "the replica did not open the session within {} s",
                    OPENING_TIMEOUT.as_secs()
                ))
            }
            _ => {}
        }
        if let Some(stream) = peer.stream() {
            work |= stream.fill_from("replica")? > 0;
        }
        loop {
            // What the next frame says, taken out of it before the stream is used again.
            let peer = &mut self.peers[index];
            let received = match &mut peer.link {
                Link::Down => break,
                Link::Opening {
                    stream, session, ..
                } => match stream.next_frame() {
                    None => break,
                    Some(Err(error)) => return Err(error.to_string()),
                    Some(Ok(frame)) => {
                        let (bytes, _) = session
                            .on_frame(&frame)
                            .map_err(|error| error.to_string())?;
                        Received::Opened(bytes)
                    }
                },
                Link::Claiming { stream, .. } | Link::Open { stream } => {
                    match stream.next_frame() {
                        None => break,
                        Some(Err(error)) => return Err(error.to_string()),
                        Some(Ok(frame)) if frame.header.kind == Kind::ReadReply => {
                            // A hedged read's answer: its data goes to the client's buffer
                            // here, from the stream's own.
                            let Some(Sent::Read { hedge }) =
                                peer.outstanding.remove(&frame.header.request_id)
                            else {
                                return Err(format!(
                                    "a ReadReply for request {} not sent",
                                    frame.header.request_id
                                ));
                            };
                            let ok = frame.header.status == status::OK
                                && self.hedges.get(&hedge).is_some_and(|read| {
                                    read.slot.is_some_and(|slot| {
                                        fill_read(
                                            ctx,
                                            slot,
                                            frame.payload,
                                            self.block_size,
                                            read.blocks,
                                        )
                                    })
                                });
                            Received::Hedge(hedge, ok)
                        }
                        Some(Ok(frame)) => {
                            Received::Frame(frame.header, frame.refusal_text().map(str::to_string))
                        }
                    }
                }
            };
            work = true;
            match received {
                Received::Opened(bytes) => self.claim(index, &bytes, now)?,
                Received::Frame(header, text) => self.on_answer(ctx, index, header, text)?,
                Received::Hedge(hedge, ok) => self.hedge_replica_done(ctx, hedge, ok),
            }
        }
        if let Some(stream) = self.peers[index].stream() {
            stream.flush().map_err(|error| error.to_string())?;
        }
        Ok(work)
    }

    /// The session to replica `index` is open (`bytes`: the proof to send, if any): claim
    /// the epoch, which the replica records durably before it answers.
    fn claim(&mut self, index: usize, bytes: &[u8], now: Instant) -> Result<(), String> {
        let request_id = self.request_id();
        let epoch = self.epoch;
        let peer = &mut self.peers[index];
        let Link::Opening { mut stream, .. } = std::mem::replace(&mut peer.link, Link::Down) else {
            return Err("the session opened twice".into());
        };
        stream.queue(bytes).map_err(|error| error.to_string())?;
        let claim = Header {
            epoch,
            request_id,
            status: status::OUT_OF_SYNC,
            ..Header::new(Kind::Epoch)
        };
        stream
            .queue_frame(&claim, &[])
            .map_err(|error| error.to_string())?;
        peer.link = Link::Claiming {
            stream,
            request_id,
            deadline: now + OPENING_TIMEOUT,
        };
        Ok(())
    }

    /// A frame from replica `index` once its session is open.
    fn on_answer(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        index: usize,
        header: Header,
        refusal_text: Option<String>,
    ) -> Result<(), String> {
        match header.kind {
            Kind::Refused => {
                let text = refusal_text.unwrap_or_default();
                if header.status == refusal::STALE_EPOCH || header.status == refusal::EPOCH_TAKEN {
                    let node = self.peers[index].node.clone();
                    self.fence(&node, header.epoch, &text);
                }
                Err(format!("the replica refused: {text}"))
            }
            Kind::EpochOk => {
                let Link::Claiming { request_id, .. } = self.peers[index].link else {
                    // The answer to the base: nothing to do.
                    return Ok(());
                };
                if header.request_id != request_id {
                    return Err("an EpochOk for another claim".into());
                }
                self.primary.observe(header.sequence);
                self.status
                    .sequence
                    .store(self.primary.last_sequence(), Ordering::Relaxed);
                // A new copy at the volume's very start (no write yet on a new primary) is
                // like every other; later, it holds nothing of what was written.
                let blank_volume = self.fresh && self.primary.last_sequence() == 0;
                if header.status == status::NEW_COPY && !blank_volume {
                    // A replaced or wiped disk: every region is copied to it.
                    tracing::warn!(
                        volume = %self.volume,
                        replica = %self.peers[index].node,
                        "replication: the replica's copy is new; rebuilding it in full"
                    );
                    let changed = self.primary.replica_is_new(index);
                    self.bitmap_changed
                        .extend(changed.into_iter().map(|block| (index, block)));
                    self.start_batch(ctx);
                }
                self.open(index)?;
                self.establish(ctx);
                Ok(())
            }
            Kind::Ack => {
                let sent = self.peers[index].outstanding.remove(&header.request_id);
                if let Some(Sent::Resync(chunk)) = sent {
                    self.chunk_answered(index, chunk, header.status == status::OK);
                    return Ok(());
                }
                let Some(Sent::Write {
                    sequence, op, sent, ..
                }) = sent
                else {
                    return Err(format!("an Ack for request {} not sent", header.request_id));
                };
                if let Some(stage) = self.peers[index].stage {
                    ctx.record(op, stage, ctx.now().saturating_sub(sent));
                }
                if sequence != header.sequence {
                    return Err(format!(
                        "an Ack of write {} for write {sequence}",
                        header.sequence
                    ));
                }
                let ok = header.status == status::OK;
                if ok {
                    self.status.peers[index]
                        .acknowledged
                        .fetch_max(sequence, Ordering::Relaxed);
                }
                if let Some(answer) = self.primary.replica_done(index, sequence, ok) {
                    self.answer_writes(ctx, [answer]);
                }
                Ok(())
            }
            Kind::FlushAck => {
                let sent = self.peers[index].outstanding.remove(&header.request_id);
                let Some(Sent::Flush { sent, target }) = sent else {
                    return Err(format!(
                        "a FlushAck for request {} not sent",
                        header.request_id
                    ));
                };
                let ok = header.status == status::OK;
                if let Some(stage) = self.peers[index].stage {
                    ctx.record(Op::Flush, stage, ctx.now().saturating_sub(sent));
                }
                let mut answers =
                    self.primary
                        .flush_done(Copy::Replica(index), header.sequence, ok);
                if ok && header.sequence < target {
                    // The replica holds a flush until the writes it covers are applied; less
                    // means it lacks one of them for good (a write that failed there).
                    answers.extend(self.primary.flush_fell_short(Copy::Replica(index), target));
                }
                self.answer_flushes(ctx, answers);
                self.publish_peer(index);
                Ok(())
            }
            other => Err(format!(
                "a {} frame is not an answer a replica sends",
                other.name()
            )),
        }
    }

    /// Replica `index` took the epoch: its stream starts after the last write begun (what it
    /// lacks before is in its dirty regions), and writes from here on go to it.
    fn open(&mut self, index: usize) -> Result<(), String> {
        let base = self.primary.replica_rejoined(index);
        let request_id = self.request_id();
        let epoch = self.epoch;
        let peer = &mut self.peers[index];
        let Link::Claiming { mut stream, .. } = std::mem::replace(&mut peer.link, Link::Down)
        else {
            return Err("the epoch was taken twice".into());
        };
        let header = Header {
            epoch,
            sequence: base,
            request_id,
            status: match self.primary.in_sync(index) {
                true => status::OK,
                false => status::OUT_OF_SYNC,
            },
            ..Header::new(Kind::Epoch)
        };
        stream
            .queue_frame(&header, &[])
            .map_err(|error| error.to_string())?;
        peer.link = Link::Open { stream };
        self.claimed |= 1 << index;
        // It has every write up to its base, or lacks it in a region it is resynced in.
        self.status.peers[index]
            .acknowledged
            .fetch_max(base, Ordering::Relaxed);
        peer.dialer.opened();
        tracing::info!(
            volume = %self.volume,
            replica = %peer.node,
            epoch,
            base,
            in_sync = self.primary.in_sync(index),
            "replication: session open"
        );
        self.publish_peer(index);
        Ok(())
    }

    /// Once a majority of copies took the epoch (this one and the replicas that answered its
    /// claim), it is made durable here; then client IO is served.
    fn establish(&mut self, ctx: &mut LayerCtx<'_>) {
        if self.serving || self.persisting || self.fenced {
            return;
        }
        if self.claimed.count_ones() + 1 < self.primary.majority() {
            return;
        }
        let epoch = self.epoch;
        let node = self.node_id.clone();
        let (superblock, copy) = self.role.next_superblock(|superblock| {
            superblock.epoch = epoch;
            superblock.role = crate::meta::Role::Primary;
            superblock.primary = node;
        });
        let block = match superblock.encode() {
            Ok(block) => block,
            Err(error) => {
                tracing::error!(volume = %self.volume, "replication: cannot write the superblock: {error}");
                return;
            }
        };
        let Some(mut buf) = self
            .bitmap_buffers
            .pop()
            .or_else(|| self.pool.alloc(BLOCK_BYTES).ok())
        else {
            tracing::warn!(volume = %self.volume, "replication: no DMA memory for the superblock; retrying");
            return;
        };
        buf.as_bytes_mut().copy_from_slice(&block);
        let per_block = (BLOCK_BYTES / self.block_size as usize) as u64;
        let io = OwnIo {
            op: Op::Write,
            slba: self.meta_lba + copy as u64 * per_block,
            blocks: per_block as u32,
            fua: true,
            tag: SUPERBLOCK_TAG,
            buf: Some(buf),
        };
        match ctx.issue_own(io) {
            Ok(()) => self.persisting = true,
            Err((_, io)) => self.bitmap_buffers.extend(io.buf),
        }
    }

    /// The superblock with this primary's epoch is durable: client IO is served.
    fn epoch_written(&mut self, result: Result<(), IoError>, buf: Option<DmaBuf>) {
        self.bitmap_buffers.extend(buf);
        self.persisting = false;
        match result {
            Ok(()) if !self.fenced => {
                self.serving = true;
                self.status.serving.store(true, Ordering::Relaxed);
                // Known here from now on: this node's replica service refuses a claim of
                // this epoch by another node.
                self.role.raise_epoch(self.epoch);
                tracing::info!(
                    volume = %self.volume,
                    epoch = self.epoch,
                    "replication: epoch {} taken by a majority; serving as the primary",
                    self.epoch
                );
            }
            Ok(()) => {}
            Err(error) => tracing::error!(
                volume = %self.volume,
                "replication: writing the superblock failed ({error}); not serving"
            ),
        }
    }

    /// A client write goes out: to the primary's own copy (a child IO) and to every replica.
    fn start_write(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, command: &IoCommand) {
        let lba = command.slba - self.first_lba;
        let (sequence, changed) =
            self.primary
                .begin_write(lba, command.blocks, command.flags.contains(IoFlags::FUA));
        self.status.sequence.store(sequence, Ordering::Relaxed);
        self.parents[slot as usize] = Parent::Write {
            sequence,
            lba,
            blocks: command.blocks,
            local_done: false,
            began: ctx.now(),
        };
        self.by_sequence.insert(sequence, slot);
        if ctx.issue(slot, *command).is_err() {
            if let Parent::Write { local_done, .. } = &mut self.parents[slot as usize] {
                *local_done = true;
            }
            if let Some(answer) = self.primary.local_done(sequence, false) {
                self.answer_writes(ctx, [answer]);
            }
        }
        // Its regions' dirty bits reach the device before it reaches any replica.
        let needs = if changed.is_empty() {
            0
        } else {
            self.bitmap_changed.extend(changed);
            if self.batch_in_flight > 0 || !self.batch.is_empty() {
                self.batches_started + 1
            } else {
                self.start_batch(ctx);
                self.batches_started
            }
        };
        if needs > self.batches_done || !self.waiting_sends.is_empty() {
            self.waiting_sends
                .push_back((slot, sequence, *command, needs));
        } else {
            self.send_write(ctx, slot, sequence, command);
        }
    }

    /// Writes the bitmap blocks changed since the last batch, with FUA, as one batch.
    fn start_batch(&mut self, ctx: &mut LayerCtx<'_>) {
        if self.batch_in_flight > 0 || !self.batch.is_empty() || self.bitmap_changed.is_empty() {
            return;
        }
        self.batches_started += 1;
        self.batch = std::mem::take(&mut self.bitmap_changed)
            .into_iter()
            .collect();
        self.issue_batch(ctx);
    }

    /// Issues what the batch has not issued yet (slots permitting).
    fn issue_batch(&mut self, ctx: &mut LayerCtx<'_>) {
        let per_block = (BLOCK_BYTES / self.block_size as usize) as u64;
        while let Some(&(replica, block)) = self.batch.last() {
            let mut buf = match self.bitmap_buffers.pop() {
                Some(buf) => buf,
                None => match self.pool.alloc(BLOCK_BYTES) {
                    Ok(buf) => buf,
                    Err(error) => {
                        tracing::warn!(volume = %self.volume, "replication: no DMA memory for a bitmap write ({error}); retrying");
                        return;
                    }
                },
            };
            buf.as_bytes_mut()
                .copy_from_slice(&self.primary.dirty_block(replica, block));
            let io = OwnIo {
                op: Op::Write,
                slba: self.bitmap_lbas[replica] + block as u64 * per_block,
                blocks: per_block as u32,
                fua: true,
                tag: BITMAP_TAG | (replica as u64) << 32 | block as u64,
                buf: Some(buf),
            };
            match ctx.issue_own(io) {
                Ok(()) => {
                    self.batch.pop();
                    self.batch_in_flight += 1;
                }
                Err((_, io)) => {
                    // No slot free now: the rest goes from poll.
                    self.bitmap_buffers.extend(io.buf);
                    return;
                }
            }
        }
    }

    /// A bitmap block of the batch is on the device (or failed: logged, the write goes on;
    /// a crash could then cost a resync of what the block did not mark).
    fn bitmap_written(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        result: Result<(), IoError>,
        buf: Option<DmaBuf>,
    ) {
        if let Err(error) = result {
            tracing::error!(volume = %self.volume, "replication: writing a dirty bitmap block failed: {error}");
        }
        self.bitmap_buffers.extend(buf);
        self.batch_in_flight -= 1;
        if self.batch_in_flight > 0 || !self.batch.is_empty() {
            return;
        }
        self.batches_done = self.batches_started;
        self.start_batch(ctx);
        self.send_waiting(ctx);
    }

    /// Sends the writes whose bitmap batch is done, in order.
    fn send_waiting(&mut self, ctx: &mut LayerCtx<'_>) {
        while let Some(&(slot, sequence, command, needs)) = self.waiting_sends.front() {
            if needs > self.batches_done {
                break;
            }
            self.waiting_sends.pop_front();
            if command.op == Op::Flush {
                // A flush that came after these writes goes after them (`sequence` is its
                // target), so that no replica's FlushAck misses a write still to come.
                self.send_flush(ctx, sequence);
                continue;
            }
            let still_held = matches!(
                self.parents[slot as usize],
                Parent::Write { sequence: held, .. } if held == sequence
            );
            if still_held {
                self.send_write(ctx, slot, sequence, &command);
            } else {
                // Answered (failed) while it waited: no replica gets it.
                for replica in 0..self.peers.len() {
                    self.primary.replica_done(replica, sequence, false);
                }
            }
        }
    }

    /// Starts the writes that waited for resync chunks, in order, up to the first that
    /// still overlaps one.
    fn release_blocked(&mut self, ctx: &mut LayerCtx<'_>) {
        while let Some(&(slot, command)) = self.blocked.front() {
            let lba = command.slba - self.first_lba;
            if self
                .peers
                .iter()
                .any(|peer| peer.copying_overlaps(lba, command.blocks))
            {
                break;
            }
            self.blocked.pop_front();
            if self.fenced {
                self.finish(ctx, slot, Err(IoError::NotPrimary { epoch: self.epoch }));
            } else {
                self.start_write(ctx, slot, &command);
            }
        }
    }

    /// Whether a write to these blocks is in flight to the primary's own copy.
    fn local_pending(&self, chunk: &Chunk) -> bool {
        self.parents.iter().any(|parent| match *parent {
            Parent::Write {
                lba,
                blocks,
                local_done: false,
                ..
            } => lba < chunk.lba + chunk.blocks as u64 && chunk.lba < lba + blocks as u64,
            _ => false,
        })
    }

    /// Moves replica `index`'s resync on: new chunks as the window, the buffers and the rate
    /// allow, and reads of the chunks whose writes in flight are done.
    fn resync(&mut self, ctx: &mut LayerCtx<'_>, index: usize, now: Instant) -> bool {
        let peer = &self.peers[index];
        if !matches!(peer.link, Link::Open { .. })
            || (self.primary.in_sync(index) && peer.copying.is_empty())
        {
            // Nothing to copy to it: no pace to ask for (the layer's loop calls this often).
            return false;
        }
        let mut work = false;
        let rate = self.pace.rate(now, !self.by_sequence.is_empty());
        self.status
            .resync_pace
            .store(rate as u64, Ordering::Relaxed);
        let (p99, _) = self.pace.last_window();
        self.status
            .resync_client_p99_us
            .store(p99, Ordering::Relaxed);
        let block_size = self.block_size as u64;
        let peer = &mut self.peers[index];
        if rate > 0.0 {
            let elapsed = now.duration_since(peer.filled).as_secs_f64();
            // At most a tenth of a second's worth at once.
            peer.tokens = (peer.tokens + elapsed * rate).min(rate / 10.0);
            peer.filled = now;
        }
        while !peer.buffers.is_empty() && (rate == 0.0 || peer.tokens > 0.0) {
            let Some(chunk) = peer.resync.next(&self.primary, index) else {
                break;
            };
            peer.tokens -= (chunk.blocks as u64 * block_size) as f64;
            peer.copying.push(Copying {
                chunk,
                reading: false,
                abandoned: false,
            });
            work = true;
        }
        for at in 0..self.peers[index].copying.len() {
            let copying = &self.peers[index].copying[at];
            if copying.reading || self.local_pending(&copying.chunk) {
                continue;
            }
            let chunk = copying.chunk;
            let peer = &mut self.peers[index];
            let Some(buf) = peer.buffers.pop() else {
                break;
            };
            let io = OwnIo {
                op: Op::Read,
                slba: self.first_lba + chunk.lba,
                blocks: chunk.blocks,
                fua: false,
                tag: RESYNC_TAG | (index as u64) << 48 | chunk.lba,
                buf: Some(buf),
            };
            match ctx.issue_own(io) {
                Ok(()) => peer.copying[at].reading = true,
                Err((_, io)) => {
                    // No slot free: again next time.
                    peer.buffers.extend(io.buf);
                    break;
                }
            }
            work = true;
        }
        work
    }

    /// A resync chunk was read from the primary's copy: it goes to its replica, and the
    /// writes that waited for it go out behind it.
    fn chunk_read(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        tag: u64,
        result: Result<(), IoError>,
        buf: Option<DmaBuf>,
    ) {
        let index = (tag >> 48) as usize;
        let lba = tag & ((1 << 48) - 1);
        let epoch = self.epoch;
        let Some(peer) = self.peers.get_mut(index) else {
            return;
        };
        let Some(at) = peer
            .copying
            .iter()
            .position(|copying| copying.reading && copying.chunk.lba == lba)
        else {
            return;
        };
        let copying = peer.copying.swap_remove(at);
        let chunk = copying.chunk;
        let mut lost = None;
        match (&result, buf.as_ref(), &mut peer.link) {
            (Ok(()), Some(data), Link::Open { stream }) if !copying.abandoned => {
                let request_id = self.next_request;
                let header = Header {
                    epoch,
                    lba: chunk.lba,
                    block_count: chunk.blocks,
                    request_id,
                    ..Header::new(Kind::Resync)
                };
                match stream.queue_frame(
                    &header,
                    &data.as_bytes()[..(chunk.blocks as u64 * self.block_size as u64) as usize],
                ) {
                    Ok(()) => {
                        self.next_request += 1;
                        peer.outstanding.insert(request_id, Sent::Resync(chunk));
                    }
                    Err(error) => lost = Some(error.to_string()),
                }
            }
            _ => {
                if let Err(error) = &result {
                    tracing::warn!(volume = %self.volume, replica = %peer.node, "replication: resync read failed: {error}");
                }
                if !copying.abandoned {
                    peer.resync.answered(chunk, false);
                }
            }
        }
        if let Some(buf) = buf {
            self.peers[index].buffers.push(buf);
        }
        if let Some(reason) = lost {
            self.lose(ctx, index, &reason);
        }
        self.release_blocked(ctx);
    }

    /// Replica `index` acknowledged a resync chunk (`ok`) or failed it.
    fn chunk_answered(&mut self, index: usize, chunk: Chunk, ok: bool) {
        let peer = &mut self.peers[index];
        if let Some((region, through)) = peer.resync.answered(chunk, ok) {
            let in_sync = self.primary.resynced(index, region, through);
            if in_sync {
                tracing::info!(
                    volume = %self.volume,
                    replica = %self.peers[index].node,
                    "replication: resync done; the replica is in sync"
                );
                // It is told, so that it may be promoted.
                let request_id = self.request_id();
                let header = Header {
                    epoch: self.epoch,
                    request_id,
                    status: status::OK,
                    ..Header::new(Kind::Epoch)
                };
                if let Link::Open { stream } = &mut self.peers[index].link {
                    let _ = stream.queue_frame(&header, &[]);
                }
            }
        }
        if ok {
            self.status.peers[index].resynced_bytes.fetch_add(
                chunk.blocks as u64 * self.block_size as u64,
                Ordering::Relaxed,
            );
        }
        self.publish_peer(index);
    }

    /// Another node holds a newer epoch: this one may no longer have writes acknowledged.
    fn fence(&mut self, replica: &str, epoch: u64, text: &str) {
        if !self.fenced {
            tracing::error!(
                volume = %self.volume,
                replica,
                "replication: replica {replica} is at epoch {epoch}, newer than this primary's {}: another node took the volume over; every write fails here from now on ({text})",
                self.epoch
            );
        }
        self.fenced = true;
        self.status.fenced.store(true, Ordering::Relaxed);
    }

    /// Takes client read `slot` as a hedged one when reads are hedged and a replica could
    /// answer it: the local copy reads it into a bounce buffer now, a replica is asked once
    /// it is late ([`ReplicationLayer::send_late_hedges`]). With [`MAX_LOCAL_HEDGED`] local
    /// reads out already, it goes to a replica alone: a slow device's queue stays bounded
    /// while reads answered elsewhere let the clients send more. False: it passes to the
    /// local copy alone.
    fn start_hedge(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, command: &IoCommand) -> bool {
        if self.status.hedge_after_ns.load(Ordering::Relaxed) == u64::MAX
            || self.hedges.len() >= MAX_HEDGED
        {
            return false;
        }
        let local = self.local_hedged < MAX_LOCAL_HEDGED;
        let lba = command.slba - self.first_lba;
        let answerable = match local {
            true => (0..self.peers.len()).any(|index| {
                matches!(self.peers[index].link, Link::Open { .. }) && self.primary.in_sync(index)
            }),
            false => self.replica_for(lba, command.blocks).is_some(),
        };
        if !answerable {
            return false;
        }
        let id = self.next_hedge;
        self.hedges.insert(
            id,
            Hedge {
                slot: Some(slot),
                slba: command.slba,
                blocks: command.blocks,
                began: ctx.now(),
                local_out: false,
                local_error: None,
                replica_out: false,
                replica_failed: false,
            },
        );
        if local && !self.issue_local(ctx, id) {
            self.hedges.remove(&id);
            return false;
        }
        self.next_hedge = (id + 1) & (HEDGE_TAG - 1);
        self.held += 1;
        if !local {
            self.ask_replica(ctx, id);
        }
        true
    }

    /// Issues hedged read `id`'s local half, into a bounce buffer; false if it could not go.
    fn issue_local(&mut self, ctx: &mut LayerCtx<'_>, id: u64) -> bool {
        let Some(hedge) = self.hedges.get_mut(&id) else {
            return false;
        };
        let bytes = hedge.blocks as usize * self.block_size as usize;
        let Ok(buf) = self.pool.alloc(bytes) else {
            return false;
        };
        let io = OwnIo {
            op: Op::Read,
            slba: hedge.slba,
            blocks: hedge.blocks,
            fua: false,
            tag: HEDGE_TAG | id,
            buf: Some(buf),
        };
        if ctx.issue_own(io).is_err() {
            return false;
        }
        hedge.local_out = true;
        self.local_hedged += 1;
        true
    }

    /// The in-sync, open replica with the least outstanding that holds every write to
    /// volume blocks `lba..lba + blocks` it was sent (none of them unanswered: an
    /// acknowledged write is on it, and one in flight may show or not, as on the local copy).
    fn replica_for(&self, lba: u64, blocks: u32) -> Option<usize> {
        let unanswered = |sent: &Sent| match *sent {
            Sent::Write {
                lba: at, blocks: n, ..
            } => overlaps(at, n, lba, blocks),
            Sent::Resync(chunk) => overlaps(chunk.lba, chunk.blocks, lba, blocks),
            _ => false,
        };
        (0..self.peers.len())
            .filter(|&index| {
                let peer = &self.peers[index];
                matches!(peer.link, Link::Open { .. })
                    && self.primary.in_sync(index)
                    && !peer.copying_overlaps(lba, blocks)
                    && !peer.outstanding.values().any(unanswered)
            })
            .min_by_key(|&index| self.peers[index].outstanding.len())
    }

    /// Asks a replica for the hedged reads the local copy has not answered in time (or
    /// failed); true if any went out.
    fn send_late_hedges(&mut self, ctx: &mut LayerCtx<'_>) -> bool {
        let after_ns = self.status.hedge_after_ns.load(Ordering::Relaxed);
        let after = match after_ns {
            u64::MAX => u64::MAX,
            ns => ctx.clock().duration_to_ticks(Duration::from_nanos(ns)),
        };
        let now = ctx.now();
        // A list kept for this, so that a poll allocates nothing.
        let mut late = std::mem::take(&mut self.late_hedges);
        late.extend(
            self.hedges
                .iter()
                .filter(|(_, hedge)| {
                    hedge.slot.is_some()
                        && !hedge.replica_out
                        && !hedge.replica_failed
                        && (hedge.local_error.is_some() || now.saturating_sub(hedge.began) >= after)
                })
                .map(|(&id, _)| id),
        );
        let mut sent = false;
        for &id in &late {
            sent |= self.ask_replica(ctx, id);
        }
        late.clear();
        self.late_hedges = late;
        sent
    }

    /// Sends hedged read `id` to a replica that can answer it ([`Self::replica_for`]); true
    /// if sent. With none such, the local copy's answer is the only one (its read is issued
    /// now if it was not).
    fn ask_replica(&mut self, ctx: &mut LayerCtx<'_>, id: u64) -> bool {
        let Some(hedge) = self.hedges.get(&id) else {
            return false;
        };
        let (lba, blocks) = (hedge.slba - self.first_lba, hedge.blocks);
        let target = self.replica_for(lba, blocks);
        let request_id = self.next_request;
        let header = Header {
            epoch: self.epoch,
            lba,
            block_count: blocks,
            request_id,
            ..Header::new(Kind::Read)
        };
        let queued = target.map(|index| match &mut self.peers[index].link {
            Link::Open { stream } => stream
                .queue_frame(&header, &[])
                .map_err(|error| (index, error.to_string())),
            _ => Err((index, "not open".into())),
        });
        match queued {
            Some(Ok(())) => {
                let index = target.expect("queued to it");
                self.next_request += 1;
                self.peers[index]
                    .outstanding
                    .insert(request_id, Sent::Read { hedge: id });
                if let Some(hedge) = self.hedges.get_mut(&id) {
                    hedge.replica_out = true;
                }
                self.status.hedges.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(Err((index, reason))) => {
                self.hedge_replica_done(ctx, id, false);
                self.lose(ctx, index, &reason);
                false
            }
            None => {
                // No replica can answer it: the local copy's answer is the only one.
                self.hedge_replica_done(ctx, id, false);
                false
            }
        }
    }

    /// Hedged read `id`'s local half came back, with its bounce buffer.
    fn hedge_local_done(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        id: u64,
        result: Result<(), IoError>,
        buf: Option<DmaBuf>,
    ) {
        let block_size = self.block_size;
        let Some(hedge) = self.hedges.get_mut(&id) else {
            return;
        };
        hedge.local_out = false;
        self.local_hedged -= 1;
        if let Some(slot) = hedge.slot {
            let filled = result.is_ok()
                && buf.as_ref().is_some_and(|buf| {
                    let bytes = hedge.blocks as usize * block_size as usize;
                    fill_read(
                        ctx,
                        slot,
                        &buf.as_bytes()[..bytes.min(buf.len())],
                        block_size,
                        hedge.blocks,
                    )
                });
            if filled {
                hedge.slot = None;
                self.finish(ctx, slot, Ok(()));
            } else {
                let error = result
                    .err()
                    .unwrap_or(IoError::MissingBuffer { op: Op::Read });
                hedge.local_error = Some(error.clone());
                if hedge.replica_failed {
                    hedge.slot = None;
                    self.finish(ctx, slot, Err(error));
                } else if !hedge.replica_out {
                    // Failed here before it was late: the replica is asked now.
                    self.ask_replica(ctx, id);
                }
            }
        }
        self.forget_hedge(id);
    }

    /// Hedged read `id`'s replica half answered (`ok`: its data is in the client's buffer),
    /// failed, or could not be asked.
    fn hedge_replica_done(&mut self, ctx: &mut LayerCtx<'_>, id: u64, ok: bool) {
        let Some(hedge) = self.hedges.get_mut(&id) else {
            return;
        };
        hedge.replica_out = false;
        if let Some(slot) = hedge.slot {
            if ok {
                hedge.slot = None;
                self.status.hedge_wins.fetch_add(1, Ordering::Relaxed);
                self.finish(ctx, slot, Ok(()));
            } else {
                hedge.replica_failed = true;
                if let Some(error) = hedge.local_error.clone() {
                    hedge.slot = None;
                    self.finish(ctx, slot, Err(error));
                } else if !hedge.local_out && !self.issue_local(ctx, id) {
                    // Sent to the replica alone, which failed it, and no slot to read it
                    // here now.
                    if let Some(hedge) = self.hedges.get_mut(&id) {
                        hedge.slot = None;
                    }
                    self.finish(ctx, slot, Err(IoError::Busy));
                }
            }
        }
        self.forget_hedge(id);
    }

    /// Drops hedged read `id` once it is answered and neither half is out.
    fn forget_hedge(&mut self, id: u64) {
        if self
            .hedges
            .get(&id)
            .is_some_and(|hedge| hedge.slot.is_none() && !hedge.local_out && !hedge.replica_out)
        {
            self.hedges.remove(&id);
        }
    }

    /// Sends write `sequence` (`command`, with `payload`) to every replica whose stream is
    /// open; a replica that cannot take it has it failed (its dirty bits stay).
    fn send_write(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        slot: u32,
        sequence: u64,
        command: &IoCommand,
    ) {
        let epoch = self.epoch;
        let kind = match command.op {
            Op::WriteZeroes => Kind::WriteZeroes,
            _ => Kind::Write,
        };
        let header = Header {
            epoch,
            sequence,
            lba: command.slba - self.first_lba,
            block_count: command.blocks,
            fua: command.flags.contains(IoFlags::FUA),
            // The replicas' spans of this write join its trace.
            trace: ctx.trace_context(slot),
            ..Header::new(kind)
        };
        let payload: &[u8] = match kind {
            Kind::Write => ctx.data(slot).unwrap_or(&[]),
            _ => &[],
        };
        let (now, op, lba, blocks) = (ctx.now(), command.op, header.lba, command.blocks);
        // Replicas that did not get it (not connected), and the first whose session broke:
        // kept in a mask, so a write allocates nothing here.
        let mut missing = 0u64;
        let mut broken = None;
        for (index, peer) in self.peers.iter_mut().enumerate() {
            let Link::Open { stream } = &mut peer.link else {
                missing |= 1 << index;
                continue;
            };
            let request_id = self.next_request;
            match stream.queue_frame(
                &Header {
                    request_id,
                    ..header
                },
                payload,
            ) {
                Ok(()) => {
                    self.next_request += 1;
                    peer.outstanding.insert(
                        request_id,
                        Sent::Write {
                            sequence,
                            op,
                            sent: now,
                            lba,
                            blocks,
                        },
                    );
                }
                Err(error) if broken.is_none() => broken = Some((index, error.to_string())),
                // A second broken session shows again at its next read or write.
                Err(_) => missing |= 1 << index,
            }
        }
        self.not_sent(ctx, sequence, missing, broken);
    }

    /// Write `sequence` did not reach the replicas in `missing` (they lack it, and it stays
    /// dirty for them) nor `broken`'s, whose session is gone.
    fn not_sent(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        sequence: u64,
        mut missing: u64,
        broken: Option<(usize, String)>,
    ) {
        while missing != 0 {
            let index = missing.trailing_zeros() as usize;
            missing &= missing - 1;
            if let Some(answer) = self.primary.replica_done(index, sequence, false) {
                self.answer_writes(ctx, [answer]);
            }
        }
        if let Some((index, reason)) = broken {
            self.lose(ctx, index, &reason);
        }
    }

    fn send_flush(&mut self, ctx: &mut LayerCtx<'_>, target: u64) {
        let epoch = self.epoch;
        let now = ctx.now();
        let mut failed = Vec::new();
        for (index, peer) in self.peers.iter_mut().enumerate() {
            let Link::Open { stream } = &mut peer.link else {
                failed.push((index, None));
                continue;
            };
            if !self.primary.in_sync(index) {
                failed.push((index, None));
                continue;
            }
            let request_id = self.next_request;
            let header = Header {
                epoch,
                sequence: target,
                request_id,
                ..Header::new(Kind::Flush)
            };
            match stream.queue_frame(&header, &[]) {
                Ok(()) => {
                    self.next_request += 1;
                    peer.outstanding
                        .insert(request_id, Sent::Flush { sent: now, target });
                }
                Err(error) => failed.push((index, Some(error.to_string()))),
            }
        }
        for (index, error) in failed {
            match error {
                None => {
                    let answers = self.primary.flush_done(Copy::Replica(index), 0, false);
                    self.answer_flushes(ctx, answers);
                }
                Some(reason) => self.lose(ctx, index, &reason),
            }
        }
    }
}

/// What a replica's frame said, taken out of the stream's buffer.
enum Received {
    /// The session opened; the bytes (a proof) go back.
    Opened(Vec<u8>),
    Frame(Header, Option<String>),
    /// A hedged read's answer, and whether its data is in the client's buffer now.
    Hedge(u64, bool),
}

/// Copies a read's `data` into the buffer of read `slot` (`blocks` of `block_size`); false
/// when it is not that long or the buffer is not the layer's to fill.
fn fill_read(ctx: &mut LayerCtx<'_>, slot: u32, data: &[u8], block_size: u32, blocks: u32) -> bool {
    let bytes = blocks as usize * block_size as usize;
    match ctx.read_buffer(slot) {
        Some(buf) if data.len() == bytes && buf.len() >= bytes => {
            buf[..bytes].copy_from_slice(data);
            true
        }
        _ => false,
    }
}

impl Layer for ReplicationLayer {
    fn layer(&self) -> LayerName {
        LayerName::Replication
    }

    fn kind(&self) -> &'static str {
        "replicate"
    }

    fn describe(&self) -> String {
        let open = self
            .status
            .peers
            .iter()
            .filter(|peer| peer.state() == PeerState::Open)
            .count();
        let state = match (self.fenced, self.serving) {
            (true, _) => "fenced primary",
            (false, true) => "primary",
            (false, false) => "primary taking its epoch",
        };
        format!(
            "replicate: {state} at epoch {}, {open} of {} replicas connected",
            self.epoch,
            self.peers.len()
        )
    }

    fn submit(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, command: &IoCommand) -> Down {
        if (self.status.draining() || !self.lease_ok || (command.op != Op::Read && self.warming()))
            && (command.op != Op::Read || ctx.from_frontend())
        {
            // A reparent: held for the next primary (or for this one if it fails). Reads
            // from inside the node (a promoting node copying a region) go on.
            self.paused.push_back((slot, *command, ctx.from_frontend()));
            return Down::Hold;
        }
        if !self.fenced && (self.role.epoch() > self.epoch || !self.role.primary_here()) {
            let epoch = self.role.epoch();
            self.fence(
                "this node's replica service",
                epoch,
                "it took a newer primary's claim",
            );
        }
        if self.fenced {
            return Down::Complete(Err(IoError::NotPrimary { epoch: self.epoch }));
        }
        if !self.serving {
            // Not yet a primary a majority follows: nothing is served from this copy.
            return Down::Complete(Err(IoError::NoQuorum { op: command.op }));
        }
        match command.op {
            Op::Read => match self.start_hedge(ctx, slot, command) {
                true => Down::Hold,
                false => Down::Pass,
            },
            Op::Write | Op::WriteZeroes => {
                self.held += 1;
                let lba = command.slba - self.first_lba;
                if !self.blocked.is_empty()
                    || self
                        .peers
                        .iter()
                        .any(|peer| peer.copying_overlaps(lba, command.blocks))
                {
                    // A resync chunk it overlaps is being copied: after its frame (and after
                    // the writes that wait already).
                    self.blocked.push_back((slot, *command));
                } else {
                    self.start_write(ctx, slot, command);
                }
                Down::Hold
            }
            Op::Flush => {
                let (id, target) = self.primary.begin_flush();
                self.parents[slot as usize] = Parent::Flush { id, target };
                self.by_flush.insert(id, slot);
                self.held += 1;
                if ctx.issue(slot, *command).is_err() {
                    let answers = self.primary.flush_done(Copy::Local, target, false);
                    self.answer_flushes(ctx, answers);
                }
                if self.waiting_sends.is_empty() {
                    self.send_flush(ctx, target);
                } else {
                    // Writes before it wait for their dirty bits: it goes to the replicas
                    // after them.
                    self.waiting_sends.push_back((slot, target, *command, 0));
                }
                Down::Hold
            }
        }
    }

    fn complete(
        &mut self,
        _ctx: &mut LayerCtx<'_>,
        _slot: u32,
        _result: &mut Result<(), IoError>,
    ) -> Up {
        // Reads, served by the local copy.
        Up::Pass
    }

    fn child_done(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        parent: u32,
        _child: u32,
        result: Result<(), IoError>,
    ) {
        let ok = result.is_ok();
        if !ok {
            tracing::warn!(volume = %self.volume, "replication: the local copy failed: {result:?}");
        }
        match self.parents.get(parent as usize).copied() {
            Some(Parent::Write { sequence, .. }) => {
                if let Parent::Write { local_done, .. } = &mut self.parents[parent as usize] {
                    *local_done = true;
                }
                if let Some(answer) = self.primary.local_done(sequence, ok) {
                    self.answer_writes(ctx, [answer]);
                }
            }
            Some(Parent::Flush { target, .. }) => {
                // The local flush covers what was acknowledged when it was issued.
                let answers = self.primary.flush_done(Copy::Local, target, ok);
                self.answer_flushes(ctx, answers);
            }
            _ => {}
        }
    }

    fn holding(&self) -> usize {
        // Frames a replica has not answered, and resync chunks, keep the reactor polling.
        self.held
            + self.paused.len()
            + self.batch_in_flight
            + self.hedges.len()
            + self
                .peers
                .iter()
                .map(|peer| peer.outstanding.len() + peer.copying.len())
                .sum::<usize>()
    }

    fn own_done(
        &mut self,
        ctx: &mut LayerCtx<'_>,
        tag: u64,
        result: Result<(), IoError>,
        buf: Option<DmaBuf>,
    ) {
        if tag == SUPERBLOCK_TAG {
            self.epoch_written(result, buf);
        } else if tag & HEDGE_TAG != 0 && tag & (BITMAP_TAG | RESYNC_TAG) == 0 {
            self.hedge_local_done(ctx, tag & !HEDGE_TAG, result, buf);
        } else if tag & BITMAP_TAG != 0 {
            self.bitmap_written(ctx, result, buf);
        } else {
            self.chunk_read(ctx, tag & !RESYNC_TAG, result, buf);
        }
    }

    fn polled(&self) -> bool {
        true
    }

    fn poll(&mut self, ctx: &mut LayerCtx<'_>) -> bool {
        let mut work = false;
        if let Ok(events) = self.epoll.wait(0) {
            for event in events {
                work = true;
                if let Some(stream) = self
                    .peers
                    .get_mut(event.token as usize)
                    .and_then(Peer::stream)
                {
                    stream.set_readable();
                }
            }
        }
        let now = Instant::now();
        let lease_ok = self.role.lease_valid(now);
        if lease_ok != self.lease_ok {
            self.lease_ok = lease_ok;
            work = true;
            match lease_ok {
                false => {
                    tracing::warn!(volume = %self.volume, epoch = self.epoch, "replication: the control-plane lease ran out: IO is held, not acknowledged, until it is renewed or another node takes over")
                }
                true => {
                    tracing::warn!(volume = %self.volume, epoch = self.epoch, held = self.unacknowledged.len() + self.paused.len(), "replication: the lease is renewed: held IO goes on")
                }
            }
            if lease_ok {
                while let Some((slot, result)) = self.unacknowledged.pop_front() {
                    self.finish(ctx, slot, result);
                }
            }
        }
        for index in 0..self.peers.len() {
            if matches!(self.peers[index].link, Link::Down) {
                match self.dial(index, now) {
                    Ok(did) => work |= did,
                    Err(reason) => {
                        tracing::warn!(volume = %self.volume, replica = %self.peers[index].node, "replication: {reason}")
                    }
                }
                continue;
            }
            match self.serve_peer(ctx, index, now) {
                Ok(did) => work |= did,
                Err(reason) => {
                    self.lose(ctx, index, &reason);
                    work = true;
                    continue;
                }
            }
            work |= self.resync(ctx, index, now);
        }
        if (0..self.peers.len()).all(|index| self.primary.in_sync(index)) && self.pace.idle() {
            // Shown while no resync runs: the rate the next one starts at.
            self.status
                .resync_pace
                .store(self.pace.rate_in_force() as u64, Ordering::Relaxed);
        }
        if !self.batch.is_empty() {
            self.issue_batch(ctx);
        }
        if !self.hedges.is_empty() {
            work |= self.send_late_hedges(ctx);
        }
        self.establish(ctx);
        if self.status.draining() {
            self.status
                .in_flight
                .store(self.held as u64, Ordering::Release);
        } else if self.warm_until.is_some() && !self.warming() {
            // Warmed up: from now on no clock read per write for it.
            self.warm_until = None;
        }
        if !self.status.draining() && self.lease_ok && !self.paused.is_empty() && !self.warming() {
            // The reparent was called off, or the lease renewed: what was paused goes on
            // here, in order.
            work = true;
            while let Some((slot, command, _)) = self.paused.pop_front() {
                match self.submit(ctx, slot, &command) {
                    Down::Hold => {}
                    Down::Pass => ctx.release(slot),
                    Down::Complete(result) => ctx.complete(slot, result),
                }
            }
        }
        if now.duration_since(self.published) >= PUBLISH_EVERY {
            self.published = now;
            for index in 0..self.peers.len() {
                self.publish_peer(index);
            }
        }
        work
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.as_fd())
    }

    fn drain(&mut self, ctx: &mut LayerCtx<'_>) {
        // Replaced: this node is a replica now. What was paused (a reparent) or waits for a
        // resync chunk went nowhere yet: it goes down the new stack, whose forwarder sends it
        // to the new primary. Writes and flushes in flight here may be on some copies and not
        // on a majority: they fail (a deposed primary acknowledges nothing more).
        // IO from inside the node that was paused (another node forwarded it) is not run: it
        // fails NotPrimary, and its forwarder sends it to the new primary, or ran it there.
        for (slot, _, frontend) in self.paused.drain(..) {
            match frontend {
                true => ctx.release(slot),
                false => ctx.complete(slot, Err(IoError::NotPrimary { epoch: self.epoch })),
            }
        }
        for (slot, _) in self.blocked.drain(..) {
            ctx.release(slot);
        }
        self.lease_ok = true;
        while let Some((slot, _)) = self.unacknowledged.pop_front() {
            self.finish(ctx, slot, Err(IoError::NotPrimary { epoch: self.epoch }));
        }
        let writes: Vec<u32> = self.by_sequence.drain().map(|(_, slot)| slot).collect();
        for slot in writes {
            self.finish(ctx, slot, Err(IoError::NotPrimary { epoch: self.epoch }));
        }
        let flushes: Vec<u32> = self.by_flush.drain().map(|(_, slot)| slot).collect();
        for slot in flushes {
            self.finish(ctx, slot, Err(IoError::NotPrimary { epoch: self.epoch }));
        }
        // Hedged reads not answered yet (a drain waits for them; a role change may not).
        let reads: Vec<u32> = self
            .hedges
            .values_mut()
            .filter_map(|hedge| hedge.slot.take())
            .collect();
        for slot in reads {
            self.finish(ctx, slot, Err(IoError::NotPrimary { epoch: self.epoch }));
        }
    }

    fn persistent(&self) -> bool {
        true
    }
}
