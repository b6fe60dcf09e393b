//! The Network Block Device protocol, server side, as specified in
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//!
//! The protocol is sans-IO ([`handshake`] and [`proto`]: bytes in, bytes out, no sockets,
//! threads or engine types), so it is tested and fuzzed without sockets. [`server`] is the
//! socket driver: listeners, connections polled by the reactors, requests handed to the engine;
//! its TLS is `fathom_net::transport`, shared with replication. A connection runs in two phases:
//! - [`handshake`]: the fixed newstyle handshake as a state machine ([`Handshake`]). It
//!   answers `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO`,
//!   `NBD_OPT_GO`, `NBD_OPT_STRUCTURED_REPLY` and `NBD_OPT_STARTTLS`, and ends with a
//!   [`Negotiated`] export, structured or simple replies, and the [`Limits`] to enforce.
//! - [`proto`]: the transmission phase. [`Request::parse`] reads a 28-byte request header,
//!   [`Request::check`] refuses what the export cannot run (with the error the protocol asks
//!   for), and the reply encoders build simple replies and structured reply chunks
//!   (`OFFSET_DATA`, `OFFSET_HOLE`, `NONE`, `ERROR`, `ERROR_OFFSET`). Nothing on this path
//!   allocates.
//!
//! Left out:
//! - oldstyle and non-fixed newstyle negotiation: clients must set
//!   `NBD_FLAG_C_FIXED_NEWSTYLE`;
//! - extended headers (`NBD_OPT_EXTENDED_HEADERS` is answered `NBD_REP_ERR_UNSUP`, so requests
//!   keep the 28-byte compact header and 32-bit lengths);
//! - metadata contexts and block status (`NBD_OPT_LIST_META_CONTEXT` and
//!   `NBD_OPT_SET_META_CONTEXT` are answered `NBD_REP_ERR_UNSUP`, `NBD_CMD_BLOCK_STATUS` with
//!   `EINVAL`);
//! - TLS itself: the handshake acknowledges `NBD_OPT_STARTTLS` when configured to and hands
//!   the transport to the caller ([`State::StartTls`]), which runs TLS and resumes;
//! - the experimental resize extension and `NBD_OPT_PEEK_EXPORT`.

pub mod handshake;
pub mod proto;
pub mod server;

pub use handshake::{
    ExportError, ExportInfo, Handshake, HandshakeConfig, HandshakeError, Negotiated, State,
};
pub use proto::{
    error_chunk, error_offset_chunk, none_chunk, offset_data_header, offset_hole_chunk,
    simple_reply, structured_header, AfterRejection, Command, Errno, Limits, LimitsError,
    Rejection, Request, RequestError, REQUEST_HEADER_LEN,
};
pub use server::{NbdError, NbdServer};
