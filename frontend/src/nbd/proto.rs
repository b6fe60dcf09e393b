//! NBD wire constants and the transmission phase: request headers in, reply headers out.
//!
//! Everything on the request path works on fixed-size arrays and allocates nothing:
//! [`Request::parse`] reads the 28-byte header, [`Request::check`] decides whether the server
//! may run it, and the reply encoders return headers by value for the caller to write ahead of
//! any data. Only the error-chunk encoders append to a `Vec`, because errors are rare and carry
//! a message. Every integer on the wire is big-endian.

use std::fmt;

/// Bytes in a transmission request header (compact headers; extended headers are not
/// negotiated).
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes in a simple reply (the read data, if any, follows).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes in a structured reply chunk header (the payload follows).
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Bytes in an `OFFSET_DATA` chunk up to its data: the chunk header and the 8-byte offset.
pub const OFFSET_DATA_HEADER_LEN: usize = STRUCTURED_HEADER_LEN + 8;
/// Bytes in a whole `OFFSET_HOLE` chunk: the chunk header, the offset and the hole length.
pub const OFFSET_HOLE_CHUNK_LEN: usize = STRUCTURED_HEADER_LEN + 12;

/// Error and option-reply messages are cut to this many bytes: the protocol says strings
/// SHOULD be no longer than 256 bytes (and MUST be no longer than 4096).
pub const MAX_MESSAGE_BYTES: usize = 256;

/// The minimum block size a [`Limits`] uses unless told otherwise: the 512-byte sector every
/// volume is aligned to, and what the protocol tells interoperable clients to assume.
pub const DEFAULT_MIN_BLOCK_BYTES: u32 = 512;
/// The preferred block size an export advertises unless told otherwise.
pub const DEFAULT_PREFERRED_BLOCK_BYTES: u32 = 4096;
/// The largest `READ`/`WRITE` an export accepts unless told otherwise: 2^25 bytes, the
/// protocol's interoperability bound.
pub const DEFAULT_MAX_BLOCK_BYTES: u32 = 32 << 20;
/// The protocol says a `WRITE` payload below 2^25 bytes SHOULD NOT be treated as a denial of
/// service, so a rejected write up to this size is read and discarded rather than closing.
pub const DEFAULT_MAX_DISCARD_BYTES: u32 = 32 << 20;
/// The largest maximum block size this implementation advertises. Any accepted read then fits
/// one `OFFSET_DATA` chunk (whose length field also counts the 8-byte offset) and one payload
/// buffer of bounded size.
pub const MAX_BLOCK_LIMIT_BYTES: u32 = 1 << 30;
/// The largest minimum block size the protocol allows.
pub const MAX_MIN_BLOCK_BYTES: u32 = 1 << 16;

/// Magic numbers that frame every NBD message.
pub mod magic {
    /// `NBDMAGIC`: the first 8 bytes the server sends.
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    /// `IHAVEOPT`: follows `NBDMAGIC` in the newstyle greeting and starts every client option.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// Starts every option reply of the fixed newstyle handshake.
    pub const OPTION_REPLY: u64 = 0x0003_e889_0455_65a9;
    /// Starts every transmission request.
    pub const REQUEST: u32 = 0x2560_9513;
    /// Starts every simple reply.
    pub const SIMPLE_REPLY: u32 = 0x6744_6698;
    /// Starts every structured reply chunk.
    pub const STRUCTURED_REPLY: u32 = 0x668e_33ef;
}

/// Handshake flags: the 16 bits the server sends in its greeting.
pub mod handshake_flag {
    /// The server speaks the fixed newstyle handshake.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server omits the 124 zero bytes after `NBD_OPT_EXPORT_NAME` if the client agrees.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags: the 32 bits the client answers the greeting with.
pub mod client_flag {
    /// The client speaks the fixed newstyle handshake.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every client flag the protocol defines; the server must close on any other.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags: the 16 bits that describe an export to the client.
pub mod transmission_flag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes, trims and write-zeroes fail with `EPERM`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// The server accepts `NBD_CMD_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The server accepts `NBD_CMD_FLAG_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotating disk (a scheduling hint).
    pub const ROTATIONAL: u16 = 1 << 4;
    /// The server accepts `NBD_CMD_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// The server accepts `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The server accepts `NBD_CMD_FLAG_DF` on reads; only with structured replies.
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA take effect across every connection to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// Experimental `RESIZE` extension; not supported here.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// The server accepts `NBD_CMD_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// The server accepts `NBD_CMD_FLAG_FAST_ZERO`; only with `SEND_WRITE_ZEROES`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// Block status requests carry a payload; needs extended headers, not supported here.
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
    /// The flags an export served by this implementation may carry.
    pub const SUPPORTED: u16 = HAS_FLAGS
        | READ_ONLY
        | SEND_FLUSH
        | SEND_FUA
        | ROTATIONAL
        | SEND_TRIM
        | SEND_WRITE_ZEROES
        | SEND_DF
        | CAN_MULTI_CONN
        | SEND_CACHE
        | SEND_FAST_ZERO;
}

/// Option codes a client sends during the handshake.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    /// Withdrawn; never in use.
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;

    /// The option's name as the protocol spells it, for messages.
    pub const fn name(option: u32) -> &'static str {
        match option {
            EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            ABORT => "NBD_OPT_ABORT",
            LIST => "NBD_OPT_LIST",
            PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
            STARTTLS => "NBD_OPT_STARTTLS",
            INFO => "NBD_OPT_INFO",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => "an unknown option",
        }
    }
}

/// Option reply types the server sends during the handshake. Error types have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// The option is unknown to this server.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// The option is known and valid, but the server's policy forbids it.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// The option is known but its data is syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// The option is not supported on this platform or build.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// The server will not go on without TLS.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// The requested export does not exist.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The client must request `NBD_INFO_BLOCK_SIZE` before `NBD_OPT_GO`.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// The request or the reply is too large to process.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// Extended headers must be negotiated first.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR | 10;

    /// Whether `reply` is an error reply.
    pub const fn is_error(reply: u32) -> bool {
        reply & ERR != 0
    }
}

