//! `bench-relay`: a raw TCP relay as its own process, the floor of every
//! suite case that goes through a server ([`clustercomm_benches::relay_cases`]):
//! what two loopback hops cost when the process in the middle does nothing
//! but forward bytes.
//!
//! ```text
//! bench-relay [--listen ADDR]
//! ```
//!
//! Listens on `ADDR` (default `127.0.0.1:0`, a free loopback port), prints
//! `listening on ADDR` (the bound address) on stdout once it accepts
//! connections, and runs until its stdin reaches end of file (the suite
//! holds the write end), like `bench-message-server`, on the same runtime
//! (tokio's multi-thread runtime with its default workers). At exit it
//! prints what it refused and dropped on stderr, if anything.
//!
//! # Protocol
//!
//! A client's first 4 bytes are its id (u32 big-endian; not 0,
//! [`ALL`] or [`ANY`], and not the id of a connected client). The relay
//! answers a good hello with the same 4 bytes once the client is
//! registered (so a client knows when others can reach it) and closes any
//! other connection without a word. Then the client sends frames,
//! `[u32 BE len][payload of len bytes]`, whose payload starts with the
//! destination (u32 BE): a client id, [`ALL`] (every other connected
//! client) or [`ANY`] (the next of the other clients, round robin). The
//! relay forwards each frame's bytes unchanged. A payload longer than
//! [`MAX_PAYLOAD`] or shorter than the destination closes the connection
//! before anything is allocated for it; a frame for no connected client
//! (itself included) is dropped and counted.
//!
//! # Structure
//!
//! Per connection a reader (the connection's task) and a writer task. The
//! reader reads into a `BytesMut` ([`READ_CHUNK`] at a time, or the rest
//! of a large frame at once), resolves the complete frames' destinations
//! against its copy of the registry (refreshed when the registry's
//! generation changes), and hands each destination at most one `Bytes` per
//! read: when every frame of the read goes to the same place, that is the
//! read itself split off without a copy (cloned to every receiver for
//! [`ALL`]); otherwise each destination's frames are copied into its own
//! batch. Each writer drains its bounded queue ([`QUEUE_CHUNKS`]) in
//! batches and writes a batch with vectored writes. When a queue is full
//! the reader waits (back-pressure, as TCP itself would).

use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use clustercomm_benches::raw_tcp::READ_CHUNK;
use clustercomm_benches::relay_cases::{ALL, ANY, DEST_LEN, MAX_PAYLOAD};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Chunks (each one read's worth of frames for this connection, or one
/// large frame) queued for a connection's writer before readers wait.
const QUEUE_CHUNKS: usize = 64;

/// Most chunks a writer takes off its queue for one batch of writes.
const WRITE_BATCH: usize = 64;

/// Upper bound on a client sending its hello, and on the relay writing
/// its answer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of a frame's length prefix.
const PREFIX_LEN: usize = 4;

/// What the command line asked for.
#[derive(Debug)]
struct Args {
    listen: SocketAddr,
}

const USAGE: &str = "usage: bench-relay [--listen ADDR]";

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut parsed = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        match flag.as_str() {
            "--listen" => {
                let v = inline
                    .or_else(|| args.next())
                    .with_context(|| format!("--listen needs a value\n{USAGE}"))?;
                parsed.listen = v
                    .parse()
                    .with_context(|| format!("--listen {v:?} is not an address"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(parsed)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args(std::env::args().skip(1))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let registry = Arc::new(Registry::default());
    let serving = registry.clone();
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {}", listener.local_addr()?)?;
            out.flush()?;
        }
        // Stdin is read on a plain thread: the benches' tokio has no
        // `io-std`. End of file (or a read error) stops the relay.
        let (eof_tx, mut eof_rx) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            let _ = eof_tx.send(());
        });
        loop {
            tokio::select! {
                _ = &mut eof_rx => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(serving.clone(), stream));
                    }
                    Err(e) => eprintln!("bench-relay: accept failed: {e}"),
                },
            }
        }
        anyhow::Ok(())
    })?;
    // Connections still open end with the runtime.
    drop(runtime);
    if let Some(report) = registry.stats.report() {
        eprintln!("bench-relay: {report}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Pure parts: hello, frame headers, routing, batching
// ---------------------------------------------------------------------------

/// Why a hello was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// 0, [`ALL`] or [`ANY`]: not a client id.
    Reserved,
    /// A connected client has that id.
    Duplicate,
    /// No hello came.
    Silent,
}

/// The id a hello names, if it can be a client's.
fn check_hello(hello: [u8; 4]) -> Result<u32, Refusal> {
    match u32::from_be_bytes(hello) {
        0 | ALL | ANY => Err(Refusal::Reserved),
        id => Ok(id),
    }
}

/// What the start of a read buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    /// A complete frame of `len` bytes (prefix included) for `dest`.
    Frame { len: usize, dest: u32 },
    /// Not a whole frame yet; `len` is the frame's length (prefix
    /// included) once its prefix is in.
    Partial { len: Option<usize> },
}

