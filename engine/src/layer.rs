//! The layer stack: what an IO passes between its volume and its device queue.
//!
//! Each volume has an ordered stack of [`Layer`]s, owned by the reactor that owns the volume.
//! An IO enters at the top (index 0) and goes down; at the bottom is the device queue. On the
//! way down a layer passes the IO on, holds it (to release it later from [`Layer::poll`]), or
//! completes it at once (a loopback stub). On the way up each layer it passed sees its
//! completion. A layer may also issue child IOs for one parent ([`LayerCtx::issue`]), as
//! replication fans a write out, and completes the parent when it decides
//! ([`LayerCtx::complete`]).
//!
//! Requests and completions here are the engine's ([`IoCommand`], [`IoError`]): no layer sees
//! an NVMe type. Per-IO state stays in the reactor's slot array: a layer that holds IOs keeps
//! their slot numbers in storage sized when it is built, so nothing allocates per IO. A volume
//! whose stack is empty (the default) goes straight to its device queue.
//!
//! A parent a layer completes while some of its children are still in flight (a quorum write
//! acknowledged before its slowest copy) goes up only when the last child is done: a child's
//! command may point into the parent's buffer, and the buffer goes back to the client with the
//! completion. A layer that wants to answer before its slow children copies the data first.
//!
//! Stacks change only through control messages, applied by the reactor between loop
//! iterations ([`crate::reactor::VolumeControl`]); a replaced layer first gives back what it
//! holds ([`Layer::drain`]). Replacing a stack while its children are in flight is not
//! supported yet (their completions would reach the new stack's layer at the same depth):
//! replication, the first fan-out layer, must drain its children first.

use fathom_dma::DmaBuf;
use fathom_drivers::inject::{InjectRule, Injector, OpClass, Rng};
use fathom_drivers::{IoCommand, Op};
use fathom_telemetry::trace::{SpanId, TraceContext};
use fathom_telemetry::Clock;

use crate::volume::IoError;

/// The layers of the IO path a stub or an injection rule can stand at, top to bottom. The
/// names are part of the control and isolation interfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerName {
    /// The protocol front end (NBD): parse, reply, the socket.
    Frontend,
    /// The engine: the cross-core hop to the owning reactor and the volume's layers.
    Engine,
    /// Replication: a replicated volume's writes and flushes fanned out to its replicas (on
    /// the primary), beside the local copy below.
    Replication,
    /// The device queue: NVMe submission and completion rings, doorbells.
    Queue,
    /// The controller behind the queue.
    Device,
    /// The media behind the controller: the data it moves.
    Media,
}

impl LayerName {
    pub const ALL: [LayerName; 6] = [
        LayerName::Frontend,
        LayerName::Engine,
        LayerName::Replication,
        LayerName::Queue,
        LayerName::Device,
        LayerName::Media,
    ];

    /// Its position in [`LayerName::ALL`] (how a trace record names it).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LayerName::Frontend => "frontend",
            LayerName::Engine => "engine",
            LayerName::Replication => "replication",
            LayerName::Queue => "queue",
            LayerName::Device => "device",
            LayerName::Media => "media",
        }
    }
}

impl std::fmt::Display for LayerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LayerName {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        LayerName::ALL
            .into_iter()
            .find(|name| name.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "no layer {text:?}: the layers are frontend, engine, replication, queue, \
                     device, media"
                )
            })
    }
}

/// Why a control change was refused. Each message says what to do instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("no volume {name:?}; the volumes are: {known}")]
    UnknownVolume { name: String, known: String },
    #[error("no device {name:?}; the devices are: {known}")]
    UnknownDevice { name: String, known: String },
    #[error("{what}")]
    Unsupported { what: String },
    #[error("injection rule {index}: `{field}` = {value} is not allowed: {allowed}")]
    BadRule {
        index: usize,
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("the reactor on core {0} did not apply the change within 5 s; it may be stuck")]
    Timeout(usize),
    #[error("a volume {name:?} exists already; pick another name, or delete it first")]
    VolumeExists { name: String },
    #[error("all {slots} volume slots are in use; delete a volume first, or raise [cluster.pool] volumes (restart)")]
    NoVolumeSlot { slots: usize },
    #[error("{what}")]
    BadVolume { what: String },
    #[error("volume {volume:?} still has {in_flight} IOs in flight after 5 s; stop its clients and retry")]
    VolumeBusy { volume: String, in_flight: usize },
    #[error("the engine is shutting down")]
    Stopped,
}

