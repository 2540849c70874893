//! The state of one direct channel (lazy or session) as the cluster manager
//! sees it: who uses it, what waits on it, when it is idle, when its peer
//! stopped answering. The runtime owns the socket; this decides.
//!
//! Pure state with the time passed in. The runtime calls
//! [`ChannelState::begin_use`] before it queues a message on the channel,
//! [`ChannelState::handle_frame`] for anything the peer sends back, and
//! [`ChannelState::check`] on each tick of its channel monitor, which says
//! whether to keep the channel, close it as idle, or drop it as broken.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use transports::protocol::NodeId;

/// The two kinds of direct channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// Opened on need, closed when idle.
    Lazy,
    /// Kept open by a dispatcher to each server of its group.
    Session,
}

impl ChannelKind {
    /// The kind's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            ChannelKind::Lazy => "lazy",
            ChannelKind::Session => "session",
        }
    }
}

/// How long a channel may stay idle or silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelPolicy {
    /// A lazy channel idle this long, with nothing in flight, is closed
    /// (`lazy.idle_close_ms`).
    pub idle_close: Duration,
    /// A channel whose peer answered nothing for this long is broken
    /// (`cluster.failure_timeout_ms`); four times as long while frames
    /// wait to be written (a peer busy reading a large body cannot answer
    /// at once).
    pub failure_timeout: Duration,
}

/// What the channel monitor should do with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it (and probe it).
    Keep,
    /// Close it as idle: say goodbye; its pair's traffic returns to the
    /// message server.
    CloseIdle,
    /// Its peer stopped answering: drop it; what was in flight on it fails.
    Broken,
}

/// One open direct channel.
#[derive(Debug)]
pub struct ChannelState {
    kind: ChannelKind,
    /// Set once the channel is being closed: no new use.
    closing: bool,
    /// Senders between `begin_use` and their frame being queued.
    active: usize,
    /// Acknowledged messages sent on it and not yet settled.
    in_flight: HashSet<u64>,
    last_used: Instant,
    /// When the peer last sent anything.
    last_heard: Instant,
}

impl ChannelState {
    /// A channel of `kind` opened at `now`.
    pub fn new(kind: ChannelKind, now: Instant) -> Self {
        ChannelState {
            kind,
            closing: false,
            active: 0,
            in_flight: HashSet::new(),
            last_used: now,
            last_heard: now,
        }
    }

    /// The channel's kind.
    pub fn kind(&self) -> ChannelKind {
        self.kind
    }

    /// Starts a use at `now` (sending message `seq`, if it is tracked);
    /// false if the channel is closing, so the caller opens another.
    /// Each successful call is matched by one [`ChannelState::end_use`].
    pub fn begin_use(&mut self, now: Instant, seq: Option<u64>) -> bool {
        if self.closing {
            return false;
        }
        self.active += 1;
        if let Some(seq) = seq {
            self.in_flight.insert(seq);
        }
        self.last_used = self.last_used.max(now);
        true
    }

