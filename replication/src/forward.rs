//! Forwarding on a node that holds a copy of a volume but is not its primary: its clients'
//! IO (NBD, through a front end) goes to the primary over a session of its own, marked
//! forwarded, and the primary runs it as its own client's (replicated). Clients keep their
//! connection to this node when the primary moves (a reparent, a promote), and no copy but
//! the primary's is ever written by a client.
//!
//! IO from inside the node (the replica service's, a layer's own) passes. A forwarded IO the
//! primary refuses because it is not the primary any more is sent again to the one it names.
//! One in flight when the session breaks (the primary died) is sent again, in order, to the
//! next primary: it may have been written already, and writing it again is what a slow
//! answer to it would have been, since its client has no answer yet (reads and flushes are
//! idempotent). One that waited [`FORWARD_TIMEOUT`] since it arrived fails.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fathom_drivers::{IoCommand, IoFlags, Op};
use fathom_engine::layer::{Down, Layer, LayerCtx, LayerName};
use fathom_engine::poll::Epoll;
use fathom_engine::volume::IoError;

use crate::dial::{open_stream, Dialed, Dialer, Identity};
use crate::layer::PeerAddress;
use crate::proto::{refusal, status, Header, Kind};
use crate::role::VolumeRole;
use crate::session::ConnectorSession;
use crate::stream::FrameStream;

/// How long a client IO waits for a primary to forward it to.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the primary has to open a session.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes the session may hold for the primary.
const MAX_UNSENT: usize = 64 << 20;

/// What a forwarder is built from.
pub struct ForwardSettings {
    pub identity: Identity,
    pub volume: String,
    pub role: Arc<VolumeRole>,
    /// The other nodes that hold copies (the primary is one of them).
    pub nodes: Vec<PeerAddress>,
    pub first_lba: u64,
    /// The owning reactor's IO slots.
    pub slots: usize,
}

enum Link {
    Down,
    Opening {
        stream: Box<FrameStream>,
        session: Box<ConnectorSession>,
        deadline: Instant,
    },
    Open {
        stream: Box<FrameStream>,
    },
}

/// A client IO on its way to the primary.
#[derive(Clone, Copy)]
struct Waiting {
    slot: u32,
    command: IoCommand,
    since: Instant,
}

/// A replica's forwarder of its clients' IO to the primary.
pub struct ForwardLayer {
    identity: Identity,
    volume: String,
    role: Arc<VolumeRole>,
    nodes: Vec<PeerAddress>,
    first_lba: u64,
    link: Link,
    /// The node the session is to (or being opened to).
    target: Option<String>,
    /// The primary a refusal named, when this node does not know it yet.
    hint: Option<String>,
    dialer: Dialer,
    epoll: Epoll,
    waiting: VecDeque<Waiting>,
    /// By request id.
    outstanding: HashMap<u64, Waiting>,
    next_request: u64,
}

impl ForwardLayer {
    pub fn new(settings: ForwardSettings) -> io::Result<Self> {
        Ok(Self {
            identity: settings.identity,
            volume: settings.volume,
            role: settings.role,
            nodes: settings.nodes,
            first_lba: settings.first_lba,
            link: Link::Down,
            target: None,
            hint: None,
            dialer: Dialer::new(Instant::now()),
            epoll: Epoll::new(4)?,
            waiting: VecDeque::with_capacity(settings.slots),
            outstanding: HashMap::with_capacity(settings.slots),
            next_request: 1,
        })
    }

    /// The node to forward to: the primary this node knows, else the one a refusal named.
    fn primary(&self) -> Option<String> {
        let known = self.role.superblock().primary;
        let known = (known != self.identity.node).then_some(known);
        self.hint.clone().or(known)
    }

    /// Drops the session; what it had in flight goes first to the next primary.
    fn close(&mut self, _ctx: &mut LayerCtx<'_>, reason: &str) {
        if let Link::Opening { stream, .. } | Link::Open { stream } = &self.link {
            let _ = self.epoll.delete(stream.transport().stream.as_fd());
        }
        if !matches!(self.link, Link::Down) {
            tracing::warn!(
                volume = %self.volume,
                primary = self.target.as_deref().unwrap_or("?"),
                "replication: forwarding session lost: {reason}"
            );
        }
        self.link = Link::Down;
        self.target = None;
        self.dialer.failed(Instant::now());
        let mut again: Vec<(u64, Waiting)> = self.outstanding.drain().collect();
        again.sort_unstable_by_key(|(request_id, _)| std::cmp::Reverse(*request_id));
        for (_, waiting) in again {
            self.waiting.push_front(waiting);
        }
    }

