//! Traced IOs as a CTF 1.8 trace that babeltrace2 (2.0) and its `bt2` Python module read.
//!
//! **Trace.** A directory holding a `metadata` file (the TSDL text that describes everything
//! below) and one stream file per ring, `stream_<ring>`, made when the ring's first IO comes.
//! Babeltrace2 reads every regular file of the directory as part of the trace, so
//! [`CtfWriter::create`] wants a new or empty directory.
//!
//! **Clock.** One clock, `tsc`, whose value is the node's raw TSC stamp: `freq` is the
//! region's `tsc_hz`, and `offset_s`/`offset` put tick 0 where the region's epoch (a TSC
//! reading and the unix time taken together) says it was, so babeltrace2 shows unix time
//! (`absolute = TRUE`, and traces of several nodes can be merged).
//!
//! **Streams and packets.** One stream class (id 0); each ring's file is its own stream,
//! with `stream_instance_id` = the ring (bt2's `event.stream.id`). A file is a run of whole
//! packets, each at most [`PACKET_BYTES`] long unless a single event is longer (none is: an
//! event takes at most about 1.5 KiB). Every integer is declared `align = 8`, so nothing is ever padded:
//! fields are little-endian and byte-packed in declaration order, and a packet ends right
//! after its last event (`content_size == packet_size`, both in bits). A packet is written
//! out when the next event would not fit and on [`CtfWriter::flush`]; only whole packets
//! reach the file, because babeltrace2 refuses the whole trace when a packet runs past the
//! end of its file.
//!
//! ```text
//! packet header   u32 magic 0xC1FC1FC1, u8 uuid[16] (the trace's), u32 stream_id (0),
//!                 u64 stream_instance_id (the ring)                          32 bytes
//! packet context  u64 timestamp_begin, u64 timestamp_end (clock-mapped), u64 content_size,
//!                 u64 packet_size (bits), u64 packet_seq_num (0, 1, ... per stream),
//!                 u32 cpu_id (the ring's core)                               44 bytes
//! event header    u32 id (0), u64 timestamp (clock-mapped)                   12 bytes
//! ```
//!
//! **Events.** One event `io` per traced IO. Its timestamp is the end of the IO's root span,
//! raised to the stream's previous timestamp if it is earlier: babeltrace2 fails a stream
//! whose timestamps go backwards, and records come in completion order per ring only as long
//! as the node's stamps agree. The payload keeps the true stamps. Its fields:
//!
//! ```text
//! string   trace_id        32 lowercase hex digits, as trace-context and OTLP write it
//! string   span_id         the IO's root span on this node, 16 lowercase hex digits
//! string   parent_span_id  the caller's span, "0000000000000000" when the trace starts here
//! string   volume          the volume's name; "#N" for an index N the region does not name
//! string   op              read, write, flush, write_zeroes; "#N" for an unknown op N
//! u64      offset          bytes into the volume (u64::MAX when not kept: reason 16)
//! u64      lba             the device LBA it starts at (u64::MAX when not known)
//! u32      len             bytes
//! u16      status          NVMe status (type << 8 | code), 0 for success; printed in hex
//! u16      core            the reactor's core
//! u16      queue           the device queue
//! u8       reason          why it was traced: 1 head, 2 tail, 4 error, 8 context, 16 late
//!                          (offset, status and queue were not kept); printed in binary
//! u8       span_count
//! struct { string name; string span_id; string parent; u64 begin_ticks; u64 end_ticks; }
//!          spans[span_count]   TraceRecord::spans: the root first, then its children
//! ```
//!
//! Ids are strings, not integers, because babeltrace2 prints hex integers in upper case and
//! without leading zeros, which would not match the same id in a `traceparent` or in OTLP.
//! Span stamps are plain integers in clock ticks: babeltrace2 2.0 drops clock-mapped fields
//! from the payload it prints.
//!
//! No string is ever empty: babeltrace2 2.0.4 (Debian 12's) shows an empty string as the
//! value the same field had in an earlier event (fixed upstream after 2.0.4, Gerrit change
//! 4528), so a missing parent is the all-zero id that trace-context reserves for "none", and
//! an empty name is written as `-`. Unknown indexes are `#N` rather than `?N` because
//! babeltrace2 prints `?` as `\?`.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use fathom_engine::stats::OP_NAMES;
use fathom_telemetry::trace::{SpanId, TraceDirectory, TraceRecord, VolumeGeometry};

/// The longest packet the writer makes (unless one event alone is longer).
pub const PACKET_BYTES: usize = 64 * 1024;
/// What `tool` in the trace's env block says made it.
pub const TOOL: &str = "fathom-stat trace";

