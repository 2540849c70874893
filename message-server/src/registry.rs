//! Registration under the lock that orders membership: a node's first
//! registration, the takeover by a runtime that reconnects with the same
//! incarnation, its removal, and the warm-up hold.
//!
//! The message server holds only soft state. After it restarts (or a
//! standby takes over), nodes re-register one by one; a message to a node
//! that has not re-registered yet is held (bounded) for the warm-up period,
//! `cluster.failure_timeout_ms` from the first rejoining node's
//! registration, and handed over in order when that node registers. What
//! is still held when the warm-up ends is answered `UnknownTarget`. A fresh
//! server, which nodes register with for the first time, has no warm-up:
//! it answers an unknown target at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use transports::protocol::{
    DeliveryFailure, Header, LeaveReason, MemberEvent, MemberInfo, NodeId, Priority, Routed,
    SessionSecret, Welcome, PROTOCOL_VERSION,
};
use transports::{Lane, OutFrame, OutQueue};

use crate::counters::Counters;
use crate::server::{ConnHandle, Session, Shared, State};
use crate::table::RegisterError;

/// A message held for a node that has not re-registered yet.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) raw: Bytes,
    pub(crate) sender: NodeId,
    pub(crate) seq: u64,
    /// Its priority (the class it is queued in).
    pub(crate) priority: Priority,
}

/// Messages held per target, and in all.
#[derive(Debug, Default)]
pub(crate) struct HeldMessages {
    by_target: HashMap<NodeId, VecDeque<Held>>,
    bytes: usize,
}

/// Registers the node (taking over from a previous connection of the same
/// incarnation), queues its `Welcome` and then what was held for it, and
/// tells everyone else. Returns the connection's id.
pub(crate) fn register(shared: &Shared, registration: Registration<'_>) -> Result<u64, Refused> {
    let Registration {
        me,
        queue,
        max_frame,
        max_message,
        session,
        masked_secret,
        rejoining,
    } = registration;
    let mut state = shared.write();
    if rejoining && state.conns.is_empty() && !warming_up(shared) {
        // Nodes are coming back to a server that knows none of them: it
        // restarted, or took over as standby. Hold messages for members
        // not back yet.
        let until = shared.now_ms() + shared.config.cluster.failure_timeout_ms;
        shared.warm_until_ms.store(until, Ordering::Relaxed);
        tracing::info!(
            node = %me.id,
            "a node rejoins an empty server: messages to members not back yet are held for up to the failure timeout"
        );
    }
    if state.failed.contains(&(me.id.clone(), me.incarnation)) {
        return Err(Refused::IncarnationFailed);
    }
    let takeover = match state.table.member(&me.id) {
        Some(m) if m.incarnation == me.incarnation => {
            // Only the session that registered it (its key, which the
            // handshake proved) takes a live registration over.
            if m.session_key != me.session_key {
                return Err(Refused::NotTheSession);
            }
            true
        }
        _ => false,
    };
    if takeover {
        // The same runtime reconnected before its old connection was seen
        // to break: the old one is closed, the node never left.
        state.table.remove(&me.id, me.incarnation);
        if let Some(old) = state.conns.remove(&me.id) {
            old.queue.close();
        }
        tracing::info!(node = %me.id, "member reconnected; old connection closed");
    }
    state
        .table
        .register(me.clone())
        .map_err(Refused::Duplicate)?;
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        cluster: shared.config.cluster.name.clone(),
        max_message_bytes: max_message,
        members: Vec::new(),
        // `message_server.heartbeat_advertise`, when set, in place of the
        // bound address.
        heartbeat_addr: shared
            .config
            .message_server
            .heartbeat_advertise
            .or(shared.heartbeat_addr),
        session_secret: Some(masked_secret),
    };
    // Assembled from the members' encodings, kept since they joined: a
    // welcome in a cluster of N is N copies, not N clones encoded again,
    // under the lock every join takes. It lives as its bytes until
    // written. The queue is new and empty: this cannot fail for lack of
    // room.
    let welcome = welcome_frame(welcome, &state.table);
    if let Err(e) = queue.try_push(welcome, Lane::Control) {
        tracing::error!(error = %e, "could not queue welcome");
    }
    let event = Header::Member(MemberEvent::Joined(me.clone()));
    broadcast_locked(shared, &state, &event);
    // Every membership event from now on, after the welcome (which counts
    // this node's own join).
    queue.follow(&shared.membership, shared.membership.head());
    state.next_conn_id += 1;
    let conn_id = state.next_conn_id;
    state.conns.insert(
        me.id.clone(),
        ConnHandle {
            conn_id,
            incarnation: me.incarnation,
            queue: queue.clone(),
            max_frame,
            last_seen: Arc::new(AtomicU64::new(shared.now_ms())),
            session,
        },
    );
    let held = state.held.by_target.remove(&me.id).unwrap_or_default();
    for h in held {
        state.held.bytes -= h.raw.len();
        if queue.try_push_at(OutFrame::Raw(h.raw), h.priority).is_err() {
            tracing::error!(node = %me.id, sender = %h.sender, seq = h.seq, "held message did not fit the new queue");
        }
    }
    Ok(conn_id)
}

