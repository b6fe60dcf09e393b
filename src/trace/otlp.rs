//! OTLP/HTTP JSON output of traced IOs: what `fathom-stat trace --otlp-file FILE` writes and
//! `--otlp URL` sends to an OpenTelemetry collector (or Jaeger, which speaks OTLP).
//!
//! [`export_request`] turns the records a [`TraceReader`] polled into one
//! `ExportTraceServiceRequest` body, in OTLP's JSON encoding: the proto3 JSON mapping with
//! OTLP's deviations, which a generic protobuf JSON encoder gets wrong. Trace and span ids are
//! lowercase hex (not base64), enums are integers, 64-bit integers (times, `intValue`) are
//! decimal strings, keys are lowerCamelCase.
//!
//! **Mapping.** One `resourceSpans` per volume (resource attributes `service.name` = `fathom`,
//! `fathom.node`, `fathom.volume`, and `host.name` when the kernel names the host), each with
//! one `scopeSpans` (scope `fathom`). Every record becomes the spans of
//! [`TraceRecord::spans`]: the root (`frontend`, kind SERVER, or `io` for an IO from inside the
//! node, kind INTERNAL) carries what the IO was, as attributes:
//!
//! | attribute       | value                                                                 |
//! |-----------------|-----------------------------------------------------------------------|
//! | `fathom.op`     | `read`, `write`, `flush`, `write_zeroes` (as the stats region names them) |
//! | `fathom.offset` | byte offset in the volume; absent when the record did not keep it     |
//! | `fathom.lba`    | the device LBA it starts at; absent when not known                    |
//! | `fathom.len`    | length in bytes                                                       |
//! | `fathom.status` | the NVMe status word (status code type << 8 \| status code), 0 for success |
//! | `fathom.core`   | core of the reactor that ran it                                       |
//! | `fathom.queue`  | device queue (index into the stats region's queues); absent when the IO reached no device queue |
//! | `fathom.reason` | why it was traced: `head`, `tail`, `error`, `context`, `late`, comma-separated |
//!
//! `fathom.lba` is the device LBA the IO starts at (the volume's first LBA plus the offset in
//! its blocks, from the region's volume geometry); absent when the offset was not kept or the
//! geometry is unknown.
//!
//! A failed IO's root has status ERROR with the NVMe status's name as its message. Successful
//! spans leave the status unset, as OpenTelemetry asks of instrumentation. Children (`queue`,
//! `submit`, `layer:NAME`, `device`, `complete`, `reply`) are INTERNAL and carry no attributes.
//! Every span's `flags` say "sampled" and whether its parent is remote (another node's or a
//! client's span, from the caller's `traceparent`).
//!
//! **Output.** [`OtlpFile`] appends one request per line (JSON lines). [`OtlpSender`] POSTs a
//! request to a collector's `/v1/traces` over plain HTTP/1.1, one connection per request; the
//! request and response handling is plain functions over bytes, the socket driver is small.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::view;
use fathom_nvme::Status;
use fathom_telemetry::trace::{reason, Span, TraceDirectory, TraceRecord};
use serde_json::{json, Map, Value};

/// `service.name` of every resource, and the instrumentation scope's name.
pub const SERVICE_NAME: &str = "fathom";
/// The path a collector takes OTLP/HTTP traces on, used when the URL gives none.
pub const TRACES_PATH: &str = "/v1/traces";
/// How long [`OtlpSender`] waits to connect, and for each read or write, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// OTLP `SpanKind` values.
const KIND_INTERNAL: u64 = 1;
const KIND_SERVER: u64 = 2;
/// OTLP `Status.code` ERROR.
const STATUS_ERROR: u64 = 2;
/// `Span.flags`: the W3C trace flags in the low byte (0x01 sampled), then whether the parent
/// is known to be remote or not (`SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`) and if it is
/// (`SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`).
const FLAG_SAMPLED: u64 = 0x01;
const FLAG_HAS_IS_REMOTE: u64 = 0x100;
const FLAG_IS_REMOTE: u64 = 0x200;
/// The status word the engine records for an IO that failed outside the device.
const STATUS_NOT_DEVICE: u16 = u16::MAX;
/// The queue a record names when the IO reached no device queue (it ended in a layer).
const QUEUE_NONE: u16 = u16::MAX;
/// The offset a record names when it was not kept (the IO was picked after its completion).
const OFFSET_UNKNOWN: u64 = u64::MAX;
/// A collector's whole reply is read up to this size; the rest is not needed.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// An error reply's body is quoted up to this many bytes.
const MAX_QUOTED_BODY_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("could not {what} OTLP file {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "OTLP endpoint {url:?}: {problem}; give it as http://HOST[:PORT][/PATH], for example \
         http://127.0.0.1:4318 (OTLP/HTTP's port; {TRACES_PATH} is added when there is no path)"
    )]
    BadUrl { url: String, problem: String },
    #[error(
        "OTLP endpoint {url:?} uses https, but fathom sends plain http only: give an http:// \
         URL, and for TLS run a collector next to fathom-stat that forwards over https"
    )]
    HttpsUnsupported { url: String },
    #[error("could not resolve the OTLP collector's host {host:?}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "could not connect to the OTLP collector at {url} ({address}): is a collector \
         listening there (with its OTLP/HTTP receiver on)?"
    )]
    Connect {
        url: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the OTLP collector at {url} failed while {what}")]
    Io {
        url: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the OTLP collector at {url} sent a reply that is not HTTP/1.x: {problem}")]
    BadResponse { url: String, problem: String },
    #[error("the OTLP collector at {url} refused the spans: {code} {reason}: {body}")]
    Refused {
        url: String,
        code: u16,
        reason: String,
        body: String,
    },
    #[error(
        "the OTLP collector at {url} took the request but rejected {rejected} spans: {message}"
    )]
    PartlyRejected {
        url: String,
        rejected: u64,
        message: String,
    },
}