const MAGIC: u32 = 0xC1FC_1FC1;
/// Packet header and context: everything before a packet's first event.
const PREAMBLE_BYTES: usize = 32 + 44;
/// Where the packet context's fields sit in a packet.
const TIMESTAMP_BEGIN_AT: usize = 32;
const TIMESTAMP_END_AT: usize = 40;
const CONTENT_SIZE_AT: usize = 48;
const PACKET_SIZE_AT: usize = 56;
const SEQUENCE_AT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CtfError {
    #[error("could not {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{dir} already holds files, and babeltrace2 would read each of them as part of the \
         trace: write the trace to a new or empty directory"
    )]
    NotEmpty { dir: PathBuf },
    #[error(
        "the trace region's clock ({tsc_hz} Hz, epoch at tick {epoch_ticks} = {epoch_unix_ns} ns \
         after 1970) cannot be mapped to unix time: the region is damaged or not a fathom node's; \
         check the path"
    )]
    BadClock {
        tsc_hz: u64,
        epoch_ticks: u64,
        epoch_unix_ns: u64,
    },
    #[error(
        "ring {ring} is not in the trace region, which has {rings} rings: pass the ring number \
         TraceReader gave with the record"
    )]
    NoSuchRing { ring: usize, rings: usize },
}

/// What [`CtfWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtfSummary {
    /// One entry per stream file, by ring.
    pub streams: Vec<StreamSummary>,
    /// Events in all streams.
    pub events: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    pub ring: usize,
    pub path: PathBuf,
    pub events: u64,
    pub packets: u64,
}

/// Writes traced IOs into a CTF trace directory (see the module documentation for the
/// layout). What is buffered when it is dropped is written out as [`CtfWriter::flush`]
/// would, but errors are then lost: call [`CtfWriter::finish`] to see them.
pub struct CtfWriter {
    dir: PathBuf,
    uuid: [u8; 16],
    volumes: Vec<String>,
    geometry: Vec<VolumeGeometry>,
    layers: Vec<String>,
    cores: Vec<u32>,
    /// By ring; `None` until the ring's first IO.
    streams: Vec<Option<Stream>>,
}

/// One ring's stream file and the packet being filled for it.
struct Stream {
    file: File,
    path: PathBuf,
    encoder: StreamEncoder,
}

