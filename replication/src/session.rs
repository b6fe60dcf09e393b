//! A replication session's opening, sans-IO: frames in, frames out. The connecting node (a
//! primary, or a new primary probing the survivors) sends Hello; the accepting node (a
//! replica) checks the cluster, the protocol version and the peer's authentication, and
//! answers HelloOk, or Refused with the reason and closes. Only then do volume frames flow.
//!
//! Authentication is either the transport's (mutual TLS: the session is already between
//! nodes of the cluster's CA) or the cluster key's challenge-response ([`crate::auth`]), which
//! takes a second Hello from the connector carrying its proof:
//!
//! ```text
//! connector                               acceptor
//!   Hello (versions, node, cluster, Nc, volumes)  ->
//!                                             <- HelloOk (version, node, cluster, Na|Pa, volumes)
//!   Hello (same, auth = Pc)                   ->   key only: checked before anything else
//! ```

use crate::auth::{self, Acceptor as KeyAcceptor, ClusterKey, Connector as KeyConnector};
use crate::proto::{
    encode, refusal, Frame, Header, Hello, Kind, ProtoError, MAX_VERSION, MIN_VERSION,
};

/// How peers prove they belong to the cluster.
#[derive(Debug, Clone)]
pub enum PeerAuth {
    /// The transport did: mutual TLS with the cluster's CA.
    Tls,
    /// The cluster key's challenge-response in the Hellos.
    Key(ClusterKey),
}

/// Why a session was not opened; the peer is told in a Refused frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("expected {expected}, got a {got} frame")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("peer {peer:?} is of cluster {theirs:?}, this node of {ours:?}")]
    Cluster {
        peer: String,
        theirs: String,
        ours: String,
    },
    #[error("peer {peer:?} speaks protocol versions {min} to {max}; this node speaks {MIN_VERSION} to {MAX_VERSION}")]
    Version { peer: String, min: u8, max: u8 },
    #[error("peer {peer:?} asked for volume {volume:?}, which this node does not hold")]
    UnknownVolume { peer: String, volume: String },
    #[error("the proof's Hello does not match the first one (node {first:?} then {then:?})")]
    Changed { first: String, then: String },
    #[error("authentication: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("the peer refused the session: {0}")]
    Refused(String),
    #[error("this node's Hello cannot be sent: {0}")]
    Encode(#[from] ProtoError),
}

impl SessionError {
    /// The Refused frame's reason code for it.
    fn refusal(&self) -> u16 {
        match self {
            SessionError::Cluster { .. } => refusal::CLUSTER,
            SessionError::Version { .. } => refusal::VERSION,
            SessionError::UnknownVolume { .. } => refusal::UNKNOWN_VOLUME,
            _ => refusal::AUTH,
        }
    }
}

/// A session that is open: who is at the other end, and the volumes its frames index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub peer: String,
    pub version: u8,
    pub volumes: Vec<String>,
}

fn hello_frame(
    kind: Kind,
    node: &str,
    cluster: &str,
    auth: &[u8],
    volumes: &[String],
    version: Option<u8>,
) -> Result<Vec<u8>, SessionError> {
    let (min_version, max_version) = match version {
        Some(version) => (version, version),
        None => (MIN_VERSION, MAX_VERSION),
    };
    let hello = Hello {
        min_version,
        max_version,
        node_id: node,
        cluster,
        auth,
        volumes: volumes.iter().map(String::as_str).collect(),
    };
    let mut payload = Vec::new();
    let mut out = Vec::new();
    hello.encode(&mut payload)?;
    encode(&Header::new(kind), &payload, &mut out)?;
    Ok(out)
}

/// A Refused frame for `error`.
fn refused(error: &SessionError) -> Vec<u8> {
    let mut out = Vec::new();
    let header = Header {
        status: error.refusal(),
        ..Header::new(Kind::Refused)
    };
    let _ = encode(&header, error.to_string().as_bytes(), &mut out);
    out
}

fn hello_of<'a>(
    frame: &Frame<'a>,
    expected: &'static str,
    kind: Kind,
) -> Result<Hello<'a>, SessionError> {
    match frame.hello() {
        Some(hello) if frame.kind() == kind => Ok(hello),
        _ if frame.kind() == Kind::Refused => Err(SessionError::Refused(
            frame
                .refusal_text()
                .unwrap_or("(no reason given)")
                .to_string(),
        )),
        _ => Err(SessionError::Unexpected {
            expected,
            got: frame.kind().name(),
        }),
    }
}

