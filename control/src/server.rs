//! The thin socket driver: a Unix-socket listener that feeds each connection's bytes to a
//! [`LineDecoder`] and each request to a [`Handler`].
//!
//! One acceptor thread polls a nonblocking listener (so [`ControlServer::stop`] is seen
//! within [`ACCEPT_POLL`]); each connection is served on its own thread, one request at a
//! time, in order. The number of connections is bounded ([`Options::max_connections`]); one
//! more is told `busy` and closed. A connection that sends nothing for
//! [`Options::idle_timeout`] is told so and closed. A request that cannot be parsed gets an
//! error answer and the connection goes on; a handler that panics gets an `internal` error
//! answer and the server goes on.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;

use crate::proto::{
    encode_error, encode_ok, parse_request, peek_id, LineDecoder, RemoteError, Request,
    BAD_REQUEST, BUSY, INTERNAL,
};

/// What the node does with a request. Called from connection threads, several at once.
pub trait Handler: Send + Sync {
    fn handle(&self, request: Request) -> Result<Value, RemoteError>;
}

/// How often the acceptor looks for new connections and for a stop.
pub const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// How long writing an answer may block before the connection is given up (a client that
/// does not read its answers must not hold a thread forever).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of a [`ControlServer`].
#[derive(Debug, Clone)]
pub struct Options {
    /// A connection that sends nothing for this long is closed (at least 1 ms).
    pub idle_timeout: Duration,
    /// Connections served at once; one more is answered `busy` and closed.
    pub max_connections: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            max_connections: 16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlServerError {
    #[error("another node serves {}: stop it or use another data_dir", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket: move it away or use another data_dir", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot check whether a node serves {}: {source}; check the permissions of its directory", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale control socket {} (left by a node that stopped): {source}; remove it by hand", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {}: {source}; the directory must exist and be writable, and the path be under 108 bytes", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make {} owner-only (mode 0600): {source}", path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the control channel's acceptor thread: {source}")]
    Spawn {
        #[source]
        source: io::Error,
    },
}

/// The node's control channel: a Unix socket, served until [`stop`](Self::stop) or drop.
pub struct ControlServer {
    path: PathBuf,
    /// The socket file's identity, so that stop removes this server's file and not one a
    /// later node put in its place.
    inode: (u64, u64),
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    handler: Arc<dyn Handler>,
    options: Options,
    stopping: AtomicBool,
    connections: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    /// A handle on each open connection, to shut it down on stop.
    open: HashMap<u64, UnixStream>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Serves `handler` at `path` with the default [`Options`].
    pub fn start(path: &Path, handler: Arc<dyn Handler>) -> Result<Self, ControlServerError> {
        Self::start_with(path, handler, Options::default())
    }

