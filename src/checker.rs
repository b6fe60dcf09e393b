//! Crash checking: a client that remembers every write it was acknowledged, and a model of
//! what each block of a volume may legally hold after a crash.
//!
//! - [`Model`] is pure (no IO): it is fed the client's history (writes issued, acknowledged,
//!   failed; flushes issued and acknowledged; connection losses; crashes) and answers, for a
//!   block read back, whether the data is legal ([`Model::check_read`]), and if not, a
//!   [`Violation`] that names the block, what was read and what was allowed.
//! - Every write's data is stamped ([`stamp_block`]): each 4 KiB block carries a header (a
//!   magic, the run's tag, the write id, the block index, a checksum of the block) and filler
//!   generated from those, so a block read back says which write put it there
//!   ([`identify`]): zeros (never written), a write, another block's data, or garbage.
//! - [`Client`] drives a running node over NBD with random writes (1 to 8 blocks, up to 8 in
//!   flight, some with FUA, a flush every few dozen writes), records everything in its model,
//!   survives the connection dying under it (the node was killed), reconnects to the URI it is
//!   given (a restarted node listens elsewhere), and reads every block back with
//!   [`Client::verify_all`]. [`Client::sync`] flushes, so everything acknowledged is durable.
//!
//! The model's rules, per block:
//! - Without a crash, a read returns exactly the last acknowledged write (or zeros if none),
//!   or, while a write to the block is in flight, that write.
//! - A write is durable once it was acknowledged with FUA, or once a FLUSH issued after its
//!   acknowledgement was itself acknowledged.
//! - After a crash a block may hold its newest durable write (zeros only if it has none) or
//!   any write to it issued after that one, acknowledged or not; never an older write the
//!   durable one overwrote, never data nobody wrote. A write of several blocks may be torn
//!   across its blocks (each block is judged on its own), but a block is atomic.
//! - A write in flight when the connection was lost has an unknown outcome: it may or may not
//!   have landed, on each of its blocks, and a failed write (an error reply) likewise.
//! - The first read after a crash (or a connection loss) settles a block: until the next write
//!   or crash the node must go on returning what that read returned.
//!
//! A connection loss is taken to end its requests: none may land later, after writes sent on a
//! new connection. That holds when the node died with the connection (the crash tests kill
//! it), not when only the connection broke and the node still holds requests of it.
//!
//! The model needs at most one write in flight per block ([`Model::issue`] asserts it): NBD
//! orders no concurrent requests, so two overlapping writes in flight at once have no defined
//! result. [`Client`] holds back a write that would overlap one in flight.
//!
//! The client speaks NBD through fathom-bench's [`crate::nbd_client`]: its handshake, and a
//! [`Pipeline`] of up to 8 requests that sends writes with `NBD_CMD_FLAG_FUA` and
//! `NBD_CMD_FLUSH` ([`Pipeline::submit_with`]). The pipeline's slot of a request is its cookie;
//! the client keeps, per slot, what the request is to the model.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::ops::Range;
use std::time::{Duration, Instant};

use fathom_frontend::nbd::proto::{cmd_flag, transmission_flag, Command};

use crate::nbd_client::{Completion, Connection, NbdClientError, NbdUri, Pipeline};

/// The checker's block: every write covers whole blocks, each stamped on its own.
pub const BLOCK_BYTES: usize = 4096;
/// The unit in which a garbage block is compared with what was allowed, to show a tear.
pub const SECTOR_BYTES: usize = 512;
/// The most requests the client keeps in flight.
pub const MAX_QUEUE_DEPTH: usize = 8;
/// The most blocks one write covers.
pub const MAX_WRITE_BLOCKS: u64 = 8;

/// The first bytes of every stamped block.
const STAMP_MAGIC: [u8; 8] = *b"FTHMCRSH";
/// Where the header's fields sit (little-endian `u64`s after the magic).
const RUN_AT: usize = 8;
const WRITE_AT: usize = 16;
const BLOCK_AT: usize = 24;
const CHECKSUM_AT: usize = 32;
const HEADER_BYTES: usize = 40;
/// A bound on the violations a verify pass keeps (all are counted).
const MAX_VIOLATIONS_KEPT: usize = 16;
/// Blocks per read of a verify pass.
const VERIFY_READ_BLOCKS: u64 = 16;
/// The longest one wait for a reply sleeps before the pipeline looks at its stall timeout
/// (the reply timeout) again.
const REPLY_WAIT_SLICE: Duration = Duration::from_millis(100);
/// The pause between connection attempts while reconnecting.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

/// One write of the history: unique within a [`Model`], stamped into the write's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriteId(pub u64);

impl fmt::Display for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "write #{}", self.0)
    }
}

/// One flush of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlushId(pub u64);

// ---------------------------------------------------------------------------------------------
// Stamped data.

/// The splitmix64 finaliser: a cheap, well-mixed function of 64 bits.
#[inline]
fn mix(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

fn le_u64(data: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&data[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// The checksum of a stamped block: every 8-byte word but the checksum's own, mixed in order.
fn checksum(data: &[u8]) -> u64 {
    let mut sum = 0x6a09_e667_f3bc_c908u64;
    for (index, word) in data.chunks_exact(8).enumerate() {
        if index * 8 != CHECKSUM_AT {
            sum = mix(sum ^ u64::from_le_bytes(word.try_into().expect("8 bytes")));
        }
    }
    sum
}

/// Fills `out` (one block) with what write `id` of run `run` puts at `block`: the header, then
/// filler generated from the three, then the checksum of it all.
pub fn stamp_block(run: u64, id: WriteId, block: u64, out: &mut [u8]) {
    assert_eq!(
        out.len(),
        BLOCK_BYTES,
        "a stamped block is {BLOCK_BYTES} bytes"
    );
    let mut state = mix(mix(run ^ mix(id.0)) ^ block);
    for word in out[HEADER_BYTES..].chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        word.copy_from_slice(&mix(state).to_le_bytes());
    }
    out[..RUN_AT].copy_from_slice(&STAMP_MAGIC);
    out[RUN_AT..WRITE_AT].copy_from_slice(&run.to_le_bytes());
    out[WRITE_AT..BLOCK_AT].copy_from_slice(&id.0.to_le_bytes());
    out[BLOCK_AT..CHECKSUM_AT].copy_from_slice(&block.to_le_bytes());
    let sum = checksum(out);
    out[CHECKSUM_AT..HEADER_BYTES].copy_from_slice(&sum.to_le_bytes());
}

/// What a block holds, as the model speaks of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Content {
    Zeros,
    Write(WriteId),
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Zeros => f.write_str("zeros"),
            Content::Write(id) => id.fmt(f),
        }
    }
}

/// What a block read back turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Every byte zero: nothing was ever written there (or it was lost).
    Zeros,
    /// Exactly what this write put in this block.
    Write(WriteId),
    /// Exactly what a write put in another block.
    Misdirected { id: WriteId, block: u64 },
    /// Neither zeros nor any write's block, byte for byte.
    Garbage(Box<Garbage>),
}