/// What the accepting side does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send these bytes and wait for the next frame.
    Send(Vec<u8>),
    /// Send these bytes (maybe none); the session is open.
    Open(Vec<u8>, Opened),
    /// Send these bytes (a Refused frame), then close: the reason is logged.
    Refuse(Vec<u8>, SessionError),
}

enum AcceptorState {
    AwaitHello,
    AwaitProof(Box<(Opened, KeyAcceptor)>),
    Done,
}

/// The accepting node's side of a session opening.
pub struct AcceptorSession {
    node: String,
    cluster: String,
    auth: PeerAuth,
    state: AcceptorState,
}

impl AcceptorSession {
    pub fn new(node: &str, cluster: &str, auth: PeerAuth) -> Self {
        Self {
            node: node.into(),
            cluster: cluster.into(),
            auth,
            state: AcceptorState::AwaitHello,
        }
    }

    /// The next frame of the opening; `holds(volume)` says whether this node has a copy.
    pub fn on_frame(&mut self, frame: &Frame<'_>, holds: impl Fn(&str) -> bool) -> Step {
        let state = std::mem::replace(&mut self.state, AcceptorState::Done);
        let result = match state {
            AcceptorState::AwaitHello => self.on_hello(frame, holds),
            AcceptorState::AwaitProof(waiting) => {
                let (opened, key) = *waiting;
                self.on_proof(frame, opened, key)
            }
            AcceptorState::Done => Err(SessionError::Unexpected {
                expected: "nothing (the session is open or refused)",
                got: frame.kind().name(),
            }),
        };
        result.unwrap_or_else(|error| Step::Refuse(refused(&error), error))
    }

    fn on_hello(
        &mut self,
        frame: &Frame<'_>,
        holds: impl Fn(&str) -> bool,
    ) -> Result<Step, SessionError> {
        let hello = hello_of(frame, "a Hello", Kind::Hello)?;
        let peer = hello.node_id.to_string();
        if hello.cluster != self.cluster {
            return Err(SessionError::Cluster {
                peer,
                theirs: hello.cluster.into(),
                ours: self.cluster.clone(),
            });
        }
        let version = hello.negotiate().ok_or(SessionError::Version {
            peer: peer.clone(),
            min: hello.min_version,
            max: hello.max_version,
        })?;
        if let Some(volume) = hello.volumes.iter().find(|volume| !holds(volume)) {
            return Err(SessionError::UnknownVolume {
                peer,
                volume: volume.to_string(),
            });
        }
        let opened = Opened {
            peer,
            version,
            volumes: hello
                .volumes
                .iter()
                .map(|volume| volume.to_string())
                .collect(),
        };
        match &self.auth {
            PeerAuth::Tls => {
                let reply = hello_frame(
                    Kind::HelloOk,
                    &self.node,
                    &self.cluster,
                    &[],
                    &opened.volumes,
                    Some(version),
                )?;
                Ok(Step::Open(reply, opened))
            }
            PeerAuth::Key(key) => {
                let session = auth::Session {
                    cluster: &self.cluster,
                    acceptor: &self.node,
                    connector: &opened.peer,
                };
                let (key, auth) = KeyAcceptor::on_hello(key.clone(), &session, hello.auth)?;
                let reply = hello_frame(
                    Kind::HelloOk,
                    &self.node,
                    &self.cluster,
                    &auth,
                    &opened.volumes,
                    Some(version),
                )?;
                self.state = AcceptorState::AwaitProof(Box::new((opened, key)));
                Ok(Step::Send(reply))
            }
        }
    }

    fn on_proof(
        &mut self,
        frame: &Frame<'_>,
        opened: Opened,
        key: KeyAcceptor,
    ) -> Result<Step, SessionError> {
        let hello = hello_of(frame, "the Hello with the peer's proof", Kind::Hello)?;
        if hello.node_id != opened.peer || hello.cluster != self.cluster {
            return Err(SessionError::Changed {
                first: opened.peer,
                then: hello.node_id.into(),
            });
        }
        let session = auth::Session {
            cluster: &self.cluster,
            acceptor: &self.node,
            connector: &opened.peer,
        };
        key.on_proof(&session, hello.auth)?;
        Ok(Step::Open(Vec::new(), opened))
    }
}

enum ConnectorState {
    AwaitHelloOk(Option<Box<KeyConnector>>),
    Done,
}