impl CtfWriter {
    /// Creates `dir` (and its parents) and writes the trace's `metadata` there: the TSC
    /// clock mapped to unix time, a trace uuid random to this writer, and an env block with
    /// the node id, the node's pid and the tool.
    pub fn create(dir: &Path, directory: &TraceDirectory) -> Result<CtfWriter, CtfError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| CtfError::Io { what, path, source }
        };
        let clock = ClockOffset::of(directory)?;
        std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        let mut entries = std::fs::read_dir(dir).map_err(io("list directory", dir))?;
        if entries.next().is_some() {
            return Err(CtfError::NotEmpty { dir: dir.into() });
        }
        let uuid = random_uuid().map_err(io("read random bytes from", Path::new(URANDOM)))?;
        let path = dir.join("metadata");
        std::fs::write(&path, metadata(directory, &uuid, clock)).map_err(io("write", &path))?;
        Ok(CtfWriter {
            dir: dir.into(),
            uuid,
            volumes: directory.volumes.clone(),
            geometry: directory.geometry.clone(),
            layers: directory.layers.clone(),
            cores: directory.cores.clone(),
            streams: (0..directory.cores.len()).map(|_| None).collect(),
        })
    }

    /// The trace's uuid, as its metadata and every packet header carry it.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// Takes the volume names and geometry of `directory` (the same node's, after volumes
    /// were created or deleted) for the records written from now on.
    pub fn follow(&mut self, directory: &TraceDirectory) {
        if self.volumes != directory.volumes || self.geometry != directory.geometry {
            self.volumes.clone_from(&directory.volumes);
            self.geometry.clone_from(&directory.geometry);
        }
    }

    /// Appends one traced IO to its ring's stream. After an error the stream's file may end
    /// in part of a packet, which babeltrace2 refuses: start a new trace.
    pub fn write(&mut self, ring: usize, record: &TraceRecord) -> Result<(), CtfError> {
        let rings = self.streams.len();
        let slot = self
            .streams
            .get_mut(ring)
            .ok_or(CtfError::NoSuchRing { ring, rings })?;
        let stream = match slot {
            Some(stream) => stream,
            None => {
                let path = self.dir.join(format!("stream_{ring}"));
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|source| CtfError::Io {
                        what: "create",
                        path: path.clone(),
                        source,
                    })?;
                let encoder = StreamEncoder::new(self.uuid, ring as u64, self.cores[ring]);
                slot.insert(Stream {
                    file,
                    path,
                    encoder,
                })
            }
        };
        let names = Names {
            volumes: &self.volumes,
            geometry: &self.geometry,
            layers: &self.layers,
        };
        stream
            .encoder
            .push(record, names, &mut stream.file)
            .map_err(|source| CtfError::Io {
                what: "write",
                path: stream.path.clone(),
                source,
            })
    }

    /// Writes out every stream's partly filled packet, so that babeltrace2 can read
    /// everything written so far.
    pub fn flush(&mut self) -> Result<(), CtfError> {
        for stream in self.streams.iter_mut().flatten() {
            stream
                .encoder
                .flush(&mut stream.file)
                .map_err(|source| CtfError::Io {
                    what: "write",
                    path: stream.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Flushes, and says what was written.
    pub fn finish(mut self) -> Result<CtfSummary, CtfError> {
        self.flush()?;
        let streams: Vec<StreamSummary> = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(ring, stream)| {
                stream.as_ref().map(|stream| StreamSummary {
                    ring,
                    path: stream.path.clone(),
                    events: stream.encoder.events,
                    packets: stream.encoder.sequence,
                })
            })
            .collect();
        let events = streams.iter().map(|stream| stream.events).sum();
        Ok(CtfSummary { streams, events })
    }
}

impl Drop for CtfWriter {
    fn drop(&mut self) {
        // After finish this finds nothing buffered; otherwise it is a best effort, as
        // BufWriter's drop is, and the type's documentation says so.
        let _ = self.flush();
    }
}

/// The region's names, for turning a record's indexes into words.
#[derive(Clone, Copy)]
struct Names<'a> {
    volumes: &'a [String],
    geometry: &'a [VolumeGeometry],
    layers: &'a [String],
}

/// One stream's packets, encoded into memory and handed to `out` whole (sans-IO: the unit
/// tests hand it a `Vec`).
struct StreamEncoder {
    /// The packet being filled: its preamble, then its events.
    packet: Vec<u8>,
    /// One event, encoded here before it is known whether it fits in `packet`.
    event: Vec<u8>,
    packet_bytes: usize,
    events_in_packet: u64,
    /// Timestamp of the stream's latest event: none may be earlier.
    last_timestamp: u64,
    /// Packets written so far (the next one's `packet_seq_num`).
    sequence: u64,
    events: u64,
}

impl StreamEncoder {
    fn new(uuid: [u8; 16], instance: u64, cpu_id: u32) -> Self {
        Self::with_packet_bytes(uuid, instance, cpu_id, PACKET_BYTES)
    }

    fn with_packet_bytes(uuid: [u8; 16], instance: u64, cpu_id: u32, packet_bytes: usize) -> Self {
        let mut packet = Vec::with_capacity(packet_bytes.max(PREAMBLE_BYTES));
        packet.extend_from_slice(&MAGIC.to_le_bytes());
        packet.extend_from_slice(&uuid);
        packet.extend_from_slice(&0u32.to_le_bytes()); // stream_id: the one stream class
        packet.extend_from_slice(&instance.to_le_bytes());
        // timestamp_begin, timestamp_end, content_size, packet_size, packet_seq_num: set
        // when the packet is written out.
        packet.extend_from_slice(&[0u8; 40]);
        packet.extend_from_slice(&cpu_id.to_le_bytes());
        debug_assert_eq!(packet.len(), PREAMBLE_BYTES);
        StreamEncoder {
            packet,
            event: Vec::with_capacity(1024),
            packet_bytes,
            events_in_packet: 0,
            last_timestamp: 0,
            sequence: 0,
            events: 0,
        }
    }

    /// Adds `record`'s event, first writing the current packet to `out` if the event would
    /// make it longer than the limit.
    fn push(&mut self, record: &TraceRecord, names: Names, out: &mut impl Write) -> io::Result<()> {
        let spans = record.spans(names.layers);
        let timestamp = spans[0].end.max(self.last_timestamp);
        self.event.clear();
        encode_event(&mut self.event, timestamp, record, &spans, names);
        if self.events_in_packet > 0 && self.packet.len() + self.event.len() > self.packet_bytes {
            self.flush(out)?;
        }
        if self.events_in_packet == 0 {
            put_u64_at(&mut self.packet, TIMESTAMP_BEGIN_AT, timestamp);
        }
        self.packet.extend_from_slice(&self.event);
        self.events_in_packet += 1;
        self.events += 1;
        self.last_timestamp = timestamp;
        Ok(())
    }

    /// Writes the current packet to `out` if it holds any event, and starts the next.
    fn flush(&mut self, out: &mut impl Write) -> io::Result<()> {
        if self.events_in_packet == 0 {
            return Ok(());
        }
        let bits = 8 * self.packet.len() as u64;
        put_u64_at(&mut self.packet, TIMESTAMP_END_AT, self.last_timestamp);
        put_u64_at(&mut self.packet, CONTENT_SIZE_AT, bits);
        put_u64_at(&mut self.packet, PACKET_SIZE_AT, bits);
        put_u64_at(&mut self.packet, SEQUENCE_AT, self.sequence);
        out.write_all(&self.packet)?;
        self.sequence += 1;
        self.events_in_packet = 0;
        self.packet.truncate(PREAMBLE_BYTES);
        Ok(())
    }
}

fn put_u64_at(buffer: &mut [u8], at: usize, value: u64) {
    buffer[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Appends one `io` event (header and payload, in the metadata's order) to `out`.
fn encode_event(
    out: &mut Vec<u8>,
    timestamp: u64,
    record: &TraceRecord,
    spans: &[fathom_telemetry::trace::Span],
    names: Names,
) {
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&timestamp.to_le_bytes());
    put_hex(out, record.trace_id.0, 32);
    out.push(0);
    put_span_id(out, record.span_id);
    put_span_id(out, record.parent);
    put_string(out, &index_name(names.volumes, record.volume as usize));
    put_string(out, &op_name(record.op));
    out.extend_from_slice(&record.offset.to_le_bytes());
    let lba = names
        .geometry
        .get(record.volume as usize)
        .and_then(|geometry| geometry.lba(record.offset));
    out.extend_from_slice(&lba.unwrap_or(u64::MAX).to_le_bytes());
    out.extend_from_slice(&record.len.to_le_bytes());
    out.extend_from_slice(&record.status.to_le_bytes());
    out.extend_from_slice(&record.core.to_le_bytes());
    out.extend_from_slice(&record.queue.to_le_bytes());
    out.push(record.reason);
    // A record has at most 1 + 5 stages + MAX_LAYERS spans; the cap only keeps the count
    // and the spans written in agreement should that ever change.
    let count = spans.len().min(u8::MAX as usize);
    out.push(count as u8);
    for span in &spans[..count] {
        put_string(out, &span.name);
        put_span_id(out, span.span_id);
        put_span_id(out, span.parent);
        out.extend_from_slice(&span.begin.to_le_bytes());
        out.extend_from_slice(&span.end.to_le_bytes());
    }
}

/// `names[index]`, or `#index` when the region names no such thing (its input is untrusted).
fn index_name(names: &[String], index: usize) -> Cow<'_, str> {
    names.get(index).map_or_else(
        || Cow::Owned(format!("#{index}")),
        |name| Cow::Borrowed(name.as_str()),
    )
}

fn op_name(op: u8) -> Cow<'static, str> {
    OP_NAMES
        .get(op as usize)
        .map_or_else(|| Cow::Owned(format!("#{op}")), |&name| Cow::Borrowed(name))
}

/// A CTF string: the bytes, then a NUL. A NUL inside would end the string early and make
/// the reader decode the following fields from the wrong bytes, so it becomes U+FFFD; an
/// empty text becomes `-` (see the module documentation for why none may be empty).
fn put_string(out: &mut Vec<u8>, text: &str) {
    if text.is_empty() {
        out.push(b'-');
    }
    for &byte in text.as_bytes() {
        match byte {
            0 => out.extend_from_slice(
                char::REPLACEMENT_CHARACTER
                    .encode_utf8(&mut [0; 4])
                    .as_bytes(),
            ),
            byte => out.push(byte),
        }
    }
    out.push(0);
}

/// A span id as 16 lowercase hex digits (all zeros for "no span").
fn put_span_id(out: &mut Vec<u8>, id: SpanId) {
    put_hex(out, id.0 as u128, 16);
    out.push(0);
}

/// The low `digits` hex digits of `value`, most significant first, in lower case.
fn put_hex(out: &mut Vec<u8>, value: u128, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for digit in (0..digits).rev() {
        out.push(HEX[((value >> (4 * digit)) & 0xf) as usize]);
    }
}

/// Where the clock's tick 0 lies after the unix epoch: `seconds` plus `cycles` (less than a
/// second's worth), as TSDL's `offset_s` and `offset` say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClockOffset {
    seconds: i64,
    cycles: u64,
}