    /// A use ended (its frame is queued, or it gave up).
    pub fn end_use(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    /// Message `seq` no longer waits on this channel (it settled).
    pub fn handle_settled(&mut self, seq: u64) {
        self.in_flight.remove(&seq);
    }

    /// The peer sent something at `now`: it is alive.
    pub fn handle_frame(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Whether the channel is being closed.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Decides the channel's fate at `now`. `queued_frames` is how many
    /// frames wait to be written to it; `still_tracked` says whether a
    /// message in flight on it still awaits an outcome (one that timed out
    /// or was given up must not keep the channel open). A channel found
    /// idle or broken is marked closing.
    pub fn check(
        &mut self,
        now: Instant,
        policy: &ChannelPolicy,
        queued_frames: usize,
        still_tracked: impl Fn(u64) -> bool,
    ) -> Verdict {
        if self.closing {
            return Verdict::Keep;
        }
        let allowed = if queued_frames > 0 {
            policy.failure_timeout * 4
        } else {
            policy.failure_timeout
        };
        if now.saturating_duration_since(self.last_heard) > allowed {
            self.closing = true;
            return Verdict::Broken;
        }
        if self.kind != ChannelKind::Lazy {
            return Verdict::Keep;
        }
        self.in_flight.retain(|seq| still_tracked(*seq));
        let idle = now.saturating_duration_since(self.last_used) >= policy.idle_close;
        if idle && self.active == 0 && self.in_flight.is_empty() {
            self.closing = true;
            return Verdict::CloseIdle;
        }
        Verdict::Keep
    }

    /// The channel ended: marks it closing and hands back the messages
    /// that were in flight on it (they fail for its peer).
    pub fn take_in_flight(&mut self) -> Vec<u64> {
        self.closing = true;
        let mut lost: Vec<u64> = self.in_flight.drain().collect();
        lost.sort_unstable();
        lost
    }
}

/// Who opens a channel: one opener at a time per peer and kind, so that
/// concurrent first sends open one connection; the others wait for it and
/// look again when it is done (opened, failed, or given up).
#[derive(Debug, Default)]
pub struct Openers {
    opening: HashSet<(NodeId, ChannelKind)>,
}

impl Openers {
    /// A sender needs the channel of `kind` to `peer` and found none open:
    /// whether it opens it (true), or waits for the opener at work (false).
    pub fn handle_needed(&mut self, peer: &NodeId, kind: ChannelKind) -> bool {
        if self.is_opening(peer, kind) {
            return false;
        }
        self.opening.insert((peer.clone(), kind))
    }

    /// The opener of `kind` to `peer` is done: the next sender that needs
    /// the channel and finds none may open it.
    pub fn handle_done(&mut self, peer: &NodeId, kind: ChannelKind) {
        self.opening.retain(|(p, k)| !(p == peer && *k == kind));
    }

    /// Whether a channel of `kind` to `peer` is being opened.
    pub fn is_opening(&self, peer: &NodeId, kind: ChannelKind) -> bool {
        self.opening.iter().any(|(p, k)| p == peer && *k == kind)
    }

    /// How many channels are being opened.
    pub fn len(&self) -> usize {
        self.opening.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.opening.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: ChannelPolicy = ChannelPolicy {
        idle_close: Duration::from_millis(100),
        failure_timeout: Duration::from_millis(1_000),
    };

    /// One step of a channel's life, at an offset in ms from its opening.
    enum Step {
        Use(Option<u64>),
        EndUse,
        Settled(u64),
        Heard,
        /// A monitor tick: frames waiting to be written, and the verdict.
        Check(usize, Verdict),
    }

    fn run(kind: ChannelKind, steps: &[(u64, Step)], tracked: &[u64]) -> ChannelState {
        let t0 = Instant::now();
        let mut c = ChannelState::new(kind, t0);
        for (i, (at, step)) in steps.iter().enumerate() {
            let now = t0 + Duration::from_millis(*at);
            match step {
                Step::Use(seq) => assert!(c.begin_use(now, *seq), "step {i}: usable"),
                Step::EndUse => c.end_use(),
                Step::Settled(seq) => c.handle_settled(*seq),
                Step::Heard => c.handle_frame(now),
                Step::Check(queued, verdict) => assert_eq!(
                    c.check(now, &POLICY, *queued, |s| tracked.contains(&s)),
                    *verdict,
                    "step {i} at {at} ms"
                ),
            }
        }
        c
    }

    #[test]
    fn idle_close_table() {
        use Step::*;
        use Verdict::*;
        type Case = (&'static str, Vec<(u64, Step)>, Vec<u64>);
        let cases: Vec<Case> = vec![
            (
                "unused: closed once idle",
                vec![(99, Check(0, Keep)), (100, Check(0, CloseIdle))],
                vec![],
            ),
            (
                "each use restarts the idle time",
                vec![
                    (50, Use(None)),
                    (60, EndUse),
                    (120, Check(0, Keep)),
                    (150, Check(0, CloseIdle)),
                ],
                vec![],
            ),
            (
                "a sender between use and queueing keeps it",
                vec![
                    (0, Use(None)),
                    (500, Heard),
                    (500, Check(0, Keep)),
                    (500, EndUse),
                    (500, Check(0, CloseIdle)),
                ],
                vec![],
            ),
            (
                "a tracked message in flight keeps it",
                vec![
                    (0, Use(Some(7))),
                    (0, EndUse),
                    (300, Heard),
                    (300, Check(0, Keep)),
                    (300, Settled(7)),
                    (300, Check(0, CloseIdle)),
                ],
                vec![7],
            ),
            (
                "a message no longer tracked does not keep it",
                vec![
                    (0, Use(Some(7))),
                    (0, EndUse),
                    (300, Heard),
                    (300, Check(0, CloseIdle)),
                ],
                vec![],
            ),
        ];
        for (name, steps, tracked) in cases {
            eprintln!("case: {name}");
            run(ChannelKind::Lazy, &steps, &tracked);
        }
    }

    #[test]
    fn failure_deadline_table() {
        use Step::*;
        use Verdict::*;
        let cases: Vec<(&str, Vec<(u64, Step)>)> = vec![
            (
                "silent for the failure timeout: kept",
                vec![(0, Use(None)), (1_000, Check(0, Keep))],
            ),
            (
                "silent past it: broken",
                vec![(0, Use(None)), (1_001, Check(0, Broken))],
            ),
            (
                "frames waiting: four times as long",
                vec![
                    (0, Use(None)),
                    (4_000, Check(3, Keep)),
                    (4_001, Check(3, Broken)),
                ],
            ),
            (
                "anything heard restarts it",
                vec![
                    (0, Use(None)),
                    (900, Heard),
                    (1_800, Check(0, Keep)),
                    (1_901, Check(0, Broken)),
                ],
            ),
            (
                "broken is said once",
                vec![
                    (0, Use(None)),
                    (1_001, Check(0, Broken)),
                    (1_002, Check(0, Keep)),
                ],
            ),
        ];
        for (name, steps) in cases {
            eprintln!("case: {name}");
            run(ChannelKind::Lazy, &steps, &[]);
        }
    }

    #[test]
    fn a_session_channel_is_never_idle_closed() {
        use Step::*;
        let c = run(
            ChannelKind::Session,
            &[(500, Heard), (900, Check(0, Verdict::Keep))],
            &[],
        );
        assert!(!c.is_closing());
    }

    #[test]
    fn one_opener_at_a_time_table() {
        use ChannelKind::*;
        let (b, c) = (NodeId::new("b"), NodeId::new("c"));
        let mut o = Openers::default();
        // (step, who needs or is done, kind, opens)
        let steps: Vec<(&str, bool, &NodeId, ChannelKind, bool)> = vec![
            ("the first sender opens", true, &b, Lazy, true),
            ("a second one waits", true, &b, Lazy, false),
            ("another peer is not held up", true, &c, Lazy, true),
            ("nor another kind to the same peer", true, &b, Session, true),
            ("the opener is done", false, &b, Lazy, false),
            (
                "the next sender may open (say, after a failure)",
                true,
                &b,
                Lazy,
                true,
            ),
            ("and the others wait for it again", true, &b, Lazy, false),
        ];
        for (name, needs, peer, kind, opens) in steps {
            if needs {
                assert_eq!(o.handle_needed(peer, kind), opens, "{name}");
            } else {
                o.handle_done(peer, kind);
            }
        }
        assert_eq!(o.len(), 3);
        for (peer, kind) in [(&b, Lazy), (&c, Lazy), (&b, Session)] {
            o.handle_done(peer, kind);
        }
        assert!(o.is_empty(), "nothing is kept once every opener is done");
    }

    #[test]
    fn a_closing_channel_takes_no_use_and_hands_back_what_was_in_flight() {
        let t0 = Instant::now();
        let mut c = ChannelState::new(ChannelKind::Lazy, t0);
        for seq in [9, 3, 5] {
            assert!(c.begin_use(t0, Some(seq)));
            c.end_use();
        }
        c.handle_settled(5);
        assert_eq!(c.take_in_flight(), [3, 9]);
        assert!(c.is_closing());
        assert!(!c.begin_use(t0, None), "closing: open another");
        assert!(c.take_in_flight().is_empty());
    }
}
