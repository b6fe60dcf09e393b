//! A small NBD client for fathom-bench's client-path mode (`--nbd URI`): it drives a running
//! node the way a real client does, over TCP, so its figures include the network stack, the
//! node's front end and everything behind it, and can be set beside the in-process modes'.
//!
//! - [`NbdUri`] parses `nbd://host[:port]/export` (the port defaults to 10809).
//! - [`Connection::open`] runs the fixed newstyle handshake with `NBD_OPT_GO`: no structured
//!   replies, no TLS, `NBD_FLAG_C_NO_ZEROES`. It asks for `NBD_INFO_BLOCK_SIZE` and keeps what
//!   the server says about the export ([`Export`]); refusals become [`NbdClientError`]s that
//!   carry the server's own message.
//! - [`Pipeline`] keeps requests in flight on one connection. Every request slot is a cookie on
//!   the wire; one thread queues requests (with their payloads), writes them and reads simple
//!   replies on a non-blocking socket, and waits in poll(2) when it can do neither. Reading and
//!   writing in one loop means a large write can never wedge against replies the server is
//!   waiting to send, and waiting in the kernel (not spinning) leaves the cores to the node.
//!   Besides reads and writes it sends `NBD_CMD_FLUSH` and writes with `NBD_CMD_FLAG_FUA`
//!   ([`Pipeline::submit_with`]), which the crash checker ([`crate::checker`]) needs.
//! - [`run_job`] and [`run_verify`] are the two workloads on a pipeline: a closed loop of
//!   `iodepth` IOs for a time, with latency (from the write of the request to the end of its
//!   reply) and CPU time measured by the client; and a pass that writes a region, reads it back
//!   and compares.
//!
//! Every write carries the verify pattern ([`expected_block`]) of its offset in the export
//! under [`PATTERN_SEED`], whichever job sent it, so a later `--verify_only` run with any split
//! into jobs can check what a `--verify` run and any writes since left behind.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use fathom_engine::Op;
use fathom_frontend::nbd::proto::{
    client_flag, cmd_flag, handshake_flag, info, magic, opt, rep, transmission_flag, Command,
    Errno, Request, DEFAULT_MAX_BLOCK_BYTES, DEFAULT_MIN_BLOCK_BYTES,
    DEFAULT_PREFERRED_BLOCK_BYTES, REQUEST_HEADER_LEN, SIMPLE_REPLY_LEN,
};
use hdrhistogram::Histogram;

use crate::workload::{expected_block, thread_cpu_ns, AccessGenerator, BlockOrder, Pattern};

/// The port of `nbd://` URIs that name none (IANA's port for NBD).
pub const DEFAULT_PORT: u16 = 10809;
/// The seed of the pattern every write carries (see the module documentation).
pub const PATTERN_SEED: u64 = 1;
/// The longest export name the protocol allows.
const MAX_EXPORT_NAME_BYTES: usize = 4096;
/// How long connecting and each handshake read may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Option replies longer than this are not worth reading: the server's messages are at most
/// 4096 bytes and its information replies a few bytes.
const MAX_OPTION_REPLY_BYTES: u32 = 64 << 10;
/// A bound on the replies to one `NBD_OPT_GO` (a few `NBD_REP_INFO`, then the acknowledgement).
const MAX_OPTION_REPLIES: usize = 64;
/// A connection with requests in flight and nothing read or written for this long is dead.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a pipeline sleeps in poll(2) before its owner looks at the clock again.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Bytes of replies read from the socket at once (the data of a read that does not fit goes
/// straight into its slot's buffer).
const RECEIVE_BUFFER_BYTES: usize = 256 << 10;
/// Latencies above this are recorded as this (the histograms' upper bound).
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// The first mismatching offsets a verify pass keeps, per job.
const MAX_MISMATCHES_KEPT: usize = 8;
/// The greeting of an oldstyle server, after `NBDMAGIC`.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Everything that can stop the client. Error replies to single IOs are not among them: they
/// are counted in the results, and the run goes on.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    #[error(
        "{uri:?} is not an NBD URI: fathom-bench's client takes nbd://HOST[:PORT]/EXPORT \
         (port {default_port} unless given)",
        default_port = DEFAULT_PORT
    )]
    NotNbdUri { uri: String },
    #[error(
        "{uri}: TLS is not supported by fathom-bench's client; give it a listener without TLS \
         (nbd://HOST[:PORT]/EXPORT)"
    )]
    TlsUri { uri: String },
    #[error(
        "{uri}: {scheme}:// is not supported by fathom-bench's client, only TCP: \
         nbd://HOST[:PORT]/EXPORT"
    )]
    TransportUri { uri: String, scheme: String },
    #[error("{uri}: query parameters and fragments are not supported: nbd://HOST[:PORT]/EXPORT")]
    QueryUri { uri: String },
    #[error("{uri} names no host: nbd://HOST[:PORT]/EXPORT")]
    NoHost { uri: String },
    #[error("{uri}: {port:?} is not a TCP port (1 to 65535)")]
    BadPort { uri: String, port: String },
    #[error("{uri}: the export name is not valid percent-encoded UTF-8")]
    BadExportName { uri: String },
    #[error(
        "{uri} names no export: nbd://{address}/EXPORT (list the exports with \
         `nbdinfo --list nbd://{address}`)"
    )]
    NoExport { uri: String, address: String },
    #[error(
        "{uri}: the export name is {len} bytes long; the protocol allows {limit}",
        limit = MAX_EXPORT_NAME_BYTES
    )]
    ExportNameTooLong { uri: String, len: usize },

    #[error("cannot resolve {address}")]
    Resolve {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot connect to {address}: is fathom-node running, with this address in its \
         [nbd] listen?"
    )]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("{during} with {address} failed")]
    Io {
        address: String,
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the server at {address} closed the connection during the handshake")]
    HandshakeClosed { address: String },
    #[error("the server at {address} did not answer the handshake within {seconds} s")]
    HandshakeTimeout { address: String, seconds: u64 },
    #[error("the server at {address} does not speak NBD: it greeted with {found}")]
    NotNbd { address: String, found: String },
    #[error(
        "the server at {address} offers only the oldstyle handshake; fathom-bench's client \
         needs fixed newstyle (NBD_OPT_GO)"
    )]
    Oldstyle { address: String },
    #[error(
        "the server at {address} does not offer the fixed newstyle handshake (handshake flags \
         {flags:#06x}); fathom-bench's client needs it"
    )]
    NotFixedNewstyle { address: String, flags: u16 },
    #[error(
        "the server at {address} has no export named {export:?} (it said: {message}); list its \
         exports with `nbdinfo --list nbd://{address}`"
    )]
    UnknownExport {
        address: String,
        export: String,
        message: String,
    },
    #[error(
        "the server at {address} requires TLS, which fathom-bench's client does not support \
         (it said: {message}); give it a listener without TLS"
    )]
    TlsRequired { address: String, message: String },
    #[error(
        "the server at {address} does not support NBD_OPT_GO (it said: {message}); \
         fathom-bench's client needs it"
    )]
    GoUnsupported { address: String, message: String },
    #[error("the server at {address} refused export {export:?} with {reply} (it said: {message})")]
    Refused {
        address: String,
        export: String,
        reply: &'static str,
        message: String,
    },
    #[error("the server at {address} broke the NBD handshake: {detail}")]
    HandshakeProtocol { address: String, detail: String },

    #[error(
        "--bs {block_size} is not a multiple of the {min}-byte minimum block size of export \
         {export:?} (its block sizes: minimum {min}, preferred {preferred}, maximum {max})"
    )]
    BlockSizeNotMultiple {
        export: String,
        block_size: u64,
        min: u32,
        preferred: u32,
        max: u32,
    },
    #[error(
        "--bs {block_size} is larger than the {max}-byte maximum block size of export \
         {export:?} (its block sizes: minimum {min}, preferred {preferred}, maximum {max})"
    )]
    BlockSizeTooLarge {
        export: String,
        block_size: u64,
        min: u32,
        preferred: u32,
        max: u32,
    },
    #[error(
        "{jobs} jobs of --size {span_bytes} need {needed} bytes, but export {export:?} has \
         {export_size_bytes}: job j uses bytes [j * size, (j + 1) * size); lower --size or \
         --numjobs"
    )]
    BeyondExport {
        export: String,
        jobs: usize,
        span_bytes: u64,
        needed: u128,
        export_size_bytes: u64,
    },
    #[error("export {export:?} is read-only, and this run writes")]
    ReadOnly { export: String },

    #[error("the server at {address} broke the transmission protocol: {detail}")]
    Protocol { address: String, detail: String },
    #[error("the server at {address} closed the connection with {in_flight} requests in flight")]
    Disconnected { address: String, in_flight: usize },
    #[error("no reply from {address} for {seconds} s with {in_flight} requests in flight")]
    Stalled {
        address: String,
        seconds: u64,
        in_flight: usize,
    },
}

