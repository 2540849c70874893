//! Streams: a body of any size, sent from an `AsyncRead`
//! ([`crate::Node::send_stream`]) and read as it arrives
//! ([`crate::Message::body_stream`]), over a lazy channel, with memory
//! bounded on both ends by the stream's window
//! (`limits.stream_window_bytes`), whatever the body's size.
//!
//! On the channel from sender to receiver (answers come back on it):
//!
//! - `StreamStart { msg, len }` opens the stream: its receiver delivers a
//!   message whose body is the stream. Sent again on a new channel after
//!   one broke, it resumes the stream.
//! - `StreamChunk { seq, offset }` carries the next bytes, in order.
//! - `StreamAck { seq, received, consumed }`: the receiver holds
//!   `received` bytes (never to be sent again) and its application has
//!   read `consumed`; the sender may send up to `consumed` plus the window.
//!   The stream is done when `consumed` is its length.
//! - `StreamFailed { seq, reason }` ends it without its body, either way.
//!
//! The sender keeps what it sent until the receiver holds it: at most a
//! window, which it sends again from where the receiver stands when a
//! broken channel is replaced. The receiver keeps what its application
//! has not read: at most a window. The application sees the whole body,
//! in order and once, or an error; never a part presented as the whole.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cluster_manager::channels::ChannelKind;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use transports::protocol::{
    Header, MessageHeader, MessageKind, NodeId, Priority, StreamStart, Target,
};
use transports::{Lane, OutFrame, OutQueue, PushError, Wait};

use crate::channels::DirectConn;
use crate::counters::Counters;
use crate::runtime::Runtime;
use crate::SendError;

/// Streams finished (read whole, or failed) that a receiver remembers, so
/// that a late resume or chunk is answered instead of starting over.
const FINISHED_KEPT: usize = 4096;

/// Channels in a row a stream's sender opens without its receiver getting
/// a byte more before it gives the stream up.
const MAX_FRUITLESS_CHANNELS: u32 = 3;

/// Why a stream being read ended without the rest of its body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The sender gave it up, or it was refused here.
    #[error("the stream failed: {0}")]
    Failed(String),
    /// Nothing came for this long: its sender stopped, or its channel
    /// broke and was not replaced.
    #[error("nothing of the stream came for {0:?}")]
    Stalled(Duration),
}

/// What a stream's sender heard from its receiver.
#[derive(Clone, Debug, Default)]
struct Progress {
    received: u64,
    consumed: u64,
    failed: Option<String>,
}

/// The streams this node sends, by sequence number: their receivers, and
/// what they said.
#[derive(Debug, Default)]
pub(crate) struct StreamsOut {
    map: Mutex<HashMap<u64, (NodeId, watch::Sender<Progress>)>>,
}

impl StreamsOut {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (NodeId, watch::Sender<Progress>)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `peer` says it holds `received` bytes of stream `seq` and its
    /// application read `consumed`. Only the stream's receiver is heard.
    pub(crate) fn acked(&self, peer: &NodeId, seq: u64, received: u64, consumed: u64) {
        if let Some((to, tx)) = self.lock().get(&seq) {
            if to == peer {
                tx.send_modify(|p| {
                    p.received = p.received.max(received);
                    p.consumed = p.consumed.max(consumed);
                });
            }
        }
    }

    /// `peer` gave stream `seq` up.
    pub(crate) fn failed(&self, peer: &NodeId, seq: u64, reason: String) {
        if let Some((to, tx)) = self.lock().get(&seq) {
            if to == peer {
                tx.send_modify(|p| p.failed = Some(reason));
            }
        }
    }
}

/// A stream being sent: unregistered when dropped.
struct Sending<'a> {
    streams: &'a StreamsOut,
    seq: u64,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.seq);
    }
}

/// What a stream send needs besides the runtime.
pub(crate) struct Outgoing<'a, R> {
    pub(crate) peer: NodeId,
    pub(crate) service: &'a str,
    pub(crate) source: R,
    pub(crate) len: u64,
    pub(crate) priority: Priority,
    /// How long the stream may go without progress.
    pub(crate) idle: Duration,
}

