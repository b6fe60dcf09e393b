//! A blocking etcd client that does not trust the network: every operation has a deadline,
//! runs against one endpoint at a time, and moves to the next endpoint when that one fails,
//! hangs or has no leader; idempotent operations are tried again there. It exists because
//! `etcd-client` on its own, against etcd 3.4, keeps routing to a dead endpoint, lets a
//! request to a dead leader hang, and does not rebuild watch or keep-alive streams.
//!
//! - **Endpoints**: one `etcd_client::Client` at a time, connected to one endpoint with
//!   `require_leader` (a member cut off from its leader refuses at once instead of hanging).
//!   A member is checked with `Status` when connected to (it must know a leader), and left
//!   for the next on any transport error, "no leader" or timeout.
//! - **Deadlines**: each try gets at most `attempt` (default 500 ms), each operation at most
//!   `deadline` (default 3 s, room for the survivors of a dead leader to elect another)
//!   over all its tries.
//! - **Lease keep-alive**: one stream, rebuilt on the next endpoint when it fails.
//! - **Watch**: [`Etcd::watch`] from a revision; [`Etcd::next_events`] rebuilds the stream
//!   from the last revision seen when it breaks or stops answering progress requests, and
//!   says [`EtcdError::Compacted`] when that revision is gone (the caller reads afresh).
//!
//! Each user (a thread) owns its `Etcd`: it runs a tokio runtime of its own on that thread.

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: no endpoint of {endpoints} did {what} within {deadline:?} (last: {last}); check that etcd runs and has a leader (`etcdctl --endpoints {endpoints} endpoint status`)")]
    Unreachable {
        what: String,
        endpoints: String,
        deadline: Duration,
        last: String,
    },
    #[error("etcd refused {what}: {why}")]
    Refused { what: String, why: String },
    #[error("etcd compacted the history after revision {0}: read afresh")]
    Compacted(i64),
    #[error("etcd endpoints: {0}")]
    Config(String),
    #[error("cannot start the etcd client's runtime: {0}")]
    Runtime(std::io::Error),
}

/// A key and its value as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A change a watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Kv),
    Delete { key: Vec<u8>, revision: i64 },
}

/// What a transaction compares.
#[derive(Debug, Clone)]
pub enum Condition {
    /// The key was last changed at this revision.
    ModRevision(String, i64),
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Present(String),
}

/// What a transaction does when its conditions hold.
#[derive(Debug, Clone)]
pub enum Write {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    Delete(String),
    DeletePrefix(String),
}

/// Deadlines of a client.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// One try against one endpoint.
    pub attempt: Duration,
    /// One operation, over all its tries.
    pub deadline: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            attempt: Duration::from_millis(500),
            deadline: Duration::from_secs(3),
        }
    }
}

struct Watching {
    prefix: String,
    /// The next revision to see.
    next: i64,
    stream: Option<WatchStream>,
    /// A progress request is out since then.
    asked: Option<Instant>,
    last_heard: Instant,
}

pub struct Etcd {
    runtime: tokio::runtime::Runtime,
    endpoints: Vec<String>,
    at: usize,
    client: Option<Client>,
    timeouts: Timeouts,
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
    watching: Option<Watching>,
}

/// A transport failure, a member without a leader, or one shutting down: worth another
/// endpoint. Anything else etcd said is its answer.
fn worth_another(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code() as i32,
            tonic_code::UNAVAILABLE
                | tonic_code::DEADLINE_EXCEEDED
                | tonic_code::UNKNOWN
                | tonic_code::CANCELLED
                | tonic_code::INTERNAL
        ),
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => false,
        _ => true,
    }
}

/// gRPC status codes as etcd-client's tonic numbers them (not re-exported by it).
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

