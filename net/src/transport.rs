//! A connection's byte stream: the non-blocking TCP socket, or TLS over it (the NBD server
//! after `NBD_OPT_STARTTLS`, replication peers from their first byte).
//!
//! Both behave like a non-blocking socket: reads and writes return `WouldBlock` when the
//! socket has nothing to give or take, and the caller retries after epoll reports it ready.
//! With TLS, a write is accepted once rustls has encrypted it; ciphertext the socket did not
//! take yet waits in rustls and goes out with [`Transport::flush`].

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS set-up could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not read the TLS certificate chain {path}: {reason}; give a PEM file")]
    Certificate { path: String, reason: String },
    #[error("could not read the TLS private key {path}: {reason}; give a PEM file with one key")]
    Key { path: String, reason: String },
    #[error("could not read the TLS certificate authority {path}: {reason}; give a PEM file with the CA certificate")]
    Authority { path: String, reason: String },
    #[error("the TLS certificates and key do not make a usable identity: {0}")]
    Config(#[from] rustls::Error),
    #[error("{name:?} is not a name a TLS certificate can be checked against: {reason}")]
    ServerName { name: String, reason: String },
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|error| TlsError::Certificate {
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: path.display().to_string(),
            reason: "it holds no certificate".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| TlsError::Key {
        path: path.display().to_string(),
        reason: error.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS configuration from a PEM certificate chain and private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certificates(cert)?, private_key(key)?)?;
    Ok(Arc::new(config))
}

/// A server's TLS configuration for mutual TLS: its own chain and key, and only clients
/// whose certificate the CA in `ca` signed are let in (replication peers of one cluster).
pub fn server_config_mutual(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(authority(ca)?),
        provider(),
    )
    .build()
    .map_err(|error| TlsError::Authority {
        path: ca.display().to_string(),
        reason: error.to_string(),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(cert)?, private_key(key)?)?;
    Ok(Arc::new(config))
}

/// The CA certificates in a PEM file, as a root store.
pub fn authority(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = certificates(ca).map_err(|error| match error {
        TlsError::Certificate { path, reason } => TlsError::Authority { path, reason },
        other => other,
    })?;
    for cert in certs {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A client's TLS configuration that trusts the CA certificates in `ca` and, for mutual TLS,
/// shows its own certificate chain and key.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(authority(ca)?);
    let config = match identity {
        Some((cert, key)) => {
            builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A connection's stream.
pub struct Transport {
    pub stream: TcpStream,
    tls: Option<Box<Connection>>,
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
        let mut tls = Connection::Server(ServerConnection::new(config).map_err(io::Error::other)?);
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

    /// Switches to TLS as the client side, checking the server's certificate against `name`
    /// (a DNS name or an IP address). The handshake runs as the stream is read and written.
    pub fn start_tls_client(
        &mut self,
        config: Arc<ClientConfig>,
        name: &str,
    ) -> Result<(), TlsError> {
        let server_name =
            rustls_pki_types::ServerName::try_from(name.to_string()).map_err(|error| {
                TlsError::ServerName {
                    name: name.into(),
                    reason: error.to_string(),
                }
            })?;
        let tls = ClientConnection::new(config, server_name)?;
        self.tls = Some(Box::new(Connection::Client(tls)));
        // The ClientHello goes out now if the socket takes it.
        let _ = self.flush();
        Ok(())
    }

    /// The peer's certificate chain, once a TLS handshake has finished (mutual TLS: the
    /// client's, on the server side).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.tls.as_deref()?.peer_certificates()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// A CA, and a certificate for 127.0.0.1 signed by it for each of `names`, made with
    /// openssl (ECDSA P-256) in `dir`: ca-cert.pem, NAME-cert.pem, NAME-key.pem.
    fn make_certificates(dir: &Path, names: &[&str]) {
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl (Debian's openssl; scripts/test installs it)");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca-key.pem",
                    "-out",
                    "ca-cert.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=fathom-test-ca",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        for name in names {
            let (key, csr, cert) = (
                format!("{name}-key.pem"),
                format!("{name}.csr"),
                format!("{name}-cert.pem"),
            );
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-keyout",
                        &key,
                        "-out",
                        &csr,
                        "-subj",
                        &format!("/CN={name}"),
                    ],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ]);
        }
    }

    /// Moves bytes both ways until `done` or the deadline: a non-blocking TLS handshake on two
    /// ends of a loopback connection. Returns what the server read.
    fn exchange(
        server: &mut Transport,
        client: &mut Transport,
        message: &[u8],
    ) -> io::Result<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while received.len() < message.len() {
            assert!(Instant::now() < deadline, "the exchange did not finish");
            if sent < message.len() {
                match client.write(&message[sent..]) {
                    Ok(n) => sent += n,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Err(error),
                }
            }
            match server.read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
            // The client side reads too: the server's handshake messages.
            match client.read(&mut buf) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
            client.flush()?;
            server.flush()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(received)
    }

    fn pair() -> (Transport, Transport) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        for stream in [&client, &server] {
            stream.set_nonblocking(true).unwrap();
        }
        (Transport::plain(server), Transport::plain(client))
    }

    #[test]
    fn mutual_tls_lets_a_peer_of_the_cluster_in_and_refuses_one_without_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        make_certificates(dir.path(), &["n1", "n2"]);
        let pem = |name: &str| -> PathBuf { dir.path().join(name) };
        let server_config =
            server_config_mutual(&pem("n1-cert.pem"), &pem("n1-key.pem"), &pem("ca-cert.pem"))
                .unwrap();

        // A peer with a certificate of the cluster's CA: the bytes arrive, and the server
        // sees who it is.
        let (mut server, mut client) = pair();
        server.start_tls(server_config.clone(), &[]).unwrap();
        let config = client_config(
            &pem("ca-cert.pem"),
            Some((&pem("n2-cert.pem"), &pem("n2-key.pem"))),
        )
        .unwrap();
        client.start_tls_client(config, "127.0.0.1").unwrap();
        let received = exchange(&mut server, &mut client, b"replicate this").unwrap();
        assert_eq!(received, b"replicate this");
        assert!(server.is_tls() && client.is_tls());
        assert_eq!(server.peer_certificates().map(<[_]>::len), Some(1));

        // A client that shows no certificate is refused by the server.
        let (mut server, mut client) = pair();
        server.start_tls(server_config, &[]).unwrap();
        let config = client_config(&pem("ca-cert.pem"), None).unwrap();
        client.start_tls_client(config, "127.0.0.1").unwrap();
        let error = exchange(&mut server, &mut client, b"let me in").unwrap_err();
        assert!(
            error.to_string().to_lowercase().contains("certificate"),
            "{error}"
        );
    }

    #[test]
    fn unreadable_files_are_named_in_the_error() {
        let error = client_config(Path::new("/nonexistent/ca.pem"), None).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("/nonexistent/ca.pem") && text.contains("certificate authority"),
            "{text}"
        );
        let error = server_config(
            Path::new("/nonexistent/cert.pem"),
            Path::new("/nonexistent/key.pem"),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/cert.pem"),
            "{error}"
        );
    }
}
