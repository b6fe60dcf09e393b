//! A TCP server polled by the reactors: listeners on reactor 0, one poller task per reactor
//! with its connections in an epoll set, and the hand-off of a connection to the reactor that
//! owns what it asked for (an NBD export, a replicated volume). The protocol itself is a
//! [`Service`] and its [`Connection`]s: bytes in, bytes out and engine IO, per connection.
//!
//! A poller never blocks: `epoll_wait` with no timeout, then every connection is served once
//! with a bounded budget (the connection's own). An idle reactor sleeps on the epoll
//! descriptor ([`Task::wake_fd`]).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use fathom_engine::engine::Engine;
use fathom_engine::poll::{Epoll, Event, EventFd};
use fathom_engine::reactor::{IoContext, Task};
use fathom_engine::volume::IoCompletion;
use fathom_engine::EngineStamps;

use crate::BufferCache;

/// Ready sockets taken per `epoll_wait`.
const EVENTS_PER_POLL: usize = 256;
const WAKE_TOKEN: u64 = u64::MAX;
const LISTENER_TOKEN: u64 = u64::MAX - 1 - u16::MAX as u64;

/// A protocol served by a [`Server`]: what every connection of it shares.
pub trait Service: Send + Sync + 'static {
    type Connection: Connection<Service = Self>;
    /// State one reactor keeps for its connections, touched only by that reactor's poller
    /// (a replica's volumes on that reactor): shared by its connections without a lock.
    type Local: Send + 'static;
    /// The protocol's name in the log ("NBD").
    const NAME: &'static str;
    /// The configuration key that limits connections, for the message when it is reached.
    const MAX_CONNECTIONS_KEY: &'static str;

    /// A connection just accepted (non-blocking, no delay); `None` refuses it.
    fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Option<Box<Self::Connection>>;

    /// The state of reactor `reactor`'s poller, made when the server starts.
    fn local(&self, reactor: usize) -> Self::Local;
}

/// One connection of a [`Service`], owned by one reactor's poller at a time.
pub trait Connection: Send + 'static {
    type Service: Service<Connection = Self>;

    fn stream(&self) -> &TcpStream;
    fn peer(&self) -> SocketAddr;
    /// epoll said the socket is readable (or closed) and/or writable.
    fn set_ready(&mut self, readable: bool, writable: bool);
    /// One loop iteration's work on the connection: `index` is its place in the poller,
    /// the high bits of the tags of the engine IOs it submits (`index << 16 | slot`).
    fn serve(
        &mut self,
        index: u32,
        io: &mut IoContext,
        service: &Self::Service,
        local: &mut <Self::Service as Service>::Local,
        buffers: &mut BufferCache,
    ) -> Served;
    /// An engine IO of slot `slot` completed (`stamps`: its telemetry stamps, if any).
    fn complete(
        &mut self,
        slot: u16,
        completion: IoCompletion,
        stamps: Option<EngineStamps>,
        local: &mut <Self::Service as Service>::Local,
        buffers: &mut BufferCache,
    );
    /// Starts closing: no more requests are taken; `serve` says `remove` once the IO in
    /// flight has come back.
    fn close(&mut self, reason: &str);
    /// The connection is gone: log why and give its buffers back.
    fn removed(self: Box<Self>, service: &Self::Service, buffers: &mut BufferCache);
}

/// What serving a connection for one loop iteration led to.
#[derive(Debug, Default)]
pub struct Served {
    pub work: bool,
    /// It is closed and has nothing in flight.
    pub remove: bool,
    /// It belongs on this reactor from now on.
    pub hand_off: Option<usize>,
}

/// How many connections and how much buffer memory a server may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// The largest buffer a request takes, and what each reactor keeps for reuse.
    pub max_buffer: u32,
    pub keep_buffers: usize,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not listen on {address} for {protocol} (if another server holds the port, stop it or set {key})")]
    Listen {
        protocol: &'static str,
        address: String,
        key: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("could not set up the {protocol} poller: {source}")]
    Poller {
        protocol: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("could not start the {protocol} poller on reactor {reactor}: {what}")]
    Spawn {
        protocol: &'static str,
        reactor: usize,
        what: String,
    },
}

/// Listens on `addresses` (the config key `key` names them in errors).
pub fn listen<S: Service>(
    addresses: &[String],
    key: &'static str,
) -> Result<Vec<TcpListener>, ServerError> {
    addresses
        .iter()
        .map(|address| {
            TcpListener::bind(address.as_str())
                .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
                .map_err(|source| ServerError::Listen {
                    protocol: S::NAME,
                    address: address.clone(),
                    key,
                    source,
                })
        })
        .collect()
}

/// What the pollers of one server share.
struct Shared<S: Service> {
    service: S,
    limits: Limits,
    stop: AtomicBool,
    /// Pollers still running.
    running: AtomicUsize,
    /// Per reactor: connections handed over, and the poller's wake-up.
    handoff: Vec<ArrayQueue<Box<S::Connection>>>,
    wake: Vec<EventFd>,
    connections: AtomicUsize,
}