impl OtlpError {
    /// Whether the same request may succeed later: OTLP/HTTP says to retry on 429, 502, 503
    /// and 504 (and a collector that is down or slow may come back), never on other refusals.
    pub fn is_retryable(&self) -> bool {
        match self {
            OtlpError::Refused { code, .. } => matches!(code, 429 | 502 | 503 | 504),
            OtlpError::Connect { .. } | OtlpError::Io { .. } | OtlpError::Resolve { .. } => true,
            _ => false,
        }
    }
}

/// One `ExportTraceServiceRequest` body holding the spans of `records` (as a
/// [`TraceReader`](fathom_telemetry::trace::TraceReader) polls them: ring, record), grouped
/// by volume in the order of the volumes' indexes, each volume's in the order given.
///
/// The records are untrusted: a volume index the directory does not name becomes the volume
/// `?INDEX`, a layer index `layer:?`. A record with an all-zero trace or span id (which OTLP
/// forbids and no writer makes) is left out rather than have a collector refuse the whole
/// request; a root span that ends before it begins is given its begin as its end.
pub fn export_request(directory: &TraceDirectory, records: &[(usize, TraceRecord)]) -> Value {
    let mut volumes: BTreeMap<u32, Vec<Value>> = BTreeMap::new();
    for (_, record) in records {
        if record.trace_id.0 == 0 || record.span_id.0 == 0 {
            continue;
        }
        let spans = volumes.entry(record.volume).or_default();
        for (index, span) in record.spans(&directory.layers).iter().enumerate() {
            spans.push(span_json(directory, record, span, index == 0));
        }
    }
    let resource_spans: Vec<Value> = volumes
        .into_iter()
        .map(|(volume, spans)| {
            json!({
                "resource": { "attributes": resource_attributes(directory, volume) },
                "scopeSpans": [{
                    "scope": { "name": SERVICE_NAME, "version": env!("CARGO_PKG_VERSION") },
                    "spans": spans,
                }],
            })
        })
        .collect();
    json!({ "resourceSpans": resource_spans })
}

fn resource_attributes(directory: &TraceDirectory, volume: u32) -> Vec<Value> {
    let volume_name = directory
        .volume_name(volume as usize)
        .map_or_else(|| format!("?{volume}"), str::to_string);
    let mut attributes = vec![
        string_attribute("service.name", SERVICE_NAME),
        string_attribute("fathom.node", &directory.node_id),
        string_attribute("fathom.volume", &volume_name),
    ];
    // The region is shared memory, so the host that reads it is the node's host.
    if let Some(host) = host_name() {
        attributes.push(string_attribute("host.name", host));
    }
    attributes
}

/// The kernel's name for this host, read once.
fn host_name() -> Option<&'static str> {
    static HOST: OnceLock<Option<String>> = OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
    })
    .as_deref()
}

fn span_json(directory: &TraceDirectory, record: &TraceRecord, span: &Span, root: bool) -> Value {
    let remote_parent = root && span.parent.0 != 0;
    let flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | if remote_parent { FLAG_IS_REMOTE } else { 0 };
    let start = directory.unix_ns(span.begin);
    let end = directory.unix_ns(span.end).max(start);
    let mut object = Map::new();
    object.insert("traceId".into(), json!(record.trace_id.to_string()));
    object.insert("spanId".into(), json!(span.span_id.to_string()));
    if span.parent.0 != 0 {
        object.insert("parentSpanId".into(), json!(span.parent.to_string()));
    }
    object.insert("flags".into(), json!(flags));
    object.insert("name".into(), json!(span.name));
    let kind = if root && span.name == "frontend" {
        KIND_SERVER
    } else {
        KIND_INTERNAL
    };
    object.insert("kind".into(), json!(kind));
    object.insert("startTimeUnixNano".into(), json!(start.to_string()));
    object.insert("endTimeUnixNano".into(), json!(end.to_string()));
    if root {
        object.insert(
            "attributes".into(),
            json!(root_attributes(record, directory.lba(record))),
        );
        if let Some(message) = failure(record) {
            object.insert(
                "status".into(),
                json!({ "code": STATUS_ERROR, "message": message }),
            );
        }
    }
    Value::Object(object)
}

