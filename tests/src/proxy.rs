//! Fault proxies: a [`TcpProxy`] and a [`UdpProxy`] that sit on loopback
//! between a node and what it talks to, and make the faults a test asks for
//! at run time through a cheap cloneable handle. They stand in for firewall
//! rules in a network namespace, so the fault tests need no privileges and
//! no tools beyond the Rust toolchain.
//!
//! # TCP
//!
//! Each accepted connection is forwarded to the upstream address in both
//! directions, by one task per connection that polls the two directions
//! together (a peer that stops reading holds up only its own direction).
//! A close (FIN) is passed on after the last byte. [`TcpFault`] says what
//! happens to the bytes; [`TcpProxyHandle::reset`] sends an RST to both
//! peers of every current connection, and [`TcpProxyHandle::refuse`] resets
//! new connections as soon as they are accepted.
//!
//! # UDP
//!
//! Datagrams from each client go upstream from a socket of that client's
//! own, so a reply arriving on it goes back to that client: any number of
//! clients (up to [`MAX_UDP_CLIENTS`]) share one upstream. [`UdpFault`]
//! passes, drops all, drops a seeded fraction, or delays datagrams.
//!
//! # Memory
//!
//! Everything is bounded: a TCP direction holds at most [`HELD_BYTES`]
//! (then it stops reading, and the sender feels back-pressure), a proxy
//! keeps at most [`MAX_CONNECTIONS`] connections, and a UDP direction holds
//! at most [`UDP_HELD_BYTES`] of delayed datagrams (then it drops, as a
//! full router queue would).

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::TEST_WAIT;

/// Bytes a TCP direction reads at once; each read is forwarded as one
/// chunk (and delayed as one, under [`TcpFault::Delay`]).
pub const CHUNK_BYTES: usize = 16 * 1024;

/// Bytes a TCP direction holds at most (stalled, delayed, or waiting for a
/// slow reader); past it the proxy stops reading that direction.
pub const HELD_BYTES: usize = 256 * 1024;

/// Connections a TCP proxy keeps at most; more are reset at once and
/// counted as refused.
pub const MAX_CONNECTIONS: usize = 256;

/// The largest datagram the UDP proxy forwards whole.
pub const MAX_DATAGRAM_BYTES: usize = 64 * 1024;

/// Bytes of delayed datagrams a UDP direction holds at most; more are
/// dropped (and counted).
pub const UDP_HELD_BYTES: usize = 256 * 1024;

/// Clients a UDP proxy serves at most; datagrams from more are dropped.
pub const MAX_UDP_CLIENTS: usize = 256;

/// What a [`TcpProxy`] does with the bytes of every connection, now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcpFault {
    /// Forward everything as it comes.
    #[default]
    Pass,
    /// A network partition: nothing passes either way and both peers see
    /// silence. A partition does not tear holes in a TCP stream, it holds
    /// it up (the sender's kernel keeps the bytes and retransmits them once
    /// the path is back), so the proxy stops reading: the bytes wait in the
    /// peers' socket buffers, and flow on, none lost and in order, when the
    /// fault changes back. A close is not seen before then either. New
    /// connections are accepted (the kernel completes the handshake of a
    /// listening socket) but not forwarded upstream until the cut lifts, so
    /// their handshakes go unanswered, as behind a partition.
    Cut,
    /// Forward each chunk this long after the proxy read it: added latency,
    /// not a rate limit (reading goes on meanwhile, up to [`HELD_BYTES`]).
    Delay(Duration),
    /// Stop forwarding but keep reading, up to [`HELD_BYTES`] a direction,
    /// so the sender's writes complete; what is held is delivered in order
    /// when the fault changes to one that forwards.
    Stall,
}

impl TcpFault {
    fn reads(self) -> bool {
        self != TcpFault::Cut
    }

    fn forwards(self) -> bool {
        matches!(self, TcpFault::Pass | TcpFault::Delay(_))
    }

    fn latency(self) -> Duration {
        match self {
            TcpFault::Delay(d) => d,
            _ => Duration::ZERO,
        }
    }
}

/// What a [`TcpProxy`] did so far: which paths traffic took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Connections accepted (not counting refused ones).
    pub accepted: u64,
    /// Connections the proxy opened upstream for an accepted one.
    pub connected: u64,
    /// Connections accepted and reset at once: refusing, or over
    /// [`MAX_CONNECTIONS`].
    pub refused: u64,
    /// Accepted connections whose upstream could not be reached (the
    /// client is reset).
    pub upstream_failed: u64,
    /// Connections that ended in a reset: by [`TcpProxyHandle::reset`], or
    /// passed on from one peer's reset (or error) to the other.
    pub reset: u64,
    /// Connections open now.
    pub open: u64,
    /// Bytes read from clients.
    pub bytes_from_clients: u64,
    /// Bytes written upstream.
    pub bytes_to_upstream: u64,
    /// Bytes read from upstream.
    pub bytes_from_upstream: u64,
    /// Bytes written to clients.
    pub bytes_to_clients: u64,
}

/// A TCP fault proxy; it stops, closing every connection, when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    handle: TcpProxyHandle,
    stop: CancellationToken,
}

