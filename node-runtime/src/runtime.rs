//! The running node as its tasks share it: the core that decides, and
//! beside it the parts that carry out its decisions, each holding its own
//! state. A task takes a [`Runtime`] (a handful of shared handles) and
//! uses the parts it needs; there is no one state behind them all.
//!
//! - [`CoreCell`]: every decision ([`cluster_manager::NodeCore`]).
//! - [`ServerLink`]: the outgoing queue to the message server, the send
//!   order, this node's `Hello`, and the server's answers to requests
//!   (subscriptions, fan-out member lists).
//! - [`Services`]: the subscribed services' delivery queues.
//! - [`DirectPool`]: the direct channels' sockets.
//! - [`MemberView`]: the application's membership events.
//! - [`Counters`]: what went over which path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cluster_config::Config;
use cluster_manager::core::{CoreConfig, Event, NodeCore, Transmit};
use cluster_manager::link::LinkPolicy;
use cluster_manager::SendError;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transports::protocol::{
    Header, Hello, Interests, MemberEvent, MemberInfo, MessageHeader, MessageKind, MessageRef,
    NodeId, Priority, Routed, Target, TargetRef,
};
use transports::{Lane, OutFrame, OutQueue, Wait};

use crate::channels::DirectPool;
use crate::core::{complete, CoreCell, Waiter};
use crate::counters::Counters;
use crate::identity::Credentials;
use crate::membership::MemberView;
use crate::reply::{enqueue, Replier};
use crate::server::{Heartbeat, ServerLink};
use crate::services::Services;

/// Messages the core gives to send again, as frames.
pub(crate) fn resend_frames(transmits: Vec<Transmit>) -> Vec<OutFrame> {
    transmits
        .into_iter()
        .map(|(header, body)| OutFrame::Parts {
            header: Header::Message(header),
            body,
        })
        .collect()
}

/// What a node learnt while connecting, to build its runtime from.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) hello: Hello,
    pub(crate) groups: Vec<String>,
    pub(crate) config: Config,
    pub(crate) server_max: u64,
    pub(crate) queue: OutQueue,
    pub(crate) members: Vec<MemberInfo>,
    pub(crate) server_index: usize,
    pub(crate) credentials: Arc<Credentials>,
    pub(crate) permissions: cluster_config::PermissionsTable,
    pub(crate) recovery: Option<Arc<crate::recovery::Recovery>>,
}

/// A running node's parts, shared by its tasks and handles. Cheap to
/// clone: each part is its own reference.
#[derive(Debug, Clone)]
pub(crate) struct Runtime {
    pub(crate) id: NodeId,
    pub(crate) config: Arc<Config>,
    /// Every decision: paths, outcomes, duplicates, members, the link.
    pub(crate) core: Arc<CoreCell>,
    pub(crate) server: Arc<ServerLink>,
    pub(crate) services: Arc<Services>,
    pub(crate) direct: Arc<DirectPool>,
    /// The application's stream of membership events.
    pub(crate) members: Arc<MemberView>,
    pub(crate) counters: Arc<Counters>,
    /// Bounds the acknowledged messages awaiting an outcome
    /// (`node.max_in_flight`); a [`crate::Pending`] holds a place.
    pub(crate) in_flight: Arc<Semaphore>,
    /// The body bytes of those messages, in KiB
    /// (`node.max_in_flight_bytes`); a [`crate::Pending`] holds its share.
    pub(crate) in_flight_bytes: Arc<Semaphore>,
    /// How many KiB `in_flight_bytes` has in all.
    pub(crate) in_flight_bytes_capacity: usize,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// What each delivered request keeps to answer it (one per node,
    /// shared).
    pub(crate) replier: Arc<Replier>,
    /// When the node started: the time given to the core where it does not
    /// need the clock.
    pub(crate) started: std::time::Instant,
    /// The session key and cluster secret every connection proves.
    pub(crate) credentials: Arc<Credentials>,
    /// Every node's permissions, from this node's copy of the cluster's
    /// file: what the nodes that open channels to this one may send.
    pub(crate) permissions: cluster_config::PermissionsTable,
    /// Whether this node is busy (`node.busy_upper`, `node.busy_lower`).
    pub(crate) busy: Arc<crate::busy::BusyWatch>,
    /// Messages acknowledged on processing that are not yet.
    pub(crate) unacked: Arc<crate::services::Unacked>,
    /// The streams this node sends, and those it receives.
    pub(crate) streams_out: Arc<crate::stream::StreamsOut>,
    pub(crate) streams_in: Arc<crate::stream::StreamsIn>,
    /// Recoverable messages, with the node's store (`node.data_dir`).
    pub(crate) recovery: Option<Arc<crate::recovery::Recovery>>,
}

