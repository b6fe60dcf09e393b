//! End-to-end IO tracing: the trace model, the compact record of one traced IO, and the
//! per-core span rings in shared memory that the node writes and `fathom-stat trace` reads.
//!
//! **Model.** A trace id (16 bytes) and span ids (8 bytes) as W3C trace-context defines them,
//! so a trace can join an OpenTelemetry system ([`TraceContext`] reads and writes a
//! `traceparent`). An IO traced on a node is one [`TraceRecord`]: its ids, what it was (volume,
//! op, offset, length, status, core, queue) and the TSC stamps of every stage it passed, those
//! of its layers included. A reader expands the record into spans ([`TraceRecord::spans`]):
//! the root is the front end's span (or the engine's, for an IO from inside the node), with a
//! child per stage and per layer; span ids of the children are derived from the root's.
//!
//! **Rings.** One ring per core, one writer (the core's reactor), overwrite-oldest. A ring's
//! head counts the records ever written; record `n` lives in slot `n % capacity` and starts
//! with a sequence word, `2n + 1` while the writer fills it and `2n + 2` once complete (a
//! seqlock per record). A reader remembers the next `n` it wants: records older than
//! `head - capacity` are lost (overwritten before it came), and a record whose sequence word
//! is not `2n + 2` before and after it was copied is lost too (overwritten while it was
//! read). The reader counts both and never shows a torn record.
//!
//! **Volume slots.** The region names a fixed number of volumes, set at creation (the
//! volumes the node starts with and spare slots); a record's volume is a slot index. The node
//! fills, changes and clears slots while it runs ([`TraceRegion::set_volume`]); an unused
//! slot has an empty name. Each slot starts with a generation word that is a seqlock (odd
//! while the slot is rewritten), and every change bumps the header's directory generation,
//! so a reader notices it with one load ([`TraceReader::refresh`]). Records carry no
//! generation: a record read after its volume's slot was given to another volume is named
//! after the new one.
//!
//! Layout (little-endian, offsets in bytes; readers recompute and check every offset):
//!
//! ```text
//! 0      header (4096 bytes): magic "FATHOMTR", layout version, sizes, record size, ring count
//!        and capacity, TSC Hz, an epoch (TSC ticks and unix ns read together), writer pid,
//!        start time, node id, volume slot and layer counts, offsets, directory generation
//! ...    ring headers, 64 bytes each: core id, head
//! ...    volume slots (72 bytes each: generation, name, first LBA, block size), layer names
//!        (16 bytes each)
//! ...    records, 256 bytes each, ring after ring
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock::Clock;
use crate::shm::{
    check_slot_name, create_temporary, map_file, name_at, publish, put_name, u32_at, u64_at,
    unix_ns, words_of, Mapping, SlotError,
};

pub const MAGIC: [u8; 8] = *b"FATHOMTR";
pub const VERSION: u32 = 3;
pub const HEADER_BYTES: usize = 4096;
/// One record: a sequence word and 31 words of content.
pub const RECORD_WORDS: usize = 32;
pub const RECORD_BYTES: usize = RECORD_WORDS * 8;
/// Layers of a volume's stack a record has room for (deeper ones are not recorded).
pub const MAX_LAYERS: usize = 7;
const RING_HEADER_BYTES: usize = 64;
/// A volume slot: its generation (u64 at 0), then its entry: name (48 bytes at 8), first LBA
/// on its device (u64 at 56) and block size (u32 at 64).
const VOLUME_ENTRY_BYTES: usize = 72;
/// The words of a slot's entry, after its generation.
const VOLUME_ENTRY_WORDS: usize = 8;
const VOLUME_NAME_BYTES: usize = 48;
/// The generation of the volumes a region is created with (an unused slot starts at 0).
const FIRST_GENERATION: u64 = 2;
const LAYER_NAME_BYTES: usize = 16;
/// Limits a reader accepts, so a corrupt header cannot make it allocate without bound.
const MAX_RINGS: u32 = 1024;
const MAX_CAPACITY: u32 = 1 << 20;
const MAX_VOLUMES: u32 = 65536;
const MAX_LAYER_NAMES: u32 = 255;

/// Header field offsets.
mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_BYTES: usize = 12;
    pub const TOTAL_BYTES: usize = 16;
    pub const RECORD_BYTES: usize = 24;
    pub const RINGS: usize = 28;
    pub const CAPACITY: usize = 32;
    pub const VOLUMES: usize = 36;
    pub const LAYERS: usize = 40;
    pub const WRITER_PID: usize = 44;
    pub const TSC_HZ: usize = 48;
    pub const EPOCH_TICKS: usize = 56;
    pub const EPOCH_UNIX_NS: usize = 64;
    pub const START_UNIX_NS: usize = 72;
    pub const NODE_ID: usize = 80; // 64 bytes
    pub const OFFSETS: usize = 144; // 4 x u64: rings, volumes, layers, records
    /// Bumped after every change of a volume slot.
    pub const DIRECTORY_GENERATION: usize = 176;
}

/// Stamps a record carries, by index into [`TraceRecord::stamps`]; 0 is "not passed".
pub mod stamp {
    /// The front end read the request off its socket.
    pub const RECEIVED: usize = 0;
    /// The engine accepted the IO (its `queue` stage starts).
    pub const ACCEPTED: usize = 1;
    /// The IO got its slot and went into its volume's path.
    pub const SUBMITTED: usize = 2;
    /// The doorbell covering its command was rung.
    pub const RUNG: usize = 3;
    /// Its completion was seen on the device queue.
    pub const SEEN: usize = 4;
    /// Whoever asked had its completion.
    pub const COMPLETED: usize = 5;
    /// The front end started its reply.
    pub const REPLY_START: usize = 6;
    /// The reply left for the socket.
    pub const SENT: usize = 7;
    pub const COUNT: usize = 8;
}

/// Why an IO was traced (bits of [`TraceRecord::reason`]).
pub mod reason {
    /// Picked by head sampling (one in the volume's rate).
    pub const HEAD: u8 = 1;
    /// Its `total` exceeded the tail threshold.
    pub const TAIL: u8 = 2;
    /// It failed.
    pub const ERROR: u8 = 4;
    /// Its caller's trace context said "sampled".
    pub const CONTEXT: u8 = 8;
    /// Decided after the IO's completion was handed on (its `total` passed the threshold
    /// only then): offset (`u64::MAX`), status and queue were not kept.
    pub const LATE: u8 = 16;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("traceparent {0:?} is not version-traceid-parentid-flags (\"00-<32 hex>-<16 hex>-<2 hex>\")")]
    BadTraceparent(String),
    #[error(
        "traceparent {0:?} has an all-zero trace id or parent id, which W3C trace-context forbids"
    )]
    ZeroId(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("could not {what} trace region {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a fathom trace region (magic {found:?}, expected \"FATHOMTR\"); check the path (default /dev/shm/fathom-<node-id>.trace)")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path} has trace layout version {found}; this reader reads version {VERSION}: use the fathom-stat that ships with the running node")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path} is damaged: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("trace region: {what} ({value}) is out of range: {hint}")]
    OutOfRange {
        what: &'static str,
        value: u64,
        hint: &'static str,
    },
}

