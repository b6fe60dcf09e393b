//! The control protocol, sans-IO: versioned JSON lines.
//!
//! A client sends one JSON object per line (`\n` terminated) and gets one back per request,
//! in order:
//!
//! ```text
//! {"v":1,"id":7,"cmd":"layers","volume":"vol0"}
//! {"v":1,"id":7,"ok":true,"result":[...]}
//! {"v":1,"id":8,"ok":false,"error":{"code":"unknown_volume","message":"..."}}
//! ```
//!
//! `v` is required and must be [`VERSION`], so a newer client talking to an older node (or
//! the reverse) is told so instead of being half understood. `id` is optional and echoed back.
//! Arguments are checked against a per-command table before they reach the [`Request`]
//! type, so every refusal names the field and what it should be, and unknown fields are
//! refused: a typo (`"layr"`) is an error, not a silently ignored argument.
//!
//! Nothing here touches a socket: [`LineDecoder`] is fed bytes and hands out lines, the
//! `parse_*`/`encode_*` functions turn lines into values and back. The driver that owns the
//! socket is [`crate::server`] (and [`crate::client`] on the other side).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this crate speaks; requests and responses carry it as `"v"`.
pub const VERSION: u32 = 1;

/// Longest line accepted, in bytes, without its newline.
pub const MAX_LINE: usize = 64 * 1024;

/// Error code: the request could not be parsed or its arguments are wrong.
pub const BAD_REQUEST: &str = "bad_request";
/// Error code: no volume of that name.
pub const UNKNOWN_VOLUME: &str = "unknown_volume";
/// Error code: no device of that name.
pub const UNKNOWN_DEVICE: &str = "unknown_device";
/// Error code: no layer of that name, or not one the target has.
pub const UNKNOWN_LAYER: &str = "unknown_layer";
/// Error code: the node understood the request but cannot do it (driver, build, config).
pub const UNSUPPORTED: &str = "unsupported";
/// Error code: an injection rule the node refuses.
pub const BAD_RULE: &str = "bad_rule";
/// Error code: the node (or the target) is busy: too many connections, a run in progress.
pub const BUSY: &str = "busy";
/// Error code: the node failed while handling the request.
pub const INTERNAL: &str = "internal";

/// Every command, in the order they are documented.
pub const COMMANDS: &[&str] = &[
    "hello",
    "volumes",
    "devices",
    "layers",
    "stub_set",
    "stub_clear",
    "inject_add",
    "inject_list",
    "inject_clear",
    "run",
    "trace_show",
    "trace_set",
    "replication",
    "promote",
    "reparent",
    "partition",
    "health",
    "health_advise",
];

/// The layers of a volume's IO path, top to bottom. A volume has `frontend`, `engine` and
/// `queue`; a device has `device` and `media`.
pub const LAYERS: &[&str] = &[
    "frontend",
    "engine",
    "replication",
    "queue",
    "device",
    "media",
];

