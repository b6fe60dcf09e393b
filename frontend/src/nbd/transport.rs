//! A connection's byte stream: the non-blocking TCP socket, or TLS over it once the client
//! asked for `NBD_OPT_STARTTLS`.
//!
//! Both behave like a non-blocking socket: reads and writes return `WouldBlock` when the
//! socket has nothing to give or take, and the caller retries after epoll reports it ready.
//! With TLS, a write is accepted once rustls has encrypted it; ciphertext the socket did not
//! take yet waits in rustls and goes out with [`Transport::flush`].

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS set-up could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "could not read the TLS certificate chain {path}: {reason}; give a PEM file (nbd.tls_cert)"
    )]
    Certificate { path: String, reason: String },
    #[error("could not read the TLS private key {path}: {reason}; give a PEM file with one key (nbd.tls_key)")]
    Key { path: String, reason: String },
    #[error("the TLS certificate and key do not make a usable server identity: {0}")]
    Config(#[from] rustls::Error),
}

/// The server's TLS configuration from a PEM certificate chain and private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| TlsError::Certificate {
            path: cert.display().to_string(),
            reason: error.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.display().to_string(),
            reason: "it holds no certificate".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::Key {
        path: key.display().to_string(),
        reason: error.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A connection's stream.
pub struct Transport {
    pub stream: TcpStream,
    tls: Option<Box<ServerConnection>>,
}

impl Transport {
    pub fn plain(stream: TcpStream) -> Self {
        Self { stream, tls: None }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Switches to TLS as the server side. `early` holds bytes already read from the socket
    /// after the STARTTLS acknowledgement (the start of the client's TLS handshake).
    pub fn start_tls(&mut self, config: Arc<ServerConfig>, early: &[u8]) -> io::Result<()> {
        let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
        let mut early = early;
        while !early.is_empty() {
            tls.read_tls(&mut early)?;
            tls.process_new_packets()
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        }
        self.tls = Some(Box::new(tls));
        // A ClientHello that came with the acknowledgement gets its answer now.
        self.flush().map(|_| ())
    }

    /// Reads plaintext. `Ok(0)` is the end of the stream.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.stream.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
            // No plaintext buffered: take ciphertext from the socket.
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            let state = tls.process_new_packets();
            // Handshake messages and alerts go out whatever happened.
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(_) => {}
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) => return Err(error),
                }
            }
            state.map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
        }
    }

    /// Writes plaintext from several buffers; returns how much was taken.
    pub fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.stream.write_vectored(slices);
        }
        // Ciphertext still waiting for the socket comes first, so that rustls's buffer (and
        // with it what one connection holds in memory) stays bounded.
        if !self.flush()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let tls = self.tls.as_deref_mut().expect("checked above");
        let taken = tls.writer().write_vectored(slices)?;
        if taken == 0 && slices.iter().any(|slice| !slice.is_empty()) {
            // rustls's buffer is full: like a socket that cannot take more now.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.flush()?;
        Ok(taken)
    }

    /// Writes plaintext.
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(data)])
    }

    /// Sends the ciphertext rustls holds; true when none is left. Always true for plain TCP.
    pub fn flush(&mut self) -> io::Result<bool> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok(true);
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.stream) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }
}