/// The connecting node's side of a session opening.
pub struct ConnectorSession {
    node: String,
    cluster: String,
    peer: String,
    volumes: Vec<String>,
    state: ConnectorState,
}

impl ConnectorSession {
    /// Opens a session to node `peer` for `volumes`: the first Hello to send.
    pub fn start(
        node: &str,
        cluster: &str,
        peer: &str,
        volumes: Vec<String>,
        auth: &PeerAuth,
    ) -> Result<(Self, Vec<u8>), SessionError> {
        let (key, nonce) = match auth {
            PeerAuth::Tls => (None, Vec::new()),
            PeerAuth::Key(key) => {
                let (connector, nonce) = KeyConnector::start(key.clone())?;
                (Some(Box::new(connector)), nonce)
            }
        };
        let hello = hello_frame(Kind::Hello, node, cluster, &nonce, &volumes, None)?;
        Ok((
            Self {
                node: node.into(),
                cluster: cluster.into(),
                peer: peer.into(),
                volumes,
                state: ConnectorState::AwaitHelloOk(key),
            },
            hello,
        ))
    }

    /// The acceptor's answer: the session is open (with the proof Hello to send, empty for
    /// TLS), or refused.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> Result<(Vec<u8>, Opened), SessionError> {
        let ConnectorState::AwaitHelloOk(key) =
            std::mem::replace(&mut self.state, ConnectorState::Done)
        else {
            return Err(SessionError::Unexpected {
                expected: "nothing (the session is open)",
                got: frame.kind().name(),
            });
        };
        let hello = hello_of(frame, "a HelloOk", Kind::HelloOk)?;
        if hello.cluster != self.cluster {
            return Err(SessionError::Cluster {
                peer: hello.node_id.into(),
                theirs: hello.cluster.into(),
                ours: self.cluster.clone(),
            });
        }
        if hello.node_id != self.peer {
            return Err(SessionError::Changed {
                first: self.peer.clone(),
                then: hello.node_id.into(),
            });
        }
        let version = hello.negotiate().ok_or(SessionError::Version {
            peer: self.peer.clone(),
            min: hello.min_version,
            max: hello.max_version,
        })?;
        let proof = match key {
            None => Vec::new(),
            Some(key) => {
                let session = auth::Session {
                    cluster: &self.cluster,
                    acceptor: &self.peer,
                    connector: &self.node,
                };
                let proof = key.on_hello_ok(&session, hello.auth)?;
                hello_frame(
                    Kind::Hello,
                    &self.node,
                    &self.cluster,
                    &proof,
                    &self.volumes,
                    None,
                )?
            }
        };
        Ok((
            proof,
            Opened {
                peer: self.peer.clone(),
                version,
                volumes: self.volumes.clone(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FrameDecoder;

    fn key(byte: u8) -> PeerAuth {
        PeerAuth::Key(ClusterKey::new(&[byte; 32]))
    }

    /// Decodes the one frame in `bytes` and hands it to `f`.
    fn with_frame<T>(bytes: &[u8], f: impl FnOnce(&Frame<'_>) -> T) -> T {
        let mut decoder = FrameDecoder::default();
        assert_eq!(decoder.push(bytes), bytes.len());
        let frame = decoder.next().expect("a frame").expect("a valid frame");
        f(&frame)
    }

    fn holds(volume: &str) -> bool {
        volume.starts_with("vol")
    }

    /// Runs an opening between the two ends; the acceptor's result and the connector's.
    fn open(
        connector_auth: PeerAuth,
        acceptor_auth: PeerAuth,
        cluster: &str,
        volumes: &[&str],
    ) -> (Result<Opened, SessionError>, Result<Opened, SessionError>) {
        let volumes: Vec<String> = volumes.iter().map(|v| v.to_string()).collect();
        let (mut connector, hello) =
            ConnectorSession::start("n1", cluster, "n2", volumes, &connector_auth).unwrap();
        let mut acceptor = AcceptorSession::new("n2", "test", acceptor_auth);
        let reply = match with_frame(&hello, |frame| acceptor.on_frame(frame, holds)) {
            Step::Refuse(bytes, error) => {
                let seen =
                    with_frame(&bytes, |frame| connector.on_frame(frame)).map(|(_, opened)| opened);
                return (Err(error), seen);
            }
            Step::Open(bytes, opened) => {
                let seen =
                    with_frame(&bytes, |frame| connector.on_frame(frame)).map(|(proof, opened)| {
                        assert!(proof.is_empty(), "TLS: no proof Hello");
                        opened
                    });
                return (Ok(opened), seen);
            }
            Step::Send(bytes) => bytes,
        };
        let (proof, connector_opened) = match with_frame(&reply, |frame| connector.on_frame(frame))
        {
            Ok(pair) => pair,
            Err(error) => {
                return (
                    Err(SessionError::Refused("connector gave up".into())),
                    Err(error),
                )
            }
        };
        let step = with_frame(&proof, |frame| acceptor.on_frame(frame, holds));
        match step {
            Step::Open(bytes, opened) => {
                assert!(bytes.is_empty());
                (Ok(opened), Ok(connector_opened))
            }
            Step::Refuse(_, error) => (Err(error), Ok(connector_opened)),
            Step::Send(_) => panic!("a third round"),
        }
    }

    #[test]
    fn nodes_with_the_cluster_key_open_a_session_for_their_volumes() {
        let (acceptor, connector) = open(key(1), key(1), "test", &["vol0", "vol1"]);
        let expected = Opened {
            peer: "n1".into(),
            version: 1,
            volumes: vec!["vol0".into(), "vol1".into()],
        };
        assert_eq!(acceptor.unwrap(), expected);
        assert_eq!(connector.unwrap().peer, "n2");
    }

    #[test]
    fn with_mutual_tls_the_hellos_carry_no_proof() {
        let (acceptor, connector) = open(PeerAuth::Tls, PeerAuth::Tls, "test", &["vol0"]);
        assert_eq!(acceptor.unwrap().volumes, ["vol0"]);
        assert_eq!(connector.unwrap().volumes, ["vol0"]);
    }

    #[test]
    fn a_peer_without_the_key_of_another_cluster_or_asking_for_a_volume_not_here_is_refused_with_the_reason(
    ) {
        // The acceptor's key differs: the connector refuses the acceptor's proof.
        let (_, connector) = open(key(1), key(2), "test", &["vol0"]);
        assert!(
            matches!(
                connector,
                Err(SessionError::Auth(auth::AuthError::BadProof { .. }))
            ),
            "{connector:?}"
        );
        // Another cluster: refused by the acceptor, and the connector reads why.
        let (acceptor, connector) = open(key(1), key(1), "other", &["vol0"]);
        assert!(
            matches!(acceptor, Err(SessionError::Cluster { .. })),
            "{acceptor:?}"
        );
        let text = connector.unwrap_err().to_string();
        assert!(
            text.contains("refused") && text.contains("cluster \"other\""),
            "{text}"
        );
        // A volume this node does not hold.
        let (acceptor, connector) = open(key(1), key(1), "test", &["vol0", "db9"]);
        assert!(
            matches!(acceptor, Err(SessionError::UnknownVolume { .. })),
            "{acceptor:?}"
        );
        assert!(connector.unwrap_err().to_string().contains("\"db9\""));
        // Key on one side, TLS on the other: no proof where one is needed.
        let (acceptor, _) = open(PeerAuth::Tls, key(1), "test", &["vol0"]);
        assert!(
            matches!(acceptor, Err(SessionError::Auth(_))),
            "{acceptor:?}"
        );
    }

    #[test]
    fn a_hello_that_cannot_be_encoded_is_an_error_not_an_empty_frame() {
        let error = ConnectorSession::start("", "test", "n2", vec!["vol0".into()], &PeerAuth::Tls)
            .err()
            .expect("an empty node id cannot be sent");
        assert!(matches!(error, SessionError::Encode(_)), "{error:?}");
    }

    #[test]
    fn a_volume_frame_before_the_session_is_open_is_refused() {
        let mut acceptor = AcceptorSession::new("n2", "test", key(1));
        let mut bytes = Vec::new();
        encode(
            &Header {
                epoch: 1,
                ..Header::new(Kind::Flush)
            },
            &[],
            &mut bytes,
        )
        .unwrap();
        let step = with_frame(&bytes, |frame| acceptor.on_frame(frame, holds));
        let Step::Refuse(reply, error) = step else {
            panic!("{step:?}");
        };
        assert!(matches!(
            error,
            SessionError::Unexpected { got: "Flush", .. }
        ));
        with_frame(&reply, |frame| {
            assert_eq!(frame.kind(), Kind::Refused);
            assert!(frame.refusal_text().unwrap().contains("expected a Hello"));
        });
    }
}