/// Why a line is not a valid request (or response).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("request line is longer than {limit} bytes and was discarded up to its newline: send one JSON object of at most {limit} bytes per line")]
    TooLong { limit: usize },
    #[error("request line is not UTF-8 (invalid byte at offset {valid_up_to}): send JSON text, one object per line")]
    NotUtf8 { valid_up_to: usize },
    #[error("request is not JSON: {reason} at column {column}; send one JSON object per line, e.g. {{\"v\":1,\"cmd\":\"hello\"}}")]
    NotJson { column: usize, reason: String },
    #[error("request is {found}, not a JSON object: send one object per line, e.g. {{\"v\":1,\"cmd\":\"hello\"}}")]
    NotObject { found: String },
    #[error("request has no \"v\": this node speaks control protocol version {VERSION}; add \"v\":{VERSION}")]
    MissingVersion,
    #[error("this node speaks control protocol version {VERSION}; request had v={found}")]
    WrongVersion { found: String },
    #[error("request \"id\" is {found}: an id is a whole number (0 to 2^64-1) that the answer echoes; or leave it out")]
    BadId { found: String },
    #[error("request has no \"cmd\": name one of {}", COMMANDS.join(", "))]
    MissingCommand,
    #[error("request \"cmd\" is {found}, not a string: name one of {}", COMMANDS.join(", "))]
    BadCommand { found: String },
    #[error("unknown command {cmd:?}: this node knows {}", COMMANDS.join(", "))]
    UnknownCommand { cmd: String },
    #[error("{cmd}: unknown field {field:?}; {cmd} takes {allowed}")]
    UnknownField {
        cmd: &'static str,
        field: String,
        allowed: String,
    },
    #[error("{cmd}: missing field \"{field}\": give {expected}")]
    MissingField {
        cmd: &'static str,
        field: &'static str,
        expected: &'static str,
    },
    #[error("{cmd}: field \"{field}\" is {found}: give {expected}")]
    BadField {
        cmd: &'static str,
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{cmd}: {reason}")]
    Invalid { cmd: &'static str, reason: String },
    #[error("the node's answer is malformed: {reason}")]
    BadResponse { reason: String },
}

/// An error answer: a machine-readable code (one of the `pub const` codes above) and a
/// message for the operator that says what was wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub code: String,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

impl From<ProtoError> for RemoteError {
    fn from(error: ProtoError) -> Self {
        RemoteError::new(BAD_REQUEST, error.to_string())
    }
}

/// A request. On the wire the variant is `"cmd"` in snake_case and the fields sit beside it.
/// Each variant's comment says what the node answers with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The node's identity. Answer: [`Hello`].
    Hello,
    /// Answer: `Vec<`[`VolumeRow`]`>`.
    Volumes,
    /// Answer: `Vec<`[`DeviceRow`]`>`.
    Devices,
    /// Each layer of one volume's IO path (or of every volume's). Answer: `Vec<`[`LayerRow`]`>`.
    Layers {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// Completes IOs at `layer` without going further down (a stub). Answer: the layer's
    /// [`LayerRow`].
    StubSet { volume: String, layer: String },
    /// Passes IOs through `layer` again. Answer: the layer's [`LayerRow`].
    StubClear { volume: String, layer: String },
    /// Adds an injection rule at `layer` of `target` (a volume: frontend, engine or queue; a
    /// device: device (the default) or media). `rule` is the config's `[[device.inject]]`
    /// table as a JSON object; the node parses and validates it. Answer: the installed
    /// [`RuleRow`].
    InjectAdd {
        target: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<String>,
        rule: Value,
    },
    /// Rules of one target (or of all). Answer: `Vec<`[`RuleRow`]`>`.
    InjectList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    /// Removes the rules at `layer` of `target` (every layer when absent); stalled commands
    /// are released. Answer: [`Cleared`].
    InjectClear {
        target: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<String>,
    },
    /// A workload run inside the node on the volume's reactor (the frontend stub), fio-like.
    /// Answer: [`RunResult`].
    Run {
        volume: String,
        rw: String,
        bs: u64,
        iodepth: u32,
        runtime_ms: u64,
        ramp_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rwmixread: Option<u32>,
    },
    /// Which IOs of one volume (or of every volume) are traced. Answer:
    /// `Vec<`[`TraceRow`]`>`.
    TraceShow {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// Changes the head rate, the tail threshold or both, of one volume or of every volume
    /// (no `volume`); at least one of `rate` and `tail` is given. `tail` is a duration
    /// (`"2ms"`), `"p99.9"` or `"off"`; the node parses it. Answer: the changed volumes'
    /// `Vec<`[`TraceRow`]`>`.
    TraceSet {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<String>,
    },
    /// The replicated volumes this node holds a copy of (or one of them): role, epoch, and
    /// on the primary each replica's session and how far behind it is. Answer:
    /// `Vec<`[`ReplicationRow`]`>`.
    Replication {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// Makes this node (a replica of `volume`) the primary, when the primary is gone: the
    /// next epoch on a majority, the survivors reconciled. Refused for a copy not known to
    /// be in sync unless `force`. Answer: [`PromoteResult`].
    Promote {
        volume: String,
        #[serde(default)]
        force: bool,
    },
    /// Hands `volume`, whose primary this node is, over to the in-sync replica on node `to`:
    /// new IO pauses, what is in flight is answered, `to` takes the next epoch on a majority
    /// and this node becomes a replica that forwards its clients' IO (paused IO included) to
    /// it. Answer: [`ReparentResult`].
    Reparent { volume: String, to: String },
    /// The partition switch, for tests and drills: `"on"` cuts this node off from its peers
    /// (replication sessions both ways) and from etcd, as a network partition would, `"etcd"`
    /// from etcd only, `"off"` heals it; its NBD clients stay connected. Answer:
    /// `{"partition": state}`.
    Partition { state: String },
    /// Each volume's health (or one volume's): its state and why, the detector's inputs of
    /// the last second, its canary and the clients' drift. Answer: the node's health status
    /// (`fathom::health::monitor::NodeHealth`).
    Health {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// Makes `volume`'s health actions advise-only (`advise`: log what would be done, do
    /// nothing) or lets them act again. Answer: `{"volume": name, "advise": advise}`.
    HealthAdvise { volume: String, advise: bool },
}

impl Request {
    /// The command's wire name (`"stub_set"`).
    pub fn command(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Volumes => "volumes",
            Request::Devices => "devices",
            Request::Layers { .. } => "layers",
            Request::StubSet { .. } => "stub_set",
            Request::StubClear { .. } => "stub_clear",
            Request::InjectAdd { .. } => "inject_add",
            Request::InjectList { .. } => "inject_list",
            Request::InjectClear { .. } => "inject_clear",
            Request::Run { .. } => "run",
            Request::TraceShow { .. } => "trace_show",
            Request::TraceSet { .. } => "trace_set",
            Request::Replication { .. } => "replication",
            Request::Promote { .. } => "promote",
            Request::Reparent { .. } => "reparent",
            Request::Partition { .. } => "partition",
            Request::Health { .. } => "health",
            Request::HealthAdvise { .. } => "health_advise",
        }
    }

    /// What the per-field table cannot say: fields that only make sense together.
    fn check(&self) -> Result<(), String> {
        match self {
            Request::TraceSet {
                rate: None,
                tail: None,
                ..
            } => Err(format!(
                "nothing to change: give \"rate\" (one IO in rate is traced, 0 for none: {}), \"tail\" (every IO slower is traced: {}), or both",
                Kind::U32.expected(),
                Kind::Tail.expected()
            )),
            _ => Ok(()),
        }
    }
}

/// Answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The control protocol version, [`VERSION`].
    pub version: u32,
    pub node_id: String,
    pub pid: u32,
    /// The shared-memory telemetry region (`/dev/shm/...`), when telemetry is on.
    pub region: Option<String>,
    pub data_dir: String,
}

/// One row of `volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRow {
    pub name: String,
    pub device: String,
    pub nsid: u64,
    pub first_lba: u64,
    pub blocks: u64,
    pub block_size: u64,
    pub size_bytes: u64,
    /// The core of the reactor that owns the volume.
    pub core: u64,
    /// Layers currently stubbed.
    pub stubs: Vec<String>,
    /// Run-time injection rules on the volume's layers.
    pub rules: usize,
}

/// One namespace of a [`DeviceRow`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRow {
    pub nsid: u64,
    pub blocks: u64,
    pub block_size: u64,
}

/// One row of `devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRow {
    pub name: String,
    pub driver: String,
    pub model: String,
    pub serial: String,
    pub namespaces: Vec<NamespaceRow>,
    pub max_transfer_bytes: u64,
    pub queue_depth: u32,
    /// Run-time injection rules on the device's layers.
    pub rules: usize,
}

/// One layer of a volume's IO path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRow {
    pub volume: String,
    pub layer: String,
    /// `"pass"`, `"stub"` or `"inject"`.
    pub state: String,
    /// Free text for the operator (e.g. "2 rules").
    pub detail: String,
}

/// One injection rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleRow {
    pub target: String,
    pub layer: String,
    /// Position among the rules at this target and layer (they apply in order).
    pub index: usize,
    /// The rule table as JSON.
    pub rule: Value,
}