/// An `nbd://host[:port]/export` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub host: String,
    pub port: u16,
    pub export: String,
}

impl NbdUri {
    pub fn parse(text: &str) -> Result<NbdUri, NbdClientError> {
        let uri = || text.to_string();
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(NbdClientError::NotNbdUri { uri: uri() });
        };
        match scheme.to_ascii_lowercase().as_str() {
            "nbd" => {}
            "nbds" | "nbds+unix" | "nbds+vsock" => {
                return Err(NbdClientError::TlsUri { uri: uri() })
            }
            "nbd+unix" | "nbd+vsock" => {
                return Err(NbdClientError::TransportUri {
                    uri: uri(),
                    scheme: scheme.to_string(),
                })
            }
            _ => return Err(NbdClientError::NotNbdUri { uri: uri() }),
        }
        if rest.contains(['?', '#']) {
            return Err(NbdClientError::QueryUri { uri: uri() });
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.strip_prefix('[') {
            // An IPv6 address: [address] or [address]:port.
            Some(bracketed) => {
                let Some((host, after)) = bracketed.split_once(']') else {
                    return Err(NbdClientError::NoHost { uri: uri() });
                };
                match after {
                    "" => (host, None),
                    _ => match after.strip_prefix(':') {
                        Some(port) => (host, Some(port)),
                        None => {
                            return Err(NbdClientError::BadPort {
                                uri: uri(),
                                port: after.to_string(),
                            })
                        }
                    },
                }
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(NbdClientError::NoHost { uri: uri() });
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&port| port != 0)
                .ok_or_else(|| NbdClientError::BadPort {
                    uri: uri(),
                    port: port.to_string(),
                })?,
        };
        let export =
            percent_decode(path).ok_or_else(|| NbdClientError::BadExportName { uri: uri() })?;
        let parsed = NbdUri {
            host: host.to_string(),
            port,
            export,
        };
        if parsed.export.is_empty() {
            return Err(NbdClientError::NoExport {
                uri: uri(),
                address: parsed.address(),
            });
        }
        if parsed.export.len() > MAX_EXPORT_NAME_BYTES {
            return Err(NbdClientError::ExportNameTooLong {
                uri: uri(),
                len: parsed.export.len(),
            });
        }
        Ok(parsed)
    }

    /// `host:port`, with an IPv6 host in brackets.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nbd://{}/{}", self.address(), self.export)
    }
}

impl std::str::FromStr for NbdUri {
    type Err = NbdClientError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(text)
    }
}

/// `%XX` escapes decoded; `None` for a broken escape or a name that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What the server said about the export in its reply to `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Export {
    pub name: String,
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub min_block_bytes: u32,
    pub preferred_block_bytes: u32,
    pub max_block_bytes: u32,
}

impl Export {
    pub fn read_only(&self) -> bool {
        self.transmission_flags & transmission_flag::READ_ONLY != 0
    }

    /// Refuses, before any IO, a run the export cannot take: `jobs` regions of `span_bytes`
    /// (job j at `j * span_bytes`) in IOs of `block_size`, writing or not.
    pub fn check_plan(
        &self,
        block_size: u64,
        span_bytes: u64,
        jobs: usize,
        writes: bool,
    ) -> Result<(), NbdClientError> {
        let (min, preferred, max) = (
            self.min_block_bytes,
            self.preferred_block_bytes,
            self.max_block_bytes,
        );
        if block_size == 0 || !block_size.is_multiple_of(u64::from(min)) {
            return Err(NbdClientError::BlockSizeNotMultiple {
                export: self.name.clone(),
                block_size,
                min,
                preferred,
                max,
            });
        }
        if block_size > u64::from(max) {
            return Err(NbdClientError::BlockSizeTooLarge {
                export: self.name.clone(),
                block_size,
                min,
                preferred,
                max,
            });
        }
        let needed = u128::from(span_bytes) * jobs as u128;
        if needed > u128::from(self.size_bytes) {
            return Err(NbdClientError::BeyondExport {
                export: self.name.clone(),
                jobs,
                span_bytes,
                needed,
                export_size_bytes: self.size_bytes,
            });
        }
        if writes && self.read_only() {
            return Err(NbdClientError::ReadOnly {
                export: self.name.clone(),
            });
        }
        Ok(())
    }
}

/// A connection past its handshake, ready for requests.
pub struct Connection {
    stream: TcpStream,
    address: String,
    export: Export,
}

impl Connection {
    /// Connects to the URI's server and opens its export with `NBD_OPT_GO`.
    pub fn open(uri: &NbdUri) -> Result<Connection, NbdClientError> {
        let address = uri.address();
        let addresses: Vec<SocketAddr> = (uri.host.as_str(), uri.port)
            .to_socket_addrs()
            .map_err(|source| NbdClientError::Resolve {
                address: address.clone(),
                source,
            })?
            .collect();
        let mut last_error = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
        let mut connected = None;
        for candidate in &addresses {
            match TcpStream::connect_timeout(candidate, HANDSHAKE_TIMEOUT) {
                Ok(stream) => {
                    connected = Some(stream);
                    break;
                }
                Err(error) => last_error = error,
            }
        }
        let Some(mut stream) = connected else {
            return Err(NbdClientError::Connect {
                address,
                source: last_error,
            });
        };
        let setup = |stream: &TcpStream| -> io::Result<()> {
            // Requests are batched by the pipeline itself: Nagle would only add delay.
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        };
        setup(&stream).map_err(|source| NbdClientError::Io {
            address: address.clone(),
            during: "setting up the socket",
            source,
        })?;
        let export = handshake(&mut stream, &address, &uri.export)?;
        Ok(Connection {
            stream,
            address,
            export,
        })
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    pub fn address(&self) -> &str {
        &self.address
    }
}

/// A handshake read or write error, named.
fn handshake_error(address: &str, error: io::Error) -> NbdClientError {
    match error.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            NbdClientError::HandshakeClosed {
                address: address.to_string(),
            }
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NbdClientError::HandshakeTimeout {
            address: address.to_string(),
            seconds: HANDSHAKE_TIMEOUT.as_secs(),
        },
        _ => NbdClientError::Io {
            address: address.to_string(),
            during: "the NBD handshake",
            source: error,
        },
    }
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut value = [0u8; 4];
    value.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(value)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut value = [0u8; 8];
    value.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(value)
}