/// One layer's settings on one volume.
#[derive(Debug, Clone, Default)]
pub struct LayerSettings {
    /// Replaced by its loopback stub.
    pub stub: bool,
    /// Run-time injection rules, in order.
    pub inject: Vec<InjectRule>,
}

/// A volume's settings for every layer, in [`LayerName::ALL`] order.
#[derive(Debug, Clone, Default)]
pub struct VolumeLayers {
    pub layers: [LayerSettings; 6],
}

impl VolumeLayers {
    pub fn get(&self, layer: LayerName) -> &LayerSettings {
        &self.layers[layer as usize]
    }

    pub fn get_mut(&mut self, layer: LayerName) -> &mut LayerSettings {
        &mut self.layers[layer as usize]
    }

    /// The layer stack these settings make, top first, and where below it the volume's
    /// commands go. `slots`: the owning reactor's IO slots (what a holding layer must have
    /// room for); `seed`: for injection's generator.
    pub fn build(
        &self,
        clock: &Clock,
        slots: usize,
        seed: u64,
    ) -> Result<(Vec<Box<dyn Layer>>, VolumePath), ControlError> {
        let mut stack: Vec<Box<dyn Layer>> = Vec::new();
        for layer in LayerName::ALL {
            let settings = self.get(layer);
            for (index, rule) in settings.inject.iter().enumerate() {
                rule.validate()
                    .map_err(|(field, value, allowed)| ControlError::BadRule {
                        index,
                        field,
                        value,
                        allowed,
                    })?;
            }
            match layer {
                LayerName::Frontend if settings.stub => {
                    return Err(ControlError::Unsupported {
                        what: FRONTEND_STUB.into(),
                    })
                }
                LayerName::Device | LayerName::Media if !settings.inject.is_empty() => {
                    return Err(ControlError::Unsupported {
                        what: format!(
                            "{layer} injection belongs to the device, not to one volume: \
                             `fathom-ctl inject add DEVICE --layer {layer}`"
                        ),
                    })
                }
                LayerName::Device | LayerName::Media => continue,
                LayerName::Replication if settings.stub => {
                    return Err(ControlError::Unsupported {
                        what: "the replication layer has no stub yet: stub the queue, device \
                               or media of the replicas' nodes instead"
                            .into(),
                    })
                }
                _ => {}
            }
            if settings.stub {
                // The engine stub removes the engine's own time, its injection included: the
                // IO goes on unheld. The queue stub completes the IO without the NVMe rings.
                if layer == LayerName::Queue {
                    stack.push(Box::new(Stub::new(layer)));
                }
            } else if !settings.inject.is_empty() {
                stack.push(Box::new(Inject::new(
                    layer,
                    settings.inject.clone(),
                    clock,
                    slots,
                    seed ^ (layer as u64) << 32,
                )));
            }
        }
        Ok((stack, self.path()))
    }

    /// Where below its layers a volume with these settings sends its commands.
    pub fn path(&self) -> VolumePath {
        VolumePath {
            device_stub: self.get(LayerName::Device).stub,
            media_stub: self.get(LayerName::Media).stub,
        }
    }

    /// The layers stubbed, top first.
    pub fn stubs(&self) -> Vec<LayerName> {
        LayerName::ALL
            .into_iter()
            .filter(|&layer| self.get(layer).stub)
            .collect()
    }
}

/// Why the frontend layer has no stub switch: its stub is a workload inside the node.
pub const FRONTEND_STUB: &str = "the frontend stub is a workload run inside the node, where no \
    socket or protocol is involved: `fathom-ctl run VOLUME` or `fathom-bench isolate --node`; \
    the NBD front end itself keeps serving";