/// A trace id: 16 bytes, never all zero when valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct TraceId(pub u128);

/// A span id: 8 bytes, never zero when valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SpanId(pub u64);

impl std::fmt::Display for TraceId {
    /// 32 lowercase hex digits, as trace-context and OTLP JSON write it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Display for SpanId {
    /// 16 lowercase hex digits.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl TraceId {
    pub fn parse(hex: &str) -> Option<TraceId> {
        (hex.len() == 32 && hex.bytes().all(is_lower_hex))
            .then(|| u128::from_str_radix(hex, 16).ok().map(TraceId))
            .flatten()
    }
}

impl SpanId {
    pub fn parse(hex: &str) -> Option<SpanId> {
        (hex.len() == 16 && hex.bytes().all(is_lower_hex))
            .then(|| u64::from_str_radix(hex, 16).ok().map(SpanId))
            .flatten()
    }

    /// The id of child span `index` of the span `self` (never zero): a reader derives every
    /// child of a record's root the same way, so a record need not store them.
    pub fn child(self, index: u32) -> SpanId {
        let id = mix(self.0 ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        SpanId(if id == 0 { 1 } else { id })
    }
}

fn is_lower_hex(byte: u8) -> bool {
    byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)
}

/// SplitMix64's output function: a bijection that spreads every input bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What an IO carries from its caller (another node, a client that speaks trace-context): the
/// trace it belongs to, the caller's span, and whether the caller sampled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    pub parent: SpanId,
    pub sampled: bool,
}

impl TraceContext {
    /// Parses a W3C `traceparent` value (version 00; later versions are read as 00 when their
    /// first four fields are well formed, as the specification asks).
    pub fn from_traceparent(value: &str) -> Result<TraceContext, TraceError> {
        let bad = || TraceError::BadTraceparent(value.to_string());
        let mut parts = value.trim().split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let version_ok = version.len() == 2 && version.bytes().all(is_lower_hex) && version != "ff";
        if !version_ok || (version == "00" && parts.next().is_some()) {
            return Err(bad());
        }
        let trace_id = TraceId::parse(trace).ok_or_else(bad)?;
        let parent = SpanId::parse(parent).ok_or_else(bad)?;
        if flags.len() != 2 || !flags.bytes().all(is_lower_hex) {
            return Err(bad());
        }
        let flags = u8::from_str_radix(flags, 16).map_err(|_| bad())?;
        if trace_id.0 == 0 || parent.0 == 0 {
            return Err(TraceError::ZeroId(value.to_string()));
        }
        Ok(TraceContext {
            trace_id,
            parent,
            sampled: flags & 1 == 1,
        })
    }

    pub fn to_traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent, self.sampled as u8
        )
    }
}

/// Makes trace and span ids on one core: random (SplitMix64 over a seed unique to the node,
/// the core and the start), never zero. Not cryptographic; trace-context asks only that ids
/// be unique and random enough not to collide.
#[derive(Debug, Clone)]
pub struct IdGenerator {
    state: u64,
}

impl IdGenerator {
    pub fn new(seed: u64) -> Self {
        Self { state: mix(seed) }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    pub fn trace_id(&mut self) -> TraceId {
        let id = (self.next() as u128) << 64 | self.next() as u128;
        TraceId(if id == 0 { 1 } else { id })
    }

    pub fn span_id(&mut self) -> SpanId {
        let id = self.next();
        SpanId(if id == 0 { 1 } else { id })
    }
}

/// One traced IO on one node, as its ring holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TraceRecord {
    pub trace_id: TraceId,
    /// The IO's root span on this node.
    pub span_id: SpanId,
    /// The caller's span (another node's, a client's), or zero: the trace starts here.
    pub parent: SpanId,
    /// Index into the region's volume names.
    pub volume: u32,
    /// 0 read, 1 write, 2 flush, 3 write-zeroes (as the stats region's ops).
    pub op: u8,
    /// Bits of [`reason`].
    pub reason: u8,
    /// The NVMe status (status code type << 8 | status code), or 0 for success.
    pub status: u16,
    /// Byte offset in the volume.
    pub offset: u64,
    pub len: u32,
    /// The core of the reactor that ran it.
    pub core: u16,
    /// The device queue it went to (index into the stats region's queues).
    pub queue: u16,
    /// TSC stamps by [`stamp`] index; 0 where the IO did not pass.
    pub stamps: [u64; stamp::COUNT],
    /// The layers it went through, top first: (index into the region's layer names, begin,
    /// end). Only the first `layer_count` entries mean anything.
    pub layer_count: u8,
    pub layers: [(u8, u64, u64); MAX_LAYERS],
}

/// One span of a traced IO, as a reader expands a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub span_id: SpanId,
    /// Zero for the root of a trace.
    pub parent: SpanId,
    /// `frontend`, `io` (the root of an IO from inside the node), `queue`, `submit`,
    /// `layer:NAME`, `device`, `complete` or `reply`.
    pub name: String,
    pub begin: u64,
    pub end: u64,
}

impl TraceRecord {
    /// Content words 1..32 of the record (word 0 is the sequence word).
    #[inline(always)]
    fn encode(&self) -> [u64; RECORD_WORDS - 1] {
        let mut words = [0u64; RECORD_WORDS - 1];
        words[0] = (self.trace_id.0 >> 64) as u64;
        words[1] = self.trace_id.0 as u64;
        words[2] = self.span_id.0;
        words[3] = self.parent.0;
        words[4] = self.volume as u64
            | (self.op as u64) << 32
            | (self.reason as u64) << 40
            | (self.status as u64) << 48;
        words[5] = self.offset;
        words[6] = self.len as u64 | (self.core as u64) << 32 | (self.queue as u64) << 48;
        words[7..15].copy_from_slice(&self.stamps);
        let count = (self.layer_count as usize).min(MAX_LAYERS);
        let mut kinds = count as u64;
        for (index, &(kind, begin, end)) in self.layers[..count].iter().enumerate() {
            kinds |= (kind as u64) << (8 * (index + 1));
            words[16 + 2 * index] = begin;
            words[17 + 2 * index] = end;
        }
        words[15] = kinds;
        words
    }

