//! A connection's two halves, over plain TCP or TLS alike: the frame
//! reader and the writer task take these, so that every path runs over
//! either.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

/// The reading half of a connection.
#[derive(Debug)]
pub enum ReadHalf {
    /// Plain TCP.
    Plain(OwnedReadHalf),
    /// TLS over TCP.
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The writing half of a connection.
#[derive(Debug)]
pub enum WriteHalf {
    /// Plain TCP.
    Plain(OwnedWriteHalf),
    /// TLS over TCP.
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

/// Splits a plain TCP connection.
pub fn split(stream: TcpStream) -> (ReadHalf, WriteHalf) {
    let (rd, wr) = stream.into_split();
    (ReadHalf::Plain(rd), WriteHalf::Plain(wr))
}

/// The certificates a TLS peer presented (see [`crate::tls::Tls::names`]).
pub type PeerCertificates = Vec<rustls::pki_types::CertificateDer<'static>>;

/// An accepted connection split: plain, or (with `tls`) after the TLS
/// handshake, with the certificates the peer presented.
///
/// # Errors
///
/// The TLS handshake's error.
pub async fn accept(
    stream: TcpStream,
    tls: Option<&crate::tls::Tls>,
) -> io::Result<(ReadHalf, WriteHalf, Option<PeerCertificates>)> {
    match tls {
        None => {
            let (rd, wr) = split(stream);
            Ok((rd, wr, None))
        }
        Some(tls) => {
            let stream = tls.accept(stream).await?;
            let certificates = crate::tls::Tls::peer_certificates(&stream);
            let (rd, wr) = split_tls(stream);
            Ok((rd, wr, Some(certificates)))
        }
    }
}

/// Splits a TLS connection.
pub fn split_tls(stream: TlsStream<TcpStream>) -> (ReadHalf, WriteHalf) {
    let (rd, wr) = tokio::io::split(stream);
    (ReadHalf::Tls(rd), WriteHalf::Tls(wr))
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteHalf::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Plain(w) => w.is_write_vectored(),
            WriteHalf::Tls(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