impl Etcd {
    /// A client of the etcd members at `endpoints` (`host:port` or `http://host:port`).
    /// Connects lazily: a member that is down shows at the first operation.
    pub fn new(endpoints: &[String], timeouts: Timeouts) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Config("none given".into()));
        }
        let endpoints = endpoints
            .iter()
            .map(|endpoint| {
                let endpoint = endpoint.trim();
                if endpoint.is_empty() {
                    return Err(EtcdError::Config("an empty endpoint".into()));
                }
                Ok(match endpoint.contains("://") {
                    true => endpoint.to_string(),
                    false => format!("http://{endpoint}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(EtcdError::Runtime)?;
        Ok(Self {
            runtime,
            endpoints,
            at: 0,
            client: None,
            timeouts,
            keeper: None,
            watching: None,
        })
    }

    /// The endpoint in use (or to be tried next).
    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.at]
    }

    fn endpoint_list(&self) -> String {
        self.endpoints.join(",")
    }

    /// Leaves the endpoint in use for the next one, dropping every stream on it.
    fn next_endpoint(&mut self, why: &str) {
        if self.client.is_some() {
            tracing::info!(endpoint = %self.endpoints[self.at], "etcd: leaving this endpoint: {why}");
        }
        self.client = None;
        self.keeper = None;
        if let Some(watching) = &mut self.watching {
            watching.stream = None;
        }
        self.at = (self.at + 1) % self.endpoints.len();
    }

    /// While the node's partition switch is on, etcd is out of reach: every stream is
    /// dropped and every operation fails at once.
    fn cut_off(&mut self, what: &str) -> Result<(), EtcdError> {
        if !fathom_net::fault::etcd_cut() {
            return Ok(());
        }
        self.client = None;
        self.keeper = None;
        if let Some(watching) = &mut self.watching {
            watching.stream = None;
        }
        Err(EtcdError::Unreachable {
            what: what.into(),
            endpoints: self.endpoint_list(),
            deadline: Duration::ZERO,
            last: fathom_net::fault::partition_error().to_string(),
        })
    }

    /// A client on the endpoint in use, connected and checked (it knows a leader) within
    /// `limit`.
    fn connected(&mut self, limit: Duration) -> Result<Client, String> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let endpoint = self.endpoints[self.at].clone();
        let options = ConnectOptions::new()
            .with_connect_timeout(limit)
            .with_timeout(limit)
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(1), limit);
        let checked = within(&self.runtime, limit, async {
            let mut client = Client::connect([endpoint.as_str()], Some(options)).await?;
            let status = client.status().await?;
            Ok::<_, etcd_client::Error>((client, status.leader()))
        });
        match checked {
            Err(_) => Err(format!("{endpoint}: no answer within {limit:?}")),
            Ok(Err(error)) => Err(format!("{endpoint}: {error}")),
            Ok(Ok((_, 0))) => Err(format!("{endpoint}: the member knows no leader")),
            Ok(Ok((client, _))) => {
                self.client = Some(client.clone());
                Ok(client)
            }
        }
    }

    /// Runs `op` on one endpoint after the other until it is answered or the deadline
    /// passes. `op` must be safe to run twice.
    fn call<T, F, Fut>(&mut self, what: &str, op: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.cut_off(what)?;
        let started = Instant::now();
        let deadline = started + self.timeouts.deadline;
        let mut last = String::from("not tried");
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(EtcdError::Unreachable {
                    what: what.into(),
                    endpoints: self.endpoint_list(),
                    deadline: self.timeouts.deadline,
                    last,
                });
            }
            let limit = self.timeouts.attempt.min(deadline - now);
            let client = match self.connected(limit) {
                Ok(client) => client,
                Err(why) => {
                    last = why.clone();
                    self.next_endpoint(&why);
                    // A moment before the same members are tried again.
                    std::thread::sleep(
                        Duration::from_millis(20)
                            .min(deadline.saturating_duration_since(Instant::now())),
                    );
                    continue;
                }
            };
            match within(&self.runtime, limit, op(client)) {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) if worth_another(&error) => {
                    last = format!("{}: {error}", self.endpoints[self.at]);
                    self.next_endpoint(&last);
                }
                Ok(Err(error)) => {
                    return Err(EtcdError::Refused {
                        what: what.into(),
                        why: error.to_string(),
                    })
                }
                Err(_) => {
                    last = format!("{}: no answer within {limit:?}", self.endpoints[self.at]);
                    self.next_endpoint(&last);
                }
            }
        }
    }

    /// The key's value, if it exists (a linearizable read).
    pub fn get(&mut self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let key = key.to_string();
        let (kvs, _) = self.call(&format!("get {key}"), |mut client| {
            let key = key.clone();
            async move {
                let response = client.get(key, None).await?;
                Ok((kvs_of(response.kvs()), revision_of(response.header())))
            }
        })?;
        Ok(kvs.into_iter().next())
    }

    /// Every key under `prefix`, and the store's revision at that read.
    pub fn get_prefix(&mut self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let prefix = prefix.to_string();
        self.call(&format!("get {prefix}*"), |mut client| {
            let prefix = prefix.clone();
            async move {
                let response = client
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await?;
                Ok((kvs_of(response.kvs()), revision_of(response.header())))
            }
        })
    }

    /// Puts `value` at `key`, under `lease` if given; the store's revision after it.
    pub fn put(&mut self, key: &str, value: &[u8], lease: Option<i64>) -> Result<i64, EtcdError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.call(&format!("put {key}"), |mut client| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let options = lease.map(|lease| PutOptions::new().with_lease(lease));
                let response = client.put(key, value, options).await?;
                Ok(revision_of(response.header()))
            }
        })
    }

    /// Applies `writes` if every condition holds; whether they held. Tried again on another
    /// endpoint when a try got no answer, so a caller that sees `false` reads the keys again
    /// to tell "someone else changed them" from "an earlier try of mine did".
    pub fn txn(&mut self, when: &[Condition], writes: &[Write]) -> Result<bool, EtcdError> {
        let compares: Vec<Compare> = when
            .iter()
            .map(|condition| match condition {
                Condition::ModRevision(key, revision) => {
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
                }
                Condition::Absent(key) => Compare::version(key.as_str(), CompareOp::Equal, 0),
                Condition::Present(key) => Compare::version(key.as_str(), CompareOp::Greater, 0),
            })
            .collect();
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|write| match write {
                Write::Put { key, value, lease } => TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    lease.map(|lease| PutOptions::new().with_lease(lease)),
                ),
                Write::Delete(key) => TxnOp::delete(key.as_str(), None),
                Write::DeletePrefix(prefix) => TxnOp::delete(
                    prefix.as_str(),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            })
            .collect();
        self.call("a transaction", |mut client| {
            let txn = Txn::new().when(compares.clone()).and_then(ops.clone());
            async move { Ok(client.txn(txn).await?.succeeded()) }
        })
    }

    /// A new lease of `ttl`; its id.
    pub fn grant(&mut self, ttl: Duration) -> Result<i64, EtcdError> {
        let seconds = ttl.as_secs().max(1) as i64;
        self.call("a lease grant", |mut client| async move {
            Ok(client.lease_grant(seconds, None).await?.id())
        })
    }

    /// Keeps lease `id` alive once: its remaining TTL, or `None` when etcd no longer has it
    /// (it expired). The stream is rebuilt on the next endpoint when it fails.
    pub fn keep_alive(&mut self, id: i64) -> Result<Option<Duration>, EtcdError> {
        self.cut_off("a keep-alive")?;
        let started = Instant::now();
        let deadline = started + self.timeouts.deadline;
        let mut last = String::from("not tried");
        while Instant::now() < deadline {
            let limit = self.timeouts.attempt.min(deadline - Instant::now());
            if self.keeper.as_ref().is_none_or(|(held, _, _)| *held != id) {
                let client = match self.connected(limit) {
                    Ok(client) => client,
                    Err(why) => {
                        last = why.clone();
                        self.next_endpoint(&why);
                        continue;
                    }
                };
                let mut client = client;
                match within(&self.runtime, limit, client.lease_keep_alive(id)) {
                    Ok(Ok((keeper, stream))) => self.keeper = Some((id, keeper, stream)),
                    Ok(Err(error)) => {
                        last = error.to_string();
                        self.next_endpoint(&last);
                        continue;
                    }
                    Err(_) => {
                        last = format!("no keep-alive stream within {limit:?}");
                        self.next_endpoint(&last);
                        continue;
                    }
                }
            }
            let (_, keeper, stream) = self.keeper.as_mut().expect("set above");
            let answered = within(&self.runtime, limit, async {
                keeper.keep_alive().await?;
                stream.message().await
            });
            match answered {
                Ok(Ok(Some(response))) => {
                    return Ok(
                        (response.ttl() > 0).then(|| Duration::from_secs(response.ttl() as u64))
                    )
                }
                Ok(Ok(None)) => {
                    last = "the keep-alive stream ended".into();
                    self.next_endpoint(&last);
                }
                Ok(Err(error)) => {
                    last = error.to_string();
                    self.next_endpoint(&last);
                }
                Err(_) => {
                    last = format!("no keep-alive answer within {limit:?}");
                    self.next_endpoint(&last);
                }
            }
        }
        Err(EtcdError::Unreachable {
            what: format!("a keep-alive of lease {id:x}"),
            endpoints: self.endpoint_list(),
            deadline: self.timeouts.deadline,
            last,
        })
    }

    /// What is left of lease `id`, or `None` when etcd no longer has it.
    pub fn time_to_live(&mut self, id: i64) -> Result<Option<Duration>, EtcdError> {
        self.call("a lease's time to live", |mut client| async move {
            let response = client.lease_time_to_live(id, None).await?;
            Ok((response.ttl() > 0).then(|| Duration::from_secs(response.ttl() as u64)))
        })
    }

    /// Ends lease `id` (its keys go with it).
    pub fn revoke(&mut self, id: i64) -> Result<(), EtcdError> {
        self.keeper = None;
        self.call("a lease revoke", |mut client| async move {
            client.lease_revoke(id).await.map(|_| ())
        })
    }

    /// From now on, [`Etcd::next_events`] gives the changes under `prefix` from revision
    /// `from` on.
    pub fn watch(&mut self, prefix: &str, from: i64) {
        self.watching = Some(Watching {
            prefix: prefix.to_string(),
            next: from,
            stream: None,
            asked: None,
            last_heard: Instant::now(),
        });
    }

    /// The changes seen within `wait` (empty when none), in order. A stream that broke, or
    /// that did not answer a progress request within the attempt timeout, is rebuilt from
    /// the next revision not yet seen, on the next endpoint.
    pub fn next_events(&mut self, wait: Duration) -> Result<Vec<Change>, EtcdError> {
        if let Err(error) = self.cut_off("a watch") {
            std::thread::sleep(wait);
            return Err(error);
        }
        let until = Instant::now() + wait;
        let attempt = self.timeouts.attempt;
        let Some(watching) = &self.watching else {
            return Err(EtcdError::Config("next_events before watch".into()));
        };
        if watching.stream.is_none() {
            let (prefix, next) = (watching.prefix.clone(), watching.next);
            let client = self
                .connected(attempt)
                .map_err(|why| self.unreachable_watch(why));
            let mut client = match client {
                Ok(client) => client,
                Err(error) => {
                    self.next_endpoint("watch");
                    return Err(error);
                }
            };
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(next)
                .with_progress_notify();
            match within(&self.runtime, attempt, client.watch(prefix, Some(options))) {
                Ok(Ok(stream)) => {
                    let watching = self.watching.as_mut().expect("checked");
                    watching.stream = Some(stream);
                    watching.asked = None;
                    watching.last_heard = Instant::now();
                }
                Ok(Err(error)) => {
                    let error = self.unreachable_watch(error.to_string());
                    self.next_endpoint("watch");
                    return Err(error);
                }
                Err(_) => {
                    let error = self.unreachable_watch(format!("no watch within {attempt:?}"));
                    self.next_endpoint("watch");
                    return Err(error);
                }
            }
        }
        let mut changes = Vec::new();
        loop {
            let now = Instant::now();
            let watching = self.watching.as_mut().expect("checked");
            if let Some(asked) = watching.asked {
                if now.duration_since(asked) > attempt {
                    let error = EtcdError::Unreachable {
                        what: "a watch".into(),
                        endpoints: self.endpoint_list(),
                        deadline: attempt,
                        last: "the watch stream did not answer a progress request".into(),
                    };
                    self.next_endpoint("the watch stream stopped answering");
                    return match changes.is_empty() {
                        true => Err(error),
                        false => Ok(changes),
                    };
                }
            } else if now.duration_since(watching.last_heard) >= attempt {
                // Quiet for a while: is the stream still there?
                let stream = watching.stream.as_mut().expect("built above");
                if within(&self.runtime, attempt, stream.request_progress())
                    .is_ok_and(|sent| sent.is_ok())
                {
                    watching.asked = Some(now);
                } else {
                    self.next_endpoint("the watch stream broke");
                    return Ok(changes);
                }
            }
            let watching = self.watching.as_mut().expect("checked");
            if now >= until {
                return Ok(changes);
            }
            let stream = watching.stream.as_mut().expect("built above");
            let limit = (until - now).min(attempt);
            match within(&self.runtime, limit, stream.message()) {
                Err(_) => {}
                Ok(Ok(Some(response))) => {
                    watching.last_heard = Instant::now();
                    watching.asked = None;
                    if response.compact_revision() > 0 {
                        let compacted = response.compact_revision();
                        self.watching.as_mut().expect("checked").stream = None;
                        return Err(EtcdError::Compacted(compacted));
                    }
                    if response.canceled() {
                        let reason = response.cancel_reason().to_string();
                        self.next_endpoint(&format!("the watch was cancelled: {reason}"));
                        return Ok(changes);
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let revision = kv.mod_revision();
                        watching.next = watching.next.max(revision + 1);
                        changes.push(match event.event_type() {
                            EventType::Put => Change::Put(kv_of(kv)),
                            EventType::Delete => Change::Delete {
                                key: kv.key().to_vec(),
                                revision,
                            },
                        });
                    }
                    if let Some(header) = response.header() {
                        // A progress answer: everything up to its revision was seen.
                        if response.events().is_empty() {
                            watching.next = watching.next.max(header.revision() + 1);
                        }
                    }
                    if !changes.is_empty() {
                        return Ok(changes);
                    }
                }
                Ok(Ok(None)) => {
                    self.next_endpoint("the watch stream ended");
                    return Ok(changes);
                }
                Ok(Err(error)) => {
                    self.next_endpoint(&format!("the watch stream failed: {error}"));
                    return Ok(changes);
                }
            }
        }
    }

    fn unreachable_watch(&self, last: String) -> EtcdError {
        EtcdError::Unreachable {
            what: "a watch".into(),
            endpoints: self.endpoint_list(),
            deadline: self.timeouts.attempt,
            last,
        }
    }
}

/// Runs `future` on `runtime` for at most `limit`; `Err(())` when it did not end in time.
fn within<F: Future>(
    runtime: &tokio::runtime::Runtime,
    limit: Duration,
    future: F,
) -> Result<F::Output, ()> {
    runtime
        .block_on(async move { tokio::time::timeout(limit, future).await })
        .map_err(|_| ())
}

fn kv_of(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn kvs_of(kvs: &[etcd_client::KeyValue]) -> Vec<Kv> {
    kvs.iter().map(kv_of).collect()
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |header| header.revision())
}