/// The welcome frame with every member of `table`: assembled from their
/// encodings, or (should one be missing) encoded whole.
fn welcome_frame(mut welcome: Welcome, table: &crate::table::RoutingTable) -> OutFrame {
    if let Some(members) = table.encoded_members() {
        match welcome.clone().encode_with_members(&members) {
            Ok(raw) if raw.len() <= transports::frame::MAX_HEADER_BYTES => {
                return OutFrame::Raw(Bytes::from(raw));
            }
            Ok(raw) => {
                tracing::error!(
                    bytes = raw.len(),
                    members = members.len(),
                    "the welcome is over the header limit"
                );
            }
            Err(e) => tracing::error!(error = %e, "the welcome could not be assembled"),
        }
    }
    welcome.members = table.members();
    OutFrame::control(Header::Welcome(Box::new(welcome)))
}

/// What a registration needs: the member, its connection's queue and
/// limits, and its session.
pub(crate) struct Registration<'a> {
    pub(crate) me: &'a MemberInfo,
    pub(crate) queue: &'a OutQueue,
    pub(crate) max_frame: usize,
    pub(crate) max_message: u64,
    pub(crate) session: Arc<Session>,
    /// The session secret as the `Welcome` carries it.
    pub(crate) masked_secret: SessionSecret,
    /// The node says it was registered before (see `Hello::rejoining`).
    pub(crate) rejoining: bool,
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error(transparent)]
    Duplicate(RegisterError),
    #[error("this incarnation was declared failed")]
    IncarnationFailed,
    #[error("a live session holds this node id and incarnation")]
    NotTheSession,
}

/// Incarnations declared failed that are remembered (and refused).
const FAILED_REMEMBERED: usize = 4096;

/// Declares the node failed (silent past the failure timeout, `why`): it
/// is removed, its connection closed, everyone told, and nothing from
/// that incarnation is accepted again.
pub(crate) fn declare_failed(shared: &Shared, id: &NodeId, incarnation: u64, why: &str) {
    let mut state = shared.write();
    let Some(conn) = state
        .conns
        .get(id)
        .filter(|c| c.incarnation == incarnation)
        .cloned()
    else {
        return;
    };
    state.conns.remove(id);
    state.table.remove(id, incarnation);
    if state.failed_order.len() >= FAILED_REMEMBERED {
        if let Some(old) = state.failed_order.pop_front() {
            state.failed.remove(&old);
        }
    }
    state.failed.insert((id.clone(), incarnation));
    state.failed_order.push_back((id.clone(), incarnation));
    conn.queue.close();
    Counters::add(&shared.counters.failed_nodes, 1);
    tracing::warn!(node = %id, incarnation, "member failed: {why}");
    let event = Header::Member(MemberEvent::Left {
        id: id.clone(),
        incarnation,
        reason: LeaveReason::Failed,
    });
    broadcast_locked(shared, &state, &event);
    drop(state);
    shared.events.failed(id, incarnation);
}

