//! The replication wire protocol between a volume's primary and its replicas, as a sans-IO
//! codec: frames become bytes ([`encode`], [`Header::to_bytes`]) and bytes become frames
//! ([`FrameDecoder`], or [`decode_header`] for a driver that reads payloads into its own
//! buffers). Nothing here touches a socket, a clock or an epoch store.
//!
//! # Sessions
//!
//! A session is one TCP connection between two nodes. The connecting node sends `Hello` (its
//! node id, the cluster name, the protocol versions it speaks, an authentication payload and
//! the volumes the session will carry); the other answers `HelloOk` in the same format, or
//! `Refused`. Every later frame names its volume by its index in the Hello's volume list.
//! Requests carry a `request_id` the requester chooses; the reply echoes it.
//!
//! # Frame layout (version 1)
//!
//! A frame is an 88-byte header and `payload_len` bytes of payload. Integers are
//! little-endian. The trace id and the parent span id are the exception: they are byte
//! strings in W3C trace-context, so they are stored in the order of their `traceparent` hex
//! digits (most significant byte first), and a hex dump of bytes 56..80 reads as the
//! `traceparent` does.
//!
//! ```text
//! offset size field        value
//!      0    4 magic        "FTRP" (46 54 52 50)
//!      4    1 version      1
//!      5    1 kind         1..=17, see below; 0 and 18..=255 are refused
//!      6    2 flags        bit 0 FUA, bit 1 trace sampled, bit 2 forwarded; any other bit
//!                          is refused
//!      8    2 header_len   88 (a later version that grows the header bumps the version)
//!     10    2 status       replies: 0 OK, else a status code; Refused: the reason (not 0)
//!     12    4 payload_len  bytes of payload after the header
//!     16    4 volume       index into the session's Hello volume list
//!     20    4 block_count  blocks covered (Probe, ProbeReply: regions)
//!     24    8 epoch        the volume epoch of the sender
//!     32    8 sequence     per-volume write sequence; its meaning per kind is below
//!     40    8 lba          first block (Probe, ProbeReply: first region index)
//!     48    8 request_id   chosen by the requester, echoed by the reply
//!     56   16 trace_id     W3C trace id (traceparent byte order); all zero: not traced
//!     72    8 parent_span  the sender's span id (traceparent byte order); zero: not traced
//!     80    4 payload_crc  CRC32C (Castagnoli) of the payload; 0 when there is none
//!     84    4 header_crc   CRC32C of bytes 0..84, payload_crc included
//!     88      payload
//! ```
//!
//! Every integer sits at a multiple of its own size, and the payload starts 8-byte aligned
//! (when the header does). The header CRC covers every header byte but its own, so a frame has no
//! don't-care byte: any single changed byte is refused (magic, version and header length are
//! checked first so that a peer speaking something else gets a plain answer, every other
//! header byte fails the header CRC, and every payload byte the payload CRC).
//!
//! The trace context is all or nothing: trace id and parent span both non-zero (the frame is
//! part of that trace; the sampled flag says whether the sender sampled it), or both zero and
//! the sampled flag clear.
//!
//! # Kinds
//!
//! "·" marks a field the kind does not use: it must be zero. "≥ 1" in the blocks column marks
//! a count that may not be zero. FUA (write through to media before acknowledging) is allowed on Write,
//! WriteZeroes and Trim only.
//!
//! ```text
//! code kind        from      volume epoch    sequence            lba    blocks     status payload
//!    1 Hello       connector ·      ·        ·                   ·      ·          ·      hello
//!    2 HelloOk     acceptor  ·      ·        ·                   ·      ·          ·      hello
//!    3 Write       primary   yes    yes      the write's         first  ≥ 1        ·      data, ≥ 1 byte
//!    4 WriteZeroes primary   yes    yes      the write's         first  ≥ 1        ·      none
//!    5 Trim        primary   yes    yes      the write's         first  ≥ 1        ·      none
//!    6 Flush       primary   yes    yes      last write before   ·      ·          ·      none
//!    7 Ack         replica   yes    yes      acknowledged        ·      ·          yes    none
//!    8 FlushAck    replica   yes    yes      durable up to       ·      ·          yes    none
//!    9 Read        primary   yes    yes      ·                   first  ≥ 1        ·      none
//!   10 ReadReply   replica   yes    yes      highest applied     echo   echo       yes    data if OK, else none
//!   11 Probe       primary   yes    yes      ·                   region ≥ 1 (most) ·      none
//!   12 ProbeReply  replica   yes    yes      highest applied     echo   covered    yes    pairs if OK, else none
//!   13 Epoch       primary   yes    claimed  base (see below)    ·      ·          sync   none
//!   14 EpochOk     replica   yes    now      highest applied     ·      ·          yes    none
//!   15 Refused     either    yes    current  ·                   ·      ·          reason text (UTF-8)
//!   16 Resync      primary   yes    yes      ·                   first  ≥ 1        ·      data, ≥ 1 byte
//!   17 Handover    primary   yes    yes      last write          ·      ·          ·      none
//! ```
//!
//! An Epoch frame opens a volume's stream on a session. Its sequence is the primary's base:
//! every write up to it is on the replica already or is in the primary's dirty-region map for
//! that replica (to be resynchronised), and the stream's writes follow it. The replica counts
//! its writes as applied from there. Its status says whether the copy lacks anything: 0 it
//! is in sync, [`status::OUT_OF_SYNC`] it lacks regions a resync copies next (a new primary
//! may then be promoted from it only by force). The primary sends it again, with base 0,
//! when that changes. A replica refuses a claim of the epoch it holds from another node than
//! the one that claimed it ([`refusal::EPOCH_TAKEN`]): one epoch has one primary.
//!
//! A Resync carries a region's data as the primary holds it, to a replica that lacks writes
//! there (it was away, or its copy is new). It takes no sequence: the replica applies it in
//! the order it arrived among the session's writes, and makes it durable before its Ack (the
//! primary sends it once every earlier write to those blocks completed on its own copy, and
//! holds later ones until it is sent, so the replica ends with the primary's data).
//!
//! A Handover asks a replica to take the volume over (a reparent): the primary stopped
//! taking writes and drained, and its sequence is the last write it began. The replica
//! answers with an Ack whose sequence is the highest it applied, status OK if it holds every
//! write up to the Handover's and will claim the next epoch, or refuses with the reason.
//!
//! Write, WriteZeroes and Trim each take the next per-volume sequence number; a Flush names
//! the sequence of the last write issued before it, and its FlushAck says every write up to
//! that sequence is durable. Read lets a (new) primary copy a region from a replica during
//! resynchronisation. That a Write's payload is `block_count` blocks of the volume's block
//! size is for the receiver to check: the codec does not know block sizes.
//!
//! # Payloads
//!
//! **Hello and HelloOk** (a HelloOk answers with the acceptor's node id, the same cluster
//! name, the chosen version as a range of one, its authentication response, and the Hello's
//! volume list unchanged, whose indices both sides then use):
//!
//! ```text
//! offset size field
//!      0    1 min_version       ≥ 1
//!      1    1 max_version       ≥ min_version
//!      2    2 node_id_len       N ≥ 1
//!      4    2 cluster_len       C ≥ 1
//!      6    2 auth_len          A (the authentication challenge or response; opaque here)
//!      8    4 volume_count      V
//!     12    N node_id           UTF-8
//!   12+N    C cluster           UTF-8
//! 12+N+C    A auth              bytes
//!    ...      V volume names    each: u16 length L ≥ 1, then L bytes of UTF-8
//! ```
//!
//! The payload ends exactly after the last volume name.
//!
//! **ProbeReply**: a new primary asks each replica, region by region, for the highest
//! sequence it applied, to know whom to reconcile from. A Probe asks for up to
//! `block_count` regions from region `lba` on; the ProbeReply echoes `lba`, sets
//! `block_count` to the regions it covered (fewer than asked when the rest would not fit
//! one payload, and the primary probes again from where it stopped), and carries one
//! 16-byte pair for each covered region whose sequence is not zero:
//!
//! ```text
//! offset size field
//!      0    8 region    lba ≤ region < lba + block_count, strictly ascending pair to pair
//!      8    8 sequence  ≥ 1 (a region never written is left out)
//! ```
//!
//! **Refused**: the reason is the status code ([`refusal`]); the payload is a message in
//! UTF-8 for the operator, e.g. `stale epoch 4 < 5`. A Refused answers the request with the
//! same `request_id`; its epoch field is the refuser's current epoch.
//!
//! # Decoding
//!
//! [`FrameDecoder`] checks, in order: the magic (once 4 bytes are in), the version (5), the
//! header length (10), then with the whole header the header CRC, the kind, the flags, the
//! trace context, the fields the kind must leave zero, the block count, the payload length
//! the kind allows, and the connection's payload limit. A declared payload over the limit is
//! refused as soon as the header is in, so a peer cannot make the decoder wait for (or
//! allocate) more than one frame of bounded size: the decoder allocates its buffer once, one
//! header and the largest payload long. With the whole payload in, it checks the payload CRC
//! and the payload's own structure, and only then yields the frame.
//!
//! Every error closes the connection: after one, the stream's framing can no longer be
//! trusted. The decoder is then poisoned: [`FrameDecoder::next`] returns the same error
//! again and [`FrameDecoder::push`] accepts no more bytes. The codec never panics on what a
//! peer sends.
//!
//! # Epochs
//!
//! Fencing is the replica service's job, not the codec's, but the rule lives here as one
//! pure function, [`check_epoch`]: a frame from an older epoch is refused, a newer epoch is
//! taken only from an Epoch frame, the current one is accepted.

use std::fmt;
use std::ops::Range;

use fathom_telemetry::trace::{SpanId, TraceContext, TraceId};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FTRP";
/// The frame version this node writes.
pub const VERSION: u8 = 1;
/// The oldest protocol version this node speaks.
pub const MIN_VERSION: u8 = 1;
/// The newest protocol version this node speaks.
pub const MAX_VERSION: u8 = 1;
/// Bytes in a version 1 header.
pub const HEADER_LEN: usize = 88;
/// The largest write a primary is to send in one frame: a larger client write is split.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
/// The payload limit of a connection unless told otherwise: one largest write, and a page of
/// slack so that a full-size Hello or ProbeReply never sits right at the edge.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u32 = MAX_WRITE_BYTES + 4096;
/// The largest payload limit a decoder may be configured with (a decoder's buffer is one
/// header longer than its limit).
pub const MAX_PAYLOAD_LIMIT_BYTES: u32 = 64 << 20;
/// Bytes in the fixed part of a Hello payload, before the node id.
pub const HELLO_FIXED_LEN: usize = 12;
/// Bytes in one (region, sequence) pair of a ProbeReply.
pub const PROBE_ENTRY_LEN: usize = 16;

const _: () = assert!(offset::HEADER_CRC + 4 == HEADER_LEN);
const _: () = assert!(HEADER_LEN.is_multiple_of(8));
const _: () = assert!(DEFAULT_MAX_PAYLOAD_BYTES <= MAX_PAYLOAD_LIMIT_BYTES);

/// Where each header field starts, in bytes from the start of the frame.
pub mod offset {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const KIND: usize = 5;
    pub const FLAGS: usize = 6;
    pub const HEADER_LEN: usize = 8;
    pub const STATUS: usize = 10;
    pub const PAYLOAD_LEN: usize = 12;
    pub const VOLUME: usize = 16;
    pub const BLOCK_COUNT: usize = 20;
    pub const EPOCH: usize = 24;
    pub const SEQUENCE: usize = 32;
    pub const LBA: usize = 40;
    pub const REQUEST_ID: usize = 48;
    pub const TRACE_ID: usize = 56;
    pub const PARENT_SPAN: usize = 72;
    pub const PAYLOAD_CRC: usize = 80;
    pub const HEADER_CRC: usize = 84;
}

/// Header flag bits.
pub mod flag {
    /// Force unit access: acknowledge only once the write is on stable media.
    pub const FUA: u16 = 1 << 0;
    /// The sender sampled the trace the frame belongs to (W3C `sampled`).
    pub const TRACE_SAMPLED: u16 = 1 << 1;
    /// A client's IO that a node which is not the primary forwards to it (Write,
    /// WriteZeroes, Flush, Read): the primary runs it as its own client's.
    pub const FORWARDED: u16 = 1 << 2;
    /// Every flag version 1 defines.
    pub const KNOWN: u16 = FUA | TRACE_SAMPLED | FORWARDED;
}