impl Runtime {
    pub(crate) fn new(parts: Parts) -> Runtime {
        let config = &parts.config;
        let ms = &config.message_server;
        let lazy = &config.lazy;
        let core = CoreConfig {
            id: parts.hello.node.clone(),
            incarnation: parts.hello.incarnation,
            role: parts.hello.role,
            groups: parts.groups.clone(),
            lazy_threshold_bytes: lazy.threshold_bytes,
            lazy_services: lazy.services.clone(),
            auto_activate_messages: lazy.auto_activate_messages,
            auto_activate_window: Duration::from_millis(lazy.auto_activate_window_ms),
            max_message_bytes: config.limits.max_message_bytes,
            server_max_message_bytes: parts.server_max,
            link: LinkPolicy {
                addresses: ms.addresses.len(),
                reconnect_delay: Duration::from_millis(ms.reconnect_delay_ms),
                reconnect_max_delay: Duration::from_millis(ms.reconnect_max_delay_ms),
                failure_timeout: config.failure_timeout(),
                // Each node its own (never 0: that means no jitter).
                jitter_seed: parts.hello.incarnation | 1,
            },
        };
        let mut core = NodeCore::new(
            core,
            parts.members,
            parts.server_index,
            std::time::Instant::now(),
        );
        // Events are made once the application listens
        // (`Node::membership_events`).
        core.set_membership_reporting(false);
        let max_in_flight = parts.config.node.max_in_flight;
        let in_flight_kib =
            (parts.config.node.max_in_flight_bytes / 1024).clamp(1, Semaphore::MAX_PERMITS);
        let id = parts.hello.node.clone();
        let config = Arc::new(parts.config);
        let core = Arc::new(CoreCell::new(core));
        let services = Arc::default();
        let server = Arc::new(ServerLink {
            queue: parts.queue,
            fair: crate::fair::FairShare::new(config.node.target_queue_bytes),
            send_lock: tokio::sync::Mutex::new(()),
            max_message: parts.server_max,
            hello: Mutex::new(parts.hello),
            groups: parts.groups,
            heartbeat: Mutex::new(None),
            tokens: AtomicU64::new(1),
            subscriptions: Mutex::new(HashMap::new()),
            resolves: Mutex::new(HashMap::new()),
            trace: Mutex::new(None),
            dead_letters: crate::dead_letters::Queries::default(),
        });
        let replier = Arc::new(Replier::new(&id, &config, &core, &server));
        let streams_in = Arc::new(crate::stream::StreamsIn::new(&config));
        let busy = Arc::new(crate::busy::BusyWatch::new(
            config.node.busy_upper,
            config.node.busy_lower,
        ));
        Runtime {
            id,
            config,
            core,
            server,
            services,
            replier,
            direct: Arc::default(),
            members: Arc::new(MemberView::new()),
            counters: Arc::default(),
            in_flight: Arc::new(Semaphore::new(
                max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
            )),
            in_flight_bytes: Arc::new(Semaphore::new(in_flight_kib)),
            in_flight_bytes_capacity: in_flight_kib,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            started: std::time::Instant::now(),
            credentials: parts.credentials,
            permissions: parts.permissions,
            busy,
            unacked: Arc::default(),
            streams_out: Arc::default(),
            streams_in,
            recovery: parts.recovery,
        }
    }

    /// A new link is up: heartbeats go to its server; a server that takes
    /// none is not watched for silence.
    pub(crate) fn link_started(&self, heartbeat: Option<Heartbeat>) {
        if heartbeat.is_none() {
            self.core.lock().handle_no_heartbeats();
        }
        *self
            .server
            .heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = heartbeat;
    }

    /// The current incarnation.
    pub(crate) fn incarnation(&self) -> u64 {
        self.core.lock().incarnation()
    }

    /// Takes a new incarnation (this node was declared failed): what the
    /// old one was waiting for fails, and with it what would be resent.
    pub(crate) fn new_incarnation(&self, incarnation: u64) {
        self.server
            .hello
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .incarnation = incarnation;
        let ((), out) = self
            .core
            .run(|core| core.handle_new_incarnation(std::time::Instant::now(), incarnation));
        self.dispatch(out.events);
    }

    /// Acts on what the core decided: wakes the waiting senders, tells the
    /// application, closes the channels of members gone, counts what
    /// nobody waits on.
    pub(crate) fn dispatch(&self, events: Vec<Event<Waiter>>) {
        for event in events {
            match event {
                Event::Completed(waiter, completion) => complete(waiter, completion),
                Event::Membership(event) => self.members.emit(event),
                Event::MembersChanged => self.members.changed.notify_waiters(),
                Event::PeerGone(id) => self.direct.close_peer(&id),
                Event::LateFailure(routed) => late_failure(self, &routed),
            }
        }
    }