/// A running server. Dropping it stops it.
pub struct Server<S: Service> {
    shared: Arc<Shared<S>>,
    addresses: Vec<SocketAddr>,
}

impl<S: Service> Server<S> {
    /// Serves `service` on `listeners` (polled by reactor 0), with a poller on every reactor
    /// of `engine`.
    pub fn start(
        engine: &Engine,
        listeners: Vec<TcpListener>,
        service: S,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        let poller_error = |source| ServerError::Poller {
            protocol: S::NAME,
            source,
        };
        let addresses = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<io::Result<Vec<_>>>()
            .map_err(poller_error)?;
        let reactors = engine.cores().len();
        let wake = (0..reactors)
            .map(|_| EventFd::new())
            .collect::<io::Result<Vec<_>>>()
            .map_err(poller_error)?;
        let shared = Arc::new(Shared {
            service,
            limits,
            stop: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            handoff: (0..reactors)
                .map(|_| ArrayQueue::new(limits.max_connections.max(1)))
                .collect(),
            wake,
            connections: AtomicUsize::new(0),
        });
        let mut listeners = Some(listeners);
        for reactor in 0..reactors {
            let mine = match reactor {
                0 => listeners.take().unwrap_or_default(),
                _ => Vec::new(),
            };
            let poller = Poller::new(reactor, shared.clone(), mine, engine.dma().clone())
                .map_err(poller_error)?;
            shared.running.fetch_add(1, Ordering::AcqRel);
            if let Err(error) = engine.spawn(reactor, Box::new(poller)) {
                shared.running.fetch_sub(1, Ordering::AcqRel);
                shared.stop.store(true, Ordering::Release);
                return Err(ServerError::Spawn {
                    protocol: S::NAME,
                    reactor,
                    what: error.to_string(),
                });
            }
        }
        Ok(Self { shared, addresses })
    }

    /// The addresses it listens on (with the ports the system chose for port 0).
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    pub fn service(&self) -> &S {
        &self.shared.service
    }

    /// Stops listening, closes every connection once its IO in flight has finished, and
    /// waits up to `timeout` for the pollers to finish. True when they all did.
    pub fn stop(&self, timeout: Duration) -> bool {
        self.signal_stop();
        let started = Instant::now();
        while self.shared.running.load(Ordering::Acquire) > 0 {
            if started.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn signal_stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        for wake in &self.shared.wake {
            wake.notify();
        }
    }
}

impl<S: Service> Drop for Server<S> {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// One reactor's share of a server: its connections (and on reactor 0, the listeners).
struct Poller<S: Service> {
    reactor: usize,
    shared: Arc<Shared<S>>,
    epoll: Epoll,
    listeners: Vec<TcpListener>,
    conns: Vec<Option<Box<S::Connection>>>,
    free_conns: Vec<u32>,
    local: S::Local,
    buffers: BufferCache,
    events: Vec<Event>,
    stopping: bool,
    done: bool,
}

impl<S: Service> Poller<S> {
    fn new(
        reactor: usize,
        shared: Arc<Shared<S>>,
        listeners: Vec<TcpListener>,
        dma: fathom_dma::DmaPool,
    ) -> io::Result<Self> {
        let epoll = Epoll::new(EVENTS_PER_POLL)?;
        epoll.add(shared.wake[reactor].as_fd(), WAKE_TOKEN, false)?;
        for (index, listener) in listeners.iter().enumerate() {
            epoll.add(listener.as_fd(), LISTENER_TOKEN + index as u64, false)?;
        }
        let limits = shared.limits;
        let local = shared.service.local(reactor);
        Ok(Self {
            reactor,
            local,
            buffers: BufferCache::new(dma, limits.max_buffer, limits.keep_buffers, S::NAME),
            shared,
            epoll,
            listeners,
            conns: Vec::new(),
            free_conns: Vec::new(),
            events: Vec::with_capacity(EVENTS_PER_POLL),
            stopping: false,
            done: false,
        })
    }