/// Status codes of Ack, FlushAck, ReadReply and ProbeReply. The codec only tells OK from the
/// rest (a failed ReadReply or ProbeReply carries no payload).
pub mod status {
    pub const OK: u16 = 0;
    /// The replica's device failed the IO.
    pub const IO_ERROR: u16 = 1;
    /// The IO reaches past the end of the replica's copy of the volume.
    pub const OUT_OF_RANGE: u16 = 2;
    /// EpochOk: the replica's copy was never written by a primary (a new or wiped disk), or
    /// was a deposed primary's (which may hold writes no one else has): it is rebuilt in
    /// full.
    pub const NEW_COPY: u16 = 3;
    /// Epoch: the copy lacks regions; a resync follows.
    pub const OUT_OF_SYNC: u16 = 4;
}

/// Reason codes of a Refused frame (its status field; never 0).
pub mod refusal {
    /// The frame's epoch is older than the refuser's: the sender was deposed.
    pub const STALE_EPOCH: u16 = 1;
    /// The frame's epoch is newer than the refuser's, and it was not an Epoch frame.
    pub const EPOCH_NOT_CLAIMED: u16 = 2;
    /// No protocol version in common.
    pub const VERSION: u16 = 3;
    /// The Hello names another cluster.
    pub const CLUSTER: u16 = 4;
    /// Authentication failed.
    pub const AUTH: u16 = 5;
    /// The volume index is not in the session's volume list, or this node holds no replica
    /// of that volume.
    pub const UNKNOWN_VOLUME: u16 = 6;
    /// Another node claimed this epoch: one epoch has one primary.
    pub const EPOCH_TAKEN: u16 = 7;
    /// A forwarded IO reached a node that is not the volume's primary; the text names the
    /// primary this node knows.
    pub const NOT_PRIMARY: u16 = 9;
    /// A frame of the current epoch on a session that did not claim it.
    pub const NOT_CLAIMED: u16 = 8;
    /// A Handover to a copy that cannot take the volume over (it lacks writes, is not in
    /// sync, or is the primary already); the text says which.
    pub const NOT_READY: u16 = 10;
}

/// Bits of [`Kind::fields`]: the header fields a kind uses. The others must be zero.
mod field {
    pub const VOLUME: u8 = 1 << 0;
    pub const EPOCH: u8 = 1 << 1;
    pub const SEQUENCE: u8 = 1 << 2;
    pub const LBA: u8 = 1 << 3;
    pub const BLOCKS: u8 = 1 << 4;
    pub const STATUS: u8 = 1 << 5;
}

/// What a kind's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadRule {
    /// No payload.
    Empty,
    /// At least one byte of block data.
    Data,
    /// Block data when the status is OK; none otherwise.
    DataIfOk,
    /// A Hello payload.
    Hello,
    /// (region, sequence) pairs when the status is OK; none otherwise.
    ProbePairs,
    /// UTF-8 text, possibly empty.
    Text,
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloOk = 2,
    Write = 3,
    WriteZeroes = 4,
    Trim = 5,
    Flush = 6,
    Ack = 7,
    FlushAck = 8,
    Read = 9,
    ReadReply = 10,
    Probe = 11,
    ProbeReply = 12,
    Epoch = 13,
    EpochOk = 14,
    Refused = 15,
    Resync = 16,
    Handover = 17,
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 17] = [
        Kind::Hello,
        Kind::HelloOk,
        Kind::Write,
        Kind::WriteZeroes,
        Kind::Trim,
        Kind::Flush,
        Kind::Ack,
        Kind::FlushAck,
        Kind::Read,
        Kind::ReadReply,
        Kind::Probe,
        Kind::ProbeReply,
        Kind::Epoch,
        Kind::EpochOk,
        Kind::Refused,
        Kind::Resync,
        Kind::Handover,
    ];

    /// The value on the wire.
    #[inline]
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The kind for a wire value, if version 1 defines it.
    #[inline]
    pub const fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Hello,
            2 => Kind::HelloOk,
            3 => Kind::Write,
            4 => Kind::WriteZeroes,
            5 => Kind::Trim,
            6 => Kind::Flush,
            7 => Kind::Ack,
            8 => Kind::FlushAck,
            9 => Kind::Read,
            10 => Kind::ReadReply,
            11 => Kind::Probe,
            12 => Kind::ProbeReply,
            13 => Kind::Epoch,
            14 => Kind::EpochOk,
            15 => Kind::Refused,
            16 => Kind::Resync,
            17 => Kind::Handover,
            _ => return None,
        })
    }

    /// The kind's name, as the module documentation spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::HelloOk => "HelloOk",
            Kind::Write => "Write",
            Kind::WriteZeroes => "WriteZeroes",
            Kind::Trim => "Trim",
            Kind::Flush => "Flush",
            Kind::Ack => "Ack",
            Kind::FlushAck => "FlushAck",
            Kind::Read => "Read",
            Kind::ReadReply => "ReadReply",
            Kind::Probe => "Probe",
            Kind::ProbeReply => "ProbeReply",
            Kind::Epoch => "Epoch",
            Kind::EpochOk => "EpochOk",
            Kind::Refused => "Refused",
            Kind::Resync => "Resync",
            Kind::Handover => "Handover",
        }
    }

    /// Whether the frame belongs to a volume (and so carries its epoch), rather than to the
    /// session (Hello, HelloOk).
    #[inline]
    pub const fn is_volume_scoped(self) -> bool {
        !matches!(self, Kind::Hello | Kind::HelloOk)
    }

    /// Whether the kind changes a volume's contents (and takes a sequence number).
    #[inline]
    pub const fn is_write(self) -> bool {
        matches!(self, Kind::Write | Kind::WriteZeroes | Kind::Trim)
    }

    /// Whether FUA is allowed: on writes only.
    #[inline]
    pub const fn allows_fua(self) -> bool {
        self.is_write()
    }

    /// Whether a node may forward it to the primary as a client's IO.
    #[inline]
    pub const fn allows_forwarded(self) -> bool {
        matches!(
            self,
            Kind::Write | Kind::WriteZeroes | Kind::Flush | Kind::Read
        )
    }

    /// Whether `block_count` must be at least one.
    #[inline]
    const fn needs_blocks(self) -> bool {
        matches!(
            self,
            Kind::Write | Kind::WriteZeroes | Kind::Trim | Kind::Read | Kind::Probe | Kind::Resync
        )
    }

    /// The header fields the kind uses ([`field`] bits).
    const fn fields(self) -> u8 {
        use field::{BLOCKS, EPOCH, LBA, SEQUENCE, STATUS, VOLUME};
        match self {
            Kind::Hello | Kind::HelloOk => 0,
            Kind::Write | Kind::WriteZeroes | Kind::Trim => {
                VOLUME | EPOCH | SEQUENCE | LBA | BLOCKS
            }
            Kind::Flush | Kind::Handover => VOLUME | EPOCH | SEQUENCE,
            Kind::Ack | Kind::FlushAck => VOLUME | EPOCH | SEQUENCE | STATUS,
            Kind::Read | Kind::Probe | Kind::Resync => VOLUME | EPOCH | LBA | BLOCKS,
            Kind::ReadReply | Kind::ProbeReply => VOLUME | EPOCH | SEQUENCE | LBA | BLOCKS | STATUS,
            Kind::Epoch => VOLUME | EPOCH | SEQUENCE | STATUS,
            Kind::EpochOk => VOLUME | EPOCH | SEQUENCE | STATUS,
            Kind::Refused => VOLUME | EPOCH | STATUS,
        }
    }

    const fn payload_rule(self) -> PayloadRule {
        match self {
            Kind::Hello | Kind::HelloOk => PayloadRule::Hello,
            Kind::Write | Kind::Resync => PayloadRule::Data,
            Kind::ReadReply => PayloadRule::DataIfOk,
            Kind::ProbeReply => PayloadRule::ProbePairs,
            Kind::Refused => PayloadRule::Text,
            Kind::WriteZeroes
            | Kind::Trim
            | Kind::Flush
            | Kind::Ack
            | Kind::FlushAck
            | Kind::Read
            | Kind::Probe
            | Kind::Epoch
            | Kind::EpochOk
            | Kind::Handover => PayloadRule::Empty,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A frame the stream cannot go on after: the connection must be closed. Each message says
/// what was wrong with the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error(
        "frame starts with {found:02x?}, not the magic \"FTRP\" [46, 54, 52, 50]: the peer lost \
         framing or does not speak Fathom replication"
    )]
    BadMagic { found: [u8; 4] },
    #[error(
        "frame version {found}: this node speaks replication protocol versions {MIN_VERSION} to \
         {MAX_VERSION}"
    )]
    UnsupportedVersion { found: u8 },
    #[error("header length {found}: version 1 headers are {HEADER_LEN} bytes")]
    BadHeaderLength { found: u16 },
    #[error(
        "header CRC32C mismatch: the header says {stored:#010x}, its bytes give {computed:#010x} \
         (corrupted in flight or by the sender)"
    )]
    HeaderCrc { stored: u32, computed: u32 },
    #[error(
        "{kind} payload CRC32C mismatch over {len} bytes: the header says {stored:#010x}, the \
         payload gives {computed:#010x} (corrupted in flight or by the sender)"
    )]
    PayloadCrc {
        kind: Kind,
        len: u32,
        stored: u32,
        computed: u32,
    },
    #[error("unknown frame kind {code}: version 1 defines kinds 1 to 17")]
    UnknownKind { code: u8 },
    #[error("{kind} sets flag bits {flags:#06x}, which version 1 does not define")]
    UnknownFlags { kind: Kind, flags: u16 },
    #[error("{kind} sets FUA, which only Write, WriteZeroes and Trim may carry")]
    FuaNotAllowed { kind: Kind },
    #[error("{kind} is marked forwarded, which only Write, WriteZeroes, Flush and Read may be")]
    ForwardedNotAllowed { kind: Kind },
    #[error(
        "{kind} carries half a trace context (trace id {trace_id}, parent span {parent}, \
         sampled {sampled}): both ids are non-zero, or both zero and not sampled"
    )]
    PartialTrace {
        kind: Kind,
        trace_id: TraceId,
        parent: SpanId,
        sampled: bool,
    },
    #[error("{kind} does not use the {field} field, which must be zero, not {value}")]
    UnusedFieldSet {
        kind: Kind,
        field: &'static str,
        value: u64,
    },
    #[error("{kind} of zero blocks: it must cover at least one")]
    ZeroBlocks { kind: Kind },
    #[error("Refused with reason code 0: a refusal names its reason")]
    NoRefusalReason,
    #[error(
        "{kind} declares {len} bytes of payload, more than this connection's limit of {limit} \
         bytes"
    )]
    PayloadTooLarge { kind: Kind, len: u64, limit: u64 },
    #[error("{kind} carries no payload, but declares {len} bytes")]
    UnexpectedPayload { kind: Kind, len: u32 },
    #[error("{kind} must carry data, but its payload is empty")]
    MissingPayload { kind: Kind },
    #[error(
        "{kind} with status {status} (a failure) declares {len} bytes of payload; a failed \
         reply carries none"
    )]
    PayloadOnFailure { kind: Kind, status: u16, len: u32 },
    #[error("{kind} payload is malformed at byte {at}: {what}")]
    BadPayload {
        kind: Kind,
        at: usize,
        what: &'static str,
    },
}

/// A frame's header, as the sender meant it. The payload length and both CRCs are not here:
/// the encoder computes them from the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// Force unit access (writes only).
    pub fua: bool,
    /// A client's IO forwarded to the primary ([`flag::FORWARDED`]).
    pub forwarded: bool,
    /// Replies: [`status`] code; Refused: [`refusal`] reason.
    pub status: u16,
    /// Index into the session's Hello volume list.
    pub volume: u32,
    pub block_count: u32,
    pub epoch: u64,
    pub sequence: u64,
    pub lba: u64,
    pub request_id: u64,
    /// The trace the frame belongs to; `None` when it is not traced. Both ids must be
    /// non-zero.
    pub trace: Option<TraceContext>,
}

impl Header {
    /// A header of `kind` with every field zero: fill in what the kind uses, as in
    /// `Header { epoch: 5, ..Header::new(Kind::Epoch) }`.
    #[inline]
    pub const fn new(kind: Kind) -> Header {
        Header {
            kind,
            fua: false,
            forwarded: false,
            status: 0,
            volume: 0,
            block_count: 0,
            epoch: 0,
            sequence: 0,
            lba: 0,
            request_id: 0,
            trace: None,
        }
    }