/// Sends a stream (see [`crate::Node::send_stream`]): resolves once the
/// receiving application has read all of it.
pub(crate) async fn send<R: AsyncRead + Unpin>(
    rt: &Runtime,
    out: Outgoing<'_, R>,
) -> Result<(), SendError> {
    let Outgoing {
        peer,
        service,
        mut source,
        len,
        priority,
        idle,
    } = out;
    if let Some(max) = rt.config.limits.max_stream_bytes {
        if len > max {
            return Err(SendError::PayloadTooLarge { size: len, max });
        }
    }
    let (seq, incarnation) = {
        let mut core = rt.core.lock();
        if !core.members().is_member(&peer) {
            return Err(SendError::UnknownTarget(Target::Node(peer)));
        }
        (core.next_seq(), core.incarnation())
    };
    let (tx, mut progress) = watch::channel(Progress::default());
    rt.streams_out.lock().insert(seq, (peer.clone(), tx));
    let _sending = Sending {
        streams: &rt.streams_out,
        seq,
    };
    let start = StreamStart {
        msg: MessageHeader {
            sender: rt.id.clone(),
            incarnation,
            seq,
            target: Target::Node(peer.clone()),
            service: Arc::from(service),
            kind: MessageKind::Notify,
            priority,
            expires_ms: None,
        },
        len,
    };
    let window = rt.config.limits.stream_window_bytes as u64;
    let chunk = rt.config.limits.chunk_bytes as u64;
    let failed = |reason: String| SendError::StreamFailed {
        node: peer.clone(),
        reason,
    };
    // Sent, and not yet held by the receiver: (offset, bytes).
    let mut kept: VecDeque<(u64, Bytes)> = VecDeque::new();
    // Read from the source so far; sent on the current channel so far.
    let mut read_to = 0u64;
    let mut sent = 0u64;
    let mut channel: Option<(Arc<DirectConn>, crate::channels::Use)> = None;
    // What the receiver held when the last channel was opened, and how
    // many channels in a row it got nothing more on.
    let mut reopened_at: Option<u64> = None;
    let mut fruitless = 0u32;
    loop {
        let now = progress.borrow_and_update().clone();
        if let Some(reason) = now.failed {
            return Err(failed(format!("the receiver gave it up: {reason}")));
        }
        if now.consumed >= len && read_to >= len {
            Counters::add(&rt.counters.lazy_messages, 1);
            Counters::add(&rt.counters.lazy_bytes, len);
            return Ok(());
        }
        while kept
            .front()
            .is_some_and(|(offset, b)| offset + b.len() as u64 <= now.received)
        {
            kept.pop_front();
        }
        // A channel, new if the last one broke: the stream resumes from
        // where the receiver stands.
        let conn = match &channel {
            Some((conn, _)) if !conn.queue.is_closed() => conn.clone(),
            _ => {
                channel = None;
                // A channel that keeps breaking with nothing more received
                // meanwhile (the receiver refusing what this sends, say)
                // ends the stream instead of opening channels forever.
                if reopened_at.is_some_and(|at| at >= now.received) {
                    fruitless += 1;
                    if fruitless > MAX_FRUITLESS_CHANNELS {
                        return Err(failed(format!(
                            "its channel broke {fruitless} times in a row with nothing received"
                        )));
                    }
                } else {
                    fruitless = 0;
                }
                reopened_at = Some(now.received);
                if !rt.core.lock().members().is_member(&peer) {
                    return Err(SendError::TargetStopped {
                        node: peer.clone(),
                        in_flight: false,
                    });
                }
                let conn = Box::pin(crate::direct::get_or_open(rt, &peer, ChannelKind::Lazy))
                    .await
                    .map_err(|e| failed(format!("no channel: {e}")))?;
                let Some(usage) = conn.begin_use(None) else {
                    // Closing, not yet out of the pool: a moment for it to
                    // go, then another.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let header = Header::StreamStart(Box::new(start.clone()));
                push(&conn, header, Bytes::new(), priority, idle).await;
                sent = now.received.min(read_to);
                channel = Some((conn.clone(), usage));
                conn
            }
        };
        let room = now.consumed + window;
        if sent < read_to && sent < room {
            // Again what the receiver may not have got.
            if let Some((offset, bytes)) = kept
                .iter()
                .find(|(offset, b)| offset + b.len() as u64 > sent)
            {
                let skip = sent.saturating_sub(*offset) as usize;
                let body = bytes.slice(skip..);
                let header = Header::StreamChunk {
                    seq,
                    offset: offset + skip as u64,
                };
                sent = offset + bytes.len() as u64;
                push(&conn, header, body, priority, idle).await;
                continue;
            }
            sent = read_to;
        }
        let n = (len - read_to).min(chunk) as usize;
        if sent == read_to && read_to < len && read_to + n as u64 <= room {
            let mut bytes = BytesMut::zeroed(n);
            if let Err(e) = source.read_exact(&mut bytes).await {
                let reason = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    format!("its source ended after {read_to} of {len} bytes")
                } else {
                    format!("reading its source failed after {read_to} bytes: {e}")
                };
                let header = Header::StreamFailed {
                    seq,
                    reason: reason.clone(),
                };
                push(&conn, header, Bytes::new(), priority, idle).await;
                return Err(failed(reason));
            }
            let bytes = bytes.freeze();
            let header = Header::StreamChunk {
                seq,
                offset: read_to,
            };
            kept.push_back((read_to, bytes.clone()));
            read_to += n as u64;
            sent = read_to;
            push(&conn, header, bytes, priority, idle).await;
            continue;
        }
        // Nothing may go now: wait for the receiver, or for the channel
        // to break.
        tokio::select! {
            changed = progress.changed() => {
                if changed.is_err() {
                    return Err(failed("the stream was dropped".into()));
                }
            }
            () = conn.queue.closed() => {}
            () = rt.cancel.cancelled() => return Err(SendError::Shutdown),
            () = tokio::time::sleep(idle) => {
                return Err(SendError::Timeout { after: idle, waiting_for: vec![peer.clone()] });
            }
        }
    }
}