    fn insert(&mut self, mut conn: Box<S::Connection>) {
        let index = match self.free_conns.pop() {
            Some(index) => index,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        if let Err(error) = self.epoll.add(conn.stream().as_fd(), index as u64, true) {
            tracing::warn!(peer = %conn.peer(), "{}: cannot watch the connection: {error}", S::NAME);
            self.shared.connections.fetch_sub(1, Ordering::AcqRel);
            self.free_conns.push(index);
            return;
        }
        // Whatever arrived already is read without waiting for an edge.
        conn.set_ready(true, true);
        self.conns[index as usize] = Some(conn);
    }

    fn remove(&mut self, index: usize) {
        if let Some(conn) = self.conns[index].take() {
            let _ = self.epoll.delete(conn.stream().as_fd());
            self.free_conns.push(index as u32);
            self.shared.connections.fetch_sub(1, Ordering::AcqRel);
            conn.removed(&self.shared.service, &mut self.buffers);
        }
    }

    fn accept(&mut self, listener: usize) {
        loop {
            let (stream, peer) = match self.listeners[listener].accept() {
                Ok(pair) => pair,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    // Out of descriptors or a connection reset before accept: the listener
                    // itself is fine.
                    tracing::warn!("{}: accept failed: {error}", S::NAME);
                    break;
                }
            };
            let limit = self.shared.limits.max_connections;
            if self.shared.connections.load(Ordering::Acquire) >= limit {
                tracing::warn!(
                    %peer,
                    "{}: refusing a connection: {limit} open, the limit ({})",
                    S::NAME,
                    S::MAX_CONNECTIONS_KEY
                );
                continue;
            }
            if let Err(error) = stream
                .set_nonblocking(true)
                .and_then(|()| stream.set_nodelay(true))
            {
                tracing::warn!(%peer, "{}: cannot set up the connection: {error}", S::NAME);
                continue;
            }
            let Some(conn) = self.shared.service.accept(stream, peer) else {
                continue;
            };
            self.shared.connections.fetch_add(1, Ordering::AcqRel);
            tracing::debug!(%peer, "{} connection accepted", S::NAME);
            self.insert(conn);
        }
    }

    fn take_handoffs(&mut self) {
        while let Some(conn) = self.shared.handoff[self.reactor].pop() {
            self.insert(conn);
        }
    }

    fn begin_stop(&mut self) {
        self.stopping = true;
        for listener in self.listeners.drain(..) {
            let _ = self.epoll.delete(listener.as_fd());
        }
        while let Some(conn) = self.shared.handoff[self.reactor].pop() {
            self.shared.connections.fetch_sub(1, Ordering::AcqRel);
            conn.removed(&self.shared.service, &mut self.buffers);
        }
        for conn in self.conns.iter_mut().flatten() {
            conn.close("the node is stopping");
        }
    }

    /// Moves a connection to the reactor that owns what it serves.
    fn hand_off(&mut self, index: usize, reactor: usize) {
        let Some(conn) = self.conns[index].take() else {
            return;
        };
        let _ = self.epoll.delete(conn.stream().as_fd());
        self.free_conns.push(index as u32);
        if let Err(conn) = self.shared.handoff[reactor].push(conn) {
            // Cannot happen while max_connections bounds the queue; close rather than lose it.
            tracing::warn!(peer = %conn.peer(), "{}: hand-off queue full; closing the connection", S::NAME);
            self.shared.connections.fetch_sub(1, Ordering::AcqRel);
            conn.removed(&self.shared.service, &mut self.buffers);
            return;
        }
        self.shared.wake[reactor].notify();
    }
}

impl<S: Service> Task for Poller<S> {
    fn poll(&mut self, io: &mut IoContext) -> bool {
        if self.done {
            return false;
        }
        if !self.stopping && self.shared.stop.load(Ordering::Acquire) {
            self.begin_stop();
        }
        let mut work = false;
        self.events.clear();
        match self.epoll.wait(0) {
            Ok(events) => self.events.extend(events),
            Err(error) => tracing::warn!("{}: epoll_wait failed: {error}", S::NAME),
        }
        for event_index in 0..self.events.len() {
            let event = self.events[event_index];
            work = true;
            match event.token {
                WAKE_TOKEN => {
                    self.shared.wake[self.reactor].clear();
                    if !self.stopping {
                        self.take_handoffs();
                    }
                }
                token if token >= LISTENER_TOKEN => {
                    let listener = (token - LISTENER_TOKEN) as usize;
                    if listener < self.listeners.len() {
                        self.accept(listener);
                    }
                }
                token => {
                    if let Some(Some(conn)) = self.conns.get_mut(token as usize) {
                        conn.set_ready(event.readable || event.closed, event.writable);
                    }
                }
            }
        }
        for index in 0..self.conns.len() {
            let Some(conn) = self.conns[index].as_deref_mut() else {
                continue;
            };
            let outcome = conn.serve(
                index as u32,
                io,
                &self.shared.service,
                &mut self.local,
                &mut self.buffers,
            );
            work |= outcome.work;
            if outcome.remove {
                self.remove(index);
            } else if let Some(reactor) = outcome.hand_off.filter(|&r| r != self.reactor) {
                self.hand_off(index, reactor);
            }
        }
        if self.stopping && self.conns.iter().all(Option::is_none) {
            self.done = true;
            self.buffers.release_all();
            self.shared.running.fetch_sub(1, Ordering::AcqRel);
        }
        work
    }

    fn complete(&mut self, io: &mut IoContext, completion: IoCompletion) {
        let index = (completion.tag >> 16) as usize;
        let slot = (completion.tag & 0xffff) as u16;
        // Taken before anything is submitted, while the engine's slot still holds them.
        let stamps = io.completion_stamps();
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        conn.complete(slot, completion, stamps, &mut self.local, &mut self.buffers);
    }

    fn finished(&self) -> bool {
        self.done
    }

    /// The epoll descriptor: readable when a socket or the hand-off eventfd is, so an idle
    /// reactor sleeps instead of polling empty sockets.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.as_fd())
    }
}