    /// The header bytes of a frame with this header and `payload`, for a driver that sends
    /// header and payload from separate buffers. Refuses exactly what a receiver's
    /// [`FrameDecoder`] would refuse (bar its payload limit, which is the receiver's): the
    /// bytes are decoded again before they are returned.
    pub fn to_bytes(&self, payload: &[u8]) -> Result<[u8; HEADER_LEN], ProtoError> {
        let kind = self.kind;
        let payload_len =
            u32::try_from(payload.len()).map_err(|_| ProtoError::PayloadTooLarge {
                kind,
                len: payload.len() as u64,
                limit: u64::from(u32::MAX),
            })?;
        let (trace_id, parent, sampled) = match self.trace {
            Some(trace) => {
                if trace.trace_id.0 == 0 || trace.parent.0 == 0 {
                    return Err(ProtoError::PartialTrace {
                        kind,
                        trace_id: trace.trace_id,
                        parent: trace.parent,
                        sampled: trace.sampled,
                    });
                }
                (trace.trace_id.0, trace.parent.0, trace.sampled)
            }
            None => (0, 0, false),
        };
        let mut flags = 0;
        if self.fua {
            flags |= flag::FUA;
        }
        if sampled {
            flags |= flag::TRACE_SAMPLED;
        }
        if self.forwarded {
            flags |= flag::FORWARDED;
        }

        let mut bytes = [0u8; HEADER_LEN];
        bytes[offset::MAGIC..offset::MAGIC + 4].copy_from_slice(&MAGIC);
        bytes[offset::VERSION] = VERSION;
        bytes[offset::KIND] = kind.code();
        put_u16(&mut bytes, offset::FLAGS, flags);
        put_u16(&mut bytes, offset::HEADER_LEN, HEADER_LEN as u16);
        put_u16(&mut bytes, offset::STATUS, self.status);
        put_u32(&mut bytes, offset::PAYLOAD_LEN, payload_len);
        put_u32(&mut bytes, offset::VOLUME, self.volume);
        put_u32(&mut bytes, offset::BLOCK_COUNT, self.block_count);
        put_u64(&mut bytes, offset::EPOCH, self.epoch);
        put_u64(&mut bytes, offset::SEQUENCE, self.sequence);
        put_u64(&mut bytes, offset::LBA, self.lba);
        put_u64(&mut bytes, offset::REQUEST_ID, self.request_id);
        bytes[offset::TRACE_ID..offset::TRACE_ID + 16].copy_from_slice(&trace_id.to_be_bytes());
        bytes[offset::PARENT_SPAN..offset::PARENT_SPAN + 8].copy_from_slice(&parent.to_be_bytes());
        put_u32(&mut bytes, offset::PAYLOAD_CRC, crc32c::crc32c(payload));
        let header_crc = crc32c::crc32c(&bytes[..offset::HEADER_CRC]);
        put_u32(&mut bytes, offset::HEADER_CRC, header_crc);

        // The sender checks what the receiver will: a frame this node would refuse is never
        // sent, and the two sides cannot drift apart.
        let decoded = decode_header(&bytes, u32::MAX)?;
        debug_assert_eq!(decoded.header, *self);
        check_payload_structure(&decoded.header, payload)?;
        Ok(bytes)
    }
}

/// Appends a whole frame, header then payload, to `out`. On an error `out` is unchanged.
pub fn encode(header: &Header, payload: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let bytes = header.to_bytes(payload)?;
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&bytes);
    out.extend_from_slice(payload);
    Ok(())
}

/// A header that passed every check [`decode_header`] makes, with what it says of its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedHeader {
    pub header: Header,
    /// Bytes of payload that follow the header; within the limit `decode_header` was given.
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl DecodedHeader {
    /// Bytes of the whole frame.
    #[inline]
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// Checks the payload that followed the header: its CRC, then its structure (Hello,
    /// ProbeReply pairs, Refused text).
    ///
    /// # Panics
    ///
    /// If `payload` is not `payload_len` bytes long: the caller cut the stream wrongly.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), ProtoError> {
        assert_eq!(
            payload.len(),
            self.payload_len as usize,
            "the payload given is not the one the header declares"
        );
        let computed = crc32c::crc32c(payload);
        if computed != self.payload_crc {
            return Err(ProtoError::PayloadCrc {
                kind: self.header.kind,
                len: self.payload_len,
                stored: self.payload_crc,
                computed,
            });
        }
        check_payload_structure(&self.header, payload)
    }
}

/// Checks what the first bytes of a frame can already tell, before the whole header is in:
/// magic, version, header length. `bytes` may be shorter than a header.
pub fn check_prefix(bytes: &[u8]) -> Result<(), ProtoError> {
    if let Some(found) = bytes.first_chunk::<4>() {
        if *found != MAGIC {
            return Err(ProtoError::BadMagic { found: *found });
        }
    }
    if let Some(&found) = bytes.get(offset::VERSION) {
        if !(MIN_VERSION..=MAX_VERSION).contains(&found) {
            return Err(ProtoError::UnsupportedVersion { found });
        }
    }
    if bytes.len() >= offset::HEADER_LEN + 2 {
        let found = le_u16(bytes, offset::HEADER_LEN);
        if usize::from(found) != HEADER_LEN {
            return Err(ProtoError::BadHeaderLength { found });
        }
    }
    Ok(())
}

/// Decodes and checks one header (every check of the module documentation that needs no
/// payload), refusing a declared payload over `max_payload_bytes`. For a driver that reads
/// the payload into a buffer of its own and then calls [`DecodedHeader::check_payload`].
pub fn decode_header(
    bytes: &[u8; HEADER_LEN],
    max_payload_bytes: u32,
) -> Result<DecodedHeader, ProtoError> {
    check_prefix(bytes)?;
    let stored = le_u32(bytes, offset::HEADER_CRC);
    let computed = crc32c::crc32c(&bytes[..offset::HEADER_CRC]);
    if stored != computed {
        return Err(ProtoError::HeaderCrc { stored, computed });
    }

    let code = bytes[offset::KIND];
    let kind = Kind::from_code(code).ok_or(ProtoError::UnknownKind { code })?;
    let flags = le_u16(bytes, offset::FLAGS);
    if flags & !flag::KNOWN != 0 {
        return Err(ProtoError::UnknownFlags {
            kind,
            flags: flags & !flag::KNOWN,
        });
    }
    let fua = flags & flag::FUA != 0;
    if fua && !kind.allows_fua() {
        return Err(ProtoError::FuaNotAllowed { kind });
    }
    let forwarded = flags & flag::FORWARDED != 0;
    if forwarded && !kind.allows_forwarded() {
        return Err(ProtoError::ForwardedNotAllowed { kind });
    }

    let trace_id = TraceId(u128::from_be_bytes(array_at(bytes, offset::TRACE_ID)));
    let parent = SpanId(u64::from_be_bytes(array_at(bytes, offset::PARENT_SPAN)));
    let sampled = flags & flag::TRACE_SAMPLED != 0;
    let trace = match (trace_id.0, parent.0, sampled) {
        (0, 0, false) => None,
        (t, p, _) if t != 0 && p != 0 => Some(TraceContext {
            trace_id,
            parent,
            sampled,
        }),
        _ => {
            return Err(ProtoError::PartialTrace {
                kind,
                trace_id,
                parent,
                sampled,
            })
        }
    };

    let header = Header {
        kind,
        fua,
        forwarded,
        status: le_u16(bytes, offset::STATUS),
        volume: le_u32(bytes, offset::VOLUME),
        block_count: le_u32(bytes, offset::BLOCK_COUNT),
        epoch: le_u64(bytes, offset::EPOCH),
        sequence: le_u64(bytes, offset::SEQUENCE),
        lba: le_u64(bytes, offset::LBA),
        request_id: le_u64(bytes, offset::REQUEST_ID),
        trace,
    };
    check_fields(&header)?;

    let payload_len = le_u32(bytes, offset::PAYLOAD_LEN);
    check_payload_len(&header, payload_len)?;
    if payload_len > max_payload_bytes {
        return Err(ProtoError::PayloadTooLarge {
            kind,
            len: u64::from(payload_len),
            limit: u64::from(max_payload_bytes),
        });
    }
    Ok(DecodedHeader {
        header,
        payload_len,
        payload_crc: le_u32(bytes, offset::PAYLOAD_CRC),
    })
}

/// The fields a kind does not use are zero, the block count of those that need one is not,
/// and a refusal has a reason.
fn check_fields(header: &Header) -> Result<(), ProtoError> {
    let kind = header.kind;
    let used = kind.fields();
    let fields = [
        (field::VOLUME, "volume", u64::from(header.volume)),
        (field::EPOCH, "epoch", header.epoch),
        (field::SEQUENCE, "sequence", header.sequence),
        (field::LBA, "lba", header.lba),
        (field::BLOCKS, "block_count", u64::from(header.block_count)),
        (field::STATUS, "status", u64::from(header.status)),
    ];
    for (bit, field, value) in fields {
        if used & bit == 0 && value != 0 {
            return Err(ProtoError::UnusedFieldSet { kind, field, value });
        }
    }
    if kind.needs_blocks() && header.block_count == 0 {
        return Err(ProtoError::ZeroBlocks { kind });
    }
    if kind == Kind::Refused && header.status == 0 {
        return Err(ProtoError::NoRefusalReason);
    }
    Ok(())
}

/// What the header alone tells about whether its payload length fits the kind.
fn check_payload_len(header: &Header, len: u32) -> Result<(), ProtoError> {
    let kind = header.kind;
    let ok = header.status == status::OK;
    match kind.payload_rule() {
        PayloadRule::Empty if len != 0 => Err(ProtoError::UnexpectedPayload { kind, len }),
        PayloadRule::Data if len == 0 => Err(ProtoError::MissingPayload { kind }),
        PayloadRule::DataIfOk if ok && len == 0 => Err(ProtoError::MissingPayload { kind }),
        PayloadRule::DataIfOk | PayloadRule::ProbePairs if !ok && len != 0 => {
            Err(ProtoError::PayloadOnFailure {
                kind,
                status: header.status,
                len,
            })
        }
        PayloadRule::Hello if (len as usize) < HELLO_FIXED_LEN => Err(ProtoError::BadPayload {
            kind,
            at: len as usize,
            what: "shorter than the 12-byte fixed part of a hello",
        }),
        PayloadRule::ProbePairs if !(len as usize).is_multiple_of(PROBE_ENTRY_LEN) => {
            Err(ProtoError::BadPayload {
                kind,
                at: len as usize - len as usize % PROBE_ENTRY_LEN,
                what: "the payload is not a whole number of 16-byte (region, sequence) pairs",
            })
        }
        PayloadRule::ProbePairs if len as usize / PROBE_ENTRY_LEN > header.block_count as usize => {
            Err(ProtoError::BadPayload {
                kind,
                at: header.block_count as usize * PROBE_ENTRY_LEN,
                what: "more (region, sequence) pairs than the reply covers regions",
            })
        }
        _ => Ok(()),
    }
}

/// The checks of a payload's own structure; its length already passed [`check_payload_len`].
fn check_payload_structure(header: &Header, payload: &[u8]) -> Result<(), ProtoError> {
    let kind = header.kind;
    match kind.payload_rule() {
        PayloadRule::Hello => walk_hello(kind, payload, |_| {}).map(|_| ()),
        PayloadRule::ProbePairs => check_probe_pairs(header, payload),
        PayloadRule::Text => match std::str::from_utf8(payload) {
            Ok(_) => Ok(()),
            Err(error) => Err(ProtoError::BadPayload {
                kind,
                at: error.valid_up_to(),
                what: "refusal text is not UTF-8",
            }),
        },
        PayloadRule::Empty | PayloadRule::Data | PayloadRule::DataIfOk => Ok(()),
    }
}

fn check_probe_pairs(header: &Header, payload: &[u8]) -> Result<(), ProtoError> {
    let kind = header.kind;
    // u128, so that a range ending past u64::MAX needs no special case.
    let end = u128::from(header.lba) + u128::from(header.block_count);
    let mut previous: Option<u64> = None;
    for (index, entry) in probe_entries(payload).enumerate() {
        let at = index * PROBE_ENTRY_LEN;
        let bad = |what| ProtoError::BadPayload { kind, at, what };
        if entry.region < header.lba || u128::from(entry.region) >= end {
            return Err(bad("region outside the range the reply covers"));
        }
        if previous.is_some_and(|previous| entry.region <= previous) {
            return Err(bad("regions are not strictly ascending"));
        }
        if entry.sequence == 0 {
            return Err(ProtoError::BadPayload {
                kind,
                at: at + 8,
                what: "a region with sequence 0 is listed (never-written regions are left out)",
            });
        }
        previous = Some(entry.region);
    }
    Ok(())
}

