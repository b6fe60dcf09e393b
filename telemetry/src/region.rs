//! The shared-memory stats region: written by the node, read live by `fathom-stat` and the
//! metrics endpoint.
//!
//! Layout (all little-endian, offsets in bytes; the header's offsets are recomputed from its
//! counts and checked by readers):
//!
//! ```text
//! 0      header (4096 bytes): magic "FATHOMST", layout version, sizes, TSC Hz, clock source,
//!        writer pid, start time, heartbeat (count, ticks, unix ns), state, node id,
//!        histogram parameters, directory counts and offsets, directory generation
//! ...    directory: cores (u32 each), volume slots (72 bytes: generation, name, core index,
//!        block size, size), ops (16-byte names), stages (16-byte names), queues (64 bytes:
//!        device, core index)
//! ...    histograms, one per (volume slot, op, stage): the log-linear counters of
//!        [`crate::hdr::Layout`] (count, mean and max are derived from them, as HdrHistogram
//!        does, so recording is one increment)
//! ...    volume counters, per (volume slot, op): IOs, bytes, errors
//! ...    queue counters, per queue: busy ticks, busy-since ticks (0 when idle), submitted,
//!        completed
//! ```
//!
//! Every counter has one writer (the reactor that owns the volume or queue) and only grows;
//! the writer updates it with a relaxed load and store (no locked instruction) and readers use
//! relaxed loads, so a reader never blocks or slows a writer. A reader takes deltas between
//! two snapshots. The region is created under a temporary name and renamed into place when
//! complete, so a reader never sees a half-written header; a node that restarts replaces the
//! file, and a reader notices the new start time.
//!
//! **Volume slots.** The region has room for a fixed number of volumes, set at creation (the
//! volumes the node starts with and spare slots). The node fills, changes and clears a slot
//! while it runs ([`StatsRegion::set_volume`]); an unused slot has an empty name. Each slot
//! starts with a generation word that is a seqlock: odd while the node rewrites the slot
//! (and zeroes its counters, when a volume moves in), the next even value once it is done,
//! so a reader never takes a half-written entry. Every change also bumps the header's
//! directory generation, so a reader notices one with a single load
//! ([`RegionReader::refresh`]); a snapshot carries each slot's generation, so a reader that
//! takes deltas can tell a slot that now holds another volume from one that kept its own.

use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock::{Clock, ClockSource};
use crate::hdr::Layout;
use crate::shm::{
    check_slot_name, create_temporary, map_file, name_at, publish, put_name, u32_at, u64_at,
    unix_ns, words_of, Mapping, SlotError,
};

pub const MAGIC: [u8; 8] = *b"FATHOMST";
pub const VERSION: u32 = 2;
pub const HEADER_BYTES: usize = 4096;
const NAME_BYTES: usize = 48;
/// A volume slot: its generation (u64 at 0), then its entry: name (48 bytes at 8), core
/// index (u32 at 56), block size (u32 at 60), size in bytes (u64 at 64).
const VOLUME_ENTRY_BYTES: usize = 72;
/// The words of a slot's entry, after its generation.
const VOLUME_ENTRY_WORDS: usize = 8;
/// The generation of the volumes a region is created with (an unused slot starts at 0).
const FIRST_GENERATION: u64 = 2;
/// How many times a snapshot tries to read a slot the node is rewriting before it reports
/// the slot empty (the next snapshot sees the slot's new generation).
const SNAPSHOT_ATTEMPTS: u32 = 16;
const QUEUE_ENTRY_BYTES: usize = 64;
const LABEL_BYTES: usize = 16;
/// Words before a histogram's counters (none: recording is a single increment).
const HIST_HEADER_WORDS: usize = 0;
const VOLUME_COUNTER_WORDS: usize = 3;
const QUEUE_COUNTER_WORDS: usize = 4;
/// Histogram precision: 2 significant figures (1% resolution), up to a minute.
pub const SIGNIFICANT_FIGURES: u8 = 2;
pub const HIGHEST_SECONDS: u64 = 60;
/// Limits a reader accepts, so a corrupt header cannot make it allocate without bound.
const MAX_ENTRIES: u32 = 65536;
const MAX_LABELS: u32 = 64;

/// Header field offsets.
mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_BYTES: usize = 12;
    pub const TOTAL_BYTES: usize = 16;
    pub const TSC_HZ: usize = 24;
    pub const CLOCK_SOURCE: usize = 32;
    pub const WRITER_PID: usize = 36;
    pub const START_UNIX_NS: usize = 40;
    pub const HEARTBEAT: usize = 48;
    pub const HEARTBEAT_TICKS: usize = 56;
    pub const HEARTBEAT_UNIX_NS: usize = 64;
    pub const STATE: usize = 72;
    pub const NODE_ID: usize = 80; // 64 bytes
    pub const HIST_HIGHEST: usize = 144;
    pub const HIST_FIGURES: usize = 152;
    pub const HIST_COUNTS_LEN: usize = 156;
    pub const CORES: usize = 160;
    pub const VOLUMES: usize = 164;
    pub const OPS: usize = 168;
    pub const STAGES: usize = 172;
    pub const QUEUES: usize = 176;
    pub const OFFSETS: usize = 184; // 8 x u64
    /// Bumped after every change of a volume slot.
    pub const DIRECTORY_GENERATION: usize = 248;
}

/// The node's state as the region reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterState {
    Starting = 0,
    Running = 1,
    Stopped = 2,
}

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("could not {what} stats region {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a fathom stats region (magic {found:?}, expected \"FATHOMST\"); check the path (default /dev/shm/fathom-<node-id>)")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path} has stats layout version {found}; this fathom-stat reads version {VERSION}: use the fathom-stat that ships with the running node")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path} is damaged: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("stats region {what}: {value} is too large")]
    TooLarge { what: &'static str, value: usize },
}

/// What a region describes: written by the node at creation (its volume slots also while it
/// runs), read by every reader.
#[derive(Debug, Clone, PartialEq)]
pub struct Directory {
    pub node_id: String,
    pub tsc_hz: u64,
    pub clock_source: ClockSource,
    pub writer_pid: u32,
    pub start_unix_ns: u64,
    pub cores: Vec<u32>,
    /// By slot, unused slots included (with an empty name): iterate with
    /// [`Directory::live_volumes`].
    pub volumes: Vec<VolumeEntry>,
    pub ops: Vec<String>,
    pub stages: Vec<String>,
    pub queues: Vec<QueueEntry>,
    pub histogram: Layout,
}

impl Directory {
    /// The slots that hold a volume: (slot index, entry).
    pub fn live_volumes(&self) -> impl Iterator<Item = (usize, &VolumeEntry)> + '_ {
        self.volumes
            .iter()
            .enumerate()
            .filter(|(_, volume)| volume.is_live())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeEntry {
    /// Empty for an unused slot.
    pub name: String,
    /// Index into [`Directory::cores`].
    pub core_index: u32,
    pub block_size: u32,
    pub size_bytes: u64,
    /// The slot's generation when this entry was read: it changes whenever the slot is set
    /// or cleared. The region assigns it; what a writer passes in is ignored.
    pub generation: u64,
}

impl VolumeEntry {
    /// Whether the slot holds a volume.
    pub fn is_live(&self) -> bool {
        !self.name.is_empty()
    }

