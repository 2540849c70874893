//! The node's link to the message server, as the cluster manager sees it:
//! whether it is up, which address it uses, when the server counts as
//! silent, when to probe the primary from a standby, and when to try
//! reconnecting (address order and back-off). The runtime connects,
//! writes and reads; this decides when and where.
//!
//! Pure state with the time passed in: the runtime asks
//! [`LinkState::poll_timeout`] when to wake next, and
//! [`LinkState::handle_timeout`] what to do then.
//!
//! - While up, the server must answer heartbeats: silent for longer than
//!   the failure timeout, the link is dead even if TCP has not noticed.
//! - While up on a standby (an index above 0), the primary is probed every
//!   reconnect delay; once it answers, the node moves back to it.
//! - While down, a round of attempts walks the addresses in order (primary
//!   first, then standbys); the first round starts one reconnect delay
//!   after the loss (also when the link was dropped for the primary), each
//!   failed round doubles the wait up to its cap. A node told that its
//!   incarnation was declared failed rejoins at once as a new one.
//! - Every wait (the first round, each later one, each primary probe) is
//!   drawn between half and all of its length ([`LinkPolicy::jitter_seed`]):
//!   a thousand nodes that lost one server at one instant come back spread
//!   over half a reconnect delay, not all at once.

use std::time::{Duration, Instant};

/// The link's timing, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkPolicy {
    /// How many message server addresses there are (primary first).
    pub addresses: usize,
    /// The first wait after a loss, and the primary probe period
    /// (`message_server.reconnect_delay_ms`).
    pub reconnect_delay: Duration,
    /// The cap of the doubling wait (`message_server.reconnect_max_delay_ms`).
    pub reconnect_max_delay: Duration,
    /// How long the server may stay silent (`cluster.failure_timeout_ms`).
    pub failure_timeout: Duration,
    /// Seeds the draw of each wait between half and all of its length
    /// (each node its own: the runtime passes a random one); 0: no
    /// jitter, every wait its full length.
    pub jitter_seed: u64,
}

/// What the runtime should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    /// The server stopped answering heartbeats: drop the link.
    Dead,
    /// Try connecting to the primary; on success drop the standby link
    /// (and call [`LinkState::handle_lost`]).
    ProbePrimary,
    /// Start a round of connection attempts, in [`LinkState::attempt_order`].
    Reconnect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Up {
        index: usize,
        last_heard: Instant,
        next_probe: Option<Instant>,
        /// Whether the server takes heartbeats on this link (it announced
        /// where): only then can its silence end the link.
        watched: bool,
    },
    Down {
        /// The wait after the next failed round.
        delay: Duration,
        next_round: Instant,
    },
}

/// How many of the latest pings a pong may answer: one that answers an
/// older one, or none sent, is not believed.
pub const PONG_WINDOW: u64 = 16;

/// The link's state.
#[derive(Debug, Clone)]
pub struct LinkState {
    policy: LinkPolicy,
    phase: Phase,
    /// The nonce of the latest ping sent.
    last_ping: u64,
    /// The jitter's generator state (xorshift64*); 0: no jitter.
    jitter: u64,
}

impl LinkState {
    /// A link connected at `now` to address `index`.
    pub fn new(policy: LinkPolicy, index: usize, now: Instant) -> Self {
        let mut link = LinkState {
            policy,
            phase: Phase::Down {
                delay: policy.reconnect_delay,
                next_round: now,
            },
            last_ping: 0,
            // Seeds close together (incarnations are clock readings) are
            // spread over the whole range first (splitmix64's finisher).
            jitter: match policy.jitter_seed {
                0 => 0,
                seed => {
                    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    (z ^ (z >> 31)).max(1)
                }
            },
        };
        link.handle_connected(now, index);
        link
    }