/// A Hello or HelloOk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    /// The oldest protocol version the sender speaks (HelloOk: the chosen one).
    pub min_version: u8,
    /// The newest protocol version the sender speaks (HelloOk: the chosen one).
    pub max_version: u8,
    pub node_id: &'a str,
    pub cluster: &'a str,
    /// The authentication challenge (Hello) or response (HelloOk); opaque to the codec.
    pub auth: &'a [u8],
    /// The volumes of the session; a frame's `volume` is an index into this list.
    pub volumes: Vec<&'a str>,
}

/// The fixed part and the strings of a Hello payload, without its volume names.
struct HelloParts<'a> {
    min_version: u8,
    max_version: u8,
    node_id: &'a str,
    cluster: &'a str,
    auth: &'a [u8],
}

/// Walks a Hello payload, calling `volume` for each volume name in order; allocates nothing.
/// Every loop is bounded by the payload: each volume name takes at least three bytes.
fn walk_hello<'a>(
    kind: Kind,
    payload: &'a [u8],
    mut volume: impl FnMut(&'a str),
) -> Result<HelloParts<'a>, ProtoError> {
    let bad = |at, what| ProtoError::BadPayload { kind, at, what };
    let Some(fixed) = payload.first_chunk::<HELLO_FIXED_LEN>() else {
        return Err(bad(
            payload.len(),
            "shorter than the 12-byte fixed part of a hello",
        ));
    };
    let (min_version, max_version) = (fixed[0], fixed[1]);
    if min_version == 0 || min_version > max_version {
        return Err(bad(
            0,
            "the version range is empty or starts at 0 (min_version must be 1 to max_version)",
        ));
    }
    let node_len = usize::from(le_u16(fixed, 2));
    let cluster_len = usize::from(le_u16(fixed, 4));
    let auth_len = usize::from(le_u16(fixed, 6));
    let volume_count = le_u32(fixed, 8) as usize;

    let mut at = HELLO_FIXED_LEN;
    let mut take = |len: usize, what| -> Result<(usize, &'a [u8]), ProtoError> {
        let start = at;
        let bytes = payload
            .get(start..start.saturating_add(len))
            .ok_or(bad(start, what))?;
        at += len;
        Ok((start, bytes))
    };
    let text = |(start, bytes): (usize, &'a [u8]), what| -> Result<&'a str, ProtoError> {
        std::str::from_utf8(bytes).map_err(|error| bad(start + error.valid_up_to(), what))
    };

    if node_len == 0 {
        return Err(bad(2, "the node id is empty"));
    }
    let node_id = text(
        take(node_len, "the node id runs past the end of the payload")?,
        "the node id is not UTF-8",
    )?;
    if cluster_len == 0 {
        return Err(bad(4, "the cluster name is empty"));
    }
    let cluster = text(
        take(
            cluster_len,
            "the cluster name runs past the end of the payload",
        )?,
        "the cluster name is not UTF-8",
    )?;
    let (_, auth) = take(
        auth_len,
        "the authentication bytes run past the end of the payload",
    )?;
    for _ in 0..volume_count {
        let (start, len) = take(2, "a volume name length runs past the end of the payload")?;
        let len = usize::from(le_u16(len, 0));
        if len == 0 {
            return Err(bad(start, "a volume name is empty"));
        }
        volume(text(
            take(len, "a volume name runs past the end of the payload")?,
            "a volume name is not UTF-8",
        )?);
    }
    if at != payload.len() {
        return Err(bad(at, "bytes follow the last volume name"));
    }
    Ok(HelloParts {
        min_version,
        max_version,
        node_id,
        cluster,
        auth,
    })
}

impl<'a> Hello<'a> {
    /// Parses a Hello or HelloOk payload (errors name the kind Hello).
    pub fn parse(payload: &'a [u8]) -> Result<Hello<'a>, ProtoError> {
        Hello::parse_as(Kind::Hello, payload)
    }

    fn parse_as(kind: Kind, payload: &'a [u8]) -> Result<Hello<'a>, ProtoError> {
        let mut volumes = Vec::new();
        let parts = walk_hello(kind, payload, |name| volumes.push(name))?;
        Ok(Hello {
            min_version: parts.min_version,
            max_version: parts.max_version,
            node_id: parts.node_id,
            cluster: parts.cluster,
            auth: parts.auth,
            volumes,
        })
    }

    /// Appends the payload to `out`. Refuses what [`Hello::parse`] would (an empty version
    /// range, an empty node id, cluster or volume name) and strings too long for their length
    /// fields; on an error `out` is unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let too_long = |at, what| ProtoError::BadPayload {
            kind: Kind::Hello,
            at,
            what,
        };
        let node_len = u16::try_from(self.node_id.len())
            .map_err(|_| too_long(2, "the node id is longer than 65535 bytes"))?;
        let cluster_len = u16::try_from(self.cluster.len())
            .map_err(|_| too_long(4, "the cluster name is longer than 65535 bytes"))?;
        let auth_len = u16::try_from(self.auth.len())
            .map_err(|_| too_long(6, "the authentication bytes are longer than 65535"))?;
        let volume_count = u32::try_from(self.volumes.len())
            .map_err(|_| too_long(8, "more than 2^32 - 1 volumes"))?;
        let start = out.len();
        out.extend_from_slice(&[self.min_version, self.max_version]);
        out.extend_from_slice(&node_len.to_le_bytes());
        out.extend_from_slice(&cluster_len.to_le_bytes());
        out.extend_from_slice(&auth_len.to_le_bytes());
        out.extend_from_slice(&volume_count.to_le_bytes());
        out.extend_from_slice(self.node_id.as_bytes());
        out.extend_from_slice(self.cluster.as_bytes());
        out.extend_from_slice(self.auth);
        for name in &self.volumes {
            let Ok(len) = u16::try_from(name.len()) else {
                let at = out.len() - start;
                out.truncate(start);
                return Err(too_long(at, "a volume name is longer than 65535 bytes"));
            };
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        // The receiver's checks, on what was written.
        if let Err(error) = walk_hello(Kind::Hello, &out[start..], |_| {}) {
            out.truncate(start);
            return Err(error);
        }
        Ok(())
    }

    /// The newest protocol version both this node and the sender speak, if any: what a
    /// HelloOk answers with.
    pub fn negotiate(&self) -> Option<u8> {
        let newest = self.max_version.min(MAX_VERSION);
        (newest >= self.min_version.max(MIN_VERSION)).then_some(newest)
    }
}

/// One pair of a ProbeReply: the highest sequence a replica applied to a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeEntry {
    pub region: u64,
    pub sequence: u64,
}

/// Appends the pairs of a ProbeReply to `out`, in the order given (the header's range and
/// the ascending order are checked when the frame is encoded).
pub fn encode_probe_entries(entries: &[ProbeEntry], out: &mut Vec<u8>) {
    out.reserve(entries.len() * PROBE_ENTRY_LEN);
    for entry in entries {
        out.extend_from_slice(&entry.region.to_le_bytes());
        out.extend_from_slice(&entry.sequence.to_le_bytes());
    }
}

/// The pairs of a ProbeReply payload; a trailing partial pair (which a decoded frame never
/// has) is ignored.
pub fn probe_entries(payload: &[u8]) -> ProbeEntries<'_> {
    ProbeEntries {
        pairs: payload.chunks_exact(PROBE_ENTRY_LEN),
    }
}

/// Iterator over the pairs of a ProbeReply payload.
#[derive(Debug, Clone)]
pub struct ProbeEntries<'a> {
    pairs: std::slice::ChunksExact<'a, u8>,
}

impl Iterator for ProbeEntries<'_> {
    type Item = ProbeEntry;

    #[inline]
    fn next(&mut self) -> Option<ProbeEntry> {
        let pair = self.pairs.next()?;
        Some(ProbeEntry {
            region: le_u64(pair, 0),
            sequence: le_u64(pair, 8),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.pairs.size_hint()
    }
}

impl ExactSizeIterator for ProbeEntries<'_> {}

/// One decoded frame: its header and its payload, which borrows the decoder's buffer until
/// the next call into the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: Header,
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    #[inline]
    pub fn kind(&self) -> Kind {
        self.header.kind
    }

    #[inline]
    pub fn epoch(&self) -> u64 {
        self.header.epoch
    }

    #[inline]
    pub fn sequence(&self) -> u64 {
        self.header.sequence
    }

    #[inline]
    pub fn volume(&self) -> u32 {
        self.header.volume
    }

    #[inline]
    pub fn request_id(&self) -> u64 {
        self.header.request_id
    }

    #[inline]
    pub fn trace(&self) -> Option<TraceContext> {
        self.header.trace
    }

    /// Bytes the frame takes on the wire.
    #[inline]
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// The Hello payload of a Hello or HelloOk frame; `None` for other kinds (or a payload
    /// that does not parse, which a decoded frame never has).
    pub fn hello(&self) -> Option<Hello<'a>> {
        match self.header.kind {
            Kind::Hello | Kind::HelloOk => Hello::parse_as(self.header.kind, self.payload).ok(),
            _ => None,
        }
    }

    /// The pairs of a ProbeReply; `None` for other kinds.
    pub fn probe_entries(&self) -> Option<ProbeEntries<'a>> {
        (self.header.kind == Kind::ProbeReply).then(|| probe_entries(self.payload))
    }

    /// The text of a Refused frame; `None` for other kinds (or text that is not UTF-8, which
    /// a decoded frame never has).
    pub fn refusal_text(&self) -> Option<&'a str> {
        (self.header.kind == Kind::Refused)
            .then(|| std::str::from_utf8(self.payload).ok())
            .flatten()
    }

    /// Appends the frame's bytes to `out` ([`encode`]).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        encode(&self.header, self.payload, out)
    }
}

/// A streaming decoder for one connection's inbound bytes.
///
/// Bytes go in with [`push`](FrameDecoder::push) (or are read straight into
/// [`spare`](FrameDecoder::spare) and [`commit`](FrameDecoder::commit)ted); frames come out of
/// [`next`](FrameDecoder::next). The buffer is allocated once, one header plus the payload
/// limit long, and never grows: a frame that would not fit is refused from its header.
///
/// A driver's loop: push what the socket gave, then call `next` until it returns `None`.
/// After `next` returned `None` the buffer has room for at least one more byte, so `push`
/// accepts at least one; it accepts none only while a whole frame waits for `next`, or once
/// the decoder is poisoned.
pub struct FrameDecoder {
    buffer: Box<[u8]>,
    /// The first byte not yet yielded.
    start: usize,
    /// One past the last byte received.
    end: usize,
    max_payload_bytes: u32,
    /// The header of the frame at `start`, once it has been checked.
    pending: Option<DecodedHeader>,
    /// The error that ended the stream; returned again by every later `next`.
    poisoned: Option<ProtoError>,
}

impl Default for FrameDecoder {
    /// A decoder with the default payload limit, [`DEFAULT_MAX_PAYLOAD_BYTES`].
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_PAYLOAD_BYTES)
    }
}

