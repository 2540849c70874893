//! TCP set-up: listening and connecting with [`TcpOptions`] applied
//! through socket2. The configuration's `[tcp]` section turns into these
//! options; this module knows nothing of the configuration.

#[cfg(feature = "io")]
use std::io;
#[cfg(feature = "io")]
use std::net::SocketAddr;
#[cfg(feature = "io")]
use std::time::Duration;

#[cfg(feature = "io")]
use socket2::{SockRef, TcpKeepalive};
#[cfg(feature = "io")]
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Backlog of listening sockets.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Default [`TcpOptions::keepalive_ms`]: 10 s.
pub const DEFAULT_KEEPALIVE_MS: u64 = 10_000;

/// Socket options applied to every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// Disable Nagle's algorithm. Default true.
    pub nodelay: bool,
    /// TCP keepalive idle time; 0 disables. Default
    /// [`DEFAULT_KEEPALIVE_MS`].
    pub keepalive_ms: u64,
    /// `SO_SNDBUF`; none keeps the system default.
    pub send_buffer_bytes: Option<usize>,
    /// `SO_RCVBUF`; none keeps the system default.
    pub recv_buffer_bytes: Option<usize>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            nodelay: true,
            keepalive_ms: DEFAULT_KEEPALIVE_MS,
            send_buffer_bytes: None,
            recv_buffer_bytes: None,
        }
    }
}

#[cfg(feature = "io")]
fn socket_for(addr: &SocketAddr, tcp: &TcpOptions) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(n) = tcp.send_buffer_bytes {
        socket.set_send_buffer_size(u32::try_from(n).unwrap_or(u32::MAX))?;
    }
    if let Some(n) = tcp.recv_buffer_bytes {
        socket.set_recv_buffer_size(u32::try_from(n).unwrap_or(u32::MAX))?;
    }
    Ok(socket)
}

#[cfg(feature = "io")]
/// Binds a listener on `addr`. Buffer sizes are set on the listening socket
/// so accepted connections inherit them before the window is negotiated.
///
/// # Errors
///
/// The socket error, for example when the address is in use.
pub fn listen(addr: SocketAddr, tcp: &TcpOptions) -> io::Result<TcpListener> {
    let socket = socket_for(&addr, tcp)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(feature = "io")]
/// Applies nodelay and keepalive to a connected stream.
///
/// # Errors
///
/// The socket error.
pub fn tune(stream: &TcpStream, tcp: &TcpOptions) -> io::Result<()> {
    stream.set_nodelay(tcp.nodelay)?;
    let sock = SockRef::from(stream);
    if tcp.keepalive_ms > 0 {
        let idle = Duration::from_millis(tcp.keepalive_ms);
        let keepalive = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(
                idle.min(Duration::from_secs(1))
                    .max(Duration::from_millis(100)),
            )
            .with_retries(3);
        sock.set_tcp_keepalive(&keepalive)?;
    }
    Ok(())
}

#[cfg(feature = "io")]
/// Connects to `addr` (`host:port`), trying each resolved address, with
/// buffer sizes set before the connect and nodelay/keepalive after.
///
/// # Errors
///
/// The last connect error, or `TimedOut` if `timeout` passed first.
pub async fn connect(addr: &str, tcp: &TcpOptions, timeout: Duration) -> io::Result<TcpStream> {
    let attempt = async {
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        );
        for resolved in tokio::net::lookup_host(addr).await? {
            let socket = socket_for(&resolved, tcp)?;
            match socket.connect(resolved).await {
                Ok(stream) => {
                    tune(&stream, tcp)?;
                    return Ok(stream);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {addr} took longer than {timeout:?}"),
        )),
    }
}