    fn unused(generation: u64) -> Self {
        VolumeEntry {
            name: String::new(),
            core_index: 0,
            block_size: 0,
            size_bytes: 0,
            generation,
        }
    }

    /// The entry's words in its slot, after the generation.
    fn encode(&self) -> [u64; VOLUME_ENTRY_WORDS] {
        let mut bytes = [0u8; VOLUME_ENTRY_WORDS * 8];
        put_name(&mut bytes[..NAME_BYTES], &self.name);
        bytes[48..52].copy_from_slice(&self.core_index.to_le_bytes());
        bytes[52..56].copy_from_slice(&self.block_size.to_le_bytes());
        bytes[56..64].copy_from_slice(&self.size_bytes.to_le_bytes());
        let mut words = [0u64; VOLUME_ENTRY_WORDS];
        for (word, value) in words.iter_mut().zip(words_of(&bytes)) {
            *word = value;
        }
        words
    }

    /// The entry a slot of `generation` holds in `words` (an odd generation: a slot caught
    /// while the node rewrote it, taken as unused).
    fn decode(generation: u64, words: &[u64; VOLUME_ENTRY_WORDS]) -> Self {
        if generation & 1 == 1 {
            return VolumeEntry::unused(generation);
        }
        let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
        VolumeEntry {
            name: name_at(&bytes[..NAME_BYTES]),
            core_index: u32_at(&bytes, 48),
            block_size: u32_at(&bytes, 52),
            size_bytes: u64_at(&bytes, 56),
            generation,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub device: String,
    pub core_index: u32,
}

/// Offsets of the region's parts, computed from the directory's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Offsets {
    cores: usize,
    volumes: usize,
    ops: usize,
    stages: usize,
    queues: usize,
    histograms: usize,
    volume_counters: usize,
    queue_counters: usize,
    total: usize,
}

impl Offsets {
    fn compute(
        cores: usize,
        volumes: usize,
        ops: usize,
        stages: usize,
        queues: usize,
        counts_len: usize,
    ) -> Option<Self> {
        let align = |offset: usize| offset.checked_add(63).map(|end| end & !63);
        let cores_at = HEADER_BYTES;
        let volumes_at = align(cores_at.checked_add(cores.checked_mul(4)?)?)?;
        let ops_at = align(volumes_at.checked_add(volumes.checked_mul(VOLUME_ENTRY_BYTES)?)?)?;
        let stages_at = align(ops_at.checked_add(ops.checked_mul(LABEL_BYTES)?)?)?;
        let queues_at = align(stages_at.checked_add(stages.checked_mul(LABEL_BYTES)?)?)?;
        let histograms_at = align(queues_at.checked_add(queues.checked_mul(QUEUE_ENTRY_BYTES)?)?)?;
        let histogram_bytes = (HIST_HEADER_WORDS + counts_len).checked_mul(8)?;
        let histograms = volumes.checked_mul(ops)?.checked_mul(stages)?;
        let volume_counters_at =
            align(histograms_at.checked_add(histograms.checked_mul(histogram_bytes)?)?)?;
        let queue_counters_at = align(
            volume_counters_at.checked_add(
                volumes
                    .checked_mul(ops)?
                    .checked_mul(VOLUME_COUNTER_WORDS * 8)?,
            )?,
        )?;
        let total =
            align(queue_counters_at.checked_add(queues.checked_mul(QUEUE_COUNTER_WORDS * 8)?)?)?;
        Some(Self {
            cores: cores_at,
            volumes: volumes_at,
            ops: ops_at,
            stages: stages_at,
            queues: queues_at,
            histograms: histograms_at,
            volume_counters: volume_counters_at,
            queue_counters: queue_counters_at,
            total,
        })
    }