    /// The record in `words`, or `None` when they cannot be one (a reader's input is
    /// untrusted: the counts must be in range).
    fn decode(words: &[u64; RECORD_WORDS - 1], layer_names: usize) -> Option<TraceRecord> {
        let count = (words[15] & 0xff) as usize;
        if count > MAX_LAYERS {
            return None;
        }
        let mut layers = [(0u8, 0u64, 0u64); MAX_LAYERS];
        for (index, layer) in layers[..count].iter_mut().enumerate() {
            let kind = (words[15] >> (8 * (index + 1))) as u8;
            if kind as usize >= layer_names {
                return None;
            }
            *layer = (kind, words[16 + 2 * index], words[17 + 2 * index]);
        }
        let mut stamps = [0u64; stamp::COUNT];
        stamps.copy_from_slice(&words[7..15]);
        Some(TraceRecord {
            trace_id: TraceId((words[0] as u128) << 64 | words[1] as u128),
            span_id: SpanId(words[2]),
            parent: SpanId(words[3]),
            volume: words[4] as u32,
            op: (words[4] >> 32) as u8,
            reason: (words[4] >> 40) as u8,
            status: (words[4] >> 48) as u16,
            offset: words[5],
            len: words[6] as u32,
            core: (words[6] >> 32) as u16,
            queue: (words[6] >> 48) as u16,
            stamps,
            layer_count: count as u8,
            layers,
        })
    }

    /// The IO's spans: the root first, then its children in time order of their begin. A
    /// stage the IO did not pass (a stamp of 0), or whose stamps run backwards, has no span.
    pub fn spans(&self, layer_names: &[String]) -> Vec<Span> {
        use stamp::*;
        let s = &self.stamps;
        let (name, begin, end) = if s[RECEIVED] != 0 && s[SENT] != 0 {
            ("frontend", s[RECEIVED], s[SENT])
        } else {
            ("io", s[ACCEPTED], s[COMPLETED].max(s[SEEN]))
        };
        let mut spans = vec![Span {
            span_id: self.span_id,
            parent: self.parent,
            name: name.to_string(),
            begin,
            end,
        }];
        let stages = [
            ("queue", ACCEPTED, SUBMITTED),
            ("submit", SUBMITTED, RUNG),
            ("device", RUNG, SEEN),
            ("complete", SEEN, COMPLETED),
            ("reply", REPLY_START, SENT),
        ];
        let mut children: Vec<(String, u64, u64)> = stages
            .iter()
            .filter(|&&(_, from, to)| s[from] != 0 && s[to] >= s[from])
            .map(|&(name, from, to)| (name.to_string(), s[from], s[to]))
            .collect();
        for &(kind, begin, end) in &self.layers[..(self.layer_count as usize).min(MAX_LAYERS)] {
            if begin != 0 && end >= begin {
                let name = layer_names.get(kind as usize).map_or("?", String::as_str);
                children.push((format!("layer:{name}"), begin, end));
            }
        }
        children.sort_by_key(|&(_, begin, _)| begin);
        spans.extend(
            children
                .into_iter()
                .enumerate()
                .map(|(index, (name, begin, end))| Span {
                    span_id: self.span_id.child(index as u32),
                    parent: self.span_id,
                    name,
                    begin,
                    end,
                }),
        );
        spans
    }

    /// The IO's `total`, in ticks: socket to socket through a front end, else from the engine
    /// accepting it to its completion.
    pub fn total_ticks(&self) -> u64 {
        use stamp::*;
        let s = &self.stamps;
        if s[RECEIVED] != 0 && s[SENT] != 0 {
            s[SENT].saturating_sub(s[RECEIVED])
        } else {
            s[COMPLETED].max(s[SEEN]).saturating_sub(s[ACCEPTED])
        }
    }
}

/// Where a node keeps its trace region unless told otherwise: beside its stats region, with
/// `.trace` added (`/dev/shm/fathom-node0.trace`).
pub fn region_beside(stats_region: &Path) -> PathBuf {
    let mut path = stats_region.as_os_str().to_os_string();
    path.push(".trace");
    PathBuf::from(path)
}

/// What the node describes when it creates its trace region.
#[derive(Debug, Clone)]
pub struct TraceSpec {
    pub node_id: String,
    /// One ring per entry: the core it belongs to.
    pub cores: Vec<u32>,
    /// Records per ring (a power of two).
    pub capacity: u32,
    /// The volumes the node starts with, in slots 0..
    pub volumes: Vec<String>,
    /// Where each volume lies on its device (by volume; missing ones are unknown).
    pub geometry: Vec<VolumeGeometry>,
    /// Unused volume slots after `volumes`, for volumes created while the node runs.
    pub spare_volumes: usize,
    /// Names of layer kinds, indexed by [`TraceRecord::layers`]' first field.
    pub layers: Vec<String>,
}

/// Where a volume lies on its device, so a reader can turn a byte offset in the volume into
/// the device's LBA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeGeometry {
    /// The volume's first LBA in its namespace.
    pub first_lba: u64,
    /// Bytes per LBA (0: unknown).
    pub block_size: u32,
}

impl VolumeGeometry {
    /// The device LBA of byte `offset` in the volume (`None`: an offset not kept,
    /// `u64::MAX`, or an unknown block size).
    pub fn lba(&self, offset: u64) -> Option<u64> {
        if offset == u64::MAX || self.block_size == 0 {
            return None;
        }
        self.first_lba.checked_add(offset / self.block_size as u64)
    }
}

/// What a trace region describes: written by the node at creation (its volume slots also
/// while it runs), read by every reader.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceDirectory {
    pub node_id: String,
    pub tsc_hz: u64,
    /// A TSC reading and the unix time in ns read together at start: a stamp `t` happened at
    /// `epoch_unix_ns + (t - epoch_ticks) * 1e9 / tsc_hz`.
    pub epoch_ticks: u64,
    pub epoch_unix_ns: u64,
    pub writer_pid: u32,
    pub start_unix_ns: u64,
    pub cores: Vec<u32>,
    pub capacity: u32,
    /// By volume slot, unused slots included (with an empty name): see
    /// [`TraceDirectory::volume_name`] and [`TraceDirectory::live_volumes`].
    pub volumes: Vec<String>,
    /// By volume slot, as [`TraceSpec::geometry`] (unknown for an unused slot).
    pub geometry: Vec<VolumeGeometry>,
    pub layers: Vec<String>,
}

impl TraceDirectory {
    /// The name of the volume in slot `index`: `None` for an unused slot or one the region
    /// does not have.
    pub fn volume_name(&self, index: usize) -> Option<&str> {
        self.volumes
            .get(index)
            .map(String::as_str)
            .filter(|name| !name.is_empty())
    }