fn root_attributes(record: &TraceRecord, lba: Option<u64>) -> Vec<Value> {
    let mut attributes = vec![string_attribute("fathom.op", &view::op_name(record))];
    if record.offset != OFFSET_UNKNOWN {
        attributes.push(int_attribute("fathom.offset", record.offset));
    }
    if let Some(lba) = lba {
        attributes.push(int_attribute("fathom.lba", lba));
    }
    attributes.extend([
        int_attribute("fathom.len", record.len as u64),
        int_attribute("fathom.status", record.status as u64),
        int_attribute("fathom.core", record.core as u64),
    ]);
    if record.queue != QUEUE_NONE {
        attributes.push(int_attribute("fathom.queue", record.queue as u64));
    }
    let reasons = view::reason_words(record.reason);
    if !reasons.is_empty() {
        attributes.push(string_attribute("fathom.reason", &reasons));
    }
    attributes
}

/// Why the IO failed, when it did: its NVMe status, or the engine's word that it failed
/// before or after the device.
fn failure(record: &TraceRecord) -> Option<String> {
    match record.status {
        0 if record.reason & reason::ERROR == 0 => None,
        0 => Some("the IO failed without an NVMe status".into()),
        STATUS_NOT_DEVICE => Some("the IO failed outside the device (no NVMe status)".into()),
        word => Some(
            Status {
                sct: (word >> 8) as u8,
                sc: word as u8,
                dnr: false,
            }
            .to_string(),
        ),
    }
}

fn string_attribute(key: &str, value: &str) -> Value {
    json!({ "key": key, "value": { "stringValue": value } })
}

/// An `int64` attribute, as a decimal string (a JSON number would lose digits above 2^53 in
/// many readers). Values above `i64::MAX` cannot be an `int64` and are clamped to it.
fn int_attribute(key: &str, value: u64) -> Value {
    let value = value.min(i64::MAX as u64);
    json!({ "key": key, "value": { "intValue": value.to_string() } })
}

/// A file of OTLP JSON lines: one `ExportTraceServiceRequest` per line, which
/// `otelcol`'s `otlpjsonfile` receiver and `jq` both read.
#[derive(Debug)]
pub struct OtlpFile {
    file: File,
    path: PathBuf,
}

