//! The client side of the control channel: one connection, one request at a time.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::proto::{encode_request, parse_response, LineDecoder, ProtoError, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no node control socket at {}: is fathom-node running with this data_dir? (--node DIR|SOCKET)", path.display())]
    NoSocket { path: PathBuf },
    #[error("no permission to connect to {}: run as the user that runs fathom-node (the socket is owner-only)", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("{} is not a socket: give the node's data_dir or its control.sock (--node DIR|SOCKET)", path.display())]
    NotASocket { path: PathBuf },
    #[error("nothing answers at {}: it was left by a node that stopped; start fathom-node with this data_dir", path.display())]
    Refused { path: PathBuf },
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the node within {:.1} s: it may be busy or stuck; raise --timeout to wait longer", timeout.as_secs_f64())]
    Timeout { timeout: Duration },
    #[error("the node closed the control connection without answering (it may be stopping)")]
    Closed,
    #[error("control connection to the node failed: {source}")]
    Io {
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtoError),
    /// The node's error answer: its code (see the `pub const` codes in [`crate::proto`]) and
    /// message.
    #[error("{message}")]
    Remote { code: String, message: String },
}

/// A connection to a node's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
    decoder: LineDecoder,
    timeout: Duration,
    next_id: u64,
}

impl ControlClient {
    /// Connects to the socket at `path`; `timeout` bounds each [`call`](Self::call).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| {
            let path = path.to_path_buf();
            match source.kind() {
                io::ErrorKind::NotFound => ClientError::NoSocket { path },
                io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path },
                io::ErrorKind::ConnectionRefused => match std::fs::metadata(&path) {
                    Ok(metadata) if !metadata.file_type().is_socket() => {
                        ClientError::NotASocket { path }
                    }
                    _ => ClientError::Refused { path },
                },
                _ => ClientError::Connect { path, source },
            }
        })?;
        Ok(Self {
            stream,
            decoder: LineDecoder::new(),
            timeout: timeout.max(Duration::from_millis(1)),
            next_id: 1,
        })
    }

    /// Sends `request` and waits for its answer, at most the connect timeout.
    pub fn call(&mut self, request: &Request) -> Result<Value, ClientError> {
        self.call_with_timeout(request, self.timeout)
    }

    /// Sends `request` and waits for its answer, at most `timeout` (a `run` takes its
    /// runtime and ramp plus a margin).
    pub fn call_with_timeout(
        &mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let timeout = timeout.max(Duration::from_millis(1));
        let deadline = Instant::now() + timeout;
        let id = self.next_id;
        self.next_id += 1;
        let line = encode_request(Some(id), request);
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| ClientError::Io { source })?;
        // A node that refused the connection (busy) has written why before closing: if the
        // write fails, that answer may still be waiting to be read.
        let written = self.stream.write_all(line.as_bytes());
        let mut buffer = [0u8; 4096];
        loop {
            while let Some(line) = self.decoder.next_line() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let (answer_id, result) = parse_response(&line)?;
                // An answer without an id is about the connection (busy, idle): it is ours.
                // One with another id is left over from an earlier call that timed out.
                if answer_id.is_none() || answer_id == Some(id) {
                    return result.map_err(|error| ClientError::Remote {
                        code: error.code,
                        message: error.message,
                    });
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout { timeout });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| ClientError::Io { source })?;
            match self.stream.read(&mut buffer) {
                Ok(0) => {
                    return Err(match written {
                        Err(source) => ClientError::Io { source },
                        Ok(()) => ClientError::Closed,
                    })
                }
                Ok(received) => self.decoder.push(&buffer[..received]),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout { timeout })
                }
                Err(source) => return Err(ClientError::Io { source }),
            }
        }
    }
}
