//! The server side of the fixed-newstyle NBD handshake, as a state machine fed with bytes.
//!
//! [`Handshake::new`] queues the server's greeting. The caller then loops: write
//! [`Handshake::output`] to the transport and report what went with
//! [`Handshake::consume_output`]; feed what arrives to [`Handshake::input`]; look at
//! [`Handshake::state`]. Input may arrive split anywhere, down to one byte at a time, and the
//! replies are the same whatever the split.
//!
//! When the handshake ends ([`State::Done`], [`State::Aborted`]) or pauses for TLS
//! ([`State::StartTls`]), `input` stops consuming: the bytes after the last option belong to
//! the transmission phase (a client may send its first request right behind `NBD_OPT_GO`) or
//! to the TLS handshake, and stay with the caller. The caller flushes the output before acting
//! on the state. An error means the connection must close; the output may still hold replies
//! to earlier options, which the caller may send first.
//!
//! Every resource a client can make the handshake spend is bounded: option data it must read
//! ([`MAX_OPTION_DATA_BYTES`], [`MAX_NAME_BYTES`]), data it reads and drops
//! ([`MAX_DISCARDED_BYTES`]), and options ([`MAX_OPTIONS`]). Replies queue in memory; a caller
//! that sends the output before feeding more input keeps that to the replies of one option,
//! since a client may not send an option before it has the reply to the previous one.

use std::collections::HashSet;

use super::proto::{
    be_u16, be_u32, be_u64, clamp_message, client_flag, handshake_flag, info, magic, opt, rep,
    transmission_flag, Limits, LimitsError, DEFAULT_MAX_BLOCK_BYTES, DEFAULT_MIN_BLOCK_BYTES,
    DEFAULT_PREFERRED_BLOCK_BYTES,
};

/// The protocol's bound on any string, export names included.
pub const MAX_NAME_BYTES: u32 = 4096;
/// The most option data the server reads into memory for one `NBD_OPT_INFO` or `NBD_OPT_GO`
/// (a name of at most 4 KiB and a few information requests need far less). Larger options are
/// answered with `NBD_REP_ERR_TOO_BIG`, their data dropped unread.
pub const MAX_OPTION_DATA_BYTES: u32 = 64 << 10;
/// Option data one handshake may make the server read and drop: data of options it does not
/// parse, and of options too large to parse. Beyond this the handshake fails.
pub const MAX_DISCARDED_BYTES: u64 = 1 << 20;
/// Options one handshake may send. Beyond this the handshake fails. Generous: listing the
/// exports and asking `NBD_OPT_INFO` about each takes one option per export.
pub const MAX_OPTIONS: u32 = 1024;

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;
/// A client's option header: `IHAVEOPT`, option code, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// An option reply header: magic, option code, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// The reply to `NBD_OPT_EXPORT_NAME` with the 124 reserved zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 8 + 2 + 124;
/// The reply to `NBD_OPT_EXPORT_NAME` without them (`NBD_FLAG_C_NO_ZEROES`).
pub const EXPORT_NAME_REPLY_NO_ZEROES_LEN: usize = 8 + 2;

/// The handshake flags this server sends.
const HANDSHAKE_FLAGS: u16 = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;

/// One export as the handshake describes it to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// What a client names in `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`, matched byte for byte.
    /// There is no implicit default export: a client that sends the empty name gets the
    /// export whose name is empty, if there is one.
    pub name: String,
    /// Shown to people by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    pub size_bytes: u64,
    /// [`transmission_flag`]s. `HAS_FLAGS` is always sent; `SEND_DF` only to clients that
    /// negotiated structured replies, as the protocol requires.
    pub transmission_flags: u16,
    /// Offsets and lengths must be multiples of this (a power of two up to 64 KiB).
    pub min_block_bytes: u32,
    /// The smallest request that avoids read-modify-write (a power of two, at least 512).
    pub preferred_block_bytes: u32,
    /// The largest read or write accepted.
    pub max_block_bytes: u32,
}

/// Why an [`ExportInfo`] cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("the name is {len} bytes; NBD strings are at most 4096")]
    NameTooLong { len: usize },
    #[error("the description is {len} bytes; NBD strings are at most 4096")]
    DescriptionTooLong { len: usize },
    #[error("the name or the description contains a NUL byte, which NBD strings may not")]
    Nul,
    #[error("another export has the same name, so clients could not choose between them")]
    DuplicateName,
    #[error(
        "transmission flags {flags:#06x} are not implemented here (resize and block-status \
         payloads are not)"
    )]
    UnsupportedFlags { flags: u16 },
    #[error("NBD_FLAG_SEND_FAST_ZERO needs NBD_FLAG_SEND_WRITE_ZEROES")]
    FastZeroWithoutWriteZeroes,
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error(
        "preferred block size {preferred_block_bytes} must be a power of two, at least 512 and \
         at least the minimum block size {min_block_bytes}"
    )]
    PreferredBlock {
        min_block_bytes: u32,
        preferred_block_bytes: u32,
    },
    #[error(
        "maximum block size {max_block_bytes} must be at least the preferred block size \
         {preferred_block_bytes} or the export size {size_bytes}, whichever is smaller"
    )]
    MaxBlockTooSmall {
        max_block_bytes: u32,
        preferred_block_bytes: u32,
        size_bytes: u64,
    },
    #[error(
        "size {size_bytes} is not a multiple of the minimum block size {min_block_bytes}, so \
         clients could not reach the last bytes"
    )]
    SizeNotMultiple {
        size_bytes: u64,
        min_block_bytes: u32,
    },
}

impl ExportInfo {
    /// An export with no description and the default block sizes: 512-byte minimum, 4 KiB
    /// preferred, 32 MiB maximum.
    pub fn new(name: impl Into<String>, size_bytes: u64, transmission_flags: u16) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: String::new(),
            size_bytes,
            transmission_flags,
            min_block_bytes: DEFAULT_MIN_BLOCK_BYTES,
            preferred_block_bytes: DEFAULT_PREFERRED_BLOCK_BYTES,
            max_block_bytes: DEFAULT_MAX_BLOCK_BYTES,
        }
    }

    /// Checks the export against the protocol's rules for strings, flags and block sizes, and
    /// returns the limits a connection to it enforces (with every advertised flag; the
    /// handshake drops `SEND_DF` for clients without structured replies).
    pub fn validate(&self) -> Result<Limits, ExportError> {
        use transmission_flag::{HAS_FLAGS, SEND_FAST_ZERO, SEND_WRITE_ZEROES, SUPPORTED};
        if self.name.len() > MAX_NAME_BYTES as usize {
            return Err(ExportError::NameTooLong {
                len: self.name.len(),
            });
        }
        if self.description.len() > MAX_NAME_BYTES as usize {
            return Err(ExportError::DescriptionTooLong {
                len: self.description.len(),
            });
        }
        if self.name.contains('\0') || self.description.contains('\0') {
            return Err(ExportError::Nul);
        }
        let unsupported = self.transmission_flags & !SUPPORTED;
        if unsupported != 0 {
            return Err(ExportError::UnsupportedFlags { flags: unsupported });
        }
        if self.transmission_flags & SEND_FAST_ZERO != 0
            && self.transmission_flags & SEND_WRITE_ZEROES == 0
        {
            return Err(ExportError::FastZeroWithoutWriteZeroes);
        }
        let limits = Limits::new(
            self.transmission_flags | HAS_FLAGS,
            self.min_block_bytes,
            self.max_block_bytes,
        )?;
        let preferred = self.preferred_block_bytes;
        if !preferred.is_power_of_two() || preferred < self.min_block_bytes.max(512) {
            return Err(ExportError::PreferredBlock {
                min_block_bytes: self.min_block_bytes,
                preferred_block_bytes: preferred,
            });
        }
        if u64::from(self.max_block_bytes) < u64::from(preferred).min(self.size_bytes) {
            return Err(ExportError::MaxBlockTooSmall {
                max_block_bytes: self.max_block_bytes,
                preferred_block_bytes: preferred,
                size_bytes: self.size_bytes,
            });
        }
        if !self
            .size_bytes
            .is_multiple_of(u64::from(self.min_block_bytes))
        {
            return Err(ExportError::SizeNotMultiple {
                size_bytes: self.size_bytes,
                min_block_bytes: self.min_block_bytes,
            });
        }
        Ok(limits)
    }
}