    /// The slots that hold a volume: (slot index, name).
    pub fn live_volumes(&self) -> impl Iterator<Item = (usize, &str)> + '_ {
        self.volumes
            .iter()
            .enumerate()
            .filter(|(_, name)| !name.is_empty())
            .map(|(index, name)| (index, name.as_str()))
    }

    /// The device LBA a record's IO started at: `None` when its offset was not kept or its
    /// volume's geometry is not known.
    pub fn lba(&self, record: &TraceRecord) -> Option<u64> {
        self.geometry
            .get(record.volume as usize)?
            .lba(record.offset)
    }

    /// The unix time in ns of TSC stamp `ticks` (stamps before the epoch saturate).
    pub fn unix_ns(&self, ticks: u64) -> u64 {
        let delta = ticks.saturating_sub(self.epoch_ticks) as u128;
        self.epoch_unix_ns + (delta * 1_000_000_000 / self.tsc_hz.max(1) as u128) as u64
    }

    /// `ticks` as nanoseconds.
    pub fn ns(&self, ticks: u64) -> u64 {
        (ticks as u128 * 1_000_000_000 / self.tsc_hz.max(1) as u128) as u64
    }
}

/// Where each part of a region lives, recomputed from its counts by writer and reader alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Offsets {
    rings: usize,
    volumes: usize,
    layers: usize,
    records: usize,
    total: usize,
}

impl Offsets {
    fn compute(rings: usize, capacity: usize, volumes: usize, layers: usize) -> Option<Offsets> {
        let rings_at = HEADER_BYTES;
        let volumes_at = rings_at.checked_add(rings.checked_mul(RING_HEADER_BYTES)?)?;
        let layers_at = volumes_at.checked_add(volumes.checked_mul(VOLUME_ENTRY_BYTES)?)?;
        let names_end = layers_at.checked_add(layers.checked_mul(LAYER_NAME_BYTES)?)?;
        let records_at = names_end.checked_next_multiple_of(4096)?;
        let records = rings.checked_mul(capacity)?.checked_mul(RECORD_BYTES)?;
        Some(Offsets {
            rings: rings_at,
            volumes: volumes_at,
            layers: layers_at,
            records: records_at,
            total: records_at.checked_add(records)?,
        })
    }
}

/// The node's side of a trace region: creates it and hands out one writer per ring.
pub struct TraceRegion {
    map: Arc<Mapping>,
    offsets: Offsets,
    rings: usize,
    capacity: u32,
    /// Volume slots.
    slots: usize,
    /// Held while a slot changes: one writer of the slots and the directory generation.
    slot_lock: Mutex<()>,
    path: PathBuf,
}

/// A volume slot's entry words (after its generation).
fn encode_volume(name: &str, geometry: VolumeGeometry) -> [u64; VOLUME_ENTRY_WORDS] {
    let mut bytes = [0u8; VOLUME_ENTRY_WORDS * 8];
    put_name(&mut bytes[..VOLUME_NAME_BYTES], name);
    bytes[48..56].copy_from_slice(&geometry.first_lba.to_le_bytes());
    bytes[56..60].copy_from_slice(&geometry.block_size.to_le_bytes());
    let mut words = [0u64; VOLUME_ENTRY_WORDS];
    for (word, value) in words.iter_mut().zip(words_of(&bytes)) {
        *word = value;
    }
    words
}

/// The name and geometry a slot of `generation` holds in `words` (an odd generation: a slot
/// caught while the node rewrote it, taken as unused).
fn decode_volume(generation: u64, words: &[u64; VOLUME_ENTRY_WORDS]) -> (String, VolumeGeometry) {
    if generation & 1 == 1 {
        return (String::new(), VolumeGeometry::default());
    }
    let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
    (
        name_at(&bytes[..VOLUME_NAME_BYTES]),
        VolumeGeometry {
            first_lba: u64_at(&bytes, 48),
            block_size: u32_at(&bytes, 56),
        },
    )
}

/// Reads `count` volume slots at `at` under their seqlocks; false with them when a slot was
/// being rewritten at every attempt (it is then given as unused, and should be read again).
fn read_volume_slots(
    map: &Mapping,
    at: usize,
    count: usize,
) -> (Vec<String>, Vec<VolumeGeometry>, bool) {
    let mut stable = true;
    let (names, geometry) = (0..count)
        .map(|index| {
            let mut words = [0u64; VOLUME_ENTRY_WORDS];
            match map.read_slot(at + index * VOLUME_ENTRY_BYTES, &mut words) {
                Ok(generation) => decode_volume(generation, &words),
                Err(_) => {
                    stable = false;
                    (String::new(), VolumeGeometry::default())
                }
            }
        })
        .unzip();
    (names, geometry, stable)
}