/// An option reply type's name, for messages.
fn reply_name(reply: u32) -> &'static str {
    match reply {
        rep::ACK => "NBD_REP_ACK",
        rep::SERVER => "NBD_REP_SERVER",
        rep::INFO => "NBD_REP_INFO",
        rep::META_CONTEXT => "NBD_REP_META_CONTEXT",
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY",
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID",
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        rep::ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ if rep::is_error(reply) => "an unknown error reply",
        _ => "an unknown reply",
    }
}

/// The fixed newstyle handshake up to `NBD_OPT_GO`'s acknowledgement.
fn handshake(
    stream: &mut TcpStream,
    address: &str,
    export: &str,
) -> Result<Export, NbdClientError> {
    let broken = |detail: String| NbdClientError::HandshakeProtocol {
        address: address.to_string(),
        detail,
    };
    let mut greeting = [0u8; 16];
    stream
        .read_exact(&mut greeting)
        .map_err(|error| handshake_error(address, error))?;
    if be_u64(&greeting, 0) != magic::NBDMAGIC {
        return Err(NbdClientError::NotNbd {
            address: address.to_string(),
            found: format!("{:02x?}", &greeting[..8]),
        });
    }
    match be_u64(&greeting, 8) {
        magic::IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(NbdClientError::Oldstyle {
                address: address.to_string(),
            })
        }
        other => {
            return Err(NbdClientError::NotNbd {
                address: address.to_string(),
                found: format!("NBDMAGIC then {other:#018x}"),
            })
        }
    }
    let mut flags = [0u8; 2];
    stream
        .read_exact(&mut flags)
        .map_err(|error| handshake_error(address, error))?;
    let flags = u16::from_be_bytes(flags);
    if flags & handshake_flag::FIXED_NEWSTYLE == 0 {
        return Err(NbdClientError::NotFixedNewstyle {
            address: address.to_string(),
            flags,
        });
    }
    let mut client_flags = client_flag::FIXED_NEWSTYLE;
    if flags & handshake_flag::NO_ZEROES != 0 {
        client_flags |= client_flag::NO_ZEROES;
    }
    // NBD_OPT_GO: the export name, then one information request (the block sizes; the size
    // and flags always come). Asking for the block sizes promises to honour them.
    let name = export.as_bytes();
    let mut message = Vec::with_capacity(4 + 16 + 4 + name.len() + 4);
    message.extend_from_slice(&client_flags.to_be_bytes());
    message.extend_from_slice(&magic::IHAVEOPT.to_be_bytes());
    message.extend_from_slice(&opt::GO.to_be_bytes());
    message.extend_from_slice(&(4 + name.len() as u32 + 2 + 2).to_be_bytes());
    message.extend_from_slice(&(name.len() as u32).to_be_bytes());
    message.extend_from_slice(name);
    message.extend_from_slice(&1u16.to_be_bytes());
    message.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    stream
        .write_all(&message)
        .map_err(|error| handshake_error(address, error))?;

    let mut size_and_flags = None;
    let mut block_sizes = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let mut header = [0u8; 20];
        stream
            .read_exact(&mut header)
            .map_err(|error| handshake_error(address, error))?;
        let (reply_magic, option, reply, len) = (
            be_u64(&header, 0),
            be_u32(&header, 8),
            be_u32(&header, 12),
            be_u32(&header, 16),
        );
        if reply_magic != magic::OPTION_REPLY {
            return Err(broken(format!(
                "an option reply starts with {reply_magic:#018x}, not the option reply magic"
            )));
        }
        if option != opt::GO {
            return Err(broken(format!(
                "it answered {} while NBD_OPT_GO was asked",
                opt::name(option)
            )));
        }
        if len > MAX_OPTION_REPLY_BYTES {
            return Err(broken(format!(
                "{} announces {len} bytes of data",
                reply_name(reply)
            )));
        }
        let mut data = vec![0u8; len as usize];
        stream
            .read_exact(&mut data)
            .map_err(|error| handshake_error(address, error))?;
        match reply {
            rep::ACK => {
                let Some((size_bytes, transmission_flags)) = size_and_flags else {
                    return Err(broken(
                        "it acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT".into(),
                    ));
                };
                let (min_block_bytes, preferred_block_bytes, max_block_bytes) = block_sizes
                    .unwrap_or((
                        DEFAULT_MIN_BLOCK_BYTES,
                        DEFAULT_PREFERRED_BLOCK_BYTES,
                        DEFAULT_MAX_BLOCK_BYTES,
                    ));
                return Ok(Export {
                    name: export.to_string(),
                    size_bytes,
                    transmission_flags,
                    min_block_bytes,
                    preferred_block_bytes,
                    max_block_bytes,
                });
            }
            rep::INFO if data.len() >= 2 => match be_u16(&data, 0) {
                info::EXPORT if data.len() == 12 => {
                    size_and_flags = Some((be_u64(&data, 2), be_u16(&data, 10)));
                }
                info::BLOCK_SIZE if data.len() == 14 => {
                    let (min, preferred, max) =
                        (be_u32(&data, 2), be_u32(&data, 6), be_u32(&data, 10));
                    if !min.is_power_of_two() || preferred < min || max < min {
                        return Err(broken(format!(
                            "block sizes minimum {min}, preferred {preferred}, maximum {max} \
                             are not a valid set"
                        )));
                    }
                    block_sizes = Some((min, preferred, max));
                }
                info::EXPORT | info::BLOCK_SIZE => {
                    return Err(broken(format!(
                        "NBD_REP_INFO type {} with {} bytes of data",
                        be_u16(&data, 0),
                        data.len()
                    )))
                }
                // Names and descriptions were not asked for; other types are ignored, as the
                // protocol says.
                _ => {}
            },
            reply if rep::is_error(reply) => {
                let message = String::from_utf8_lossy(&data).into_owned();
                let address = address.to_string();
                return Err(match reply {
                    rep::ERR_UNKNOWN => NbdClientError::UnknownExport {
                        address,
                        export: export.to_string(),
                        message,
                    },
                    rep::ERR_TLS_REQD => NbdClientError::TlsRequired { address, message },
                    rep::ERR_UNSUP => NbdClientError::GoUnsupported { address, message },
                    _ => NbdClientError::Refused {
                        address,
                        export: export.to_string(),
                        reply: reply_name(reply),
                        message,
                    },
                });
            }
            other => {
                return Err(broken(format!(
                    "{} ({other:#x}) with {len} bytes of data in answer to NBD_OPT_GO",
                    reply_name(other)
                )))
            }
        }
    }
    Err(broken(format!(
        "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO without an acknowledgement"
    )))
}

/// One request slot; its index is the request's cookie.
struct Slot {
    sent: Instant,
    offset: u64,
    length: u32,
    command: Command,
    in_flight: bool,
    /// Where the data of a read lands.
    data: Box<[u8]>,
}