    /// Serves `handler` at `path`. A live socket there is refused; a stale one (nothing
    /// answers) is replaced. The socket is owner-only (0600) before any connection is
    /// accepted.
    pub fn start_with(
        path: &Path,
        handler: Arc<dyn Handler>,
        options: Options,
    ) -> Result<Self, ControlServerError> {
        let options = Options {
            idle_timeout: options.idle_timeout.max(Duration::from_millis(1)),
            max_connections: options.max_connections,
        };
        clear_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ControlServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        // Nothing is accepted before this. Until the chmod the file has the umask's mode
        // (0755 under the usual 022), which already keeps other users out: connecting needs
        // write permission on the socket file.
        let restrict = || -> io::Result<(u64, u64)> {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            let metadata = std::fs::metadata(path)?;
            listener.set_nonblocking(true)?;
            Ok((metadata.dev(), metadata.ino()))
        };
        let inode = match restrict() {
            Ok(inode) => inode,
            Err(source) => {
                let _ = std::fs::remove_file(path);
                return Err(ControlServerError::Permissions {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let shared = Arc::new(Shared {
            handler,
            options,
            stopping: AtomicBool::new(false),
            connections: Mutex::new(Connections::default()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("fathom-control".into())
                .spawn(move || accept_loop(&shared, listener))
        };
        let acceptor = match acceptor {
            Ok(acceptor) => acceptor,
            Err(source) => {
                let _ = std::fs::remove_file(path);
                return Err(ControlServerError::Spawn { source });
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            inode,
            shared,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, shuts down every open connection (a request being handled finishes,
    /// but its answer is not delivered) and removes the socket file. Idempotent.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let acceptor = self
            .acceptor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(acceptor) = acceptor else {
            return;
        };
        // The acceptor registers connections; once it has ended, the table is complete.
        let _ = acceptor.join();
        let connections = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for stream in connections.open.values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        drop(connections);
        if let Ok(metadata) = std::fs::symlink_metadata(&self.path) {
            if (metadata.dev(), metadata.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes a socket file nothing answers on; refuses a live one or a file that is not a
/// socket.
fn clear_stale(path: &Path) -> Result<(), ControlServerError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlServerError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ControlServerError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlServerError::InUse {
            path: path.to_path_buf(),
        }),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| ControlServerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ControlServerError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: UnixListener) {
    while !shared.stopping.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => admit(shared, stream),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock: nobody waiting. Anything else (out of file descriptors): the client
            // stays in the backlog and is tried again.
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Writes one line and closes: for connections that are refused.
fn refuse(mut stream: UnixStream, code: &str, message: &str) {
    let _ = stream.write_all(encode_error(None, code, message).as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn admit(shared: &Arc<Shared>, stream: UnixStream) {
    // Accepted sockets are blocking on Linux, but say so rather than rely on it.
    if stream.set_nonblocking(false).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
        || stream
            .set_read_timeout(Some(shared.options.idle_timeout))
            .is_err()
    {
        return;
    }
    let mut connections = shared
        .connections
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if connections.open.len() >= shared.options.max_connections {
        drop(connections);
        let max = shared.options.max_connections;
        refuse(
            stream,
            BUSY,
            &format!("this node already serves {max} control connections, its limit: close one (another fathom-ctl may be waiting on a run) and retry"),
        );
        return;
    }
    let Ok(handle) = stream.try_clone() else {
        drop(connections);
        refuse(
            stream,
            INTERNAL,
            "the node cannot serve this connection (out of file descriptors?): retry later",
        );
        return;
    };
    let id = connections.next_id;
    connections.next_id += 1;
    connections.open.insert(id, handle);
    drop(connections);
    let spawned = {
        let shared = Arc::clone(shared);
        thread::Builder::new()
            .name("fathom-control-conn".into())
            .spawn(move || {
                let _registration = Registration {
                    shared: &shared,
                    id,
                };
                serve(&shared, stream);
            })
    };
    if spawned.is_err() {
        let handle = shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .remove(&id);
        if let Some(handle) = handle {
            refuse(
                handle,
                BUSY,
                "the node cannot start a thread for this connection: retry later",
            );
        }
    }
}

/// Takes a connection out of the table when its thread ends, however it ends.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .remove(&self.id);
    }
}

fn serve(shared: &Shared, mut stream: UnixStream) {
    let mut decoder = LineDecoder::new();
    let mut buffer = [0u8; 4096];
    loop {
        let received = match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(received) => received,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if !shared.stopping.load(Ordering::Acquire) {
                    let idle = shared.options.idle_timeout;
                    refuse(
                        stream,
                        BAD_REQUEST,
                        &format!("closing this control connection: nothing received for {idle:?} (the idle limit); reconnect to send more"),
                    );
                }
                return;
            }
            Err(_) => return,
        };
        decoder.push(&buffer[..received]);
        while let Some(line) = decoder.next_line() {
            let answer = match line {
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => answer(shared, &line),
                Err(error) => encode_error(None, BAD_REQUEST, &error.to_string()),
            };
            if stream.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// The answer line to one request line.
fn answer(shared: &Shared, line: &str) -> String {
    let (id, request) = match parse_request(line) {
        Ok(parsed) => parsed,
        Err(error) => return encode_error(peek_id(line), BAD_REQUEST, &error.to_string()),
    };
    let command = request.command();
    match catch_unwind(AssertUnwindSafe(|| shared.handler.handle(request))) {
        Ok(Ok(result)) => encode_ok(id, &result),
        Ok(Err(error)) => encode_error(id, &error.code, &error.message),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            encode_error(
                id,
                INTERNAL,
                &format!("the node failed while handling {command} ({what}); it goes on serving, but report this with the node's log"),
            )
        }
    }
}