impl ClockOffset {
    /// From the region's epoch: tick `epoch_ticks` happened at `epoch_unix_ns`, so tick 0
    /// was `epoch_unix_ns * hz / 1e9 - epoch_ticks` cycles after the epoch (rounded down,
    /// less than a cycle off).
    fn of(directory: &TraceDirectory) -> Result<ClockOffset, CtfError> {
        let bad = || CtfError::BadClock {
            tsc_hz: directory.tsc_hz,
            epoch_ticks: directory.epoch_ticks,
            epoch_unix_ns: directory.epoch_unix_ns,
        };
        let hz = directory.tsc_hz as i128;
        if hz == 0 {
            return Err(bad());
        }
        let cycles =
            directory.epoch_unix_ns as i128 * hz / 1_000_000_000 - directory.epoch_ticks as i128;
        Ok(ClockOffset {
            seconds: i64::try_from(cycles.div_euclid(hz)).map_err(|_| bad())?,
            cycles: cycles.rem_euclid(hz) as u64,
        })
    }
}

/// A TSDL string literal's content: `"` and `\` escaped, control characters (which the
/// metadata parser would refuse or misread) replaced by `?`.
fn tsdl_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                escaped.push('\\');
                escaped.push(c);
            }
            c if c.is_control() => escaped.push('?'),
            c => escaped.push(c),
        }
    }
    escaped
}