/// Controls and counters of a [`TcpProxy`]; cheap to clone. A change
/// applies at once to every connection, current and new.
#[derive(Clone, Debug)]
pub struct TcpProxyHandle {
    shared: Arc<TcpShared>,
}

#[derive(Debug)]
struct TcpShared {
    upstream: SocketAddr,
    fault: watch::Sender<TcpFault>,
    refusing: AtomicBool,
    /// Every connection's reset token is a child of the current one.
    resets: Mutex<CancellationToken>,
    counters: watch::Sender<TcpCounters>,
}

impl TcpShared {
    fn count(&self, f: impl FnOnce(&mut TcpCounters)) {
        self.counters.send_modify(f);
    }
}

impl TcpProxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    ///
    /// # Errors
    ///
    /// If it cannot listen.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<TcpProxy> {
        Self::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), upstream).await
    }

    /// Listens on `listen` and forwards to `upstream`.
    ///
    /// # Errors
    ///
    /// If it cannot listen.
    pub async fn bind(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the TCP proxy on {listen}"))?;
        Self::with_listener(listener, upstream)
    }

    /// Accepts on `listener` (bound by the caller, who may need its port
    /// before choosing `upstream`) and forwards to `upstream`.
    ///
    /// # Errors
    ///
    /// If the listener has no local address.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn with_listener(listener: TcpListener, upstream: SocketAddr) -> anyhow::Result<TcpProxy> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(TcpShared {
            upstream,
            fault: watch::Sender::new(TcpFault::Pass),
            refusing: AtomicBool::new(false),
            resets: Mutex::new(CancellationToken::new()),
            counters: watch::Sender::new(TcpCounters::default()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(TcpProxy {
            addr,
            handle: TcpProxyHandle { shared },
            stop,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its controls and counters.
    pub fn handle(&self) -> TcpProxyHandle {
        self.handle.clone()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TcpProxyHandle {
    /// Sets the fault for every connection.
    pub fn set(&self, fault: TcpFault) {
        self.shared.fault.send_replace(fault);
    }

    /// [`TcpFault::Pass`].
    pub fn pass(&self) {
        self.set(TcpFault::Pass);
    }

    /// [`TcpFault::Cut`].
    pub fn cut(&self) {
        self.set(TcpFault::Cut);
    }

    /// [`TcpFault::Stall`].
    pub fn stall(&self) {
        self.set(TcpFault::Stall);
    }

    /// [`TcpFault::Delay`].
    pub fn delay(&self, latency: Duration) {
        self.set(TcpFault::Delay(latency));
    }

    /// The fault in force.
    pub fn fault(&self) -> TcpFault {
        *self.shared.fault.borrow()
    }

    /// While `refusing`, a new connection is reset as soon as it is
    /// accepted (its client's connect may still complete first: the kernel
    /// answers for a listening socket); current connections go on.
    pub fn refuse(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::Relaxed);
    }

    /// Resets every current connection: an RST to both its peers (the
    /// sockets close with a zero linger). New connections are not
    /// affected.
    pub fn reset(&self) {
        let mut current = self.shared.resets.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, CancellationToken::new()).cancel();
    }

    /// The counters now.
    pub fn counters(&self) -> TcpCounters {
        self.shared.counters.borrow().clone()
    }

    /// Waits (at most [`TEST_WAIT`]) until the counters satisfy `ready`,
    /// and returns them.
    ///
    /// # Errors
    ///
    /// A timeout, naming `what` and showing the counters.
    pub async fn wait_for(
        &self,
        what: &str,
        ready: impl FnMut(&TcpCounters) -> bool,
    ) -> anyhow::Result<TcpCounters> {
        wait_on(&self.shared.counters, what, ready).await
    }
}

/// Waits (at most [`TEST_WAIT`]) until `counters` satisfy `ready`.
async fn wait_on<T: Clone + Debug>(
    counters: &watch::Sender<T>,
    what: &str,
    ready: impl FnMut(&T) -> bool,
) -> anyhow::Result<T> {
    let mut rx = counters.subscribe();
    let waited = tokio::time::timeout(TEST_WAIT, async {
        rx.wait_for(ready).await.map(|now| now.clone())
    })
    .await;
    match waited {
        Ok(Ok(now)) => Ok(now),
        Ok(Err(_)) => bail!("the proxy went away while waiting for {what}"),
        Err(_) => bail!(
            "waited {TEST_WAIT:?} for {what}; the proxy's counters: {:?}",
            *counters.borrow()
        ),
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<TcpShared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors, say: try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let open = shared.counters.borrow().open;
        if shared.refusing.load(Ordering::Relaxed) || open >= MAX_CONNECTIONS as u64 {
            let _ = client.set_zero_linger();
            drop(client);
            shared.count(|c| c.refused += 1);
            continue;
        }
        // Taken before the connection is counted, so that a reset() made
        // after a test saw it accepted reaches it.
        let reset = shared
            .resets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .child_token();
        shared.count(|c| {
            c.accepted += 1;
            c.open += 1;
        });
        tokio::spawn(connection(client, shared.clone(), stop.clone(), reset));
    }
}

/// How a connection, or one direction of it, ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Closed by the peers.
    Closed,
    /// Reset (both peers got an RST).
    Reset,
    /// The proxy stopped.
    Stopped,
    /// Upstream did not accept the connection.
    UpstreamFailed,
}

async fn connection(
    client: TcpStream,
    shared: Arc<TcpShared>,
    stop: CancellationToken,
    reset: CancellationToken,
) {
    let ending = relay(client, &shared, &stop, &reset).await;
    shared.count(|c| {
        c.open = c.open.saturating_sub(1);
        match ending {
            Ending::Reset => c.reset += 1,
            Ending::UpstreamFailed => c.upstream_failed += 1,
            Ending::Closed | Ending::Stopped => {}
        }
    });
}

async fn relay(
    client: TcpStream,
    shared: &TcpShared,
    stop: &CancellationToken,
    reset: &CancellationToken,
) -> Ending {
    let mut faults = shared.fault.subscribe();
    let upstream = tokio::select! {
        _ = stop.cancelled() => return Ending::Stopped,
        _ = reset.cancelled() => {
            let _ = client.set_zero_linger();
            return Ending::Reset;
        }
        // Behind a cut nothing reaches upstream, not even a connection.
        connected = async {
            if faults.wait_for(|f| f.reads()).await.is_err() {
                return None;
            }
            Some(TcpStream::connect(shared.upstream).await)
        } => connected,
    };
    let upstream = match upstream {
        None => return Ending::Stopped,
        Some(Err(_)) => {
            let _ = client.set_zero_linger();
            return Ending::UpstreamFailed;
        }
        Some(Ok(upstream)) => upstream,
    };
    shared.count(|c| c.connected += 1);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (upstream_rd, upstream_wr) = upstream.into_split();
    let (up, down) = tokio::join!(
        forward(
            client_rd,
            upstream_wr,
            Direction::ToUpstream,
            shared,
            stop,
            reset
        ),
        forward(
            upstream_rd,
            client_wr,
            Direction::ToClient,
            shared,
            stop,
            reset
        ),
    );
    if up == Ending::Reset || down == Ending::Reset {
        Ending::Reset
    } else if up == Ending::Stopped || down == Ending::Stopped {
        Ending::Stopped
    } else {
        Ending::Closed
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    ToUpstream,
    ToClient,
}

impl Direction {
    fn taken(self, c: &mut TcpCounters) -> &mut u64 {
        match self {
            Direction::ToUpstream => &mut c.bytes_from_clients,
            Direction::ToClient => &mut c.bytes_from_upstream,
        }
    }

    fn given(self, c: &mut TcpCounters) -> &mut u64 {
        match self {
            Direction::ToUpstream => &mut c.bytes_to_upstream,
            Direction::ToClient => &mut c.bytes_to_clients,
        }
    }
}

/// One step of a direction's loop.
enum Step {
    Again,
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
}

/// Moves one direction's bytes as the fault says, until a close, a reset
/// or the proxy's stop.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    shared: &TcpShared,
    stop: &CancellationToken,
    reset: &CancellationToken,
) -> Ending {
    let mut faults = shared.fault.subscribe();
    // Chunks read and not yet written, each with when it may go.
    let mut held: VecDeque<(Instant, Bytes)> = VecDeque::new();
    let mut held_bytes = 0usize;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut eof = false;
    loop {
        let fault = *faults.borrow_and_update();
        if eof && held.is_empty() && fault.forwards() {
            // The sender closed its side; so does the proxy, after the
            // last byte (a close is part of the stream a fault holds).
            let _ = to.shutdown().await;
            return Ending::Closed;
        }
        let reading = fault.reads() && !eof && held_bytes < HELD_BYTES;
        let now = Instant::now();
        let head = held
            .front()
            .filter(|_| fault.forwards())
            .map(|(at, chunk)| (*at, chunk.clone()));
        let due = head.as_ref().map_or(now, |(at, _)| *at);
        let waiting = head.is_some() && due > now;
        let writing = head.is_some() && due <= now;
        let chunk = head.map(|(_, chunk)| chunk).unwrap_or_default();
        let step = tokio::select! {
            _ = stop.cancelled() => return Ending::Stopped,
            _ = reset.cancelled() => return abort(to),
            changed = faults.changed() => match changed {
                Ok(()) => Step::Again,
                Err(_) => return Ending::Stopped,
            },
            read = from.read(&mut buf), if reading => Step::Read(read),
            _ = tokio::time::sleep_until(due), if waiting => Step::Again,
            wrote = to.write(&chunk), if writing => Step::Wrote(wrote),
        };
        match step {
            Step::Again => {}
            Step::Read(Ok(0)) => eof = true,
            Step::Read(Ok(n)) => {
                let at = Instant::now() + fault.latency();
                held.push_back((at, Bytes::copy_from_slice(&buf[..n])));
                held_bytes += n;
                shared.count(|c| *direction.taken(c) += n as u64);
            }
            Step::Wrote(Ok(n)) if n > 0 => {
                if let Some((_, front)) = held.front_mut() {
                    if n >= front.len() {
                        held.pop_front();
                    } else {
                        *front = front.slice(n..);
                    }
                }
                held_bytes = held_bytes.saturating_sub(n);
                shared.count(|c| *direction.given(c) += n as u64);
            }
            Step::Read(Err(_)) | Step::Wrote(_) => {
                // A peer reset or vanished: the other one learns it the
                // same way.
                reset.cancel();
                return abort(to);
            }
        }
    }
}

/// Closes `to`'s socket with an RST (a zero linger) once its read half
/// goes too; a write half dropped as usual would send a FIN first.
fn abort(to: OwnedWriteHalf) -> Ending {
    let _ = to.as_ref().set_zero_linger();
    to.forget();
    Ending::Reset
}

/// What a [`UdpProxy`] does with datagrams, both ways, now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum UdpFault {
    /// Forward every datagram.
    #[default]
    Pass,
    /// A partition: drop every datagram, both ways (UDP has nothing to hold
    /// it for later).
    Cut,
    /// Drop `fraction` (0 to 1) of the datagrams. Which ones is decided per
    /// datagram, in the order the proxy receives them, by a generator per
    /// direction (per client for replies) seeded from `seed` when the fault
    /// is set: the same datagrams in the same order meet the same fate on
    /// every run.
    Loss {
        /// The share dropped.
        fraction: f64,
        /// The generator's seed.
        seed: u64,
    },
    /// Forward each datagram this long after it arrived.
    Delay(Duration),
}

