//! What this node proves itself with: its session key (one per node
//! process, named in every hello) and the cluster secret when configured.
//! See `transports::auth` for what each proof shows.

use transports::auth::{self, AuthError, ClusterSecret, SessionKey};
use transports::handshake::Opener;
use transports::protocol::{Hello, PublicKey};

/// The node's credentials, shared by every connection it opens or accepts.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub(crate) key: SessionKey,
    pub(crate) secret: Option<ClusterSecret>,
}

impl Credentials {
    /// A fresh session key, and the configured cluster secret.
    pub(crate) fn new(secret: Option<&str>) -> Result<Credentials, AuthError> {
        Ok(Credentials {
            key: SessionKey::generate()?,
            secret: secret.map(ClusterSecret::new),
        })
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