/// Where the reply parser is.
#[derive(Clone, Copy)]
enum Incoming {
    /// Waiting for a 16-byte simple reply header.
    Header,
    /// Reading the data of the read in `slot`: `filled` bytes of its length so far.
    Data { slot: u32, filled: usize },
}

/// A request whose reply has been read.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub slot: u32,
    pub command: Command,
    pub offset: u64,
    pub length: u32,
    /// The reply's error value; 0 for success.
    pub error: u32,
    /// When the request was written to the socket.
    pub sent: Instant,
    /// When its whole reply (with any data) had been read.
    pub completed: Instant,
}

impl Completion {
    pub fn latency_ns(&self) -> u64 {
        self.completed
            .saturating_duration_since(self.sent)
            .as_nanos() as u64
    }

    /// The server's error, named (`NBD_EIO`, or `error 1234` for a value NBD does not define).
    pub fn error_text(&self) -> String {
        match Errno::from_code(self.error) {
            Some(errno) => errno.to_string(),
            None => format!("error {}", self.error),
        }
    }

    /// The failed request and the server's error, for reports.
    pub fn describe_error(&self) -> String {
        format!(
            "{} of {} bytes at offset {}: {}",
            self.command,
            self.length,
            self.offset,
            self.error_text()
        )
    }
}

/// Requests in flight on one connection: slots allocated at start (one per request the
/// pipeline may have out), a send buffer that holds every queued request, a receive buffer.
pub struct Pipeline {
    // The reply path's fields first.
    stream: TcpStream,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    incoming: Incoming,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    /// False once a read came back short or would block: poll(2) before reading again.
    readable: bool,
    out: Vec<u8>,
    out_start: usize,
    /// Slots queued since the last flush; their send time is the flush's.
    unsent: Vec<u32>,
    last_progress: Instant,
    // Set up once: the IO path never touches these.
    address: String,
    /// Requests in flight and no progress for this long: the connection is dead.
    stall_timeout: Duration,
}

impl Pipeline {
    /// A pipeline of `depth` slots for IOs of up to `max_length` bytes, of which writes only
    /// when `writes`.
    pub fn new(
        connection: Connection,
        depth: usize,
        max_length: u32,
        writes: bool,
    ) -> Result<Pipeline, NbdClientError> {
        let Connection {
            stream, address, ..
        } = connection;
        let setup = |stream: &TcpStream| -> io::Result<()> {
            stream.set_read_timeout(None)?;
            stream.set_write_timeout(None)?;
            stream.set_nonblocking(true)
        };
        setup(&stream).map_err(|source| NbdClientError::Io {
            address: address.clone(),
            during: "setting up the socket",
            source,
        })?;
        let now = Instant::now();
        let slots = (0..depth)
            .map(|_| Slot {
                sent: now,
                offset: 0,
                length: 0,
                command: Command::Read,
                in_flight: false,
                data: vec![0u8; max_length as usize].into_boxed_slice(),
            })
            .collect();
        let request_bytes = REQUEST_HEADER_LEN + if writes { max_length as usize } else { 0 };
        Ok(Pipeline {
            stream,
            slots,
            free: (0..depth as u32).rev().collect(),
            in_flight: 0,
            incoming: Incoming::Header,
            rx: vec![0u8; RECEIVE_BUFFER_BYTES].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            readable: true,
            // Room for every slot's request: the buffer never grows.
            out: Vec::with_capacity(depth * request_bytes),
            out_start: 0,
            unsent: Vec::with_capacity(depth),
            last_progress: now,
            address,
            stall_timeout: STALL_TIMEOUT,
        })
    }

    /// How long requests in flight may see no progress (nothing read or written) before
    /// [`Pipeline::wait`] calls the connection stalled; 30 s unless set.
    pub fn set_stall_timeout(&mut self, timeout: Duration) {
        self.stall_timeout = timeout;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn can_submit(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queues a read or write of `length` bytes at `offset`, without command flags; `payload`
    /// fills a write's data. Nothing is sent until [`Pipeline::flush`]. Returns the slot, or
    /// `None` when every slot is in flight (back-pressure: submit again after a completion).
    #[inline]
    pub fn submit(
        &mut self,
        command: Command,
        offset: u64,
        length: u32,
        payload: impl FnOnce(&mut [u8]),
    ) -> Option<u32> {
        self.submit_with(command, 0, offset, length, payload)
    }

    /// As [`Pipeline::submit`], with command `flags` ([`cmd_flag`]) and `NBD_CMD_FLUSH` (offset
    /// and length 0) besides reads and writes. Only `NBD_CMD_FLAG_FUA` on a write is allowed:
    /// the other flags ask for structured replies, which the pipeline does not negotiate. The
    /// caller checks that the export offers what it sends (`NBD_FLAG_SEND_FUA`,
    /// `NBD_FLAG_SEND_FLUSH`). A flush's reply, like any error reply, carries no data.
    #[inline]
    pub fn submit_with(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: impl FnOnce(&mut [u8]),
    ) -> Option<u32> {
        debug_assert!(match command {
            Command::Read => flags == 0,
            Command::Write => flags & !cmd_flag::FUA == 0,
            Command::Flush => flags == 0 && offset == 0 && length == 0,
            _ => false,
        });
        let index = self.free.pop()?;
        let slot = &mut self.slots[index as usize];
        debug_assert!(!slot.in_flight && length as usize <= slot.data.len());
        slot.command = command;
        slot.offset = offset;
        slot.length = length;
        slot.in_flight = true;
        self.in_flight += 1;
        if self.out_start > 0 {
            // Keep the unsent bytes at the front so the buffer stays within its capacity.
            self.out.drain(..self.out_start);
            self.out_start = 0;
        }
        let request = Request {
            cookie: u64::from(index),
            flags,
            command,
            offset,
            length,
        };
        self.out.extend_from_slice(&request.to_bytes());
        if command == Command::Write {
            let start = self.out.len();
            self.out.resize(start + length as usize, 0);
            payload(&mut self.out[start..]);
        }
        self.unsent.push(index);
        Some(index)
    }

    /// Writes queued requests until done or the socket is full.
    pub fn flush(&mut self) -> Result<(), NbdClientError> {
        if !self.unsent.is_empty() {
            let now = Instant::now();
            for &index in &self.unsent {
                self.slots[index as usize].sent = now;
            }
            self.unsent.clear();
        }
        while self.out_start < self.out.len() {
            match self.stream.write(&self.out[self.out_start..]) {
                Ok(0) => return Err(self.disconnected()),
                Ok(written) => {
                    self.out_start += written;
                    self.last_progress = Instant::now();
                }
                Err(error) => match error.kind() {
                    io::ErrorKind::WouldBlock => return Ok(()),
                    io::ErrorKind::Interrupted => {}
                    // The server went away (closed or was killed) while requests were queued.
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                        return Err(self.disconnected())
                    }
                    _ => return Err(self.io_error("sending requests", error)),
                },
            }
        }
        self.out.clear();
        self.out_start = 0;
        Ok(())
    }

    /// The next reply, if one has arrived. Reads the socket without blocking. The slot of the
    /// completion is free again: read its data ([`Pipeline::data`]) before the next submit.
    pub fn next_completion(&mut self) -> Result<Option<Completion>, NbdClientError> {
        loop {
            match self.incoming {
                Incoming::Header if self.rx_end - self.rx_start >= SIMPLE_REPLY_LEN => {
                    let header = &self.rx[self.rx_start..self.rx_start + SIMPLE_REPLY_LEN];
                    let (reply_magic, error, cookie) =
                        (be_u32(header, 0), be_u32(header, 4), be_u64(header, 8));
                    self.rx_start += SIMPLE_REPLY_LEN;
                    if reply_magic != magic::SIMPLE_REPLY {
                        return Err(self.protocol(if reply_magic == magic::STRUCTURED_REPLY {
                            "a structured reply chunk, though structured replies were not \
                             negotiated"
                                .to_string()
                        } else {
                            format!("a reply starts with {reply_magic:#010x}, not the simple reply magic")
                        }));
                    }
                    let slot = match usize::try_from(cookie) {
                        Ok(index) if self.slots.get(index).is_some_and(|slot| slot.in_flight) => {
                            index as u32
                        }
                        _ => {
                            return Err(self.protocol(format!(
                                "a reply with cookie {cookie}, which no request in flight has"
                            )))
                        }
                    };
                    // Only a successful read's reply carries data: a write's, a flush's and
                    // any error reply are the header alone.
                    if error == 0 && self.slots[slot as usize].command == Command::Read {
                        self.incoming = Incoming::Data { slot, filled: 0 };
                        continue;
                    }
                    return Ok(Some(self.complete(slot, error)));
                }
                Incoming::Header => {}
                Incoming::Data { slot, filled } => {
                    let length = self.slots[slot as usize].length as usize;
                    let take = (length - filled).min(self.rx_end - self.rx_start);
                    let filled = filled + take;
                    self.slots[slot as usize].data[filled - take..filled]
                        .copy_from_slice(&self.rx[self.rx_start..self.rx_start + take]);
                    self.rx_start += take;
                    if filled == length {
                        self.incoming = Incoming::Header;
                        return Ok(Some(self.complete(slot, 0)));
                    }
                    self.incoming = Incoming::Data { slot, filled };
                    if !self.readable {
                        return Ok(None);
                    }
                    // Nothing buffered: the rest of the data goes straight into the slot.
                    let data = &mut self.slots[slot as usize].data[filled..length];
                    let wanted = data.len();
                    match self.stream.read(data) {
                        Ok(0) => return Err(self.disconnected()),
                        Ok(read) => {
                            self.readable = read == wanted;
                            self.last_progress = Instant::now();
                            self.incoming = Incoming::Data {
                                slot,
                                filled: filled + read,
                            };
                        }
                        Err(error) => {
                            self.read_failed(error)?;
                            return Ok(None);
                        }
                    }
                    continue;
                }
            }
            // Too few bytes for a header: read more.
            if !self.readable {
                return Ok(None);
            }
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let wanted = self.rx.len() - self.rx_end;
            match self.stream.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(self.disconnected()),
                Ok(read) => {
                    self.rx_end += read;
                    // A short read drained the socket: poll before the next one.
                    self.readable = read == wanted;
                    self.last_progress = Instant::now();
                }
                Err(error) => {
                    self.read_failed(error)?;
                    return Ok(None);
                }
            }
        }
    }