impl OtlpFile {
    /// Creates `path`, or empties it if it exists.
    pub fn create(path: &Path) -> Result<OtlpFile, OtlpError> {
        let file = File::create(path).map_err(|source| OtlpError::File {
            what: "create",
            path: path.into(),
            source,
        })?;
        Ok(OtlpFile {
            file,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `request` as one line, in one write so that a reader following the file sees
    /// whole lines.
    pub fn write(&mut self, request: &Value) -> Result<(), OtlpError> {
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|source| OtlpError::File {
                what: "write",
                path: self.path.clone(),
                source,
            })
    }
}

/// Sends requests to an OTLP/HTTP collector: a POST of `application/json` per request, on a
/// connection of its own, over plain HTTP/1.1.
#[derive(Debug, Clone)]
pub struct OtlpSender {
    /// The URL as it is used (with its path), for messages.
    url: String,
    /// The host to resolve (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// `host[:port]` as the URL wrote it, for the `Host` header.
    authority: String,
    path: String,
    timeout: Duration,
}

impl OtlpSender {
    /// A sender to `url`: `http://HOST[:PORT][/PATH]`, port 80 when none is given (an
    /// OTLP/HTTP collector listens on 4318), path [`TRACES_PATH`] when none is given. Only
    /// parses: the host is resolved and connected to on every [`send`](Self::send).
    pub fn new(url: &str) -> Result<OtlpSender, OtlpError> {
        let bad = |problem: &str| OtlpError::BadUrl {
            url: url.to_string(),
            problem: problem.to_string(),
        };
        let lower = url.to_ascii_lowercase();
        let rest = if lower.starts_with("https://") {
            return Err(OtlpError::HttpsUnsupported {
                url: url.to_string(),
            });
        } else if lower.starts_with("http://") {
            &url["http://".len()..]
        } else if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!("the scheme {scheme:?} is not http")));
        } else {
            return Err(bad("it has no http:// in front"));
        };
        let (authority, path) = rest
            .find('/')
            .map_or((rest, ""), |slash| rest.split_at(slash));
        if authority.contains('@') {
            return Err(bad("user names and passwords in the URL are not supported"));
        }
        if path.contains('#') {
            return Err(bad("a #fragment means nothing to a collector"));
        }
        if path.bytes().any(|byte| byte <= b' ' || byte == 0x7f) {
            return Err(bad("its path holds spaces or control characters"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (address, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address needs its closing ']'"))?;
            if address.parse::<Ipv6Addr>().is_err() {
                return Err(bad(&format!("{address:?} is not an IPv6 address")));
            }
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("only ':PORT' may follow an IPv6 address"))?,
                ),
            };
            (address, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let host_ok = host
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-._:".contains(&byte));
        if host.is_empty() {
            return Err(bad("it names no host"));
        }
        if !host_ok {
            return Err(bad(&format!("{host:?} is not a host name or address")));
        }
        let port = match port {
            None => 80,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&port| port != 0)
                .ok_or_else(|| bad(&format!("{port:?} is not a port (1 to 65535)")))?,
        };
        let path = match path {
            "" | "/" => TRACES_PATH,
            path => path,
        };
        Ok(OtlpSender {
            url: format!("http://{authority}{path}"),
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path: path.to_string(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same sender, waiting at most `timeout` to connect and for each read and write.
    pub fn with_timeout(mut self, timeout: Duration) -> OtlpSender {
        self.timeout = timeout;
        self
    }

    /// The URL requests go to, path included.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs `request` (an [`export_request`]) and checks the collector took all of it: a 2xx
    /// reply, without a `partialSuccess` that rejected spans.
    pub fn send(&self, request: &Value) -> Result<(), OtlpError> {
        let body = request.to_string().into_bytes();
        let mut stream = self.connect()?;
        let io = |what: &'static str| {
            move |source| OtlpError::Io {
                url: self.url.clone(),
                what,
                source,
            }
        };
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(io("setting its socket's timeouts"))?;
        stream
            .write_all(&self.request_head(body.len()))
            .and_then(|()| stream.write_all(&body))
            .map_err(io("sending the request"))?;
        let reply = read_reply(&mut stream).map_err(io("reading its reply"))?;
        let response = parse_response(&reply).map_err(|problem| OtlpError::BadResponse {
            url: self.url.clone(),
            problem,
        })?;
        self.check(response)
    }

    fn connect(&self) -> Result<TcpStream, OtlpError> {
        let resolve = |source| OtlpError::Resolve {
            host: self.host.clone(),
            source,
        };
        let addresses: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(resolve)?
            .collect();
        let mut failed = None;
        for address in addresses {
            match TcpStream::connect_timeout(&address, self.timeout) {
                Ok(stream) => return Ok(stream),
                Err(source) => failed = Some((address, source)),
            }
        }
        Err(match failed {
            Some((address, source)) => OtlpError::Connect {
                url: self.url.clone(),
                address,
                source,
            },
            None => resolve(std::io::Error::other("the name has no addresses")),
        })
    }

    /// The request line and headers of a POST of `length` bytes of JSON.
    fn request_head(&self, length: usize) -> Vec<u8> {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fathom/{version}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\
             Connection: close\r\n\r\n",
            path = self.path,
            host = self.authority,
            version = env!("CARGO_PKG_VERSION"),
        )
        .into_bytes()
    }

    /// What a collector's reply means (OTLP/HTTP: 2xx with an `ExportTraceServiceResponse`
    /// body is success, possibly partial; anything else carries the reason in its body).
    fn check(&self, response: Response) -> Result<(), OtlpError> {
        if !(200..300).contains(&response.code) {
            return Err(OtlpError::Refused {
                url: self.url.clone(),
                code: response.code,
                reason: response.reason,
                body: quote(&response.body),
            });
        }
        // An empty or non-JSON 2xx body is a full success: the response has only optional fields.
        let Ok(body) = serde_json::from_slice::<Value>(&response.body) else {
            return Ok(());
        };
        let partial = &body["partialSuccess"];
        let rejected = match &partial["rejectedSpans"] {
            Value::String(text) => text.parse::<u64>().unwrap_or(0),
            value => value.as_u64().unwrap_or(0),
        };
        if rejected > 0 {
            return Err(OtlpError::PartlyRejected {
                url: self.url.clone(),
                rejected,
                message: partial["errorMessage"]
                    .as_str()
                    .unwrap_or("(no message)")
                    .to_string(),
            });
        }
        Ok(())
    }
}

/// A collector's reply, as far as the sender needs it.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    code: u16,
    reason: String,
    body: Vec<u8>,
}

/// Reads a reply until its body is complete (by `Content-Length` or the last chunk), the
/// collector closes the connection, or [`MAX_RESPONSE_BYTES`] have come.
fn read_reply(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    let mut buffer = [0u8; 4096];
    while reply.len() < MAX_RESPONSE_BYTES && !reply_complete(&reply) {
        let count = stream.read(&mut buffer)?;
        if count == 0 {
            break;
        }
        reply.extend_from_slice(&buffer[..count]);
    }
    Ok(reply)
}

fn reply_complete(reply: &[u8]) -> bool {
    let Some((head, body)) = split_head(reply) else {
        return false;
    };
    let headers = Headers::parse(head);
    if headers.chunked {
        dechunk(body).1
    } else {
        headers.length.is_some_and(|length| body.len() >= length)
    }
}

/// The reply's head (status line and headers, without the blank line) and what follows it.
fn split_head(reply: &[u8]) -> Option<(&str, &[u8])> {
    let end = reply.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&reply[..end]).ok()?;
    Some((head, &reply[end + 4..]))
}