impl TraceRegion {
    /// Creates the region at `path`, replacing an old one atomically (a reader that follows
    /// the path sees the new start time and starts over).
    pub fn create(path: &Path, spec: &TraceSpec, clock: &Clock) -> Result<Self, RingError> {
        let range = |what, value: u64, hint| RingError::OutOfRange { what, value, hint };
        if !spec.capacity.is_power_of_two() || spec.capacity > MAX_CAPACITY {
            return Err(range(
                "ring size",
                spec.capacity as u64,
                "records per ring must be a power of two, at most 1048576",
            ));
        }
        if spec.cores.is_empty() || spec.cores.len() > MAX_RINGS as usize {
            return Err(range(
                "rings",
                spec.cores.len() as u64,
                "one ring per core, 1 to 1024",
            ));
        }
        let slots = spec.volumes.len().saturating_add(spec.spare_volumes);
        if slots > MAX_VOLUMES as usize || spec.layers.len() > MAX_LAYER_NAMES as usize {
            return Err(range(
                "volume slots or layer names",
                slots.max(spec.layers.len()) as u64,
                "at most 65536 volumes (spares included) and 255 layer names",
            ));
        }
        let offsets = Offsets::compute(
            spec.cores.len(),
            spec.capacity as usize,
            slots,
            spec.layers.len(),
        )
        .ok_or_else(|| {
            range(
                "region size",
                u64::MAX,
                "fewer rings or a smaller ring size",
            )
        })?;
        let io = |what, source| RingError::Io {
            what,
            path: path.into(),
            source,
        };
        let (temporary, map) =
            create_temporary(path, offsets.total).map_err(|(what, e)| io(what, e))?;
        let mut header = vec![0u8; HEADER_BYTES];
        let put = |header: &mut [u8], at: usize, bytes: &[u8]| {
            header[at..at + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut header, field::MAGIC, &MAGIC);
        put(&mut header, field::VERSION, &VERSION.to_le_bytes());
        put(
            &mut header,
            field::HEADER_BYTES,
            &(HEADER_BYTES as u32).to_le_bytes(),
        );
        put(
            &mut header,
            field::TOTAL_BYTES,
            &(offsets.total as u64).to_le_bytes(),
        );
        put(
            &mut header,
            field::RECORD_BYTES,
            &(RECORD_BYTES as u32).to_le_bytes(),
        );
        put(
            &mut header,
            field::RINGS,
            &(spec.cores.len() as u32).to_le_bytes(),
        );
        put(&mut header, field::CAPACITY, &spec.capacity.to_le_bytes());
        put(&mut header, field::VOLUMES, &(slots as u32).to_le_bytes());
        put(
            &mut header,
            field::LAYERS,
            &(spec.layers.len() as u32).to_le_bytes(),
        );
        put(
            &mut header,
            field::WRITER_PID,
            &std::process::id().to_le_bytes(),
        );
        put(&mut header, field::TSC_HZ, &clock.hz().to_le_bytes());
        let (ticks, now) = (clock.now(), unix_ns());
        put(&mut header, field::EPOCH_TICKS, &ticks.to_le_bytes());
        put(&mut header, field::EPOCH_UNIX_NS, &now.to_le_bytes());
        put(&mut header, field::START_UNIX_NS, &now.to_le_bytes());
        put_name(
            &mut header[field::NODE_ID..field::NODE_ID + 64],
            &spec.node_id,
        );
        for (index, offset) in [
            offsets.rings,
            offsets.volumes,
            offsets.layers,
            offsets.records,
        ]
        .into_iter()
        .enumerate()
        {
            put(
                &mut header,
                field::OFFSETS + 8 * index,
                &(offset as u64).to_le_bytes(),
            );
        }
        map.write(0, &header);
        for (index, &core) in spec.cores.iter().enumerate() {
            map.write(
                offsets.rings + index * RING_HEADER_BYTES,
                &core.to_le_bytes(),
            );
        }
        // Spare slots stay zero: unused, generation 0.
        for (index, name) in spec.volumes.iter().enumerate() {
            let generation = if name.is_empty() { 0 } else { FIRST_GENERATION };
            let geometry = spec.geometry.get(index).copied().unwrap_or_default();
            let slot: Vec<u8> = std::iter::once(generation)
                .chain(encode_volume(name, geometry))
                .flat_map(|word| word.to_le_bytes())
                .collect();
            map.write(offsets.volumes + index * VOLUME_ENTRY_BYTES, &slot);
        }
        for (index, name) in spec.layers.iter().enumerate() {
            let mut entry = [0u8; LAYER_NAME_BYTES];
            put_name(&mut entry, name);
            map.write(offsets.layers + index * LAYER_NAME_BYTES, &entry);
        }
        publish(&temporary, path).map_err(|(what, e)| io(what, e))?;
        Ok(TraceRegion {
            map: Arc::new(map),
            offsets,
            rings: spec.cores.len(),
            capacity: spec.capacity,
            slots,
            slot_lock: Mutex::new(()),
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many volume slots the region has (used or not).
    pub fn volume_capacity(&self) -> usize {
        self.slots
    }

    /// Names the volume in slot `index` and where it lies (`None`: marks the slot unused).
    /// Readers never see a half-written entry and notice the change at their next
    /// [`TraceReader::refresh`].
    pub fn set_volume(
        &self,
        index: usize,
        volume: Option<(&str, VolumeGeometry)>,
    ) -> Result<(), SlotError> {
        if index >= self.slots {
            return Err(SlotError::OutOfRange {
                index,
                capacity: self.slots,
            });
        }
        let content = match volume {
            Some((name, geometry)) => {
                check_slot_name(name, VOLUME_NAME_BYTES)?;
                encode_volume(name, geometry)
            }
            None => [0; VOLUME_ENTRY_WORDS],
        };
        self.map.publish_slot(
            &self.slot_lock,
            self.offsets.volumes + index * VOLUME_ENTRY_BYTES,
            &content,
            field::DIRECTORY_GENERATION,
            || {},
        );
        Ok(())
    }

    /// The writer of ring `ring`. Exactly one thread (that core's reactor) may write through
    /// it.
    ///
    /// # Panics
    /// If the region has no such ring.
    pub fn writer(&self, ring: usize) -> RingWriter {
        assert!(ring < self.rings, "ring {ring} of {}", self.rings);
        let head = self.offsets.rings + ring * RING_HEADER_BYTES + 8;
        let records = self.offsets.records + ring * self.capacity as usize * RECORD_BYTES;
        RingWriter {
            head: self.map.word(head).load(Ordering::Relaxed),
            head_at: head,
            records,
            mask: self.capacity as u64 - 1,
            map: self.map.clone(),
        }
    }
}

/// The single writer of one ring.
pub struct RingWriter {
    /// Records written so far (the ring's head, kept here so writing reads nothing shared).
    head: u64,
    head_at: usize,
    records: usize,
    mask: u64,
    map: Arc<Mapping>,
}

impl RingWriter {
    /// Appends `record`, overwriting the oldest when the ring is full. No lock, no syscall:
    /// 32 plain stores and the head's.
    #[inline]
    pub fn push(&mut self, record: &TraceRecord) {
        let n = self.head;
        let at = self.records + ((n & self.mask) as usize) * RECORD_BYTES;
        let sequence = self.map.word(at);
        sequence.store(2 * n + 1, Ordering::Relaxed);
        // The odd sequence is visible before any content word changes.
        fence(Ordering::Release);
        for (index, word) in record.encode().into_iter().enumerate() {
            self.map
                .word(at + 8 * (index + 1))
                .store(word, Ordering::Relaxed);
        }
        sequence.store(2 * n + 2, Ordering::Release);
        self.head = n + 1;
        self.map.word(self.head_at).store(n + 1, Ordering::Release);
    }

    /// Records written to this ring so far.
    pub fn written(&self) -> u64 {
        self.head
    }
}

/// Where a new reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the oldest record each ring still holds.
    Oldest,
    /// With the records written after it opened.
    Now,
}

/// What one [`TraceReader::poll`] found.
#[derive(Debug, Default)]
pub struct TraceBatch {
    /// (ring, record), ring after ring, each ring's in the order written.
    pub records: Vec<(usize, TraceRecord)>,
    /// Records the reader will never see: overwritten before it came, or while it read them.
    pub lost: u64,
    /// Records whose content could not be a record (a damaged region); not shown.
    pub damaged: u64,
}

/// A reader's handle on a trace region.
pub struct TraceReader {
    map: Mapping,
    offsets: Offsets,
    directory: TraceDirectory,
    /// The header's directory generation the volume slots were last read at; `None` when
    /// a slot was being rewritten then, so that the next refresh reads them again.
    volumes_read_at: Option<u64>,
    /// The next record number each ring's reader wants.
    next: Vec<u64>,
    path: PathBuf,
}

impl TraceReader {
    /// Opens and checks the region at `path` (untrusted: every count and offset is checked
    /// against the file before anything is read).
    pub fn open(path: &Path, start: Start) -> Result<Self, RingError> {
        let io = |what, source| RingError::Io {
            what,
            path: path.into(),
            source,
        };
        let file = std::fs::File::open(path).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("inspect", e))?.len() as usize;
        if len < HEADER_BYTES {
            return Err(corrupt(
                path,
                format!("{len} bytes, shorter than its {HEADER_BYTES}-byte header"),
            ));
        }
        let map = map_file(&file, len, false).map_err(|e| io("map", e))?;
        // The header is copied up to its one word that changes, the directory generation
        // (read atomically below); nothing follows it.
        let mut header = map.copy(0, field::DIRECTORY_GENERATION);
        header.resize(HEADER_BYTES, 0);
        let generation = map
            .word(field::DIRECTORY_GENERATION)
            .load(Ordering::Acquire);
        let mut stable = true;
        let (offsets, directory) = parse(
            path,
            &header,
            len,
            |offset, len| map.copy(offset, len),
            |at, count| {
                let (names, geometry, all) = read_volume_slots(&map, at, count);
                stable = all;
                (names, geometry)
            },
        )?;
        let mut reader = TraceReader {
            next: vec![0; directory.cores.len()],
            map,
            offsets,
            directory,
            volumes_read_at: stable.then_some(generation),
            path: path.into(),
        };
        if start == Start::Now {
            for ring in 0..reader.next.len() {
                reader.next[ring] = reader.head(ring);
            }
        }
        Ok(reader)
    }

    /// What the region described at the last [`TraceReader::refresh`] (or at open).
    pub fn directory(&self) -> &TraceDirectory {
        &self.directory
    }

    /// Reads the volume slots (names and geometry) again if the node changed any since they
    /// were last read (one load when it did not); true if the directory changed.
    pub fn refresh(&mut self) -> bool {
        let generation = self
            .map
            .word(field::DIRECTORY_GENERATION)
            .load(Ordering::Acquire);
        if self.volumes_read_at == Some(generation) {
            return false;
        }
        let (names, geometry, stable) = read_volume_slots(
            &self.map,
            self.offsets.volumes,
            self.directory.volumes.len(),
        );
        self.volumes_read_at = stable.then_some(generation);
        let changed = names != self.directory.volumes || geometry != self.directory.geometry;
        self.directory.volumes = names;
        self.directory.geometry = geometry;
        changed
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn head(&self, ring: usize) -> u64 {
        self.map
            .word(self.offsets.rings + ring * RING_HEADER_BYTES + 8)
            .load(Ordering::Acquire)
    }

    /// Whether the file at this reader's path is no longer the region it reads: gone, or
    /// another writer's (a restarted node publishes a new region under the same name; its
    /// header names another writer pid or start time, even when the file system gave it
    /// the old file's inode number).
    pub fn replaced(&self) -> bool {
        let mut header = [0u8; field::NODE_ID];
        let read = std::fs::File::open(&self.path)
            .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut header));
        read.is_err()
            || header[..8] != MAGIC
            || u32_at(&header, field::WRITER_PID) != self.directory.writer_pid
            || u64_at(&header, field::START_UNIX_NS) != self.directory.start_unix_ns
    }

    /// Records written to each ring so far.
    pub fn heads(&self) -> Vec<u64> {
        (0..self.next.len()).map(|ring| self.head(ring)).collect()
    }

    /// Everything written since the last poll (or the start), and how much of it was lost.
    pub fn poll(&mut self) -> TraceBatch {
        let mut batch = TraceBatch::default();
        let capacity = self.directory.capacity as u64;
        for ring in 0..self.next.len() {
            let head = self.head(ring);
            let mut next = self.next[ring];
            if head < next {
                // A head that went backwards is not this writer's: start over from it.
                next = head;
            }
            if head - next > capacity {
                batch.lost += head - capacity - next;
                next = head - capacity;
            }
            let records = self.offsets.records + ring * capacity as usize * RECORD_BYTES;
            for n in next..head {
                let at = records + ((n % capacity) as usize) * RECORD_BYTES;
                let sequence = self.map.word(at);
                let before = sequence.load(Ordering::Acquire);
                let mut words = [0u64; RECORD_WORDS - 1];
                for (index, word) in words.iter_mut().enumerate() {
                    *word = self.map.word(at + 8 * (index + 1)).load(Ordering::Relaxed);
                }
                // The content loads complete before the sequence is read again.
                fence(Ordering::Acquire);
                let after = sequence.load(Ordering::Relaxed);
                if before != 2 * n + 2 || after != before {
                    batch.lost += 1;
                    continue;
                }
                match TraceRecord::decode(&words, self.directory.layers.len()) {
                    Some(record) => batch.records.push((ring, record)),
                    None => batch.damaged += 1,
                }
            }
            self.next[ring] = head;
        }
        batch
    }
}

fn corrupt(path: &Path, what: String) -> RingError {
    RingError::Corrupt {
        path: path.into(),
        what,
    }
}

/// Checks a region's header against the file's length and reads its directory through `read`
/// (offset, length), its volume slots through `read_volumes` (offset, count). Every count is
/// bounded before anything is allocated.
fn parse(
    path: &Path,
    header: &[u8],
    file_len: usize,
    read: impl Fn(usize, usize) -> Vec<u8>,
    read_volumes: impl FnOnce(usize, usize) -> (Vec<String>, Vec<VolumeGeometry>),
) -> Result<(Offsets, TraceDirectory), RingError> {
    if header[..8] != MAGIC {
        return Err(RingError::BadMagic {
            path: path.into(),
            found: String::from_utf8_lossy(&header[..8]).into_owned(),
        });
    }
    let version = u32_at(header, field::VERSION);
    if version != VERSION {
        return Err(RingError::UnsupportedVersion {
            path: path.into(),
            found: version,
        });
    }
    let check = |ok: bool, what: String| if ok { Ok(()) } else { Err(corrupt(path, what)) };
    let header_bytes = u32_at(header, field::HEADER_BYTES) as usize;
    check(
        header_bytes == HEADER_BYTES,
        format!("header of {header_bytes} bytes, expected {HEADER_BYTES}"),
    )?;
    let record_bytes = u32_at(header, field::RECORD_BYTES) as usize;
    check(
        record_bytes == RECORD_BYTES,
        format!("records of {record_bytes} bytes, expected {RECORD_BYTES}"),
    )?;
    let rings = u32_at(header, field::RINGS);
    check(
        (1..=MAX_RINGS).contains(&rings),
        format!("{rings} rings (1 to {MAX_RINGS})"),
    )?;
    let capacity = u32_at(header, field::CAPACITY);
    check(
        capacity.is_power_of_two() && capacity <= MAX_CAPACITY,
        format!("ring size {capacity}, not a power of two up to {MAX_CAPACITY}"),
    )?;
    let volumes = u32_at(header, field::VOLUMES);
    check(
        volumes <= MAX_VOLUMES,
        format!("{volumes} volumes (at most {MAX_VOLUMES})"),
    )?;
    let layers = u32_at(header, field::LAYERS);
    check(
        layers <= MAX_LAYER_NAMES,
        format!("{layers} layer names (at most {MAX_LAYER_NAMES})"),
    )?;
    let offsets = Offsets::compute(
        rings as usize,
        capacity as usize,
        volumes as usize,
        layers as usize,
    )
    .ok_or_else(|| corrupt(path, "sizes overflow".into()))?;
    let stored: Vec<u64> = (0..4)
        .map(|index| u64_at(header, field::OFFSETS + 8 * index))
        .collect();
    let expected = [
        offsets.rings,
        offsets.volumes,
        offsets.layers,
        offsets.records,
    ]
    .map(|o| o as u64);
    check(
        stored == expected,
        format!("offsets {stored:?}, expected {expected:?} from its counts"),
    )?;
    let total = u64_at(header, field::TOTAL_BYTES);
    check(
        total == offsets.total as u64 && file_len >= offsets.total,
        format!(
            "{file_len} bytes on disk and {total} in its header, but its counts need {}",
            offsets.total
        ),
    )?;
    let tsc_hz = u64_at(header, field::TSC_HZ);
    check(tsc_hz > 0, "a clock rate of 0 Hz".into())?;
    let ring_headers = read(offsets.rings, rings as usize * RING_HEADER_BYTES);
    let cores = ring_headers
        .chunks(RING_HEADER_BYTES)
        .map(|entry| u32_at(entry, 0))
        .collect();
    let (volume_names, geometry) = read_volumes(offsets.volumes, volumes as usize);
    let layer_names = read(offsets.layers, layers as usize * LAYER_NAME_BYTES)
        .chunks(LAYER_NAME_BYTES)
        .map(name_at)
        .collect();
    Ok((
        offsets,
        TraceDirectory {
            node_id: name_at(&header[field::NODE_ID..field::NODE_ID + 64]),
            tsc_hz,
            epoch_ticks: u64_at(header, field::EPOCH_TICKS),
            epoch_unix_ns: u64_at(header, field::EPOCH_UNIX_NS),
            writer_pid: u32_at(header, field::WRITER_PID),
            start_unix_ns: u64_at(header, field::START_UNIX_NS),
            cores,
            capacity,
            volumes: volume_names,
            geometry,
            layers: layer_names,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(capacity: u32) -> TraceSpec {
        TraceSpec {
            node_id: "node-a".into(),
            cores: vec![0, 1],
            capacity,
            volumes: vec!["vol0".into(), "vol1".into()],
            geometry: vec![
                VolumeGeometry {
                    first_lba: 0,
                    block_size: 512,
                },
                VolumeGeometry {
                    first_lba: 1 << 20,
                    block_size: 4096,
                },
            ],
            layers: vec!["frontend".into(), "engine".into(), "queue".into()],
            spare_volumes: 0,
        }
    }

    fn record(n: u64) -> TraceRecord {
        let mut stamps = [0u64; stamp::COUNT];
        for (index, stamp) in stamps.iter_mut().enumerate() {
            *stamp = 1000 * n + 10 * index as u64 + 1;
        }
        TraceRecord {
            trace_id: TraceId(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c ^ n as u128),
            span_id: SpanId(0xb7ad_6b71_6920_3331 ^ n),
            parent: SpanId(0),
            volume: (n % 2) as u32,
            op: 0,
            reason: reason::TAIL,
            status: 0,
            offset: 4096 * n,
            len: 4096,
            core: 1,
            queue: 3,
            stamps,
            layer_count: 2,
            layers: [
                (1, stamps[stamp::SUBMITTED], stamps[stamp::SUBMITTED] + 3),
                (2, stamps[stamp::SUBMITTED] + 3, stamps[stamp::SEEN]),
                (0, 0, 0),
                (0, 0, 0),
                (0, 0, 0),
                (0, 0, 0),
                (0, 0, 0),
            ],
        }
    }

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_refused() {
        let value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let context = TraceContext::from_traceparent(value).unwrap();
        assert_eq!(
            context.trace_id.to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(context.parent.to_string(), "b7ad6b7169203331");
        assert!(context.sampled);
        assert_eq!(context.to_traceparent(), value);
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",
        ] {
            assert!(
                matches!(
                    TraceContext::from_traceparent(bad),
                    Err(TraceError::BadTraceparent(_))
                ),
                "{bad:?}"
            );
        }
        let zero = "00-00000000000000000000000000000000-b7ad6b7169203331-01";
        assert!(matches!(
            TraceContext::from_traceparent(zero),
            Err(TraceError::ZeroId(_))
        ));
    }

    #[test]
    fn what_the_writer_pushes_the_reader_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        let region = TraceRegion::create(&path, &spec(8), &Clock::monotonic()).unwrap();
        let mut reader = TraceReader::open(&path, Start::Oldest).unwrap();
        assert_eq!(reader.directory().volumes, ["vol0", "vol1"]);
        assert_eq!(reader.directory().geometry, spec(8).geometry);
        let io = TraceRecord {
            volume: 1,
            offset: 3 * 4096 + 100,
            ..TraceRecord::default()
        };
        assert_eq!(reader.directory().lba(&io), Some((1 << 20) + 3));
        let late = TraceRecord {
            offset: u64::MAX,
            ..io
        };
        assert_eq!(reader.directory().lba(&late), None);
        assert_eq!(reader.directory().cores, [0, 1]);
        let mut writer = region.writer(1);
        for n in 0..5 {
            writer.push(&record(n));
        }
        let batch = reader.poll();
        assert_eq!((batch.lost, batch.damaged), (0, 0));
        let got: Vec<_> = batch.records.iter().map(|(ring, r)| (*ring, *r)).collect();
        assert_eq!(got, (0..5).map(|n| (1, record(n))).collect::<Vec<_>>());
        assert!(reader.poll().records.is_empty(), "each record is read once");
    }

    #[test]
    fn a_reader_follows_volumes_set_cleared_and_replaced_while_the_node_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        let spec = TraceSpec {
            spare_volumes: 2,
            ..spec(8)
        };
        let region = TraceRegion::create(&path, &spec, &Clock::monotonic()).unwrap();
        assert_eq!(region.volume_capacity(), 4);
        let mut reader = TraceReader::open(&path, Start::Oldest).unwrap();
        let live = |reader: &TraceReader| -> Vec<(usize, String)> {
            reader
                .directory()
                .live_volumes()
                .map(|(index, name)| (index, name.to_string()))
                .collect()
        };
        assert_eq!(live(&reader), [(0, "vol0".into()), (1, "vol1".into())]);
        assert_eq!(reader.directory().volume_name(2), None);
        assert!(!reader.refresh(), "nothing changed yet");

        let geometry = VolumeGeometry {
            first_lba: 1 << 30,
            block_size: 4096,
        };
        region.set_volume(2, Some(("new", geometry))).unwrap();
        assert!(reader.refresh());
        assert!(!reader.refresh(), "a change is seen once");
        assert_eq!(
            live(&reader),
            [(0, "vol0".into()), (1, "vol1".into()), (2, "new".into())]
        );
        // A record of the new volume is read back and placed on its device.
        let mut writer = region.writer(0);
        let io = TraceRecord {
            volume: 2,
            offset: 5 * 4096,
            ..record(1)
        };
        writer.push(&io);
        let batch = reader.poll();
        assert_eq!(batch.records, [(0, io)]);
        let directory = reader.directory();
        assert_eq!(directory.volume_name(io.volume as usize), Some("new"));
        assert_eq!(directory.lba(&io), Some((1 << 30) + 5));

        region.set_volume(2, None).unwrap();
        assert!(reader.refresh());
        assert_eq!(live(&reader), [(0, "vol0".into()), (1, "vol1".into())]);
        assert_eq!(reader.directory().volume_name(2), None);
        assert_eq!(
            reader.directory().lba(&io),
            None,
            "an unused slot has no geometry"
        );

        let other = VolumeGeometry {
            first_lba: 7,
            block_size: 512,
        };
        region.set_volume(2, Some(("again", other))).unwrap();
        assert!(reader.refresh());
        assert_eq!(reader.directory().volume_name(2), Some("again"));
        assert_eq!(reader.directory().geometry[2], other);

        assert_eq!(
            region.set_volume(4, Some(("x", other))),
            Err(SlotError::OutOfRange {
                index: 4,
                capacity: 4
            })
        );
        assert!(matches!(
            region.set_volume(3, Some((&"x".repeat(49), other))),
            Err(SlotError::NameTooLong { max_bytes: 48, .. })
        ));
        assert_eq!(
            region.set_volume(3, Some(("", other))),
            Err(SlotError::EmptyName)
        );
        assert!(!reader.refresh(), "a refused change changes nothing");
    }

    #[test]
    fn a_reader_slower_than_the_writer_counts_exactly_what_it_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        let region = TraceRegion::create(&path, &spec(8), &Clock::monotonic()).unwrap();
        let mut reader = TraceReader::open(&path, Start::Oldest).unwrap();
        let mut writer = region.writer(0);
        for n in 0..21 {
            writer.push(&record(n));
        }
        let batch = reader.poll();
        assert_eq!(batch.lost, 13, "21 written into 8 slots");
        let numbers: Vec<u64> = batch.records.iter().map(|(_, r)| r.offset / 4096).collect();
        assert_eq!(
            numbers,
            (13..21).collect::<Vec<_>>(),
            "the newest 8, oldest first"
        );
    }

    #[test]
    fn a_reader_racing_a_writer_never_shows_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        let region = TraceRegion::create(&path, &spec(4), &Clock::monotonic()).unwrap();
        let mut writer = region.writer(0);
        let total = 200_000u64;
        let thread = std::thread::spawn(move || {
            for n in 0..total {
                writer.push(&record(n));
            }
        });
        let mut reader = TraceReader::open(&path, Start::Oldest).unwrap();
        let (mut seen, mut lost) = (0u64, 0u64);
        loop {
            let done = thread.is_finished();
            let batch = reader.poll();
            lost += batch.lost;
            assert_eq!(batch.damaged, 0);
            for (_, got) in &batch.records {
                // Every field is derived from one n: a mix of two records would not match.
                assert_eq!(*got, record(got.offset / 4096), "torn record");
                seen += 1;
            }
            if done && reader.heads()[0] == total {
                let last = reader.poll();
                seen += last.records.len() as u64;
                lost += last.lost;
                break;
            }
        }
        thread.join().unwrap();
        assert_eq!(
            seen + lost,
            total,
            "every record is either shown or counted lost"
        );
    }