/// Answer to `inject_clear`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cleared {
    /// How many rules were removed.
    pub cleared: usize,
}

/// One volume's trace sampling: `trace_show` and `trace_set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRow {
    pub volume: String,
    /// Head sampling: one IO in `rate` is traced (0: none).
    pub rate: u32,
    /// Tail sampling as set: a duration (`"1ms"`, `"500us"`), `"p99.9"` or `"off"`.
    pub tail: String,
    /// Per op name (`read`, `write`, ...): the tail threshold in force, in nanoseconds;
    /// `null` when no IO of that op is tail-sampled (tail off, or a p99.9 not learned yet).
    pub thresholds_ns: BTreeMap<String, Option<u64>>,
}

/// One replicated volume on this node: `replication`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationRow {
    pub volume: String,
    /// `primary` or `replica`.
    pub role: String,
    pub epoch: u64,
    /// The primary's node id.
    pub primary: String,
    /// The primary: the last write sequence it began. A replica: the highest it applied
    /// with none missing below.
    pub sequence: u64,
    /// The primary learned that another node took the volume over (a newer epoch): it
    /// fails every write.
    pub fenced: bool,
    /// A replica: its primary said it lacks nothing (it may be promoted). The primary:
    /// whether it serves (a majority took its epoch).
    pub in_sync: bool,
    /// On the primary: one per replica.
    pub peers: Vec<PeerRow>,
    /// On the primary: the resync rate in force, bytes per second (0: no limit); with
    /// `replication.resync_p99` it follows the clients' write p99.
    #[serde(default)]
    pub resync_rate: u64,
    /// On the primary with `replication.resync_p99`: the client write p99 (µs) of the last
    /// 100 ms window a resync ran in.
    #[serde(default)]
    pub resync_client_p99_us: u64,
}

/// A replica's session, as its primary sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub node: String,
    /// `open`, `connecting` or `down`.
    pub state: String,
    /// It holds every write up to what it reported durable: it counts for flushes.
    pub in_sync: bool,
    /// The highest write sequence it acknowledged.
    pub acknowledged: u64,
    /// Bytes in the regions it may lack (to be caught up).
    pub dirty_bytes: u64,
    /// Of them, bytes in regions it missed writes to while away (or all, for a new copy):
    /// what its resync has left to copy.
    pub resync_left_bytes: u64,
    /// Bytes resynced to it since the primary started.
    pub resynced_bytes: u64,
}

/// Answer to `promote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromoteResult {
    pub volume: String,
    pub epoch: u64,
    /// The copies that took the epoch, this node first.
    pub survivors: Vec<String>,
    /// Regions copied here from a survivor that had them newer, and their bytes.
    pub regions_copied: u64,
    pub bytes_copied: u64,
    /// Per other copy: the regions it is behind in (resynchronised from here).
    pub behind: Vec<(String, u64)>,
}

/// Answer to `reparent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReparentResult {
    pub volume: String,
    pub from: String,
    pub to: String,
    /// The new primary's epoch.
    pub epoch: u64,
    /// The old primary's last write sequence.
    pub sequence: u64,
    /// From the pause of new IO until this node served as a replica.
    pub paused_us: u64,
}

/// Answer to `run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    pub volume: String,
    pub core: usize,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Measured time, after the ramp.
    pub elapsed_ns: u64,
    /// CPU time of the reactor thread over the measured time.
    pub cpu_ns: u64,
    /// IOs that had to wait (for a queue slot, a buffer, a stalled or delayed layer).
    pub waited_ios: u64,
    /// Total time those IOs waited.
    pub wait_ns: u64,
}

// ---------------------------------------------------------------------------------------
// Lines

/// Splits a byte stream into lines, with a bounded buffer.
///
/// Feed it with [`push`](Self::push) and take lines with [`next_line`](Self::next_line) until
/// it returns `None`, after every push: then the buffer holds at most the limit plus one
/// push. A line longer than the limit gives one [`ProtoError::TooLong`] and everything up to
/// its next newline is dropped unread; a line that is not UTF-8 gives
/// [`ProtoError::NotUtf8`]. Lines come out without their `\n` (a `\r` before it is kept;
/// JSON treats it as whitespace).
#[derive(Debug)]
pub struct LineDecoder {
    buffer: Vec<u8>,
    /// Where the next line starts in `buffer`.
    start: usize,
    /// `buffer[..scanned]` holds no newline after `start`: a later search starts here, so a
    /// long line arriving in small pieces is scanned once, not once per piece.
    scanned: usize,
    /// Dropping bytes up to the next newline (the rest of a line that was too long).
    discarding: bool,
    limit: usize,
}

impl Default for LineDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl LineDecoder {
    /// A decoder for lines of at most [`MAX_LINE`] bytes.
    pub fn new() -> Self {
        Self::with_limit(MAX_LINE)
    }

    /// A decoder for lines of at most `limit` bytes (without the newline).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buffer: Vec::new(),
            start: 0,
            scanned: 0,
            discarding: false,
            limit,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.discarding {
            match bytes.iter().position(|&byte| byte == b'\n') {
                Some(newline) => {
                    bytes = &bytes[newline + 1..];
                    self.discarding = false;
                }
                None => return,
            }
        }
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete line, an error for a line that is too long or not UTF-8, or `None`
    /// when more bytes are needed.
    pub fn next_line(&mut self) -> Option<Result<String, ProtoError>> {
        debug_assert!(self.start <= self.scanned && self.scanned <= self.buffer.len());
        match self.buffer[self.scanned..]
            .iter()
            .position(|&byte| byte == b'\n')
        {
            Some(offset) => {
                let newline = self.scanned + offset;
                let line = &self.buffer[self.start..newline];
                self.start = newline + 1;
                self.scanned = self.start;
                if line.len() > self.limit {
                    return Some(Err(ProtoError::TooLong { limit: self.limit }));
                }
                Some(
                    std::str::from_utf8(line)
                        .map(str::to_string)
                        .map_err(|error| ProtoError::NotUtf8 {
                            valid_up_to: error.valid_up_to(),
                        }),
                )
            }
            None if self.buffer.len() - self.start > self.limit => {
                self.buffer.clear();
                self.start = 0;
                self.scanned = 0;
                self.discarding = true;
                Some(Err(ProtoError::TooLong { limit: self.limit }))
            }
            None => {
                // Keep only the partial line, so that between pushes at most `limit` bytes
                // are held.
                self.buffer.drain(..self.start);
                self.start = 0;
                self.scanned = self.buffer.len();
                None
            }
        }
    }