/// The evidence about a block that is no write's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    /// The write and block its header names, when the header is this run's.
    pub header: Option<(WriteId, u64)>,
    /// Whether the checksum in the header matches the block.
    pub checksum_matches: bool,
    /// Per 512-byte sector, the allowed content it matches, if any (filled in by
    /// [`Model::check_read`]; it tells a block torn between two writes from plain garbage).
    pub sectors: Vec<Option<Content>>,
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observed::Zeros => f.write_str("zeros"),
            Observed::Write(id) => id.fmt(f),
            Observed::Misdirected { id, block } => {
                write!(f, "{id}'s data for block {block} (a misdirected write)")
            }
            Observed::Garbage(garbage) => {
                f.write_str("garbage (")?;
                match garbage.header {
                    Some((id, block)) => write!(f, "its header names {id} at block {block}")?,
                    None => f.write_str("no header of this run")?,
                }
                if !garbage.checksum_matches {
                    f.write_str(", checksum mismatch")?;
                }
                if !garbage.sectors.is_empty() {
                    f.write_str("; by 512-byte sector:")?;
                    let mut start = 0;
                    while start < garbage.sectors.len() {
                        let what = garbage.sectors[start];
                        let mut end = start + 1;
                        while end < garbage.sectors.len() && garbage.sectors[end] == what {
                            end += 1;
                        }
                        let sectors = if end - start == 1 {
                            format!("{start}")
                        } else {
                            format!("{start}-{}", end - 1)
                        };
                        let separator = if start == 0 { " " } else { ", " };
                        match what {
                            Some(content) => write!(f, "{separator}{sectors}: {content}")?,
                            None => write!(f, "{separator}{sectors}: nothing allowed")?,
                        }
                        start = end;
                    }
                }
                f.write_str(")")
            }
        }
    }
}

/// Says what a block read back at `block` holds, under run tag `run`.
pub fn identify(run: u64, block: u64, data: &[u8]) -> Observed {
    assert_eq!(data.len(), BLOCK_BYTES, "a block is {BLOCK_BYTES} bytes");
    if data.iter().all(|&byte| byte == 0) {
        return Observed::Zeros;
    }
    let header = (data[..RUN_AT] == STAMP_MAGIC && le_u64(data, RUN_AT) == run)
        .then(|| (WriteId(le_u64(data, WRITE_AT)), le_u64(data, BLOCK_AT)));
    if let Some((id, written_at)) = header {
        let mut expected = [0u8; BLOCK_BYTES];
        stamp_block(run, id, written_at, &mut expected);
        if expected[..] == data[..] {
            return if written_at == block {
                Observed::Write(id)
            } else {
                Observed::Misdirected {
                    id,
                    block: written_at,
                }
            };
        }
    }
    Observed::Garbage(Box::new(Garbage {
        header,
        checksum_matches: checksum(data) == le_u64(data, CHECKSUM_AT),
        sectors: Vec::new(),
    }))
}

// ---------------------------------------------------------------------------------------------
// The model.

/// Where a write is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteState {
    InFlight,
    /// Acknowledged, not (yet) durable.
    Acked,
    /// Acknowledged with FUA, or covered by an acknowledged flush.
    Durable,
    /// Answered with an error: it may have landed on any of its blocks, or not.
    Failed,
    /// In flight when the connection was lost: it may have landed on any of its blocks, or not.
    Unknown,
}

impl fmt::Display for WriteState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteState::InFlight => "in flight",
            WriteState::Acked => "acknowledged, not durable",
            WriteState::Durable => "durable",
            WriteState::Failed => "failed with an error reply",
            WriteState::Unknown => "outcome unknown: in flight when the connection was lost",
        })
    }
}

struct WriteInfo {
    blocks: Range<u64>,
    fua: bool,
    state: WriteState,
    /// The blocks whose `durable` or `since` name this write; at 0 (and no longer in flight)
    /// the write is forgotten, so the model's size follows the live history, not its length.
    refs: u32,
}

/// What a read of a block may return now, besides a write in flight to it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Current {
    Exactly(Content),
    /// After a connection loss or a failed write: any of these.
    OneOf(Vec<Content>),
    /// After a crash, until a read or an acknowledged write settles it: the newest durable
    /// write (zeros if none) or any write issued after it.
    AfterCrash,
}

#[derive(Debug, Clone)]
struct BlockState {
    /// The newest durable write; `None`: zeros are durable.
    durable: Option<WriteId>,
    /// Every write to the block issued after `durable`, in issue order.
    since: Vec<WriteId>,
    in_flight: Option<WriteId>,
    current: Current,
}

/// What the first reads after crashes found, against each block's last acknowledged write
/// (with page-cache-backed media all of them should be at it, or at a write that was in flight).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfterCrashReads {
    /// The block's last acknowledged write, and no write was in flight on it at the crash.
    pub at_last_acked: u64,
    /// A write whose outcome was unknown had landed.
    pub unacked_landed: u64,
    /// The last acknowledged write, though a later write with unknown outcome existed.
    pub unacked_absent: u64,
    /// An older write than the last acknowledged one (legal only since that one was not
    /// durable): an acknowledged write was lost in the crash.
    pub rolled_back: u64,
}

/// Counts of the history and of the reads checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelStats {
    pub writes_issued: u64,
    pub writes_acked: u64,
    pub fua_writes_acked: u64,
    pub writes_failed: u64,
    pub writes_unknown: u64,
    pub block_writes_acked: u64,
    pub flushes_issued: u64,
    pub flushes_acked: u64,
    pub flushes_failed: u64,
    pub connection_losses: u64,
    pub crashes: u64,
    pub blocks_checked: u64,
    pub violations: u64,
    pub after_crash: AfterCrashReads,
}

/// One content a read was allowed to return, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub content: Content,
    /// The write's state (`None` for zeros, or for a write the model has since forgotten).
    pub state: Option<WriteState>,
    /// Whether this is the block's newest durable write (or durable zeros).
    pub newest_durable: bool,
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.content.fmt(f)?;
        match (self.state, self.newest_durable) {
            (_, true) if self.content == Content::Zeros => f.write_str(" (never durably written)"),
            (_, true) => f.write_str(" (the newest durable write)"),
            (Some(state), false) => write!(f, " ({state})"),
            (None, false) if self.content == Content::Zeros => f.write_str(" (never written)"),
            (None, false) => Ok(()),
        }
    }
}