/// Queues a stream frame on `conn`. A closed channel is noticed by the
/// caller's next look (the stream resumes on a new one); a queue full for
/// `idle` closes the channel, for the same.
async fn push(conn: &DirectConn, header: Header, body: Bytes, priority: Priority, idle: Duration) {
    let frame = OutFrame::Parts { header, body };
    if let Err(PushError::Full(_) | PushError::Congested) =
        conn.queue.push_at(frame, priority, Wait::For(idle)).await
    {
        conn.queue.close();
    }
}

/// A received stream: its sender, the sender's incarnation, its sequence
/// number.
type Key = (NodeId, u64, u64);

/// Streams finished lately (`None`: read whole; else why they failed),
/// and the order they finished in, to forget the oldest.
type Finished = (HashMap<Key, Option<String>>, VecDeque<Key>);

/// The streams this node receives, by sender, incarnation and sequence
/// number, and those it finished lately.
#[derive(Debug)]
pub(crate) struct StreamsIn {
    open: Mutex<HashMap<Key, Arc<Inbound>>>,
    /// Finished streams: `None` if read whole, else why they failed.
    finished: Mutex<Finished>,
    window: u64,
    max: Option<u64>,
    stall: Duration,
}

/// What to do with a stream's opening.
pub(crate) enum Started {
    /// A new stream: deliver it.
    New(BodyStream),
    /// Known already (a resume, or one finished): answered.
    Answered,
}

impl StreamsIn {
    pub(crate) fn new(config: &cluster_config::Config) -> Self {
        StreamsIn {
            open: Mutex::default(),
            finished: Mutex::default(),
            window: config.limits.stream_window_bytes as u64,
            max: config.limits.max_stream_bytes,
            stall: config.failure_timeout() * 2,
        }
    }