/// Where a volume's commands go below its layers: its own device, or the device stub (an
/// inline null controller behind the same queue code), with or without the media stub (the
/// controller moves no data).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumePath {
    pub device_stub: bool,
    pub media_stub: bool,
}

impl VolumePath {
    /// Whether the commands take the volume's own device queue as they are.
    pub fn is_direct(self) -> bool {
        self == VolumePath::default()
    }
}

/// What a layer does with an IO on its way down.
#[derive(Debug)]
pub enum Down {
    /// On to the next layer.
    Pass,
    /// The layer keeps it, and later passes it on ([`LayerCtx::release`]) or completes it.
    Hold,
    /// Done here, with this result: nothing below sees it.
    Complete(Result<(), IoError>),
}

/// What a layer does with a completion on its way up.
#[derive(Debug, PartialEq, Eq)]
pub enum Up {
    /// On to the layer above.
    Pass,
    /// The layer keeps the IO and completes it later ([`LayerCtx::complete`]).
    Hold,
}

/// One layer of a volume's stack. Implementations run on the owning reactor's thread.
pub trait Layer: Send {
    /// Where in the IO path the layer stands.
    fn layer(&self) -> LayerName;
    /// What it does, for `fathom-ctl layers` (e.g. "stub", "inject").
    fn kind(&self) -> &'static str;
    /// A one-line description of its settings.
    fn describe(&self) -> String {
        self.kind().to_string()
    }
    /// An IO (slot `slot`) on its way down.
    fn submit(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, command: &IoCommand) -> Down;
    /// An IO this layer passed down completed below.
    fn complete(
        &mut self,
        _ctx: &mut LayerCtx<'_>,
        _slot: u32,
        _result: &mut Result<(), IoError>,
    ) -> Up {
        Up::Pass
    }
    /// A child IO this layer issued for `parent` completed below; its slot is freed after
    /// this call.
    fn child_done(
        &mut self,
        _ctx: &mut LayerCtx<'_>,
        _parent: u32,
        _child: u32,
        _result: Result<(), IoError>,
    ) {
    }
    /// IOs held now.
    fn holding(&self) -> usize {
        0
    }
    /// Called once per loop iteration while [`Layer::holding`] is non-zero: release or
    /// complete what is due. Returns whether it did anything.
    fn poll(&mut self, _ctx: &mut LayerCtx<'_>) -> bool {
        false
    }
    /// An IO of the layer's own ([`LayerCtx::issue_own`]) completed, with its buffer back.
    fn own_done(
        &mut self,
        _ctx: &mut LayerCtx<'_>,
        _tag: u64,
        _result: Result<(), IoError>,
        _buf: Option<DmaBuf>,
    ) {
    }
    /// The layer is leaving the stack: release or complete everything it holds.
    fn drain(&mut self, _ctx: &mut LayerCtx<'_>) {}
    /// Whether [`Layer::poll`] is called every loop iteration even while the layer holds
    /// nothing (a layer with sockets of its own: replication's peers).
    fn polled(&self) -> bool {
        false
    }
    /// A descriptor that turns readable when the layer has work (its sockets' epoll), so that
    /// an idle reactor sleeps until then rather than spinning for it.
    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// A layer that belongs to the volume itself rather than to its stub and injection
    /// settings (replication, with its sequences and peers): a change of those settings keeps
    /// it where it stands and rebuilds the rest around it.
    fn persistent(&self) -> bool {
        false
    }
}

/// A slot number meaning "none" (no parent).
pub(crate) const NO_SLOT: u32 = u32::MAX;
/// The parent of a layer's own IO ([`LayerCtx::issue_own`]): none, its layer takes it.
pub(crate) const OWN_SLOT: u32 = u32::MAX - 1;

/// An IO a layer issues for itself (replication's resync reads and bitmap writes): in LBAs of
/// the volume's namespace, anywhere in it (its metadata area included).
#[derive(Debug)]
pub struct OwnIo {
    pub op: Op,
    pub slba: u64,
    pub blocks: u32,
    pub fua: bool,
    /// Returned to [`Layer::own_done`] with the completion.
    pub tag: u64,
    /// A read's or a write's data, `blocks` long.
    pub buf: Option<DmaBuf>,
}

/// Work the reactor carries on after a layer call: IOs to take further down, IOs to take up.
pub(crate) struct LayerWork {
    /// (slot, depth): continue down from layer `depth` (the stack's length: the device queue).
    pub down: Vec<(u32, u8)>,
    /// (slot, depth, result): completed at `depth`; continue up from `depth - 1`.
    pub up: Vec<(u32, u8, Result<(), IoError>)>,
    /// Child IOs issued this call: (parent, command). Slots are given by the reactor.
    pub children: Vec<(u32, u8, IoCommand)>,
    /// Layers' own IOs issued this call: (volume, depth, IO).
    pub own: Vec<(u32, u8, OwnIo)>,
}

impl LayerWork {
    pub fn with_capacity(slots: usize) -> Self {
        Self {
            down: Vec::with_capacity(slots),
            up: Vec::with_capacity(slots),
            children: Vec::with_capacity(slots),
            own: Vec::with_capacity(slots),
        }
    }
}

/// What a layer may do while it is called: read the clock, see an IO's data, and hand IOs
/// on.
pub struct LayerCtx<'a> {
    pub(crate) clock: &'a Clock,
    /// The reactor's IO slots: a client's IO keeps its data buffer there.
    pub(crate) slots: &'a mut [crate::reactor::Slot],
    /// Per slot: whether the IO went below the layers (to a device queue).
    pub(crate) links: &'a [crate::reactor::Link],
    pub(crate) now: u64,
    pub(crate) depth: u8,
    /// The volume whose stack is being walked.
    pub(crate) volume: u32,
    /// On the way down: the IO came through a front end (a client's, not the node's own).
    pub(crate) from_frontend: bool,
    /// The reactor's telemetry, for stages a layer times itself.
    pub(crate) telemetry: Option<&'a mut crate::stats::CoreTelemetry>,
    /// Per slot (empty without telemetry): what a layered IO carries for its trace.
    pub(crate) layer_spans: &'a mut [crate::stats::LayerSpans],
    pub(crate) work: &'a mut LayerWork,
    /// Slots free for children (checked before a child is accepted).
    pub(crate) free_slots: usize,
}