/// A frame that closes its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadFrame {
    /// A payload longer than [`MAX_PAYLOAD`].
    TooLong,
    /// A payload shorter than the destination.
    NoDestination,
}

/// Reads the header of the frame at the start of `buf`, checking its length
/// before anything is allocated for it.
fn header(buf: &[u8]) -> Result<Header, BadFrame> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Ok(Header::Partial { len: None });
    };
    let payload = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if payload as usize > MAX_PAYLOAD {
        return Err(BadFrame::TooLong);
    }
    if (payload as usize) < DEST_LEN {
        return Err(BadFrame::NoDestination);
    }
    let len = PREFIX_LEN + payload as usize;
    if buf.len() < len {
        return Ok(Header::Partial { len: Some(len) });
    }
    let d = &buf[PREFIX_LEN..PREFIX_LEN + DEST_LEN];
    Ok(Header::Frame {
        len,
        dest: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
    })
}

/// Where a frame goes, as an index into the other clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// To the client at this index.
    To(usize),
    /// To every other client.
    Every,
    /// To no connected client: dropped.
    Nowhere,
}

/// A connection's view of the other clients: their ids in ascending
/// order, and whose turn [`ANY`] is.
#[derive(Debug, Default)]
struct Router {
    peers: Vec<u32>,
    turn: usize,
}

impl Router {
    /// Where a frame for `dest` goes (an [`ANY`] frame takes a turn).
    fn route(&mut self, dest: u32) -> Route {
        match dest {
            _ if self.peers.is_empty() => Route::Nowhere,
            ALL => Route::Every,
            ANY => {
                let at = self.turn % self.peers.len();
                self.turn = at + 1;
                Route::To(at)
            }
            id => self
                .peers
                .binary_search(&id)
                .map_or(Route::Nowhere, Route::To),
        }
    }
}

/// The route every frame of a read shares, if they all share one.
fn shared_route(frames: &[(usize, Route)]) -> Option<Route> {
    let (_, first) = *frames.first()?;
    frames.iter().all(|&(_, r)| r == first).then_some(first)
}

/// Copies each frame (`(len, route)`, in order from the start of `buf`)
/// into the batch of each client it goes to, counting frames per batch;
/// returns how many went nowhere.
fn batch(
    buf: &[u8],
    frames: &[(usize, Route)],
    batches: &mut [BytesMut],
    counts: &mut [u64],
) -> u64 {
    let mut at = 0;
    let mut nowhere = 0;
    for &(len, route) in frames {
        let frame = &buf[at..at + len];
        at += len;
        match route {
            Route::To(i) => {
                batches[i].extend_from_slice(frame);
                counts[i] += 1;
            }
            Route::Every => {
                for (b, c) in batches.iter_mut().zip(counts.iter_mut()) {
                    b.extend_from_slice(frame);
                    *c += 1;
                }
            }
            Route::Nowhere => nowhere += 1,
        }
    }
    nowhere
}

// ---------------------------------------------------------------------------
// The registry of connected clients
// ---------------------------------------------------------------------------

/// A client's writer queue.
type Queue = mpsc::Sender<Bytes>;

/// What the relay refused and dropped, reported at exit.
#[derive(Debug, Default)]
struct Stats {
    /// Connections closed at their hello (no hello, a reserved id, an id
    /// in use).
    refused: AtomicU64,
    /// Connections closed on a bad frame (too long, no destination, cut
    /// off by end of stream).
    bad_frames: AtomicU64,
    /// Frames for no connected client.
    dropped: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts, if any is not zero.
    fn report(&self) -> Option<String> {
        let refused = self.refused.load(Ordering::Relaxed);
        let bad = self.bad_frames.load(Ordering::Relaxed);
        let dropped = self.dropped.load(Ordering::Relaxed);
        (refused + bad + dropped > 0).then(|| {
            format!(
                "{refused} connections refused at hello, {bad} closed on a bad frame, \
                 {dropped} frames dropped (no such client)"
            )
        })
    }
}

/// The connected clients' queues by id. Read-mostly: readers keep a copy
/// and take a new one when `generation` moves.
#[derive(Debug, Default)]
struct Registry {
    clients: RwLock<HashMap<u32, Queue>>,
    generation: AtomicU64,
    stats: Stats,
}