/// Removes the node if `conn_id` is still its connection, and tells
/// everyone.
pub(crate) fn unregister(
    shared: &Shared,
    id: &NodeId,
    incarnation: u64,
    conn_id: u64,
    reason: LeaveReason,
) {
    let mut state = shared.write();
    if state.conns.get(id).is_none_or(|c| c.conn_id != conn_id) {
        return;
    }
    state.conns.remove(id);
    state.table.remove(id, incarnation);
    let event = Header::Member(MemberEvent::Left {
        id: id.clone(),
        incarnation,
        reason,
    });
    broadcast_locked(shared, &state, &event);
}

/// Tells every member of a membership event, under the lock that orders
/// membership: the event is appended once to the membership feed, which
/// every registered connection's writer follows from its registration on
/// (see [`transports::io::Feed`]). A connection that falls further behind
/// than the feed keeps (`message_server.queue_bytes`) is cut off, and
/// counted as a slow consumer.
/// `_locked` is the state, write-locked: events are appended in the order
/// membership changes.
pub(crate) fn broadcast_locked(shared: &Shared, _locked: &State, event: &Header) {
    if let Err(e) = shared.membership.append(event) {
        tracing::error!(error = %e, kind = event.kind(), "a membership event could not be encoded");
    }
}

/// Whether the server is in a warm-up: nodes are rejoining it after it
/// restarted or took over (see the module's docs).
pub(crate) fn warming_up(shared: &Shared) -> bool {
    shared.now_ms() < shared.warm_until_ms.load(Ordering::Relaxed)
}

/// Holds a message for `target`, unknown during the warm-up. If `target`
/// registered in the meantime, queues it there instead.
///
/// # Errors
///
/// Hands the message back if it cannot be held (warm-up over, or the
/// bounds reached).
pub(crate) fn hold(shared: &Shared, target: &NodeId, held: Held) -> Result<(), Held> {
    let mut state = shared.write();
    if let Some(conn) = state.conns.get(target) {
        return match conn
            .queue
            .try_push_at(OutFrame::Raw(held.raw.clone()), held.priority)
        {
            Ok(()) => Ok(()),
            Err(_) => Err(held),
        };
    }
    let ms = &shared.config.message_server;
    let per_target = state.held.by_target.get(target).map_or(0, VecDeque::len);
    if !warming_up(shared)
        || per_target >= ms.queue_frames / 2
        || state.held.bytes + held.raw.len() > ms.queue_bytes
    {
        return Err(held);
    }
    state.held.bytes += held.raw.len();
    state
        .held
        .by_target
        .entry(target.clone())
        .or_default()
        .push_back(held);
    Ok(())
}

/// After the warm-up, answers every message still held with
/// `UnknownTarget`. Returns how many.
pub(crate) fn expire_held(shared: &Shared) -> usize {
    // Checked under the read lock first: a write lock invalidates every
    // connection's cached routes.
    if warming_up(shared) || shared.read().held.by_target.is_empty() {
        return 0;
    }
    let (expired, conns) = {
        let mut state: std::sync::RwLockWriteGuard<'_, State> = shared.write();
        if state.held.by_target.is_empty() {
            return 0;
        }
        state.held.bytes = 0;
        let expired: Vec<(NodeId, Held)> = state
            .held
            .by_target
            .drain()
            .flat_map(|(t, q)| q.into_iter().map(move |h| (t.clone(), h)))
            .collect();
        (expired, state.conns.clone())
    };
    let n = expired.len();
    for (target, h) in expired {
        Counters::add(&shared.counters.route_failures, 1);
        if let Some(conn) = conns.get(&h.sender) {
            let routed = Header::Routed(Routed {
                seq: h.seq,
                receivers: vec![],
                failed: vec![(target.clone(), DeliveryFailure::UnknownTarget)],
                error: Some(DeliveryFailure::UnknownTarget),
            });
            if conn
                .queue
                .try_push(OutFrame::control(routed), Lane::Control)
                .is_err()
            {
                tracing::warn!(sender = %h.sender, "could not answer for an expired held message");
            }
        }
    }
    n
}