    /// Applies membership events from the message server, in order, under
    /// the send order: a member that is back gets what it missed before
    /// anything newer. Updates of members that are present (their busy
    /// state, their services) resend nothing, and those that come first
    /// are applied at once: they must not wait behind a send that waits
    /// for room in the queue, as a busy receiver's update is what lets that
    /// room come. The rest are applied together under the send order (one
    /// wait for it, one lock of the core, for all the events one read
    /// brought: in a join burst, thousands). `events` is left empty.
    pub(crate) async fn handle_member_events(&self, events: &mut Vec<MemberEvent>) {
        let first_ordered = {
            let core = self.core.lock();
            let members = core.members();
            events.iter().position(|event| match event {
                MemberEvent::Updated(info) => !members.is_present(&info.id, info.incarnation),
                _ => true,
            })
        };
        let ordered = match first_ordered {
            Some(at) => events.split_off(at),
            None => Vec::new(),
        };
        if !events.is_empty() && !self.apply_member_events(events.drain(..)).await {
            return;
        }
        if !ordered.is_empty() {
            let _order = self.server.send_lock.lock().await;
            self.apply_member_events(ordered.into_iter()).await;
        }
    }

    /// Applies `events` at once, then queues what they have resent; false
    /// if the queue is closed.
    async fn apply_member_events(&self, events: impl Iterator<Item = MemberEvent>) -> bool {
        let ((), out) = self.core.run(|core| {
            let now = std::time::Instant::now();
            for event in events {
                core.handle_member_event(now, event);
            }
        });
        self.core.timers.notify_one();
        self.dispatch(out.events);
        for frame in resend_frames(out.transmits) {
            if self
                .server
                .queue
                .push(frame, Lane::Data, Wait::Forever)
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// This node's `Hello` for a reconnect: as of now, and rejoining.
    pub(crate) fn current_hello(&self) -> Hello {
        Hello {
            rejoining: true,
            ..self.server.hello()
        }
    }

    /// This node's groups and its current services, for a registration.
    pub(crate) fn current_interests(&self) -> Interests {
        Interests {
            groups: self.server.groups.clone(),
            services: self.services.names(),
        }
    }

    /// `service` as a shared name (see [`Services::name`]).
    pub(crate) fn service_name(&self, service: &str) -> Arc<str> {
        self.services.name(service)
    }

    /// The header of this node's message `seq`, by reference: what the
    /// queues encode in place when a message is queued without a frame.
    pub(crate) fn message_ref<'a>(
        &'a self,
        seq: u64,
        incarnation: u64,
        target: TargetRef<'a>,
        service: &'a str,
        kind: MessageKind,
        priority: Priority,
    ) -> MessageRef<'a> {
        MessageRef {
            sender: self.id.as_str(),
            incarnation,
            seq,
            target,
            service,
            kind,
            priority,
            expires_ms: None,
        }
    }

    pub(crate) fn header(
        &self,
        seq: u64,
        incarnation: u64,
        target: Target,
        service: Arc<str>,
        kind: MessageKind,
        priority: Priority,
    ) -> MessageHeader {
        MessageHeader {
            sender: self.id.clone(),
            incarnation,
            seq,
            target,
            service,
            kind,
            priority,
            expires_ms: None,
        }
    }

    /// Queues a frame to the message server by `deadline`.
    pub(crate) async fn enqueue(
        &self,
        frame: OutFrame,
        deadline: Instant,
    ) -> Result<(), SendError> {
        enqueue(&self.server, &self.core, &self.config, frame, deadline).await
    }

    /// Whether the node is shutting down.
    pub(crate) fn is_stopping(&self) -> bool {
        self.core.is_stopping()
    }

    pub(crate) fn closed_error(&self) -> SendError {
        self.core.closed_error()
    }

    /// Fails everything pending and closes inboxes; idempotent.
    pub(crate) fn close(&self, error: &SendError) {
        let ((), out) = self.core.run(|core| core.handle_shutdown(error));
        self.dispatch(out.events);
        self.services
            .inboxes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.server
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// A number that differs for each start of a node: the wall clock in
/// nanoseconds, bumped so that two nodes started in the same process at the
/// same instant still differ, and so that it grows across restarts.
pub(crate) fn fresh_incarnation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// A routing failure for a message nobody waits on (a `notify`, or a send
/// whose caller gave up): counted, and logged, never silent.
pub(crate) fn late_failure(rt: &Runtime, routed: &Routed) {
    // A failed `Node` message names its node in `failed` and in `error`.
    let failures = match (routed.failed.len(), &routed.error) {
        (0, Some(_)) => 1,
        (n, _) => n,
    };
    if failures == 0 {
        return;
    }
    let before = rt
        .counters
        .late_failures
        .fetch_add(failures as u64, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(seq = routed.seq, error = ?routed.error, failed = ?routed.failed, "a message nobody waits on was not delivered");
    if before == 0 || (before + failures as u64).next_power_of_two() != before.next_power_of_two() {
        tracing::warn!(
            total = before + failures as u64,
            last_error = ?routed.error,
            "one-way messages were not delivered (see Node::late_failures)"
        );
    }
}