    /// Bytes held: at most the limit after `next_line` returned `None`.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

// ---------------------------------------------------------------------------------------
// Requests

#[derive(Clone, Copy)]
enum Kind {
    Text,
    U64,
    U32,
    Object,
    /// A tail-sampling threshold, as text (the node parses it).
    Tail,
    Bool,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Text => "a string",
            Kind::Bool => "true or false",
            Kind::U64 => "a whole number, 0 to 18446744073709551615",
            Kind::U32 => "a whole number, 0 to 4294967295",
            Kind::Object => {
                "a JSON object (an injection rule table, e.g. {\"ops\":[\"read\"],\"latency\":\"50us\"})"
            }
            Kind::Tail => {
                "a string: a duration with its unit (\"2ms\", \"500us\"), \"p99.9\" (the volume's own, per op) or \"off\""
            }
        }
    }

    fn accepts(self, value: &Value) -> bool {
        match self {
            Kind::Text | Kind::Tail => value.is_string(),
            Kind::U64 => value.is_u64(),
            Kind::U32 => value.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)),
            Kind::Object => value.is_object(),
            Kind::Bool => value.is_boolean(),
        }
    }
}

struct Field {
    name: &'static str,
    kind: Kind,
    required: bool,
}

const fn required(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: true,
    }
}

const fn optional(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: false,
    }
}

/// Each command's arguments, checked before deserializing so that every refusal can name
/// the field (serde's own messages do not say which field had the wrong type).
const SCHEMA: &[(&str, &[Field])] = &[
    ("hello", &[]),
    ("volumes", &[]),
    ("devices", &[]),
    ("layers", &[optional("volume", Kind::Text)]),
    (
        "stub_set",
        &[
            required("volume", Kind::Text),
            required("layer", Kind::Text),
        ],
    ),
    (
        "stub_clear",
        &[
            required("volume", Kind::Text),
            required("layer", Kind::Text),
        ],
    ),
    (
        "inject_add",
        &[
            required("target", Kind::Text),
            optional("layer", Kind::Text),
            required("rule", Kind::Object),
        ],
    ),
    ("inject_list", &[optional("target", Kind::Text)]),
    (
        "inject_clear",
        &[
            required("target", Kind::Text),
            optional("layer", Kind::Text),
        ],
    ),
    (
        "run",
        &[
            required("volume", Kind::Text),
            required("rw", Kind::Text),
            required("bs", Kind::U64),
            required("iodepth", Kind::U32),
            required("runtime_ms", Kind::U64),
            required("ramp_ms", Kind::U64),
            optional("size", Kind::U64),
            optional("seed", Kind::U64),
            optional("rwmixread", Kind::U32),
        ],
    ),
    ("trace_show", &[optional("volume", Kind::Text)]),
    (
        "trace_set",
        &[
            optional("volume", Kind::Text),
            optional("rate", Kind::U32),
            optional("tail", Kind::Tail),
        ],
    ),
    ("replication", &[optional("volume", Kind::Text)]),
    (
        "promote",
        &[
            required("volume", Kind::Text),
            optional("force", Kind::Bool),
        ],
    ),
    (
        "reparent",
        &[required("volume", Kind::Text), required("to", Kind::Text)],
    ),
    ("partition", &[required("state", Kind::Text)]),
    ("health", &[optional("volume", Kind::Text)]),
    (
        "health_advise",
        &[
            required("volume", Kind::Text),
            required("advise", Kind::Bool),
        ],
    ),
];