/// The headers that say where a reply's body ends.
#[derive(Debug, Default)]
struct Headers {
    length: Option<usize>,
    chunked: bool,
}

impl Headers {
    fn parse(head: &str) -> Headers {
        let mut headers = Headers::default();
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                headers.length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                headers.chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        headers
    }
}

fn parse_response(reply: &[u8]) -> Result<Response, String> {
    if reply.is_empty() {
        return Err("the connection closed without a reply".into());
    }
    let (head, body) = split_head(reply).ok_or_else(|| {
        format!(
            "no end of headers in {} bytes: {}",
            reply.len(),
            quote(reply)
        )
    })?;
    let status_line = head.split("\r\n").next().unwrap_or_default();
    let mut words = status_line.splitn(3, ' ');
    let (version, code, reason) = (words.next(), words.next(), words.next());
    let code = code
        .filter(|code| code.len() == 3)
        .and_then(|code| code.parse::<u16>().ok());
    let (Some(version), Some(code)) = (version, code) else {
        return Err(format!("status line {status_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?}"));
    }
    let headers = Headers::parse(head);
    let body = if headers.chunked {
        dechunk(body).0
    } else {
        let length = headers.length.unwrap_or(body.len()).min(body.len());
        body[..length].to_vec()
    };
    Ok(Response {
        code,
        reason: reason.unwrap_or_default().to_string(),
        body,
    })
}

/// A chunked body's content, and whether its last (empty) chunk was there. Stops at the first
/// chunk that is not well formed or not all there.
fn dechunk(mut body: &[u8]) -> (Vec<u8>, bool) {
    let mut content = Vec::new();
    // Every chunk takes at least 3 bytes, so this bounds the loop by the body's length.
    while let Some(line_end) = body.windows(2).position(|window| window == b"\r\n") {
        let size_text = std::str::from_utf8(&body[..line_end]).unwrap_or("");
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        if size == 0 {
            return (content, true);
        }
        let start = line_end + 2;
        let Some(chunk) = body.get(start..start.saturating_add(size)) else {
            break;
        };
        content.extend_from_slice(chunk);
        body = body.get(start + size + 2..).unwrap_or_default();
    }
    (content, false)
}