/// Information types in `NBD_REP_INFO` replies to `NBD_OPT_INFO` and `NBD_OPT_GO`.
pub mod info {
    /// Size and transmission flags; always sent.
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags: the 16 bits of a request that modify its command.
pub mod cmd_flag {
    /// Force unit access: reply only once the command's writes are durable.
    pub const FUA: u16 = 1 << 0;
    /// Write-zeroes must allocate, not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment: answer a read with at most one content chunk.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write-zeroes: fail with `ENOTSUP` unless faster than a write.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Every command flag the compact-header protocol defines.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;

    /// The flag's name as the protocol spells it, for messages; `flag` has one bit set.
    pub const fn name(flag: u16) -> &'static str {
        match flag {
            FUA => "NBD_CMD_FLAG_FUA",
            NO_HOLE => "NBD_CMD_FLAG_NO_HOLE",
            DF => "NBD_CMD_FLAG_DF",
            REQ_ONE => "NBD_CMD_FLAG_REQ_ONE",
            FAST_ZERO => "NBD_CMD_FLAG_FAST_ZERO",
            _ => "an unknown flag",
        }
    }
}

/// Structured reply chunk flags.
pub mod reply_flag {
    /// This is the last chunk of the reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types. Error chunk types have bit 15 set.
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) | 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// The error values a reply may carry. The protocol fixes these numbers; they match Linux
/// `errno` values only for historical reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted: a write, trim or write-zeroes on a read-only export.
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory; servers should avoid it.
    NoMem = 12,
    /// Invalid argument: bad flags, unknown commands, misaligned or out-of-range reads.
    Inval = 22,
    /// No space left: a write beyond the end of the export.
    NoSpc = 28,
    /// Value too large: only for a `DF` read that cannot be sent unfragmented.
    Overflow = 75,
    /// Operation not supported: only for `FAST_ZERO` write-zeroes that would be slow.
    NotSup = 95,
    /// The server is shutting down; the client must disconnect.
    Shutdown = 108,
}

impl Errno {
    /// The value on the wire.
    #[inline]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The error for a wire value, if the protocol defines it.
    pub const fn from_code(code: u32) -> Option<Errno> {
        Some(match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Errno::Perm => "NBD_EPERM",
            Errno::Io => "NBD_EIO",
            Errno::NoMem => "NBD_ENOMEM",
            Errno::Inval => "NBD_EINVAL",
            Errno::NoSpc => "NBD_ENOSPC",
            Errno::Overflow => "NBD_EOVERFLOW",
            Errno::NotSup => "NBD_ENOTSUP",
            Errno::Shutdown => "NBD_ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// A request's command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    /// `length` bytes of data follow the header on the wire.
    Write,
    /// Disconnect: the client sends nothing more and expects no reply.
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A type this server does not know; it is answered with `EINVAL`.
    Unknown(u16),
}

impl Command {
    /// The command for a wire value.
    #[inline]
    pub const fn from_code(code: u16) -> Command {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The value on the wire.
    #[inline]
    pub const fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(code) => code,
        }
    }

    /// Whether the command changes the export's contents (and so fails on a read-only one).
    #[inline]
    pub const fn modifies(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disc => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::Cache => "NBD_CMD_CACHE",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
            Command::Unknown(code) => return write!(f, "command type {code}"),
        };
        f.write_str(name)
    }
}

/// A request header that leaves the stream unusable: the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "request header starts with {found:#010x}, not the request magic 0x25609513: the client \
         lost framing or is not speaking NBD transmission; close the connection"
    )]
    BadMagic { found: u32 },
}

/// One transmission request, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Opaque to the server; echoed in every reply to this request (the protocol's "handle").
    pub cookie: u64,
    /// Command flags ([`cmd_flag`]), unchecked until [`Request::check`].
    pub flags: u16,
    pub command: Command,
    /// Byte offset within the export.
    pub offset: u64,
    /// Bytes to read, write, trim or zero.
    pub length: u32,
}

/// Why [`Request::check`] refused a request. [`Rejection::errno`] is the error to reply with;
/// the `Display` text suits the message of a structured error chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{command} is not a command this server knows")]
    UnknownCommand { command: Command },
    #[error("{command} was not advertised: the export does not set {flag}")]
    NotAdvertised {
        command: Command,
        flag: &'static str,
    },
    #[error("{command} with metadata contexts, which this server does not negotiate")]
    NoMetaContext { command: Command },
    #[error("{command} sets command flags {flags:#06x} that the protocol does not define")]
    UnknownFlags { command: Command, flags: u16 },
    #[error("{command} may not carry {flag} on this export")]
    FlagNotAllowed {
        command: Command,
        flag: &'static str,
    },
    #[error("{command} on a read-only export")]
    ReadOnly { command: Command },
    #[error("{command} must have offset and length zero, not offset {offset} length {length}")]
    ReservedNotZero {
        command: Command,
        offset: u64,
        length: u32,
    },
    #[error("{command} of zero bytes")]
    Empty { command: Command },
    #[error("{command} of {length} bytes at offset {offset} overflows a 64-bit offset")]
    Overflow {
        command: Command,
        offset: u64,
        length: u32,
    },
    #[error(
        "{command} of {length} bytes at offset {offset} is beyond the end of the export \
         ({size_bytes} bytes)"
    )]
    OutOfRange {
        command: Command,
        offset: u64,
        length: u32,
        size_bytes: u64,
    },
    #[error(
        "{command} of {length} bytes at offset {offset} is not aligned to the export's \
         {min_block_bytes}-byte minimum block size"
    )]
    Misaligned {
        command: Command,
        offset: u64,
        length: u32,
        min_block_bytes: u32,
    },
    #[error("{command} of {length} bytes is larger than the export's {max_block_bytes}-byte maximum block size")]
    TooLarge {
        command: Command,
        length: u32,
        max_block_bytes: u32,
    },
}