impl fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &self.buffered())
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("pending", &self.pending)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl FrameDecoder {
    /// A decoder that refuses payloads over `max_payload_bytes`. It allocates
    /// `HEADER_LEN + max_payload_bytes` bytes now and nothing later.
    ///
    /// # Panics
    ///
    /// If `max_payload_bytes` exceeds [`MAX_PAYLOAD_LIMIT_BYTES`]: a configuration mistake,
    /// caught before any peer is heard.
    pub fn new(max_payload_bytes: u32) -> FrameDecoder {
        assert!(
            max_payload_bytes <= MAX_PAYLOAD_LIMIT_BYTES,
            "a replication payload limit of {max_payload_bytes} bytes is over the \
             {MAX_PAYLOAD_LIMIT_BYTES}-byte maximum"
        );
        FrameDecoder {
            buffer: vec![0u8; HEADER_LEN + max_payload_bytes as usize].into_boxed_slice(),
            start: 0,
            end: 0,
            max_payload_bytes,
            pending: None,
            poisoned: None,
        }
    }

    /// The largest payload this decoder accepts.
    #[inline]
    pub fn max_payload_bytes(&self) -> u32 {
        self.max_payload_bytes
    }

    /// Bytes received and not yet yielded as frames. Non-zero when the peer closes means it
    /// closed in the middle of a frame.
    #[inline]
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The error that poisoned the decoder, if one did.
    #[inline]
    pub fn error(&self) -> Option<&ProtoError> {
        self.poisoned.as_ref()
    }

    /// Copies as much of `bytes` as fits into the buffer and returns how many it took (see
    /// the type's documentation for when that is fewer than all). A poisoned decoder takes
    /// none.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let spare = self.spare();
        let taken = spare.len().min(bytes.len());
        spare[..taken].copy_from_slice(&bytes[..taken]);
        self.end += taken;
        taken
    }

    /// The free end of the buffer, for a driver that reads the socket straight into it and
    /// then calls [`commit`](FrameDecoder::commit). Empty once poisoned, and while a whole
    /// frame waits for [`next`](FrameDecoder::next) and fills the buffer.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.poisoned.is_some() {
            return &mut [];
        }
        self.make_room();
        &mut self.buffer[self.end..]
    }

    /// Records that the first `len` bytes of [`spare`](FrameDecoder::spare) were filled.
    ///
    /// # Panics
    ///
    /// If `len` is more than `spare` offered.
    pub fn commit(&mut self, len: usize) {
        let spare = if self.poisoned.is_some() {
            0
        } else {
            self.buffer.len() - self.end
        };
        assert!(
            len <= spare,
            "committed {len} bytes, but only {spare} were spare"
        );
        self.end += len;
    }

    /// The next whole frame, `None` if more bytes are needed, or the error that ends the
    /// stream (returned again on every later call: the connection must close).
    // A lending iterator: the frame borrows the buffer, which `Iterator` cannot express.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Frame<'_>, ProtoError>> {
        if let Some(error) = &self.poisoned {
            return Some(Err(error.clone()));
        }
        match self.decode_one() {
            Ok(None) => None,
            Ok(Some((header, payload))) => Some(Ok(Frame {
                header,
                payload: &self.buffer[payload],
            })),
            Err(error) => {
                self.poisoned = Some(error.clone());
                Some(Err(error))
            }
        }
    }

    /// Checks the frame at `start` as far as the bytes in allow; on a whole, valid frame,
    /// moves `start` past it and returns its header and where its payload lies.
    fn decode_one(&mut self) -> Result<Option<(Header, Range<usize>)>, ProtoError> {
        let available = &self.buffer[self.start..self.end];
        let decoded = match self.pending {
            Some(decoded) => decoded,
            None => {
                let Some(header) = available.first_chunk::<HEADER_LEN>() else {
                    check_prefix(available)?;
                    return Ok(None);
                };
                let decoded = decode_header(header, self.max_payload_bytes)?;
                self.pending = Some(decoded);
                decoded
            }
        };
        let frame_len = decoded.frame_len();
        if available.len() < frame_len {
            return Ok(None);
        }
        let payload = self.start + HEADER_LEN..self.start + frame_len;
        decoded.check_payload(&self.buffer[payload.clone()])?;
        self.pending = None;
        self.start += frame_len;
        Ok(Some((decoded.header, payload)))
    }

    /// Moves the unread bytes to the front of the buffer when the frame at `start` would not
    /// fit behind them otherwise. The buffer holds the largest frame, so after this there is
    /// room for the rest of the current frame, and at least one byte unless a whole frame
    /// fills the buffer.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            return;
        }
        let frame_len = self
            .pending
            .map_or(HEADER_LEN, |decoded| decoded.frame_len());
        let needed = frame_len.saturating_sub(self.end - self.start).max(1);
        if self.buffer.len() - self.end < needed {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

/// What a replica does with a volume frame whose epoch passed [`check_epoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochVerdict {
    /// The frame is of the replica's current epoch (or carries none: Hello, HelloOk).
    Current,
    /// An Epoch frame claims a newer epoch: the replica records `epoch` durably, then
    /// answers EpochOk.
    Adopt { epoch: u64 },
}

/// Why a replica refuses a frame on its epoch; the text goes into the Refused payload and
/// [`Refusal::reason`] into its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "stale epoch {frame_epoch} < {current_epoch}: the sender was deposed, this replica \
         follows epoch {current_epoch}"
    )]
    StaleEpoch {
        kind: Kind,
        frame_epoch: u64,
        current_epoch: u64,
    },
    #[error(
        "{kind} at epoch {frame_epoch} > {current_epoch}: a replica moves to a newer epoch only \
         on an Epoch frame claiming it"
    )]
    EpochNotClaimed {
        kind: Kind,
        frame_epoch: u64,
        current_epoch: u64,
    },
}

impl Refusal {
    /// The Refused frame's reason code ([`refusal`]).
    pub const fn reason(&self) -> u16 {
        match self {
            Refusal::StaleEpoch { .. } => refusal::STALE_EPOCH,
            Refusal::EpochNotClaimed { .. } => refusal::EPOCH_NOT_CLAIMED,
        }
    }

    /// The refusing replica's epoch, for the Refused frame's epoch field.
    pub const fn current_epoch(&self) -> u64 {
        match *self {
            Refusal::StaleEpoch { current_epoch, .. }
            | Refusal::EpochNotClaimed { current_epoch, .. } => current_epoch,
        }
    }
}

/// The fencing rule a replica applies to every frame from a primary, given the volume's
/// current epoch: a frame from an older epoch is refused (its sender was deposed); a newer
/// epoch is taken only from an Epoch frame, which the replica adopts; a frame of the current
/// epoch is accepted, an Epoch frame re-claiming it included (a primary that reconnects
/// claims again). Hello and HelloOk carry no epoch and are accepted.
pub fn check_epoch(current_epoch: u64, header: &Header) -> Result<EpochVerdict, Refusal> {
    let kind = header.kind;
    let frame_epoch = header.epoch;
    if !kind.is_volume_scoped() || frame_epoch == current_epoch {
        return Ok(EpochVerdict::Current);
    }
    if frame_epoch < current_epoch {
        return Err(Refusal::StaleEpoch {
            kind,
            frame_epoch,
            current_epoch,
        });
    }
    if kind == Kind::Epoch {
        return Ok(EpochVerdict::Adopt { epoch: frame_epoch });
    }
    Err(Refusal::EpochNotClaimed {
        kind,
        frame_epoch,
        current_epoch,
    })
}

/// `N` bytes of `bytes` from `at`; the caller's offsets are constants within the header.
#[inline]
fn array_at<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut value = [0u8; N];
    value.copy_from_slice(&bytes[at..at + N]);
    value
}

#[inline]
fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array_at(bytes, at))
}

#[inline]
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array_at(bytes, at))
}

#[inline]
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array_at(bytes, at))
}

#[inline]
fn put_u16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

#[inline]
fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