    fn as_array(&self) -> [u64; 8] {
        [
            self.cores as u64,
            self.volumes as u64,
            self.ops as u64,
            self.stages as u64,
            self.queues as u64,
            self.histograms as u64,
            self.volume_counters as u64,
            self.queue_counters as u64,
        ]
    }
}

/// What the node describes when it creates its region.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    pub node_id: String,
    pub cores: Vec<u32>,
    /// The volumes the node starts with, in slots 0.. (their generations are ignored).
    pub volumes: Vec<VolumeEntry>,
    /// Unused volume slots after `volumes`, for volumes created while the node runs.
    pub spare_volumes: usize,
    pub ops: Vec<String>,
    pub stages: Vec<String>,
    pub queues: Vec<QueueEntry>,
}

/// The node's side: creates the region and hands out per-owner recorders.
pub struct StatsRegion {
    map: Arc<Mapping>,
    offsets: Offsets,
    layout: Layout,
    /// Volume slots.
    slots: usize,
    cores: usize,
    ops: usize,
    stages: usize,
    /// Held while a slot changes: one writer of the slots and the directory generation.
    slot_lock: Mutex<()>,
    path: PathBuf,
}

impl StatsRegion {
    /// Creates the region at `path` (replacing an old one atomically).
    pub fn create(path: &Path, spec: &RegionSpec, clock: &Clock) -> Result<Self, RegionError> {
        let io = |what, source| RegionError::Io {
            what,
            path: path.into(),
            source,
        };
        let layout = Layout::new(
            clock.hz().saturating_mul(HIGHEST_SECONDS),
            SIGNIFICANT_FIGURES,
        )
        .expect("valid layout");
        let slots =
            spec.volumes
                .len()
                .checked_add(spec.spare_volumes)
                .ok_or(RegionError::TooLarge {
                    what: "volumes",
                    value: usize::MAX,
                })?;
        for (what, count) in [
            ("cores", spec.cores.len()),
            ("volumes", slots),
            ("queues", spec.queues.len()),
        ] {
            if count > MAX_ENTRIES as usize {
                return Err(RegionError::TooLarge { what, value: count });
            }
        }
        for (what, count) in [("ops", spec.ops.len()), ("stages", spec.stages.len())] {
            if count > MAX_LABELS as usize {
                return Err(RegionError::TooLarge { what, value: count });
            }
        }
        let offsets = Offsets::compute(
            spec.cores.len(),
            slots,
            spec.ops.len(),
            spec.stages.len(),
            spec.queues.len(),
            layout.counts_len(),
        )
        .ok_or(RegionError::TooLarge {
            what: "size",
            value: usize::MAX,
        })?;
        let (temporary, map) =
            create_temporary(path, offsets.total).map_err(|(what, e)| io(what, e))?;

        let mut header = vec![0u8; HEADER_BYTES];
        let put = |header: &mut Vec<u8>, at: usize, bytes: &[u8]| {
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
        put(&mut header, field::TSC_HZ, &clock.hz().to_le_bytes());
        let source = match clock.source() {
            ClockSource::Tsc => 0u32,
            ClockSource::Monotonic => 1,
        };
        put(&mut header, field::CLOCK_SOURCE, &source.to_le_bytes());
        put(
            &mut header,
            field::WRITER_PID,
            &std::process::id().to_le_bytes(),
        );
        put(&mut header, field::START_UNIX_NS, &unix_ns().to_le_bytes());
        put_name(
            &mut header[field::NODE_ID..field::NODE_ID + 64],
            &spec.node_id,
        );
        put(
            &mut header,
            field::HIST_HIGHEST,
            &layout.highest().to_le_bytes(),
        );
        put(
            &mut header,
            field::HIST_FIGURES,
            &(layout.significant_figures() as u32).to_le_bytes(),
        );
        put(
            &mut header,
            field::HIST_COUNTS_LEN,
            &(layout.counts_len() as u32).to_le_bytes(),
        );
        for (at, count) in [
            (field::CORES, spec.cores.len()),
            (field::VOLUMES, slots),
            (field::OPS, spec.ops.len()),
            (field::STAGES, spec.stages.len()),
            (field::QUEUES, spec.queues.len()),
        ] {
            put(&mut header, at, &(count as u32).to_le_bytes());
        }
        for (index, offset) in offsets.as_array().iter().enumerate() {
            put(
                &mut header,
                field::OFFSETS + 8 * index,
                &offset.to_le_bytes(),
            );
        }
        map.write(0, &header);
        let cores: Vec<u8> = spec
            .cores
            .iter()
            .flat_map(|core| core.to_le_bytes())
            .collect();
        map.write(offsets.cores, &cores);
        // Spare slots stay zero: unused, generation 0.
        for (index, volume) in spec.volumes.iter().enumerate() {
            let generation = if volume.is_live() {
                FIRST_GENERATION
            } else {
                0
            };
            let slot: Vec<u8> = std::iter::once(generation)
                .chain(volume.encode())
                .flat_map(|word| word.to_le_bytes())
                .collect();
            map.write(offsets.volumes + index * VOLUME_ENTRY_BYTES, &slot);
        }
        for (base, labels) in [(offsets.ops, &spec.ops), (offsets.stages, &spec.stages)] {
            for (index, label) in labels.iter().enumerate() {
                let mut entry = [0u8; LABEL_BYTES];
                put_name(&mut entry, label);
                map.write(base + index * LABEL_BYTES, &entry);
            }
        }
        for (index, queue) in spec.queues.iter().enumerate() {
            let mut entry = [0u8; QUEUE_ENTRY_BYTES];
            put_name(&mut entry[..NAME_BYTES], &queue.device);
            entry[48..52].copy_from_slice(&queue.core_index.to_le_bytes());
            map.write(offsets.queues + index * QUEUE_ENTRY_BYTES, &entry);
        }
        let region = Self {
            map: Arc::new(map),
            offsets,
            layout,
            slots,
            cores: spec.cores.len(),
            ops: spec.ops.len(),
            stages: spec.stages.len(),
            slot_lock: Mutex::new(()),
            path: path.into(),
        };
        region
            .map
            .word32(field::STATE)
            .store(WriterState::Running as u32, Ordering::Release);
        publish(&temporary, path).map_err(|(what, e)| io(what, e))?;
        Ok(region)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// How many volume slots the region has (used or not).
    pub fn volume_capacity(&self) -> usize {
        self.slots
    }

    /// Puts `entry` in slot `index` (`None`: marks the slot unused). A new volume starts
    /// from zero: the slot's counters and histograms (every op and stage) are zeroed before
    /// its entry is published with a new generation. Readers never see a half-written entry
    /// and notice the change at their next [`RegionReader::refresh`]. `entry.generation`
    /// is ignored.
    ///
    /// The caller makes sure nothing records into the slot meanwhile (no
    /// [`SeriesRecorder`] of it is in use until this returns).
    pub fn set_volume(&self, index: usize, entry: Option<&VolumeEntry>) -> Result<(), SlotError> {
        if index >= self.slots {
            return Err(SlotError::OutOfRange {
                index,
                capacity: self.slots,
            });
        }
        let content = match entry {
            Some(entry) => {
                check_slot_name(&entry.name, NAME_BYTES)?;
                if entry.core_index as usize >= self.cores {
                    return Err(SlotError::NoSuchCore {
                        name: entry.name.clone(),
                        core_index: entry.core_index,
                        cores: self.cores,
                    });
                }
                entry.encode()
            }
            None => [0; VOLUME_ENTRY_WORDS],
        };
        self.map.publish_slot(
            &self.slot_lock,
            self.offsets.volumes + index * VOLUME_ENTRY_BYTES,
            &content,
            field::DIRECTORY_GENERATION,
            || {
                if entry.is_some() {
                    self.zero_slot(index);
                }
            },
        );
        Ok(())
    }

    /// Zeroes the histograms and counters of every op of slot `index`.
    fn zero_slot(&self, index: usize) {
        let histogram_words = HIST_HEADER_WORDS + self.layout.counts_len();
        let series = index * self.ops;
        let histograms = self.offsets.histograms + series * self.stages * histogram_words * 8;
        let counters = self.offsets.volume_counters + series * VOLUME_COUNTER_WORDS * 8;
        for (start, words) in [
            (histograms, self.ops * self.stages * histogram_words),
            (counters, self.ops * VOLUME_COUNTER_WORDS),
        ] {
            for word in 0..words {
                self.map.word(start + 8 * word).store(0, Ordering::Relaxed);
            }
        }
    }

    /// The recorder for the histograms and counters of `op` on the volume in slot `volume`.
    /// Exactly one thread (the volume's reactor) may record through it.
    ///
    /// # Panics
    /// If the region has no such slot or op.
    pub fn series_recorder(&self, volume: usize, op: usize) -> SeriesRecorder {
        assert!(
            volume < self.slots && op < self.ops,
            "volume {volume} op {op}: the region has {} volume slots and {} ops",
            self.slots,
            self.ops
        );
        let histogram_words = HIST_HEADER_WORDS + self.layout.counts_len();
        let series = volume * self.ops + op;
        let histograms = self.offsets.histograms + series * self.stages * histogram_words * 8;
        let counters = self.offsets.volume_counters + series * VOLUME_COUNTER_WORDS * 8;
        SeriesRecorder {
            histograms: self.map.word_ptr(histograms),
            counters: self.map.word_ptr(counters),
            _map: self.map.clone(),
            histogram_words,
            stages: self.stages,
            layout: self.layout,
        }
    }

    /// The recorder for queue `queue`'s busy time; one writer, the queue's reactor.
    pub fn queue_recorder(&self, queue: usize) -> QueueRecorder {
        QueueRecorder {
            words: self
                .map
                .word_ptr(self.offsets.queue_counters + queue * QUEUE_COUNTER_WORDS * 8),
            _map: self.map.clone(),
        }
    }

    /// Tells readers the node is alive (called periodically by one thread).
    pub fn heartbeat(&self, ticks: u64) {
        let beat = self.map.word(field::HEARTBEAT);
        self.map
            .word(field::HEARTBEAT_TICKS)
            .store(ticks, Ordering::Relaxed);
        self.map
            .word(field::HEARTBEAT_UNIX_NS)
            .store(unix_ns(), Ordering::Relaxed);
        beat.store(beat.load(Ordering::Relaxed) + 1, Ordering::Release);
    }

    /// Marks a clean stop: readers report "stopped" instead of waiting for heartbeats.
    pub fn mark_stopped(&self) {
        self.map
            .word32(field::STATE)
            .store(WriterState::Stopped as u32, Ordering::Release);
    }
}

#[inline(always)]
fn add(word: &AtomicU64, value: u64) {
    // Single writer: a plain load and store, no locked instruction.
    word.store(
        word.load(Ordering::Relaxed).wrapping_add(value),
        Ordering::Relaxed,
    );
}

/// Records the stage latencies of one op on one volume (a *series*) and publishes its
/// counters.
///
/// Holds raw pointers into the mapping (kept alive by `_map`) so that a record is an index
/// computation and one increment, with no pointer chasing on the IO path.
pub struct SeriesRecorder {
    histograms: NonNull<u64>,
    counters: NonNull<u64>,
    _map: Arc<Mapping>,
    histogram_words: usize,
    stages: usize,
    layout: Layout,
}

// SAFETY: the pointers point into the shared mapping owned by `_map`, which lives as long as
// the recorder; the recorder is the only writer of its words, and moving it to the reactor
// thread that records moves that single writer.
unsafe impl Send for SeriesRecorder {}

impl SeriesRecorder {
    /// Records `count` IOs whose `stage` took `ticks` each: one increment.
    ///
    /// # Panics
    /// If the region has no such stage.
    #[inline(always)]
    pub fn record(&self, stage: usize, ticks: u64, count: u64) {
        assert!(stage < self.stages, "stage {stage} of {}", self.stages);
        let index = stage * self.histogram_words + HIST_HEADER_WORDS + self.layout.index_of(ticks);
        // SAFETY: stage < stages (checked) and index_of < counts_len (the layout clamps), so
        // the word lies inside this series' histograms; it is accessed atomically only.
        add(
            unsafe { AtomicU64::from_ptr(self.histograms.as_ptr().add(index)) },
            count,
        );
    }

    /// Publishes the running totals: successful IOs, bytes they moved, failed IOs.
    #[inline]
    pub fn publish_counts(&self, ios: u64, bytes: u64, errors: u64) {
        for (word, value) in [ios, bytes, errors].into_iter().enumerate() {
            // SAFETY: word < VOLUME_COUNTER_WORDS: inside this series' counters.
            unsafe { AtomicU64::from_ptr(self.counters.as_ptr().add(word)) }
                .store(value, Ordering::Relaxed);
        }
    }
}

/// Publishes one queue's counters: busy time (it had commands outstanding), the start of the
/// current busy period, commands submitted and completed.
pub struct QueueRecorder {
    words: NonNull<u64>,
    _map: Arc<Mapping>,
}

// SAFETY: as for SeriesRecorder: a single writer of words inside a mapping kept alive by `_map`.
unsafe impl Send for QueueRecorder {}

impl QueueRecorder {
    /// Publishes running totals; `busy_since` is the start of the current busy period in
    /// ticks, or 0 when the queue is idle.
    #[inline]
    pub fn publish(&self, busy_ticks: u64, busy_since: u64, submitted: u64, completed: u64) {
        for (word, value) in [busy_ticks, busy_since, submitted, completed]
            .into_iter()
            .enumerate()
        {
            // SAFETY: word < QUEUE_COUNTER_WORDS, inside this queue's counters.
            unsafe { AtomicU64::from_ptr(self.words.as_ptr().add(word)) }
                .store(value, Ordering::Relaxed);
        }
    }
}

/// A reader's handle on a region.
pub struct RegionReader {
    map: Mapping,
    offsets: Offsets,
    directory: Directory,
    /// The header's directory generation the volume slots were last read at; `None` when
    /// a slot was being rewritten then, so that the next refresh reads them again.
    volumes_read_at: Option<u64>,
    path: PathBuf,
}

/// Counters of a region at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The reader's clock when the snapshot was taken, in the region's ticks.
    pub taken_ticks: u64,
    pub heartbeat: u64,
    pub heartbeat_unix_ns: u64,
    pub state: u32,
    /// Per (volume, op, stage): the histogram counters.
    pub histograms: Vec<u64>,
    /// Per (volume, op): IOs, bytes, errors.
    pub volume_counters: Vec<u64>,
    /// Per queue: busy ticks, busy since, submitted, completed.
    pub queue_counters: Vec<u64>,
    /// Per volume slot: its generation when its counters were read.
    generations: Vec<u64>,
    /// The directory's shape, to index the flat arrays above (see the accessors).
    ops: usize,
    stages: usize,
    counts_len: usize,
}

/// One volume and op's counters in a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeCounters {
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
}

/// One queue's counters in a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounters {
    pub busy_ticks: u64,
    /// Start of the current busy period, 0 when the queue was idle.
    pub busy_since: u64,
    pub submitted: u64,
    pub completed: u64,
}