/// A read that returned what the model forbids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub block: u64,
    pub observed: Observed,
    /// What the observed write is to the model, when it is one: its state, or "older,
    /// overwritten" for one it has forgotten.
    pub observed_is: Option<String>,
    pub allowed: Vec<Allowed>,
    /// Whether the block was unsettled by a crash (else the read had to be exact).
    pub after_crash: bool,
    pub crashes: u64,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "block {} (byte offset {}) read {}",
            self.block,
            self.block * BLOCK_BYTES as u64,
            self.observed
        )?;
        if let Some(what) = &self.observed_is {
            write!(f, ", {what}")?;
        }
        if self.after_crash {
            write!(f, "; after crash {} it may hold only ", self.crashes)?;
        } else {
            f.write_str("; with no crash since, it must hold ")?;
        }
        for (index, allowed) in self.allowed.iter().enumerate() {
            if index > 0 {
                f.write_str(if index + 1 == self.allowed.len() {
                    " or "
                } else {
                    ", "
                })?;
            }
            allowed.fmt(f)?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// The legal contents of every block of a volume, given the history of writes, flushes,
/// connection losses and crashes (see the module documentation for the rules).
pub struct Model {
    run: u64,
    blocks: Vec<BlockState>,
    writes: HashMap<WriteId, WriteInfo>,
    next_write: u64,
    next_flush: u64,
    /// Acknowledgements of non-FUA writes so far: a flush covers those counted when it was
    /// issued.
    acks: u64,
    /// Acknowledged writes not yet durable, in acknowledgement order, with their count.
    pending_durable: VecDeque<(u64, WriteId)>,
    /// Flushes in flight, with the acknowledgement count at their issue.
    flushes: HashMap<FlushId, u64>,
    in_flight: usize,
    stats: ModelStats,
}

impl Model {
    /// A model of a volume of `blocks` blocks, all zeros, whose writes carry run tag 0.
    pub fn new(blocks: u64) -> Model {
        Model::with_run(blocks, 0)
    }

    /// As [`Model::new`], with the run tag stamped into every write (so data a previous run
    /// left behind is not taken for this run's).
    pub fn with_run(blocks: u64, run: u64) -> Model {
        let block = BlockState {
            durable: None,
            since: Vec::new(),
            in_flight: None,
            current: Current::Exactly(Content::Zeros),
        };
        Model {
            run,
            blocks: vec![block; blocks as usize],
            writes: HashMap::new(),
            next_write: 1,
            next_flush: 1,
            acks: 0,
            pending_durable: VecDeque::new(),
            flushes: HashMap::new(),
            in_flight: 0,
            stats: ModelStats::default(),
        }
    }

    pub fn run(&self) -> u64 {
        self.run
    }

    pub fn blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    pub fn stats(&self) -> &ModelStats {
        &self.stats
    }

    /// Writes and flushes in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Writes the model still remembers (in flight, or the newest durable write of a block,
    /// or issued after it).
    pub fn live_writes(&self) -> usize {
        self.writes.len()
    }

    /// Whether any block of `blocks` has a write in flight.
    pub fn write_in_flight(&self, blocks: Range<u64>) -> bool {
        self.blocks[blocks.start as usize..blocks.end as usize]
            .iter()
            .any(|block| block.in_flight.is_some())
    }

    /// Blocks that have been written to (that may hold something other than zeros).
    pub fn written_blocks(&self) -> u64 {
        self.blocks
            .iter()
            .filter(|block| block.durable.is_some() || !block.since.is_empty())
            .count() as u64
    }

    /// A write of `blocks` is sent, with FUA when `fua`: its id, to stamp into its data.
    pub fn issue(&mut self, blocks: Range<u64>, fua: bool) -> WriteId {
        assert!(
            blocks.start < blocks.end && blocks.end <= self.blocks(),
            "a write of blocks {blocks:?} on a volume of {} blocks",
            self.blocks()
        );
        let id = WriteId(self.next_write);
        self.next_write += 1;
        for block in &mut self.blocks[blocks.start as usize..blocks.end as usize] {
            assert!(
                block.in_flight.is_none(),
                "{id} overlaps {} in flight: the model needs at most one write in flight per \
                 block (NBD orders no concurrent requests)",
                block.in_flight.expect("checked")
            );
            block.since.push(id);
            block.in_flight = Some(id);
        }
        self.writes.insert(
            id,
            WriteInfo {
                refs: (blocks.end - blocks.start) as u32,
                blocks,
                fua,
                state: WriteState::InFlight,
            },
        );
        self.in_flight += 1;
        self.stats.writes_issued += 1;
        id
    }

    /// The reply to write `id` said success.
    pub fn acked(&mut self, id: WriteId) {
        let info = self.in_flight_write(id);
        let (blocks, fua) = (info.blocks.clone(), info.fua);
        info.state = WriteState::Acked;
        self.in_flight -= 1;
        self.stats.writes_acked += 1;
        self.stats.block_writes_acked += blocks.end - blocks.start;
        for block in &mut self.blocks[blocks.start as usize..blocks.end as usize] {
            block.in_flight = None;
            block.current = Current::Exactly(Content::Write(id));
        }
        if fua {
            self.stats.fua_writes_acked += 1;
            self.make_durable(id);
        } else {
            self.acks += 1;
            self.pending_durable.push_back((self.acks, id));
        }
    }

    /// The reply to write `id` was an error: it may have landed on any of its blocks, or not.
    pub fn failed(&mut self, id: WriteId) {
        let info = self.in_flight_write(id);
        info.state = WriteState::Failed;
        let blocks = info.blocks.clone();
        self.in_flight -= 1;
        self.stats.writes_failed += 1;
        self.unsettle(id, blocks);
    }

    /// A flush is sent: its id.
    pub fn flush_issued(&mut self) -> FlushId {
        let id = FlushId(self.next_flush);
        self.next_flush += 1;
        self.flushes.insert(id, self.acks);
        self.in_flight += 1;
        self.stats.flushes_issued += 1;
        id
    }

    /// The reply to flush `id` said success: every write acknowledged before it was issued is
    /// durable.
    pub fn flush_acked(&mut self, id: FlushId) {
        let covered = self
            .flushes
            .remove(&id)
            .unwrap_or_else(|| panic!("flush #{} is not in flight", id.0));
        self.in_flight -= 1;
        self.stats.flushes_acked += 1;
        while let Some(&(ack, write)) = self.pending_durable.front() {
            if ack > covered {
                break;
            }
            self.pending_durable.pop_front();
            self.make_durable(write);
        }
    }

    /// The reply to flush `id` was an error: it made nothing durable.
    pub fn flush_failed(&mut self, id: FlushId) {
        self.flushes
            .remove(&id)
            .unwrap_or_else(|| panic!("flush #{} is not in flight", id.0));
        self.in_flight -= 1;
        self.stats.flushes_failed += 1;
    }

    /// The connection died with requests in flight: each write of them may have landed on any
    /// of its blocks, or not; the flushes made nothing durable that the model can count on.
    ///
    /// This assumes those requests cannot land *later*, after writes sent on a new connection:
    /// true when the node died with the connection, not when only the connection did and the
    /// node still holds the requests.
    pub fn connection_lost(&mut self) {
        let mut lost: Vec<WriteId> = self
            .writes
            .iter()
            .filter(|(_, info)| info.state == WriteState::InFlight)
            .map(|(&id, _)| id)
            .collect();
        lost.sort();
        for id in lost {
            let info = self.writes.get_mut(&id).expect("listed above");
            info.state = WriteState::Unknown;
            let blocks = info.blocks.clone();
            self.stats.writes_unknown += 1;
            self.unsettle(id, blocks);
        }
        self.flushes.clear();
        self.in_flight = 0;
        self.stats.connection_losses += 1;
    }

    /// The node crashed (was killed): whatever was not durable may be lost. Also a connection
    /// loss, if [`Model::connection_lost`] was not called for it.
    pub fn crashed(&mut self) {
        if self.in_flight > 0 {
            self.connection_lost();
        }
        // Writes acknowledged before the crash and not yet durable never will be: a flush on
        // the restarted node covers what it holds, and whether it still holds them is unknown.
        self.pending_durable.clear();
        for block in &mut self.blocks {
            block.current = Current::AfterCrash;
        }
        self.stats.crashes += 1;
    }

    /// Checks that `data`, read from `block` with no write to it in flight or with the one in
    /// flight being a legal answer too, is what the model allows. A read that passes settles
    /// the block: until its next write or a crash, the node must go on returning the same.
    pub fn check_read(&mut self, block: u64, data: &[u8]) -> Result<(), Violation> {
        let mut observed = identify(self.run, block, data);
        let legal = self.legal(block);
        self.stats.blocks_checked += 1;
        let content = match observed {
            Observed::Zeros => Some(Content::Zeros),
            Observed::Write(id) => Some(Content::Write(id)),
            _ => None,
        };
        if let Some(content) = content.filter(|content| legal.contains(content)) {
            self.settle(block, content);
            return Ok(());
        }
        self.stats.violations += 1;
        if let Observed::Garbage(garbage) = &mut observed {
            garbage.sectors = self.match_sectors(block, data, &legal);
        }
        let state = &self.blocks[block as usize];
        let observed_is = match observed {
            Observed::Write(id) | Observed::Misdirected { id, .. } => {
                Some(match self.writes.get(&id) {
                    Some(info) => format!("which is {}", info.state),
                    None if id.0 < self.next_write => {
                        "an older write, overwritten by a durable one".to_string()
                    }
                    None => "a write id never issued".to_string(),
                })
            }
            _ => None,
        };
        Err(Violation {
            block,
            observed,
            observed_is,
            allowed: legal
                .iter()
                .map(|&content| Allowed {
                    content,
                    state: match content {
                        Content::Zeros => None,
                        Content::Write(id) => self.writes.get(&id).map(|info| info.state),
                    },
                    newest_durable: state.current == Current::AfterCrash
                        && match content {
                            Content::Zeros => state.durable.is_none(),
                            Content::Write(id) => state.durable == Some(id),
                        },
                })
                .collect(),
            after_crash: state.current == Current::AfterCrash,
            crashes: self.stats.crashes,
        })
    }

    /// What a read of `block` may return now, oldest first.
    fn legal(&self, block: u64) -> Vec<Content> {
        let state = &self.blocks[block as usize];
        let mut legal = match &state.current {
            Current::Exactly(content) => vec![*content],
            Current::OneOf(contents) => contents.clone(),
            Current::AfterCrash => {
                let mut legal = vec![state.durable.map_or(Content::Zeros, Content::Write)];
                legal.extend(state.since.iter().map(|&id| Content::Write(id)));
                legal
            }
        };
        if let Some(id) = state.in_flight {
            if !legal.contains(&Content::Write(id)) {
                legal.push(Content::Write(id));
            }
        }
        legal
    }

    /// A legal read of `block` returned `content`.
    fn settle(&mut self, block: u64, content: Content) {
        let state = &self.blocks[block as usize];
        if state.in_flight.is_some() {
            return;
        }
        if state.current == Current::AfterCrash
            && (state.durable.is_some() || !state.since.is_empty())
        {
            // The last acknowledged write: the newest of `since` acknowledged before the
            // crash (or durable), else the durable one.
            let last_acked = state.since.iter().rposition(|id| {
                self.writes.get(id).is_some_and(|info| {
                    matches!(info.state, WriteState::Acked | WriteState::Durable)
                })
            });
            let observed_at = match content {
                Content::Zeros => None,
                Content::Write(id) => state.since.iter().position(|&other| other == id),
            };
            let reads = &mut self.stats.after_crash;
            match (observed_at, last_acked) {
                (Some(at), Some(last)) if at > last => reads.unacked_landed += 1,
                (Some(_), None) => reads.unacked_landed += 1,
                (Some(at), Some(last)) if at < last => reads.rolled_back += 1,
                (None, Some(_)) => reads.rolled_back += 1,
                // At the last acknowledged write (or the durable one, with nothing acknowledged
                // after it): was a later write's outcome unknown?
                (at, last) => {
                    let from = at.or(last).map_or(0, |at| at + 1);
                    if state.since.len() > from {
                        reads.unacked_absent += 1;
                    } else {
                        reads.at_last_acked += 1;
                    }
                }
            }
        }
        self.blocks[block as usize].current = Current::Exactly(content);
    }

    /// Which allowed content (or zeros) each sector of a garbage block matches.
    fn match_sectors(&self, block: u64, data: &[u8], legal: &[Content]) -> Vec<Option<Content>> {
        let mut candidates: Vec<(Content, [u8; BLOCK_BYTES])> = Vec::with_capacity(legal.len());
        for &content in legal.iter().chain(&[Content::Zeros]) {
            let mut bytes = [0u8; BLOCK_BYTES];
            if let Content::Write(id) = content {
                stamp_block(self.run, id, block, &mut bytes);
            }
            candidates.push((content, bytes));
        }
        data.chunks_exact(SECTOR_BYTES)
            .enumerate()
            .map(|(sector, bytes)| {
                let range = sector * SECTOR_BYTES..(sector + 1) * SECTOR_BYTES;
                candidates
                    .iter()
                    .find(|(_, expected)| expected[range.clone()] == *bytes)
                    .map(|(content, _)| *content)
            })
            .collect()
    }

    fn in_flight_write(&mut self, id: WriteId) -> &mut WriteInfo {
        match self.writes.get_mut(&id) {
            Some(info) if info.state == WriteState::InFlight => info,
            Some(info) => panic!("{id} is not in flight but {}", info.state),
            None => panic!("{id} is not in flight"),
        }
    }

    /// Write `id` (no longer in flight) may or may not have landed on each of `blocks`.
    fn unsettle(&mut self, id: WriteId, blocks: Range<u64>) {
        for block in &mut self.blocks[blocks.start as usize..blocks.end as usize] {
            block.in_flight = None;
            match &mut block.current {
                Current::Exactly(content) => {
                    block.current = Current::OneOf(vec![*content, Content::Write(id)])
                }
                Current::OneOf(contents) => contents.push(Content::Write(id)),
                // `since` holds it already.
                Current::AfterCrash => {}
            }
        }
    }

    /// Write `id` is durable: on each of its blocks where nothing newer is, it becomes the
    /// newest durable write, and the writes before it can no longer come back.
    fn make_durable(&mut self, id: WriteId) {
        let Some(info) = self.writes.get_mut(&id) else {
            // Forgotten: a newer durable write covers every block it had.
            return;
        };
        info.state = WriteState::Durable;
        let blocks = info.blocks.clone();
        let mut released = Vec::new();
        for block in &mut self.blocks[blocks.start as usize..blocks.end as usize] {
            let Some(at) = block.since.iter().position(|&other| other == id) else {
                continue;
            };
            released.extend(block.since.drain(..at));
            block.since.remove(0);
            released.extend(block.durable.replace(id));
        }
        for id in released {
            let info = self.writes.get_mut(&id).expect("a block names it");
            info.refs -= 1;
            if info.refs == 0 && info.state != WriteState::InFlight {
                self.writes.remove(&id);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

/// Everything that can stop the client.
#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    #[error("cannot resolve {address}")]
    Resolve {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {address}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("the NBD handshake with {address} failed: {detail}")]
    Handshake { address: String, detail: String },
    #[error("export {export:?} at {address} cannot be checked: {detail}")]
    Export {
        address: String,
        export: String,
        detail: String,
    },
    #[error("the connection to {address} was lost {during} with {in_flight} requests in flight")]
    ConnectionLost {
        address: String,
        during: &'static str,
        in_flight: usize,
        #[source]
        source: io::Error,
    },
    #[error("no reply from {address} for {seconds} s with {in_flight} requests in flight")]
    Stalled {
        address: String,
        seconds: u64,
        in_flight: usize,
    },
    #[error("{address} broke the transmission protocol: {detail}")]
    Protocol { address: String, detail: String },
    #[error("{command} of blocks {blocks:?} failed with {error}")]
    ErrorReply {
        command: Command,
        blocks: Range<u64>,
        error: String,
    },
    #[error("not connected: reconnect first")]
    NotConnected,
    #[error("no connection to {uri} within {seconds} s")]
    ReconnectTimeout {
        uri: String,
        seconds: u64,
        #[source]
        last: Box<CheckerError>,
    },
    #[error(
        "{count} blocks read back what the model forbids; the first: {}",
        .violations.first().map(|violation| violation.to_string()).unwrap_or_default()
    )]
    Violations {
        count: u64,
        /// The first few, in block order.
        violations: Vec<Violation>,
    },
}

/// The shape of the client's random writes.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Seeds the writes' places, sizes, flags and the run tag.
    pub seed: u64,
    /// Requests in flight, 1 to [`MAX_QUEUE_DEPTH`].
    pub queue_depth: usize,
    /// Each write covers 1 to this many blocks (at most [`MAX_WRITE_BLOCKS`]).
    pub max_write_blocks: u64,
    /// Percent of writes sent with FUA.
    pub fua_percent: u32,
    /// A flush follows every this many writes on average (0: none).
    pub flush_every_writes: u64,
    /// The blocks written, from the start of the export (0: the whole export).
    pub blocks: u64,
    /// The longest the client waits for any reply before it calls the node stalled.
    pub reply_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            seed: 1,
            queue_depth: MAX_QUEUE_DEPTH,
            max_write_blocks: MAX_WRITE_BLOCKS,
            fua_percent: 10,
            flush_every_writes: 32,
            blocks: 0,
            reply_timeout: Duration::from_secs(30),
        }
    }
}