#[inline]
fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// CRC32C bit by bit (reflected Castagnoli polynomial 0x82f63b78), independent of the
    /// `crc32c` crate, so the tests check that crate's use too.
    fn reference_crc32c(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn trace() -> TraceContext {
        TraceContext {
            trace_id: TraceId(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c),
            parent: SpanId(0xb7ad_6b71_6920_3331),
            sampled: true,
        }
    }

    fn hello_payload(volumes: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        Hello {
            min_version: 1,
            max_version: 3,
            node_id: "node-a",
            cluster: "east",
            auth: b"challenge",
            volumes: volumes.to_vec(),
        }
        .encode(&mut out)
        .unwrap();
        out
    }

    /// A valid frame of every kind.
    fn sample_frames() -> Vec<(Header, Vec<u8>)> {
        let io = |kind| Header {
            volume: 1,
            epoch: 5,
            sequence: 42,
            lba: 4096,
            block_count: 8,
            request_id: 7,
            ..Header::new(kind)
        };
        let mut probe = Vec::new();
        encode_probe_entries(
            &[
                ProbeEntry {
                    region: 10,
                    sequence: 40,
                },
                ProbeEntry {
                    region: 12,
                    sequence: 42,
                },
            ],
            &mut probe,
        );
        vec![
            (
                Header {
                    request_id: 1,
                    ..Header::new(Kind::Hello)
                },
                hello_payload(&["vol-a", "vol-b"]),
            ),
            (Header::new(Kind::HelloOk), hello_payload(&[])),
            (
                Header {
                    fua: true,
                    trace: Some(trace()),
                    ..io(Kind::Write)
                },
                vec![0xa5; 4096],
            ),
            (io(Kind::WriteZeroes), vec![]),
            (
                Header {
                    fua: true,
                    ..io(Kind::Trim)
                },
                vec![],
            ),
            (
                Header {
                    lba: 0,
                    block_count: 0,
                    ..io(Kind::Flush)
                },
                vec![],
            ),
            (
                Header {
                    lba: 0,
                    block_count: 0,
                    status: status::IO_ERROR,
                    ..io(Kind::Ack)
                },
                vec![],
            ),
            (
                Header {
                    lba: 0,
                    block_count: 0,
                    ..io(Kind::FlushAck)
                },
                vec![],
            ),
            (
                Header {
                    sequence: 0,
                    ..io(Kind::Read)
                },
                vec![],
            ),
            (io(Kind::ReadReply), vec![1, 2, 3]),
            (
                Header {
                    sequence: 0,
                    lba: 10,
                    block_count: 100,
                    ..io(Kind::Probe)
                },
                vec![],
            ),
            (
                Header {
                    lba: 10,
                    block_count: 3,
                    ..io(Kind::ProbeReply)
                },
                probe,
            ),
            (
                Header {
                    sequence: 0,
                    lba: 0,
                    block_count: 0,
                    epoch: 6,
                    ..io(Kind::Epoch)
                },
                vec![],
            ),
            (
                Header {
                    lba: 0,
                    block_count: 0,
                    epoch: 6,
                    ..io(Kind::EpochOk)
                },
                vec![],
            ),
            (
                Header {
                    sequence: 0,
                    lba: 0,
                    block_count: 0,
                    status: refusal::STALE_EPOCH,
                    ..io(Kind::Refused)
                },
                b"stale epoch 4 < 5".to_vec(),
            ),
            (
                Header {
                    sequence: 0,
                    lba: 2048,
                    block_count: 2,
                    ..io(Kind::Resync)
                },
                vec![0x5a; 8192],
            ),
            (
                Header {
                    volume: 1,
                    epoch: 5,
                    sequence: 42,
                    ..Header::new(Kind::Handover)
                },
                Vec::new(),
            ),
        ]
    }

    fn frame_bytes(header: &Header, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(header, payload, &mut out).unwrap();
        out
    }

    /// Everything a fresh decoder makes of `bytes` pushed at once: the frames (owned) and
    /// the error that ended them, if any.
    fn decode_all(bytes: &[u8]) -> (Vec<(Header, Vec<u8>)>, Option<ProtoError>) {
        let mut decoder = FrameDecoder::default();
        let mut frames = Vec::new();
        let mut fed = 0;
        loop {
            fed += decoder.push(&bytes[fed..]);
            loop {
                match decoder.next() {
                    None => break,
                    Some(Ok(frame)) => frames.push((frame.header, frame.payload.to_vec())),
                    Some(Err(error)) => return (frames, Some(error)),
                }
            }
            if fed == bytes.len() {
                return (frames, None);
            }
        }
    }

    fn decode_error(bytes: &[u8]) -> ProtoError {
        let (frames, error) = decode_all(bytes);
        assert!(frames.is_empty(), "{frames:?}");
        error.expect("the bytes were refused")
    }

    /// A header's bytes with `edit` applied and the header CRC made right again, to reach
    /// the checks behind the CRC.
    fn reseal(mut bytes: Vec<u8>, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        edit(&mut bytes);
        let crc = reference_crc32c(&bytes[..offset::HEADER_CRC]);
        bytes[offset::HEADER_CRC..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    fn flush() -> Header {
        Header {
            volume: 1,
            epoch: 5,
            sequence: 9,
            ..Header::new(Kind::Flush)
        }
    }

    #[test]
    fn crc_is_castagnoli() {
        assert_eq!(reference_crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(b""), 0);
    }

    #[test]
    fn every_kind_round_trips() {
        let frames = sample_frames();
        let kinds: Vec<Kind> = frames.iter().map(|(header, _)| header.kind).collect();
        assert_eq!(kinds, Kind::ALL, "one sample per kind, in code order");
        let mut stream = Vec::new();
        for (header, payload) in &frames {
            let bytes = frame_bytes(header, payload);
            assert_eq!(bytes.len(), HEADER_LEN + payload.len());
            stream.extend_from_slice(&bytes);
        }
        let (decoded, error) = decode_all(&stream);
        assert_eq!(error, None);
        assert_eq!(decoded, frames);
        for kind in Kind::ALL {
            assert_eq!(Kind::from_code(kind.code()), Some(kind));
        }
        assert_eq!(Kind::from_code(0), None);
        assert_eq!(Kind::from_code(18), None);
    }

    /// The fuzz target's seeds (`fuzz/seeds/decode`, a chunking byte and a stream) hold a
    /// valid frame of every kind, a forwarded one and a traced one: a fuzzer mutating them
    /// starts past the CRCs. `FATHOM_WRITE_FUZZ_SEEDS=1` writes them again from the samples.
    #[test]
    fn the_fuzz_seeds_are_valid_frames_of_every_kind() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode");
        let mut seeds: Vec<(String, Header, Vec<u8>)> = sample_frames()
            .into_iter()
            .map(|(header, payload)| (header.kind.name().to_lowercase(), header, payload))
            .collect();
        let (_, write, payload) = seeds
            .iter()
            .find(|(_, header, _)| header.kind == Kind::Write)
            .cloned()
            .expect("a sample write");
        seeds.push((
            "forwarded".into(),
            Header {
                forwarded: true,
                ..write
            },
            payload.clone(),
        ));
        seeds.push((
            "traced".into(),
            Header {
                trace: Some(trace()),
                ..write
            },
            payload,
        ));
        if std::env::var_os("FATHOM_WRITE_FUZZ_SEEDS").is_some() {
            for (name, header, payload) in &seeds {
                let mut bytes = vec![0x5a];
                bytes.extend(frame_bytes(header, payload));
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        let mut kinds = std::collections::BTreeSet::new();
        for (name, _, _) in &seeds {
            let bytes = std::fs::read(dir.join(name))
                .unwrap_or_else(|error| panic!("seed {name}: {error} (FATHOM_WRITE_FUZZ_SEEDS=1)"));
            let (decoded, error) = decode_all(&bytes[1..]);
            assert_eq!(error, None, "seed {name}");
            assert_eq!(decoded.len(), 1, "seed {name}");
            kinds.insert(decoded[0].0.kind.code());
        }
        assert_eq!(kinds.len(), Kind::ALL.len());
    }

    #[test]
    fn write_frame_layout_matches_the_specification() {
        let header = Header {
            kind: Kind::Write,
            fua: true,
            forwarded: false,
            status: 0,
            volume: 2,
            block_count: 1,
            epoch: 7,
            sequence: 0x0102_0304_0506_0708,
            lba: 0x1000,
            request_id: 0xdead_beef,
            trace: Some(trace()),
        };
        let expected: [u8; HEADER_LEN] = [
            b'F', b'T', b'R', b'P', // magic
            1,    // version
            3,    // kind: Write
            0x03, 0x00, // flags: FUA | TRACE_SAMPLED
            88, 0, // header_len
            0, 0, // status
            8, 0, 0, 0, // payload_len
            2, 0, 0, 0, // volume
            1, 0, 0, 0, // block_count
            7, 0, 0, 0, 0, 0, 0, 0, // epoch
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // sequence
            0x00, 0x10, 0, 0, 0, 0, 0, 0, // lba
            0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0, // request_id
            0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, // trace id, traceparent order
            0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80, 0x31, 0x9c, //
            0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31, // parent span, traceparent order
            0xb7, 0x21, 0x94, 0x0a, // payload CRC32C of "abcdefgh": 0x0a9421b7
            0x7c, 0xb6, 0x02, 0xf1, // header CRC32C of bytes 0..84: 0xf102b67c
        ];
        assert_eq!(header.to_bytes(b"abcdefgh").unwrap(), expected);
        assert_eq!(reference_crc32c(b"abcdefgh"), 0x0a94_21b7);
        assert_eq!(reference_crc32c(&expected[..84]), 0xf102_b67c);
        let mut wire = expected.to_vec();
        wire.extend_from_slice(b"abcdefgh");
        assert_eq!(frame_bytes(&header, b"abcdefgh"), wire);
        assert_eq!(
            decode_all(&wire),
            (vec![(header, b"abcdefgh".to_vec())], None)
        );
        // Bytes 56..80 read as the traceparent's ids.
        let hex: String = expected[56..80]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(trace().to_traceparent().contains(&hex[..32]));
        assert!(trace().to_traceparent().contains(&hex[32..]));
    }

    #[test]
    fn every_header_byte_is_checked() {
        let bytes = frame_bytes(&flush(), &[]);
        for at in 0..HEADER_LEN {
            for bit in 0..8 {
                let mut corrupt = bytes.clone();
                corrupt[at] ^= 1 << bit;
                let error = decode_error(&corrupt);
                let expected = match at {
                    0..4 => matches!(error, ProtoError::BadMagic { .. }),
                    4 => matches!(error, ProtoError::UnsupportedVersion { .. }),
                    8 | 9 => matches!(error, ProtoError::BadHeaderLength { .. }),
                    _ => matches!(error, ProtoError::HeaderCrc { .. }),
                };
                assert!(expected, "byte {at} bit {bit}: {error}");
            }
        }
    }

    #[test]
    fn a_flipped_payload_byte_fails_the_payload_crc() {
        let (header, payload) = sample_frames().swap_remove(2);
        assert_eq!(header.kind, Kind::Write);
        let mut bytes = frame_bytes(&header, &payload);
        bytes[HEADER_LEN + 100] ^= 0x10;
        let error = decode_error(&bytes);
        let stored = crc32c::crc32c(&payload);
        let computed = reference_crc32c(&bytes[HEADER_LEN..]);
        assert_eq!(
            error,
            ProtoError::PayloadCrc {
                kind: Kind::Write,
                len: 4096,
                stored,
                computed
            }
        );
        assert!(error
            .to_string()
            .starts_with("Write payload CRC32C mismatch over 4096 bytes: the header says 0x"));
    }

    #[test]
    fn bad_magic_is_refused_from_the_first_four_bytes() {
        let mut decoder = FrameDecoder::default();
        assert_eq!(decoder.push(b"GET"), 3);
        assert!(decoder.next().is_none());
        decoder.push(b" / HTTP/1.1\r\n");
        let error = decoder.next().unwrap().unwrap_err();
        assert_eq!(error, ProtoError::BadMagic { found: *b"GET " });
        assert_eq!(
            error.to_string(),
            "frame starts with [47, 45, 54, 20], not the magic \"FTRP\" [46, 54, 52, 50]: the \
             peer lost framing or does not speak Fathom replication"
        );
    }

    #[test]
    fn unsupported_version_says_which_versions_this_node_speaks() {
        let mut bytes = frame_bytes(&flush(), &[]);
        bytes[offset::VERSION] = 2;
        let error = decode_error(&bytes[..5]);
        assert_eq!(error, ProtoError::UnsupportedVersion { found: 2 });
        assert_eq!(
            error.to_string(),
            "frame version 2: this node speaks replication protocol versions 1 to 1"
        );
    }

    #[test]
    fn header_length_must_be_88() {
        let bytes = reseal(frame_bytes(&flush(), &[]), |b| b[offset::HEADER_LEN] = 96);
        assert_eq!(
            decode_error(&bytes[..10]),
            ProtoError::BadHeaderLength { found: 96 }
        );
        assert_eq!(
            decode_error(&bytes).to_string(),
            "header length 96: version 1 headers are 88 bytes"
        );
    }

    #[test]
    fn header_crc_mismatch_names_both_values() {
        let mut bytes = frame_bytes(&flush(), &[]);
        bytes[offset::EPOCH] ^= 1;
        let computed = reference_crc32c(&bytes[..offset::HEADER_CRC]);
        let stored = le_u32(&bytes, offset::HEADER_CRC);
        assert_eq!(
            decode_error(&bytes),
            ProtoError::HeaderCrc { stored, computed }
        );
        // The stored CRC itself corrupted.
        let mut bytes = frame_bytes(&flush(), &[]);
        bytes[offset::HEADER_CRC + 3] ^= 0x80;
        assert!(matches!(decode_error(&bytes), ProtoError::HeaderCrc { .. }));
    }

    #[test]
    fn unknown_kinds_are_refused() {
        for code in [0u8, 18, 255] {
            let bytes = reseal(frame_bytes(&flush(), &[]), |b| b[offset::KIND] = code);
            let error = decode_error(&bytes);
            assert_eq!(error, ProtoError::UnknownKind { code });
            assert!(error.to_string().contains("kinds 1 to 17"));
        }
    }

    #[test]
    fn undefined_flags_and_fua_outside_writes_are_refused() {
        let bytes = reseal(frame_bytes(&flush(), &[]), |b| b[offset::FLAGS + 1] = 0x80);
        assert_eq!(
            decode_error(&bytes),
            ProtoError::UnknownFlags {
                kind: Kind::Flush,
                flags: 0x8000
            }
        );
        let bytes = reseal(frame_bytes(&flush(), &[]), |b| b[offset::FLAGS] = 0x01);
        assert_eq!(
            decode_error(&bytes),
            ProtoError::FuaNotAllowed { kind: Kind::Flush }
        );
        // The encoder refuses the same.
        let header = Header {
            fua: true,
            ..flush()
        };
        assert_eq!(
            header.to_bytes(&[]),
            Err(ProtoError::FuaNotAllowed { kind: Kind::Flush })
        );
    }

    #[test]
    fn the_forwarded_flag_round_trips_on_client_requests_only() {
        let forwarded = Header {
            forwarded: true,
            ..flush()
        };
        let (frames, error) = decode_all(&frame_bytes(&forwarded, &[]));
        assert_eq!(error, None);
        assert!(frames[0].0.forwarded);
        let ack = Header {
            volume: 1,
            epoch: 5,
            sequence: 9,
            ..Header::new(Kind::Ack)
        };
        let bytes = reseal(frame_bytes(&ack, &[]), |b| {
            b[offset::FLAGS] = flag::FORWARDED as u8
        });
        assert_eq!(
            decode_error(&bytes),
            ProtoError::ForwardedNotAllowed { kind: Kind::Ack }
        );
        assert_eq!(
            Header {
                forwarded: true,
                ..ack
            }
            .to_bytes(&[]),
            Err(ProtoError::ForwardedNotAllowed { kind: Kind::Ack })
        );
    }

    #[test]
    fn a_trace_context_is_all_or_nothing() {
        let zero_parent = reseal(frame_bytes(&flush(), &[]), |b| b[offset::TRACE_ID] = 1);
        assert!(matches!(
            decode_error(&zero_parent),
            ProtoError::PartialTrace { sampled: false, .. }
        ));
        let sampled_untraced = reseal(frame_bytes(&flush(), &[]), |b| {
            b[offset::FLAGS] = flag::TRACE_SAMPLED as u8
        });
        assert!(matches!(
            decode_error(&sampled_untraced),
            ProtoError::PartialTrace { sampled: true, .. }
        ));
        let header = Header {
            trace: Some(TraceContext {
                parent: SpanId(0),
                ..trace()
            }),
            ..flush()
        };
        assert!(matches!(
            header.to_bytes(&[]),
            Err(ProtoError::PartialTrace { .. })
        ));
        // Traced but not sampled is a valid context.
        let header = Header {
            trace: Some(TraceContext {
                sampled: false,
                ..trace()
            }),
            ..flush()
        };
        let bytes = frame_bytes(&header, &[]);
        assert_eq!(decode_all(&bytes).0[0].0.trace, header.trace);
    }

    #[test]
    fn fields_a_kind_does_not_use_must_be_zero() {
        let bytes = reseal(frame_bytes(&flush(), &[]), |b| b[offset::LBA] = 1);
        let error = decode_error(&bytes);
        assert_eq!(
            error,
            ProtoError::UnusedFieldSet {
                kind: Kind::Flush,
                field: "lba",
                value: 1
            }
        );
        assert_eq!(
            error.to_string(),
            "Flush does not use the lba field, which must be zero, not 1"
        );
        let hello = Header {
            epoch: 3,
            ..Header::new(Kind::Hello)
        };
        assert_eq!(
            hello.to_bytes(&hello_payload(&[])),
            Err(ProtoError::UnusedFieldSet {
                kind: Kind::Hello,
                field: "epoch",
                value: 3
            })
        );
        let write = Header {
            status: 1,
            block_count: 1,
            ..Header::new(Kind::Write)
        };
        assert!(matches!(
            write.to_bytes(b"x"),
            Err(ProtoError::UnusedFieldSet {
                field: "status",
                ..
            })
        ));
    }

    #[test]
    fn io_of_zero_blocks_and_refusals_without_reason_are_refused() {
        for kind in [
            Kind::Write,
            Kind::WriteZeroes,
            Kind::Trim,
            Kind::Read,
            Kind::Probe,
        ] {
            let payload: &[u8] = if kind == Kind::Write { b"data" } else { b"" };
            assert_eq!(
                Header::new(kind).to_bytes(payload),
                Err(ProtoError::ZeroBlocks { kind })
            );
        }
        assert_eq!(
            Header::new(Kind::Refused).to_bytes(b"why"),
            Err(ProtoError::NoRefusalReason)
        );
    }

    #[test]
    fn payload_lengths_must_fit_the_kind() {
        // A Flush with payload, refused by the encoder and, resealed, by the decoder.
        assert_eq!(
            flush().to_bytes(b"x"),
            Err(ProtoError::UnexpectedPayload {
                kind: Kind::Flush,
                len: 1
            })
        );
        let mut bytes = reseal(frame_bytes(&flush(), &[]), |b| {
            b[offset::PAYLOAD_LEN] = 1;
            b[offset::PAYLOAD_CRC..offset::PAYLOAD_CRC + 4]
                .copy_from_slice(&reference_crc32c(b"x").to_le_bytes());
        });
        bytes.push(b'x');
        assert_eq!(
            decode_error(&bytes),
            ProtoError::UnexpectedPayload {
                kind: Kind::Flush,
                len: 1
            }
        );
        let ack = Header {
            volume: 1,
            epoch: 1,
            sequence: 1,
            ..Header::new(Kind::Ack)
        };
        assert!(matches!(
            ack.to_bytes(&[0; 8]),
            Err(ProtoError::UnexpectedPayload { .. })
        ));

        let write = Header {
            block_count: 1,
            ..Header::new(Kind::Write)
        };
        assert_eq!(
            write.to_bytes(&[]),
            Err(ProtoError::MissingPayload { kind: Kind::Write })
        );
        let reply = Header {
            block_count: 1,
            ..Header::new(Kind::ReadReply)
        };
        assert_eq!(
            reply.to_bytes(&[]),
            Err(ProtoError::MissingPayload {
                kind: Kind::ReadReply
            })
        );
        let failed = Header {
            status: status::IO_ERROR,
            ..reply
        };
        assert!(failed.to_bytes(&[]).is_ok());
        assert_eq!(
            failed.to_bytes(b"x"),
            Err(ProtoError::PayloadOnFailure {
                kind: Kind::ReadReply,
                status: status::IO_ERROR,
                len: 1
            })
        );
    }

    #[test]
    fn a_payload_over_the_limit_is_refused_from_the_header_alone() {
        let header = Header {
            block_count: 1,
            ..Header::new(Kind::Write)
        };
        let bytes = frame_bytes(&header, &[7; 4097]);
        let mut decoder = FrameDecoder::new(4096);
        // Only the header: the decoder does not wait for a payload it would refuse.
        assert_eq!(decoder.push(&bytes[..HEADER_LEN]), HEADER_LEN);
        let error = decoder.next().unwrap().unwrap_err();
        assert_eq!(
            error,
            ProtoError::PayloadTooLarge {
                kind: Kind::Write,
                len: 4097,
                limit: 4096
            }
        );
        assert_eq!(
            error.to_string(),
            "Write declares 4097 bytes of payload, more than this connection's limit of 4096 bytes"
        );
        // One byte less fits.
        let mut decoder = FrameDecoder::new(4096);
        let bytes = frame_bytes(&header, &[7; 4096]);
        assert_eq!(decoder.push(&bytes), bytes.len());
        assert_eq!(decoder.next().unwrap().unwrap().payload.len(), 4096);
        // The largest declared length never allocates: it is refused the same way.
        let huge = reseal(bytes[..HEADER_LEN].to_vec(), |b| {
            b[offset::PAYLOAD_LEN..offset::PAYLOAD_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes())
        });
        assert!(matches!(
            decode_error(&huge),
            ProtoError::PayloadTooLarge { len, .. } if len == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn hello_payloads_round_trip_and_refuse_inconsistent_lengths() {
        let payload = hello_payload(&["vol-a", "vol-b"]);
        let hello = Hello::parse(&payload).unwrap();
        assert_eq!(hello.node_id, "node-a");
        assert_eq!(hello.cluster, "east");
        assert_eq!(hello.auth, b"challenge");
        assert_eq!(hello.volumes, ["vol-a", "vol-b"]);
        assert_eq!(hello.negotiate(), Some(1));
        assert_eq!(
            &payload[..HELLO_FIXED_LEN],
            &[1, 3, 6, 0, 4, 0, 9, 0, 2, 0, 0, 0]
        );
        assert_eq!(&payload[12..18], b"node-a");
        assert_eq!(&payload[31..38], b"\x05\x00vol-a");

        let header = Header::new(Kind::Hello);
        let malformed = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut payload = payload.clone();
            edit(&mut payload);
            match header.to_bytes(&payload) {
                Err(ProtoError::BadPayload { what, at, .. }) => (what, at),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            malformed(&|p| p.truncate(11)).0,
            "shorter than the 12-byte fixed part of a hello"
        );
        assert_eq!(
            malformed(&|p| p[0] = 0).0,
            "the version range is empty or starts at 0 (min_version must be 1 to max_version)"
        );
        assert_eq!(
            malformed(&|p| p[2] = 200),
            ("the node id runs past the end of the payload", 12)
        );
        assert_eq!(
            malformed(&|p| p.push(0)),
            ("bytes follow the last volume name", payload.len())
        );
        assert_eq!(
            malformed(&|p| p[8] = 3).0,
            "a volume name length runs past the end of the payload"
        );
        assert_eq!(
            malformed(&|p| p[12] = 0xff),
            ("the node id is not UTF-8", 12)
        );
        assert_eq!(malformed(&|p| p[31] = 0).0, "a volume name is empty");
        // A huge volume count cannot make the walk run long: it fails at the payload's end.
        assert_eq!(
            malformed(&|p| p[8..12].copy_from_slice(&u32::MAX.to_le_bytes())).0,
            "a volume name length runs past the end of the payload"
        );

        let mut out = vec![9];
        let empty = Hello {
            node_id: "",
            ..hello.clone()
        };
        assert!(empty.encode(&mut out).is_err());
        assert_eq!(out, [9], "a refused encode leaves the buffer as it was");
        let newer = Hello {
            min_version: 2,
            max_version: 4,
            ..hello
        };
        assert_eq!(newer.negotiate(), None);
    }

    #[test]
    fn probe_replies_list_ascending_regions_within_their_range() {
        let reply = Header {
            volume: 0,
            epoch: 2,
            sequence: 50,
            lba: 100,
            block_count: 10,
            ..Header::new(Kind::ProbeReply)
        };
        let pairs = |entries: &[(u64, u64)]| {
            let entries: Vec<ProbeEntry> = entries
                .iter()
                .map(|&(region, sequence)| ProbeEntry { region, sequence })
                .collect();
            let mut out = Vec::new();
            encode_probe_entries(&entries, &mut out);
            out
        };
        let good = pairs(&[(100, 3), (104, 50), (109, 1)]);
        let bytes = frame_bytes(&reply, &good);
        let (frames, error) = decode_all(&bytes);
        assert_eq!(error, None);
        let frame = Frame {
            header: frames[0].0,
            payload: &frames[0].1,
        };
        let entries: Vec<ProbeEntry> = frame.probe_entries().unwrap().collect();
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[1],
            ProbeEntry {
                region: 104,
                sequence: 50
            }
        );
        assert_eq!(&good[16..24], &104u64.to_le_bytes());

        let what = |entries: &[(u64, u64)]| match reply.to_bytes(&pairs(entries)) {
            Err(ProtoError::BadPayload { what, at, .. }) => (what, at),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            what(&[(99, 1)]),
            ("region outside the range the reply covers", 0)
        );
        assert_eq!(
            what(&[(100, 1), (110, 1)]),
            ("region outside the range the reply covers", 16)
        );
        assert_eq!(
            what(&[(101, 1), (101, 2)]),
            ("regions are not strictly ascending", 16)
        );
        assert_eq!(
            what(&[(100, 0)]),
            (
                "a region with sequence 0 is listed (never-written regions are left out)",
                8
            )
        );
        let mut ragged = good.clone();
        ragged.pop();
        assert!(matches!(
            reply.to_bytes(&ragged),
            Err(ProtoError::BadPayload { at: 32, .. })
        ));
        let narrow = Header {
            block_count: 2,
            ..reply
        };
        assert!(matches!(
            narrow.to_bytes(&good),
            Err(ProtoError::BadPayload {
                what: "more (region, sequence) pairs than the reply covers regions",
                ..
            })
        ));
        // A range that ends past u64::MAX is fine.
        let top = Header {
            lba: u64::MAX - 1,
            block_count: 5,
            ..reply
        };
        assert!(top.to_bytes(&pairs(&[(u64::MAX, 1)])).is_ok());
    }

    #[test]
    fn refusal_text_must_be_utf8() {
        let refused = Header {
            status: refusal::AUTH,
            ..Header::new(Kind::Refused)
        };
        assert_eq!(
            refused.to_bytes(b"ok \xff"),
            Err(ProtoError::BadPayload {
                kind: Kind::Refused,
                at: 3,
                what: "refusal text is not UTF-8"
            })
        );
        let bytes = frame_bytes(&refused, "bad auth ✗".as_bytes());
        let mut decoder = FrameDecoder::default();
        decoder.push(&bytes);
        let frame = decoder.next().unwrap().unwrap();
        assert_eq!(frame.refusal_text(), Some("bad auth ✗"));
        assert_eq!(frame.hello(), None);
        assert!(frame.probe_entries().is_none());
    }

    #[test]
    fn a_poisoned_decoder_keeps_its_error_and_takes_no_more_bytes() {
        let mut bytes = frame_bytes(&flush(), &[]);
        bytes[offset::EPOCH] ^= 1;
        bytes.extend_from_slice(&frame_bytes(&flush(), &[]));
        let mut decoder = FrameDecoder::default();
        assert_eq!(decoder.push(&bytes), bytes.len());
        let error = decoder.next().unwrap().unwrap_err();
        assert!(matches!(error, ProtoError::HeaderCrc { .. }));
        for _ in 0..3 {
            assert_eq!(decoder.next().unwrap().unwrap_err(), error);
        }
        assert_eq!(decoder.error(), Some(&error));
        assert_eq!(decoder.push(&bytes), 0);
        assert!(decoder.spare().is_empty());
    }

    #[test]
    fn frames_split_anywhere_or_packed_together_decode_alike() {
        let frames = sample_frames();
        let stream: Vec<u8> = frames
            .iter()
            .flat_map(|(header, payload)| frame_bytes(header, payload))
            .collect();
        // One byte at a time.
        let mut decoder = FrameDecoder::default();
        let mut decoded = Vec::new();
        for &byte in &stream {
            assert_eq!(decoder.push(&[byte]), 1);
            while let Some(frame) = decoder.next() {
                let frame = frame.unwrap();
                decoded.push((frame.header, frame.payload.to_vec()));
            }
        }
        assert_eq!(decoded, frames);
        assert_eq!(decoder.buffered(), 0);

        // Read straight into the decoder's buffer, as a socket driver does.
        let mut decoder = FrameDecoder::default();
        let mut decoded = Vec::new();
        let mut fed = 0;
        while fed < stream.len() {
            let spare = decoder.spare();
            let len = spare.len().min(stream.len() - fed).min(1000);
            spare[..len].copy_from_slice(&stream[fed..fed + len]);
            decoder.commit(len);
            fed += len;
            while let Some(frame) = decoder.next() {
                let frame = frame.unwrap();
                decoded.push((frame.header, frame.payload.to_vec()));
            }
        }
        assert_eq!(decoded, frames);
    }

    #[test]
    fn push_takes_what_fits_and_always_makes_progress() {
        let header = Header {
            block_count: 1,
            ..Header::new(Kind::Write)
        };
        // Two frames of the largest size: the buffer holds one.
        let one = frame_bytes(&header, &[3; 512]);
        let stream = [one.clone(), one.clone()].concat();
        let mut decoder = FrameDecoder::new(512);
        assert_eq!(decoder.push(&stream), one.len());
        // A whole frame waits: nothing more fits until it is taken.
        assert_eq!(decoder.push(&stream[one.len()..]), 0);
        assert_eq!(decoder.next().unwrap().unwrap().payload, &[3; 512][..]);
        assert_eq!(decoder.push(&stream[one.len()..]), one.len());
        assert!(decoder.next().unwrap().is_ok());
        assert!(decoder.next().is_none());
        assert_eq!(decoder.buffered(), 0);

        // A partial frame at the end of the buffer is moved to the front to make room.
        let mut decoder = FrameDecoder::new(512);
        let small = frame_bytes(&flush(), &[]);
        let stream = [small.clone(), one.clone()].concat();
        assert_eq!(decoder.push(&stream), one.len());
        assert!(decoder.next().unwrap().is_ok());
        assert!(decoder.next().is_none());
        let rest = &stream[one.len()..];
        assert_eq!(decoder.push(rest), rest.len());
        assert_eq!(decoder.next().unwrap().unwrap().header, header);
    }

    #[test]
    #[should_panic(expected = "over the 67108864-byte maximum")]
    fn an_oversized_limit_is_a_configuration_error() {
        let _ = FrameDecoder::new(MAX_PAYLOAD_LIMIT_BYTES + 1);
    }

    #[test]
    fn check_epoch_refuses_older_and_takes_newer_only_from_an_epoch_frame() {
        let at = |kind, epoch| Header {
            epoch,
            ..Header::new(kind)
        };
        assert_eq!(
            check_epoch(5, &at(Kind::Write, 5)),
            Ok(EpochVerdict::Current)
        );
        let stale = check_epoch(5, &at(Kind::Write, 4)).unwrap_err();
        assert_eq!(
            stale,
            Refusal::StaleEpoch {
                kind: Kind::Write,
                frame_epoch: 4,
                current_epoch: 5
            }
        );
        assert!(stale.to_string().starts_with("stale epoch 4 < 5"));
        assert_eq!(stale.reason(), refusal::STALE_EPOCH);
        assert_eq!(stale.current_epoch(), 5);
        // A claim of an older epoch is stale too.
        assert!(matches!(
            check_epoch(5, &at(Kind::Epoch, 4)),
            Err(Refusal::StaleEpoch { .. })
        ));
        // Newer: only through Epoch.
        assert_eq!(
            check_epoch(5, &at(Kind::Epoch, 6)),
            Ok(EpochVerdict::Adopt { epoch: 6 })
        );
        for kind in Kind::ALL {
            if kind.is_volume_scoped() && kind != Kind::Epoch {
                let refusal = check_epoch(5, &at(kind, 6)).unwrap_err();
                assert_eq!(
                    refusal,
                    Refusal::EpochNotClaimed {
                        kind,
                        frame_epoch: 6,
                        current_epoch: 5
                    }
                );
                assert_eq!(refusal.reason(), refusal::EPOCH_NOT_CLAIMED);
            }
        }
        assert_eq!(
            check_epoch(5, &at(Kind::Epoch, 5)),
            Ok(EpochVerdict::Current),
            "a primary that reconnects claims its epoch again"
        );
        assert_eq!(
            check_epoch(5, &Header::new(Kind::Hello)),
            Ok(EpochVerdict::Current)
        );
        assert_eq!(
            check_epoch(0, &at(Kind::Flush, u64::MAX))
                .unwrap_err()
                .reason(),
            refusal::EPOCH_NOT_CLAIMED
        );
    }

    // ---- property tests ----

    /// Any valid frame: a kind, its fields (those it does not use zeroed, block counts of at
    /// least one), a trace context or none, and a payload of the kind's format.
    fn any_frame() -> impl Strategy<Value = (Header, Vec<u8>)> {
        let fields = (
            any::<bool>(),
            prop_oneof![Just(0u16), any::<u16>()],
            any::<u32>(),
            prop_oneof![1u32..64, any::<u32>()],
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of((1u128.., 1u64.., any::<bool>())),
        );
        let payloads = (
            proptest::collection::vec(any::<u8>(), 1..600),
            (
                "[a-z0-9-]{1,16}",
                "[a-z]{1,8}",
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
            proptest::collection::vec("[a-z0-9]{1,12}", 0..5),
            (1u8..4, 0u8..3),
            proptest::collection::vec((any::<u32>(), 1u64..), 0..20),
            ".{0,40}",
        );
        (0..Kind::ALL.len(), fields, payloads).prop_map(|(index, fields, payloads)| {
            let kind = Kind::ALL[index];
            let (fua, status_code, volume, blocks, epoch, sequence, lba, request_id, trace) =
                fields;
            let (data, (node, cluster, auth), volumes, (min, span), pairs, text) = payloads;
            let used = kind.fields();
            let keep = |bit: u8, value: u64| if used & bit != 0 { value } else { 0 };
            let mut header = Header {
                kind,
                fua: fua && kind.allows_fua(),
                forwarded: fua && kind.allows_forwarded(),
                status: keep(field::STATUS, u64::from(status_code)) as u16,
                volume: keep(field::VOLUME, u64::from(volume)) as u32,
                block_count: keep(field::BLOCKS, u64::from(blocks)) as u32,
                epoch: keep(field::EPOCH, epoch),
                sequence: keep(field::SEQUENCE, sequence),
                lba: keep(field::LBA, lba),
                request_id,
                trace: trace.map(|(t, p, sampled)| TraceContext {
                    trace_id: TraceId(t),
                    parent: SpanId(p),
                    sampled,
                }),
            };
            if kind.needs_blocks() {
                header.block_count = header.block_count.max(1);
            }
            if kind == Kind::Refused {
                header.status = header.status.max(1);
            }
            let ok = header.status == status::OK;
            let payload = match kind.payload_rule() {
                PayloadRule::Empty => Vec::new(),
                PayloadRule::Data => data,
                PayloadRule::DataIfOk if ok => data,
                PayloadRule::DataIfOk | PayloadRule::ProbePairs if !ok => Vec::new(),
                PayloadRule::Hello => {
                    let mut out = Vec::new();
                    Hello {
                        min_version: min,
                        max_version: min + span,
                        node_id: &node,
                        cluster: &cluster,
                        auth: &auth,
                        volumes: volumes.iter().map(String::as_str).collect(),
                    }
                    .encode(&mut out)
                    .unwrap();
                    out
                }
                PayloadRule::ProbePairs => {
                    let count = u64::from(header.block_count);
                    let mut entries: Vec<ProbeEntry> = pairs
                        .iter()
                        .filter_map(|&(offset, sequence)| {
                            let region = header.lba.checked_add(u64::from(offset) % count)?;
                            Some(ProbeEntry { region, sequence })
                        })
                        .collect();
                    entries.sort();
                    entries.dedup_by_key(|entry| entry.region);
                    let mut out = Vec::new();
                    encode_probe_entries(&entries, &mut out);
                    out
                }
                PayloadRule::Text => text.into_bytes(),
                PayloadRule::DataIfOk => unreachable!(),
            };
            (header, payload)
        })
    }

    /// A payload limit just over the largest payload `any_frame` makes, so that the property
    /// tests fill the decoder's buffer and make it move partial frames to its front.
    const SMALL_LIMIT: u32 = 1024;

    /// Frames (with the offset each started at) and the error that ended them.
    type ChunkedDecode = (Vec<(usize, Header, Vec<u8>)>, Option<ProtoError>);

    /// Feeds `stream` to a decoder in chunks of the given sizes (cycled), draining frames
    /// after every push; returns the frames with the offset each started at, and the error.
    fn decode_chunked(stream: &[u8], chunks: &[usize], max_payload_bytes: u32) -> ChunkedDecode {
        let mut decoder = FrameDecoder::new(max_payload_bytes);
        let mut frames = Vec::new();
        let mut fed = 0;
        let mut consumed = 0;
        for &chunk in chunks.iter().cycle() {
            let end = stream.len().min(fed + chunk);
            let taken = decoder.push(&stream[fed..end]);
            fed += taken;
            loop {
                match decoder.next() {
                    None => break,
                    Some(Ok(frame)) => {
                        frames.push((consumed, frame.header, frame.payload.to_vec()));
                        consumed += frame.wire_len();
                    }
                    Some(Err(error)) => return (frames, Some(error)),
                }
            }
            assert!(taken > 0 || fed == stream.len(), "the decoder stalled");
            if fed == stream.len() {
                break;
            }
        }
        assert_eq!(decoder.buffered(), stream.len() - consumed);
        (frames, None)
    }

    /// The checks a yielded frame must pass, made on the bytes it came from with the
    /// reference CRC, and its re-encoding.
    fn assert_verifies(stream: &[u8], at: usize, header: &Header, payload: &[u8]) {
        let bytes = &stream[at..at + HEADER_LEN + payload.len()];
        assert_eq!(&bytes[..4], b"FTRP");
        assert_eq!(
            le_u32(bytes, offset::HEADER_CRC),
            reference_crc32c(&bytes[..offset::HEADER_CRC])
        );
        assert_eq!(
            le_u32(bytes, offset::PAYLOAD_CRC),
            reference_crc32c(&bytes[HEADER_LEN..])
        );
        assert_eq!(frame_bytes(header, payload), bytes);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_frames_round_trip_through_random_chunks(
            frames in proptest::collection::vec(any_frame(), 1..6),
            chunks in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let mut stream = Vec::new();
            for (header, payload) in &frames {
                encode(header, payload, &mut stream).unwrap();
            }
            let (decoded, error) = decode_chunked(&stream, &chunks, SMALL_LIMIT);
            prop_assert_eq!(error, None);
            prop_assert_eq!(decoded.len(), frames.len());
            for ((at, header, payload), (sent_header, sent_payload)) in decoded.iter().zip(&frames) {
                prop_assert_eq!(header, sent_header);
                prop_assert_eq!(payload, sent_payload);
                assert_verifies(&stream, *at, header, payload);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_yield_only_verified_frames(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            chunks in proptest::collection::vec(1usize..300, 1..8),
            magic in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if magic && bytes.len() >= 10 {
                // Get past the first checks more often than chance would.
                bytes[..4].copy_from_slice(&MAGIC);
                bytes[4] = VERSION;
                bytes[8..10].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
            }
            let (decoded, _) = decode_chunked(&bytes, &chunks, 1024);
            for (at, header, payload) in &decoded {
                assert_verifies(&bytes, *at, header, payload);
            }
        }

        #[test]
        fn resealed_random_headers_never_panic_and_yield_only_valid_frames(
            (header, payload) in any_frame(),
            edits in proptest::collection::vec((0..offset::HEADER_CRC, any::<u8>()), 1..6),
            fix_payload_crc in any::<bool>(),
            chunks in proptest::collection::vec(1usize..300, 1..8),
        ) {
            // Random header fields behind a correct header CRC reach every field check.
            let bytes = reseal(frame_bytes(&header, &payload), |b| {
                for &(at, value) in &edits {
                    b[at] = value;
                }
                if fix_payload_crc {
                    let len = (le_u32(b, offset::PAYLOAD_LEN) as usize).min(payload.len());
                    let crc = reference_crc32c(&payload[..len]);
                    b[offset::PAYLOAD_CRC..offset::PAYLOAD_CRC + 4].copy_from_slice(&crc.to_le_bytes());
                }
            });
            let (decoded, error) = decode_chunked(&bytes, &chunks, 1024);
            for (at, header, payload) in &decoded {
                assert_verifies(&bytes, *at, header, payload);
            }
            if decoded.is_empty() && error.is_none() {
                // Only a longer declared payload than the bytes hold leaves the decoder waiting.
                prop_assert!(le_u32(&bytes, offset::PAYLOAD_LEN) as usize > bytes.len() - HEADER_LEN);
            }
        }

        #[test]
        fn one_flipped_byte_in_a_valid_stream_is_an_error_at_its_frame(
            frames in proptest::collection::vec(any_frame(), 1..5),
            position in any::<prop::sample::Index>(),
            flip in 1u8..,
            chunks in proptest::collection::vec(1usize..300, 1..8),
        ) {
            let mut stream = Vec::new();
            let mut starts = Vec::new();
            for (header, payload) in &frames {
                starts.push(stream.len());
                encode(header, payload, &mut stream).unwrap();
            }
            let at = position.index(stream.len());
            stream[at] ^= flip;
            // Every byte counts (see the module documentation): the frames before the one
            // holding the flipped byte decode, and that one is refused.
            let hit = starts.iter().rposition(|&start| start <= at).unwrap();
            let (decoded, error) = decode_chunked(&stream, &chunks, SMALL_LIMIT);
            prop_assert!(error.is_some(), "flip {:#04x} at byte {} went unnoticed", flip, at);
            prop_assert_eq!(decoded.len(), hit);
        }
    }
}