/// How a JSON value is described in an error: its type and, when short, the value.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(s) => {
            let head: String = s.chars().take(40).collect();
            format!("the string {head:?}...")
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// serde_json's message without its " at line L column C" (the caller says where).
fn json_reason(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Parses one request line (with or without its newline).
pub fn parse_request(line: &str) -> Result<(Option<u64>, Request), ProtoError> {
    let value: Value = serde_json::from_str(line).map_err(|error| ProtoError::NotJson {
        column: error.column(),
        reason: json_reason(&error),
    })?;
    let Value::Object(mut object) = value else {
        return Err(ProtoError::NotObject {
            found: describe(&value),
        });
    };
    match object.remove("v") {
        None => return Err(ProtoError::MissingVersion),
        Some(v) if v.as_u64() == Some(u64::from(VERSION)) => {}
        Some(v) => {
            return Err(ProtoError::WrongVersion {
                found: v.to_string(),
            })
        }
    }
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.is_u64() => n.as_u64(),
        Some(other) => {
            return Err(ProtoError::BadId {
                found: describe(&other),
            })
        }
    };
    let (cmd, fields) = match object.get("cmd") {
        None => return Err(ProtoError::MissingCommand),
        Some(Value::String(cmd)) => SCHEMA
            .iter()
            .find(|(name, _)| name == cmd)
            .copied()
            .ok_or_else(|| ProtoError::UnknownCommand { cmd: cmd.clone() })?,
        Some(other) => {
            return Err(ProtoError::BadCommand {
                found: describe(other),
            })
        }
    };
    for key in object.keys() {
        if key != "cmd" && !fields.iter().any(|field| field.name == key) {
            let allowed = if fields.is_empty() {
                "no arguments".to_string()
            } else {
                fields
                    .iter()
                    .map(|field| field.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(ProtoError::UnknownField {
                cmd,
                field: key.clone(),
                allowed,
            });
        }
    }
    for field in fields {
        match object.get(field.name) {
            None if field.required => {
                return Err(ProtoError::MissingField {
                    cmd,
                    field: field.name,
                    expected: field.kind.expected(),
                })
            }
            None => {}
            Some(Value::Null) if !field.required => {}
            Some(value) if field.kind.accepts(value) => {}
            Some(value) => {
                return Err(ProtoError::BadField {
                    cmd,
                    field: field.name,
                    expected: field.kind.expected(),
                    found: describe(value),
                })
            }
        }
    }
    // The table above matches the enum (a test checks it), so this only fails on a bug.
    let request =
        Request::deserialize(Value::Object(object)).map_err(|error| ProtoError::Invalid {
            cmd,
            reason: json_reason(&error),
        })?;
    request
        .check()
        .map_err(|reason| ProtoError::Invalid { cmd, reason })?;
    Ok((id, request))
}

/// The request's id if the line has a usable one, whatever else is wrong with it: so an
/// error answer to a bad request can still carry the id the client sent.
pub fn peek_id(line: &str) -> Option<u64> {
    serde_json::from_str::<Value>(line)
        .ok()?
        .get("id")?
        .as_u64()
}

fn envelope(id: Option<u64>) -> String {
    match id {
        Some(id) => format!("{{\"v\":{VERSION},\"id\":{id},"),
        None => format!("{{\"v\":{VERSION},"),
    }
}

/// The line (newline included) that sends `request`.
pub fn encode_request(id: Option<u64>, request: &Request) -> String {
    // A Request is plain strings, numbers and a JSON value: it always serializes.
    let body = serde_json::to_string(request).expect("a Request serializes to JSON");
    // `body` is `{"cmd":...}`: splice the envelope in front of its fields.
    let fields = body.strip_prefix('{').expect("a Request is a JSON object");
    format!("{}{fields}\n", envelope(id))
}

/// The line (newline included) that answers with `result`.
pub fn encode_ok(id: Option<u64>, result: &impl Serialize) -> String {
    match serde_json::to_string(result) {
        Ok(json) => format!("{}\"ok\":true,\"result\":{json}}}\n", envelope(id)),
        Err(error) => encode_error(
            id,
            INTERNAL,
            &format!("the node could not encode its answer as JSON ({error}): report this"),
        ),
    }
}

/// The line (newline included) that answers with an error.
pub fn encode_error(id: Option<u64>, code: &str, message: &str) -> String {
    let error = serde_json::json!({ "code": code, "message": message });
    format!("{}\"ok\":false,\"error\":{error}}}\n", envelope(id))
}

fn bad_response(reason: impl Into<String>) -> ProtoError {
    ProtoError::BadResponse {
        reason: reason.into(),
    }
}

/// Parses one response line: its id and either the result or the node's error.
pub fn parse_response(line: &str) -> Result<(Option<u64>, Result<Value, RemoteError>), ProtoError> {
    let value: Value = serde_json::from_str(line).map_err(|error| {
        bad_response(format!(
            "not JSON: {} at column {}",
            json_reason(&error),
            error.column()
        ))
    })?;
    let Value::Object(mut object) = value else {
        return Err(bad_response(format!(
            "{}, not a JSON object",
            describe(&value)
        )));
    };
    match object.get("v") {
        Some(v) if v.as_u64() == Some(u64::from(VERSION)) => {}
        Some(v) => {
            return Err(bad_response(format!(
                "the node speaks control protocol version {v}, this client {VERSION}: use the fathom-ctl that comes with the node"
            )))
        }
        None => return Err(bad_response("no \"v\" (protocol version)")),
    }
    let id = match object.get("id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| bad_response(format!("\"id\" is {}", describe(v))))?,
        ),
    };
    match object.get("ok") {
        Some(Value::Bool(true)) => Ok((id, Ok(object.remove("result").unwrap_or(Value::Null)))),
        Some(Value::Bool(false)) => {
            let error = object
                .remove("error")
                .ok_or_else(|| bad_response("\"ok\":false without an \"error\""))?;
            let error = remote_error(error)?;
            Ok((id, Err(error)))
        }
        Some(other) => Err(bad_response(format!(
            "\"ok\" is {}, not a boolean",
            describe(other)
        ))),
        None => Err(bad_response("no \"ok\"")),
    }
}