/// How a timed run ended.
#[derive(Debug)]
pub enum RunEnd {
    /// The time was up and every request in flight was answered.
    Elapsed,
    /// The connection died (its error says how); its requests in flight are of unknown outcome.
    ConnectionLost(CheckerError),
}

/// What a verify pass read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    pub blocks_checked: u64,
    /// Of them, blocks ever written to.
    pub written_blocks: u64,
}

/// A request in flight, by its pipeline slot (its cookie on the wire).
#[derive(Debug, Clone)]
enum Pending {
    Write(WriteId),
    Flush(FlushId),
    Read(Range<u64>),
}

/// One NBD connection in the transmission phase: the [`Pipeline`] keeps its requests in flight,
/// and `pending` says what each slot's request is to the model.
struct Wire {
    pipeline: Pipeline,
    pending: Vec<Option<Pending>>,
    address: String,
    size_bytes: u64,
}

impl Wire {
    /// Connects and opens the export, which must take writes, flushes and FUA, and IOs as long
    /// as the checker's; `queue_depth` slots, a reply timeout of `reply_timeout`.
    fn open(
        uri: &NbdUri,
        queue_depth: usize,
        reply_timeout: Duration,
    ) -> Result<Wire, CheckerError> {
        let address = uri.address();
        let connection = Connection::open(uri).map_err(|error| open_failed(&address, error))?;
        let export = connection.export().clone();
        let refuse = |detail: String| CheckerError::Export {
            address: address.clone(),
            export: uri.export.clone(),
            detail,
        };
        let flags = export.transmission_flags;
        if export.read_only() {
            return Err(refuse("it is read-only".into()));
        }
        if flags & transmission_flag::SEND_FLUSH == 0 || flags & transmission_flag::SEND_FUA == 0 {
            return Err(refuse(format!(
                "it does not take both NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA (flags {flags:#06x})"
            )));
        }
        let largest = MAX_WRITE_BLOCKS.max(VERIFY_READ_BLOCKS) * BLOCK_BYTES as u64;
        if u64::from(export.max_block_bytes) < largest {
            return Err(refuse(format!(
                "its maximum block size is {} bytes; the checker sends {largest}",
                export.max_block_bytes
            )));
        }
        let mut pipeline = Pipeline::new(connection, queue_depth, largest as u32, true)
            .map_err(|error| open_failed(&address, error))?;
        pipeline.set_stall_timeout(reply_timeout);
        Ok(Wire {
            pipeline,
            pending: vec![None; queue_depth],
            address,
            size_bytes: export.size_bytes,
        })
    }