    /// Whether the link is up.
    pub fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up { .. })
    }

    /// The address index in use, while up.
    pub fn index(&self) -> Option<usize> {
        match self.phase {
            Phase::Up { index, .. } => Some(index),
            Phase::Down { .. } => None,
        }
    }

    /// Registered with address `index` at `now`.
    pub fn handle_connected(&mut self, now: Instant, index: usize) {
        let probe = self.jittered(self.policy.reconnect_delay);
        let next_probe = (index > 0).then(|| now + probe);
        self.phase = Phase::Up {
            index,
            last_heard: now,
            next_probe,
            watched: true,
        };
    }

    /// The server of this link takes no heartbeats (it announced no
    /// address for them): its silence is not watched, and only a broken
    /// connection ends the link.
    pub fn handle_no_heartbeats(&mut self) {
        if let Phase::Up { watched, .. } = &mut self.phase {
            *watched = false;
        }
    }

    /// A ping with `nonce` went to the server (nonces grow by one from a
    /// start a peer cannot guess).
    pub fn handle_ping(&mut self, nonce: u64) {
        self.last_ping = nonce;
    }

    /// A pong answering `nonce` came from the server at `now`: believed
    /// only if it answers one of the latest [`PONG_WINDOW`] pings sent.
    /// Returns whether it was.
    pub fn handle_pong(&mut self, now: Instant, nonce: u64) -> bool {
        let recent = self.last_ping.wrapping_sub(nonce) < PONG_WINDOW;
        if let (true, Phase::Up { last_heard, .. }) = (recent, &mut self.phase) {
            *last_heard = (*last_heard).max(now);
        }
        recent
    }

    /// The link broke (or was dropped) at `now`: the first round of
    /// attempts waits one reconnect delay.
    pub fn handle_lost(&mut self, now: Instant) {
        if self.is_up() {
            let wait = self.jittered(self.policy.reconnect_delay);
            self.phase = Phase::Down {
                delay: self.policy.reconnect_delay,
                next_round: now + wait,
            };
        }
    }

    /// A whole round of attempts failed at `now`: wait, doubling up to the
    /// cap.
    pub fn handle_round_failed(&mut self, now: Instant) {
        if let Phase::Down { delay, .. } = self.phase {
            let delay = (delay * 2).min(self.policy.reconnect_max_delay);
            let wait = self.jittered(delay);
            self.phase = Phase::Down {
                delay,
                next_round: now + wait,
            };
        }
    }

    /// A server said this node's incarnation was declared failed: the node
    /// takes a new one and tries again at once.
    pub fn handle_rejoin(&mut self, now: Instant) {
        if let Phase::Down { next_round, .. } = &mut self.phase {
            *next_round = now;
        }
    }

    /// `wait` drawn between half and all of it (all of it without jitter).
    fn jittered(&mut self, wait: Duration) -> Duration {
        if self.jitter == 0 {
            return wait;
        }
        // xorshift64*: enough to spread nodes apart, and no dependency.
        self.jitter ^= self.jitter >> 12;
        self.jitter ^= self.jitter << 25;
        self.jitter ^= self.jitter >> 27;
        let draw = self.jitter.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11; // 53 bits
        let fraction = draw as f64 / (1u64 << 53) as f64;
        wait / 2 + wait.mul_f64(fraction / 2.0)
    }

    /// The addresses a round tries, in order: primary first, then standbys.
    pub fn attempt_order(&self) -> std::ops::Range<usize> {
        0..self.policy.addresses
    }

    /// When [`LinkState::handle_timeout`] has something to do next; `None`
    /// while nothing is due (a primary link whose server is not watched).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Up {
                last_heard,
                next_probe,
                watched,
                ..
            } => {
                let silent = watched
                    .then(|| last_heard + self.policy.failure_timeout + Duration::from_nanos(1));
                match (silent, next_probe) {
                    (Some(s), Some(p)) => Some(s.min(p)),
                    (s, p) => s.or(p),
                }
            }
            Phase::Down { next_round, .. } => Some(next_round),
        }
    }

    /// What to do at `now`, if anything.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<LinkAction> {
        let policy = self.policy;
        let probe = self.jittered(policy.reconnect_delay);
        match &mut self.phase {
            Phase::Up {
                last_heard,
                next_probe,
                watched,
                ..
            } => {
                if *watched && now.saturating_duration_since(*last_heard) > policy.failure_timeout {
                    return Some(LinkAction::Dead);
                }
                match next_probe {
                    Some(at) if *at <= now => {
                        *at = now + probe;
                        Some(LinkAction::ProbePrimary)
                    }
                    _ => None,
                }
            }
            Phase::Down { next_round, .. } => (*next_round <= now).then_some(LinkAction::Reconnect),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn policy() -> LinkPolicy {
        LinkPolicy {
            addresses: 3,
            reconnect_delay: MS(100),
            reconnect_max_delay: MS(500),
            jitter_seed: 0,
            failure_timeout: MS(1_000),
        }
    }

    /// An event at an offset in ms.
    enum Step {
        Pong,
        Lost,
        RoundFailed,
        Rejoin,
        Connected(usize),
        /// A timeout: what it asks for, and when the next one is due.
        Timeout(Option<LinkAction>, u64),
    }

    fn run(start_index: usize, steps: &[(u64, Step)]) {
        let t0 = Instant::now();
        let mut link = LinkState::new(policy(), start_index, t0);
        for (i, (at, step)) in steps.iter().enumerate() {
            let now = t0 + MS(*at);
            match step {
                Step::Pong => {
                    link.handle_ping(*at);
                    assert!(link.handle_pong(now, *at));
                }
                Step::Lost => link.handle_lost(now),
                Step::RoundFailed => link.handle_round_failed(now),
                Step::Rejoin => link.handle_rejoin(now),
                Step::Connected(index) => link.handle_connected(now, *index),
                Step::Timeout(action, next) => {
                    assert_eq!(link.handle_timeout(now), *action, "step {i} at {at} ms");
                    let due = link
                        .poll_timeout()
                        .expect("a link always has a deadline in these tests")
                        .saturating_duration_since(t0);
                    assert_eq!(due.as_millis() as u64, *next, "step {i}: next timeout");
                }
            }
        }
    }

    #[test]
    fn heartbeat_deadline_table() {
        use LinkAction::*;
        use Step::*;
        run(
            0,
            &[
                (1_000, Timeout(None, 1_000)),
                (600, Pong),
                (1_500, Timeout(None, 1_600)),
                (1_600, Timeout(None, 1_600)),
                (1_601, Timeout(Some(Dead), 1_600)),
            ],
        );
        // An old pong arriving late does not move the deadline back.
        run(
            0,
            &[
                (800, Pong),
                (300, Pong),
                (1_801, Timeout(Some(Dead), 1_800)),
            ],
        );
    }

    #[test]
    fn jittered_waits_fall_between_half_and_all_and_differ_by_seed() {
        let start = Instant::now();
        let lost_at = |seed: u64| {
            let mut link = LinkState::new(
                LinkPolicy {
                    jitter_seed: seed,
                    ..policy()
                },
                0,
                start,
            );
            link.handle_lost(start);
            let first = link.poll_timeout().expect("a round is due") - start;
            link.handle_round_failed(start);
            let second = link.poll_timeout().expect("a round is due") - start;
            (first, second)
        };
        let mut firsts = std::collections::BTreeSet::new();
        for seed in 1..=200u64 {
            // Close seeds, as clock readings are.
            let (first, second) = lost_at(1_796_000_000_000_000_000 + seed);
            assert!(first >= MS(50) && first <= MS(100), "first {first:?}");
            assert!(second >= MS(100) && second <= MS(200), "second {second:?}");
            firsts.insert(first.as_micros() / 5_000);
        }
        assert!(
            firsts.len() >= 8,
            "200 nodes land in only {} 5 ms slots",
            firsts.len()
        );
        assert_eq!(lost_at(0), (MS(100), MS(200)), "seed 0: no jitter");
    }

    #[test]
    fn back_off_table() {
        use LinkAction::*;
        use Step::*;
        run(
            0,
            &[
                (50, Lost),
                (100, Timeout(None, 150)),
                (150, Timeout(Some(Reconnect), 150)),
                // Rounds fail: the wait doubles to 200, 400, then is
                // capped at 500.
                (160, RoundFailed),
                (160, Timeout(None, 360)),
                (360, RoundFailed),
                (360, Timeout(None, 760)),
                (760, RoundFailed),
                (760, Timeout(None, 1_260)),
                (1_260, RoundFailed),
                (1_260, Timeout(None, 1_760)),
                // Back up: the next loss starts from the base delay again.
                (1_900, Connected(0)),
                (2_000, Lost),
                (2_100, Timeout(Some(Reconnect), 2_100)),
            ],
        );
    }

    #[test]
    fn a_rejoin_retries_at_once_and_a_primary_back_after_the_delay() {
        use LinkAction::*;
        use Step::*;
        run(
            0,
            &[
                (0, Lost),
                (100, Timeout(Some(Reconnect), 100)),
                (110, RoundFailed),
                (120, Rejoin),
                (120, Timeout(Some(Reconnect), 120)),
            ],
        );
        run(
            2,
            &[
                (100, Timeout(Some(ProbePrimary), 200)),
                (150, Lost),
                (150, Timeout(None, 250)),
                (250, Timeout(Some(Reconnect), 250)),
            ],
        );
    }

    #[test]
    fn a_standby_link_probes_the_primary_every_reconnect_delay() {
        use LinkAction::*;
        use Step::*;
        run(
            1,
            &[
                (99, Timeout(None, 100)),
                (100, Timeout(Some(ProbePrimary), 200)),
                (150, Pong),
                (200, Timeout(Some(ProbePrimary), 300)),
                // Moved to the primary: no more probes.
                (250, Connected(0)),
                (300, Timeout(None, 1_250)),
            ],
        );
    }

    #[test]
    fn a_server_without_heartbeats_is_not_given_up_for_silence() {
        let t0 = Instant::now();
        let mut link = LinkState::new(policy(), 0, t0);
        link.handle_no_heartbeats();
        assert_eq!(link.poll_timeout(), None, "nothing is due");
        assert_eq!(link.handle_timeout(t0 + MS(60_000)), None);
        // On a standby the primary is still probed.
        let mut standby = LinkState::new(policy(), 1, t0);
        standby.handle_no_heartbeats();
        assert_eq!(standby.poll_timeout(), Some(t0 + MS(100)));
        assert_eq!(
            standby.handle_timeout(t0 + MS(60_000)),
            Some(LinkAction::ProbePrimary)
        );
        // A new link is watched again.
        link.handle_connected(t0 + MS(60_000), 0);
        assert_eq!(
            link.poll_timeout(),
            Some(t0 + MS(61_000) + Duration::from_nanos(1))
        );
    }

    #[test]
    fn only_a_pong_to_a_recent_ping_counts() {
        let t0 = Instant::now();
        let mut link = LinkState::new(policy(), 0, t0);
        let start = u64::MAX - 3; // nonces wrap
        for k in 0..10 {
            link.handle_ping(start.wrapping_add(k));
        }
        let last = start.wrapping_add(9);
        // (the nonce a pong carries, believed)
        let cases = [
            (last, true),
            (last.wrapping_sub(PONG_WINDOW - 1), true),
            (last.wrapping_sub(PONG_WINDOW), false),
            (last.wrapping_add(1), false), // a ping not sent yet
            (12345, false),
        ];
        for (nonce, believed) in cases {
            assert_eq!(link.handle_pong(t0 + MS(500), nonce), believed, "{nonce}");
        }
        // Only believed pongs keep the link: the last one was at 500 ms.
        assert_eq!(link.handle_timeout(t0 + MS(1_501)), Some(LinkAction::Dead));
        let mut unheard = LinkState::new(policy(), 0, t0);
        unheard.handle_ping(7);
        assert!(!unheard.handle_pong(t0 + MS(900), 99));
        assert_eq!(
            unheard.handle_timeout(t0 + MS(1_001)),
            Some(LinkAction::Dead)
        );
    }

    #[test]
    fn attempts_walk_the_addresses_in_order() {
        let link = LinkState::new(policy(), 0, Instant::now());
        assert_eq!(link.attempt_order().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(link.index(), Some(0));
        assert!(link.is_up());
    }
}