    /// Opens (or moves) the session to the primary.
    fn connect(&mut self, ctx: &mut LayerCtx<'_>, now: Instant) -> bool {
        let Some(primary) = self.primary() else {
            return false;
        };
        if self
            .target
            .as_deref()
            .is_some_and(|target| target != primary)
        {
            self.close(ctx, &format!("the primary is node {primary} now"));
        }
        if !matches!(self.link, Link::Down) {
            return false;
        }
        let Some(address) = self
            .nodes
            .iter()
            .find(|node| node.node == primary)
            .map(|node| node.address)
        else {
            return false;
        };
        let socket = match self.dialer.poll(&primary, address, now) {
            Dialed::Waiting => return false,
            Dialed::Started => return true,
            Dialed::Failed(reason) => {
                tracing::debug!(volume = %self.volume, "replication: forwarding: {reason}");
                return true;
            }
            Dialed::Connected(socket) => socket,
        };
        let opened = open_stream(
            &self.identity,
            socket,
            &primary,
            address,
            &self.volume,
            MAX_UNSENT,
        )
        .and_then(|(stream, session)| {
            self.epoll
                .add(stream.transport().stream.as_fd(), 0, true)
                .map_err(|error| format!("cannot watch the socket: {error}"))?;
            Ok((stream, session))
        });
        match opened {
            Ok((stream, session)) => {
                self.link = Link::Opening {
                    stream: Box::new(stream),
                    session: Box::new(session),
                    deadline: now + OPENING_TIMEOUT,
                };
                self.target = Some(primary);
            }
            Err(reason) => {
                tracing::warn!(volume = %self.volume, "replication: forwarding: {reason}");
                self.dialer.failed(now);
            }
        }
        true
    }

    /// Sends what waits, in order, while the session is open.
    fn send_waiting(&mut self, ctx: &mut LayerCtx<'_>) -> Result<bool, String> {
        let stream = match &mut self.link {
            Link::Down => return Ok(false),
            Link::Opening { stream, .. } => {
                // The opening's frames (the Hello) go out; client IO waits for the session.
                stream.flush().map_err(|error| error.to_string())?;
                return Ok(false);
            }
            Link::Open { stream } => stream,
        };
        let mut work = false;
        let epoch = self.role.epoch();
        while let Some(waiting) = self.waiting.front().copied() {
            let command = waiting.command;
            let kind = match command.op {
                Op::Read => Kind::Read,
                Op::Write => Kind::Write,
                Op::WriteZeroes => Kind::WriteZeroes,
                Op::Flush => Kind::Flush,
            };
            let (lba, blocks) = match kind {
                Kind::Flush => (0, 0),
                _ => (command.slba - self.first_lba, command.blocks),
            };
            let request_id = self.next_request;
            let header = Header {
                epoch,
                lba,
                block_count: blocks,
                request_id,
                fua: kind != Kind::Read
                    && kind != Kind::Flush
                    && command.flags.contains(IoFlags::FUA),
                forwarded: true,
                // The primary's span of this IO joins its trace.
                trace: ctx.trace_context(waiting.slot),
                ..Header::new(kind)
            };
            let payload = match kind {
                Kind::Write => ctx.data(waiting.slot).unwrap_or(&[]),
                _ => &[],
            };
            stream
                .queue_frame(&header, payload)
                .map_err(|error| error.to_string())?;
            self.next_request += 1;
            self.waiting.pop_front();
            self.outstanding.insert(request_id, waiting);
            work = true;
        }
        stream.flush().map_err(|error| error.to_string())?;
        Ok(work)
    }