/// `bytes` as text for a message: lossy UTF-8, trimmed, cut at [`MAX_QUOTED_BODY_BYTES`].
fn quote(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_QUOTED_BODY_BYTES)];
    let mut text = String::from_utf8_lossy(cut).trim().to_string();
    if bytes.len() > cut.len() {
        text.push_str(&format!(" (and {} more bytes)", bytes.len() - cut.len()));
    }
    if text.is_empty() {
        text.push_str("(empty body)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_telemetry::trace::{stamp, SpanId, TraceId, MAX_LAYERS};

    fn directory() -> TraceDirectory {
        TraceDirectory {
            node_id: "node-a".into(),
            tsc_hz: 2_000_000_000,
            epoch_ticks: 1_000_000,
            epoch_unix_ns: 1_700_000_000_000_000_000,
            writer_pid: 1,
            start_unix_ns: 1_700_000_000_000_000_000,
            cores: vec![0, 1],
            capacity: 8,
            volumes: vec!["vol0".into(), "vol1".into()],
            geometry: Vec::new(),
            layers: vec!["cache".into(), "replica".into()],
        }
    }

    /// A front-end read through one layer when `frontend`, else an engine IO; stamps 1000
    /// ticks apart from the epoch on.
    fn record(n: u64, frontend: bool) -> TraceRecord {
        let mut stamps = [0u64; stamp::COUNT];
        for (index, stamp) in stamps.iter_mut().enumerate() {
            *stamp = 1_000_000 + 1000 * index as u64;
        }
        if !frontend {
            stamps[stamp::RECEIVED] = 0;
            stamps[stamp::REPLY_START] = 0;
            stamps[stamp::SENT] = 0;
        }
        let mut layers = [(0u8, 0u64, 0u64); MAX_LAYERS];
        layers[0] = (1, stamps[stamp::SUBMITTED] + 100, stamps[stamp::RUNG]);
        TraceRecord {
            trace_id: TraceId(0x0af7_6519_16cd_43dd_8448_eb21_1c80_0000 | n as u128),
            span_id: SpanId(0x00b7_ad6b_7169_0000 | n),
            parent: SpanId(0),
            volume: 0,
            op: 0,
            reason: reason::HEAD,
            status: 0,
            offset: 8192,
            len: 4096,
            core: 1,
            queue: 3,
            stamps,
            layer_count: frontend as u8,
            layers,
        }
    }

    fn spans(request: &Value) -> Vec<&Value> {
        request["resourceSpans"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|resource| resource["scopeSpans"][0]["spans"].as_array().unwrap())
            .collect()
    }

    fn attribute<'a>(attributes: &'a Value, key: &str) -> Option<&'a Value> {
        attributes
            .as_array()
            .unwrap()
            .iter()
            .find(|attribute| attribute["key"] == key)
            .map(|attribute| &attribute["value"])
    }

    #[test]
    fn ids_are_lowercase_hex_and_times_decimal_strings() {
        let request = export_request(&directory(), &[(0, record(0xab, true))]);
        let spans = spans(&request);
        assert_eq!(spans.len(), 7, "frontend, 5 stages and one layer");
        for span in &spans {
            let trace = span["traceId"].as_str().unwrap();
            assert_eq!(trace, "0af7651916cd43dd8448eb211c8000ab");
            let id = span["spanId"].as_str().unwrap();
            assert!(
                id.len() == 16
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
            let start: u64 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
            let end: u64 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
            assert!(start <= end);
            assert!(span["kind"].is_u64() && span["flags"].is_u64());
        }
        // RECEIVED is at the epoch; SENT 7000 ticks later at 2 GHz is 3500 ns later.
        assert_eq!(spans[0]["startTimeUnixNano"], "1700000000000000000");
        assert_eq!(spans[0]["endTimeUnixNano"], "1700000000000003500");
    }

    #[test]
    fn the_root_carries_the_io_and_its_children_point_at_it() {
        let record = record(1, true);
        let request = export_request(&directory(), &[(1, record)]);
        let spans = spans(&request);
        let root = spans[0];
        assert_eq!(root["name"], "frontend");
        assert_eq!(root["spanId"], "00b7ad6b71690001");
        assert!(
            root.get("parentSpanId").is_none(),
            "a trace's root has no parent"
        );
        assert_eq!(root["kind"], KIND_SERVER);
        assert_eq!(root["flags"], FLAG_SAMPLED | FLAG_HAS_IS_REMOTE);
        assert!(
            root.get("status").is_none(),
            "success leaves the status unset"
        );
        let attributes = &root["attributes"];
        assert_eq!(
            attribute(attributes, "fathom.op").unwrap()["stringValue"],
            "read"
        );
        assert_eq!(
            attribute(attributes, "fathom.offset").unwrap()["intValue"],
            "8192"
        );
        assert_eq!(
            attribute(attributes, "fathom.len").unwrap()["intValue"],
            "4096"
        );
        assert_eq!(
            attribute(attributes, "fathom.status").unwrap()["intValue"],
            "0"
        );
        assert_eq!(
            attribute(attributes, "fathom.core").unwrap()["intValue"],
            "1"
        );
        assert_eq!(
            attribute(attributes, "fathom.queue").unwrap()["intValue"],
            "3"
        );
        assert_eq!(
            attribute(attributes, "fathom.reason").unwrap()["stringValue"],
            "head"
        );
        let names: Vec<&str> = spans[1..]
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "queue",
                "submit",
                "layer:replica",
                "device",
                "complete",
                "reply"
            ]
        );
        for child in &spans[1..] {
            assert_eq!(child["parentSpanId"], "00b7ad6b71690001");
            assert_eq!(child["kind"], KIND_INTERNAL);
            assert!(child.get("attributes").is_none());
        }
        let resource = &request["resourceSpans"][0]["resource"]["attributes"];
        assert_eq!(
            attribute(resource, "service.name").unwrap()["stringValue"],
            "fathom"
        );
        assert_eq!(
            attribute(resource, "fathom.node").unwrap()["stringValue"],
            "node-a"
        );
        assert_eq!(
            attribute(resource, "fathom.volume").unwrap()["stringValue"],
            "vol0"
        );
        assert_eq!(
            request["resourceSpans"][0]["scopeSpans"][0]["scope"]["name"],
            "fathom"
        );
    }

    #[test]
    fn a_callers_span_is_the_remote_parent_of_the_root() {
        let mut record = record(2, false);
        record.parent = SpanId(0xb7ad_6b71_6920_3331);
        record.reason = reason::CONTEXT | reason::TAIL;
        let request = export_request(&directory(), &[(0, record)]);
        let spans = spans(&request);
        assert_eq!(spans[0]["name"], "io");
        assert_eq!(spans[0]["kind"], KIND_INTERNAL);
        assert_eq!(spans[0]["parentSpanId"], "b7ad6b7169203331");
        assert_eq!(
            spans[0]["flags"],
            FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE
        );
        assert_eq!(
            attribute(&spans[0]["attributes"], "fathom.reason").unwrap()["stringValue"],
            "tail,context"
        );
        for child in &spans[1..] {
            assert_eq!(child["parentSpanId"], spans[0]["spanId"]);
            assert_eq!(child["flags"], FLAG_SAMPLED | FLAG_HAS_IS_REMOTE);
        }
    }

    #[test]
    fn a_failed_io_has_an_error_status_naming_the_nvme_status() {
        let mut failed = record(3, false);
        failed.status = 0x0281;
        failed.reason = reason::ERROR;
        let mut elsewhere = record(4, false);
        elsewhere.status = STATUS_NOT_DEVICE;
        elsewhere.queue = QUEUE_NONE;
        elsewhere.offset = OFFSET_UNKNOWN;
        let request = export_request(&directory(), &[(0, failed), (0, elsewhere)]);
        let roots: Vec<&Value> = spans(&request)
            .into_iter()
            .filter(|span| span.get("parentSpanId").is_none())
            .collect();
        assert_eq!(roots[0]["status"]["code"], STATUS_ERROR);
        let message = roots[0]["status"]["message"].as_str().unwrap();
        assert!(message.contains("Unrecovered Read Error"), "{message}");
        assert_eq!(
            attribute(&roots[0]["attributes"], "fathom.status").unwrap()["intValue"],
            "641"
        );
        assert_eq!(roots[1]["status"]["code"], STATUS_ERROR);
        assert!(attribute(&roots[1]["attributes"], "fathom.queue").is_none());
        assert!(
            attribute(&roots[1]["attributes"], "fathom.offset").is_none(),
            "an offset the record did not keep is not shown as one"
        );
    }

    #[test]
    fn records_group_by_volume_and_bad_indexes_do_not_panic() {
        let mut second = record(5, true);
        second.volume = 1;
        let mut unknown = record(6, true);
        unknown.volume = 99;
        unknown.op = 200;
        unknown.reason = 0x80 | reason::HEAD;
        unknown.layers[0].0 = 250;
        let mut zero = record(7, true);
        zero.trace_id = TraceId(0);
        let records = [(0, second), (1, unknown), (0, record(8, true)), (1, zero)];
        let request = export_request(&directory(), &records);
        let resources = request["resourceSpans"].as_array().unwrap();
        let volume = |index: usize| {
            attribute(&resources[index]["resource"]["attributes"], "fathom.volume").unwrap()
                ["stringValue"]
                .clone()
        };
        assert_eq!(resources.len(), 3);
        assert_eq!(
            (volume(0), volume(1), volume(2)),
            (json!("vol0"), json!("vol1"), json!("?99"))
        );
        let unknown_spans = resources[2]["scopeSpans"][0]["spans"].as_array().unwrap();
        let attributes = &unknown_spans[0]["attributes"];
        assert_eq!(
            attribute(attributes, "fathom.op").unwrap()["stringValue"],
            "op200"
        );
        assert_eq!(
            attribute(attributes, "fathom.reason").unwrap()["stringValue"],
            "head,0x80"
        );
        assert!(unknown_spans.iter().any(|span| span["name"] == "layer:?"));
        let traces: Vec<&Value> = spans(&request)
            .iter()
            .map(|span| &span["traceId"])
            .collect();
        assert!(
            !traces.contains(&&json!("00000000000000000000000000000000")),
            "a zero trace id is left out"
        );
        assert_eq!(
            export_request(&directory(), &[]),
            json!({ "resourceSpans": [] })
        );
    }

    #[test]
    fn urls_are_parsed_and_a_missing_path_becomes_v1_traces() {
        let sender = OtlpSender::new("http://127.0.0.1:4318").unwrap();
        assert_eq!(
            (sender.host.as_str(), sender.port, sender.path.as_str()),
            ("127.0.0.1", 4318, "/v1/traces")
        );
        assert_eq!(sender.url(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(
            OtlpSender::new("HTTP://collector/").unwrap().path,
            "/v1/traces"
        );
        let custom = OtlpSender::new("http://collector.example:8080/otlp/v1/traces").unwrap();
        assert_eq!(
            (custom.host.as_str(), custom.port, custom.path.as_str()),
            ("collector.example", 8080, "/otlp/v1/traces")
        );
        assert_eq!(OtlpSender::new("http://collector").unwrap().port, 80);
        let v6 = OtlpSender::new("http://[::1]:4318").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.authority.as_str()),
            ("::1", "[::1]:4318")
        );
        let head = String::from_utf8(v6.request_head(42)).unwrap();
        assert!(
            head.starts_with("POST /v1/traces HTTP/1.1\r\nHost: [::1]:4318\r\n"),
            "{head}"
        );
        assert!(
            head.contains("\r\nContent-Type: application/json\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nContent-Length: 42\r\n") && head.ends_with("\r\n\r\n"));
    }

    #[test]
    fn bad_urls_are_refused_saying_what_is_wrong() {
        let https = OtlpSender::new("https://collector:4318").unwrap_err();
        assert!(matches!(https, OtlpError::HttpsUnsupported { .. }));
        assert!(https.to_string().contains("plain http only"), "{https}");
        for (url, says) in [
            ("127.0.0.1:4318", "no http://"),
            ("grpc://collector:4317", "\"grpc\" is not http"),
            ("http://", "no host"),
            ("http://:4318", "no host"),
            ("http://collector:0", "not a port"),
            ("http://collector:70000", "not a port"),
            ("http://collector:43x8", "not a port"),
            ("http://user:secret@collector", "passwords"),
            ("http://[::1:4318", "closing ']'"),
            ("http://[nothex]:4318", "not an IPv6 address"),
            ("http://[::1]4318", "':PORT'"),
            ("http://collector/v1/traces#x", "fragment"),
            ("http://collector/v1 traces", "spaces"),
            ("http://coll ector", "not a host name"),
        ] {
            let error = OtlpSender::new(url).unwrap_err();
            let text = error.to_string();
            assert!(
                matches!(error, OtlpError::BadUrl { .. }) && text.contains(says),
                "{url}: {text}"
            );
            assert!(text.contains("http://HOST[:PORT][/PATH]"), "{text}");
        }
    }

    #[test]
    fn replies_are_parsed_by_length_or_chunks() {
        let reply = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\ncontent-length: 9\r\n\r\n{\"code\":3}extra";
        assert!(reply_complete(reply));
        let response = parse_response(reply).unwrap();
        assert_eq!(
            response,
            Response {
                code: 400,
                reason: "Bad Request".into(),
                body: b"{\"code\":3".to_vec()
            }
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        assert!(reply_complete(chunked));
        assert!(!reply_complete(&chunked[..chunked.len() - 5]));
        assert_eq!(parse_response(chunked).unwrap().body, b"{}");
        assert!(!reply_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{"
        ));
        for bad in [
            &b""[..],
            b"SSH-2.0-OpenSSH\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            assert!(parse_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_partial_success_that_rejected_spans_is_an_error() {
        let sender = OtlpSender::new("http://127.0.0.1:4318").unwrap();
        let ok = |body: &str| Response {
            code: 200,
            reason: "OK".into(),
            body: body.as_bytes().to_vec(),
        };
        assert!(sender.check(ok("{}")).is_ok());
        assert!(sender.check(ok("")).is_ok());
        assert!(sender
            .check(ok(
                r#"{"partialSuccess":{"rejectedSpans":"0","errorMessage":"fine"}}"#
            ))
            .is_ok());
        let error = sender
            .check(ok(
                r#"{"partialSuccess":{"rejectedSpans":"2","errorMessage":"too old"}}"#,
            ))
            .unwrap_err();
        assert!(
            matches!(error, OtlpError::PartlyRejected { rejected: 2, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("too old"));
        let busy = sender
            .check(Response {
                code: 503,
                reason: "Service Unavailable".into(),
                body: Vec::new(),
            })
            .unwrap_err();
        assert!(
            busy.is_retryable() && busy.to_string().contains("(empty body)"),
            "{busy}"
        );
    }

    #[test]
    fn the_file_holds_one_request_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otlp.jsonl");
        let mut file = OtlpFile::create(&path).unwrap();
        let first = export_request(&directory(), &[(0, record(1, true))]);
        let second = export_request(&directory(), &[(1, record(2, false))]);
        file.write(&first).unwrap();
        file.write(&second).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines, [first, second]);
        assert!(text.ends_with('\n'));
        let error = OtlpFile::create(&dir.path().join("missing/otlp.jsonl")).unwrap_err();
        assert!(
            error.to_string().contains("could not create OTLP file"),
            "{error}"
        );
    }
}