    /// The data a completed read brought (valid until the slot's next submit).
    pub fn data(&self, slot: u32) -> &[u8] {
        let slot = &self.slots[slot as usize];
        &slot.data[..slot.length as usize]
    }

    /// Sleeps until the socket has something to read (or room to write, with requests queued)
    /// or `timeout` passes (at most `WAIT_SLICE`). Fails when requests in flight have seen no
    /// progress for the stall timeout ([`Pipeline::set_stall_timeout`]).
    pub fn wait(&mut self, timeout: Duration) -> Result<(), NbdClientError> {
        if self.in_flight > 0 && self.last_progress.elapsed() > self.stall_timeout {
            return Err(NbdClientError::Stalled {
                address: self.address.clone(),
                seconds: self.stall_timeout.as_secs(),
                in_flight: self.in_flight,
            });
        }
        if self.readable {
            return Ok(());
        }
        let mut events = libc::POLLIN;
        if self.out_start < self.out.len() {
            events |= libc::POLLOUT;
        }
        let revents = poll_socket(&self.stream, events, timeout.min(WAIT_SLICE))
            .map_err(|error| self.io_error("waiting for the socket", error))?;
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // A hang-up or an error shows itself on the next read.
            self.readable = true;
        }
        Ok(())
    }

    /// Sends `NBD_CMD_DISC` (once nothing is in flight) and closes, as a polite client does.
    /// Errors are ignored: the run's results are in, and the server copes with a plain close.
    pub fn disconnect(mut self) {
        if self.in_flight > 0 {
            return;
        }
        let request = Request {
            cookie: 0,
            flags: 0,
            command: Command::Disc,
            offset: 0,
            length: 0,
        };
        self.out.extend_from_slice(&request.to_bytes());
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.out_start < self.out.len() && Instant::now() < deadline {
            if self.flush().is_err() {
                return;
            }
            if self.out_start < self.out.len() {
                let _ = poll_socket(&self.stream, libc::POLLOUT, WAIT_SLICE);
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn complete(&mut self, index: u32, error: u32) -> Completion {
        let completed = Instant::now();
        let slot = &mut self.slots[index as usize];
        slot.in_flight = false;
        self.in_flight -= 1;
        self.free.push(index);
        self.last_progress = completed;
        Completion {
            slot: index,
            command: slot.command,
            offset: slot.offset,
            length: slot.length,
            error,
            sent: slot.sent,
            completed,
        }
    }

    /// Would-block means "poll first"; an interruption is retried by the caller's next call.
    fn read_failed(&mut self, error: io::Error) -> Result<(), NbdClientError> {
        match error.kind() {
            io::ErrorKind::WouldBlock => {
                self.readable = false;
                Ok(())
            }
            io::ErrorKind::Interrupted => Ok(()),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => {
                Err(self.disconnected())
            }
            _ => Err(self.io_error("reading replies", error)),
        }
    }

    fn disconnected(&self) -> NbdClientError {
        NbdClientError::Disconnected {
            address: self.address.clone(),
            in_flight: self.in_flight,
        }
    }

    fn protocol(&self, detail: String) -> NbdClientError {
        NbdClientError::Protocol {
            address: self.address.clone(),
            detail,
        }
    }

    fn io_error(&self, during: &'static str, source: io::Error) -> NbdClientError {
        NbdClientError::Io {
            address: self.address.clone(),
            during,
            source,
        }
    }
}

/// poll(2) on one socket: the events that are ready (none on timeout or interruption).
fn poll_socket(stream: &TcpStream, events: i16, timeout: Duration) -> io::Result<i16> {
    let mut pollfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    // Rounded up, so a wait shorter than a millisecond sleeps rather than spins.
    let timeout_ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: `pollfd` is one initialised pollfd that outlives the call, and the count passed
    // is 1; its descriptor belongs to `stream`, which the caller's borrow keeps open.
    let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        return match error.kind() {
            io::ErrorKind::Interrupted => Ok(0),
            _ => Err(error),
        };
    }
    Ok(pollfd.revents)
}

/// A latency histogram in nanoseconds.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// One job of a timed run: its region of the export and the workload's shape.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub job: usize,
    pub pattern: Pattern,
    pub block_size: u32,
    pub iodepth: usize,
    /// The job's region of the export: `span_bytes` from `offset_bytes`.
    pub offset_bytes: u64,
    pub span_bytes: u64,
    pub runtime: Duration,
    pub ramp: Duration,
    /// Seeds the offsets and the read/write draws, as a reactor's workload seed does.
    pub seed: u64,
    /// Percent of reads in a mixed pattern (fio's rwmixread).
    pub read_percent: u32,
    /// Spin on the socket while waiting for replies instead of sleeping in poll(2), as fio's
    /// `hipri` polls for completions: costs the client a core, and spares the server the
    /// client's wake-up in its reply (an inter-processor interrupt, several microseconds on
    /// some virtual machines, that would otherwise count in the server's own latency).
    pub spin: bool,
    /// Where to connect again when the connection is lost (a node killed, a failover): tried
    /// in turn for up to `reconnect_timeout`. Empty: a lost connection ends the job with
    /// its error.
    pub reconnect: Vec<NbdUri>,
    pub reconnect_timeout: Duration,
}

