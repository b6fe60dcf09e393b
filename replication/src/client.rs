//! A blocking session to one node's replica service, for work off the reactors that waits for
//! each answer: a promote's claim, probes and reads. The frames are the same sans-IO codec's
//! and the opening is [`crate::session`]'s; only the socket waits.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use fathom_net::Transport;

use crate::proto::{encode, FrameDecoder, Header, DEFAULT_MAX_PAYLOAD_BYTES};
use crate::session::{ConnectorSession, PeerAuth};

/// Why a blocking session failed; the text says what and where.
#[derive(Debug, thiserror::Error)]
#[error("node {node} at {address}: {what}")]
pub struct ClientError {
    pub node: String,
    pub address: SocketAddr,
    pub what: String,
}

/// Who opens the session, and how.
pub struct Opener<'a> {
    pub node: &'a str,
    pub cluster: &'a str,
    pub auth: &'a PeerAuth,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The largest payload an answer may carry.
    pub max_payload: u32,
    pub timeout: Duration,
}

/// An open session for one volume.
pub struct BlockingSession {
    transport: Transport,
    decoder: FrameDecoder,
    next_request: u64,
    node: String,
    address: SocketAddr,
}

impl BlockingSession {
    /// Connects to node `peer` at `address` and opens a session for `volume`.
    pub fn open(
        opener: &Opener<'_>,
        peer: &str,
        address: SocketAddr,
        volume: &str,
    ) -> Result<Self, ClientError> {
        let fail = |what: String| ClientError {
            node: peer.into(),
            address,
            what,
        };
        if fathom_net::fault::partitioned() {
            return Err(fail(fathom_net::fault::partition_error().to_string()));
        }
        let stream = TcpStream::connect_timeout(&address, opener.timeout)
            .map_err(|error| fail(format!("cannot connect: {error}")))?;
        stream
            .set_read_timeout(Some(opener.timeout))
            .and_then(|()| stream.set_write_timeout(Some(opener.timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|error| fail(format!("cannot set up the socket: {error}")))?;
        let mut transport = Transport::plain(stream);
        if let Some(tls) = &opener.tls {
            transport
                .start_tls_client(tls.clone(), &address.ip().to_string())
                .map_err(|error| fail(format!("TLS: {error}")))?;
        }
        let mut session = Self {
            transport,
            decoder: FrameDecoder::new(
                opener
                    .max_payload
                    .max(DEFAULT_MAX_PAYLOAD_BYTES - 4096)
                    .saturating_add(4096),
            ),
            next_request: 1,
            node: peer.into(),
            address,
        };
        let (mut connector, hello) = ConnectorSession::start(
            opener.node,
            opener.cluster,
            peer,
            vec![volume.to_string()],
            opener.auth,
        )
        .map_err(|error| fail(error.to_string()))?;
        session.send(&hello)?;
        let proof = {
            let frame = session.receive()?;
            let (proof, _) = connector
                .on_frame(&frame_of(&frame))
                .map_err(|error| fail(error.to_string()))?;
            proof
        };
        if !proof.is_empty() {
            session.send(&proof)?;
        }
        Ok(session)
    }

    fn fail(&self, what: String) -> ClientError {
        ClientError {
            node: self.node.clone(),
            address: self.address,
            what,
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let mut sent = 0;
        while sent < bytes.len() {
            match self.transport.write(&bytes[sent..]) {
                Ok(0) => return Err(self.fail("the connection closed".into())),
                Ok(written) => sent += written,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.fail(format!("writing: {error}"))),
            }
        }
        loop {
            match self.transport.flush() {
                Ok(true) => return Ok(()),
                Ok(false) => std::thread::sleep(Duration::from_millis(1)),
                Err(error) => return Err(self.fail(format!("writing: {error}"))),
            }
        }
    }

    /// The next frame, as owned bytes (header and payload).
    fn receive(&mut self) -> Result<(Header, Vec<u8>), ClientError> {
        loop {
            match self.decoder.next() {
                Some(Ok(frame)) => return Ok((frame.header, frame.payload.to_vec())),
                Some(Err(error)) => return Err(self.fail(format!("bad frame: {error}"))),
                None => {}
            }
            let spare = self.decoder.spare();
            match self.transport.read(spare) {
                Ok(0) => return Err(self.fail("the connection closed".into())),
                Ok(read) => self.decoder.commit(read),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.fail(format!("no answer: {error}"))),
            }
        }
    }

    /// Sends `header` (its request id chosen here) with `payload`, and returns the answer
    /// to it.
    pub fn request(
        &mut self,
        header: Header,
        payload: &[u8],
    ) -> Result<(Header, Vec<u8>), ClientError> {
        if fathom_net::fault::partitioned() {
            return Err(ClientError {
                node: self.node.clone(),
                address: self.address,
                what: fathom_net::fault::partition_error().to_string(),
            });
        }
        let request_id = self.next_request;
        self.next_request += 1;
        let mut bytes = Vec::with_capacity(crate::proto::HEADER_LEN + payload.len());
        encode(
            &Header {
                request_id,
                ..header
            },
            payload,
            &mut bytes,
        )
        .map_err(|error| self.fail(error.to_string()))?;
        self.send(&bytes)?;
        loop {
            let (answer, payload) = self.receive()?;
            if answer.request_id == request_id {
                return Ok((answer, payload));
            }
        }
    }
}

/// A frame over owned bytes, for the session's opening.
fn frame_of(owned: &(Header, Vec<u8>)) -> crate::proto::Frame<'_> {
    crate::proto::Frame {
        header: owned.0,
        payload: &owned.1,
    }
}