impl Rejection {
    /// The error value to reply with, as the protocol asks: `EPERM` for changes to a read-only
    /// export, `ENOSPC` for a write or write-zeroes past the end, `EINVAL` for the rest.
    #[inline]
    pub const fn errno(&self) -> Errno {
        match *self {
            Rejection::ReadOnly { .. } => Errno::Perm,
            Rejection::Overflow { command, .. } | Rejection::OutOfRange { command, .. } => {
                match command {
                    Command::Write | Command::WriteZeroes => Errno::NoSpc,
                    _ => Errno::Inval,
                }
            }
            _ => Errno::Inval,
        }
    }
}

/// What a connection does with a request [`Request::check`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRejection {
    /// Send the error reply; nothing follows the header on the wire.
    Reply,
    /// Read and drop `bytes` bytes of write payload, then send the error reply.
    DiscardThenReply { bytes: u32 },
    /// The write payload is too large to be worth reading: close the connection.
    Close,
}

/// A block size setting the protocol or this implementation does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("minimum block size {min_block_bytes} must be a power of two from 1 to 65536")]
    MinBlock { min_block_bytes: u32 },
    #[error(
        "maximum block size {max_block_bytes} must be a multiple of the minimum block size \
         {min_block_bytes}, at least that large, and at most {limit}",
        limit = MAX_BLOCK_LIMIT_BYTES
    )]
    MaxBlock {
        min_block_bytes: u32,
        max_block_bytes: u32,
    },
}

/// What the server accepts on one connection to one export: the transmission flags it
/// advertised and the block sizes it enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    transmission_flags: u16,
    min_block_bytes: u32,
    max_block_bytes: u32,
    max_discard_bytes: u32,
}

impl Limits {
    /// Limits with the given block sizes. The minimum must be a power of two no larger than
    /// 64 KiB; the maximum a multiple of it, no larger than [`MAX_BLOCK_LIMIT_BYTES`]. A
    /// rejected write is discarded up to the larger of the maximum block size and
    /// [`DEFAULT_MAX_DISCARD_BYTES`].
    pub fn new(
        transmission_flags: u16,
        min_block_bytes: u32,
        max_block_bytes: u32,
    ) -> Result<Limits, LimitsError> {
        if !min_block_bytes.is_power_of_two() || min_block_bytes > MAX_MIN_BLOCK_BYTES {
            return Err(LimitsError::MinBlock { min_block_bytes });
        }
        if max_block_bytes < min_block_bytes
            || !max_block_bytes.is_multiple_of(min_block_bytes)
            || max_block_bytes > MAX_BLOCK_LIMIT_BYTES
        {
            return Err(LimitsError::MaxBlock {
                min_block_bytes,
                max_block_bytes,
            });
        }
        Ok(Limits {
            transmission_flags,
            min_block_bytes,
            max_block_bytes,
            max_discard_bytes: max_block_bytes.max(DEFAULT_MAX_DISCARD_BYTES),
        })
    }

    /// Limits with the default block sizes: 512-byte minimum, 32 MiB maximum.
    pub fn with_defaults(transmission_flags: u16) -> Limits {
        Limits {
            transmission_flags,
            min_block_bytes: DEFAULT_MIN_BLOCK_BYTES,
            max_block_bytes: DEFAULT_MAX_BLOCK_BYTES,
            max_discard_bytes: DEFAULT_MAX_DISCARD_BYTES,
        }
    }

    /// The same limits with other transmission flags (the handshake clears `SEND_DF` when
    /// structured replies were not negotiated).
    pub fn with_transmission_flags(self, transmission_flags: u16) -> Limits {
        Limits {
            transmission_flags,
            ..self
        }
    }

    /// The same limits with another bound on the write payload a connection reads and drops
    /// after refusing the write. The protocol says payloads below 32 MiB SHOULD be read.
    pub fn with_max_discard_bytes(self, max_discard_bytes: u32) -> Limits {
        Limits {
            max_discard_bytes,
            ..self
        }
    }

    /// The transmission flags sent to the client.
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// Offsets and lengths must be multiples of this.
    pub fn min_block_bytes(&self) -> u32 {
        self.min_block_bytes
    }

    /// The largest `READ`, `WRITE`, `CACHE` or (non-fast) `WRITE_ZEROES` accepted.
    pub fn max_block_bytes(&self) -> u32 {
        self.max_block_bytes
    }

    /// The largest write payload read and dropped after a rejection; above it, close.
    pub fn max_discard_bytes(&self) -> u32 {
        self.max_discard_bytes
    }
}

#[inline]
pub(crate) fn be_u16(bytes: &[u8], at: usize) -> u16 {
    let mut value = [0u8; 2];
    value.copy_from_slice(&bytes[at..at + 2]);
    u16::from_be_bytes(value)
}

#[inline]
pub(crate) fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut value = [0u8; 4];
    value.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(value)
}

#[inline]
pub(crate) fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut value = [0u8; 8];
    value.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(value)
}

/// The flags a command may carry on an export with `transmission_flags`, as the protocol
/// documents them: FUA on any command once advertised, the others on one command each.
#[inline]
const fn allowed_flags(command: Command, transmission_flags: u16) -> u16 {
    use transmission_flag::{SEND_DF, SEND_FAST_ZERO, SEND_FUA};
    let mut allowed = 0;
    if transmission_flags & SEND_FUA != 0 {
        allowed |= cmd_flag::FUA;
    }
    match command {
        Command::Read if transmission_flags & SEND_DF != 0 => allowed |= cmd_flag::DF,
        Command::WriteZeroes => {
            allowed |= cmd_flag::NO_HOLE;
            if transmission_flags & SEND_FAST_ZERO != 0 {
                allowed |= cmd_flag::FAST_ZERO;
            }
        }
        Command::BlockStatus => allowed |= cmd_flag::REQ_ONE,
        _ => {}
    }
    allowed
}