impl Snapshot {
    /// The generation of volume slot `volume` when its counters were read: when two
    /// snapshots give different ones, the slot was set or cleared in between, and the
    /// later snapshot's counters are a new series (they started from zero), not a
    /// continuation of the earlier one's. Odd while the node was rewriting the slot (its
    /// counters then read as zero).
    pub fn volume_generation(&self, volume: usize) -> u64 {
        self.generations[volume]
    }

    /// The counters of the (volume, op, stage) histogram.
    pub fn histogram(&self, volume: usize, op: usize, stage: usize) -> &[u64] {
        let start = ((volume * self.ops + op) * self.stages + stage)
            * (HIST_HEADER_WORDS + self.counts_len)
            + HIST_HEADER_WORDS;
        &self.histograms[start..start + self.counts_len]
    }

    pub fn volume(&self, volume: usize, op: usize) -> VolumeCounters {
        let words = &self.volume_counters[(volume * self.ops + op) * VOLUME_COUNTER_WORDS..]
            [..VOLUME_COUNTER_WORDS];
        VolumeCounters {
            ios: words[0],
            bytes: words[1],
            errors: words[2],
        }
    }

    pub fn queue(&self, queue: usize) -> QueueCounters {
        let words = &self.queue_counters[queue * QUEUE_COUNTER_WORDS..][..QUEUE_COUNTER_WORDS];
        QueueCounters {
            busy_ticks: words[0],
            busy_since: words[1],
            submitted: words[2],
            completed: words[3],
        }
    }

    /// A queue's busy time up to when the snapshot was taken, the ongoing busy period
    /// included (the node publishes a period only when it ends).
    pub fn queue_busy_ticks(&self, queue: usize) -> u64 {
        let counters = self.queue(queue);
        let ongoing = if counters.busy_since != 0 {
            self.taken_ticks.saturating_sub(counters.busy_since)
        } else {
            0
        };
        counters.busy_ticks + ongoing
    }
}

