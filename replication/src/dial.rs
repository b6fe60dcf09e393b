//! Opening a session to another node's replica service from a reactor, which must never
//! block: the TCP connect runs on a short-lived thread and the reactor picks the socket up
//! when it is there; then the session's first frame is queued on a non-blocking stream.
//! Attempts that fail are retried with a growing pause.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use fathom_net::Transport;

use crate::proto::HEADER_LEN;
use crate::session::{ConnectorSession, PeerAuth};
use crate::stream::FrameStream;

/// Pauses between attempts to reach a node that is down.
const FIRST_RETRY: Duration = Duration::from_millis(50);
const LAST_RETRY: Duration = Duration::from_secs(1);
/// A connection attempt gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Who this node is when it opens sessions.
#[derive(Clone)]
pub struct Identity {
    pub node: String,
    pub cluster: String,
    pub auth: PeerAuth,
    /// Mutual TLS: this node's client side.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The largest payload a frame carries.
    pub max_payload: u32,
}

/// What a [`Dialer`] has for the caller now.
pub enum Dialed {
    /// Nothing new (waiting for the pause or the connect).
    Waiting,
    /// A connect was started.
    Started,
    Connected(TcpStream),
    /// The attempt failed; the next waits a while.
    Failed(String),
}

/// Attempts to reach one node, off the reactor.
pub struct Dialer {
    connecting: Option<Receiver<io::Result<TcpStream>>>,
    retry_at: Instant,
    pause: Duration,
}

impl Dialer {
    pub fn new(now: Instant) -> Self {
        Self {
            connecting: None,
            retry_at: now,
            pause: FIRST_RETRY,
        }
    }

    /// Starts an attempt to reach `node` at `address` when the pause is over, or collects
    /// the one under way.
    pub fn poll(&mut self, node: &str, address: SocketAddr, now: Instant) -> Dialed {
        let result = match &self.connecting {
            None if now < self.retry_at => return Dialed::Waiting,
            None => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                let spawned = std::thread::Builder::new()
                    .name(format!("dial-{node}"))
                    .spawn(move || {
                        let _ = tx.send(TcpStream::connect_timeout(&address, CONNECT_TIMEOUT));
                    });
                return match spawned {
                    Ok(_) => {
                        self.connecting = Some(rx);
                        Dialed::Started
                    }
                    Err(error) => {
                        self.failed(now);
                        Dialed::Failed(format!("cannot start a thread to connect: {error}"))
                    }
                };
            }
            Some(rx) => match rx.try_recv() {
                Err(TryRecvError::Empty) => return Dialed::Waiting,
                Err(TryRecvError::Disconnected) => {
                    Err(io::Error::other("the connecting thread ended"))
                }
                Ok(result) => result,
            },
        };
        self.connecting = None;
        match result {
            Ok(stream) => Dialed::Connected(stream),
            Err(error) => {
                self.failed(now);
                Dialed::Failed(format!("cannot reach {address}: {error}"))
            }
        }
    }

    /// The session failed (or could not start): the next attempt waits a while, longer each
    /// time.
    pub fn failed(&mut self, now: Instant) {
        self.connecting = None;
        self.retry_at = now + self.pause;
        self.pause = (self.pause * 2).min(LAST_RETRY);
    }

    /// The session opened: the next failure is retried soon.
    pub fn opened(&mut self) {
        self.pause = FIRST_RETRY;
    }
}

/// A connected socket as a non-blocking session stream to node `peer` for `volume`, with
/// its first Hello queued: the stream, and the opening's state to feed the answers.
pub fn open_stream(
    identity: &Identity,
    socket: TcpStream,
    peer: &str,
    address: SocketAddr,
    volume: &str,
    max_unsent: usize,
) -> Result<(FrameStream, ConnectorSession), String> {
    if fathom_net::fault::partitioned() {
        return Err(fathom_net::fault::partition_error().to_string());
    }
    socket
        .set_nonblocking(true)
        .and_then(|()| socket.set_nodelay(true))
        .map_err(|error| format!("cannot set up the socket: {error}"))?;
    let mut transport = Transport::plain(socket);
    if let Some(tls) = &identity.tls {
        transport
            .start_tls_client(tls.clone(), &address.ip().to_string())
            .map_err(|error| format!("TLS: {error}"))?;
    }
    let (session, hello) = ConnectorSession::start(
        &identity.node,
        &identity.cluster,
        peer,
        vec![volume.to_string()],
        &identity.auth,
    )
    .map_err(|error| error.to_string())?;
    let mut stream = FrameStream::new(
        transport,
        identity.max_payload + 4096,
        max_unsent.max(HEADER_LEN + identity.max_payload as usize),
    );
    stream.queue(&hello).map_err(|error| error.to_string())?;
    Ok((stream, session))
}
