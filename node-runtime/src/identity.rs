//! What this node proves itself with: its session key (one per node
//! process, named in every hello) and the cluster secret when configured.
//! See `transports::auth` for what each proof shows.

use transports::auth::{self, AuthError, ClusterSecret, SessionKey};
use transports::handshake::Opener;
use transports::io::{ReadHalf, WriteHalf};
use transports::protocol::{Hello, PublicKey};
use transports::tls::Tls;

/// The node's credentials, shared by every connection it opens or accepts.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub(crate) key: SessionKey,
    pub(crate) secret: Option<ClusterSecret>,
    /// With `[tls]`: every connection is TLS, certificates naming node ids.
    pub(crate) tls: Option<Tls>,
}

impl Credentials {
    /// A fresh session key, the configured cluster secret, and TLS.
    pub(crate) fn new(secret: Option<&str>, tls: Option<Tls>) -> Result<Credentials, AuthError> {
        Ok(Credentials {
            key: SessionKey::generate()?,
            secret: secret.map(ClusterSecret::new),
            tls,
        })
    }

    /// Connects to `addr` (over TLS to a peer whose certificate must name
    /// `peer`, when TLS is on) and splits the connection.
    pub(crate) async fn open(
        &self,
        stream: tokio::net::TcpStream,
        peer: &str,
    ) -> std::io::Result<(ReadHalf, WriteHalf)> {
        match &self.tls {
            None => Ok(transports::io::split(stream)),
            Some(tls) => Ok(transports::io::split_tls(tls.connect(stream, peer).await?)),
        }
    }

    /// How this node opens a connection; `expect` names the member it
    /// means to reach (`None` for the message server).
    pub(crate) fn opener<'a>(&'a self, expect: Option<&'a PublicKey>) -> Opener<'a> {
        Opener {
            key: &self.key,
            secret: self.secret.as_ref(),
            expect,
        }
    }

    /// `hello` with a fresh nonce, for one connection.
    pub(crate) fn fresh(&self, hello: &Hello) -> Result<Hello, AuthError> {
        let mut hello = hello.clone();
        hello.nonce = auth::random()?;
        Ok(hello)
    }
}