    fn can_submit(&self) -> bool {
        self.pipeline.can_submit()
    }

    fn in_flight(&self) -> usize {
        self.pipeline.in_flight()
    }

    /// Queues the request for `pending`, on `blocks` (none for a flush); `payload` fills a
    /// write's data. The caller checked for a free slot. It is sent by [`Wire::receive`].
    fn submit(
        &mut self,
        pending: Pending,
        command: Command,
        flags: u16,
        blocks: Range<u64>,
        payload: impl FnOnce(&mut [u8]),
    ) {
        let offset = blocks.start * BLOCK_BYTES as u64;
        let length = (blocks.end - blocks.start) as u32 * BLOCK_BYTES as u32;
        let slot = self
            .pipeline
            .submit_with(command, flags, offset, length, payload)
            .expect("the caller checked for a free slot");
        self.pending[slot as usize] = Some(pending);
    }

    /// Sends what is queued and waits for the next reply: its request and completion (a read's
    /// data is [`Wire::data`] until the next submit). The wait ends with the reply timeout.
    fn receive(&mut self) -> Result<(Pending, Completion), CheckerError> {
        loop {
            self.pipeline.flush().map_err(|error| self.failed(error))?;
            if let Some(done) = self
                .pipeline
                .next_completion()
                .map_err(|error| self.failed(error))?
            {
                let pending = self.pending[done.slot as usize]
                    .take()
                    .expect("a slot with a reply has a request");
                return Ok((pending, done));
            }
            self.pipeline
                .wait(REPLY_WAIT_SLICE)
                .map_err(|error| self.failed(error))?;
        }
    }

    /// The data of the read completed in `slot`.
    fn data(&self, slot: u32) -> &[u8] {
        self.pipeline.data(slot)
    }

    /// A pipeline error of the transmission phase: the end of the connection, a stall, or a
    /// broken protocol.
    fn failed(&self, error: NbdClientError) -> CheckerError {
        if let NbdClientError::Disconnected { in_flight, .. } = error {
            return CheckerError::ConnectionLost {
                address: self.address.clone(),
                during: "in the transmission phase",
                in_flight,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, error),
            };
        }
        match error {
            NbdClientError::Io {
                address,
                during,
                source,
            } => CheckerError::ConnectionLost {
                address,
                during,
                in_flight: self.in_flight(),
                source,
            },
            NbdClientError::Stalled {
                address,
                seconds,
                in_flight,
            } => CheckerError::Stalled {
                address,
                seconds,
                in_flight,
            },
            NbdClientError::Protocol { address, detail } => {
                CheckerError::Protocol { address, detail }
            }
            other => self.protocol(other.to_string()),
        }
    }

    fn protocol(&self, detail: String) -> CheckerError {
        CheckerError::Protocol {
            address: self.address.clone(),
            detail,
        }
    }
}

/// Why connecting to `address` or its handshake failed.
fn open_failed(address: &str, error: NbdClientError) -> CheckerError {
    match error {
        NbdClientError::Resolve { address, source } => CheckerError::Resolve { address, source },
        NbdClientError::Connect { address, source } => CheckerError::Connect { address, source },
        other => CheckerError::Handshake {
            address: address.to_string(),
            detail: other.to_string(),
        },
    }
}

/// Drives a node with random writes over NBD and checks every block it reads back against its
/// [`Model`].
pub struct Client {
    uri: NbdUri,
    options: ClientOptions,
    model: Model,
    wire: Option<Wire>,
    rng: u64,
    /// Writes left before the next flush.
    until_flush: u64,
    reconnects: u64,
    verify_passes: u64,
}