/// IOs of one operation over the measured interval.
#[derive(Debug, Clone)]
pub struct OpResult {
    pub ios: u64,
    pub bytes: u64,
    /// Per IO, from the write of the request to the end of its reply, in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl OpResult {
    fn new() -> Self {
        Self {
            ios: 0,
            bytes: 0,
            latency_ns: latency_histogram(),
        }
    }
}

/// What one job did. IOs, bytes and latencies cover the measured interval (after the ramp);
/// errors cover the whole run, so none goes unreported.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobResult {
    pub job: usize,
    pub offset_bytes: u64,
    pub span_bytes: u64,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    /// The first error reply, described.
    pub first_error: Option<String>,
    /// Connections lost and opened again ([`JobSpec::reconnect`]).
    pub reconnects: u64,
    /// IOs in flight when a connection was lost: their outcome is unknown.
    pub lost_ios: u64,
    /// Time from each loss to the next connection open, summed.
    pub outage_ns: u64,
    /// The first loss, described.
    pub first_loss: Option<String>,
    /// Wall time of the measured interval.
    pub elapsed_ns: u64,
    /// CPU time (user and system) the job's thread used over the measured interval.
    pub cpu_ns: u64,
    #[serde(skip)]
    pub read: OpResult,
    #[serde(skip)]
    pub write: OpResult,
}

/// Runs one job on its own connection: `iodepth` IOs kept in flight on its region until
/// `ramp + runtime` has passed, each resubmitted from its completion. Starts when every job
/// has reached `start`; `progress` counts completions (ramp included) for a progress display.
pub fn run_job(
    connection: Connection,
    spec: &JobSpec,
    start: &Barrier,
    progress: &AtomicU64,
) -> Result<JobResult, NbdClientError> {
    let writes = spec.pattern.writes();
    let mut pipeline = Pipeline::new(connection, spec.iodepth, spec.block_size, writes)?;
    let mut access = AccessGenerator::new(
        spec.pattern,
        u64::from(spec.block_size),
        spec.span_bytes,
        spec.seed,
        spec.read_percent,
    );
    let mut result = JobResult {
        job: spec.job,
        offset_bytes: spec.offset_bytes,
        span_bytes: spec.span_bytes,
        ios: 0,
        bytes: 0,
        errors: 0,
        first_error: None,
        reconnects: 0,
        lost_ios: 0,
        outage_ns: 0,
        first_loss: None,
        elapsed_ns: 0,
        cpu_ns: 0,
        read: OpResult::new(),
        write: OpResult::new(),
    };
    let issue = |pipeline: &mut Pipeline, access: &mut AccessGenerator| {
        let (op, offset) = access.next_io();
        let offset = spec.offset_bytes + offset;
        if op == Op::Read {
            pipeline.submit(Command::Read, offset, spec.block_size, |_| {})
        } else {
            pipeline.submit(Command::Write, offset, spec.block_size, |payload| {
                expected_block(offset, PATTERN_SEED, payload)
            })
        }
    };
    start.wait();
    let ramp_end = Instant::now() + spec.ramp;
    let end = ramp_end + spec.runtime;
    let mut cpu_started = spec.ramp.is_zero().then(thread_cpu_ns);
    let mut completions = 0u64;
    while pipeline.can_submit() {
        issue(&mut pipeline, &mut access);
    }
    // The closed loop: every completion within the run brings the next IO.
    let mut target = 0;
    loop {
        let mut progressed = false;
        let turn = (|| -> Result<bool, NbdClientError> {
            while let Some(done) = pipeline.next_completion()? {
                progressed = true;
                completions += 1;
                account(
                    &mut result,
                    &done,
                    done.completed >= ramp_end && done.completed < end,
                );
                if done.completed < end {
                    issue(&mut pipeline, &mut access);
                }
            }
            progress.store(completions, Ordering::Relaxed);
            pipeline.flush()?;
            let now = Instant::now();
            if cpu_started.is_none() && now >= ramp_end {
                cpu_started = Some(thread_cpu_ns());
            }
            if now >= end {
                result.cpu_ns = thread_cpu_ns().saturating_sub(cpu_started.unwrap_or(0));
                return Ok(true);
            }
            if !progressed {
                let next = if now < ramp_end { ramp_end } else { end };
                pipeline.wait(if spec.spin {
                    Duration::ZERO
                } else {
                    next - now
                })?;
            }
            Ok(false)
        })();
        match turn {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) if spec.reconnect.is_empty() || Instant::now() >= end => return Err(error),
            Err(error) => {
                pipeline = reconnect(spec, &mut target, &mut result, &pipeline, error)?;
                while pipeline.can_submit() {
                    issue(&mut pipeline, &mut access);
                }
            }
        }
    }
    // Completions are counted when they fall inside [ramp_end, end): that is the interval.
    result.elapsed_ns = spec.runtime.as_nanos() as u64;
    // Drain: what is still in flight completes unmeasured (errors are still counted). A
    // connection lost now, with reconnects on, leaves its IOs' outcome unknown.
    let drained = (|| -> Result<(), NbdClientError> {
        while pipeline.in_flight() > 0 {
            let mut progressed = false;
            while let Some(done) = pipeline.next_completion()? {
                progressed = true;
                account(&mut result, &done, false);
            }
            pipeline.flush()?;
            if !progressed && pipeline.in_flight() > 0 {
                pipeline.wait(WAIT_SLICE)?;
            }
        }
        Ok(())
    })();
    if let Err(error) = drained {
        if spec.reconnect.is_empty() {
            return Err(error);
        }
        result.lost_ios += pipeline.in_flight() as u64;
        result.first_loss.get_or_insert_with(|| error.to_string());
        result.ios = result.read.ios + result.write.ios;
        result.bytes = result.read.bytes + result.write.bytes;
        return Ok(result);
    }
    pipeline.disconnect();
    result.ios = result.read.ios + result.write.ios;
    result.bytes = result.read.bytes + result.write.bytes;
    Ok(result)
}