    fn open(&self) -> MutexGuard<'_, HashMap<Key, Arc<Inbound>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finished(&self) -> MutexGuard<'_, Finished> {
        self.finished.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves `key` from the open streams to the finished.
    fn finish(&self, key: &Key, outcome: Option<String>) {
        self.open().remove(key);
        let mut finished = self.finished();
        let (map, order) = &mut *finished;
        if map.insert(key.clone(), outcome).is_none() {
            order.push_back(key.clone());
            while order.len() > FINISHED_KEPT {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }

    /// A stream's opening from `sender` (checked by the caller: the
    /// channel's peer), on the channel whose queue is `answers`.
    pub(crate) fn start(self: &Arc<Self>, start: &StreamStart, answers: &OutQueue) -> Started {
        let msg = &start.msg;
        let key = (msg.sender.clone(), msg.incarnation, msg.seq);
        let done = self.finished().0.get(&key).cloned();
        if let Some(outcome) = done {
            let header = match outcome {
                None => Header::StreamAck {
                    seq: msg.seq,
                    received: start.len,
                    consumed: start.len,
                },
                Some(reason) => Header::StreamFailed {
                    seq: msg.seq,
                    reason,
                },
            };
            answer(answers, header);
            return Started::Answered;
        }
        if let Some(inbound) = self.open().get(&key).cloned() {
            let mut state = inbound.lock();
            state.answers = answers.clone();
            answer(
                answers,
                Header::StreamAck {
                    seq: msg.seq,
                    received: state.received,
                    consumed: state.consumed,
                },
            );
            return Started::Answered;
        }
        if let Some(max) = self.max.filter(|max| start.len > *max) {
            let reason = format!("{} bytes exceed limits.max_stream_bytes ({max})", start.len);
            answer(
                answers,
                Header::StreamFailed {
                    seq: msg.seq,
                    reason: reason.clone(),
                },
            );
            self.finish(&key, Some(reason));
            return Started::Answered;
        }
        let inbound = Arc::new(Inbound {
            key: key.clone(),
            len: start.len,
            state: Mutex::new(InState {
                chunks: VecDeque::new(),
                received: 0,
                consumed: 0,
                answers: answers.clone(),
                waker: None,
                tail: None,
                failed: None,
                finished: false,
            }),
        });
        self.open().insert(key, inbound.clone());
        Started::New(BodyStream {
            inbound,
            streams: Arc::downgrade(self),
            stall: self.stall,
        })
    }

    /// A chunk of `sender`'s stream `seq` from `offset`. `Err` for a
    /// chunk that breaks the protocol (the caller closes the channel).
    pub(crate) fn chunk(
        &self,
        sender: &NodeId,
        incarnation: u64,
        seq: u64,
        offset: u64,
        body: Bytes,
    ) -> Result<(), &'static str> {
        let key = (sender.clone(), incarnation, seq);
        let Some(inbound) = self.open().get(&key).cloned() else {
            if self.finished().0.contains_key(&key) {
                // Late, after it ended: nothing to do.
                return Ok(());
            }
            return Err("a chunk of no stream");
        };
        let waker = {
            let mut state = inbound.lock();
            if state.finished {
                return Ok(());
            }
            let end = offset.saturating_add(body.len() as u64);
            if end > inbound.len {
                return Err("a chunk past its stream's length");
            }
            if end.saturating_sub(state.consumed) > self.window {
                return Err("a chunk past its stream's window");
            }
            if offset > state.received {
                // The last chunk, smaller than the others, is written whole
                // and may pass the one before it, written in parts: it
                // waits here for it. Any other gap breaks the protocol.
                if end != inbound.len {
                    return Err("a chunk past a gap in its stream");
                }
                state.tail = Some((offset, body));
                return Ok(());
            }
            state.append(offset, body);
            if let Some((offset, tail)) = state.tail.take() {
                if offset <= state.received {
                    state.append(offset, tail);
                } else {
                    state.tail = Some((offset, tail));
                }
            }
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl StreamsIn {
    /// The sender's word that it gave its stream `seq` up: the
    /// application's read ends in an error.
    pub(crate) fn sender_failed(
        &self,
        sender: &NodeId,
        incarnation: u64,
        seq: u64,
        reason: String,
    ) {
        let key = (sender.clone(), incarnation, seq);
        let Some(inbound) = self.open().get(&key).cloned() else {
            return;
        };
        let waker = {
            let mut state = inbound.lock();
            if !state.fail(format!("its sender gave it up: {reason}")) {
                return;
            }
            state.waker.take()
        };
        self.finish(&key, Some(reason));
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Sends `header` on a stream's channel: at once if the control class has
/// a slot; else (rarely: the writer is stuck) from a task of its own,
/// since the sender may wait for nothing else.
fn answer(answers: &OutQueue, header: Header) {
    if let Err(PushError::Full(frame)) = answers.try_push(OutFrame::control(header), Lane::Control)
    {
        let answers = answers.clone();
        tokio::spawn(async move {
            let _ = answers.push(*frame, Lane::Control, Wait::Forever).await;
        });
    }
}

/// One stream being received.
#[derive(Debug)]
struct Inbound {
    key: Key,
    len: u64,
    state: Mutex<InState>,
}

#[derive(Debug)]
struct InState {
    /// Received and not yet read.
    chunks: VecDeque<Bytes>,
    received: u64,
    consumed: u64,
    /// The queue of the channel it came on last: where answers go.
    answers: OutQueue,
    /// The application, waiting for a chunk.
    waker: Option<Waker>,
    /// The last chunk, come before the one before it (see
    /// [`StreamsIn::chunk`]).
    tail: Option<(u64, Bytes)>,
    /// Why it failed, if it did.
    failed: Option<String>,
    /// Read whole or failed.
    finished: bool,
}

impl Inbound {
    fn lock(&self) -> MutexGuard<'_, InState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl InState {
    /// Ends the stream as failed for `reason`, dropping what it held:
    /// `false` if it had ended already.
    fn fail(&mut self, reason: String) -> bool {
        if self.finished {
            return false;
        }
        self.finished = true;
        self.failed = Some(reason);
        self.chunks.clear();
        self.tail = None;
        true
    }

    /// Takes what `body`, from `offset` (at most `received`), adds past
    /// what is held: bytes sent again after a resume are skipped.
    fn append(&mut self, offset: u64, body: Bytes) {
        let skip = (self.received - offset) as usize;
        if skip < body.len() {
            let body = body.slice(skip..);
            self.received += body.len() as u64;
            self.chunks.push_back(body);
        }
    }
}

/// The body of a message sent as a stream ([`crate::Node::send_stream`]),
/// read chunk by chunk as it arrives ([`BodyStream::chunk`]). Holds at
/// most the stream's window (`limits.stream_window_bytes`) of it; its
/// sender sends more as it is read. Dropped before the end, it gives the
/// stream up: its sender gets an error.
#[derive(Debug)]
pub struct BodyStream {
    inbound: Arc<Inbound>,
    streams: Weak<StreamsIn>,
    stall: Duration,
}

impl BodyStream {
    /// The body's length in bytes.
    pub fn len(&self) -> u64 {
        self.inbound.len
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.inbound.len == 0
    }

    /// The next chunk of the body, in order; `None` once all of it was
    /// read.
    ///
    /// # Errors
    ///
    /// [`StreamError::Failed`] if the sender gave the stream up;
    /// [`StreamError::Stalled`] if nothing came for twice the failure
    /// timeout (its sender stopped, or its channel broke and was not
    /// replaced). The stream is over after an error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a chunk is taken only when it is returned.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, StreamError> {
        let next = poll_fn(|cx| {
            let mut state = self.inbound.lock();
            if let Some(reason) = &state.failed {
                return Poll::Ready(Err(StreamError::Failed(reason.clone())));
            }
            if let Some(chunk) = state.chunks.pop_front() {
                state.consumed += chunk.len() as u64;
                let done = state.consumed >= self.inbound.len;
                state.finished |= done;
                answer(
                    &state.answers,
                    Header::StreamAck {
                        seq: self.inbound.key.2,
                        received: state.received,
                        consumed: state.consumed,
                    },
                );
                return Poll::Ready(Ok(Some((chunk, done))));
            }
            if state.consumed >= self.inbound.len {
                return Poll::Ready(Ok(None));
            }
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        });
        match tokio::time::timeout(self.stall, next).await {
            Ok(Ok(Some((chunk, done)))) => {
                if done {
                    if let Some(streams) = self.streams.upgrade() {
                        streams.finish(&self.inbound.key, None);
                    }
                }
                Ok(Some(chunk))
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.give_up(format!("nothing came for {:?}", self.stall));
                Err(StreamError::Stalled(self.stall))
            }
        }
    }

    /// Reads the rest of the body into one buffer (for a body known to
    /// fit in memory).
    ///
    /// # Errors
    ///
    /// As [`BodyStream::chunk`].
    pub async fn to_bytes(&mut self) -> Result<Bytes, StreamError> {
        let mut all = BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all.freeze())
    }

    /// Fails the stream here and tells its sender why.
    pub(crate) fn give_up(&self, reason: String) {
        let mut state = self.inbound.lock();
        if !state.fail(reason.clone()) {
            return;
        }
        answer(
            &state.answers,
            Header::StreamFailed {
                seq: self.inbound.key.2,
                reason: reason.clone(),
            },
        );
        drop(state);
        if let Some(streams) = self.streams.upgrade() {
            streams.finish(&self.inbound.key, Some(reason));
        }
    }
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        self.give_up("the receiving application dropped the stream".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's sender hears only its receiver: another peer's word on
    /// the same sequence number (an acknowledgement that would let it
    /// resolve early, or a failure) is ignored.
    #[test]
    fn only_the_streams_receiver_is_heard() {
        let streams = StreamsOut::default();
        let (tx, rx) = watch::channel(Progress::default());
        streams.lock().insert(7, (NodeId::new("b"), tx));
        streams.acked(&NodeId::new("mallory"), 7, 100, 100);
        streams.failed(&NodeId::new("mallory"), 7, "made up".into());
        let now = rx.borrow().clone();
        assert_eq!((now.received, now.consumed, now.failed), (0, 0, None));
        streams.acked(&NodeId::new("b"), 7, 100, 50);
        streams.acked(&NodeId::new("b"), 7, 80, 40);
        let now = rx.borrow().clone();
        assert_eq!((now.received, now.consumed), (100, 50), "never backwards");
    }

    /// The last chunk (smaller, written whole) may pass the one before it
    /// (written in parts): it waits for it, and the body comes out in
    /// order. Any other gap, and anything past the length or the window,
    /// breaks the protocol.
    #[tokio::test]
    async fn the_last_chunk_may_come_early_and_nothing_else() {
        let mut config = cluster_config::Config::default();
        config.limits.stream_window_bytes = 1000;
        let streams = Arc::new(StreamsIn::new(&config));
        let (answers, _rx) = transports::out_queue(64, 1 << 20);
        let a = NodeId::new("a");
        let start = |seq: u64, len: u64| StreamStart {
            msg: MessageHeader {
                sender: a.clone(),
                incarnation: 1,
                seq,
                target: Target::Node(NodeId::new("b")),
                service: Arc::from("files"),
                kind: MessageKind::Notify,
                priority: Priority::Normal,
                expires_ms: None,
            },
            len,
        };
        let Started::New(mut stream) = streams.start(&start(1, 250), &answers) else {
            panic!("a new stream");
        };
        let piece = |byte: u8, n: usize| Bytes::from(vec![byte; n]);
        streams.chunk(&a, 1, 1, 0, piece(1, 100)).expect("in order");
        streams
            .chunk(&a, 1, 1, 200, piece(3, 50))
            .expect("the last, early");
        streams
            .chunk(&a, 1, 1, 100, piece(2, 100))
            .expect("the one it passed");
        let body = stream.to_bytes().await.expect("whole");
        let expected: Vec<u8> = [vec![1; 100], vec![2; 100], vec![3; 50]].concat();
        assert_eq!(body.as_ref(), expected.as_slice());

        let Started::New(_other) = streams.start(&start(2, 5000), &answers) else {
            panic!("a new stream");
        };
        assert!(streams.chunk(&a, 1, 2, 100, piece(1, 10)).is_err(), "a gap");
        assert!(
            streams.chunk(&a, 1, 2, 0, piece(1, 1001)).is_err(),
            "past the window"
        );
        assert!(
            streams.chunk(&a, 1, 2, 4990, piece(1, 20)).is_err(),
            "past the length"
        );
        assert!(
            streams.chunk(&a, 1, 9, 0, piece(1, 1)).is_err(),
            "no stream"
        );
    }
}
