//! Mutual TLS for every TCP connection of a cluster, with rustls.
//!
//! Every process has a certificate from the cluster's CA. A node's
//! certificate names its node id (a DNS subject alternative name), and is
//! good for both ends of a connection (`serverAuth` and `clientAuth`): a
//! node opens connections (to the message server, and direct channels)
//! and accepts them (direct channels). The message server's certificate
//! names `tls.server_name`.
//!
//! - The opener checks that the acceptor's certificate chains to the CA
//!   and names whom it meant to reach (the message server's name, or the
//!   node id of a direct channel's peer).
//! - The acceptor requires a certificate that chains to the CA, and, once
//!   the hello says who the opener claims to be, that it names that node
//!   id ([`Tls::names`]): a certificate for X cannot register as Y.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

/// Why TLS could not be set up, or a peer's certificate is not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A PEM file holds no certificate or key of the kind needed.
    #[error("{what}: {detail}")]
    Pem {
        /// Which file or part.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the configuration (a key that does not match the
    /// certificate, say).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The CA could not be used to verify peers.
    #[error("TLS configuration: {0}")]
    Verifier(String),
}

/// A process's TLS setup: its certificate and key, and the cluster's CA.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    names: Arc<WebPkiServerVerifier>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads the CA certificate, this process's certificate chain and its
    /// private key from PEM files.
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the file or what is wrong with it.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        Tls::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
    }

    /// The same from PEM text.
    ///
    /// # Errors
    ///
    /// [`TlsError`] saying what is wrong.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Tls, TlsError> {
        let pem = |what, e: rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            detail: e.to_string(),
        };
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(ca) {
            roots.add(der.map_err(|e| pem("tls.ca_file", e))?)?;
        }
        if roots.is_empty() {
            return Err(TlsError::Pem {
                what: "tls.ca_file",
                detail: "holds no certificate".into(),
            });
        }
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem("tls.cert_file", e))?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "tls.cert_file",
                detail: "holds no certificate".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| pem("tls.key_file", e))?;
        let roots = Arc::new(roots);
        let verifier = |e: rustls::server::VerifierBuilderError| TlsError::Verifier(e.to_string());
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(verifier)?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key.clone_key())?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)?;
        let names = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(verifier)?;
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(client)),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            names,
        })
    }

    /// Opens TLS on `stream` to the peer whose certificate must name
    /// `peer` (the message server's name, or a node id).
    ///
    /// # Errors
    ///
    /// The TLS handshake's error: the peer's certificate does not chain to
    /// the CA or does not name `peer`, or i/o.
    pub async fn connect(&self, stream: TcpStream, peer: &str) -> io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(peer.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{peer:?} is not a name a certificate can carry"),
            )
        })?;
        Ok(self.connector.connect(name, stream).await?.into())
    }

    /// Accepts TLS on `stream`: the opener's certificate must chain to the
    /// CA (which name it carries is checked once its hello names it, with
    /// [`Tls::names`]).
    ///
    /// # Errors
    ///
    /// The TLS handshake's error.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        Ok(self.acceptor.accept(stream).await?.into())
    }

    /// The certificates the peer of `stream` presented (kept for
    /// [`Tls::names`] once the stream is split).
    pub fn peer_certificates(stream: &TlsStream<TcpStream>) -> Vec<CertificateDer<'static>> {
        let certs = match stream {
            TlsStream::Client(s) => s.get_ref().1.peer_certificates(),
            TlsStream::Server(s) => s.get_ref().1.peer_certificates(),
        };
        certs.map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Whether the peer's certificates (see [`Tls::peer_certificates`])
    /// chain to the CA and name `id`.
    pub fn names(&self, certs: &[CertificateDer<'static>], id: &str) -> bool {
        let Some((end, intermediates)) = certs.split_first() else {
            return false;
        };
        let Ok(name) = ServerName::try_from(id.to_owned()) else {
            return false;
        };
        self.names
            .verify_server_cert(end, intermediates, &name, &[], UnixTime::now())
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA, and certificates from it for `names`.
    pub(crate) fn pki(names: &[&str]) -> (String, Vec<(String, String)>) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).expect("ca");
        let issued = names
            .iter()
            .map(|n| {
                let key = rcgen::KeyPair::generate().expect("key");
                let mut params =
                    rcgen::CertificateParams::new(vec![(*n).to_owned()]).expect("params");
                params.extended_key_usages = vec![
                    rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                    rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                ];
                let cert = params.signed_by(&key, &ca, &ca_key).expect("cert");
                (cert.pem(), key.serialize_pem())
            })
            .collect();
        (ca.pem(), issued)
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let (ca, issued) = pki(&["a"]);
        let (cert, key) = &issued[0];
        assert!(Tls::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes()).is_ok());
        let cases = [
            ("no CA", "", cert.as_str(), key.as_str(), "tls.ca_file"),
            ("no cert", ca.as_str(), "", key.as_str(), "tls.cert_file"),
            ("no key", ca.as_str(), cert.as_str(), "", "tls.key_file"),
        ];
        for (name, ca, cert, key, says) in cases {
            let e = Tls::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes()).expect_err(name);
            assert!(e.to_string().contains(says), "{name}: {e}");
        }
    }

    #[tokio::test]
    async fn each_end_checks_the_others_certificate_and_name() {
        let (ca, issued) = pki(&["a", "b"]);
        let (other_ca, other) = pki(&["b"]);
        let tls = |ca: &str, (cert, key): &(String, String)| {
            Tls::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes()).expect("tls")
        };
        let a = tls(&ca, &issued[0]);
        let b = tls(&ca, &issued[1]);
        let impostor = tls(&other_ca, &other[0]);
        // (case, acceptor, opener, the name the opener expects, opens?)
        let cases = [
            ("a reaches b", &b, &a, "b", true),
            ("a expects another name", &b, &a, "c", false),
            ("a reaches b of another CA", &impostor, &a, "b", false),
            ("b of another CA reaches a", &a, &impostor, "a", false),
        ];
        for (name, acceptor, opener, expect, opens) in cases {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let accepting = async {
                let (s, _) = listener.accept().await?;
                acceptor.accept(s).await
            };
            let opening = async {
                let s = TcpStream::connect(addr).await?;
                let mut tls = opener.connect(s, expect).await?;
                // TLS 1.3 tells a client of a refused certificate only
                // when it reads.
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                tls.write_all(b"x").await?;
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await?;
                Ok::<_, io::Error>(tls)
            };
            let (accepted, opened) = tokio::join!(
                async {
                    let r = accepting.await;
                    if let Ok(mut s) = r {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut byte = [0u8; 1];
                        if s.read_exact(&mut byte).await.is_ok() {
                            let _ = s.write_all(b"y").await;
                        }
                        Ok(s)
                    } else {
                        r
                    }
                },
                opening
            );
            assert_eq!(opened.is_ok(), opens, "{name}: {:?}", opened.err());
            if opens {
                let accepted = accepted.expect("accepted");
                let certs = Tls::peer_certificates(&accepted);
                assert!(acceptor.names(&certs, "a"), "{name}: the opener's name");
                assert!(!acceptor.names(&certs, "b"), "{name}: not another's");
            }
        }
    }
}