    #[test]
    fn spans_form_one_tree_rooted_at_the_front_end() {
        let names: Vec<String> = spec(8).layers;
        let record = record(3);
        let spans = record.spans(&names);
        assert_eq!(spans[0].name, "frontend");
        assert_eq!(spans[0].parent, SpanId(0));
        let children = &spans[1..];
        assert!(children.iter().all(|span| span.parent == record.span_id));
        let mut ids: Vec<u64> = spans.iter().map(|span| span.span_id.0).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), spans.len(), "span ids are unique");
        let names: Vec<&str> = children.iter().map(|span| span.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "queue",
                "submit",
                "layer:engine",
                "layer:queue",
                "device",
                "complete",
                "reply"
            ]
        );
        assert!(children
            .iter()
            .all(|s| s.begin >= spans[0].begin && s.end <= spans[0].end));
    }

    #[test]
    fn a_corrupt_or_truncated_region_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace");
        drop(TraceRegion::create(&path, &spec(8), &Clock::monotonic()).unwrap());
        let good = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut");
        std::fs::write(&cut, &good[..good.len() - 100]).unwrap();
        let error = TraceReader::open(&cut, Start::Oldest)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("damaged") && error.contains("bytes on disk"),
            "{error}"
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        std::fs::write(&cut, &bad).unwrap();
        let error = TraceReader::open(&cut, Start::Oldest)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("not a fathom trace region"), "{error}");
        let mut bad = good;
        bad[field::VERSION] = 9;
        std::fs::write(&cut, &bad).unwrap();
        let error = TraceReader::open(&cut, Start::Oldest)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("version 9"), "{error}");
    }

    proptest! {
        #[test]
        fn any_image_is_read_or_refused(
            edits in proptest::collection::vec((0usize..12288, any::<u8>()), 0..24),
            cut in 0usize..8192,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("trace");
            let region = TraceRegion::create(&path, &spec(8), &Clock::monotonic()).unwrap();
            let mut writer = region.writer(0);
            for n in 0..10 {
                writer.push(&record(n));
            }
            let mut image = std::fs::read(&path).unwrap();
            for (at, byte) in edits {
                let at = at % image.len();
                image[at] = byte;
            }
            image.truncate(image.len().saturating_sub(cut));
            let damaged = dir.path().join("damaged");
            std::fs::write(&damaged, &image).unwrap();
            if let Ok(mut reader) = TraceReader::open(&damaged, Start::Oldest) {
                let batch = reader.poll();
                prop_assert!(batch.records.len() as u64 <= reader.directory().capacity as u64 * 2);
                for (_, record) in batch.records {
                    let _ = record.spans(&reader.directory().layers);
                }
            }
        }
    }
}