/// The connection of `pipeline` was lost with `error`: counts it and its IOs in flight, and
/// connects again to the job's reconnect targets in turn (from `target` on) until one opens
/// or the reconnect timeout passes.
fn reconnect(
    spec: &JobSpec,
    target: &mut usize,
    result: &mut JobResult,
    pipeline: &Pipeline,
    error: NbdClientError,
) -> Result<Pipeline, NbdClientError> {
    let lost_at = Instant::now();
    result.reconnects += 1;
    result.lost_ios += pipeline.in_flight() as u64;
    result.first_loss.get_or_insert_with(|| error.to_string());
    let deadline = lost_at + spec.reconnect_timeout;
    loop {
        let uri = &spec.reconnect[*target % spec.reconnect.len()];
        let failed = match Connection::open(uri) {
            Ok(connection) => {
                let pipeline = Pipeline::new(
                    connection,
                    spec.iodepth,
                    spec.block_size,
                    spec.pattern.writes(),
                )?;
                result.outage_ns += lost_at.elapsed().as_nanos() as u64;
                return Ok(pipeline);
            }
            Err(failed) => failed,
        };
        *target += 1;
        if Instant::now() >= deadline {
            return Err(failed);
        }
        if (*target).is_multiple_of(spec.reconnect.len()) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Counts one completion: an error always, a success when it is `measured`.
#[inline]
fn account(result: &mut JobResult, done: &Completion, measured: bool) {
    if done.error != 0 {
        result.errors += 1;
        if result.first_error.is_none() {
            result.first_error = Some(done.describe_error());
        }
        return;
    }
    if !measured {
        return;
    }
    let op = if done.command == Command::Read {
        &mut result.read
    } else {
        &mut result.write
    };
    op.ios += 1;
    op.bytes += u64::from(done.length);
    op.latency_ns.saturating_record(done.latency_ns().max(1));
}

/// One job of a verify run.
#[derive(Debug, Clone)]
pub struct VerifySpec {
    pub job: usize,
    /// Random patterns visit the blocks in a scrambled order, the others in order.
    pub pattern: Pattern,
    pub block_size: u32,
    pub iodepth: usize,
    pub offset_bytes: u64,
    pub span_bytes: u64,
    /// Skip the write pass: check what an earlier run wrote.
    pub read_only: bool,
}

/// What one job's verify passes found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyJobResult {
    pub job: usize,
    pub offset_bytes: u64,
    pub span_bytes: u64,
    pub blocks_written: u64,
    pub blocks_read: u64,
    pub mismatches: u64,
    /// Byte offsets (in the export) of the first mismatching blocks.
    pub first_mismatches: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// Writes every block of the job's region once (pattern of [`expected_block`] for its offset
/// in the export), then reads every block back in another order and compares.
pub fn run_verify(
    connection: Connection,
    spec: &VerifySpec,
) -> Result<VerifyJobResult, NbdClientError> {
    let mut pipeline = Pipeline::new(connection, spec.iodepth, spec.block_size, !spec.read_only)?;
    let block_size = u64::from(spec.block_size);
    let blocks = spec.span_bytes / block_size;
    let mut result = VerifyJobResult {
        job: spec.job,
        offset_bytes: spec.offset_bytes,
        span_bytes: spec.span_bytes,
        ..VerifyJobResult::default()
    };
    let mut expected = vec![0u8; spec.block_size as usize];
    let passes: &[(Command, u64)] = if spec.read_only {
        &[(Command::Read, BlockOrder::READ_INCREMENT)]
    } else {
        &[
            (Command::Write, BlockOrder::WRITE_INCREMENT),
            (Command::Read, BlockOrder::READ_INCREMENT),
        ]
    };
    for &(command, increment) in passes {
        let mut order = BlockOrder::new(blocks, spec.pattern.random(), increment);
        loop {
            while pipeline.can_submit() {
                let Some(block) = order.next_block() else {
                    break;
                };
                let offset = spec.offset_bytes + block * block_size;
                pipeline.submit(command, offset, spec.block_size, |payload| {
                    expected_block(offset, PATTERN_SEED, payload)
                });
            }
            pipeline.flush()?;
            if order.done() && pipeline.in_flight() == 0 {
                break;
            }
            let mut progressed = false;
            while let Some(done) = pipeline.next_completion()? {
                progressed = true;
                if done.error != 0 {
                    result.errors += 1;
                    if result.first_error.is_none() {
                        result.first_error = Some(done.describe_error());
                    }
                } else if done.command == Command::Write {
                    result.blocks_written += 1;
                } else {
                    result.blocks_read += 1;
                    expected_block(done.offset, PATTERN_SEED, &mut expected);
                    if pipeline.data(done.slot) != expected.as_slice() {
                        result.mismatches += 1;
                        if result.first_mismatches.len() < MAX_MISMATCHES_KEPT {
                            result.first_mismatches.push(done.offset);
                        }
                    }
                }
            }
            if !progressed {
                pipeline.wait(WAIT_SLICE)?;
            }
        }
    }
    pipeline.disconnect();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_frontend::nbd::proto::simple_reply;
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// A fake server for one connection on a loopback port: the fixed newstyle handshake
    /// (an export of 1 MiB that takes FLUSH and FUA), then `serve` with the stream, in a thread.
    fn fake_server<T: Send + 'static>(
        serve: impl FnOnce(&mut TcpStream) -> T + Send + 'static,
    ) -> (NbdUri, JoinHandle<T>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut greeting = Vec::new();
            greeting.extend_from_slice(&magic::NBDMAGIC.to_be_bytes());
            greeting.extend_from_slice(&magic::IHAVEOPT.to_be_bytes());
            let flags = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;
            greeting.extend_from_slice(&flags.to_be_bytes());
            stream.write_all(&greeting).unwrap();
            // Client flags, IHAVEOPT, the option and its length, then its data.
            let mut option = [0u8; 20];
            stream.read_exact(&mut option).unwrap();
            assert_eq!(be_u32(&option, 12), opt::GO);
            let mut data = vec![0u8; be_u32(&option, 16) as usize];
            stream.read_exact(&mut data).unwrap();
            let mut export = Vec::new();
            export.extend_from_slice(&info::EXPORT.to_be_bytes());
            export.extend_from_slice(&(1u64 << 20).to_be_bytes());
            let transmission = transmission_flag::HAS_FLAGS
                | transmission_flag::SEND_FLUSH
                | transmission_flag::SEND_FUA;
            export.extend_from_slice(&transmission.to_be_bytes());
            for (reply, data) in [(rep::INFO, &export[..]), (rep::ACK, &[][..])] {
                let mut message = Vec::new();
                message.extend_from_slice(&magic::OPTION_REPLY.to_be_bytes());
                message.extend_from_slice(&opt::GO.to_be_bytes());
                message.extend_from_slice(&reply.to_be_bytes());
                message.extend_from_slice(&(data.len() as u32).to_be_bytes());
                message.extend_from_slice(data);
                stream.write_all(&message).unwrap();
            }
            serve(&mut stream)
        });
        let uri = NbdUri {
            host: "127.0.0.1".into(),
            port,
            export: "vol0".into(),
        };
        (uri, server)
    }

    /// One request as the server read it, with its payload.
    fn read_request(stream: &mut TcpStream) -> (Request, Vec<u8>) {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        stream.read_exact(&mut header).unwrap();
        let request = Request::parse(&header).unwrap();
        let mut payload = vec![0u8; request.payload_len() as usize];
        stream.read_exact(&mut payload).unwrap();
        (request, payload)
    }

    #[test]
    fn fua_writes_and_flushes_go_on_the_wire_and_replies_without_data_complete() {
        const REQUESTS: usize = 5;
        let (uri, server) = fake_server(|stream| {
            let seen: Vec<(Request, Vec<u8>)> =
                (0..REQUESTS).map(|_| read_request(stream)).collect();
            // Out of order, and the replies without data first: were any of them taken to
            // carry data, the headers after it would be read as that data.
            let mut replies = Vec::new();
            for (index, error) in [
                (4, Some(Errno::Io)),
                (2, Some(Errno::Inval)),
                (1, None),
                (3, None),
                (0, None),
            ] {
                let (request, _) = &seen[index];
                replies.extend_from_slice(&simple_reply(request.cookie, error));
                if index == 3 {
                    replies.extend(std::iter::repeat_n(0x5a, request.length as usize));
                }
            }
            stream.write_all(&replies).unwrap();
            let (disconnect, _) = read_request(stream);
            assert_eq!(disconnect.command, Command::Disc);
            seen
        });
        let connection = Connection::open(&uri).unwrap();
        let mut pipeline = Pipeline::new(connection, 8, 4096, true).unwrap();
        let no_payload = |_: &mut [u8]| panic!("only a write has a payload");
        let write = pipeline.submit_with(Command::Write, cmd_flag::FUA, 4096, 4096, |data| {
            data.fill(0xa5)
        });
        let flush = pipeline.submit_with(Command::Flush, 0, 0, 0, no_payload);
        let failed_read = pipeline.submit(Command::Read, 0, 4096, no_payload);
        let read = pipeline.submit(Command::Read, 8192, 4096, no_payload);
        let failed_flush = pipeline.submit_with(Command::Flush, 0, 0, 0, no_payload);
        let slots = [write, flush, failed_read, read, failed_flush].map(Option::unwrap);
        let mut completions = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while completions.len() < REQUESTS {
            assert!(
                Instant::now() < deadline,
                "completions so far: {completions:?}"
            );
            pipeline.flush().unwrap();
            while let Some(done) = pipeline.next_completion().unwrap() {
                if done.slot == slots[3] {
                    assert!(pipeline.data(done.slot).iter().all(|&byte| byte == 0x5a));
                }
                completions.push(done);
            }
            pipeline.wait(WAIT_SLICE).unwrap();
        }
        let answered: Vec<(u32, Command, u32, u32)> = completions
            .iter()
            .map(|done| (done.slot, done.command, done.length, done.error))
            .collect();
        let (io, inval) = (Errno::Io.code(), Errno::Inval.code());
        assert_eq!(
            answered,
            [
                (slots[4], Command::Flush, 0, io),
                (slots[2], Command::Read, 4096, inval),
                (slots[1], Command::Flush, 0, 0),
                (slots[3], Command::Read, 4096, 0),
                (slots[0], Command::Write, 4096, 0),
            ]
        );
        assert_eq!(
            completions[0].describe_error(),
            "NBD_CMD_FLUSH of 0 bytes at offset 0: NBD_EIO"
        );
        assert_eq!(pipeline.in_flight(), 0);
        pipeline.disconnect();
        let seen = server.join().unwrap();
        let wire: Vec<(u64, u16, Command, u64, u32)> = seen
            .iter()
            .map(|(request, _)| {
                let (cookie, flags) = (request.cookie, request.flags);
                (
                    cookie,
                    flags,
                    request.command,
                    request.offset,
                    request.length,
                )
            })
            .collect();
        let cookie = |index: usize| u64::from(slots[index]);
        assert_eq!(
            wire,
            [
                (cookie(0), cmd_flag::FUA, Command::Write, 4096, 4096),
                (cookie(1), 0, Command::Flush, 0, 0),
                (cookie(2), 0, Command::Read, 0, 4096),
                (cookie(3), 0, Command::Read, 8192, 4096),
                (cookie(4), 0, Command::Flush, 0, 0),
            ]
        );
        assert!(seen[0].1.len() == 4096 && seen[0].1.iter().all(|&byte| byte == 0xa5));
    }

    #[test]
    fn uris_parse_with_the_default_port_ipv6_and_escapes() {
        let uri = NbdUri::parse("nbd://127.0.0.1:10810/vol0").unwrap();
        assert_eq!(
            uri,
            NbdUri {
                host: "127.0.0.1".into(),
                port: 10810,
                export: "vol0".into()
            }
        );
        assert_eq!(uri.to_string(), "nbd://127.0.0.1:10810/vol0");
        let uri = NbdUri::parse("nbd://node1/vol%20one").unwrap();
        assert_eq!((uri.port, uri.export.as_str()), (DEFAULT_PORT, "vol one"));
        let uri = NbdUri::parse("nbd://[::1]:7000/a/b").unwrap();
        assert_eq!(
            (uri.host.as_str(), uri.port, uri.export.as_str()),
            ("::1", 7000, "a/b")
        );
        assert_eq!(uri.address(), "[::1]:7000");
    }

    #[test]
    fn bad_uris_are_refused_with_the_reason() {
        let error = |text: &str| NbdUri::parse(text).unwrap_err().to_string();
        assert!(
            error("nbds://127.0.0.1/vol0")
                .contains("TLS is not supported by fathom-bench's client"),
            "{}",
            error("nbds://127.0.0.1/vol0")
        );
        assert!(error("nbd+unix:///vol0?socket=/tmp/s").contains("only TCP"));
        assert!(error("http://host/vol0").contains("is not an NBD URI"));
        assert!(error("127.0.0.1:10809/vol0").contains("is not an NBD URI"));
        assert!(error("nbd://host:99999/vol0").contains("not a TCP port"));
        assert!(error("nbd://host:/vol0").contains("not a TCP port"));
        assert!(error("nbd:///vol0").contains("names no host"));
        assert!(error("nbd://host:10809").contains("nbdinfo --list nbd://host:10809"));
        assert!(error("nbd://host/").contains("names no export"));
        assert!(error("nbd://host/vol0?tls=1").contains("query"));
        assert!(error("nbd://host/%zz").contains("percent-encoded"));
    }

    #[test]
    fn plans_that_do_not_fit_the_export_are_refused() {
        let export = Export {
            name: "vol0".into(),
            size_bytes: 64 << 20,
            transmission_flags: transmission_flag::HAS_FLAGS,
            min_block_bytes: 512,
            preferred_block_bytes: 4096,
            max_block_bytes: 1 << 20,
        };
        assert!(export.check_plan(4096, 32 << 20, 2, true).is_ok());
        let message = export
            .check_plan(100, 4096, 1, false)
            .unwrap_err()
            .to_string();
        assert!(message.contains("512-byte minimum block size"), "{message}");
        let message = export
            .check_plan(2 << 20, 2 << 20, 1, false)
            .unwrap_err()
            .to_string();
        assert!(message.contains("maximum block size"), "{message}");
        let message = export
            .check_plan(4096, 33 << 20, 2, false)
            .unwrap_err()
            .to_string();
        assert!(message.contains("need 69206016 bytes"), "{message}");
        let read_only = Export {
            transmission_flags: transmission_flag::HAS_FLAGS | transmission_flag::READ_ONLY,
            ..export
        };
        assert!(read_only.check_plan(4096, 4096, 1, false).is_ok());
        assert!(matches!(
            read_only.check_plan(4096, 4096, 1, true),
            Err(NbdClientError::ReadOnly { .. })
        ));
    }
}