impl Request {
    /// Parses a request header. Only a wrong magic is an error: unknown command types and flag
    /// bits still make a `Request`, which [`Request::check`] refuses with an error reply, so
    /// one odd request does not cost the client its connection.
    #[inline]
    pub fn parse(header: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, RequestError> {
        let found = be_u32(header, 0);
        if found != magic::REQUEST {
            return Err(RequestError::BadMagic { found });
        }
        Ok(Request {
            flags: be_u16(header, 4),
            command: Command::from_code(be_u16(header, 6)),
            cookie: be_u64(header, 8),
            offset: be_u64(header, 16),
            length: be_u32(header, 24),
        })
    }

    /// The header as a client sends it.
    #[inline]
    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        header[0..4].copy_from_slice(&magic::REQUEST.to_be_bytes());
        header[4..6].copy_from_slice(&self.flags.to_be_bytes());
        header[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        header[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        header[16..24].copy_from_slice(&self.offset.to_be_bytes());
        header[24..28].copy_from_slice(&self.length.to_be_bytes());
        header
    }

    /// Bytes of data that follow this header on the wire: `length` for a write, else none.
    /// They follow whether or not the request is valid.
    #[inline]
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Whether the server may run this request on an export of `export_size_bytes` bytes.
    ///
    /// The checks, in order, and the error each refusal carries ([`Rejection::errno`]):
    /// 1. the command is known (`EINVAL`), advertised in the transmission flags when it needs
    ///    to be (`FLUSH`, `TRIM`, `WRITE_ZEROES`, `CACHE`; `EINVAL`), and not `BLOCK_STATUS`,
    ///    since no metadata context is ever negotiated (`EINVAL`);
    /// 2. every flag bit is defined and documented for the command, and advertised when it
    ///    needs to be: `FUA` on any command with `SEND_FUA`, `DF` on reads with `SEND_DF`,
    ///    `NO_HOLE` and (with `SEND_FAST_ZERO`) `FAST_ZERO` on write-zeroes (`EINVAL`);
    /// 3. writes, trims and write-zeroes on a `READ_ONLY` export (`EPERM`);
    /// 4. `FLUSH` has offset and length zero (`EINVAL`), and nothing more is checked for it;
    /// 5. the length is not zero (`EINVAL`; the protocol leaves zero-length requests to the
    ///    server, and the volumes refuse empty IO);
    /// 6. offset + length neither overflows nor passes the end of the export (`ENOSPC` for
    ///    `WRITE` and `WRITE_ZEROES`, `EINVAL` for the others);
    /// 7. offset and length are multiples of the minimum block size (`EINVAL`);
    /// 8. `READ`, `WRITE`, `CACHE` and `WRITE_ZEROES` without `FAST_ZERO` are no longer than
    ///    the maximum block size (`EINVAL`: the protocol reserves `EOVERFLOW` for `DF` reads
    ///    that cannot be sent in one chunk, and any read allowed here fits in one).
    ///
    /// `DISC` is always accepted: it gets no reply, and the connection closes whatever it
    /// carries.
    ///
    /// A refused `WRITE` still has its `length` bytes of payload on the wire, ahead of the
    /// next request: the caller must read and drop them before replying, or close the
    /// connection if there are too many to be worth reading. [`Request::after_rejection`]
    /// says which.
    #[inline]
    pub fn check(&self, export_size_bytes: u64, limits: &Limits) -> Result<(), Rejection> {
        use transmission_flag::{READ_ONLY, SEND_CACHE, SEND_FLUSH, SEND_TRIM, SEND_WRITE_ZEROES};
        let command = self.command;
        let advertised = limits.transmission_flags;
        let needs = match command {
            Command::Disc => return Ok(()),
            Command::Unknown(_) => return Err(Rejection::UnknownCommand { command }),
            Command::BlockStatus => return Err(Rejection::NoMetaContext { command }),
            Command::Flush => Some((SEND_FLUSH, "NBD_FLAG_SEND_FLUSH")),
            Command::Trim => Some((SEND_TRIM, "NBD_FLAG_SEND_TRIM")),
            Command::WriteZeroes => Some((SEND_WRITE_ZEROES, "NBD_FLAG_SEND_WRITE_ZEROES")),
            Command::Cache => Some((SEND_CACHE, "NBD_FLAG_SEND_CACHE")),
            Command::Read | Command::Write => None,
        };
        if let Some((bit, flag)) = needs {
            if advertised & bit == 0 {
                return Err(Rejection::NotAdvertised { command, flag });
            }
        }

        let unknown = self.flags & !cmd_flag::KNOWN;
        if unknown != 0 {
            return Err(Rejection::UnknownFlags {
                command,
                flags: unknown,
            });
        }
        let refused = self.flags & !allowed_flags(command, advertised);
        if refused != 0 {
            // Name the lowest refused flag; one is enough to act on.
            let flag = cmd_flag::name(refused & refused.wrapping_neg());
            return Err(Rejection::FlagNotAllowed { command, flag });
        }

        if advertised & READ_ONLY != 0 && command.modifies() {
            return Err(Rejection::ReadOnly { command });
        }

        let offset = self.offset;
        let length = self.length;
        if command == Command::Flush {
            if offset != 0 || length != 0 {
                return Err(Rejection::ReservedNotZero {
                    command,
                    offset,
                    length,
                });
            }
            return Ok(());
        }

        if length == 0 {
            return Err(Rejection::Empty { command });
        }
        let Some(end) = offset.checked_add(u64::from(length)) else {
            return Err(Rejection::Overflow {
                command,
                offset,
                length,
            });
        };
        if end > export_size_bytes {
            return Err(Rejection::OutOfRange {
                command,
                offset,
                length,
                size_bytes: export_size_bytes,
            });
        }
        // The minimum block size is a power of two (Limits::new checks), so a mask suffices.
        let mask = limits.min_block_bytes - 1;
        if (offset | u64::from(length)) & u64::from(mask) != 0 {
            return Err(Rejection::Misaligned {
                command,
                offset,
                length,
                min_block_bytes: limits.min_block_bytes,
            });
        }
        let bounded = match command {
            Command::Read | Command::Write | Command::Cache => true,
            Command::WriteZeroes => self.flags & cmd_flag::FAST_ZERO == 0,
            _ => false,
        };
        if bounded && length > limits.max_block_bytes {
            return Err(Rejection::TooLarge {
                command,
                length,
                max_block_bytes: limits.max_block_bytes,
            });
        }
        Ok(())
    }

    /// What to do after [`Request::check`] refused this request: only a `WRITE` has payload
    /// to get past, and only up to [`Limits::max_discard_bytes`] of it is worth reading.
    #[inline]
    pub fn after_rejection(&self, limits: &Limits) -> AfterRejection {
        match self.payload_len() {
            0 => AfterRejection::Reply,
            bytes if bytes <= limits.max_discard_bytes => {
                AfterRejection::DiscardThenReply { bytes }
            }
            _ => AfterRejection::Close,
        }
    }
}

/// A simple reply: `error` `None` for success. A successful read's data follows it; nothing
/// follows an error.
#[inline]
pub fn simple_reply(cookie: u64, error: Option<Errno>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut reply = [0u8; SIMPLE_REPLY_LEN];
    reply[0..4].copy_from_slice(&magic::SIMPLE_REPLY.to_be_bytes());
    reply[4..8].copy_from_slice(&error.map_or(0, Errno::code).to_be_bytes());
    reply[8..16].copy_from_slice(&cookie.to_be_bytes());
    reply
}

/// A structured reply chunk header; `length` bytes of payload follow it.
#[inline]
pub fn structured_header(
    flags: u16,
    reply_type: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut header = [0u8; STRUCTURED_HEADER_LEN];
    header[0..4].copy_from_slice(&magic::STRUCTURED_REPLY.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&reply_type.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..20].copy_from_slice(&length.to_be_bytes());
    header
}

#[inline]
fn done_flag(done: bool) -> u16 {
    if done {
        reply_flag::DONE
    } else {
        0
    }
}

/// The start of an `OFFSET_DATA` chunk: the chunk header (length `8 + data_len`) and the
/// export offset of the data. `data_len` bytes of data follow it.
///
/// Panics unless `1 <= data_len <= u32::MAX - 8`. The server picks `data_len`, within a request
/// that [`Request::check`] bounded by the maximum block size, so a panic is a server bug.
#[inline]
pub fn offset_data_header(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> [u8; OFFSET_DATA_HEADER_LEN] {
    assert!(
        (1..=u32::MAX - 8).contains(&data_len),
        "an OFFSET_DATA chunk carries 1 to 2^32 - 9 bytes, not {data_len}"
    );
    let mut header = [0u8; OFFSET_DATA_HEADER_LEN];
    header[..STRUCTURED_HEADER_LEN].copy_from_slice(&structured_header(
        done_flag(done),
        reply_type::OFFSET_DATA,
        cookie,
        8 + data_len,
    ));
    header[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    header
}

/// A whole `OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as zeroes.
///
/// Panics if `hole_len` is zero, which the protocol forbids (a server bug).
#[inline]
pub fn offset_hole_chunk(
    cookie: u64,
    offset: u64,
    hole_len: u32,
    done: bool,
) -> [u8; OFFSET_HOLE_CHUNK_LEN] {
    assert!(
        hole_len != 0,
        "an OFFSET_HOLE chunk describes at least one byte"
    );
    let mut chunk = [0u8; OFFSET_HOLE_CHUNK_LEN];
    chunk[..STRUCTURED_HEADER_LEN].copy_from_slice(&structured_header(
        done_flag(done),
        reply_type::OFFSET_HOLE,
        cookie,
        12,
    ));
    chunk[20..28].copy_from_slice(&offset.to_be_bytes());
    chunk[28..32].copy_from_slice(&hole_len.to_be_bytes());
    chunk
}

/// The final `NONE` chunk that ends a successful structured reply.
#[inline]
pub fn none_chunk(cookie: u64) -> [u8; STRUCTURED_HEADER_LEN] {
    structured_header(reply_flag::DONE, reply_type::NONE, cookie, 0)
}

/// `message` cut to at most [`MAX_MESSAGE_BYTES`] bytes, on a character boundary.
pub(crate) fn clamp_message(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Appends an `ERROR` chunk: the request failed as a whole. `message` (cut to
/// [`MAX_MESSAGE_BYTES`]) is shown to the client's user.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: Errno, message: &str, done: bool) {
    let message = clamp_message(message);
    // clamp_message bounds the message to 256 bytes, so both lengths fit their fields.
    let length = (6 + message.len()) as u32;
    out.extend_from_slice(&structured_header(
        done_flag(done),
        reply_type::ERROR,
        cookie,
        length,
    ));
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends an `ERROR_OFFSET` chunk: the request failed at export offset `offset`, which lies
/// within the request.
pub fn error_offset_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    error: Errno,
    message: &str,
    offset: u64,
    done: bool,
) {
    let message = clamp_message(message);
    let length = (14 + message.len()) as u32;
    out.extend_from_slice(&structured_header(
        done_flag(done),
        reply_type::ERROR_OFFSET,
        cookie,
        length,
    ));
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::transmission_flag as tf;
    use super::*;
    use proptest::prelude::*;

    const ALL_COMMANDS: [Command; 8] = [
        Command::Read,
        Command::Write,
        Command::Disc,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::BlockStatus,
    ];

    /// An export that advertises everything this implementation supports.
    fn full_limits() -> Limits {
        Limits::with_defaults(
            tf::HAS_FLAGS
                | tf::SEND_FLUSH
                | tf::SEND_FUA
                | tf::SEND_TRIM
                | tf::SEND_WRITE_ZEROES
                | tf::SEND_DF
                | tf::SEND_CACHE
                | tf::SEND_FAST_ZERO,
        )
    }

    const SIZE: u64 = 8 << 30;

    fn request(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            cookie: 0x0102_0304_0506_0708,
            flags,
            command,
            offset,
            length,
        }
    }

    #[test]
    fn magic_numbers_spell_what_the_specification_says() {
        assert_eq!(&magic::NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&magic::IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(magic::OPTION_REPLY, 0x3e889045565a9);
        assert_eq!(rep::ERR_UNSUP, 0x8000_0001);
        assert_eq!(rep::ERR_TOO_BIG, 0x8000_0009);
        assert_eq!(reply_type::ERROR, 0x8001);
        assert_eq!(reply_type::ERROR_OFFSET, 0x8002);
        assert_eq!(tf::SEND_FAST_ZERO, 0x0800);
        assert!(rep::is_error(rep::ERR_POLICY) && !rep::is_error(rep::ACK));
    }

    #[test]
    fn every_command_parses_from_the_bytes_a_client_sends() {
        for (code, command) in ALL_COMMANDS.iter().enumerate() {
            let mut header = [0u8; REQUEST_HEADER_LEN];
            header[0..4].copy_from_slice(&[0x25, 0x60, 0x95, 0x13]);
            header[4..6].copy_from_slice(&[0x00, 0x01]); // FUA
            header[6..8].copy_from_slice(&(code as u16).to_be_bytes());
            header[8..16].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 7]);
            header[16..24].copy_from_slice(&[0, 0, 0, 0, 0, 0x10, 0, 0]);
            header[24..28].copy_from_slice(&[0, 0, 0x02, 0]);
            let parsed = Request::parse(&header).unwrap();
            assert_eq!(
                parsed,
                Request {
                    cookie: 0xdead_beef_0000_0007,
                    flags: cmd_flag::FUA,
                    command: *command,
                    offset: 0x10_0000,
                    length: 512,
                }
            );
            assert_eq!(parsed.command.code(), code as u16);
            assert_eq!(parsed.to_bytes(), header);
        }
    }

    #[test]
    fn unknown_commands_and_flags_parse_and_only_bad_magic_is_an_error() {
        let mut header = request(Command::Unknown(0x4242), 0xffff, 0, 0).to_bytes();
        let parsed = Request::parse(&header).unwrap();
        assert_eq!(parsed.command, Command::Unknown(0x4242));
        assert_eq!(parsed.flags, 0xffff);
        header[3] ^= 1;
        assert_eq!(
            Request::parse(&header),
            Err(RequestError::BadMagic { found: 0x2560_9512 })
        );
    }

    #[test]
    fn valid_requests_pass_check() {
        let limits = full_limits();
        let ok = [
            request(Command::Read, 0, 0, 4096),
            request(Command::Read, cmd_flag::DF | cmd_flag::FUA, SIZE - 512, 512),
            request(Command::Write, cmd_flag::FUA, 1 << 20, 32 << 20),
            request(Command::Flush, 0, 0, 0),
            request(Command::Trim, 0, 0, u32::MAX - 511),
            request(Command::Cache, 0, 512, 512),
            request(Command::WriteZeroes, cmd_flag::NO_HOLE, 0, 32 << 20),
            request(Command::WriteZeroes, cmd_flag::FAST_ZERO, 0, u32::MAX - 511),
            request(Command::Disc, 0, 0, 0),
            // DISC is never answered, whatever it carries.
            request(Command::Disc, 0xffff, 3, 3),
        ];
        for req in ok {
            assert_eq!(req.check(SIZE, &limits), Ok(()), "{req:?}");
        }
    }

    #[test]
    fn out_of_range_is_enospc_for_writes_and_einval_for_the_rest() {
        let limits = full_limits();
        for command in [
            Command::Read,
            Command::Write,
            Command::Trim,
            Command::Cache,
            Command::WriteZeroes,
        ] {
            let rejection = request(command, 0, SIZE - 512, 1024)
                .check(SIZE, &limits)
                .unwrap_err();
            assert!(
                matches!(rejection, Rejection::OutOfRange { .. }),
                "{rejection:?}"
            );
            let expected = match command {
                Command::Write | Command::WriteZeroes => Errno::NoSpc,
                _ => Errno::Inval,
            };
            assert_eq!(rejection.errno(), expected, "{command}");
            // Starting exactly at the end is out of range too.
            assert!(request(command, 0, SIZE, 512).check(SIZE, &limits).is_err());
        }
    }

    #[test]
    fn offset_plus_length_overflow_is_refused_not_wrapped() {
        let limits = full_limits();
        let rejection = request(Command::Read, 0, u64::MAX - 511, 1024)
            .check(u64::MAX, &limits)
            .unwrap_err();
        assert!(matches!(rejection, Rejection::Overflow { .. }));
        assert_eq!(rejection.errno(), Errno::Inval);
        let rejection = request(Command::Write, 0, u64::MAX - 511, 1024)
            .check(u64::MAX, &limits)
            .unwrap_err();
        assert_eq!(rejection.errno(), Errno::NoSpc);
    }

    #[test]
    fn misaligned_offsets_and_lengths_are_einval() {
        let limits = full_limits();
        for (offset, length) in [(1, 512), (512, 511), (4095, 4097), (256, 256)] {
            let rejection = request(Command::Read, 0, offset, length)
                .check(SIZE, &limits)
                .unwrap_err();
            assert!(matches!(
                rejection,
                Rejection::Misaligned {
                    min_block_bytes: 512,
                    ..
                }
            ));
            assert_eq!(rejection.errno(), Errno::Inval);
        }
        let byte_granular = Limits::new(tf::HAS_FLAGS, 1, 1 << 20).unwrap();
        assert_eq!(
            request(Command::Read, 0, 3, 5).check(SIZE, &byte_granular),
            Ok(())
        );
    }

    #[test]
    fn too_large_is_einval_for_payload_commands_only() {
        let limits = full_limits();
        let max = limits.max_block_bytes();
        for command in [
            Command::Read,
            Command::Write,
            Command::Cache,
            Command::WriteZeroes,
        ] {
            let rejection = request(command, 0, 0, max + 512)
                .check(SIZE, &limits)
                .unwrap_err();
            assert_eq!(
                rejection,
                Rejection::TooLarge {
                    command,
                    length: max + 512,
                    max_block_bytes: max
                }
            );
            assert_eq!(rejection.errno(), Errno::Inval);
        }
        assert_eq!(
            request(Command::Trim, 0, 0, max + 512).check(SIZE, &limits),
            Ok(())
        );
    }

    #[test]
    fn unknown_and_unadvertised_commands_are_einval() {
        let limits = full_limits();
        let rejection = request(Command::Unknown(8), 0, 0, 512)
            .check(SIZE, &limits)
            .unwrap_err();
        assert_eq!(
            rejection,
            Rejection::UnknownCommand {
                command: Command::Unknown(8)
            }
        );
        assert_eq!(rejection.errno(), Errno::Inval);
        assert_eq!(
            request(Command::BlockStatus, 0, 0, 512)
                .check(SIZE, &limits)
                .unwrap_err()
                .errno(),
            Errno::Inval
        );
        let bare = Limits::with_defaults(tf::HAS_FLAGS);
        for command in [
            Command::Flush,
            Command::Trim,
            Command::WriteZeroes,
            Command::Cache,
        ] {
            let length = if command == Command::Flush { 0 } else { 512 };
            let rejection = request(command, 0, 0, length)
                .check(SIZE, &bare)
                .unwrap_err();
            assert!(
                matches!(rejection, Rejection::NotAdvertised { .. }),
                "{rejection:?}"
            );
            assert_eq!(rejection.errno(), Errno::Inval);
        }
    }

    #[test]
    fn flags_must_be_defined_documented_for_the_command_and_advertised() {
        let limits = full_limits();
        let bad = [
            (Command::Read, 1 << 5),
            (Command::Read, 0x8000),
            (Command::Write, cmd_flag::DF),
            (Command::Write, cmd_flag::NO_HOLE),
            (Command::Read, cmd_flag::FAST_ZERO),
            (Command::Trim, cmd_flag::REQ_ONE),
            (Command::Flush, cmd_flag::NO_HOLE),
        ];
        for (command, flags) in bad {
            let length = if command == Command::Flush { 0 } else { 512 };
            let rejection = request(command, flags, 0, length)
                .check(SIZE, &limits)
                .unwrap_err();
            assert!(
                matches!(
                    rejection,
                    Rejection::UnknownFlags { .. } | Rejection::FlagNotAllowed { .. }
                ),
                "{command} {flags:#x}: {rejection:?}"
            );
            assert_eq!(rejection.errno(), Errno::Inval);
        }
        // FUA, DF and FAST_ZERO need their transmission flags.
        let plain = Limits::with_defaults(tf::HAS_FLAGS | tf::SEND_WRITE_ZEROES);
        for (command, flags) in [
            (Command::Write, cmd_flag::FUA),
            (Command::Read, cmd_flag::DF),
            (Command::WriteZeroes, cmd_flag::FAST_ZERO),
        ] {
            let rejection = request(command, flags, 0, 512)
                .check(SIZE, &plain)
                .unwrap_err();
            assert_eq!(
                rejection,
                Rejection::FlagNotAllowed {
                    command,
                    flag: cmd_flag::name(flags)
                }
            );
        }
        // FUA is accepted on every command once advertised.
        assert_eq!(
            request(Command::Read, cmd_flag::FUA, 0, 512).check(SIZE, &limits),
            Ok(())
        );
        assert_eq!(
            request(Command::Flush, cmd_flag::FUA, 0, 0).check(SIZE, &limits),
            Ok(())
        );
    }

    #[test]
    fn read_only_exports_refuse_changes_with_eperm() {
        let limits = Limits::with_defaults(
            tf::HAS_FLAGS | tf::READ_ONLY | tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FLUSH,
        );
        for command in [Command::Write, Command::Trim, Command::WriteZeroes] {
            let rejection = request(command, 0, 0, 512)
                .check(SIZE, &limits)
                .unwrap_err();
            assert_eq!(rejection, Rejection::ReadOnly { command });
            assert_eq!(rejection.errno(), Errno::Perm);
        }
        assert_eq!(
            request(Command::Read, 0, 0, 512).check(SIZE, &limits),
            Ok(())
        );
        assert_eq!(
            request(Command::Flush, 0, 0, 0).check(SIZE, &limits),
            Ok(())
        );
    }

    #[test]
    fn zero_lengths_and_flush_arguments_are_einval() {
        let limits = full_limits();
        for command in [
            Command::Read,
            Command::Write,
            Command::Trim,
            Command::Cache,
            Command::WriteZeroes,
        ] {
            assert_eq!(
                request(command, 0, 0, 0).check(SIZE, &limits),
                Err(Rejection::Empty { command })
            );
        }
        let rejection = request(Command::Flush, 0, 512, 0)
            .check(SIZE, &limits)
            .unwrap_err();
        assert!(matches!(rejection, Rejection::ReservedNotZero { .. }));
        assert_eq!(rejection.errno(), Errno::Inval);
    }

    #[test]
    fn a_refused_write_says_how_to_get_past_its_payload() {
        let limits = full_limits();
        assert_eq!(
            request(Command::Read, 0, 1, 1 << 30).after_rejection(&limits),
            AfterRejection::Reply
        );
        assert_eq!(
            request(Command::Write, 0, 1, 4096).after_rejection(&limits),
            AfterRejection::DiscardThenReply { bytes: 4096 }
        );
        assert_eq!(
            request(Command::Write, 0, 0, (32 << 20) + 1).after_rejection(&limits),
            AfterRejection::Close
        );
        let strict = limits.with_max_discard_bytes(0);
        assert_eq!(
            request(Command::Write, 0, 1, 512).after_rejection(&strict),
            AfterRejection::Close
        );
    }

    #[test]
    fn limits_refuse_block_sizes_the_protocol_does_not_allow() {
        assert!(Limits::new(0, 0, 4096).is_err());
        assert!(Limits::new(0, 3, 3).is_err());
        assert!(Limits::new(0, 1 << 17, 1 << 17).is_err());
        assert!(Limits::new(0, 512, 256).is_err());
        assert!(Limits::new(0, 512, 1000).is_err());
        assert!(Limits::new(0, 512, u32::MAX).is_err());
        let limits = Limits::new(0, 4096, 1 << 20).unwrap();
        assert_eq!(limits.max_discard_bytes(), DEFAULT_MAX_DISCARD_BYTES);
        let limits = Limits::new(0, 4096, 64 << 20).unwrap();
        assert_eq!(limits.max_discard_bytes(), 64 << 20);
    }

    #[test]
    fn simple_reply_layout() {
        let reply = simple_reply(0x1122_3344_5566_7788, Some(Errno::NoSpc));
        assert_eq!(
            reply,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        );
        assert_eq!(&simple_reply(1, None)[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn structured_chunk_layouts() {
        let header = structured_header(reply_flag::DONE, reply_type::ERROR, 9, 0x0102_0304);
        assert_eq!(
            header,
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 9, 1, 2, 3, 4]
        );
        let data = offset_data_header(5, 0x4000, 4096, false);
        assert_eq!(&data[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&data[4..8], &[0, 0, 0, 1]); // no flags, OFFSET_DATA
        assert_eq!(&data[16..20], &(8u32 + 4096).to_be_bytes());
        assert_eq!(&data[20..28], &0x4000u64.to_be_bytes());
        assert_eq!(&offset_data_header(5, 0, 1, true)[4..6], &[0, 1]);

        let hole = offset_hole_chunk(5, 0x8000, 512, true);
        assert_eq!(&hole[4..8], &[0, 1, 0, 2]);
        assert_eq!(&hole[16..20], &[0, 0, 0, 12]);
        assert_eq!(&hole[20..28], &0x8000u64.to_be_bytes());
        assert_eq!(&hole[28..32], &512u32.to_be_bytes());

        let none = none_chunk(77);
        assert_eq!(&none[4..8], &[0, 1, 0, 0]);
        assert_eq!(&none[8..16], &77u64.to_be_bytes());
        assert_eq!(&none[16..20], &[0, 0, 0, 0]);
    }

    #[test]
    fn error_chunks_carry_errno_and_message() {
        let mut out = Vec::new();
        error_chunk(&mut out, 3, Errno::Inval, "bad", true);
        assert_eq!(out.len(), 20 + 6 + 3);
        assert_eq!(&out[4..8], &[0, 1, 0x80, 1]);
        assert_eq!(&out[16..20], &9u32.to_be_bytes());
        assert_eq!(&out[20..24], &22u32.to_be_bytes());
        assert_eq!(&out[24..26], &3u16.to_be_bytes());
        assert_eq!(&out[26..], b"bad");

        out.clear();
        error_offset_chunk(&mut out, 3, Errno::Io, "", 0x1000, false);
        assert_eq!(out.len(), 20 + 14);
        assert_eq!(&out[4..8], &[0, 0, 0x80, 2]);
        assert_eq!(&out[16..20], &14u32.to_be_bytes());
        assert_eq!(&out[20..24], &5u32.to_be_bytes());
        assert_eq!(&out[24..26], &[0, 0]);
        assert_eq!(&out[26..34], &0x1000u64.to_be_bytes());

        // Long messages are cut on a character boundary.
        out.clear();
        let long = "é".repeat(300);
        error_chunk(&mut out, 3, Errno::Io, &long, true);
        let message_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert!(message_len <= MAX_MESSAGE_BYTES);
        assert!(std::str::from_utf8(&out[26..]).is_ok());
        assert_eq!(out.len(), 26 + message_len);
    }

    #[test]
    fn rejection_messages_name_what_was_wrong() {
        let rejection = request(Command::Write, 0, SIZE, 4096)
            .check(SIZE, &full_limits())
            .unwrap_err();
        assert_eq!(
            rejection.to_string(),
            "NBD_CMD_WRITE of 4096 bytes at offset 8589934592 is beyond the end of the export \
             (8589934592 bytes)"
        );
        assert_eq!(Errno::NoSpc.to_string(), "NBD_ENOSPC");
        for errno in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::NotSup,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_code(errno.code()), Some(errno));
        }
        assert_eq!(Errno::from_code(0), None);
    }

    fn any_command() -> impl Strategy<Value = Command> {
        any::<u16>().prop_map(Command::from_code)
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_headers(header in any::<[u8; REQUEST_HEADER_LEN]>()) {
            match Request::parse(&header) {
                Ok(request) => prop_assert_eq!(request.to_bytes(), header),
                Err(RequestError::BadMagic { found }) => {
                    prop_assert_ne!(found, magic::REQUEST);
                }
            }
        }

        #[test]
        fn encoded_requests_round_trip(
            cookie in any::<u64>(),
            flags in any::<u16>(),
            command in any_command(),
            offset in any::<u64>(),
            length in any::<u32>(),
        ) {
            let request = Request { cookie, flags, command, offset, length };
            prop_assert_eq!(Request::parse(&request.to_bytes()), Ok(request));
            prop_assert_eq!(Command::from_code(command.code()), command);
        }

        #[test]
        fn check_never_panics_and_accepts_only_what_fits(
            flags in any::<u16>(),
            command in any_command(),
            offset in any::<u64>(),
            length in any::<u32>(),
            size in any::<u64>(),
            transmission_flags in any::<u16>(),
            min_shift in 0u32..=16,
        ) {
            let min = 1u32 << min_shift;
            let limits = Limits::new(transmission_flags, min, min.max(1 << 20)).unwrap();
            let request = Request { cookie: 0, flags, command, offset, length };
            if request.check(size, &limits).is_ok() && command != Command::Disc && command != Command::Flush {
                prop_assert!(length > 0);
                prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|end| end <= size));
                prop_assert_eq!(offset % u64::from(min), 0);
                prop_assert_eq!(length % min, 0);
                prop_assert_eq!(flags & !cmd_flag::KNOWN, 0);
            }
        }
    }
}