impl LayerCtx<'_> {
    /// The clock layers measure time with, and its reading for this call.
    pub fn clock(&self) -> &Clock {
        self.clock
    }

    /// In [`Layer::submit`]: whether the IO came through a front end (NBD), as opposed to
    /// one from inside the node (a replica service's, a workload's, a layer's own).
    pub fn from_frontend(&self) -> bool {
        self.from_frontend
    }

    /// Records one IO of `op` on the volume that spent `ticks` in `stage` (an index from
    /// [`crate::engine::Engine::stage`]): a stage the layer times itself (replication's
    /// `replicate:NODE`). Nothing without telemetry.
    pub fn record(&mut self, op: Op, stage: usize, ticks: u64) {
        if let Some(telemetry) = self.telemetry.as_deref_mut() {
            telemetry.record(self.volume, op, stage, ticks, 1);
        }
    }

    /// The trace context for IO `slot` to carry to another node (a replica, the primary it
    /// is forwarded to): its trace id and its root span, the parent of the spans there. The
    /// IO keeps these ids: its own record, if it is traced here, joins the same trace. `None`
    /// while tracing is off. Not sampled: each node keeps spans by its own rules (head, tail,
    /// errors), and a reader joins them by trace id.
    pub fn trace_context(&mut self, slot: u32) -> Option<TraceContext> {
        let spans = self.layer_spans.get_mut(slot as usize)?;
        if spans.ids.trace_id.0 == 0 {
            let (trace_id, span) = self.telemetry.as_deref_mut()?.new_ids()?;
            spans.ids = crate::stats::TraceIds {
                trace_id,
                span,
                parent: SpanId(0),
            };
        }
        Some(TraceContext {
            trace_id: spans.ids.trace_id,
            parent: spans.ids.span,
            sampled: false,
        })
    }

    /// Clock ticks, read once per loop iteration for the layers.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The payload of write `slot` as its client handed it; `None` for any other IO (a
    /// read's buffer is the device's to fill) and for a child (its data is its parent's).
    pub fn data(&self, slot: u32) -> Option<&[u8]> {
        let slot = self.slots.get(slot as usize)?;
        // A device only reads a write's buffer, so the host may read it alongside, in flight
        // or not (the DMA crate's ownership rule keeps writers apart, not readers).
        match slot.op {
            Op::Write => Some(slot.buf.as_ref()?.as_bytes()),
            _ => None,
        }
    }

    /// The buffer of read `slot` that this layer holds, to fill with the data (a layer that
    /// answers reads itself: a forwarder). `None` for any other IO, or one that went below
    /// the layers (a device may be writing its buffer).
    pub fn read_buffer(&mut self, slot: u32) -> Option<&mut [u8]> {
        if self.links.get(slot as usize)?.below() {
            return None;
        }
        let slot = self.slots.get_mut(slot as usize)?;
        match slot.op {
            // Not below: no device holds it, and the layer that holds the IO is the only one
            // called now, so this is the buffer's one access.
            Op::Read => Some(slot.buf.as_mut()?.as_bytes_mut()),
            _ => None,
        }
    }

    /// Passes a held IO on to the layer below this one.
    pub fn release(&mut self, slot: u32) {
        self.work.down.push((slot, self.depth + 1));
    }

    /// Completes an IO this layer holds (on the way down or up): the layers above see it,
    /// once any children it issued for the IO are done.
    pub fn complete(&mut self, slot: u32, result: Result<(), IoError>) {
        self.work.up.push((slot, self.depth, result));
    }

    /// Issues an IO of the layer's own below it (no client's: a resync read, a metadata
    /// write); its completion and buffer come to [`Layer::own_done`]. `Busy` (with the IO
    /// back) when no slot is free: the layer retries later.
    pub fn issue_own(&mut self, io: OwnIo) -> Result<(), (IoError, OwnIo)> {
        if self.free_slots == 0 {
            return Err((IoError::Busy, io));
        }
        if io.blocks == 0 || (io.op != Op::Flush && io.op != Op::WriteZeroes && io.buf.is_none()) {
            let op = io.op;
            return Err((IoError::MissingBuffer { op }, io));
        }
        self.free_slots -= 1;
        self.work.own.push((self.volume, self.depth, io));
        Ok(())
    }

    /// Issues a child IO for `parent` below this layer; its completion comes to
    /// [`Layer::child_done`]. `Busy` when no slot is free: the layer retries later.
    pub fn issue(&mut self, parent: u32, command: IoCommand) -> Result<(), IoError> {
        if self.free_slots == 0 {
            return Err(IoError::Busy);
        }
        self.free_slots -= 1;
        self.work.children.push((parent, self.depth, command));
        Ok(())
    }
}