/// What a [`UdpProxy`] did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Clients seen (each has its own upstream socket).
    pub clients: u64,
    /// Datagrams sent upstream.
    pub datagrams_to_upstream: u64,
    /// Datagrams sent back to clients.
    pub datagrams_to_clients: u64,
    /// Datagrams from clients dropped (cut, loss, a full delay queue, too
    /// many clients, or a failed send).
    pub dropped_to_upstream: u64,
    /// Datagrams from upstream dropped (as above).
    pub dropped_to_clients: u64,
}

/// A UDP fault proxy in front of one upstream; it stops when dropped.
#[derive(Debug)]
pub struct UdpProxy {
    addr: SocketAddr,
    handle: UdpProxyHandle,
    stop: CancellationToken,
}

/// Controls and counters of a [`UdpProxy`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct UdpProxyHandle {
    shared: Arc<UdpShared>,
}

#[derive(Debug)]
struct UdpShared {
    upstream: SocketAddr,
    fault: watch::Sender<UdpFault>,
    counters: watch::Sender<UdpCounters>,
}

impl UdpShared {
    fn count(&self, f: impl FnOnce(&mut UdpCounters)) {
        self.counters.send_modify(f);
    }
}

impl UdpProxy {
    /// Listens on the loopback address of `upstream`'s family, port 0, and
    /// forwards to `upstream`.
    ///
    /// # Errors
    ///
    /// If it cannot bind.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<UdpProxy> {
        let listen = if upstream.is_ipv6() {
            SocketAddr::from((Ipv6Addr::LOCALHOST, 0))
        } else {
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
        };
        Self::bind(listen, upstream).await
    }

    /// Listens on `listen` and forwards to `upstream`.
    ///
    /// # Errors
    ///
    /// If it cannot bind.
    pub async fn bind(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<UdpProxy> {
        let socket = UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding the UDP proxy on {listen}"))?;
        Self::with_socket(socket, upstream)
    }

    /// Takes datagrams on `socket` (bound by the caller, who may need its
    /// port before choosing `upstream`) and forwards them to `upstream`.
    ///
    /// # Errors
    ///
    /// If the socket has no local address.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn with_socket(socket: UdpSocket, upstream: SocketAddr) -> anyhow::Result<UdpProxy> {
        let addr = socket.local_addr()?;
        let shared = Arc::new(UdpShared {
            upstream,
            fault: watch::Sender::new(UdpFault::Pass),
            counters: watch::Sender::new(UdpCounters::default()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(from_clients(Arc::new(socket), shared.clone(), stop.clone()));
        Ok(UdpProxy {
            addr,
            handle: UdpProxyHandle { shared },
            stop,
        })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its controls and counters.
    pub fn handle(&self) -> UdpProxyHandle {
        self.handle.clone()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl UdpProxyHandle {
    /// Sets the fault, both ways.
    pub fn set(&self, fault: UdpFault) {
        self.shared.fault.send_replace(fault);
    }

    /// [`UdpFault::Pass`].
    pub fn pass(&self) {
        self.set(UdpFault::Pass);
    }

    /// [`UdpFault::Cut`].
    pub fn cut(&self) {
        self.set(UdpFault::Cut);
    }

    /// [`UdpFault::Loss`].
    pub fn loss(&self, fraction: f64, seed: u64) {
        self.set(UdpFault::Loss { fraction, seed });
    }

    /// [`UdpFault::Delay`].
    pub fn delay(&self, latency: Duration) {
        self.set(UdpFault::Delay(latency));
    }

    /// The fault in force.
    pub fn fault(&self) -> UdpFault {
        *self.shared.fault.borrow()
    }

    /// The counters now.
    pub fn counters(&self) -> UdpCounters {
        self.shared.counters.borrow().clone()
    }

    /// Waits (at most [`TEST_WAIT`]) until the counters satisfy `ready`,
    /// and returns them.
    ///
    /// # Errors
    ///
    /// A timeout, naming `what` and showing the counters.
    pub async fn wait_for(
        &self,
        what: &str,
        ready: impl FnMut(&UdpCounters) -> bool,
    ) -> anyhow::Result<UdpCounters> {
        wait_on(&self.shared.counters, what, ready).await
    }
}

/// Decides which datagrams a [`UdpFault::Loss`] drops: splitmix64.
#[derive(Clone, Debug)]
struct Dice {
    state: u64,
    /// A draw below this drops.
    threshold: u64,
    always: bool,
}

impl Dice {
    fn new(seed: u64, fraction: f64) -> Dice {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        Dice {
            state: seed,
            // Saturates at 1.0, which `always` covers.
            threshold: (fraction * 18_446_744_073_709_551_616.0) as u64,
            always: fraction >= 1.0,
        }
    }

    fn drops(&mut self) -> bool {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        self.always || z < self.threshold
    }
}

/// Seeds a reply direction's dice apart from the clients' direction.
const REPLY_SALT: u64 = 0xA5A5_5A5A_0F0F_F0F0;

/// One direction of UDP traffic: the fault in force and the datagrams
/// waiting out a delay, in order, each with where it goes.
struct Lane<T> {
    fault: UdpFault,
    dice: Option<Dice>,
    salt: u64,
    queue: VecDeque<(Instant, T, Bytes)>,
    queued_bytes: usize,
}

impl<T> Lane<T> {
    fn new(fault: UdpFault, salt: u64) -> Lane<T> {
        let mut lane = Lane {
            fault,
            dice: None,
            salt,
            queue: VecDeque::new(),
            queued_bytes: 0,
        };
        lane.set(fault);
        lane
    }

    fn set(&mut self, fault: UdpFault) {
        self.fault = fault;
        self.dice = match fault {
            UdpFault::Loss { fraction, seed } => Some(Dice::new(seed ^ self.salt, fraction)),
            _ => None,
        };
    }

    /// Queues a datagram to go when the fault says; false if it is dropped.
    fn admit(&mut self, to: T, datagram: Bytes) -> bool {
        let now = Instant::now();
        let at = match self.fault {
            UdpFault::Pass => now,
            UdpFault::Cut => return false,
            UdpFault::Loss { .. } => {
                if self.dice.as_mut().is_some_and(Dice::drops) {
                    return false;
                }
                now
            }
            UdpFault::Delay(d) => now + d,
        };
        if self.queued_bytes + datagram.len() > UDP_HELD_BYTES {
            return false;
        }
        self.queued_bytes += datagram.len();
        self.queue.push_back((at, to, datagram));
        true
    }

    /// When the next datagram is due, if any.
    fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _, _)| *at)
    }

    /// The next datagram, if it is due.
    fn take_due(&mut self) -> Option<(T, Bytes)> {
        let now = Instant::now();
        if self.next_due().is_some_and(|at| at <= now) {
            let (_, to, datagram) = self.queue.pop_front()?;
            self.queued_bytes -= datagram.len();
            return Some((to, datagram));
        }
        None
    }
}

/// Receives from clients and sends upstream, each client from its own
/// socket (whose replies a task of its own sends back).
async fn from_clients(listen: Arc<UdpSocket>, shared: Arc<UdpShared>, stop: CancellationToken) {
    let mut faults = shared.fault.subscribe();
    let mut lane: Lane<Arc<UdpSocket>> = Lane::new(*faults.borrow_and_update(), 0);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
    loop {
        let due = lane.next_due();
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
                lane.set(*faults.borrow_and_update());
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                while let Some((socket, datagram)) = lane.take_due() {
                    let sent = socket.send(&datagram).await.is_ok();
                    shared.count(|c| {
                        if sent {
                            c.datagrams_to_upstream += 1;
                        } else {
                            c.dropped_to_upstream += 1;
                        }
                    });
                }
            }
            received = listen.recv_from(&mut buf) => {
                // An error here is an ICMP report about an earlier send;
                // nothing to do with it.
                let Ok((n, client)) = received else { continue };
                let socket = match clients.get(&client) {
                    Some(socket) => Some(socket.clone()),
                    None if clients.len() < MAX_UDP_CLIENTS => {
                        let socket = upstream_socket(shared.upstream).await.ok().map(Arc::new);
                        if let Some(socket) = &socket {
                            clients.insert(client, socket.clone());
                            shared.count(|c| c.clients += 1);
                            tokio::spawn(to_client(
                                socket.clone(),
                                listen.clone(),
                                client,
                                shared.clone(),
                                stop.clone(),
                            ));
                        }
                        socket
                    }
                    None => None,
                };
                let admitted = socket
                    .is_some_and(|socket| lane.admit(socket, Bytes::copy_from_slice(&buf[..n])));
                if !admitted {
                    shared.count(|c| c.dropped_to_upstream += 1);
                }
            }
        }
    }
}