impl Registry {
    /// Adds a client; `false` if its id is taken.
    fn register(&self, id: u32, queue: Queue) -> bool {
        let mut clients = self.clients.write().unwrap_or_else(PoisonError::into_inner);
        if clients.contains_key(&id) {
            return false;
        }
        clients.insert(id, queue);
        self.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// Removes a client.
    fn unregister(&self, id: u32) {
        let mut clients = self.clients.write().unwrap_or_else(PoisonError::into_inner);
        clients.remove(&id);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The generation and every client but `me`, by ascending id.
    fn others(&self, me: u32) -> (u64, Vec<(u32, Queue)>) {
        let clients = self.clients.read().unwrap_or_else(PoisonError::into_inner);
        let generation = self.generation.load(Ordering::Acquire);
        let mut others: Vec<(u32, Queue)> = clients
            .iter()
            .filter(|(&id, _)| id != me)
            .map(|(&id, q)| (id, q.clone()))
            .collect();
        others.sort_unstable_by_key(|&(id, _)| id);
        (generation, others)
    }
}

// ---------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------

/// Serves one accepted connection to its end.
async fn serve(registry: Arc<Registry>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut hello = [0u8; 4];
    let read = tokio::time::timeout(HELLO_TIMEOUT, rd.read_exact(&mut hello)).await;
    let (queue, rx) = mpsc::channel(QUEUE_CHUNKS);
    let id = match read {
        Ok(Ok(_)) => check_hello(hello).and_then(|id| {
            if registry.register(id, queue) {
                Ok(id)
            } else {
                Err(Refusal::Duplicate)
            }
        }),
        // No hello (end of stream, an error, the timeout).
        _ => Err(Refusal::Silent),
    };
    let Ok(id) = id else {
        Stats::add(&registry.stats.refused, 1);
        return;
    };
    let welcomed = tokio::time::timeout(HELLO_TIMEOUT, wr.write_all(&hello)).await;
    if !matches!(welcomed, Ok(Ok(()))) {
        registry.unregister(id);
        return;
    }
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(write_loop(wr, rx, stopped));
    let end = Reader::new(id, registry.clone()).run(&mut rd).await;
    // Counted before the client can see its connection close.
    if let Err(ReadEnd::BadFrame) = end {
        Stats::add(&registry.stats.bad_frames, 1);
    }
    registry.unregister(id);
    // The writer sends what is queued and shuts its side down.
    drop(stop);
}

/// Why a reader stopped before a clean end of stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// A frame too long, without a destination, or cut off by the end of
    /// the stream.
    BadFrame,
    /// The socket failed.
    Io,
}

/// One connection's read side: its view of the other clients and the
/// buffers it reuses from read to read.
struct Reader {
    me: u32,
    registry: Arc<Registry>,
    generation: u64,
    router: Router,
    queues: Vec<Queue>,
    frames: Vec<(usize, Route)>,
    batches: Vec<BytesMut>,
    counts: Vec<u64>,
}

impl Reader {
    fn new(me: u32, registry: Arc<Registry>) -> Reader {
        Reader {
            me,
            registry,
            generation: u64::MAX,
            router: Router::default(),
            queues: Vec::new(),
            frames: Vec::new(),
            batches: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Takes a new copy of the registry if it changed.
    fn refresh(&mut self) {
        if self.registry.generation.load(Ordering::Acquire) == self.generation {
            return;
        }
        let (generation, others) = self.registry.others(self.me);
        self.generation = generation;
        self.router.peers = others.iter().map(|&(id, _)| id).collect();
        self.queues = others.into_iter().map(|(_, q)| q).collect();
        self.batches.resize_with(self.queues.len(), BytesMut::new);
        self.counts.resize(self.queues.len(), 0);
    }

    /// Reads and forwards frames until end of stream.
    async fn run(&mut self, rd: &mut OwnedReadHalf) -> Result<(), ReadEnd> {
        let mut buf = BytesMut::with_capacity(2 * READ_CHUNK);
        let mut want = READ_CHUNK;
        loop {
            buf.reserve(want);
            if rd.read_buf(&mut buf).await.map_err(|_| ReadEnd::Io)? == 0 {
                if buf.is_empty() {
                    return Ok(());
                }
                return Err(ReadEnd::BadFrame);
            }
            self.refresh();
            let mut at = 0;
            self.frames.clear();
            let next = loop {
                match header(&buf[at..]) {
                    Ok(Header::Frame { len, dest }) => {
                        self.frames.push((len, self.router.route(dest)));
                        at += len;
                    }
                    Ok(Header::Partial { len }) => {
                        let missing = len.unwrap_or(PREFIX_LEN) - (buf.len() - at);
                        break Ok(missing.max(READ_CHUNK));
                    }
                    Err(_) => break Err(ReadEnd::BadFrame),
                }
            };
            // The frames before a bad one still go where they were sent.
            self.forward(&mut buf, at).await;
            want = next?;
        }
    }

    /// Hands the first `len` bytes of `buf` (the frames in `self.frames`)
    /// to their clients' queues, waiting while a queue is full.
    async fn forward(&mut self, buf: &mut BytesMut, len: usize) {
        let Some(shared) = shared_route(&self.frames) else {
            if self.frames.is_empty() {
                return;
            }
            let nowhere = batch(
                &buf[..len],
                &self.frames,
                &mut self.batches,
                &mut self.counts,
            );
            buf.advance(len);
            self.dropped(nowhere);
            for i in 0..self.queues.len() {
                let frames = std::mem::take(&mut self.counts[i]);
                if frames > 0 {
                    let chunk = self.batches[i].split().freeze();
                    self.push(i, chunk, frames).await;
                }
            }
            return;
        };
        let frames = self.frames.len() as u64;
        let chunk = buf.split_to(len).freeze();
        match shared {
            Route::To(i) => self.push(i, chunk, frames).await,
            Route::Every => {
                for i in 0..self.queues.len() {
                    self.push(i, chunk.clone(), frames).await;
                }
            }
            Route::Nowhere => self.dropped(frames),
        }
    }

    /// Queues `chunk` (of `frames` frames) for client `i`; a client that
    /// is gone drops it.
    async fn push(&self, i: usize, chunk: Bytes, frames: u64) {
        if self.queues[i].send(chunk).await.is_err() {
            self.dropped(frames);
        }
    }

    fn dropped(&self, frames: u64) {
        if frames > 0 {
            Stats::add(&self.registry.stats.dropped, frames);
        }
    }
}

/// Writes what the queue brings until the reader stops (then sends what
/// is still queued) or the connection fails, then shuts the write side
/// down.
async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
    mut stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let mut chunks = Vec::with_capacity(WRITE_BATCH);
    loop {
        tokio::select! {
            biased;
            n = rx.recv_many(&mut chunks, WRITE_BATCH) => {
                if n == 0 {
                    break;
                }
                write_chunks(&mut wr, &mut chunks).await?;
            }
            _ = &mut stop => {
                rx.close();
                while let Ok(chunk) = rx.try_recv() {
                    chunks.push(chunk);
                    if chunks.len() == WRITE_BATCH {
                        write_chunks(&mut wr, &mut chunks).await?;
                    }
                }
                write_chunks(&mut wr, &mut chunks).await?;
                break;
            }
        }
    }
    wr.shutdown().await
}

/// Writes every chunk, as many per call as the socket takes, and empties
/// `chunks`.
async fn write_chunks<W: AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        let mut slices = [IoSlice::new(&[]); WRITE_BATCH];
        let mut count = 0;
        for (slot, chunk) in slices.iter_mut().zip(&chunks[first..]) {
            *slot = IoSlice::new(chunk);
            count += 1;
        }
        let mut written = wr.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let chunk = &mut chunks[first];
            if chunk.len() <= written {
                written -= chunk.len();
                first += 1;
            } else {
                chunk.advance(written);
                written = 0;
            }
        }
    }
    chunks.clear();
    wr.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Args> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn arguments() {
        let a = parse(&[]).expect("defaults");
        assert_eq!(a.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(
            parse(&["--listen", "127.0.0.1:7401"])
                .expect("listen")
                .listen
                .port(),
            7401
        );
        assert_eq!(
            parse(&["--listen=127.0.0.1:7402"])
                .expect("inline")
                .listen
                .port(),
            7402
        );
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["--listen", "nowhere"]).is_err());
        assert!(parse(&["--frobnicate"]).is_err());
    }

    #[test]
    fn hellos_name_client_ids_only() {
        let cases = [
            (0u32, Err(Refusal::Reserved)),
            (ALL, Err(Refusal::Reserved)),
            (ANY, Err(Refusal::Reserved)),
            (1, Ok(1)),
            (0xFFFF_FFFD, Ok(0xFFFF_FFFD)),
        ];
        for (id, expected) in cases {
            assert_eq!(check_hello(id.to_be_bytes()), expected, "{id:#x}");
        }
    }

    /// `[len][dest][body]` as bytes.
    fn frame(dest: u32, body: &[u8]) -> Vec<u8> {
        let mut f = ((DEST_LEN + body.len()) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&dest.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn headers_are_checked_before_anything_is_read() {
        let whole = frame(7, b"abc");
        let max = MAX_PAYLOAD as u32;
        let cases: Vec<(Vec<u8>, Result<Header, BadFrame>)> = vec![
            (vec![], Ok(Header::Partial { len: None })),
            (vec![0, 0, 0], Ok(Header::Partial { len: None })),
            (whole[..4].to_vec(), Ok(Header::Partial { len: Some(11) })),
            (whole[..10].to_vec(), Ok(Header::Partial { len: Some(11) })),
            (whole.clone(), Ok(Header::Frame { len: 11, dest: 7 })),
            (
                [&whole[..], &[1, 2]].concat(),
                Ok(Header::Frame { len: 11, dest: 7 }),
            ),
            (frame(ALL, b""), Ok(Header::Frame { len: 8, dest: ALL })),
            (
                max.to_be_bytes().to_vec(),
                Ok(Header::Partial {
                    len: Some(4 + MAX_PAYLOAD),
                }),
            ),
            ((max + 1).to_be_bytes().to_vec(), Err(BadFrame::TooLong)),
            (u32::MAX.to_be_bytes().to_vec(), Err(BadFrame::TooLong)),
            (vec![0, 0, 0, 0], Err(BadFrame::NoDestination)),
            (vec![0, 0, 0, 3, 1, 2, 3], Err(BadFrame::NoDestination)),
        ];
        for (buf, expected) in cases {
            assert_eq!(header(&buf), expected, "{buf:?}");
        }
    }

    #[test]
    fn routes_resolve_against_the_other_clients() {
        let mut r = Router {
            peers: vec![2, 5, 9],
            turn: 0,
        };
        assert_eq!(r.route(5), Route::To(1));
        assert_eq!(r.route(9), Route::To(2));
        assert_eq!(r.route(3), Route::Nowhere);
        assert_eq!(r.route(ALL), Route::Every);
        let turns: Vec<Route> = (0..4).map(|_| r.route(ANY)).collect();
        assert_eq!(
            turns,
            [Route::To(0), Route::To(1), Route::To(2), Route::To(0)]
        );
        // A client leaves: the turn carries on within the new list.
        r.peers = vec![2];
        assert_eq!(r.route(ANY), Route::To(0));
        let mut alone = Router::default();
        for dest in [ALL, ANY, 1] {
            assert_eq!(alone.route(dest), Route::Nowhere, "{dest:#x}");
        }
    }

    #[test]
    fn a_read_is_shared_only_when_every_frame_goes_the_same_way() {
        use Route::*;
        let cases: &[(&[Route], Option<Route>)] = &[
            (&[], None),
            (&[To(1)], Some(To(1))),
            (&[To(1), To(1), To(1)], Some(To(1))),
            (&[Every, Every], Some(Every)),
            (&[Nowhere, Nowhere], Some(Nowhere)),
            (&[To(1), To(2)], None),
            (&[Every, To(0)], None),
            (&[To(0), Nowhere], None),
        ];
        for (routes, expected) in cases {
            let frames: Vec<(usize, Route)> = routes.iter().map(|&r| (8, r)).collect();
            assert_eq!(shared_route(&frames), *expected, "{routes:?}");
        }
    }

    #[test]
    fn batches_keep_each_clients_frames_in_order() {
        let (a, b, c, d) = (
            frame(ANY, b"a"),
            frame(ALL, b"bb"),
            frame(9, b"c"),
            frame(ANY, b"d"),
        );
        let buf = [&a[..], &b, &c, &d].concat();
        let frames = [
            (a.len(), Route::To(0)),
            (b.len(), Route::Every),
            (c.len(), Route::Nowhere),
            (d.len(), Route::To(1)),
        ];
        let mut batches = vec![BytesMut::new(), BytesMut::new()];
        let mut counts = vec![0, 0];
        assert_eq!(batch(&buf, &frames, &mut batches, &mut counts), 1);
        assert_eq!(counts, [2, 2]);
        assert_eq!(&batches[0][..], [&a[..], &b].concat());
        assert_eq!(&batches[1][..], [&b[..], &d].concat());
    }

    #[tokio::test]
    async fn chunks_are_written_whole_and_in_order() {
        let (mut client, mut server) = tokio::io::duplex(7);
        let mut chunks: Vec<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 3])).collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.map(|_| got)
        });
        write_chunks(&mut client, &mut chunks)
            .await
            .expect("written");
        assert!(chunks.is_empty());
        drop(client);
        assert_eq!(reader.await.expect("join").expect("read"), expected);
    }
}