impl Client {
    /// Connects to `uri` and sets up a model of the blocks it will write.
    pub fn connect(uri: &NbdUri, options: ClientOptions) -> Result<Client, CheckerError> {
        assert!(
            (1..=MAX_QUEUE_DEPTH).contains(&options.queue_depth),
            "queue depth {} (1 to {MAX_QUEUE_DEPTH})",
            options.queue_depth
        );
        assert!(
            (1..=MAX_WRITE_BLOCKS).contains(&options.max_write_blocks),
            "writes of up to {} blocks (1 to {MAX_WRITE_BLOCKS})",
            options.max_write_blocks
        );
        let wire = Wire::open(uri, options.queue_depth, options.reply_timeout)?;
        let export_blocks = wire.size_bytes / BLOCK_BYTES as u64;
        let blocks = match options.blocks {
            0 => export_blocks,
            blocks => blocks,
        };
        if blocks == 0 || blocks > export_blocks || blocks < options.max_write_blocks {
            return Err(CheckerError::Export {
                address: wire.address.clone(),
                export: uri.export.clone(),
                detail: format!(
                    "it has {export_blocks} blocks of {BLOCK_BYTES} bytes; the checker was asked \
                     to write {blocks}, in writes of up to {}",
                    options.max_write_blocks
                ),
            });
        }
        let mut rng = mix(options.seed ^ 0x5eed);
        let run = xorshift(&mut rng);
        let mut client = Client {
            uri: uri.clone(),
            model: Model::with_run(blocks, run),
            wire: Some(wire),
            rng,
            until_flush: 0,
            reconnects: 0,
            verify_passes: 0,
            options,
        };
        client.until_flush = client.next_flush_gap();
        Ok(client)
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    pub fn connected(&self) -> bool {
        self.wire.is_some()
    }

    /// Writes at random for `duration`, then waits for every reply. A dead connection ends
    /// the run early ([`RunEnd::ConnectionLost`]); its requests in flight become of unknown
    /// outcome in the model, and the client must [`Client::reconnect`].
    pub fn run(&mut self, duration: Duration) -> Result<RunEnd, CheckerError> {
        let end = Instant::now() + duration;
        loop {
            let wire = self.wire.as_ref().ok_or(CheckerError::NotConnected)?;
            if wire.can_submit() && Instant::now() < end && self.issue_one() {
                continue;
            }
            let wire = self.wire.as_mut().expect("checked above");
            if wire.in_flight() == 0 {
                return Ok(RunEnd::Elapsed);
            }
            let (pending, done) = match wire.receive() {
                Ok(reply) => reply,
                Err(error) => return self.lost(error),
            };
            match (pending, done.error) {
                (Pending::Write(id), 0) => self.model.acked(id),
                (Pending::Write(id), _) => self.model.failed(id),
                (Pending::Flush(id), 0) => self.model.flush_acked(id),
                (Pending::Flush(id), _) => self.model.flush_failed(id),
                (Pending::Read(blocks), _) => {
                    return Err(wire.protocol(format!(
                        "a reply to a read of blocks {blocks:?} during a write run"
                    )))
                }
            }
        }
    }

    /// Sends a flush and waits for its reply (nothing else may be in flight): afterwards every
    /// write acknowledged so far is durable. A lost connection is an error here.
    pub fn sync(&mut self) -> Result<(), CheckerError> {
        assert_eq!(
            self.model.in_flight(),
            0,
            "a sync starts with nothing in flight"
        );
        let wire = self.wire.as_mut().ok_or(CheckerError::NotConnected)?;
        let id = self.model.flush_issued();
        wire.submit(Pending::Flush(id), Command::Flush, 0, 0..0, |_| {});
        match wire.receive() {
            Ok((Pending::Flush(replied), done)) if replied == id && done.error == 0 => {
                self.model.flush_acked(id);
                Ok(())
            }
            Ok((Pending::Flush(replied), done)) if replied == id => {
                self.model.flush_failed(id);
                Err(CheckerError::ErrorReply {
                    command: Command::Flush,
                    blocks: 0..0,
                    error: done.error_text(),
                })
            }
            Ok(_) => {
                let error = wire.protocol("a reply to another request than the flush".into());
                self.drop_connection();
                Err(error)
            }
            Err(error) => {
                self.drop_connection();
                Err(error)
            }
        }
    }

    /// Queues one write (or flush, when one is due) in a free slot; `false` when every place
    /// tried overlaps a write in flight (then a reply must come first).
    fn issue_one(&mut self) -> bool {
        if self.until_flush == 0 {
            self.until_flush = self.next_flush_gap();
            let id = self.model.flush_issued();
            let wire = self.wire.as_mut().expect("the caller checked");
            wire.submit(Pending::Flush(id), Command::Flush, 0, 0..0, |_| {});
            return true;
        }
        let blocks_total = self.model.blocks();
        // A few tries for a place that overlaps no write in flight.
        for _ in 0..4 {
            let length = 1 + xorshift(&mut self.rng) % self.options.max_write_blocks;
            let start = xorshift(&mut self.rng) % (blocks_total - length + 1);
            let blocks = start..start + length;
            if self.model.write_in_flight(blocks.clone()) {
                continue;
            }
            let fua = xorshift(&mut self.rng) % 100 < u64::from(self.options.fua_percent);
            let id = self.model.issue(blocks.clone(), fua);
            self.until_flush -= 1;
            let run = self.model.run();
            let flags = if fua { cmd_flag::FUA } else { 0 };
            let wire = self.wire.as_mut().expect("the caller checked");
            wire.submit(
                Pending::Write(id),
                Command::Write,
                flags,
                blocks.clone(),
                |payload| {
                    for (block, out) in blocks.zip(payload.chunks_exact_mut(BLOCK_BYTES)) {
                        stamp_block(run, id, block, out);
                    }
                },
            );
            return true;
        }
        false
    }

    fn next_flush_gap(&mut self) -> u64 {
        match self.options.flush_every_writes {
            0 => u64::MAX,
            every => 1 + xorshift(&mut self.rng) % (2 * every),
        }
    }

    /// The connection is gone: a lost connection ends the run, anything else is an error.
    fn lost(&mut self, error: CheckerError) -> Result<RunEnd, CheckerError> {
        self.drop_connection();
        match error {
            CheckerError::ConnectionLost { .. } => Ok(RunEnd::ConnectionLost(error)),
            other => Err(other),
        }
    }

    /// Drops the connection: its writes and flushes in flight are of unknown outcome.
    fn drop_connection(&mut self) {
        self.wire = None;
        if self.model.in_flight() > 0 {
            self.model.connection_lost();
        }
    }

    /// The node crashed (it was killed): the model rolls back what was not durable. The old
    /// connection, if any, is dropped.
    pub fn crashed(&mut self) {
        self.wire = None;
        self.model.crashed();
    }

    /// Connects to `uri` (the node may have moved), trying until `timeout` has passed. Any
    /// old connection is dropped first, its requests in flight of unknown outcome.
    pub fn reconnect(&mut self, uri: &NbdUri, timeout: Duration) -> Result<(), CheckerError> {
        self.drop_connection();
        let deadline = Instant::now() + timeout;
        loop {
            match Wire::open(uri, self.options.queue_depth, self.options.reply_timeout) {
                Ok(wire) => {
                    if wire.size_bytes / (BLOCK_BYTES as u64) < self.model.blocks() {
                        return Err(CheckerError::Export {
                            address: wire.address.clone(),
                            export: uri.export.clone(),
                            detail: format!(
                                "it has shrunk to {} bytes, fewer than the {} blocks written",
                                wire.size_bytes,
                                self.model.blocks()
                            ),
                        });
                    }
                    self.wire = Some(wire);
                    self.uri = uri.clone();
                    self.reconnects += 1;
                    return Ok(());
                }
                Err(error) if Instant::now() >= deadline => {
                    return Err(CheckerError::ReconnectTimeout {
                        uri: uri.to_string(),
                        seconds: timeout.as_secs(),
                        last: Box::new(error),
                    })
                }
                Err(_) => std::thread::sleep(RECONNECT_PAUSE),
            }
        }
    }

    /// Reads every block of the model back (none may have a write in flight) and checks each.
    /// Violations are all counted and the first few kept, in [`CheckerError::Violations`].
    pub fn verify_all(&mut self) -> Result<VerifyReport, CheckerError> {
        assert_eq!(
            self.model.in_flight(),
            0,
            "a verify pass starts with nothing in flight"
        );
        let mut violations = Vec::new();
        let mut count = 0u64;
        let checked = match self.verify_pass(&mut violations, &mut count) {
            Ok(checked) => checked,
            Err(error) => {
                self.wire = None;
                return Err(error);
            }
        };
        self.verify_passes += 1;
        if count > 0 {
            violations.sort_by_key(|violation| violation.block);
            return Err(CheckerError::Violations { count, violations });
        }
        Ok(VerifyReport {
            blocks_checked: checked,
            written_blocks: self.model.written_blocks(),
        })
    }

    /// Reads every block, up to the queue depth at once: the blocks checked.
    fn verify_pass(
        &mut self,
        violations: &mut Vec<Violation>,
        count: &mut u64,
    ) -> Result<u64, CheckerError> {
        let blocks_total = self.model.blocks();
        let wire = self.wire.as_mut().ok_or(CheckerError::NotConnected)?;
        let mut next = 0u64;
        let mut checked = 0u64;
        loop {
            while next < blocks_total && wire.can_submit() {
                let blocks = next..(next + VERIFY_READ_BLOCKS).min(blocks_total);
                next = blocks.end;
                wire.submit(
                    Pending::Read(blocks.clone()),
                    Command::Read,
                    0,
                    blocks,
                    |_| {},
                );
            }
            if wire.in_flight() == 0 {
                return Ok(checked);
            }
            let (pending, done) = wire.receive()?;
            let Pending::Read(blocks) = pending else {
                return Err(wire.protocol("a reply to a write during a verify pass".into()));
            };
            if done.error != 0 {
                return Err(CheckerError::ErrorReply {
                    command: Command::Read,
                    blocks,
                    error: done.error_text(),
                });
            }
            for (block, data) in blocks.zip(wire.data(done.slot).chunks_exact(BLOCK_BYTES)) {
                checked += 1;
                if let Err(violation) = self.model.check_read(block, data) {
                    *count += 1;
                    if violations.len() < MAX_VIOLATIONS_KEPT {
                        violations.push(violation);
                    }
                }
            }
        }
    }

    /// Sends `NBD_CMD_DISC` and closes (nothing may be in flight).
    pub fn disconnect(&mut self) {
        if let Some(wire) = self.wire.take() {
            assert_eq!(wire.in_flight(), 0, "disconnecting with requests in flight");
            wire.pipeline.disconnect();
        }
    }

    /// The history so far, in one line.
    pub fn summary(&self) -> Summary {
        Summary {
            stats: *self.model.stats(),
            reconnects: self.reconnects,
            verify_passes: self.verify_passes,
            live_writes: self.model.live_writes(),
        }
    }
}

/// What a client did and found (its `Display` is one line).
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub stats: ModelStats,
    pub reconnects: u64,
    pub verify_passes: u64,
    pub live_writes: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = &self.stats;
        let after = &stats.after_crash;
        write!(
            f,
            "{} crashes, {} reconnects; writes: {} issued, {} acked ({} with FUA, {} blocks), \
             {} unknown outcome, {} failed; flushes: {} issued, {} acked, {} failed; {} verify \
             passes, {} blocks checked, {} violations; blocks at their first read after a crash: \
             {} at the last acked write, {} with an unacked write landed, {} without their \
             unacked write, {} rolled back past an acked write",
            stats.crashes,
            self.reconnects,
            stats.writes_issued,
            stats.writes_acked,
            stats.fua_writes_acked,
            stats.block_writes_acked,
            stats.writes_unknown,
            stats.writes_failed,
            stats.flushes_issued,
            stats.flushes_acked,
            stats.flushes_failed,
            self.verify_passes,
            stats.blocks_checked,
            stats.violations,
            after.at_last_acked,
            after.unacked_landed,
            after.unacked_absent,
            after.rolled_back,
        )
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: u64 = 0x1234;