impl RegionReader {
    /// Maps and checks the region at `path`.
    pub fn open(path: &Path) -> Result<Self, RegionError> {
        let io = |what, source| RegionError::Io {
            what,
            path: path.into(),
            source,
        };
        let file = std::fs::File::open(path).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len() as usize;
        if len < HEADER_BYTES {
            let mut bytes = vec![0u8; len];
            use std::io::Read;
            let _ = (&file).read(&mut bytes);
            // Too short for a header: say "not a region" when the magic is wrong, else damaged.
            if bytes.len() < 8 || bytes[..8] != MAGIC {
                return Err(RegionError::BadMagic {
                    path: path.into(),
                    found: String::from_utf8_lossy(&bytes[..bytes.len().min(8)]).into(),
                });
            }
            return Err(RegionError::Corrupt {
                path: path.into(),
                what: format!("{len} bytes is shorter than the {HEADER_BYTES}-byte header"),
            });
        }
        let map = map_file(&file, len, false).map_err(|e| io("map", e))?;
        let header = map.copy(0, HEADER_BYTES);
        let (offsets, counts) = check_header(&header, len).map_err(|error| error.at(path))?;
        // The parts written once at creation are copied; the volume slots, which the node
        // rewrites while it runs, are read word by word under their seqlocks.
        let mut directory_bytes = map.copy(0, offsets.volumes);
        directory_bytes.resize(offsets.ops, 0);
        directory_bytes.extend(map.copy(offsets.ops, offsets.histograms - offsets.ops));
        let generation = map
            .word(field::DIRECTORY_GENERATION)
            .load(Ordering::Acquire);
        let (volumes, stable) = read_volume_slots(&map, &offsets, counts[1]);
        let directory = parse_directory(&header, &directory_bytes, &offsets, counts, volumes)
            .map_err(|error| error.at(path))?;
        Ok(Self {
            map,
            offsets,
            directory,
            volumes_read_at: stable.then_some(generation),
            path: path.into(),
        })
    }