/// The loopback stub for a layer inside the engine: an IO completes at submission, successful,
/// without reaching anything below (for `queue`: the NVMe rings are never touched).
pub struct Stub {
    layer: LayerName,
}

impl Stub {
    pub fn new(layer: LayerName) -> Self {
        Self { layer }
    }
}

impl Layer for Stub {
    fn layer(&self) -> LayerName {
        self.layer
    }
    fn kind(&self) -> &'static str {
        "stub"
    }
    fn describe(&self) -> String {
        "stub: completes at submission".into()
    }
    #[inline]
    fn submit(&mut self, _ctx: &mut LayerCtx<'_>, _slot: u32, _command: &IoCommand) -> Down {
        Down::Complete(Ok(()))
    }
}

/// What stands in a volume's stack while it is removed ([`Engine::remove_volume`](crate::Engine::remove_volume)):
/// in the place of the volume's own persistent layer (replication), which lets go of what it
/// holds as when it is replaced; a client's IO that reaches it fails as for an unknown volume,
/// and the rest (the replaced layer's children, the node's own IO) goes on to the device.
pub(crate) struct Closed {
    pub volume: u32,
}

impl Layer for Closed {
    fn layer(&self) -> LayerName {
        LayerName::Replication
    }
    fn kind(&self) -> &'static str {
        "closed"
    }
    fn describe(&self) -> String {
        "closed: the volume is being removed".into()
    }
    fn submit(&mut self, ctx: &mut LayerCtx<'_>, _slot: u32, _command: &IoCommand) -> Down {
        match ctx.from_frontend() {
            true => Down::Complete(Err(IoError::UnknownVolume(self.volume))),
            // What the replaced layer issued (its children go on from the top of the new
            // stack) and the node's own IO: to the device, so that it completes where it
            // is awaited. The volume's range is still its own until the slot is free.
            false => Down::Pass,
        }
    }
    fn persistent(&self) -> bool {
        true
    }
}