    fn block_of(id: WriteId, block: u64) -> Vec<u8> {
        let mut data = vec![0u8; BLOCK_BYTES];
        stamp_block(RUN, id, block, &mut data);
        data
    }

    fn zeros() -> Vec<u8> {
        vec![0u8; BLOCK_BYTES]
    }

    /// A write of `blocks` issued and acknowledged.
    fn acked(model: &mut Model, blocks: Range<u64>, fua: bool) -> WriteId {
        let id = model.issue(blocks, fua);
        model.acked(id);
        id
    }

    fn flush(model: &mut Model) {
        let id = model.flush_issued();
        model.flush_acked(id);
    }

    #[test]
    fn stamped_blocks_identify_their_write_and_catch_any_change() {
        let data = block_of(WriteId(7), 3);
        assert_eq!(identify(RUN, 3, &data), Observed::Write(WriteId(7)));
        assert_eq!(
            identify(RUN, 4, &data),
            Observed::Misdirected {
                id: WriteId(7),
                block: 3
            }
        );
        assert_eq!(identify(RUN, 3, &zeros()), Observed::Zeros);
        // Another run's data is not this run's.
        assert!(matches!(
            identify(RUN + 1, 3, &data),
            Observed::Garbage(garbage) if garbage.header.is_none()
        ));
        // One flipped bit anywhere: garbage, and the checksum says so.
        for at in [0, 20, HEADER_BYTES, 2049, BLOCK_BYTES - 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x10;
            match identify(RUN, 3, &bad) {
                Observed::Garbage(garbage) => assert!(!garbage.checksum_matches, "byte {at}"),
                other => panic!("byte {at}: {other:?}"),
            }
        }
        // Different writes and blocks differ in their filler too.
        assert_ne!(block_of(WriteId(7), 3)[64..], block_of(WriteId(8), 3)[64..]);
        assert_ne!(block_of(WriteId(7), 3)[64..], block_of(WriteId(7), 4)[64..]);
    }

    #[test]
    fn without_a_crash_a_read_must_return_exactly_the_last_acknowledged_write() {
        let mut model = Model::with_run(8, RUN);
        model.check_read(0, &zeros()).unwrap();
        let first = acked(&mut model, 0..2, false);
        let second = acked(&mut model, 1..3, false);
        model.check_read(0, &block_of(first, 0)).unwrap();
        model.check_read(1, &block_of(second, 1)).unwrap();
        let violation = model.check_read(1, &block_of(first, 1)).unwrap_err();
        assert!(!violation.after_crash);
        assert_eq!(violation.observed, Observed::Write(first));
        assert_eq!(violation.allowed.len(), 1);
        assert_eq!(violation.allowed[0].content, Content::Write(second));
        let message = violation.to_string();
        assert!(
            message.contains("block 1 (byte offset 4096) read write #1, which is acknowledged")
                && message.contains("must hold write #2 (acknowledged, not durable)"),
            "{message}"
        );
        // Zeros where a write was acknowledged: lost.
        assert!(model.check_read(2, &zeros()).is_err());
        // A write in flight may or may not be seen yet.
        let third = model.issue(2..3, false);
        model.check_read(2, &block_of(second, 2)).unwrap();
        model.check_read(2, &block_of(third, 2)).unwrap();
        model.acked(third);
        assert!(model.check_read(2, &block_of(second, 2)).is_err());
    }

    #[test]
    fn a_durable_write_read_back_as_its_predecessor_after_a_crash_is_a_violation() {
        let mut model = Model::with_run(4, RUN);
        let old = acked(&mut model, 0..1, true);
        let new = acked(&mut model, 0..1, true);
        model.crashed();
        let violation = model.check_read(0, &block_of(old, 0)).unwrap_err();
        assert!(violation.after_crash);
        assert_eq!(violation.allowed.len(), 1);
        assert!(violation.allowed[0].newest_durable);
        let message = violation.to_string();
        assert!(
            message.contains("read write #1, an older write, overwritten by a durable one")
                && message
                    .contains("after crash 1 it may hold only write #2 (the newest durable write)"),
            "{message}"
        );
        model.check_read(0, &block_of(new, 0)).unwrap();
    }