    /// Reads and handles the primary's answers.
    fn serve(&mut self, ctx: &mut LayerCtx<'_>, now: Instant) -> Result<bool, String> {
        let mut work = false;
        if let Link::Opening { deadline, .. } = &self.link {
            if now >= *deadline {
                return Err(format!(
                    "the primary did not open the session within {} s",
                    OPENING_TIMEOUT.as_secs()
                ));
            }
        }
        if let Link::Opening { stream, .. } | Link::Open { stream } = &mut self.link {
            work |= stream.fill_from("primary")? > 0;
        }
        loop {
            let answer = match &mut self.link {
                Link::Down => break,
                Link::Opening {
                    stream, session, ..
                } => match stream.next_frame() {
                    None => break,
                    Some(Err(error)) => return Err(error.to_string()),
                    Some(Ok(frame)) => {
                        let (proof, _) = session
                            .on_frame(&frame)
                            .map_err(|error| error.to_string())?;
                        stream.queue(&proof).map_err(|error| error.to_string())?;
                        let Link::Opening { stream, .. } =
                            std::mem::replace(&mut self.link, Link::Down)
                        else {
                            unreachable!("matched above")
                        };
                        self.link = Link::Open { stream };
                        self.dialer.opened();
                        tracing::info!(
                            volume = %self.volume,
                            primary = self.target.as_deref().unwrap_or("?"),
                            "replication: forwarding client IO to the primary"
                        );
                        work = true;
                        continue;
                    }
                },
                Link::Open { stream } => match stream.next_frame() {
                    None => break,
                    Some(Err(error)) => return Err(error.to_string()),
                    Some(Ok(frame)) => (
                        frame.header,
                        frame.payload.to_vec(),
                        frame.refusal_text().map(str::to_string),
                    ),
                },
            };
            work = true;
            let (header, payload, text) = answer;
            let Some(waiting) = self.outstanding.remove(&header.request_id) else {
                return Err(format!(
                    "an answer to request {} not sent",
                    header.request_id
                ));
            };
            if header.kind == Kind::Refused {
                if header.status == refusal::NOT_PRIMARY {
                    // Not run there: it goes again, to the primary named, and so does every
                    // other IO not answered yet (run there before it stopped serving, with the
                    // answer on its way, or never to be run there: sending it again is safe).
                    let mut again: Vec<(u64, Waiting)> = self.outstanding.drain().collect();
                    again.push((header.request_id, waiting));
                    again.sort_unstable_by_key(|(request_id, _)| *request_id);
                    for (_, waiting) in again.into_iter().rev() {
                        self.waiting.push_front(waiting);
                    }
                    self.hint = text.filter(|name| !name.is_empty() && *name != self.identity.node);
                    return Err(format!(
                        "node {} is not the primary; it names {}",
                        self.target.as_deref().unwrap_or("?"),
                        self.hint.as_deref().unwrap_or("none")
                    ));
                }
                ctx.complete(
                    waiting.slot,
                    Err(IoError::Forwarded {
                        op: waiting.command.op,
                        status: header.status,
                    }),
                );
                continue;
            }
            let result = match header.status {
                status::OK => Ok(()),
                code => Err(IoError::Forwarded {
                    op: waiting.command.op,
                    status: code,
                }),
            };
            if result.is_ok() && waiting.command.op == Op::Read {
                match ctx.read_buffer(waiting.slot) {
                    Some(buffer) if buffer.len() == payload.len() => {
                        buffer.copy_from_slice(&payload)
                    }
                    _ => {
                        return Err(format!(
                            "a read answered with {} bytes for its {}-block buffer",
                            payload.len(),
                            waiting.command.blocks
                        ))
                    }
                }
            }
            self.hint = None;
            ctx.complete(waiting.slot, result);
        }
        Ok(work)
    }

    /// Client IO that waited too long for a primary fails.
    fn expire(&mut self, ctx: &mut LayerCtx<'_>, now: Instant) {
        while let Some(waiting) = self.waiting.front() {
            if now.duration_since(waiting.since) < FORWARD_TIMEOUT {
                break;
            }
            let waiting = self.waiting.pop_front().expect("checked above");
            ctx.complete(
                waiting.slot,
                Err(IoError::NotPrimary {
                    epoch: self.role.epoch(),
                }),
            );
        }
    }
}

impl Layer for ForwardLayer {
    fn layer(&self) -> LayerName {
        LayerName::Replication
    }

    fn kind(&self) -> &'static str {
        "forward"
    }

    fn describe(&self) -> String {
        match (&self.link, &self.target) {
            (Link::Open { .. }, Some(target)) => {
                format!("replica: client IO forwarded to the primary, {target}")
            }
            _ => format!(
                "replica: client IO waits for the primary ({})",
                self.primary().unwrap_or_else(|| "not known".into())
            ),
        }
    }

    fn submit(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, command: &IoCommand) -> Down {
        if !ctx.from_frontend() {
            // The replica service's IO and the node's own: this copy's.
            return Down::Pass;
        }
        self.waiting.push_back(Waiting {
            slot,
            command: *command,
            since: Instant::now(),
        });
        if let Err(reason) = self.send_waiting(ctx) {
            self.close(ctx, &reason);
        }
        Down::Hold
    }

    fn holding(&self) -> usize {
        self.waiting.len() + self.outstanding.len()
    }

    fn polled(&self) -> bool {
        true
    }

    fn poll(&mut self, ctx: &mut LayerCtx<'_>) -> bool {
        if let Ok(events) = self.epoll.wait(0) {
            for _ in events {
                if let Link::Opening { stream, .. } | Link::Open { stream } = &mut self.link {
                    stream.set_readable();
                }
            }
        }
        if self.waiting.is_empty() && self.outstanding.is_empty() && matches!(self.link, Link::Down)
        {
            // Connected only when there is something to forward.
            return false;
        }
        let now = Instant::now();
        let mut work = self.connect(ctx, now);
        match self
            .serve(ctx, now)
            .and_then(|served| Ok(served | self.send_waiting(ctx)?))
        {
            Ok(did) => work |= did,
            Err(reason) => {
                self.close(ctx, &reason);
                work = true;
            }
        }
        self.expire(ctx, now);
        work
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.as_fd())
    }

    fn drain(&mut self, ctx: &mut LayerCtx<'_>) {
        // Replaced (this node became the primary): what waits goes down the new stack, and so
        // does what the old primary has not answered. It was paused there (a reparent) or its
        // outcome is unknown; the client has no answer for it yet, so running it again here is
        // what a client's own retry would do.
        for waiting in self.waiting.drain(..) {
            ctx.release(waiting.slot);
        }
        for (_, waiting) in self.outstanding.drain() {
            ctx.release(waiting.slot);
        }
        self.close(ctx, "this node is the primary now");
    }

    fn persistent(&self) -> bool {
        true
    }
}