fn remote_error(value: Value) -> Result<RemoteError, ProtoError> {
    let Value::Object(mut object): Value = value else {
        return Err(bad_response("\"error\" is not an object"));
    };
    let mut text = |name: &str| match object.remove(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(bad_response(format!(
            "\"error\".\"{name}\" is {}, not a string",
            describe(&other)
        ))),
        None => Err(bad_response(format!("\"error\" has no \"{name}\""))),
    };
    Ok(RemoteError {
        code: text("code")?,
        message: text("message")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn error(line: &str) -> ProtoError {
        parse_request(line).expect_err(line)
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hello,
            Request::Volumes,
            Request::Devices,
            Request::Layers { volume: None },
            Request::Layers {
                volume: Some("vol0".into()),
            },
            Request::StubSet {
                volume: "vol0".into(),
                layer: "engine".into(),
            },
            Request::StubClear {
                volume: "vol0".into(),
                layer: "queue".into(),
            },
            Request::InjectAdd {
                target: "nvme0".into(),
                layer: Some("media".into()),
                rule: json!({"ops":["read"],"fraction":1.0,"latency":"fixed(50us)"}),
            },
            Request::InjectAdd {
                target: "vol0".into(),
                layer: None,
                rule: json!({"stall": true}),
            },
            Request::InjectList { target: None },
            Request::InjectList {
                target: Some("vol0".into()),
            },
            Request::InjectClear {
                target: "vol0".into(),
                layer: Some("engine".into()),
            },
            Request::Run {
                volume: "vol0".into(),
                rw: "randread".into(),
                bs: 4096,
                iodepth: 32,
                runtime_ms: 5000,
                ramp_ms: 1000,
                size: Some(1 << 30),
                seed: Some(u64::MAX),
                rwmixread: Some(70),
            },
            Request::Run {
                volume: "vol0".into(),
                rw: "write".into(),
                bs: 1 << 20,
                iodepth: 1,
                runtime_ms: 0,
                ramp_ms: 0,
                size: None,
                seed: None,
                rwmixread: None,
            },
            Request::TraceShow { volume: None },
            Request::TraceShow {
                volume: Some("vol0".into()),
            },
            Request::TraceSet {
                volume: None,
                rate: Some(u32::MAX),
                tail: None,
            },
            Request::TraceSet {
                volume: Some("vol0".into()),
                rate: Some(0),
                tail: Some("500us".into()),
            },
            Request::TraceSet {
                volume: None,
                rate: None,
                tail: Some("p99.9".into()),
            },
            Request::Replication { volume: None },
            Request::Replication {
                volume: Some("vol0".into()),
            },
            Request::Promote {
                volume: "vol0".into(),
                force: false,
            },
            Request::Promote {
                volume: "vol0".into(),
                force: true,
            },
            Request::Reparent {
                volume: "vol0".into(),
                to: "b".into(),
            },
            Request::Partition { state: "on".into() },
            Request::Health { volume: None },
            Request::Health {
                volume: Some("vol0".into()),
            },
            Request::HealthAdvise {
                volume: "vol0".into(),
                advise: true,
            },
            Request::Partition {
                state: "off".into(),
            },
        ]
    }

    #[test]
    fn every_request_round_trips_and_the_schema_matches_the_enum() {
        let mut seen = Vec::new();
        for (id, request) in all_requests().into_iter().enumerate() {
            let id = Some(id as u64);
            let line = encode_request(id, &request);
            assert!(
                line.ends_with('\n') && line.starts_with("{\"v\":1,"),
                "{line}"
            );
            assert_eq!(
                parse_request(&line).unwrap(),
                (id, request.clone()),
                "{line}"
            );
            assert_eq!(parse_request(line.trim_end()).unwrap().1, request);
            seen.push(request.command());
        }
        let names: Vec<&str> = SCHEMA.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, COMMANDS);
        for command in COMMANDS {
            assert!(seen.contains(command), "no round trip test for {command}");
        }
        let (id, request) = parse_request(r#"{"v":1,"cmd":"volumes"}"#).unwrap();
        assert_eq!((id, request), (None, Request::Volumes));
        let (id, _) = parse_request(r#"{"v":1,"id":null,"cmd":"volumes"}"#).unwrap();
        assert_eq!(id, None);
        // Optional fields may be null.
        let (_, request) = parse_request(r#"{"v":1,"cmd":"layers","volume":null}"#).unwrap();
        assert_eq!(request, Request::Layers { volume: None });
    }

    #[test]
    fn not_json_says_where() {
        let e = error(r#"{"v":1,"cmd":"hello""#);
        assert!(matches!(e, ProtoError::NotJson { column: 20, .. }), "{e:?}");
        let text = error("hello").to_string();
        assert!(
            text.contains("not JSON") && text.contains("column 1"),
            "{text}"
        );
        let text = error("").to_string();
        assert!(text.contains("not JSON"), "{text}");
    }

    #[test]
    fn not_an_object() {
        for (line, found) in [
            ("[1,2]", "an array"),
            ("42", "the number 42"),
            ("\"hello\"", "the string \"hello\""),
            ("null", "null"),
        ] {
            let text = error(line).to_string();
            assert!(
                text.contains(found) && text.contains("not a JSON object"),
                "{text}"
            );
        }
    }

    #[test]
    fn version_is_required_and_must_be_ours() {
        assert_eq!(error(r#"{"cmd":"hello"}"#), ProtoError::MissingVersion);
        assert!(error(r#"{"cmd":"hello"}"#).to_string().contains("\"v\":1"));
        assert_eq!(
            error(r#"{"v":2,"cmd":"hello"}"#).to_string(),
            "this node speaks control protocol version 1; request had v=2"
        );
        assert!(error(r#"{"v":"1","cmd":"hello"}"#)
            .to_string()
            .contains("request had v=\"1\""));
        assert!(matches!(
            error(r#"{"v":1.0,"cmd":"hello"}"#),
            ProtoError::WrongVersion { .. }
        ));
    }

    #[test]
    fn id_must_be_a_whole_number() {
        for line in [
            r#"{"v":1,"id":-1,"cmd":"hello"}"#,
            r#"{"v":1,"id":"7","cmd":"hello"}"#,
            r#"{"v":1,"id":1.5,"cmd":"hello"}"#,
        ] {
            assert!(matches!(error(line), ProtoError::BadId { .. }), "{line}");
        }
        assert_eq!(peek_id(r#"{"v":9,"id":7,"cmd":"nope"}"#), Some(7));
        assert_eq!(peek_id("garbage"), None);
        assert_eq!(peek_id(r#"{"id":"7"}"#), None);
    }

    #[test]
    fn unknown_or_missing_command_lists_the_known_ones() {
        let text = error(r#"{"v":1,"cmd":"reboot"}"#).to_string();
        assert!(text.contains("unknown command \"reboot\""), "{text}");
        for command in COMMANDS {
            assert!(text.contains(command), "{text}");
        }
        let text = error(r#"{"v":1}"#).to_string();
        assert!(
            text.contains("no \"cmd\"") && text.contains("inject_add"),
            "{text}"
        );
        let text = error(r#"{"v":1,"cmd":7}"#).to_string();
        assert!(text.contains("not a string"), "{text}");
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let e = error(r#"{"v":1,"cmd":"stub_set","volume":"vol0"}"#);
        assert_eq!(
            e,
            ProtoError::MissingField {
                cmd: "stub_set",
                field: "layer",
                expected: "a string"
            }
        );
        assert_eq!(
            e.to_string(),
            "stub_set: missing field \"layer\": give a string"
        );
        let text = error(r#"{"v":1,"cmd":"run","volume":"v","rw":"read","bs":"4k","iodepth":1,"runtime_ms":1,"ramp_ms":0}"#).to_string();
        assert!(
            text.contains("field \"bs\" is the string \"4k\"") && text.contains("whole number"),
            "{text}"
        );
        let text = error(r#"{"v":1,"cmd":"run","volume":"v","rw":"read","bs":4096,"iodepth":4294967296,"runtime_ms":1,"ramp_ms":0}"#).to_string();
        assert!(
            text.contains("\"iodepth\"") && text.contains("4294967295"),
            "{text}"
        );
        let text = error(r#"{"v":1,"cmd":"run","volume":"v","rw":"read","bs":-1,"iodepth":1,"runtime_ms":1,"ramp_ms":0}"#).to_string();
        assert!(text.contains("\"bs\" is the number -1"), "{text}");
        let text = error(r#"{"v":1,"cmd":"inject_add","target":"nvme0","rule":"latency=50us"}"#)
            .to_string();
        assert!(
            text.contains("\"rule\"") && text.contains("JSON object"),
            "{text}"
        );
        let text = error(r#"{"v":1,"cmd":"stub_set","volume":null,"layer":"engine"}"#).to_string();
        assert!(text.contains("\"volume\" is null"), "{text}");
        let text = error(r#"{"v":1,"cmd":"layers","volume":7}"#).to_string();
        assert!(text.contains("\"volume\" is the number 7"), "{text}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = error(r#"{"v":1,"cmd":"stub_set","volume":"vol0","layr":"engine"}"#).to_string();
        assert_eq!(
            text,
            "stub_set: unknown field \"layr\"; stub_set takes volume, layer"
        );
        let text = error(r#"{"v":1,"cmd":"hello","verbose":true}"#).to_string();
        assert!(text.contains("hello takes no arguments"), "{text}");
    }

    #[test]
    fn trace_set_refuses_bad_values_and_an_empty_change() {
        // Neither rate nor tail (absent or null) would change nothing: refused, and the
        // message says what may be given.
        for line in [
            r#"{"v":1,"cmd":"trace_set"}"#,
            r#"{"v":1,"cmd":"trace_set","volume":"vol0"}"#,
            r#"{"v":1,"cmd":"trace_set","rate":null,"tail":null}"#,
        ] {
            let e = error(line);
            assert!(
                matches!(
                    e,
                    ProtoError::Invalid {
                        cmd: "trace_set",
                        ..
                    }
                ),
                "{line}: {e:?}"
            );
            let text = e.to_string();
            assert!(
                text.starts_with("trace_set: nothing to change: give \"rate\"")
                    && text.contains("4294967295")
                    && text.contains("\"p99.9\"")
                    && text.contains("\"off\""),
                "{text}"
            );
        }
        let text = error(r#"{"v":1,"cmd":"trace_set","rate":4294967296}"#).to_string();
        assert_eq!(
            text,
            "trace_set: field \"rate\" is the number 4294967296: give a whole number, 0 to 4294967295"
        );
        for rate in ["-1", "1.5", "\"1024\""] {
            let line = format!(r#"{{"v":1,"cmd":"trace_set","rate":{rate}}}"#);
            assert!(
                matches!(error(&line), ProtoError::BadField { field: "rate", .. }),
                "{line}"
            );
        }
        let text = error(r#"{"v":1,"cmd":"trace_set","tail":2000000}"#).to_string();
        assert!(
            text.contains("\"tail\" is the number 2000000")
                && text.contains("\"2ms\"")
                && text.contains("\"p99.9\"")
                && text.contains("\"off\""),
            "{text}"
        );
        let text = error(r#"{"v":1,"cmd":"trace_set","rate":1,"sample":2}"#).to_string();
        assert_eq!(
            text,
            "trace_set: unknown field \"sample\"; trace_set takes volume, rate, tail"
        );
        let text = error(r#"{"v":1,"cmd":"trace_show","volume":0}"#).to_string();
        assert!(text.contains("\"volume\" is the number 0"), "{text}");
        // A text the node will refuse ("fast") is still a string here: the node parses
        // thresholds, with the engine's own parser.
        let (_, request) = parse_request(r#"{"v":1,"cmd":"trace_set","tail":"fast"}"#).unwrap();
        assert_eq!(
            request,
            Request::TraceSet {
                volume: None,
                rate: None,
                tail: Some("fast".into())
            }
        );
    }

    #[test]
    fn trace_rows_round_trip() {
        let row = TraceRow {
            volume: "vol0".into(),
            rate: 1024,
            tail: "p99.9".into(),
            thresholds_ns: [
                ("read".to_string(), Some(812_000)),
                ("write".to_string(), None),
            ]
            .into_iter()
            .collect(),
        };
        let line = encode_ok(Some(3), &vec![row.clone()]);
        assert!(
            line.contains(r#""thresholds_ns":{"read":812000,"write":null}"#),
            "{line}"
        );
        let (_, result) = parse_response(&line).unwrap();
        assert_eq!(
            serde_json::from_value::<Vec<TraceRow>>(result.unwrap()).unwrap(),
            vec![row]
        );
    }

    #[test]
    fn responses_round_trip() {
        let hello = Hello {
            version: VERSION,
            node_id: "node0".into(),
            pid: 42,
            region: None,
            data_dir: "/var/lib/fathom".into(),
        };
        let line = encode_ok(Some(7), &hello);
        assert!(
            line.starts_with("{\"v\":1,\"id\":7,\"ok\":true,\"result\":{"),
            "{line}"
        );
        let (id, result) = parse_response(&line).unwrap();
        assert_eq!(id, Some(7));
        assert_eq!(
            serde_json::from_value::<Hello>(result.unwrap()).unwrap(),
            hello
        );

        let line = encode_error(None, UNKNOWN_VOLUME, "no volume \"x\": \"quoted\"\nnewline");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let (id, result) = parse_response(&line).unwrap();
        assert_eq!(id, None);
        assert_eq!(
            result.unwrap_err(),
            RemoteError::new(UNKNOWN_VOLUME, "no volume \"x\": \"quoted\"\nnewline")
        );

        // A result that cannot be JSON becomes an internal error, still one line.
        let mut bad = std::collections::HashMap::new();
        bad.insert(vec![1u8], 1);
        let line = encode_ok(Some(1), &bad);
        let (_, result) = parse_response(&line).unwrap();
        assert_eq!(result.unwrap_err().code, INTERNAL);
    }

    #[test]
    fn malformed_responses_are_refused() {
        for (line, says) in [
            ("nope", "not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"ok":true}"#, "no \"v\""),
            (r#"{"v":2,"ok":true}"#, "version 2"),
            (r#"{"v":1}"#, "no \"ok\""),
            (r#"{"v":1,"ok":"yes"}"#, "not a boolean"),
            (r#"{"v":1,"ok":false}"#, "without an \"error\""),
            (r#"{"v":1,"ok":false,"error":"x"}"#, "not an object"),
            (
                r#"{"v":1,"ok":false,"error":{"code":"x"}}"#,
                "no \"message\"",
            ),
            (r#"{"v":1,"id":"a","ok":true}"#, "\"id\""),
        ] {
            let text = parse_response(line).expect_err(line).to_string();
            assert!(text.contains(says), "{line}: {text}");
        }
        let (_, result) = parse_response(r#"{"v":1,"ok":true}"#).unwrap();
        assert_eq!(result.unwrap(), Value::Null);
    }

    #[test]
    fn decoder_splits_lines_across_pushes() {
        let mut decoder = LineDecoder::new();
        decoder.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(decoder.next_line(), Some(Ok("{\"a\":1}".into())));
        assert_eq!(decoder.next_line(), None);
        decoder.push(b":2}\r\n\n");
        assert_eq!(decoder.next_line(), Some(Ok("{\"b\":2}\r".into())));
        assert_eq!(decoder.next_line(), Some(Ok(String::new())));
        assert_eq!(decoder.next_line(), None);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn decoder_refuses_a_long_line_once_and_skips_to_its_end() {
        let mut decoder = LineDecoder::with_limit(8);
        decoder.push(b"12345678\n");
        assert_eq!(decoder.next_line(), Some(Ok("12345678".into())));
        decoder.push(b"123456789");
        assert_eq!(
            decoder.next_line(),
            Some(Err(ProtoError::TooLong { limit: 8 }))
        );
        assert_eq!(decoder.next_line(), None);
        decoder.push(&[b'x'; 100]);
        assert_eq!(decoder.next_line(), None);
        assert_eq!(decoder.buffered(), 0);
        decoder.push(b"xx\nok\n");
        assert_eq!(decoder.next_line(), Some(Ok("ok".into())));
        // A long line arriving whole, newline included.
        decoder.push(b"0123456789abc\nnext\n");
        assert_eq!(
            decoder.next_line(),
            Some(Err(ProtoError::TooLong { limit: 8 }))
        );
        assert_eq!(decoder.next_line(), Some(Ok("next".into())));
        assert_eq!(decoder.next_line(), None);
    }

    #[test]
    fn decoder_refuses_non_utf8() {
        let mut decoder = LineDecoder::new();
        decoder.push(b"ab\xffcd\nok\n");
        assert_eq!(
            decoder.next_line(),
            Some(Err(ProtoError::NotUtf8 { valid_up_to: 2 }))
        );
        assert_eq!(decoder.next_line(), Some(Ok("ok".into())));
        assert!(ProtoError::NotUtf8 { valid_up_to: 2 }
            .to_string()
            .contains("offset 2"));
    }

    #[test]
    fn decoder_at_full_size() {
        let mut decoder = LineDecoder::new();
        let mut line = vec![b' '; MAX_LINE];
        line.push(b'\n');
        decoder.push(&line);
        assert_eq!(decoder.next_line().unwrap().unwrap().len(), MAX_LINE);
        line.insert(0, b' ');
        decoder.push(&line);
        assert_eq!(
            decoder.next_line(),
            Some(Err(ProtoError::TooLong { limit: MAX_LINE }))
        );
    }

    /// What the decoder must produce for `input`, split all at once.
    fn reference(input: &[u8], limit: usize) -> Vec<Result<String, ProtoError>> {
        let mut segments: Vec<&[u8]> = input.split(|&byte| byte == b'\n').collect();
        let tail = segments.pop().unwrap_or_default();
        let mut lines: Vec<_> = segments
            .into_iter()
            .map(|segment| {
                if segment.len() > limit {
                    Err(ProtoError::TooLong { limit })
                } else {
                    String::from_utf8(segment.to_vec()).map_err(|error| ProtoError::NotUtf8 {
                        valid_up_to: error.utf8_error().valid_up_to(),
                    })
                }
            })
            .collect();
        if tail.len() > limit {
            lines.push(Err(ProtoError::TooLong { limit }));
        }
        lines
    }

    fn byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            3 => Just(b'\n'),
            10 => b'a'..=b'z',
            2 => any::<u8>(),
            1 => prop::sample::select(vec![0xc3u8, 0xa9, 0xe2, 0x82, 0xac, 0xf0, 0x9f]),
        ]
    }

    proptest! {
        #[test]
        fn decoder_matches_a_reference_split(
            input in prop::collection::vec(byte(), 0..400),
            cuts in prop::collection::vec(0usize..400, 0..40),
            limit in 0usize..24,
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&cut| cut <= input.len()).collect();
            cuts.push(0);
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut decoder = LineDecoder::with_limit(limit);
            let mut lines = Vec::new();
            for pair in cuts.windows(2) {
                let chunk = &input[pair[0]..pair[1]];
                decoder.push(chunk);
                prop_assert!(decoder.buffered() <= limit + chunk.len());
                while let Some(line) = decoder.next_line() {
                    lines.push(line);
                }
                prop_assert!(decoder.buffered() <= limit);
            }
            prop_assert_eq!(lines, reference(&input, limit));
        }

        #[test]
        fn parse_request_never_panics(line in "\\PC{0,200}") {
            let _ = parse_request(&line);
            let _ = parse_response(&line);
            let _ = peek_id(&line);
        }

        #[test]
        fn parse_request_never_panics_on_near_misses(
            cmd in prop::sample::select(COMMANDS.to_vec()),
            key in prop::sample::select(vec!["v", "id", "cmd", "volume", "layer", "target", "rule", "bs", "iodepth", "rate", "tail", "x"]),
            value in prop::sample::select(vec!["null", "1", "-1", "1.5", "\"s\"", "[]", "{}", "true", "4294967296", "18446744073709551616"]),
        ) {
            let line = format!("{{\"v\":1,\"cmd\":\"{cmd}\",\"{key}\":{value}}}");
            if let Err(error) = parse_request(&line) {
                prop_assert!(!error.to_string().is_empty());
            }
        }
    }
}