fn uuid_string(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

const URANDOM: &str = "/dev/urandom";

/// A random (version 4) uuid.
fn random_uuid() -> io::Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    io::Read::read_exact(&mut File::open(URANDOM)?, &mut uuid)?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(uuid)
}

/// The trace's TSDL metadata.
fn metadata(directory: &TraceDirectory, uuid: &[u8; 16], clock: ClockOffset) -> String {
    let node = tsdl_escape(&directory.node_id);
    let (major, minor) = {
        let mut parts = env!("CARGO_PKG_VERSION").split('.');
        let mut next = || {
            parts
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .unwrap_or(0)
        };
        (next(), next())
    };
    format!(
        r##"/* CTF 1.8 */

/* Written by {TOOL}: traced IOs of fathom node "{node}". Every integer is byte-aligned,
   so events are byte-packed; see src/trace/ctf.rs in Fathom for the layout. */

typealias integer {{ size = 8;  align = 8; signed = false; }} := uint8_t;
typealias integer {{ size = 8;  align = 8; signed = false; base = 2; }} := uint8_bits_t;
typealias integer {{ size = 16; align = 8; signed = false; }} := uint16_t;
typealias integer {{ size = 16; align = 8; signed = false; base = 16; }} := uint16_hex_t;
typealias integer {{ size = 32; align = 8; signed = false; }} := uint32_t;
typealias integer {{ size = 64; align = 8; signed = false; }} := uint64_t;
typealias integer {{ size = 64; align = 8; signed = false; map = clock.tsc.value; }} := uint64_tsc_t;

trace {{
    major = 1;
    minor = 8;
    uuid = "{uuid}";
    byte_order = le;
    packet.header := struct {{
        uint32_t magic;
        uint8_t  uuid[16];
        uint32_t stream_id;
        uint64_t stream_instance_id;    /* the ring */
    }};
}};

env {{
    hostname = "{node}";                /* babeltrace2 names the trace after it */
    node_id = "{node}";
    writer_pid = {pid};                 /* the node process that wrote the trace rings */
    tsc_hz = {hz};
    tracer_name = "fathom";
    tracer_major = {major};
    tracer_minor = {minor};
    tool = "{TOOL}";
    tool_pid = {tool_pid};
}};

clock {{
    name = tsc;
    description = "TSC of fathom node {node} (its trace region's clock), mapped to unix time";
    freq = {hz};
    precision = 1;
    offset_s = {seconds};
    offset = {cycles};
    absolute = TRUE;
}};

stream {{
    id = 0;
    packet.context := struct {{
        uint64_tsc_t timestamp_begin;
        uint64_tsc_t timestamp_end;
        uint64_t content_size;          /* bits */
        uint64_t packet_size;           /* bits */
        uint64_t packet_seq_num;
        uint32_t cpu_id;                /* the ring's core */
    }};
    event.header := struct {{
        uint32_t id;
        uint64_tsc_t timestamp;         /* the IO's end, never before the stream's last */
    }};
}};

event {{
    name = "io";
    id = 0;
    stream_id = 0;
    fields := struct {{
        string trace_id;                /* 32 hex digits */
        string span_id;                 /* the IO's root span on this node, 16 hex digits */
        string parent_span_id;          /* the caller's span, all zeros when the trace starts here */
        string volume;                  /* "#N" when the region names no volume N */
        string op;                      /* read, write, flush, write_zeroes, or "#N" */
        uint64_t offset;                /* bytes; 2^64 - 1 when not kept (reason 16) */
        uint64_t lba;                   /* the device LBA it starts at; 2^64 - 1 when not known */
        uint32_t len;                   /* bytes */
        uint16_hex_t status;            /* NVMe status type << 8 | code; 0 = success */
        uint16_t core;
        uint16_t queue;
        uint8_bits_t reason;            /* 1 head, 2 tail, 4 error, 8 caller's context, 16 late */
        uint8_t span_count;
        struct {{
            string name;                /* frontend, io, queue, submit, layer:NAME, device, ... */
            string span_id;
            string parent;
            uint64_t begin_ticks;       /* clock ticks, not clock-mapped */
            uint64_t end_ticks;
        }} spans[span_count];
    }};
}};
"##,
        uuid = uuid_string(uuid),
        pid = directory.writer_pid,
        hz = directory.tsc_hz,
        tool_pid = std::process::id(),
        seconds = clock.seconds,
        cycles = clock.cycles,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_telemetry::trace::{reason, stamp, TraceId, MAX_LAYERS};

    const UUID: [u8; 16] = *b"0123456789abcdef";
    const NO_SPAN: &str = "0000000000000000";

    fn directory() -> TraceDirectory {
        TraceDirectory {
            node_id: "node-a".into(),
            tsc_hz: 1_000_000_000,
            epoch_ticks: 5_000,
            epoch_unix_ns: 1_700_000_000_000_000_000,
            writer_pid: 42,
            start_unix_ns: 1_700_000_000_000_000_000,
            cores: vec![3, 7],
            capacity: 8,
            volumes: vec!["vol0".into(), "vol1".into()],
            geometry: vec![
                VolumeGeometry {
                    first_lba: 0,
                    block_size: 512,
                },
                VolumeGeometry {
                    first_lba: 1000,
                    block_size: 512,
                },
            ],
            layers: vec!["cache".into(), "crypt".into()],
        }
    }

    fn names(directory: &TraceDirectory) -> Names<'_> {
        Names {
            volumes: &directory.volumes,
            geometry: &directory.geometry,
            layers: &directory.layers,
        }
    }

    /// An IO from inside the node that ends at `end`, with one layer.
    fn record(n: u64, end: u64) -> TraceRecord {
        let mut stamps = [0u64; stamp::COUNT];
        stamps[stamp::ACCEPTED] = end - 50;
        stamps[stamp::SUBMITTED] = end - 40;
        stamps[stamp::RUNG] = end - 30;
        stamps[stamp::SEEN] = end - 10;
        stamps[stamp::COMPLETED] = end;
        let mut layers = [(0u8, 0u64, 0u64); MAX_LAYERS];
        layers[0] = (1, end - 40, end - 35);
        TraceRecord {
            trace_id: TraceId(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c + n as u128),
            span_id: SpanId(0xb7ad_6b71_6920_3331 + n),
            parent: SpanId(0),
            volume: (n % 2) as u32,
            op: 1,
            reason: reason::TAIL | reason::ERROR,
            status: 0x281,
            offset: 4096 * n,
            len: 512,
            core: 3,
            queue: 2,
            stamps,
            layer_count: 1,
            layers,
        }
    }

    /// What a test reads back from a packet: its context and events.
    #[derive(Debug)]
    struct Packet {
        instance: u64,
        timestamp_begin: u64,
        timestamp_end: u64,
        content_bits: u64,
        packet_bits: u64,
        sequence: u64,
        cpu_id: u32,
        events: Vec<Event>,
    }

    #[derive(Debug, PartialEq)]
    struct Event {
        timestamp: u64,
        trace_id: String,
        span_id: String,
        parent_span_id: String,
        volume: String,
        op: String,
        offset: u64,
        lba: u64,
        len: u32,
        status: u16,
        core: u16,
        queue: u16,
        reason: u8,
        spans: Vec<(String, String, String, u64, u64)>,
    }

    /// A reader of byte-packed little-endian fields, as the metadata declares them.
    struct Cursor<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl Cursor<'_> {
        fn take(&mut self, len: usize) -> &[u8] {
            let taken = &self.bytes[self.at..self.at + len];
            self.at += len;
            taken
        }
        fn u8(&mut self) -> u8 {
            self.take(1)[0]
        }
        fn u16(&mut self) -> u16 {
            u16::from_le_bytes(self.take(2).try_into().unwrap())
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take(4).try_into().unwrap())
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take(8).try_into().unwrap())
        }
        fn string(&mut self) -> String {
            let len = self.bytes[self.at..].iter().position(|&b| b == 0).unwrap();
            let text = String::from_utf8(self.take(len).to_vec()).unwrap();
            self.take(1);
            text
        }
    }

    /// Splits a stream file into packets by their `packet_size` and decodes every event,
    /// checking that each packet's events end exactly at its `content_size`.
    fn decode(file: &[u8]) -> Vec<Packet> {
        let mut packets = Vec::new();
        let mut start = 0;
        while start < file.len() {
            let mut c = Cursor {
                bytes: file,
                at: start,
            };
            assert_eq!(c.u32(), MAGIC);
            assert_eq!(c.take(16), &UUID);
            assert_eq!(c.u32(), 0, "stream class id");
            let mut packet = Packet {
                instance: c.u64(),
                timestamp_begin: c.u64(),
                timestamp_end: c.u64(),
                content_bits: c.u64(),
                packet_bits: c.u64(),
                sequence: c.u64(),
                cpu_id: c.u32(),
                events: Vec::new(),
            };
            assert_eq!(c.at - start, PREAMBLE_BYTES);
            assert_eq!(packet.packet_bits % 8, 0, "packet_size is whole bytes");
            let end = start + (packet.content_bits / 8) as usize;
            assert!(end <= file.len(), "packet runs past the file");
            while c.at < end {
                assert_eq!(c.u32(), 0, "event id");
                let mut event = Event {
                    timestamp: c.u64(),
                    trace_id: c.string(),
                    span_id: c.string(),
                    parent_span_id: c.string(),
                    volume: c.string(),
                    op: c.string(),
                    offset: c.u64(),
                    lba: c.u64(),
                    len: c.u32(),
                    status: c.u16(),
                    core: c.u16(),
                    queue: c.u16(),
                    reason: c.u8(),
                    spans: Vec::new(),
                };
                for _ in 0..c.u8() {
                    event
                        .spans
                        .push((c.string(), c.string(), c.string(), c.u64(), c.u64()));
                }
                packet.events.push(event);
            }
            assert_eq!(c.at, end, "the last event ends at content_size");
            start += (packet.packet_bits / 8) as usize;
            packets.push(packet);
        }
        assert_eq!(start, file.len(), "the file is whole packets");
        packets
    }

    #[test]
    fn an_event_holds_every_field_byte_packed_in_metadata_order() {
        let directory = directory();
        let mut encoder = StreamEncoder::new(UUID, 1, 7);
        let mut out = Vec::new();
        let record = record(1, 10_000);
        encoder.push(&record, names(&directory), &mut out).unwrap();
        assert!(out.is_empty(), "nothing is written before a flush");
        encoder.flush(&mut out).unwrap();
        let packets = decode(&out);
        assert_eq!(packets.len(), 1);
        let packet = &packets[0];
        assert_eq!((packet.instance, packet.cpu_id, packet.sequence), (1, 7, 0));
        assert_eq!(
            (packet.timestamp_begin, packet.timestamp_end),
            (10_000, 10_000)
        );
        let root = "b7ad6b7169203332".to_string();
        let child = |index: u32| format!("{}", SpanId(0xb7ad_6b71_6920_3332).child(index));
        assert_eq!(
            packet.events,
            [Event {
                timestamp: 10_000,
                trace_id: "0af7651916cd43dd8448eb211c80319d".into(),
                span_id: root.clone(),
                parent_span_id: NO_SPAN.into(),
                volume: "vol1".into(),
                op: "write".into(),
                offset: 4096,
                lba: 1008,
                len: 512,
                status: 0x281,
                core: 3,
                queue: 2,
                reason: 6,
                spans: vec![
                    ("io".into(), root.clone(), NO_SPAN.into(), 9_950, 10_000),
                    ("queue".into(), child(0), root.clone(), 9_950, 9_960),
                    ("submit".into(), child(1), root.clone(), 9_960, 9_970),
                    ("layer:crypt".into(), child(2), root.clone(), 9_960, 9_965),
                    ("device".into(), child(3), root.clone(), 9_970, 9_990),
                    ("complete".into(), child(4), root, 9_990, 10_000),
                ],
            }]
        );
    }

    #[test]
    fn packets_are_whole_bounded_and_sized_in_bits() {
        let directory = directory();
        let limit = 1000;
        let mut encoder = StreamEncoder::with_packet_bytes(UUID, 0, 3, limit);
        let mut out = Vec::new();
        for n in 0..40 {
            encoder
                .push(&record(n, 10_000 + 100 * n), names(&directory), &mut out)
                .unwrap();
        }
        encoder.flush(&mut out).unwrap();
        encoder.flush(&mut out).unwrap(); // nothing left: no empty packet
        let packets = decode(&out);
        assert!(packets.len() > 3, "{} packets", packets.len());
        let mut previous_end = 0;
        for (index, packet) in packets.iter().enumerate() {
            assert_eq!(packet.sequence, index as u64);
            assert_eq!(packet.content_bits, packet.packet_bits);
            assert!(packet.packet_bits as usize <= 8 * limit);
            assert!(!packet.events.is_empty());
            assert_eq!(packet.timestamp_begin, packet.events[0].timestamp);
            assert_eq!(
                packet.timestamp_end,
                packet.events.last().unwrap().timestamp
            );
            assert!(packet.timestamp_begin >= previous_end, "packets overlap");
            previous_end = packet.timestamp_end;
        }
        let offsets: Vec<u64> = packets
            .iter()
            .flat_map(|p| p.events.iter().map(|e| e.offset / 4096))
            .collect();
        assert_eq!(offsets, (0..40).collect::<Vec<_>>());
        assert_eq!(
            (encoder.events, encoder.sequence),
            (40, packets.len() as u64)
        );
    }

    #[test]
    fn timestamps_never_go_backwards_but_the_spans_keep_their_stamps() {
        let directory = directory();
        let mut encoder = StreamEncoder::with_packet_bytes(UUID, 0, 3, 600);
        let mut out = Vec::new();
        let ends = [10_000, 9_000, 12_000, 11_000, 11_000, 13_000];
        for (n, &end) in ends.iter().enumerate() {
            encoder
                .push(&record(n as u64, end), names(&directory), &mut out)
                .unwrap();
        }
        encoder.flush(&mut out).unwrap();
        let packets = decode(&out);
        let events: Vec<&Event> = packets.iter().flat_map(|p| &p.events).collect();
        let timestamps: Vec<u64> = events.iter().map(|e| e.timestamp).collect();
        assert_eq!(timestamps, [10_000, 10_000, 12_000, 12_000, 12_000, 13_000]);
        let root_ends: Vec<u64> = events.iter().map(|e| e.spans[0].4).collect();
        assert_eq!(root_ends, ends);
        assert!(packets.len() > 1, "the clamp holds across packets too");
    }

    #[test]
    fn unknown_volumes_ops_and_odd_names_are_written_without_breaking_the_layout() {
        let mut directory = directory();
        directory.layers[0] = "ca\0che".into();
        directory.volumes[1] = String::new();
        let mut encoder = StreamEncoder::new(UUID, 0, 3);
        let mut out = Vec::new();
        let mut bad = record(0, 10_000);
        bad.volume = 99;
        bad.op = 9;
        bad.layers[0].0 = 0;
        bad.parent = SpanId(0x1234);
        encoder.push(&bad, names(&directory), &mut out).unwrap();
        encoder
            .push(&record(1, 10_100), names(&directory), &mut out)
            .unwrap();
        encoder.flush(&mut out).unwrap();
        let events: Vec<Event> = decode(&out).into_iter().flat_map(|p| p.events).collect();
        assert_eq!(events[0].volume, "#99");
        assert_eq!(events[0].op, "#9");
        assert_eq!(events[0].parent_span_id, "0000000000001234");
        assert!(events[0].spans.iter().any(|s| s.0 == "layer:ca\u{fffd}che"));
        assert_eq!(events[1].volume, "-", "the next event decodes");
        assert_eq!(events[1].op, "write");
    }

    #[test]
    fn the_clock_offset_maps_ticks_to_unix_time() {
        let mut directory = directory();
        assert_eq!(
            ClockOffset::of(&directory).unwrap(),
            ClockOffset {
                seconds: 1_699_999_999,
                cycles: 999_995_000
            }
        );
        // At 2.4 GHz, tick t is at offset_s + (offset + t) / hz seconds; at the epoch's
        // tick that must be the epoch's unix time (to within a cycle).
        directory.tsc_hz = 2_400_000_000;
        directory.epoch_ticks = 123_456_789_012_345;
        let offset = ClockOffset::of(&directory).unwrap();
        assert!(offset.cycles < directory.tsc_hz);
        let ns = offset.seconds as i128 * 1_000_000_000
            + (offset.cycles as i128 + directory.epoch_ticks as i128) * 1_000_000_000
                / directory.tsc_hz as i128;
        assert!((ns - directory.epoch_unix_ns as i128).abs() <= 1, "{ns}");
        // A tick counter ahead of unix time (nonsense, but possible in a damaged region)
        // gives a negative offset, which babeltrace2 accepts.
        directory.epoch_unix_ns = 1_000;
        let offset = ClockOffset::of(&directory).unwrap();
        assert!(offset.seconds < 0 && offset.cycles < directory.tsc_hz);
        directory.tsc_hz = 0;
        assert!(matches!(
            ClockOffset::of(&directory),
            Err(CtfError::BadClock { tsc_hz: 0, .. })
        ));
    }

    #[test]
    fn metadata_declares_byte_aligned_integers_and_escapes_the_node_id() {
        let mut directory = directory();
        directory.node_id = "a\"b\\c\nd".into();
        let text = metadata(&directory, &UUID, ClockOffset::of(&directory).unwrap());
        assert!(text.starts_with("/* CTF 1.8 */\n"));
        assert!(text.contains(r#"hostname = "a\"b\\c?d";"#), "{text}");
        assert!(text.contains(r#"uuid = "30313233-3435-3637-3839-616263646566";"#));
        let integers: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("integer {"))
            .collect();
        assert_eq!(integers.len(), 7);
        assert!(integers.iter().all(|line| line.contains("align = 8;")));
        assert!(text.contains("freq = 1000000000;"));
        assert!(text.contains("offset_s = 1699999999;") && text.contains("offset = 999995000;"));
    }

    #[test]
    fn the_writer_refuses_a_used_directory_and_an_unknown_ring() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stray"), b"x").unwrap();
        let error = CtfWriter::create(dir.path(), &directory()).err().unwrap();
        assert!(matches!(error, CtfError::NotEmpty { .. }), "{error}");
        let trace = dir.path().join("a/b");
        let mut writer = CtfWriter::create(&trace, &directory()).unwrap();
        assert!(matches!(
            writer.write(2, &record(0, 10_000)),
            Err(CtfError::NoSuchRing { ring: 2, rings: 2 })
        ));
        writer.write(1, &record(0, 10_000)).unwrap();
        writer.write(1, &record(1, 10_100)).unwrap();
        let uuid = writer.uuid();
        assert_eq!(uuid[6] >> 4, 4, "version 4 uuid");
        let summary = writer.finish().unwrap();
        assert_eq!(summary.events, 2);
        assert_eq!(
            summary.streams,
            [StreamSummary {
                ring: 1,
                path: trace.join("stream_1"),
                events: 2,
                packets: 1
            }]
        );
        let file = std::fs::read(trace.join("stream_1")).unwrap();
        assert_eq!(&file[4..20], &uuid, "packets carry the metadata's uuid");
        assert!(std::fs::read_to_string(trace.join("metadata"))
            .unwrap()
            .contains(&uuid_string(&uuid)));
        assert!(!trace.join("stream_0").exists(), "no file for an idle ring");
    }
}
