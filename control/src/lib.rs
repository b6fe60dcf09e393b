//! Fathom's node control channel: how an operator (or `fathom-ctl`) asks a running node for
//! its volumes, devices and layers, stubs a layer, injects latency and errors at run time,
//! and runs a workload inside the node.
//!
//! The protocol is versioned JSON lines over a Unix socket (`DATA_DIR/control.sock`, owner
//! only). [`proto`] is the protocol without any IO: a bounded line splitter, the request and
//! answer types and their codecs, unit- and property-tested without a socket. [`server`] is
//! the thin driver that owns the socket and calls the node's [`server::Handler`]; [`client`]
//! is the other end. Nothing here knows the engine: the node maps requests onto it.

pub mod client;
pub mod proto;
pub mod server;

pub use client::{ClientError, ControlClient};
pub use proto::{
    Cleared, DeviceRow, Hello, LayerRow, NamespaceRow, ProtoError, RemoteError, Request, RuleRow,
    RunResult, VolumeRow,
};
pub use server::{ControlServer, ControlServerError, Handler, Options};

/// The socket's file name in the node's data directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Where the node whose data directory is `data_dir` listens.
pub fn socket_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// What a tool's node argument names: a directory is a data_dir (its socket is
/// DIR/control.sock); anything else, the socket itself.
pub fn socket_of(node: &std::path::Path) -> std::path::PathBuf {
    if node.is_dir() {
        socket_path(node)
    } else {
        node.to_path_buf()
    }
}
