//! Peers of a cluster prove to each other that they hold the cluster key, with a
//! challenge-response in the session's first frames (the alternative to mutual TLS; sans-IO:
//! nonces and proofs in, verdicts out).
//!
//! ```text
//! connector                                   acceptor
//!   Hello    auth = Nc (32 random bytes)   ->
//!                                          <-  HelloOk  auth = Na (32 random bytes) || Pa
//!   Hello    auth = Pc                     ->  (checks Pc; only then serves the session)
//!
//! Pa = HMAC-SHA256(key, "fathom-replication/1 acceptor" | cluster | acceptor | connector | Nc | Na)
//! Pc = HMAC-SHA256(key, "fathom-replication/1 connector" | cluster | acceptor | connector | Nc | Na)
//! ```
//!
//! Each side's proof covers the other side's fresh nonce, so a recorded session cannot be
//! replayed, and the role label keeps one side's proof from being reflected back as the
//! other's. Strings are length-prefixed in the MAC input, so no two different tuples of
//! names give the same input. Proofs are checked in constant time (`ring::hmac::verify`).

use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of a nonce and of a proof.
pub const NONCE_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;
/// A cluster key has at least this many bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Why a peer was not let in, or a key not loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("could not read the cluster key {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the cluster key {path} has {len} bytes; it needs at least {MIN_KEY_BYTES} (make one with `head -c 32 /dev/urandom > {path}`, the same file on every node)")]
    ShortKey { path: String, len: usize },
    #[error("the peer's authentication is {len} bytes, not the {expected} this step takes")]
    Length { len: usize, expected: usize },
    #[error("peer {peer:?} does not hold this cluster's key (its proof does not verify): refused")]
    BadProof { peer: String },
    #[error("the system's random number generator failed")]
    Random,
}

/// The key every node of a cluster shares.
#[derive(Clone)]
pub struct ClusterKey(hmac::Key);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    pub fn new(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Reads the key file (`replication.key_file`).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|error| AuthError::Read {
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(AuthError::ShortKey {
                path: path.display().to_string(),
                len: bytes.len(),
            });
        }
        Ok(Self::new(&bytes))
    }
}

/// Who the two ends of a session are.
#[derive(Debug, Clone, Copy)]
pub struct Session<'a> {
    pub cluster: &'a str,
    pub acceptor: &'a str,
    pub connector: &'a str,
}

fn nonce() -> Result<[u8; NONCE_BYTES], AuthError> {
    let mut nonce = [0u8; NONCE_BYTES];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| AuthError::Random)?;
    Ok(nonce)
}

/// The MAC input of a proof: the role, then every name length-prefixed, then both nonces.
fn message(
    role: &str,
    session: &Session<'_>,
    connector_nonce: &[u8],
    acceptor_nonce: &[u8],
) -> Vec<u8> {
    let mut message = Vec::with_capacity(128);
    message.extend_from_slice(b"fathom-replication/1 ");
    message.extend_from_slice(role.as_bytes());
    for part in [session.cluster, session.acceptor, session.connector] {
        message.extend_from_slice(&(part.len() as u32).to_le_bytes());
        message.extend_from_slice(part.as_bytes());
    }
    message.extend_from_slice(connector_nonce);
    message.extend_from_slice(acceptor_nonce);
    message
}

fn check(key: &ClusterKey, message: &[u8], proof: &[u8], peer: &str) -> Result<(), AuthError> {
    hmac::verify(&key.0, message, proof).map_err(|_| AuthError::BadProof { peer: peer.into() })
}

/// The connecting side of the handshake.
pub struct Connector {
    key: ClusterKey,
    nonce: [u8; NONCE_BYTES],
}

impl Connector {
    /// A new session: the auth bytes of its first Hello.
    pub fn start(key: ClusterKey) -> Result<(Self, Vec<u8>), AuthError> {
        let nonce = nonce()?;
        Ok((Self { key, nonce }, nonce.to_vec()))
    }

    /// The HelloOk's auth bytes: checks the acceptor's proof and returns the auth bytes of
    /// the second Hello (this side's proof).
    pub fn on_hello_ok(&self, session: &Session<'_>, auth: &[u8]) -> Result<Vec<u8>, AuthError> {
        if auth.len() != NONCE_BYTES + PROOF_BYTES {
            return Err(AuthError::Length {
                len: auth.len(),
                expected: NONCE_BYTES + PROOF_BYTES,
            });
        }
        let (acceptor_nonce, proof) = auth.split_at(NONCE_BYTES);
        let expected = message("acceptor", session, &self.nonce, acceptor_nonce);
        check(&self.key, &expected, proof, session.acceptor)?;
        let mine = message("connector", session, &self.nonce, acceptor_nonce);
        Ok(hmac::sign(&self.key.0, &mine).as_ref().to_vec())
    }
}

/// The accepting side of the handshake.
pub struct Acceptor {
    key: ClusterKey,
    connector_nonce: [u8; NONCE_BYTES],
    nonce: [u8; NONCE_BYTES],
}