    #[test]
    fn zeros_after_a_durable_write_are_a_violation() {
        let mut model = Model::with_run(4, RUN);
        let flushed = acked(&mut model, 0..2, false);
        flush(&mut model);
        let fua = acked(&mut model, 2..3, true);
        model.crashed();
        for block in 0..3 {
            let violation = model.check_read(block, &zeros()).unwrap_err();
            assert_eq!(violation.observed, Observed::Zeros, "block {block}");
        }
        model.check_read(0, &block_of(flushed, 0)).unwrap();
        model.check_read(2, &block_of(fua, 2)).unwrap();
        // Block 3 was never written: zeros, and only zeros.
        model.check_read(3, &zeros()).unwrap();
        assert!(model.check_read(3, &block_of(flushed, 3)).is_err());
    }

    #[test]
    fn a_write_not_yet_durable_may_roll_back_to_the_durable_one_after_a_crash() {
        let mut model = Model::with_run(4, RUN);
        let durable = acked(&mut model, 0..1, true);
        let later = acked(&mut model, 0..1, false);
        let mut rolled = Model::with_run(4, RUN);
        let _ = acked(&mut rolled, 0..1, true);
        let _ = acked(&mut rolled, 0..1, false);
        model.crashed();
        rolled.crashed();
        model.check_read(0, &block_of(later, 0)).unwrap();
        rolled.check_read(0, &block_of(durable, 0)).unwrap();
        assert_eq!(model.stats().after_crash.at_last_acked, 1);
        assert_eq!(rolled.stats().after_crash.rolled_back, 1);
        // A model that saw no write allows only zeros.
        assert!(Model::with_run(4, RUN)
            .check_read(0, &block_of(durable, 0))
            .is_err());
    }

    #[test]
    fn a_flush_covers_only_writes_acknowledged_before_it_was_issued() {
        let mut model = Model::with_run(4, RUN);
        let before = acked(&mut model, 0..1, false);
        let flush_id = model.flush_issued();
        let after = acked(&mut model, 1..2, false);
        let in_flight = model.issue(2..3, false);
        model.flush_acked(flush_id);
        model.acked(in_flight);
        model.crashed();
        assert!(
            model.check_read(0, &zeros()).is_err(),
            "the flushed write is durable"
        );
        model.check_read(0, &block_of(before, 0)).unwrap();
        model.check_read(1, &zeros()).unwrap();
        model.check_read(2, &zeros()).unwrap();
        let _ = after;
        // A flush in flight at the crash made nothing durable.
        let mut model = Model::with_run(4, RUN);
        let write = acked(&mut model, 0..1, false);
        let _ = model.flush_issued();
        model.crashed();
        model.check_read(0, &zeros()).unwrap();
        let _ = write;
    }

    #[test]
    fn writes_acknowledged_before_a_crash_are_not_made_durable_by_a_flush_after_it() {
        let mut model = Model::with_run(4, RUN);
        let _ = acked(&mut model, 0..1, false);
        model.crashed();
        flush(&mut model);
        model.crashed();
        model.check_read(0, &zeros()).unwrap();
    }

    #[test]
    fn a_write_in_flight_at_a_crash_may_be_torn_across_blocks_but_not_within_one() {
        let mut model = Model::with_run(8, RUN);
        let old = acked(&mut model, 0..4, true);
        let torn = model.issue(0..4, false);
        model.crashed();
        // Blocks 0 and 2 got the new write, 1 and 3 kept the old one: legal.
        model.check_read(0, &block_of(torn, 0)).unwrap();
        model.check_read(1, &block_of(old, 1)).unwrap();
        model.check_read(2, &block_of(torn, 2)).unwrap();
        model.check_read(3, &block_of(old, 3)).unwrap();
        assert_eq!(model.stats().after_crash.unacked_landed, 2);
        assert_eq!(model.stats().after_crash.unacked_absent, 2);
        // Within a block: half of each is garbage, and the sectors say which half is which.
        let mut model = Model::with_run(8, RUN);
        let old = acked(&mut model, 0..1, true);
        let new = model.issue(0..1, false);
        model.crashed();
        let mut data = block_of(old, 0);
        data[2048..].copy_from_slice(&block_of(new, 0)[2048..]);
        let violation = model.check_read(0, &data).unwrap_err();
        let Observed::Garbage(garbage) = &violation.observed else {
            panic!("{violation}");
        };
        assert_eq!(garbage.header, Some((old, 0)));
        assert!(!garbage.checksum_matches);
        let old_c = Some(Content::Write(old));
        let new_c = Some(Content::Write(new));
        assert_eq!(
            garbage.sectors,
            vec![old_c, old_c, old_c, old_c, new_c, new_c, new_c, new_c]
        );
        let message = violation.to_string();
        assert!(
            message.contains("by 512-byte sector: 0-3: write #1, 4-7: write #2)"),
            "{message}"
        );
    }

    #[test]
    fn an_unacknowledged_write_never_brings_back_an_overwritten_one() {
        let mut model = Model::with_run(4, RUN);
        let oldest = acked(&mut model, 0..1, true);
        let durable = acked(&mut model, 0..1, true);
        let unknown = model.issue(0..1, false);
        model.crashed();
        assert!(model.check_read(0, &block_of(oldest, 0)).is_err());
        assert!(model.check_read(0, &zeros()).is_err());
        let _ = (durable, unknown);
    }

    #[test]
    fn the_first_read_after_a_crash_settles_the_block() {
        let mut model = Model::with_run(4, RUN);
        let durable = acked(&mut model, 0..1, true);
        let landed = model.issue(0..1, false);
        model.crashed();
        model.check_read(0, &block_of(landed, 0)).unwrap();
        // The node may not flip back to the durable write without a crash in between.
        let violation = model.check_read(0, &block_of(durable, 0)).unwrap_err();
        assert!(!violation.after_crash);
        model.check_read(0, &block_of(landed, 0)).unwrap();
        // A second crash: both are legal again (neither the unknown write is durable).
        model.crashed();
        model.check_read(0, &block_of(durable, 0)).unwrap();
    }

    #[test]
    fn a_connection_loss_without_a_crash_loses_no_acknowledged_write() {
        let mut model = Model::with_run(4, RUN);
        let acked_write = acked(&mut model, 0..1, false);
        let unknown = model.issue(0..2, false);
        let _ = model.flush_issued();
        model.connection_lost();
        assert_eq!(model.in_flight(), 0);
        assert_eq!(model.stats().writes_unknown, 1);
        // Block 0: the acknowledged write or the unknown one; block 1: zeros or the unknown.
        assert!(model.check_read(0, &zeros()).is_err());
        model.check_read(0, &block_of(acked_write, 0)).unwrap();
        model.check_read(1, &block_of(unknown, 1)).unwrap();
        // A failed write is judged as one of unknown outcome.
        let failed = model.issue(2..3, false);
        model.failed(failed);
        model.check_read(2, &zeros()).unwrap();
        assert!(
            model.check_read(2, &block_of(failed, 2)).is_err(),
            "settled at zeros"
        );
    }

    #[test]
    fn writes_superseded_by_durable_ones_are_forgotten() {
        let mut model = Model::with_run(16, RUN);
        for round in 0..1000u64 {
            let start = round % 8;
            let id = model.issue(start..start + 8, round % 3 == 0);
            model.acked(id);
            if round % 10 == 0 {
                flush(&mut model);
            }
        }
        assert!(
            model.live_writes() < 40,
            "{} writes remembered",
            model.live_writes()
        );
        model.crashed();
        for block in 0..16 {
            // Every block's legal set is small: its durable write and the few after it.
            assert!(
                model.legal(block).len() <= 12,
                "block {block}: {:?}",
                model.legal(block)
            );
        }
    }

    #[test]
    #[should_panic(expected = "at most one write in flight per block")]
    fn overlapping_writes_in_flight_are_refused() {
        let mut model = Model::new(4);
        let _ = model.issue(0..2, false);
        let _ = model.issue(1..3, false);
    }
}