/// How the server treats TLS and structured replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// Refuse every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` until TLS is running
    /// (the protocol's FORCEDTLS mode). Needs `tls_offered`.
    pub tls_required: bool,
    /// Acknowledge `NBD_OPT_STARTTLS`, after which the caller runs TLS on the transport.
    /// Without it the option gets `NBD_REP_ERR_POLICY` (the protocol's NOTLS mode).
    pub tls_offered: bool,
    /// Acknowledge `NBD_OPT_STRUCTURED_REPLY`. Without it the option gets `NBD_REP_ERR_UNSUP`,
    /// the reply clients treat as "use simple replies" rather than as a failure.
    pub allow_structured_replies: bool,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            tls_required: false,
            tls_offered: false,
            allow_structured_replies: true,
        }
    }
}

/// What the client and the server agreed on; the transmission phase runs with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export in the list given to [`Handshake::new`].
    pub export_index: usize,
    pub size_bytes: u64,
    /// Replies to reads must be structured; others may be either.
    pub structured_replies: bool,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
    /// What [`Request::check`](super::proto::Request::check) enforces, with the transmission
    /// flags as sent to the client.
    pub limits: Limits,
}

/// Where the handshake stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Options are being exchanged: send the output, feed the input.
    Negotiating,
    /// `NBD_OPT_STARTTLS` was acknowledged. Send the output, run the TLS handshake on the
    /// transport (its first bytes may be in what `input` did not consume), then call
    /// [`Handshake::tls_started`] and go on with the decrypted stream.
    StartTls,
    /// The handshake is over: send the output, then serve the transmission phase. Bytes
    /// `input` did not consume are the start of it.
    Done(Negotiated),
    /// The client sent `NBD_OPT_ABORT`: send the output (its acknowledgement), then close.
    Aborted,
    /// `input` returned an error: close the connection.
    Failed,
}

/// Why the handshake cannot go on. Every variant but the first two means the connection must
/// close; those two are configuration mistakes found by [`Handshake::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error(
        "the NBD handshake config requires TLS but does not offer it: set tls_offered or clear \
         tls_required"
    )]
    TlsRequiredNotOffered,
    #[error("NBD export {name:?} cannot be served")]
    InvalidExport {
        name: String,
        #[source]
        source: ExportError,
    },
    #[error(
        "client flags {flags:#010x} set bits the protocol does not define; the client is not \
         speaking NBD"
    )]
    UnknownClientFlags { flags: u32 },
    #[error(
        "client flags {flags:#010x} lack NBD_FLAG_C_FIXED_NEWSTYLE; this server speaks only the \
         fixed newstyle handshake, so the client is too old or not an NBD client"
    )]
    NotFixedNewstyle { flags: u32 },
    #[error(
        "option header starts with {found:#018x}, not IHAVEOPT; the client lost framing or is \
         not an NBD client"
    )]
    BadOptionMagic { found: u64 },
    #[error(
        "NBD_OPT_EXPORT_NAME carries a {len}-byte name, beyond the protocol's 4096-byte limit; \
         the option has no error reply, so the connection closes"
    )]
    ExportNameTooLong { len: u32 },
    #[error(
        "NBD_OPT_EXPORT_NAME asked for export {name:?}, which this server does not have; the \
         option has no error reply, so the connection closes (clients using NBD_OPT_GO get an \
         error reply instead)"
    )]
    UnknownExport { name: String },
    #[error(
        "NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS; the option has no error \
         reply, so the connection closes"
    )]
    TlsRequired,
    #[error(
        "client sent more than {max} options without choosing an export; closing as a denial \
         of service",
        max = MAX_OPTIONS
    )]
    TooManyOptions,
    #[error(
        "{name} carries {len} bytes of data the server would read and drop, beyond the \
         {max}-byte budget of one handshake; closing as a denial of service",
        name = opt::name(*.option),
        max = MAX_DISCARDED_BYTES
    )]
    TooMuchOptionData { option: u32, len: u32 },
}

/// What `input` is assembling or skipping.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// The client's 32-bit flags.
    ClientFlags,
    /// The 16-byte header of the next option.
    OptionHeader,
    /// `len` bytes of data for `option`, collected into `Handshake::unit`.
    OptionData { option: u32, len: u32 },
    /// `remaining` of the `len` bytes of `option`'s data to drop before answering it.
    Discard {
        option: u32,
        len: u32,
        remaining: u32,
    },
}

/// An option's data as the answer sees it.
#[derive(Clone, Copy)]
enum Data<'a> {
    /// Read in full (empty for options that came without data).
    Read(&'a [u8]),
    /// This many bytes were dropped unread.
    Dropped(u32),
}

/// The server side of one connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    step: Step,
    /// The unit being assembled: client flags, an option header, or option data.
    unit: Vec<u8>,
    /// Bytes waiting to be sent.
    out: Vec<u8>,
    no_zeroes: bool,
    structured_replies: bool,
    tls_active: bool,
    options: u32,
    discarded_bytes: u64,
    // Fixed at construction.
    exports: Vec<ExportInfo>,
    /// Each export's limits, from `ExportInfo::validate`.
    limits: Vec<Limits>,
    config: HandshakeConfig,
}