/// A socket of one client's own, connected to `upstream`: only upstream's
/// replies arrive on it.
async fn upstream_socket(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let any = if upstream.is_ipv6() {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// Sends upstream's replies on `upstream` back to `client`.
async fn to_client(
    upstream: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<UdpShared>,
    stop: CancellationToken,
) {
    let mut faults = shared.fault.subscribe();
    let mut lane: Lane<()> = Lane::new(*faults.borrow_and_update(), REPLY_SALT);
    let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
    loop {
        let due = lane.next_due();
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
                lane.set(*faults.borrow_and_update());
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                while let Some(((), datagram)) = lane.take_due() {
                    let sent = listen.send_to(&datagram, client).await.is_ok();
                    shared.count(|c| {
                        if sent {
                            c.datagrams_to_clients += 1;
                        } else {
                            c.dropped_to_clients += 1;
                        }
                    });
                }
            }
            received = upstream.recv(&mut buf) => {
                // An error is upstream's port reported unreachable: the
                // datagram it was about is gone already.
                let Ok(n) = received else { continue };
                if !lane.admit((), Bytes::copy_from_slice(&buf[..n])) {
                    shared.count(|c| c.dropped_to_clients += 1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a test watches for bytes that must not come.
    const SILENCE: Duration = Duration::from_millis(200);

    /// A proxy in front of a listener of the test's own.
    async fn tcp_pair() -> anyhow::Result<(TcpListener, TcpProxy)> {
        let upstream = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = TcpProxy::start(upstream.local_addr()?).await?;
        Ok((upstream, proxy))
    }

    /// A client through `proxy`, and upstream's end of its connection.
    async fn connect(
        upstream: &TcpListener,
        proxy: &TcpProxy,
    ) -> anyhow::Result<(TcpStream, TcpStream)> {
        let client = TcpStream::connect(proxy.addr()).await?;
        let (server, _) = tokio::time::timeout(TEST_WAIT, upstream.accept()).await??;
        Ok((client, server))
    }

    async fn read_exact(stream: &mut TcpStream, n: usize) -> anyhow::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(TEST_WAIT, stream.read_exact(&mut buf)).await??;
        Ok(buf)
    }

    /// Nothing arrives on `stream` for [`SILENCE`].
    async fn silent(stream: &mut TcpStream) -> bool {
        tokio::time::timeout(SILENCE, stream.read(&mut [0u8; 1]))
            .await
            .is_err()
    }

    /// A read that ends in a reset (or, at worst, a close).
    async fn reset_seen(stream: &mut TcpStream) -> anyhow::Result<bool> {
        let read = tokio::time::timeout(TEST_WAIT, stream.read(&mut [0u8; 16])).await?;
        Ok(match read {
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(n) => n == 0,
        })
    }

    async fn round_trip(client: &mut TcpStream, server: &mut TcpStream) -> anyhow::Result<()> {
        client.write_all(b"ping").await?;
        anyhow::ensure!(read_exact(server, 4).await? == b"ping");
        server.write_all(b"pong").await?;
        anyhow::ensure!(read_exact(client, 4).await? == b"pong");
        Ok(())
    }

    #[tokio::test]
    async fn tcp_pass_forwards_both_ways_and_counts() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        round_trip(&mut client, &mut server).await?;
        let c = proxy.handle().counters();
        assert_eq!((c.accepted, c.connected, c.open), (1, 1, 1));
        assert_eq!((c.bytes_from_clients, c.bytes_to_upstream), (4, 4));
        assert_eq!((c.bytes_from_upstream, c.bytes_to_clients), (4, 4));
        Ok(())
    }

    #[tokio::test]
    async fn tcp_passes_a_close_on_after_the_last_byte() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        client.write_all(b"last").await?;
        client.shutdown().await?;
        let mut got = Vec::new();
        tokio::time::timeout(TEST_WAIT, server.read_to_end(&mut got)).await??;
        assert_eq!(got, b"last");
        // The other direction stays open.
        server.write_all(b"reply").await?;
        assert_eq!(read_exact(&mut client, 5).await?, b"reply");
        drop(server);
        proxy
            .handle()
            .wait_for("the connection to close", |c| c.open == 0)
            .await?;
        assert_eq!(proxy.handle().counters().reset, 0);
        Ok(())
    }

    #[tokio::test]
    async fn tcp_cut_holds_both_ways_in_silence_then_delivers_everything() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let handle = proxy.handle();
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        round_trip(&mut client, &mut server).await?;
        handle.cut();
        client.write_all(b"up").await?;
        server.write_all(b"down").await?;
        assert!(silent(&mut server).await, "bytes passed a cut upstream");
        assert!(silent(&mut client).await, "bytes passed a cut downstream");
        let c = handle.counters();
        assert_eq!(
            (c.bytes_from_clients, c.bytes_from_upstream),
            (4, 4),
            "a cut reads nothing"
        );
        handle.pass();
        assert_eq!(read_exact(&mut server, 2).await?, b"up");
        assert_eq!(read_exact(&mut client, 4).await?, b"down");
        Ok(())
    }

    #[tokio::test]
    async fn tcp_cut_holds_new_connections_until_it_lifts() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let handle = proxy.handle();
        handle.cut();
        let mut client = TcpStream::connect(proxy.addr()).await?;
        client.write_all(b"hello").await?;
        handle
            .wait_for("the connection to be accepted", |c| c.accepted == 1)
            .await?;
        assert!(
            tokio::time::timeout(SILENCE, upstream.accept())
                .await
                .is_err(),
            "a connection got through a cut"
        );
        assert_eq!(handle.counters().connected, 0);
        handle.pass();
        let (mut server, _) = tokio::time::timeout(TEST_WAIT, upstream.accept()).await??;
        assert_eq!(read_exact(&mut server, 5).await?, b"hello");
        Ok(())
    }

    #[tokio::test]
    async fn tcp_stall_takes_the_bytes_and_delivers_them_later() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let handle = proxy.handle();
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        handle.stall();
        client.write_all(b"abc").await?;
        handle
            .wait_for("the proxy to take the bytes", |c| c.bytes_from_clients == 3)
            .await?;
        assert!(silent(&mut server).await, "bytes passed a stall");
        assert_eq!(handle.counters().bytes_to_upstream, 0);
        handle.pass();
        assert_eq!(read_exact(&mut server, 3).await?, b"abc");
        Ok(())
    }

    #[tokio::test]
    async fn tcp_stall_holds_at_most_its_bound() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let handle = proxy.handle();
        let (client, mut server) = connect(&upstream, &proxy).await?;
        handle.stall();
        // The client writes 4x the bound; the proxy takes the bound and
        // stops reading.
        let total = 4 * HELD_BYTES;
        let writer = tokio::spawn(async move {
            let mut client = client;
            client.write_all(&vec![7u8; total]).await?;
            anyhow::Ok(client)
        });
        handle
            .wait_for("the proxy to fill its buffer", |c| {
                c.bytes_from_clients as usize >= HELD_BYTES
            })
            .await?;
        assert!(silent(&mut server).await);
        let taken = handle.counters().bytes_from_clients as usize;
        assert!(
            taken < HELD_BYTES + CHUNK_BYTES,
            "took {taken} bytes while stalled"
        );
        handle.pass();
        let got = read_exact(&mut server, total).await?;
        assert!(got.iter().all(|b| *b == 7));
        tokio::time::timeout(TEST_WAIT, writer).await???;
        Ok(())
    }

    #[tokio::test]
    async fn tcp_delay_adds_its_latency_each_way() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        let latency = Duration::from_millis(150);
        proxy.handle().delay(latency);
        let start = std::time::Instant::now();
        client.write_all(b"ping").await?;
        read_exact(&mut server, 4).await?;
        let one_way = start.elapsed();
        server.write_all(b"pong").await?;
        read_exact(&mut client, 4).await?;
        let both = start.elapsed();
        assert!(one_way >= latency, "one way took {one_way:?}");
        assert!(both >= 2 * latency, "a round trip took {both:?}");
        Ok(())
    }

    #[tokio::test]
    async fn tcp_reset_sends_an_rst_to_both_peers() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let handle = proxy.handle();
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        round_trip(&mut client, &mut server).await?;
        handle.reset();
        for (name, stream) in [("client", &mut client), ("upstream", &mut server)] {
            let read = tokio::time::timeout(TEST_WAIT, stream.read(&mut [0u8; 1])).await?;
            match read {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("the {name} saw {other:?}, not a reset"),
            }
        }
        handle
            .wait_for("the reset to be counted", |c| c.reset == 1 && c.open == 0)
            .await?;
        // Later connections are not affected.
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        round_trip(&mut client, &mut server).await?;
        Ok(())
    }

    #[tokio::test]
    async fn tcp_refuse_resets_new_connections_and_keeps_current_ones() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        let handle = proxy.handle();
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        handle.refuse(true);
        match TcpStream::connect(proxy.addr()).await {
            Ok(mut refused) => assert!(reset_seen(&mut refused).await?),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        handle
            .wait_for("the refusal to be counted", |c| c.refused == 1)
            .await?;
        assert_eq!(handle.counters().connected, 1);
        round_trip(&mut client, &mut server).await?;
        handle.refuse(false);
        let (mut client, mut server) = connect(&upstream, &proxy).await?;
        round_trip(&mut client, &mut server).await?;
        Ok(())
    }

    #[tokio::test]
    async fn tcp_resets_the_client_when_upstream_is_gone() -> anyhow::Result<()> {
        let (upstream, proxy) = tcp_pair().await?;
        drop(upstream);
        let mut client = TcpStream::connect(proxy.addr()).await?;
        assert!(reset_seen(&mut client).await?);
        proxy
            .handle()
            .wait_for("the failure to be counted", |c| c.upstream_failed == 1)
            .await?;
        Ok(())
    }

    /// A proxy in front of a socket of the test's own, and a client.
    async fn udp_trio() -> anyhow::Result<(UdpSocket, UdpProxy, UdpSocket)> {
        let upstream = UdpSocket::bind("127.0.0.1:0").await?;
        let proxy = UdpProxy::start(upstream.local_addr()?).await?;
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        client.connect(proxy.addr()).await?;
        Ok((upstream, proxy, client))
    }

    async fn recv_from(socket: &UdpSocket) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
        let (n, from) = tokio::time::timeout(TEST_WAIT, socket.recv_from(&mut buf)).await??;
        buf.truncate(n);
        Ok((buf, from))
    }

    /// Answers every datagram with itself, until dropped.
    fn echo(upstream: UdpSocket) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
            while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
                let _ = upstream.send_to(&buf[..n], from).await;
            }
        })
    }

    #[tokio::test]
    async fn udp_pass_answers_each_client_on_its_own() -> anyhow::Result<()> {
        let (upstream, proxy, a) = udp_trio().await?;
        let echo = echo(upstream);
        let b = UdpSocket::bind("127.0.0.1:0").await?;
        b.connect(proxy.addr()).await?;
        for _ in 0..3 {
            a.send(b"from a").await?;
            b.send(b"from b").await?;
            assert_eq!(recv_from(&a).await?.0, b"from a");
            assert_eq!(recv_from(&b).await?.0, b"from b");
        }
        let c = proxy.handle().counters();
        assert_eq!(c.clients, 2);
        assert_eq!((c.datagrams_to_upstream, c.datagrams_to_clients), (6, 6));
        assert_eq!((c.dropped_to_upstream, c.dropped_to_clients), (0, 0));
        echo.abort();
        Ok(())
    }

    #[tokio::test]
    async fn udp_cut_drops_both_ways() -> anyhow::Result<()> {
        let (upstream, proxy, client) = udp_trio().await?;
        let handle = proxy.handle();
        client.send(b"1").await?;
        let (got, path) = recv_from(&upstream).await?;
        assert_eq!(got, b"1");
        handle.cut();
        upstream.send_to(b"lost down", path).await?;
        handle
            .wait_for("a reply to be dropped", |c| c.dropped_to_clients == 1)
            .await?;
        client.send(b"lost up").await?;
        handle
            .wait_for("a datagram to be dropped", |c| c.dropped_to_upstream == 1)
            .await?;
        handle.pass();
        client.send(b"2").await?;
        assert_eq!(recv_from(&upstream).await?.0, b"2", "the cut one came late");
        upstream.send_to(b"3", path).await?;
        assert_eq!(recv_from(&client).await?.0, b"3", "the cut one came late");
        Ok(())
    }

    /// Sends 0..n through a lossy proxy and returns the numbers that
    /// arrived, and the proxy's count of drops.
    async fn lossy_run(fraction: f64, seed: u64, n: u64) -> anyhow::Result<(Vec<u64>, u64)> {
        let (upstream, proxy, client) = udp_trio().await?;
        let handle = proxy.handle();
        handle.loss(fraction, seed);
        for i in 0..n {
            client.send(&i.to_be_bytes()).await?;
        }
        let c = handle
            .wait_for("every datagram to meet its fate", |c| {
                c.datagrams_to_upstream + c.dropped_to_upstream == n
            })
            .await?;
        handle.pass();
        client.send(b"end").await?;
        let mut arrived = Vec::new();
        loop {
            let (got, _) = recv_from(&upstream).await?;
            match <[u8; 8]>::try_from(got.as_slice()) {
                Ok(number) => arrived.push(u64::from_be_bytes(number)),
                Err(_) => break,
            }
        }
        Ok((arrived, c.dropped_to_upstream))
    }

    #[tokio::test]
    async fn udp_loss_drops_the_seeded_datagrams_every_time() -> anyhow::Result<()> {
        let (n, fraction, seed) = (100u64, 0.4, 7);
        let mut dice = Dice::new(seed, fraction);
        let expected: Vec<u64> = (0..n).filter(|_| !dice.drops()).collect();
        let (first, dropped) = lossy_run(fraction, seed, n).await?;
        assert_eq!(first, expected);
        assert_eq!(dropped, n - expected.len() as u64);
        assert!((20..=60).contains(&dropped), "dropped {dropped} of {n}");
        let (second, _) = lossy_run(fraction, seed, n).await?;
        assert_eq!(first, second);
        let (other_seed, _) = lossy_run(fraction, seed + 1, n).await?;
        assert_ne!(first, other_seed);
        Ok(())
    }

    #[tokio::test]
    async fn udp_delay_adds_its_latency_each_way() -> anyhow::Result<()> {
        let (upstream, proxy, client) = udp_trio().await?;
        let echo = echo(upstream);
        let latency = Duration::from_millis(150);
        proxy.handle().delay(latency);
        let start = std::time::Instant::now();
        client.send(b"ping").await?;
        assert_eq!(recv_from(&client).await?.0, b"ping");
        let rtt = start.elapsed();
        assert!(rtt >= 2 * latency, "a round trip took {rtt:?}");
        echo.abort();
        Ok(())
    }

    #[test]
    fn dice_follow_their_seed_and_fraction() {
        let draws = |seed, fraction| {
            let mut dice = Dice::new(seed, fraction);
            (0..10_000).filter(|_| dice.drops()).count()
        };
        assert_eq!(draws(1, 0.0), 0);
        assert_eq!(draws(1, 1.0), 10_000);
        assert_eq!(draws(1, f64::NAN), 0);
        assert_eq!(draws(3, 0.25), draws(3, 0.25));
        let quarter = draws(3, 0.25);
        assert!((2_200..2_800).contains(&quarter), "{quarter}");
    }
}