/// Injection at a layer of the engine: the rules' latency holds an IO before it goes on down
/// (so the layer's own time grows by it), an error completes it at once, a stall holds it
/// until the layer leaves the stack (the rule is cleared).
pub struct Inject {
    layer: LayerName,
    rules: Vec<InjectRule>,
    injector: Injector,
    rng: Rng,
    /// (due, slot), in no order; bounded by the reactor's slots.
    delayed: Vec<(u64, u32)>,
    stalled: Vec<u32>,
}

impl Inject {
    /// `slots`: the most IOs the owning reactor can have, so holding never allocates.
    pub fn new(
        layer: LayerName,
        rules: Vec<InjectRule>,
        clock: &Clock,
        slots: usize,
        seed: u64,
    ) -> Self {
        Self {
            layer,
            injector: Injector::new(&rules, clock),
            rules,
            rng: Rng::new(seed),
            delayed: Vec::with_capacity(slots),
            stalled: Vec::with_capacity(slots),
        }
    }

    pub fn rules(&self) -> &[InjectRule] {
        &self.rules
    }
}

impl Layer for Inject {
    fn layer(&self) -> LayerName {
        self.layer
    }
    fn kind(&self) -> &'static str {
        "inject"
    }
    fn describe(&self) -> String {
        format!("inject: {} rule(s)", self.rules.len())
    }
    fn submit(&mut self, ctx: &mut LayerCtx<'_>, slot: u32, command: &IoCommand) -> Down {
        let class = match command.op {
            Op::Read => OpClass::Read,
            Op::Write | Op::WriteZeroes => OpClass::Write,
            Op::Flush => OpClass::Flush,
        };
        let (slba, blocks) = match command.op {
            Op::Flush => (0, u64::MAX),
            _ => (command.slba, command.blocks as u64),
        };
        let injected = self
            .injector
            .evaluate(class, slba, blocks, ctx.now(), &mut self.rng);
        if let Some(status) = injected.status {
            return Down::Complete(Err(IoError::Device {
                op: command.op,
                status,
            }));
        }
        if injected.stall {
            self.stalled.push(slot);
            return Down::Hold;
        }
        if injected.delay_ticks > 0 {
            self.delayed.push((ctx.now() + injected.delay_ticks, slot));
            return Down::Hold;
        }
        Down::Pass
    }
    fn holding(&self) -> usize {
        self.delayed.len() + self.stalled.len()
    }
    fn poll(&mut self, ctx: &mut LayerCtx<'_>) -> bool {
        let now = ctx.now();
        let before = self.delayed.len();
        let mut index = 0;
        while index < self.delayed.len() {
            let (due, slot) = self.delayed[index];
            if due <= now {
                ctx.release(slot);
                self.delayed.swap_remove(index);
            } else {
                index += 1;
            }
        }
        self.delayed.len() != before
    }
    fn drain(&mut self, ctx: &mut LayerCtx<'_>) {
        for (_, slot) in self.delayed.drain(..) {
            ctx.release(slot);
        }
        for slot in self.stalled.drain(..) {
            ctx.release(slot);
        }
    }
}