impl Acceptor {
    /// The first Hello's auth bytes (the connector's nonce): returns the HelloOk's auth bytes.
    pub fn on_hello(
        key: ClusterKey,
        session: &Session<'_>,
        auth: &[u8],
    ) -> Result<(Self, Vec<u8>), AuthError> {
        let connector_nonce: [u8; NONCE_BYTES] =
            auth.try_into().map_err(|_| AuthError::Length {
                len: auth.len(),
                expected: NONCE_BYTES,
            })?;
        let nonce = nonce()?;
        let proof = hmac::sign(
            &key.0,
            &message("acceptor", session, &connector_nonce, &nonce),
        );
        let mut reply = nonce.to_vec();
        reply.extend_from_slice(proof.as_ref());
        Ok((
            Self {
                key,
                connector_nonce,
                nonce,
            },
            reply,
        ))
    }

    /// The second Hello's auth bytes: the connector's proof. Ok: the peer holds the key.
    pub fn on_proof(&self, session: &Session<'_>, auth: &[u8]) -> Result<(), AuthError> {
        if auth.len() != PROOF_BYTES {
            return Err(AuthError::Length {
                len: auth.len(),
                expected: PROOF_BYTES,
            });
        }
        let expected = message("connector", session, &self.connector_nonce, &self.nonce);
        check(&self.key, &expected, auth, session.connector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: Session<'static> = Session {
        cluster: "test",
        acceptor: "n2",
        connector: "n1",
    };

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::new(&[byte; 32])
    }

    #[test]
    fn two_nodes_with_the_key_let_each_other_in() {
        let (connector, hello) = Connector::start(key(7)).unwrap();
        let (acceptor, hello_ok) = Acceptor::on_hello(key(7), &SESSION, &hello).unwrap();
        let proof = connector.on_hello_ok(&SESSION, &hello_ok).unwrap();
        acceptor.on_proof(&SESSION, &proof).unwrap();
    }

    #[test]
    fn a_node_without_the_key_is_refused_on_either_side() {
        // An acceptor with another key: the connector refuses it.
        let (connector, hello) = Connector::start(key(7)).unwrap();
        let (_, hello_ok) = Acceptor::on_hello(key(8), &SESSION, &hello).unwrap();
        let error = connector.on_hello_ok(&SESSION, &hello_ok).unwrap_err();
        assert_eq!(error, AuthError::BadProof { peer: "n2".into() });
        // A connector with another key: the acceptor refuses it.
        let (connector, hello) = Connector::start(key(8)).unwrap();
        let (acceptor, hello_ok) = Acceptor::on_hello(key(7), &SESSION, &hello).unwrap();
        assert!(connector.on_hello_ok(&SESSION, &hello_ok).is_err());
        let forged = vec![0u8; PROOF_BYTES];
        let error = acceptor.on_proof(&SESSION, &forged).unwrap_err();
        assert!(
            error.to_string().contains("\"n1\" does not hold"),
            "{error}"
        );
    }

    #[test]
    fn a_proof_does_not_carry_over_to_another_session_or_role() {
        let (connector, hello) = Connector::start(key(7)).unwrap();
        let (acceptor, hello_ok) = Acceptor::on_hello(key(7), &SESSION, &hello).unwrap();
        let proof = connector.on_hello_ok(&SESSION, &hello_ok).unwrap();
        // Replayed into a new session (new nonces): refused.
        let (_, hello2) = Connector::start(key(7)).unwrap();
        let (acceptor2, _) = Acceptor::on_hello(key(7), &SESSION, &hello2).unwrap();
        assert!(acceptor2.on_proof(&SESSION, &proof).is_err());
        // The acceptor's own proof reflected back as the connector's: refused.
        assert!(acceptor
            .on_proof(&SESSION, &hello_ok[NONCE_BYTES..])
            .is_err());
        // Another claimed identity: refused.
        let other = Session {
            connector: "n3",
            ..SESSION
        };
        assert!(acceptor.on_proof(&other, &proof).is_err());
        acceptor.on_proof(&SESSION, &proof).unwrap();
    }

    #[test]
    fn malformed_auth_bytes_and_short_keys_are_refused_with_the_reason() {
        assert!(matches!(
            Acceptor::on_hello(key(7), &SESSION, &[1, 2, 3]),
            Err(AuthError::Length {
                len: 3,
                expected: 32
            })
        ));
        let (connector, _) = Connector::start(key(7)).unwrap();
        assert!(matches!(
            connector.on_hello_ok(&SESSION, &[0; 10]),
            Err(AuthError::Length { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        std::fs::write(&path, b"short").unwrap();
        let error = ClusterKey::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("at least 32") && error.contains("/dev/urandom"),
            "{error}"
        );
        std::fs::write(&path, [9u8; 32]).unwrap();
        ClusterKey::load(&path).unwrap();
        assert!(ClusterKey::load(&dir.path().join("missing")).is_err());
    }
}
