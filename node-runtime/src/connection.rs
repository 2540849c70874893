//! The node's read task on its message-server connection: delivers
//! messages into inboxes (acknowledging them once accepted), and feeds
//! routing results, acknowledgements, replies and membership changes to
//! the delivery tracker.

use std::sync::Arc;

use bytes::Bytes;
use cluster_manager::{Completion, SendError};
use tokio::net::tcp::OwnedReadHalf;
use transports::protocol::{
    Ack, AckStatus, DeliveryFailure, Header, MemberEvent, MessageHeader, MessageKind,
};
use transports::{FrameReader, OutFrame, OutQueue};

use crate::counters::Counters;

use crate::inbox::Message;
use crate::node::Inner;

pub(crate) fn complete(
    done: impl IntoIterator<Item = (tokio::sync::oneshot::Sender<Completion>, Completion)>,
) {
    for (waiter, completion) in done {
        // The sender may have stopped waiting; nothing to do then.
        let _ = waiter.send(completion);
    }
}

/// Reads frames until the connection ends or the node shuts down.
pub(crate) async fn read_loop(inner: Arc<Inner>, mut reader: FrameReader<OwnedReadHalf>) {
    let end = loop {
        let frame = tokio::select! {
            _ = inner.cancel.cancelled() => break None,
            _ = inner.queue.closed() => break Some("the writer stopped".to_owned()),
            f = reader.next() => f,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Some("the message server closed the connection".to_owned()),
            Err(e) => break Some(format!("frame error: {e}")),
        };
        let (header, body) = frame.into_parts();
        match header {
            Header::Message(h) => {
                Counters::add(&inner.counters.received_server, 1);
                if deliver(&inner, h, body, &inner.queue, Received::Server)
                    .await
                    .is_err()
                {
                    break None;
                }
            }
            Header::Resolved { token, result } => {
                let waiter = inner
                    .resolves
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&token);
                if let Some(w) = waiter {
                    let _ = w.send(result);
                }
            }
            Header::Routed(routed) => {
                let done =
                    {
                        let mut tracker = inner.tracker();
                        if tracker.is_tracked(routed.seq) {
                            Ok(tracker
                                .handle_routed(&routed, |id, inc| inner.members.is_live(id, inc)))
                        } else {
                            Err(routed)
                        }
                    };
                match done {
                    Ok(done) => complete(done),
                    Err(routed) => late_failure(&inner, &routed),
                }
            }
            Header::Ack(ack) => {
                if ack.to_incarnation == inner.incarnation {
                    complete(inner.tracker().handle_ack(&ack));
                } else {
                    tracing::trace!(seq = ack.seq, "dropping ack for another incarnation");
                }
            }
            Header::Member(event) => {
                let joined_or_updated = !matches!(event, MemberEvent::Left { .. });
                if let Some(left) = inner.members.apply(event) {
                    tracing::info!(node = %left, "member left");
                    complete(inner.tracker().handle_member_left(&left));
                } else if joined_or_updated {
                    tracing::debug!("membership updated");
                }
            }
            Header::Subscribed { token } => {
                let waiter = inner
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&token);
                if let Some(w) = waiter {
                    let _ = w.send(());
                }
            }
            Header::Goodbye => break Some("the message server is stopping".to_owned()),
            other => {
                break Some(format!(
                    "unexpected {} frame from the message server",
                    other.kind()
                ))
            }
        }
    };
    if let Some(reason) = end {
        tracing::error!(%reason, "lost the connection to the message server");
        inner.members.disconnected();
        inner.close(&SendError::Disconnected);
        inner.queue.close();
    }
}

/// The path a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// Through the message server.
    Server,
    /// Over a lazy or session channel.
    Direct,
}

/// The node is shutting down; stop reading.
pub(crate) struct Stopping;

/// Hands a message to its service's inbox (acknowledging it on `acks`, the
/// connection it came on), or completes a request with its reply.
///
/// # Errors
///
/// [`Stopping`] if the node is shutting down.
pub(crate) async fn deliver(
    inner: &Arc<Inner>,
    h: MessageHeader,
    body: Bytes,
    acks: &OutQueue,
    path: Received,
) -> Result<(), Stopping> {
    tracing::trace!(sender = %h.sender, seq = h.seq, ?path, "message");
    if let MessageKind::Reply {
        request_seq,
        requester_incarnation,
    } = h.kind
    {
        if requester_incarnation == inner.incarnation {
            complete(inner.tracker().handle_reply(request_seq, &h.sender, body));
        }
        return Ok(());
    }
    let inbox = inner
        .inboxes
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&h.service)
        .cloned();
    let message = Message {
        sender: h.sender.clone(),
        sender_incarnation: h.incarnation,
        seq: h.seq,
        service: h.service.clone(),
        body,
        kind: h.kind,
        replier: (h.kind == MessageKind::Request).then(|| inner.clone()),
    };
    let status = match inbox {
        None => AckStatus::Failed(DeliveryFailure::NoSuchService),
        Some(tx) => {
            let accepted = tokio::select! {
                _ = inner.cancel.cancelled() => return Err(Stopping),
                r = tx.send(message) => r.is_ok(),
            };
            if accepted {
                AckStatus::Accepted
            } else {
                // The inbox was dropped: unsubscribe.
                unsubscribe(inner, &h.service).await;
                AckStatus::Failed(DeliveryFailure::NoSuchService)
            }
        }
    };
    let needs_answer = match h.kind {
        MessageKind::Send => true,
        // A request is answered by its reply; only a failure is acked.
        MessageKind::Request => status != AckStatus::Accepted,
        _ => false,
    };
    if needs_answer {
        let ack = Header::Ack(Ack {
            to: h.sender,
            to_incarnation: h.incarnation,
            seq: h.seq,
            from: inner.id.clone(),
            from_incarnation: inner.incarnation,
            status,
        });
        if let Err(transports::PushError::Full(frame)) =
            acks.try_push_control(OutFrame::control(ack))
        {
            let _ = acks.push_control(*frame).await;
        }
    }
    Ok(())
}

/// A routing failure for a message nobody waits on (a `notify`, or a send
/// whose caller gave up): counted, and logged, never silent.
fn late_failure(inner: &Inner, routed: &transports::protocol::Routed) {
    // A failed `Node` message names its node in `failed` and in `error`.
    let failures = match (routed.failed.len(), &routed.error) {
        (0, Some(_)) => 1,
        (n, _) => n,
    };
    if failures == 0 {
        return;
    }
    let before = inner
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

async fn unsubscribe(inner: &Inner, service: &Arc<str>) {
    let removed = {
        let mut inboxes = inner.inboxes.write().unwrap_or_else(|p| p.into_inner());
        match inboxes.get(service) {
            Some(tx) if tx.is_closed() => inboxes.remove(service).is_some(),
            _ => false,
        }
    };
    if removed {
        tracing::debug!(%service, "inbox dropped; unsubscribing");
        let frame = OutFrame::control(Header::Unsubscribe {
            service: service.to_string(),
        });
        let _ = inner.queue.push_control(frame).await;
    }
}