    /// What the region described at the last [`RegionReader::refresh`] (or at open).
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Reads the volume slots again if the node changed any since they were last read (one
    /// load when it did not); true if the directory changed. A damaged slot (a live volume
    /// naming a core the region does not have) is an error, and the directory stays as it
    /// was.
    pub fn refresh(&mut self) -> Result<bool, RegionError> {
        let generation = self
            .map
            .word(field::DIRECTORY_GENERATION)
            .load(Ordering::Acquire);
        if self.volumes_read_at == Some(generation) {
            return Ok(false);
        }
        let (volumes, stable) =
            read_volume_slots(&self.map, &self.offsets, self.directory.volumes.len());
        check_volumes(&volumes, self.directory.cores.len())
            .map_err(|error| error.at(&self.path))?;
        self.volumes_read_at = stable.then_some(generation);
        let changed = volumes != self.directory.volumes;
        self.directory.volumes = volumes;
        Ok(changed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A consistent-enough copy of every counter (each word is read atomically; the region
    /// keeps changing while it is read, which only matters at the last few IOs). A volume
    /// slot's counters are read under its seqlock, with its generation: a slot the node
    /// rewrote meanwhile reads as zero.
    pub fn snapshot(&self, clock_ticks: u64) -> Snapshot {
        let words = |from: usize, count: usize, into: &mut Vec<u64>| {
            into.extend(
                (0..count).map(|word| self.map.word(from + 8 * word).load(Ordering::Relaxed)),
            );
        };
        let directory = &self.directory;
        let (slots, ops) = (directory.volumes.len(), directory.ops.len());
        let per_op =
            directory.stages.len() * (HIST_HEADER_WORDS + directory.histogram.counts_len());
        let counter_words = ops * VOLUME_COUNTER_WORDS;
        let mut volume_counters = Vec::with_capacity(slots * counter_words);
        let mut histograms = Vec::with_capacity(slots * ops * per_op);
        let mut generations = Vec::with_capacity(slots);
        for volume in 0..slots {
            let generation = self
                .map
                .word(self.offsets.volumes + volume * VOLUME_ENTRY_BYTES);
            let (counters_at, histograms_at) = (volume_counters.len(), histograms.len());
            let mut read = Err(0);
            for _ in 0..SNAPSHOT_ATTEMPTS {
                let before = generation.load(Ordering::Acquire);
                if before & 1 == 1 {
                    read = Err(before);
                    std::hint::spin_loop();
                    continue;
                }
                let entry = &directory.volumes[volume];
                if !entry.is_live() && entry.generation == before {
                    // Still the unused slot the directory knows: nothing to read.
                    volume_counters.resize(counters_at + counter_words, 0);
                    histograms.resize(histograms_at + ops * per_op, 0);
                    read = Ok(before);
                    break;
                }
                words(
                    self.offsets.volume_counters + volume * counter_words * 8,
                    counter_words,
                    &mut volume_counters,
                );
                for op in 0..ops {
                    let counters = &volume_counters[counters_at + op * VOLUME_COUNTER_WORDS..]
                        [..VOLUME_COUNTER_WORDS];
                    // Histograms of ops that never saw an IO are all zeros: skip reading
                    // them, so a reader polling often touches only the lines the node
                    // actually writes.
                    if counters[0] + counters[2] > 0 {
                        let start = self.offsets.histograms + (volume * ops + op) * per_op * 8;
                        words(start, per_op, &mut histograms);
                    } else {
                        histograms.resize(histograms.len() + per_op, 0);
                    }
                }
                // The counter loads complete before the generation is read again.
                fence(Ordering::Acquire);
                let after = generation.load(Ordering::Relaxed);
                if after == before {
                    read = Ok(before);
                    break;
                }
                read = Err(after);
                volume_counters.truncate(counters_at);
                histograms.truncate(histograms_at);
            }
            match read {
                Ok(generation) => generations.push(generation),
                Err(generation) => {
                    // The node kept rewriting the slot: report it empty, under the
                    // generation seen, so the next snapshot starts a new series.
                    volume_counters.resize(counters_at + counter_words, 0);
                    histograms.resize(histograms_at + ops * per_op, 0);
                    generations.push(generation);
                }
            }
        }
        let mut queue_counters = Vec::new();
        words(
            self.offsets.queue_counters,
            directory.queues.len() * QUEUE_COUNTER_WORDS,
            &mut queue_counters,
        );
        Snapshot {
            taken_ticks: clock_ticks,
            heartbeat: self.map.word(field::HEARTBEAT).load(Ordering::Acquire),
            heartbeat_unix_ns: self
                .map
                .word(field::HEARTBEAT_UNIX_NS)
                .load(Ordering::Relaxed),
            state: self.map.word32(field::STATE).load(Ordering::Acquire),
            histograms,
            volume_counters,
            queue_counters,
            generations,
            ops,
            stages: directory.stages.len(),
            counts_len: directory.histogram.counts_len(),
        }
    }
}

/// Reads `count` volume slots under their seqlocks; false with them when a slot was being
/// rewritten at every attempt (it is then given as unused, and should be read again).
fn read_volume_slots(map: &Mapping, offsets: &Offsets, count: usize) -> (Vec<VolumeEntry>, bool) {
    let mut stable = true;
    let volumes = (0..count)
        .map(|index| {
            let mut words = [0u64; VOLUME_ENTRY_WORDS];
            match map.read_slot(offsets.volumes + index * VOLUME_ENTRY_BYTES, &mut words) {
                Ok(generation) => VolumeEntry::decode(generation, &words),
                Err(generation) => {
                    stable = false;
                    VolumeEntry::unused(generation)
                }
            }
        })
        .collect();
    (volumes, stable)
}

/// Checks what the volume slots say against the rest of the directory.
fn check_volumes(volumes: &[VolumeEntry], cores: usize) -> Result<(), HeaderError> {
    match volumes
        .iter()
        .find(|volume| volume.is_live() && volume.core_index as usize >= cores)
    {
        Some(volume) => Err(HeaderError::Corrupt(format!(
            "volume {:?} names core index {} of {cores}",
            volume.name, volume.core_index
        ))),
        None => Ok(()),
    }
}

/// Header problems before the path is known.
enum HeaderError {
    BadMagic(String),
    Version(u32),
    Corrupt(String),
}

impl HeaderError {
    fn at(self, path: &Path) -> RegionError {
        match self {
            HeaderError::BadMagic(found) => RegionError::BadMagic {
                path: path.into(),
                found,
            },
            HeaderError::Version(found) => RegionError::UnsupportedVersion {
                path: path.into(),
                found,
            },
            HeaderError::Corrupt(what) => RegionError::Corrupt {
                path: path.into(),
                what,
            },
        }
    }
}

type Counts = [usize; 5];

/// Checks a header against the file length; returns the offsets and directory counts.
fn check_header(header: &[u8], file_len: usize) -> Result<(Offsets, Counts), HeaderError> {
    if header[field::MAGIC..field::MAGIC + 8] != MAGIC {
        return Err(HeaderError::BadMagic(
            String::from_utf8_lossy(&header[..8]).into(),
        ));
    }
    let version = u32_at(header, field::VERSION);
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    if u32_at(header, field::HEADER_BYTES) as usize != HEADER_BYTES {
        return Err(HeaderError::Corrupt(format!(
            "header size {} (expected {HEADER_BYTES})",
            u32_at(header, field::HEADER_BYTES)
        )));
    }
    let counts: Counts = [
        field::CORES,
        field::VOLUMES,
        field::OPS,
        field::STAGES,
        field::QUEUES,
    ]
    .map(|at| u32_at(header, at) as usize);
    if counts[0] > MAX_ENTRIES as usize
        || counts[1] > MAX_ENTRIES as usize
        || counts[4] > MAX_ENTRIES as usize
    {
        return Err(HeaderError::Corrupt(format!(
            "implausible directory counts {counts:?}"
        )));
    }
    if counts[2] > MAX_LABELS as usize || counts[3] > MAX_LABELS as usize {
        return Err(HeaderError::Corrupt(format!(
            "implausible op/stage counts {counts:?}"
        )));
    }
    let figures = u32_at(header, field::HIST_FIGURES);
    let layout = u8::try_from(figures)
        .ok()
        .and_then(|figures| Layout::new(u64_at(header, field::HIST_HIGHEST), figures))
        .ok_or_else(|| {
            HeaderError::Corrupt(format!(
                "histogram parameters highest {} figures {figures}",
                u64_at(header, field::HIST_HIGHEST)
            ))
        })?;
    if u32_at(header, field::HIST_COUNTS_LEN) as usize != layout.counts_len() {
        return Err(HeaderError::Corrupt(
            "histogram counter count does not match its parameters".into(),
        ));
    }
    let offsets = Offsets::compute(
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4],
        layout.counts_len(),
    )
    .ok_or_else(|| HeaderError::Corrupt("directory counts overflow".into()))?;
    let stored: Vec<u64> = (0..8)
        .map(|index| u64_at(header, field::OFFSETS + 8 * index))
        .collect();
    if stored != offsets.as_array() || u64_at(header, field::TOTAL_BYTES) != offsets.total as u64 {
        return Err(HeaderError::Corrupt(
            "section offsets do not match the directory counts".into(),
        ));
    }
    if offsets.total > file_len {
        return Err(HeaderError::Corrupt(format!(
            "the header describes {} bytes but the file has {file_len}",
            offsets.total
        )));
    }
    if u64_at(header, field::TSC_HZ) == 0 {
        return Err(HeaderError::Corrupt("clock frequency 0".into()));
    }
    Ok((offsets, counts))
}

/// The directory in `header` and `bytes` (the region's first `offsets.histograms` bytes; its
/// volume slots are not read from there but given, already read, in `volume_entries`).
fn parse_directory(
    header: &[u8],
    bytes: &[u8],
    offsets: &Offsets,
    counts: Counts,
    volume_entries: Vec<VolumeEntry>,
) -> Result<Directory, HeaderError> {
    let [cores, _, ops, stages, queues] = counts;
    let figures = u32_at(header, field::HIST_FIGURES) as u8;
    let histogram = Layout::new(u64_at(header, field::HIST_HIGHEST), figures).expect("checked");
    let core_ids: Vec<u32> = (0..cores)
        .map(|index| u32_at(bytes, offsets.cores + 4 * index))
        .collect();
    check_volumes(&volume_entries, cores)?;
    let labels = |base: usize, count: usize| {
        (0..count)
            .map(|index| name_at(&bytes[base + index * LABEL_BYTES..][..LABEL_BYTES]))
            .collect::<Vec<_>>()
    };
    let queue_entries: Vec<QueueEntry> = (0..queues)
        .map(|index| {
            let entry = &bytes[offsets.queues + index * QUEUE_ENTRY_BYTES..][..QUEUE_ENTRY_BYTES];
            QueueEntry {
                device: name_at(&entry[..NAME_BYTES]),
                core_index: u32_at(entry, 48),
            }
        })
        .collect();
    if let Some(queue) = queue_entries
        .iter()
        .find(|queue| queue.core_index as usize >= cores)
    {
        return Err(HeaderError::Corrupt(format!(
            "queue of {:?} names core index {} of {cores}",
            queue.device, queue.core_index
        )));
    }
    Ok(Directory {
        node_id: name_at(&header[field::NODE_ID..field::NODE_ID + 64]),
        tsc_hz: u64_at(header, field::TSC_HZ),
        clock_source: if u32_at(header, field::CLOCK_SOURCE) == 1 {
            ClockSource::Monotonic
        } else {
            ClockSource::Tsc
        },
        writer_pid: u32_at(header, field::WRITER_PID),
        start_unix_ns: u64_at(header, field::START_UNIX_NS),
        cores: core_ids,
        volumes: volume_entries,
        ops: labels(offsets.ops, ops),
        stages: labels(offsets.stages, stages),
        queues: queue_entries,
        histogram,
    })
}

/// Parses a region image held in memory (for tests and fuzzing: any bytes give a directory
/// or an error, never a panic).
pub fn parse(bytes: &[u8]) -> Result<Directory, RegionError> {
    let path = Path::new("<memory>");
    if bytes.len() < HEADER_BYTES {
        return Err(RegionError::Corrupt {
            path: path.into(),
            what: "shorter than the header".into(),
        });
    }
    let (offsets, counts) =
        check_header(&bytes[..HEADER_BYTES], bytes.len()).map_err(|error| error.at(path))?;
    // No writer here: a slot with an odd generation was caught half-written, and is unused.
    let volumes = (0..counts[1])
        .map(|index| {
            let slot = &bytes[offsets.volumes + index * VOLUME_ENTRY_BYTES..][..VOLUME_ENTRY_BYTES];
            let mut words = [0u64; VOLUME_ENTRY_WORDS];
            for (word, value) in words.iter_mut().zip(words_of(&slot[8..])) {
                *word = value;
            }
            VolumeEntry::decode(u64_at(slot, 0), &words)
        })
        .collect();
    parse_directory(&bytes[..HEADER_BYTES], bytes, &offsets, counts, volumes)
        .map_err(|error| error.at(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> RegionSpec {
        RegionSpec {
            node_id: "n1".into(),
            cores: vec![0, 1],
            volumes: vec![
                VolumeEntry {
                    name: "vol0".into(),
                    core_index: 0,
                    block_size: 512,
                    size_bytes: 1 << 30,
                    generation: 0,
                },
                VolumeEntry {
                    name: "vol1".into(),
                    core_index: 1,
                    block_size: 4096,
                    size_bytes: 1 << 20,
                    generation: 0,
                },
            ],
            spare_volumes: 0,
            ops: vec!["read".into(), "write".into(), "flush".into()],
            stages: vec!["queue".into(), "device".into(), "total".into()],
            queues: vec![
                QueueEntry {
                    device: "nvme0".into(),
                    core_index: 0,
                },
                QueueEntry {
                    device: "nvme0".into(),
                    core_index: 1,
                },
            ],
        }
    }

    #[test]
    fn what_the_writer_records_the_reader_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fathom-n1");
        let clock = Clock::monotonic();
        let region = StatsRegion::create(&path, &spec(), &clock).unwrap();
        let vol1_op1 = region.series_recorder(1, 1);
        vol1_op1.record(1, 200_000, 3);
        vol1_op1.record(1, 250_000, 1);
        vol1_op1.publish_counts(1, 4096, 1);
        region.queue_recorder(1).publish(500, 0, 9, 8);
        region.heartbeat(12345);

        let reader = RegionReader::open(&path).unwrap();
        let directory = reader.directory();
        assert_eq!(directory.node_id, "n1");
        let without_generation = |volumes: &[VolumeEntry]| {
            volumes
                .iter()
                .map(|volume| VolumeEntry {
                    generation: 0,
                    ..volume.clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(without_generation(&directory.volumes), spec().volumes);
        assert!(directory.volumes.iter().all(|volume| volume.generation > 0));
        assert_eq!(directory.stages, spec().stages);
        assert_eq!(directory.writer_pid, std::process::id());
        let snapshot = reader.snapshot(0);
        assert_eq!(snapshot.heartbeat, 1);
        assert_eq!(snapshot.state, WriterState::Running as u32);
        let histogram = snapshot.histogram(1, 1, 1);
        assert_eq!(histogram.iter().sum::<u64>(), 4);
        assert_eq!(histogram[directory.histogram.index_of(250_000)], 1);
        assert_eq!(histogram[directory.histogram.index_of(200_000)], 3);
        assert_eq!(
            snapshot.volume(1, 1),
            VolumeCounters {
                ios: 1,
                bytes: 4096,
                errors: 1
            }
        );
        assert_eq!(
            snapshot.queue(1),
            QueueCounters {
                busy_ticks: 500,
                busy_since: 0,
                submitted: 9,
                completed: 8
            }
        );
        region.mark_stopped();
        assert_eq!(reader.snapshot(0).state, WriterState::Stopped as u32);
    }

    #[test]
    fn a_wrong_magic_or_version_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fathom-n1");
        StatsRegion::create(&path, &spec(), &Clock::monotonic()).unwrap();
        let good = std::fs::read(&path).unwrap();

        let mut bytes = good.clone();
        bytes[..8].copy_from_slice(b"NOTSTATS");
        std::fs::write(&path, &bytes).unwrap();
        let error = RegionReader::open(&path).err().unwrap().to_string();
        assert!(
            error.contains("not a fathom stats region") && error.contains("NOTSTATS"),
            "{error}"
        );

        for old in [1u32, 7] {
            let mut bytes = good.clone();
            bytes[8..12].copy_from_slice(&old.to_le_bytes());
            std::fs::write(&path, &bytes).unwrap();
            let error = RegionReader::open(&path).err().unwrap().to_string();
            assert!(
                error.contains(&format!("version {old};")) && error.contains("reads version 2"),
                "{error}"
            );
        }

        std::fs::write(&path, &good[..100]).unwrap();
        let error = RegionReader::open(&path).err().unwrap().to_string();
        assert!(error.contains("shorter than"), "{error}");

        std::fs::write(&path, &good[..good.len() - 64]).unwrap();
        let error = RegionReader::open(&path).err().unwrap().to_string();
        assert!(error.contains("damaged"), "{error}");
    }

    fn volume(name: &str, core_index: u32) -> VolumeEntry {
        VolumeEntry {
            name: name.into(),
            core_index,
            block_size: 4096,
            size_bytes: 1 << 24,
            generation: 0,
        }
    }

    fn live_names(reader: &RegionReader) -> Vec<(usize, String)> {
        reader
            .directory()
            .live_volumes()
            .map(|(index, volume)| (index, volume.name.clone()))
            .collect()
    }

    fn all_zero(snapshot: &Snapshot, slot: usize, directory: &Directory) -> bool {
        (0..directory.ops.len()).all(|op| {
            snapshot.volume(slot, op) == VolumeCounters::default()
                && (0..directory.stages.len())
                    .all(|stage| snapshot.histogram(slot, op, stage).iter().all(|&c| c == 0))
        })
    }

    #[test]
    fn a_reader_follows_volumes_set_cleared_and_replaced_while_the_node_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fathom-n1");
        let spec = RegionSpec {
            spare_volumes: 2,
            ..spec()
        };
        let region = StatsRegion::create(&path, &spec, &Clock::monotonic()).unwrap();
        assert_eq!(region.volume_capacity(), 4);
        let mut reader = RegionReader::open(&path).unwrap();
        assert_eq!(reader.directory().volumes.len(), 4);
        assert_eq!(
            live_names(&reader),
            [(0, "vol0".to_string()), (1, "vol1".to_string())]
        );
        // Whatever a spare slot holds (here: counts recorded into it anyway) is gone once a
        // volume moves in.
        let leftover = region.series_recorder(2, 0);
        leftover.record(1, 1_000, 5);
        leftover.publish_counts(5, 5 * 4096, 1);
        assert!(!reader.refresh().unwrap(), "nothing changed yet");

        region.set_volume(2, Some(&volume("new", 1))).unwrap();
        assert!(reader.refresh().unwrap());
        assert!(!reader.refresh().unwrap(), "a change is seen once");
        assert_eq!(
            live_names(&reader),
            [
                (0, "vol0".to_string()),
                (1, "vol1".to_string()),
                (2, "new".to_string())
            ]
        );
        let entry = reader.directory().volumes[2].clone();
        assert_eq!((entry.core_index, entry.block_size), (1, 4096));
        let empty = reader.snapshot(0);
        assert!(
            all_zero(&empty, 2, reader.directory()),
            "a new volume starts at zero"
        );
        assert_eq!(empty.volume_generation(2), entry.generation);

        let recorder = region.series_recorder(2, 1);
        recorder.record(2, 300_000, 7);
        recorder.publish_counts(7, 7 * 4096, 0);
        let recorded = reader.snapshot(0);
        assert_eq!(recorded.volume(2, 1).ios, 7);
        assert_eq!(recorded.histogram(2, 1, 2).iter().sum::<u64>(), 7);
        let report = crate::report::interval(reader.directory(), &[empty, recorded.clone()], false);
        let rows: Vec<(&str, &str, u64)> = report
            .volumes
            .iter()
            .map(|row| (row.volume.as_str(), row.op.as_str(), row.ios))
            .collect();
        assert_eq!(rows, [("new", "write", 7)]);

        region.set_volume(2, None).unwrap();
        assert!(reader.refresh().unwrap());
        assert_eq!(
            live_names(&reader),
            [(0, "vol0".to_string()), (1, "vol1".to_string())]
        );
        let report = crate::report::interval(
            reader.directory(),
            &[recorded.clone(), reader.snapshot(0)],
            true,
        );
        assert!(
            report.volumes.iter().all(|row| row.volume != "new"),
            "{report:?}"
        );

        region.set_volume(2, Some(&volume("again", 0))).unwrap();
        assert!(reader.refresh().unwrap());
        let reused = reader.directory().volumes[2].clone();
        assert_eq!(reused.name, "again");
        assert_ne!(reused.generation, entry.generation);
        let fresh = reader.snapshot(0);
        assert!(
            all_zero(&fresh, 2, reader.directory()),
            "the old volume's counts are gone"
        );
        // Fewer IOs than the slot's previous volume had: a delta across the change is the
        // new volume's count, not a difference with the old one's.
        let recorder = region.series_recorder(2, 1);
        recorder.record(2, 300_000, 3);
        recorder.publish_counts(3, 3 * 4096, 0);
        let report =
            crate::report::interval(reader.directory(), &[recorded, reader.snapshot(0)], false);
        let rows: Vec<(&str, u64, u64)> = report
            .volumes
            .iter()
            .map(|row| (row.volume.as_str(), row.ios, row.stages[2].count))
            .collect();
        assert_eq!(rows, [("again", 3, 3)]);

        assert_eq!(
            region.set_volume(4, Some(&volume("x", 0))),
            Err(SlotError::OutOfRange {
                index: 4,
                capacity: 4
            })
        );
        assert!(matches!(
            region.set_volume(3, Some(&volume(&"x".repeat(49), 0))),
            Err(SlotError::NameTooLong { max_bytes: 48, .. })
        ));
        assert!(matches!(
            region.set_volume(3, Some(&volume("x", 2))),
            Err(SlotError::NoSuchCore { core_index: 2, .. })
        ));
        assert_eq!(
            region.set_volume(3, Some(&volume("", 0))),
            Err(SlotError::EmptyName)
        );
        assert!(
            !reader.refresh().unwrap(),
            "a refused change changes nothing"
        );
    }

    #[test]
    fn a_reader_never_sees_a_torn_volume_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fathom-n1");
        // One op and one stage: the writer's zeroing stays small, so it flips often.
        let spec = RegionSpec {
            volumes: Vec::new(),
            spare_volumes: 1,
            ops: vec!["read".into()],
            stages: vec!["total".into()],
            ..spec()
        };
        let region = Arc::new(StatsRegion::create(&path, &spec, &Clock::monotonic()).unwrap());
        // Every field derives from n: an entry mixing two writes would not match its name.
        let entry = |n: u64| VolumeEntry {
            name: format!("volume-{n}"),
            core_index: (n % 2) as u32,
            block_size: 512 << (n % 4),
            size_bytes: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            generation: 0,
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (region, stop) = (region.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 10_000_000 {
                    let volume = entry(n);
                    region
                        .set_volume(0, n.is_multiple_of(2).then_some(&volume))
                        .unwrap();
                    n += 1;
                }
            })
        };
        while region
            .map
            .word(field::DIRECTORY_GENERATION)
            .load(Ordering::Acquire)
            == 0
        {
            std::thread::yield_now();
        }
        let mut reader = RegionReader::open(&path).unwrap();
        let mut generations = std::collections::BTreeSet::new();
        // 10k refreshes, and more (within a bound) until the slot was seen to change.
        for refresh in 0..1_000_000 {
            if refresh >= 10_000 && generations.len() > 1 {
                break;
            }
            if !reader.refresh().unwrap() {
                // Nothing new: a refresh is one load, let the writer get on.
                std::thread::yield_now();
            }
            let got = &reader.directory().volumes[0];
            // A slot the writer stayed in through every attempt is given as unused (with
            // its odd generation), never half-read.
            if got.is_live() {
                assert_eq!(got.generation & 1, 0, "a slot in writing is never taken");
                let n: u64 = got.name["volume-".len()..].parse().unwrap();
                assert_eq!(
                    *got,
                    VolumeEntry {
                        generation: got.generation,
                        ..entry(n)
                    },
                    "torn entry"
                );
            }
            generations.insert(got.generation);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(
            generations.len() > 1,
            "the reader saw the slot change: {generations:?}"
        );
    }

    proptest! {
        /// Whatever a region file holds (random bytes, or a valid image with bytes changed),
        /// parsing gives a directory or an error, never a panic or a runaway allocation.
        #[test]
        fn any_image_parses_or_is_refused(edits in proptest::collection::vec((0usize..8192, any::<u8>()), 0..16), cut in 0usize..16384, random in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("r");
            StatsRegion::create(&path, &spec(), &Clock::monotonic()).unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            if random {
                for (index, byte) in bytes.iter_mut().enumerate() {
                    *byte = (index as u8).wrapping_mul(31) ^ edits.first().map_or(0, |edit| edit.1);
                }
            }
            for (at, value) in &edits {
                let at = at % bytes.len();
                bytes[at] = *value;
            }
            bytes.truncate(bytes.len().saturating_sub(cut));
            let _ = parse(&bytes);
        }
    }
}