impl Handshake {
    /// A handshake serving `exports`, with the greeting queued as output. Fails if an export
    /// breaks the protocol's rules ([`ExportInfo::validate`]), two share a name, or the config
    /// requires TLS without offering it.
    pub fn new(
        exports: Vec<ExportInfo>,
        config: HandshakeConfig,
    ) -> Result<Handshake, HandshakeError> {
        if config.tls_required && !config.tls_offered {
            return Err(HandshakeError::TlsRequiredNotOffered);
        }
        let mut limits = Vec::with_capacity(exports.len());
        let mut names = HashSet::with_capacity(exports.len());
        for export in &exports {
            let invalid = |source| HandshakeError::InvalidExport {
                name: export.name.clone(),
                source,
            };
            limits.push(export.validate().map_err(invalid)?);
            if !names.insert(export.name.as_str()) {
                return Err(invalid(ExportError::DuplicateName));
            }
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&magic::NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&magic::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
        debug_assert_eq!(out.len(), GREETING_LEN);
        Ok(Handshake {
            state: State::Negotiating,
            step: Step::ClientFlags,
            unit: Vec::with_capacity(OPTION_HEADER_LEN),
            out,
            no_zeroes: false,
            structured_replies: false,
            tls_active: false,
            options: 0,
            discarded_bytes: 0,
            exports,
            limits,
            config,
        })
    }

    /// Where the handshake stands.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// What was agreed, once the handshake is [`State::Done`].
    pub fn negotiated(&self) -> Option<&Negotiated> {
        match &self.state {
            State::Done(negotiated) => Some(negotiated),
            _ => None,
        }
    }

    /// The exports, in the order given to [`Handshake::new`].
    pub fn exports(&self) -> &[ExportInfo] {
        &self.exports
    }

    /// Whether the connection runs TLS ([`Handshake::tls_started`] was called).
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Bytes waiting to be sent to the client.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Drops the first `sent` bytes of the output, which the caller has sent.
    ///
    /// Panics if `sent` is more than [`Handshake::output`] holds (a caller bug).
    pub fn consume_output(&mut self, sent: usize) {
        assert!(
            sent <= self.out.len(),
            "consumed {sent} bytes of NBD handshake output, but only {} were waiting",
            self.out.len()
        );
        self.out.drain(..sent);
    }

    /// Feeds bytes received from the client and returns how many were consumed. While the
    /// state stays [`State::Negotiating`] that is all of them; once it changes, the rest are
    /// the caller's (transmission requests or TLS records). In any other state nothing is
    /// consumed. An error leaves the state [`State::Failed`].
    pub fn input(&mut self, data: &[u8]) -> Result<usize, HandshakeError> {
        let mut consumed = 0;
        while consumed < data.len() && self.state == State::Negotiating {
            match self.advance(&data[consumed..]) {
                Ok(taken) => consumed += taken,
                Err(error) => {
                    self.state = State::Failed;
                    return Err(error);
                }
            }
        }
        Ok(consumed)
    }

    /// Tells the handshake that TLS now runs on the transport, after [`State::StartTls`]; the
    /// options go on over it. Structured replies negotiated before TLS are forgotten, as the
    /// protocol requires; the client negotiates them again.
    ///
    /// Panics unless the state is [`State::StartTls`] (a caller bug).
    pub fn tls_started(&mut self) {
        assert_eq!(
            self.state,
            State::StartTls,
            "tls_started called while the NBD handshake was not waiting for TLS"
        );
        self.tls_active = true;
        self.state = State::Negotiating;
    }

    /// Consumes at least one byte of `rest` (which is not empty) towards the current step, and
    /// acts on the step once it is complete.
    fn advance(&mut self, rest: &[u8]) -> Result<usize, HandshakeError> {
        let unit_len = match self.step {
            Step::Discard {
                option,
                len,
                remaining,
            } => {
                // `taken` is at most `remaining`, a u32.
                let taken = rest.len().min(remaining as usize);
                let remaining = remaining - taken as u32;
                if remaining == 0 {
                    self.step = Step::OptionHeader;
                    self.answer(option, Data::Dropped(len))?;
                } else {
                    self.step = Step::Discard {
                        option,
                        len,
                        remaining,
                    };
                }
                return Ok(taken);
            }
            Step::ClientFlags => 4,
            Step::OptionHeader => OPTION_HEADER_LEN,
            Step::OptionData { len, .. } => len as usize,
        };
        let taken = rest.len().min(unit_len - self.unit.len());
        self.unit.extend_from_slice(&rest[..taken]);
        if self.unit.len() == unit_len {
            self.complete_unit()?;
        }
        Ok(taken)
    }

    /// Acts on a complete unit: client flags, an option header, or an option's data.
    fn complete_unit(&mut self) -> Result<(), HandshakeError> {
        match self.step {
            Step::ClientFlags => {
                let flags = be_u32(&self.unit, 0);
                self.unit.clear();
                if flags & !client_flag::KNOWN != 0 {
                    return Err(HandshakeError::UnknownClientFlags { flags });
                }
                if flags & client_flag::FIXED_NEWSTYLE == 0 {
                    return Err(HandshakeError::NotFixedNewstyle { flags });
                }
                self.no_zeroes = flags & client_flag::NO_ZEROES != 0;
                self.step = Step::OptionHeader;
                Ok(())
            }
            Step::OptionHeader => {
                let found = be_u64(&self.unit, 0);
                let option = be_u32(&self.unit, 8);
                let len = be_u32(&self.unit, 12);
                self.unit.clear();
                if found != magic::IHAVEOPT {
                    return Err(HandshakeError::BadOptionMagic { found });
                }
                self.options += 1;
                if self.options > MAX_OPTIONS {
                    return Err(HandshakeError::TooManyOptions);
                }
                self.begin_option(option, len)
            }
            Step::OptionData { option, .. } => {
                self.step = Step::OptionHeader;
                let data = std::mem::take(&mut self.unit);
                let answered = self.answer(option, Data::Read(&data));
                // Keep the allocation for the next unit.
                self.unit = data;
                self.unit.clear();
                answered
            }
            Step::Discard { .. } => unreachable!("advance handles discarding without units"),
        }
    }

    /// Decides, from its header, whether an option's data is read, dropped, or not there.
    fn begin_option(&mut self, option: u32, len: u32) -> Result<(), HandshakeError> {
        let readable = match option {
            opt::EXPORT_NAME if len > MAX_NAME_BYTES => {
                // The option has no error reply, so there is no point reading the name.
                return Err(HandshakeError::ExportNameTooLong { len });
            }
            opt::EXPORT_NAME => MAX_NAME_BYTES,
            opt::INFO | opt::GO => MAX_OPTION_DATA_BYTES,
            // The other options are answered without looking at their data.
            _ => 0,
        };
        if len == 0 {
            return self.answer(option, Data::Read(&[]));
        }
        if len <= readable {
            self.step = Step::OptionData { option, len };
            return Ok(());
        }
        let discarded_bytes = self.discarded_bytes + u64::from(len);
        if discarded_bytes > MAX_DISCARDED_BYTES {
            return Err(HandshakeError::TooMuchOptionData { option, len });
        }
        self.discarded_bytes = discarded_bytes;
        self.step = Step::Discard {
            option,
            len,
            remaining: len,
        };
        Ok(())
    }

    /// Answers an option whose data has been read or dropped.
    fn answer(&mut self, option: u32, data: Data<'_>) -> Result<(), HandshakeError> {
        let name = opt::name(option);
        let before_tls = self.config.tls_required && !self.tls_active;
        match (option, data) {
            // The protocol says to ignore data sent with NBD_OPT_ABORT.
            (opt::ABORT, _) => {
                self.reply(option, rep::ACK, &[]);
                self.state = State::Aborted;
            }
            (opt::EXPORT_NAME, Data::Dropped(len)) => {
                return Err(HandshakeError::ExportNameTooLong { len });
            }
            (opt::EXPORT_NAME, Data::Read(_)) if before_tls => {
                return Err(HandshakeError::TlsRequired);
            }
            (opt::EXPORT_NAME, Data::Read(export_name)) => self.export_name(export_name)?,
            (opt::STARTTLS, Data::Read(_)) => self.start_tls(),
            (opt::STARTTLS, Data::Dropped(len)) => self.reply_error(
                option,
                rep::ERR_INVALID,
                &format!("{name} takes no data, but {len} bytes came with it"),
            ),
            (_, _) if before_tls => self.reply_error(
                option,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            ),
            (opt::LIST, Data::Read(_)) => self.list(),
            (opt::STRUCTURED_REPLY, Data::Read(_)) => self.structured_reply(),
            (opt::LIST | opt::STRUCTURED_REPLY, Data::Dropped(len)) => self.reply_error(
                option,
                rep::ERR_INVALID,
                &format!("{name} takes no data, but {len} bytes came with it"),
            ),
            (opt::INFO | opt::GO, Data::Read(request)) => self.info(option, request),
            (opt::INFO | opt::GO, Data::Dropped(len)) => self.reply_error(
                option,
                rep::ERR_TOO_BIG,
                &format!(
                    "{name} carries {len} bytes of data; this server reads at most \
                     {MAX_OPTION_DATA_BYTES}"
                ),
            ),
            (_, _) => self.reply_error(
                option,
                rep::ERR_UNSUP,
                &format!("{name} (option {option}) is not supported by this server"),
            ),
        }
        Ok(())
    }

    /// `NBD_OPT_EXPORT_NAME`: the export's size and flags, then transmission.
    fn export_name(&mut self, export_name: &[u8]) -> Result<(), HandshakeError> {
        let Some(index) = self.find(export_name) else {
            return Err(HandshakeError::UnknownExport {
                name: String::from_utf8_lossy(export_name).into_owned(),
            });
        };
        let flags = self.transmission_flags(index);
        self.out
            .extend_from_slice(&self.exports[index].size_bytes.to_be_bytes());
        self.out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        self.finish(index);
        Ok(())
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export (name, then description), then ACK.
    fn list(&mut self) {
        for export in &self.exports {
            let name = export.name.as_bytes();
            let description = export.description.as_bytes();
            // Both are at most 4096 bytes (ExportInfo::validate).
            let len = 4 + name.len() + description.len();
            put_reply_header(&mut self.out, opt::LIST, rep::SERVER, len as u32);
            self.out
                .extend_from_slice(&(name.len() as u32).to_be_bytes());
            self.out.extend_from_slice(name);
            self.out.extend_from_slice(description);
        }
        self.reply(opt::LIST, rep::ACK, &[]);
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: parse the name and the information requests, describe
    /// the export, and for GO go to transmission.
    fn info(&mut self, option: u32, request: &[u8]) {
        let name = opt::name(option);
        if request.len() < 6 {
            return self.reply_error(
                option,
                rep::ERR_INVALID,
                &format!(
                    "{name} data is {} bytes; it needs at least 6: a 32-bit name length, the \
                     name, a 16-bit count of information requests",
                    request.len()
                ),
            );
        }
        let name_len = be_u32(request, 0) as usize;
        if name_len > request.len() - 6 {
            return self.reply_error(
                option,
                rep::ERR_INVALID,
                &format!(
                    "{name} gives a {name_len}-byte export name, which does not fit in its {} \
                     bytes of data",
                    request.len()
                ),
            );
        }
        let export_name = &request[4..4 + name_len];
        let count = usize::from(be_u16(request, 4 + name_len));
        let info_requests = &request[6 + name_len..];
        if info_requests.len() != 2 * count {
            return self.reply_error(
                option,
                rep::ERR_INVALID,
                &format!(
                    "{name} announces {count} information requests ({} bytes) but {} bytes \
                     follow the name",
                    2 * count,
                    info_requests.len()
                ),
            );
        }
        let Some(index) = self.find(export_name) else {
            return self.reply_error(
                option,
                rep::ERR_UNKNOWN,
                &format!(
                    "this server has no export named {:?}; NBD_OPT_LIST shows the exports",
                    String::from_utf8_lossy(export_name)
                ),
            );
        };
        let (mut want_name, mut want_description) = (false, false);
        for info_request in info_requests.chunks_exact(2) {
            match be_u16(info_request, 0) {
                info::NAME => want_name = true,
                info::DESCRIPTION => want_description = true,
                // EXPORT and BLOCK_SIZE are always sent; the protocol says to ignore the
                // information types the server does not know.
                _ => {}
            }
        }

        let flags = self.transmission_flags(index);
        let export = &self.exports[index];
        let out = &mut self.out;
        put_reply_header(out, option, rep::INFO, 12);
        out.extend_from_slice(&info::EXPORT.to_be_bytes());
        out.extend_from_slice(&export.size_bytes.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        // Names and descriptions are at most 4096 bytes (ExportInfo::validate).
        if want_name {
            put_reply_header(out, option, rep::INFO, 2 + export.name.len() as u32);
            out.extend_from_slice(&info::NAME.to_be_bytes());
            out.extend_from_slice(export.name.as_bytes());
        }
        if want_description {
            let len = 2 + export.description.len() as u32;
            put_reply_header(out, option, rep::INFO, len);
            out.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
            out.extend_from_slice(export.description.as_bytes());
        }
        // Sent whether asked for or not: the server enforces these sizes either way, and a
        // client that did not ask still learns them. It never refuses such a client with
        // NBD_REP_ERR_BLOCK_SIZE_REQD; Request::check errors what falls outside instead.
        put_reply_header(out, option, rep::INFO, 14);
        out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        out.extend_from_slice(&export.min_block_bytes.to_be_bytes());
        out.extend_from_slice(&export.preferred_block_bytes.to_be_bytes());
        out.extend_from_slice(&export.max_block_bytes.to_be_bytes());
        self.reply(option, rep::ACK, &[]);
        if option == opt::GO {
            self.finish(index);
        }
    }

    /// `NBD_OPT_STRUCTURED_REPLY`.
    fn structured_reply(&mut self) {
        let option = opt::STRUCTURED_REPLY;
        if !self.config.allow_structured_replies {
            self.reply_error(
                option,
                rep::ERR_UNSUP,
                "structured replies are disabled on this server",
            );
        } else if self.structured_replies {
            self.reply_error(
                option,
                rep::ERR_INVALID,
                "structured replies were already negotiated",
            );
        } else {
            self.structured_replies = true;
            self.reply(option, rep::ACK, &[]);
        }
    }

    /// `NBD_OPT_STARTTLS`.
    fn start_tls(&mut self) {
        let option = opt::STARTTLS;
        if !self.config.tls_offered {
            // The server knows the option; its configuration forbids it.
            self.reply_error(option, rep::ERR_POLICY, "TLS is not enabled on this server");
        } else if self.tls_active {
            self.reply_error(option, rep::ERR_INVALID, "TLS is already running");
        } else {
            // The protocol: no negotiation state survives the upgrade.
            self.structured_replies = false;
            self.reply(option, rep::ACK, &[]);
            self.state = State::StartTls;
        }
    }

    fn find(&self, export_name: &[u8]) -> Option<usize> {
        self.exports
            .iter()
            .position(|export| export.name.as_bytes() == export_name)
    }

    /// The transmission flags sent for export `index` to this client.
    fn transmission_flags(&self, index: usize) -> u16 {
        let mut flags = self.exports[index].transmission_flags | transmission_flag::HAS_FLAGS;
        if !self.structured_replies {
            // The protocol: SEND_DF MUST be clear without structured replies.
            flags &= !transmission_flag::SEND_DF;
        }
        flags
    }

    fn finish(&mut self, index: usize) {
        let flags = self.transmission_flags(index);
        self.state = State::Done(Negotiated {
            export_index: index,
            size_bytes: self.exports[index].size_bytes,
            structured_replies: self.structured_replies,
            no_zeroes: self.no_zeroes,
            limits: self.limits[index].with_transmission_flags(flags),
        });
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        // Callers pass at most a clamped message here.
        put_reply_header(&mut self.out, option, reply, data.len() as u32);
        self.out.extend_from_slice(data);
    }

    /// An error reply carrying a message for the client's user.
    fn reply_error(&mut self, option: u32, reply: u32, message: &str) {
        debug_assert!(rep::is_error(reply));
        self.reply(option, reply, clamp_message(message).as_bytes());
    }
}

fn put_reply_header(out: &mut Vec<u8>, option: u32, reply: u32, len: u32) {
    out.extend_from_slice(&magic::OPTION_REPLY.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::super::proto::{Command, Request, REQUEST_HEADER_LEN};
    use super::*;
    use proptest::prelude::*;
    use transmission_flag as tf;

    const VOL0_FLAGS: u16 = tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_DF | tf::SEND_TRIM;

    fn exports() -> Vec<ExportInfo> {
        let mut vol0 = ExportInfo::new("vol0", 1 << 30, VOL0_FLAGS);
        vol0.description = "first volume".into();
        let mut vol1 = ExportInfo::new("vol1", 64 << 20, tf::READ_ONLY);
        vol1.min_block_bytes = 4096;
        vol1.max_block_bytes = 1 << 20;
        vec![vol0, vol1]
    }

    fn handshake(config: HandshakeConfig) -> Handshake {
        Handshake::new(exports(), config).unwrap()
    }

    fn client_flags(flags: u32) -> Vec<u8> {
        flags.to_be_bytes().to_vec()
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut bytes = b"IHAVEOPT".to_vec();
        bytes.extend_from_slice(&code.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn go_data(name: &str, info_requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(info_requests.len() as u16).to_be_bytes());
        for info_request in info_requests {
            data.extend_from_slice(&info_request.to_be_bytes());
        }
        data
    }

    const FIXED: u32 = client_flag::FIXED_NEWSTYLE;
    const FIXED_NO_ZEROES: u32 = client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES;

    /// One option reply: option, reply type, data.
    type Reply = (u32, u32, Vec<u8>);

    /// Splits option replies; panics on anything else.
    fn replies(mut bytes: &[u8]) -> Vec<Reply> {
        let mut replies = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(be_u64(bytes, 0), magic::OPTION_REPLY, "not an option reply");
            let len = be_u32(bytes, 16) as usize;
            replies.push((
                be_u32(bytes, 8),
                be_u32(bytes, 12),
                bytes[20..20 + len].to_vec(),
            ));
            bytes = &bytes[20 + len..];
        }
        replies
    }

    /// Reads the greeting off the output and checks it.
    fn take_greeting(handshake: &mut Handshake) {
        assert_eq!(
            &handshake.output()[..GREETING_LEN],
            b"NBDMAGICIHAVEOPT\x00\x03"
        );
        handshake.consume_output(GREETING_LEN);
    }

    /// Feeds `bytes` all at once and returns what was not consumed.
    fn feed(handshake: &mut Handshake, bytes: &[u8]) -> Vec<u8> {
        let consumed = handshake.input(bytes).unwrap();
        bytes[consumed..].to_vec()
    }

    /// Takes all pending output.
    fn drain(handshake: &mut Handshake) -> Vec<u8> {
        let out = handshake.output().to_vec();
        handshake.consume_output(out.len());
        out
    }

    fn error_message(reply: &Reply) -> String {
        assert!(rep::is_error(reply.1), "{reply:?} is not an error");
        String::from_utf8(reply.2.clone()).unwrap()
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
        let handshake = handshake(HandshakeConfig::default());
        assert_eq!(
            handshake.output(),
            &[
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0x00, 0x03
            ]
        );
        assert_eq!(handshake.state(), &State::Negotiating);
    }

    #[test]
    fn handcrafted_client_fed_byte_by_byte_reaches_transmission() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        #[rustfmt::skip]
        let client: &[u8] = &[
            0, 0, 0, 3,                                         // FIXED_NEWSTYLE | NO_ZEROES
            b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T',     // NBD_OPT_STRUCTURED_REPLY
            0, 0, 0, 8, 0, 0, 0, 0,
            b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T',     // NBD_OPT_GO, 14 bytes
            0, 0, 0, 7, 0, 0, 0, 14,
            0, 0, 0, 4, b'v', b'o', b'l', b'0',                 // name "vol0"
            0, 2, 0, 1, 0, 3,                                   // NAME, BLOCK_SIZE
            0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0,                 // a pipelined NBD_CMD_READ
            0, 0, 0, 0, 0, 0, 0, 42,
            0, 0, 0, 0, 0, 0, 0x10, 0,
            0, 0, 0x10, 0,
        ];
        let mut leftover = Vec::new();
        for byte in client {
            if handshake.state() == &State::Negotiating {
                assert_eq!(handshake.input(&[*byte]).unwrap(), 1);
            } else {
                assert_eq!(handshake.input(&[*byte]).unwrap(), 0);
                leftover.push(*byte);
            }
        }
        #[rustfmt::skip]
        let expected: &[u8] = &[
            // ACK to STRUCTURED_REPLY
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0,
            // INFO_EXPORT: size 1 GiB, flags HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_DF
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12,
            0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0xad,
            // INFO_NAME
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 6,
            0, 1, b'v', b'o', b'l', b'0',
            // INFO_BLOCK_SIZE: 512, 4096, 32 MiB
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 14,
            0, 3, 0, 0, 0x02, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0,
            // ACK to GO
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0,
        ];
        assert_eq!(handshake.output(), expected);
        let negotiated = *handshake.negotiated().unwrap();
        assert_eq!(negotiated.export_index, 0);
        assert_eq!(negotiated.size_bytes, 1 << 30);
        assert!(negotiated.structured_replies);
        assert!(negotiated.no_zeroes);
        assert_eq!(
            negotiated.limits.transmission_flags(),
            tf::HAS_FLAGS | VOL0_FLAGS
        );
        assert_eq!(negotiated.limits.min_block_bytes(), 512);

        // What was left is the first request, whole.
        let header: [u8; REQUEST_HEADER_LEN] = leftover.try_into().unwrap();
        let request = Request::parse(&header).unwrap();
        assert_eq!(request.command, Command::Read);
        assert_eq!(request.cookie, 42);
        assert_eq!((request.offset, request.length), (0x1000, 0x1000));
        assert_eq!(
            request.check(negotiated.size_bytes, &negotiated.limits),
            Ok(())
        );
    }

    #[test]
    fn pipelined_request_after_go_is_left_unconsumed_when_fed_at_once() {
        let mut handshake = handshake(HandshakeConfig::default());
        let request = Request {
            cookie: 7,
            flags: 0,
            command: Command::Write,
            offset: 0,
            length: 512,
        };
        let mut client = client_flags(FIXED);
        client.extend(option(opt::GO, &go_data("vol1", &[])));
        client.extend_from_slice(&request.to_bytes());
        client.extend_from_slice(&[0xab; 512]);
        let leftover = feed(&mut handshake, &client);
        assert_eq!(leftover.len(), REQUEST_HEADER_LEN + 512);
        assert_eq!(&leftover[..REQUEST_HEADER_LEN], &request.to_bytes());
        let negotiated = *handshake.negotiated().unwrap();
        assert_eq!(negotiated.export_index, 1);
        // Once done, nothing more is consumed.
        assert_eq!(handshake.input(&leftover).unwrap(), 0);
    }

    #[test]
    fn go_with_an_unknown_name_is_an_error_reply_and_the_client_may_retry() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::GO, &go_data("nope", &[info::NAME])));
        assert!(feed(&mut handshake, &client).is_empty());
        let out = drain(&mut handshake);
        let replies = replies(&out);
        assert_eq!(replies.len(), 1, "no NBD_REP_INFO before the error");
        assert_eq!((replies[0].0, replies[0].1), (opt::GO, rep::ERR_UNKNOWN));
        assert_eq!(
            error_message(&replies[0]),
            "this server has no export named \"nope\"; NBD_OPT_LIST shows the exports"
        );
        assert_eq!(handshake.state(), &State::Negotiating);

        assert!(feed(&mut handshake, &option(opt::GO, &go_data("vol0", &[]))).is_empty());
        assert_eq!(handshake.negotiated().unwrap().export_index, 0);
    }

    #[test]
    fn list_sends_one_server_reply_per_export_then_ack() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::LIST, &[]));
        feed(&mut handshake, &client);
        let out = drain(&mut handshake);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 20,
            0, 0, 0, 4, b'v', b'o', b'l', b'0',
            b'f', b'i', b'r', b's', b't', b' ', b'v', b'o', b'l', b'u', b'm', b'e',
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 8,
            0, 0, 0, 4, b'v', b'o', b'l', b'1',
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0,
        ];
        assert_eq!(out, expected);

        // LIST with data is invalid, and the data is skipped.
        feed(&mut handshake, &option(opt::LIST, b"junk"));
        let out = drain(&mut handshake);
        let replies = replies(&out);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1, rep::ERR_INVALID);
        assert_eq!(
            error_message(&replies[0]),
            "NBD_OPT_LIST takes no data, but 4 bytes came with it"
        );
        assert_eq!(handshake.state(), &State::Negotiating);
    }

    #[test]
    fn info_describes_without_ending_and_go_then_repeats_it() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        let asked = [info::DESCRIPTION, info::NAME, 0x7777, info::EXPORT];
        let mut client = client_flags(FIXED);
        client.extend(option(opt::INFO, &go_data("vol1", &asked)));
        feed(&mut handshake, &client);
        let info_out = drain(&mut handshake);
        assert_eq!(handshake.state(), &State::Negotiating);
        let info_replies = replies(&info_out);
        let types: Vec<u16> = info_replies[..info_replies.len() - 1]
            .iter()
            .map(|reply| {
                assert_eq!((reply.0, reply.1), (opt::INFO, rep::INFO));
                be_u16(&reply.2, 0)
            })
            .collect();
        assert_eq!(
            types,
            [
                info::EXPORT,
                info::NAME,
                info::DESCRIPTION,
                info::BLOCK_SIZE
            ]
        );
        assert_eq!(info_replies.last().unwrap().1, rep::ACK);
        let export = &info_replies[0].2;
        assert_eq!(be_u64(export, 2), 64 << 20);
        assert_eq!(be_u16(export, 10), tf::HAS_FLAGS | tf::READ_ONLY);
        assert_eq!(info_replies[2].2, b"\x00\x02");
        let block_size = &info_replies[3].2;
        assert_eq!(
            (
                be_u32(block_size, 2),
                be_u32(block_size, 6),
                be_u32(block_size, 10)
            ),
            (4096, 4096, 1 << 20)
        );

        feed(&mut handshake, &option(opt::GO, &go_data("vol1", &asked)));
        let go_out = drain(&mut handshake);
        let go_replies = replies(&go_out);
        assert_eq!(go_replies.len(), info_replies.len());
        for (go, info) in go_replies.iter().zip(&info_replies) {
            assert_eq!(go.0, opt::GO);
            assert_eq!((go.1, &go.2), (info.1, &info.2));
        }
        let negotiated = handshake.negotiated().unwrap();
        assert_eq!(negotiated.export_index, 1);
        assert_eq!(negotiated.limits.min_block_bytes(), 4096);
        assert_eq!(negotiated.limits.max_block_bytes(), 1 << 20);
    }

    #[test]
    fn send_df_is_advertised_only_with_structured_replies() {
        for structured in [false, true] {
            let mut handshake = handshake(HandshakeConfig::default());
            let mut client = client_flags(FIXED);
            if structured {
                client.extend(option(opt::STRUCTURED_REPLY, &[]));
            }
            client.extend(option(opt::GO, &go_data("vol0", &[])));
            feed(&mut handshake, &client);
            let negotiated = handshake.negotiated().unwrap();
            assert_eq!(negotiated.structured_replies, structured);
            let flags = negotiated.limits.transmission_flags();
            assert_eq!(flags & tf::SEND_DF != 0, structured);
            let out = handshake.output()[GREETING_LEN..].to_vec();
            let export = replies(&out)
                .into_iter()
                .find(|reply| reply.1 == rep::INFO && be_u16(&reply.2, 0) == info::EXPORT)
                .unwrap();
            assert_eq!(be_u16(&export.2, 10), flags);
        }
    }

    #[test]
    fn export_name_replies_size_flags_and_zeroes_unless_no_zeroes() {
        for (flags, expected_len) in [
            (FIXED, EXPORT_NAME_REPLY_LEN),
            (FIXED_NO_ZEROES, EXPORT_NAME_REPLY_NO_ZEROES_LEN),
        ] {
            let mut handshake = handshake(HandshakeConfig::default());
            take_greeting(&mut handshake);
            let mut client = client_flags(flags);
            client.extend(option(opt::EXPORT_NAME, b"vol1"));
            client.extend_from_slice(b"tail");
            assert_eq!(feed(&mut handshake, &client), b"tail");
            let out = drain(&mut handshake);
            assert_eq!(out.len(), expected_len);
            assert_eq!(&out[..8], &(64u64 << 20).to_be_bytes());
            assert_eq!(&out[8..10], &(tf::HAS_FLAGS | tf::READ_ONLY).to_be_bytes());
            assert!(out[10..].iter().all(|byte| *byte == 0));
            let negotiated = handshake.negotiated().unwrap();
            assert_eq!(negotiated.export_index, 1);
            assert_eq!(negotiated.no_zeroes, flags == FIXED_NO_ZEROES);
        }
    }

    #[test]
    fn export_name_for_an_unknown_export_closes() {
        let mut handshake = handshake(HandshakeConfig::default());
        let mut client = client_flags(FIXED);
        client.extend(option(opt::EXPORT_NAME, b"missing"));
        assert_eq!(
            handshake.input(&client),
            Err(HandshakeError::UnknownExport {
                name: "missing".into()
            })
        );
        assert_eq!(handshake.state(), &State::Failed);
        assert_eq!(handshake.input(b"more").unwrap(), 0);
    }

    #[test]
    fn the_empty_name_is_an_export_name_like_any_other() {
        let mut handshake = handshake(HandshakeConfig::default());
        let mut client = client_flags(FIXED);
        client.extend(option(opt::EXPORT_NAME, b""));
        assert!(matches!(
            handshake.input(&client),
            Err(HandshakeError::UnknownExport { .. })
        ));
        let mut default = exports();
        default.push(ExportInfo::new("", 1 << 20, 0));
        let mut handshake = Handshake::new(default, HandshakeConfig::default()).unwrap();
        feed(&mut handshake, &client);
        assert_eq!(handshake.negotiated().unwrap().export_index, 2);
    }

    #[test]
    fn unsupported_options_get_err_unsup_and_their_data_is_skipped() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        for (code, data) in [
            (
                opt::LIST_META_CONTEXT,
                &b"\x00\x00\x00\x04vol0\x00\x00\x00\x00"[..],
            ),
            (opt::SET_META_CONTEXT, &[0u8; 8][..]),
            (opt::EXTENDED_HEADERS, &[][..]),
            (opt::PEEK_EXPORT, &[][..]),
            (0x1234_5678, &[0xffu8; 300][..]),
        ] {
            client.extend(option(code, data));
        }
        client.extend(option(opt::GO, &go_data("vol0", &[])));
        assert!(feed(&mut handshake, &client).is_empty());
        let out = drain(&mut handshake);
        let replies = replies(&out);
        let codes: Vec<(u32, u32)> = replies.iter().map(|reply| (reply.0, reply.1)).collect();
        assert_eq!(
            &codes[..5],
            &[
                (opt::LIST_META_CONTEXT, rep::ERR_UNSUP),
                (opt::SET_META_CONTEXT, rep::ERR_UNSUP),
                (opt::EXTENDED_HEADERS, rep::ERR_UNSUP),
                (opt::PEEK_EXPORT, rep::ERR_UNSUP),
                (0x1234_5678, rep::ERR_UNSUP),
            ]
        );
        assert_eq!(
            error_message(&replies[4]),
            "an unknown option (option 305419896) is not supported by this server"
        );
        assert_eq!(
            error_message(&replies[2]),
            "NBD_OPT_EXTENDED_HEADERS (option 11) is not supported by this server"
        );
        assert!(handshake.negotiated().is_some());
    }

    #[test]
    fn structured_reply_once_without_data_and_only_when_allowed() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::STRUCTURED_REPLY, b"x"));
        client.extend(option(opt::STRUCTURED_REPLY, &[]));
        client.extend(option(opt::STRUCTURED_REPLY, &[]));
        feed(&mut handshake, &client);
        let out = drain(&mut handshake);
        let types: Vec<u32> = replies(&out).iter().map(|reply| reply.1).collect();
        assert_eq!(types, [rep::ERR_INVALID, rep::ACK, rep::ERR_INVALID]);

        let mut handshake = handshake_with(HandshakeConfig {
            allow_structured_replies: false,
            ..HandshakeConfig::default()
        });
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::STRUCTURED_REPLY, &[]));
        client.extend(option(opt::GO, &go_data("vol0", &[])));
        feed(&mut handshake, &client);
        let out = drain(&mut handshake);
        assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
        assert!(!handshake.negotiated().unwrap().structured_replies);
    }

    /// [`handshake`], for scopes where a local named `handshake` hides the function.
    fn handshake_with(config: HandshakeConfig) -> Handshake {
        handshake(config)
    }

    #[test]
    fn starttls_without_tls_is_refused_by_policy() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::STARTTLS, &[]));
        client.extend(option(opt::STARTTLS, b"data"));
        feed(&mut handshake, &client);
        let out = drain(&mut handshake);
        let replies = replies(&out);
        assert_eq!(replies[0].1, rep::ERR_POLICY);
        assert_eq!(
            error_message(&replies[0]),
            "TLS is not enabled on this server"
        );
        assert_eq!(replies[1].1, rep::ERR_INVALID);
        assert_eq!(handshake.state(), &State::Negotiating);
    }

    #[test]
    fn starttls_hands_the_transport_over_and_options_resume_after() {
        let mut handshake = handshake(HandshakeConfig {
            tls_offered: true,
            ..HandshakeConfig::default()
        });
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::STRUCTURED_REPLY, &[]));
        client.extend(option(opt::STARTTLS, &[]));
        client.extend_from_slice(b"\x16\x03\x01 client hello");
        let leftover = feed(&mut handshake, &client);
        assert_eq!(leftover, b"\x16\x03\x01 client hello");
        assert_eq!(handshake.state(), &State::StartTls);
        assert_eq!(handshake.input(&leftover).unwrap(), 0);
        let out = drain(&mut handshake);
        let types: Vec<u32> = replies(&out).iter().map(|reply| reply.1).collect();
        assert_eq!(types, [rep::ACK, rep::ACK]);

        handshake.tls_started();
        assert!(handshake.tls_active());
        let mut client = option(opt::STARTTLS, &[]);
        client.extend(option(opt::GO, &go_data("vol0", &[])));
        feed(&mut handshake, &client);
        let out = drain(&mut handshake);
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
        // Structured replies negotiated before TLS do not survive it.
        assert!(!handshake.negotiated().unwrap().structured_replies);
    }

    #[test]
    fn required_tls_refuses_options_until_it_runs() {
        let config = HandshakeConfig {
            tls_required: true,
            tls_offered: true,
            ..HandshakeConfig::default()
        };
        let mut handshake = handshake(config);
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::LIST, &[]));
        client.extend(option(opt::GO, &go_data("vol0", &[])));
        client.extend(option(0x99, b"zz"));
        feed(&mut handshake, &client);
        let out = drain(&mut handshake);
        let types: Vec<u32> = replies(&out).iter().map(|reply| reply.1).collect();
        assert_eq!(types, [rep::ERR_TLS_REQD; 3]);

        assert_eq!(
            handshake.input(&option(opt::EXPORT_NAME, b"vol0")),
            Err(HandshakeError::TlsRequired)
        );

        let mut handshake = handshake_with(config);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::STARTTLS, &[]));
        feed(&mut handshake, &client);
        handshake.tls_started();
        feed(&mut handshake, &option(opt::EXPORT_NAME, b"vol0"));
        assert!(handshake.negotiated().is_some());

        assert_eq!(
            Handshake::new(
                exports(),
                HandshakeConfig {
                    tls_required: true,
                    ..HandshakeConfig::default()
                }
            )
            .unwrap_err(),
            HandshakeError::TlsRequiredNotOffered
        );
    }

    #[test]
    fn abort_is_acknowledged_and_ends_the_handshake() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        let mut client = client_flags(FIXED);
        client.extend(option(opt::ABORT, b"ignored"));
        client.extend(option(opt::LIST, &[]));
        let leftover = feed(&mut handshake, &client);
        assert_eq!(leftover, option(opt::LIST, &[]));
        assert_eq!(handshake.state(), &State::Aborted);
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0,
        ];
        assert_eq!(handshake.output(), expected);
    }

    #[test]
    fn clients_that_are_not_fixed_newstyle_are_refused() {
        let mut handshake = handshake(HandshakeConfig::default());
        assert_eq!(
            handshake.input(&client_flags(client_flag::NO_ZEROES)),
            Err(HandshakeError::NotFixedNewstyle { flags: 2 })
        );
        let mut handshake = handshake_with(HandshakeConfig::default());
        assert_eq!(
            handshake.input(&client_flags(FIXED | 1 << 7)),
            Err(HandshakeError::UnknownClientFlags { flags: 0x81 })
        );
        let mut handshake = handshake_with(HandshakeConfig::default());
        let mut client = client_flags(FIXED);
        client.extend_from_slice(b"IHAVEOPS\0\0\0\x03\0\0\0\0");
        assert_eq!(
            handshake.input(&client),
            Err(HandshakeError::BadOptionMagic {
                found: u64::from_be_bytes(*b"IHAVEOPS")
            })
        );
        assert_eq!(handshake.state(), &State::Failed);
    }

    #[test]
    fn malformed_info_and_go_requests_are_invalid() {
        let mut too_long_name = go_data("vol0", &[]);
        too_long_name[3] = 5;
        let mut wrong_count = go_data("vol0", &[info::NAME]);
        wrong_count[9] = 2;
        for data in [&b"\0\0\0"[..], &too_long_name, &wrong_count] {
            for code in [opt::INFO, opt::GO] {
                let mut handshake = handshake(HandshakeConfig::default());
                take_greeting(&mut handshake);
                let mut client = client_flags(FIXED);
                client.extend(option(code, data));
                feed(&mut handshake, &client);
                let out = drain(&mut handshake);
                let replies = replies(&out);
                assert_eq!(replies.len(), 1);
                assert_eq!((replies[0].0, replies[0].1), (code, rep::ERR_INVALID));
                assert!(!error_message(&replies[0]).is_empty());
                assert_eq!(handshake.state(), &State::Negotiating);
            }
        }
    }

    #[test]
    fn oversized_options_get_too_big_within_a_budget_then_close() {
        let mut handshake = handshake(HandshakeConfig::default());
        take_greeting(&mut handshake);
        let big = vec![0u8; MAX_OPTION_DATA_BYTES as usize + 1];
        let mut client = client_flags(FIXED);
        client.extend(option(opt::GO, &big));
        feed(&mut handshake, &client);
        let out = drain(&mut handshake);
        let replies = replies(&out);
        assert_eq!((replies[0].0, replies[0].1), (opt::GO, rep::ERR_TOO_BIG));
        assert_eq!(handshake.state(), &State::Negotiating);

        // Just a header announcing more than the budget closes at once.
        let mut header = b"IHAVEOPT".to_vec();
        header.extend_from_slice(&opt::INFO.to_be_bytes());
        header.extend_from_slice(&(2u32 << 20).to_be_bytes());
        assert_eq!(
            handshake.input(&header),
            Err(HandshakeError::TooMuchOptionData {
                option: opt::INFO,
                len: 2 << 20
            })
        );

        let mut handshake = handshake_with(HandshakeConfig::default());
        let mut client = client_flags(FIXED);
        client.extend_from_slice(b"IHAVEOPT\0\0\0\x01\0\0\x10\x01");
        assert_eq!(
            handshake.input(&client),
            Err(HandshakeError::ExportNameTooLong { len: 4097 })
        );
    }

    #[test]
    fn option_count_is_bounded() {
        let mut handshake = handshake(HandshakeConfig::default());
        feed(&mut handshake, &client_flags(FIXED));
        let list = option(opt::LIST, &[]);
        for _ in 0..MAX_OPTIONS {
            feed(&mut handshake, &list);
            drain(&mut handshake);
        }
        assert_eq!(handshake.input(&list), Err(HandshakeError::TooManyOptions));
    }

    #[test]
    fn exports_that_break_the_protocol_are_refused_at_construction() {
        let base = ExportInfo::new("v", 1 << 20, 0);
        let cases: Vec<(ExportInfo, ExportError)> = vec![
            (
                ExportInfo {
                    name: "n".repeat(4097),
                    ..base.clone()
                },
                ExportError::NameTooLong { len: 4097 },
            ),
            (
                ExportInfo {
                    description: "a\0b".into(),
                    ..base.clone()
                },
                ExportError::Nul,
            ),
            (
                ExportInfo {
                    transmission_flags: tf::SEND_RESIZE,
                    ..base.clone()
                },
                ExportError::UnsupportedFlags {
                    flags: tf::SEND_RESIZE,
                },
            ),
            (
                ExportInfo {
                    transmission_flags: tf::SEND_FAST_ZERO,
                    ..base.clone()
                },
                ExportError::FastZeroWithoutWriteZeroes,
            ),
            (
                ExportInfo {
                    min_block_bytes: 768,
                    ..base.clone()
                },
                ExportError::Limits(LimitsError::MinBlock {
                    min_block_bytes: 768,
                }),
            ),
            (
                ExportInfo {
                    preferred_block_bytes: 256,
                    ..base.clone()
                },
                ExportError::PreferredBlock {
                    min_block_bytes: 512,
                    preferred_block_bytes: 256,
                },
            ),
            (
                ExportInfo {
                    preferred_block_bytes: 8192,
                    max_block_bytes: 4096,
                    ..base.clone()
                },
                ExportError::MaxBlockTooSmall {
                    max_block_bytes: 4096,
                    preferred_block_bytes: 8192,
                    size_bytes: 1 << 20,
                },
            ),
            (
                ExportInfo {
                    size_bytes: (1 << 20) + 1,
                    ..base.clone()
                },
                ExportError::SizeNotMultiple {
                    size_bytes: (1 << 20) + 1,
                    min_block_bytes: 512,
                },
            ),
        ];
        for (export, expected) in cases {
            assert_eq!(export.validate(), Err(expected.clone()));
            let name = export.name.clone();
            assert_eq!(
                Handshake::new(vec![export], HandshakeConfig::default()).unwrap_err(),
                HandshakeError::InvalidExport {
                    name,
                    source: expected
                }
            );
        }
        assert_eq!(
            Handshake::new(vec![base.clone(), base], HandshakeConfig::default()).unwrap_err(),
            HandshakeError::InvalidExport {
                name: "v".into(),
                source: ExportError::DuplicateName
            }
        );
    }

    #[test]
    #[should_panic(expected = "only 18 were waiting")]
    fn consuming_more_output_than_waits_is_a_caller_bug() {
        handshake(HandshakeConfig::default()).consume_output(19);
    }

    // Property tests.

    /// One client option for the generated conversations.
    #[derive(Debug, Clone)]
    enum ClientOption {
        List,
        Info {
            export: usize,
            info_requests: Vec<u16>,
        },
        InfoUnknown,
        StructuredReply,
        StartTls,
        Unknown {
            code: u32,
            data: Vec<u8>,
        },
        Malformed(Vec<u8>),
    }

    /// How a generated conversation ends.
    #[derive(Debug, Clone)]
    enum Ending {
        Go {
            export: usize,
            info_requests: Vec<u16>,
        },
        ExportName(usize),
        Abort,
    }

    const NAMES: [&str; 2] = ["vol0", "vol1"];

    fn encode_conversation(
        no_zeroes: bool,
        options: &[ClientOption],
        ending: &Ending,
        trailing: &[u8],
    ) -> Vec<u8> {
        let mut bytes = client_flags(if no_zeroes { FIXED_NO_ZEROES } else { FIXED });
        for client_option in options {
            bytes.extend(match client_option {
                ClientOption::List => option(opt::LIST, &[]),
                ClientOption::Info {
                    export,
                    info_requests,
                } => option(opt::INFO, &go_data(NAMES[*export], info_requests)),
                ClientOption::InfoUnknown => option(opt::INFO, &go_data("other", &[])),
                ClientOption::StructuredReply => option(opt::STRUCTURED_REPLY, &[]),
                ClientOption::StartTls => option(opt::STARTTLS, &[]),
                ClientOption::Unknown { code, data } => option(*code, data),
                ClientOption::Malformed(data) => option(opt::GO, data),
            });
        }
        bytes.extend(match ending {
            Ending::Go {
                export,
                info_requests,
            } => option(opt::GO, &go_data(NAMES[*export], info_requests)),
            Ending::ExportName(export) => option(opt::EXPORT_NAME, NAMES[*export].as_bytes()),
            Ending::Abort => option(opt::ABORT, &[]),
        });
        bytes.extend_from_slice(trailing);
        bytes
    }

    fn info_requests() -> impl Strategy<Value = Vec<u16>> {
        proptest::collection::vec(0u16..6, 0..5)
    }

    fn client_option() -> impl Strategy<Value = ClientOption> {
        prop_oneof![
            Just(ClientOption::List),
            (0..2usize, info_requests()).prop_map(|(export, info_requests)| {
                ClientOption::Info {
                    export,
                    info_requests,
                }
            }),
            Just(ClientOption::InfoUnknown),
            Just(ClientOption::StructuredReply),
            Just(ClientOption::StartTls),
            (9u32..64, proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(code, data)| ClientOption::Unknown { code, data }),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(ClientOption::Malformed),
        ]
    }

    fn ending() -> impl Strategy<Value = Ending> {
        prop_oneof![
            (0..2usize, info_requests()).prop_map(|(export, info_requests)| Ending::Go {
                export,
                info_requests
            }),
            (0..2usize).prop_map(Ending::ExportName),
            Just(Ending::Abort),
        ]
    }

    /// Feeds `bytes` cut into chunks of the given sizes (cycled; the rest at once if there
    /// are none). Returns the result, the unconsumed bytes, and the handshake.
    fn run_split(
        bytes: &[u8],
        chunk_sizes: &[usize],
    ) -> (Result<(), HandshakeError>, Vec<u8>, Handshake) {
        let mut handshake = handshake(HandshakeConfig::default());
        let mut leftover = Vec::new();
        let mut at = 0;
        let mut sizes = chunk_sizes.iter().cycle();
        while at < bytes.len() {
            let size = sizes.next().copied().unwrap_or(bytes.len());
            let chunk = &bytes[at..(at + size).min(bytes.len())];
            at += chunk.len();
            let was_negotiating = handshake.state() == &State::Negotiating;
            match handshake.input(chunk) {
                Ok(consumed) => {
                    // Progress: everything, unless the handshake stopped on the way.
                    assert!(
                        consumed == chunk.len()
                            || (handshake.state() != &State::Negotiating
                                && (consumed > 0 || !was_negotiating)),
                        "consumed {consumed} of {} in {:?}",
                        chunk.len(),
                        handshake.state()
                    );
                    leftover.extend_from_slice(&chunk[consumed..]);
                }
                Err(error) => {
                    assert_eq!(handshake.state(), &State::Failed);
                    return (Err(error), leftover, handshake);
                }
            }
        }
        (Ok(()), leftover, handshake)
    }

    proptest! {
        #[test]
        fn valid_conversations_give_the_same_replies_however_they_are_split(
            no_zeroes in any::<bool>(),
            options in proptest::collection::vec(client_option(), 0..8),
            ending in ending(),
            trailing in proptest::collection::vec(any::<u8>(), 0..40),
            chunk_sizes in proptest::collection::vec(1usize..24, 1..16),
        ) {
            let bytes = encode_conversation(no_zeroes, &options, &ending, &trailing);
            let (whole_result, whole_leftover, whole) = run_split(&bytes, &[]);
            let (split_result, split_leftover, split) = run_split(&bytes, &chunk_sizes);
            prop_assert_eq!(whole_result, Ok(()));
            prop_assert_eq!(split_result, Ok(()));
            prop_assert_eq!(whole.output(), split.output());
            prop_assert_eq!(whole.state(), split.state());
            prop_assert_eq!(&whole_leftover, &trailing);
            prop_assert_eq!(&split_leftover, &trailing);
            match ending {
                Ending::Abort => prop_assert_eq!(whole.state(), &State::Aborted),
                Ending::Go { export, .. } | Ending::ExportName(export) => {
                    prop_assert_eq!(whole.negotiated().unwrap().export_index, export);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_in_arbitrary_splits_never_panic(
            valid_start in any::<bool>(),
            frames in proptest::collection::vec(
                prop_oneof![
                    // Well-framed options with arbitrary codes and data.
                    (0u32..14, proptest::collection::vec(any::<u8>(), 0..48))
                        .prop_map(|(code, data)| option(code, &data)),
                    // Garbage.
                    proptest::collection::vec(any::<u8>(), 0..24),
                ],
                0..12,
            ),
            chunk_sizes in proptest::collection::vec(1usize..32, 1..16),
        ) {
            let mut bytes = if valid_start { client_flags(FIXED) } else { Vec::new() };
            for frame in &frames {
                bytes.extend_from_slice(frame);
            }
            let (result, leftover, handshake) = run_split(&bytes, &chunk_sizes);
            match result {
                Ok(()) => prop_assert!(
                    leftover.is_empty() || handshake.state() != &State::Negotiating
                ),
                Err(_) => prop_assert_eq!(handshake.state(), &State::Failed),
            }
        }
    }
}
