//! Answering a delivered request: what a request message keeps to reply
//! with, held weakly so that a message the application keeps does not
//! keep its node alive.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use cluster_config::Config;
use cluster_manager::SendError;
use tokio::time::Instant;
use transports::protocol::{
    Header, MessageHeader, MessageKind, MessageRef, NodeId, Priority, Target, TargetRef,
};
use transports::{Lane, OutFrame, PushError, Wait};

use crate::core::CoreCell;
use crate::server::ServerLink;

/// What a delivered request keeps to answer it: the parts a reply needs,
/// held weakly, so that a message the application keeps does not keep its
/// node alive.
#[derive(Debug, Clone)]
pub(crate) struct Replier {
    id: NodeId,
    config: Arc<Config>,
    core: Weak<CoreCell>,
    server: Weak<ServerLink>,
}

impl Replier {
    pub(crate) fn new(
        id: &NodeId,
        config: &Arc<Config>,
        core: &Arc<CoreCell>,
        server: &Arc<ServerLink>,
    ) -> Self {
        Replier {
            id: id.clone(),
            config: config.clone(),
            core: Arc::downgrade(core),
            server: Arc::downgrade(server),
        }
    }

    /// Sends `body` as the reply to request `request_seq` of
    /// `requester`'s `requester_incarnation`, at the request's `priority`.
    ///
    /// # Errors
    ///
    /// `PayloadTooLarge`, `Timeout`, `Disconnected`; `Shutdown` if the
    /// node stopped.
    pub(crate) async fn send(
        &self,
        requester: &NodeId,
        requester_incarnation: u64,
        request_seq: u64,
        service: &str,
        priority: Priority,
        body: Bytes,
    ) -> Result<(), SendError> {
        let kind = MessageKind::Reply {
            request_seq,
            requester_incarnation,
        };
        self.answer(requester, kind, service, priority, body).await
    }

    /// Sends an error answer (`code`, or `None`: dropped without a reply)
    /// with `text` to request `request_seq` of `requester`'s
    /// `requester_incarnation`.
    ///
    /// # Errors
    ///
    /// As [`Replier::send`].
    pub(crate) async fn send_error(
        &self,
        requester: &NodeId,
        requester_incarnation: u64,
        request_seq: u64,
        service: &str,
        priority: Priority,
        code: Option<u32>,
        text: Bytes,
    ) -> Result<(), SendError> {
        let kind = MessageKind::ReplyError {
            request_seq,
            requester_incarnation,
            code,
        };
        self.answer(requester, kind, service, priority, text).await
    }

    /// Tells `requester` that its request `request_seq` was dropped without
    /// a reply, without waiting: if the link's queue has no room now, the
    /// requester's own timeout ends its wait instead.
    pub(crate) fn no_reply_now(
        &self,
        requester: &NodeId,
        requester_incarnation: u64,
        request_seq: u64,
        service: &str,
        priority: Priority,
    ) {
        let (Some(core), Some(server)) = (self.core.upgrade(), self.server.upgrade()) else {
            return;
        };
        let kind = MessageKind::ReplyError {
            request_seq,
            requester_incarnation,
            code: None,
        };
        let header = self.header(&core, requester, service, kind, priority);
        if !server.queue.try_push_message(&header, &Bytes::new()) {
            tracing::debug!(%requester, request_seq, "no room to say a request was dropped; the requester times out");
        }
    }

    /// The header of an answer of `kind` to `requester`, numbered now.
    fn header<'a>(
        &'a self,
        core: &CoreCell,
        requester: &'a NodeId,
        service: &'a str,
        kind: MessageKind,
        priority: Priority,
    ) -> MessageRef<'a> {
        let (seq, incarnation) = {
            let mut core = core.lock();
            (core.next_seq(), core.incarnation())
        };
        MessageRef {
            sender: self.id.as_str(),
            incarnation,
            seq,
            target: TargetRef::Node(requester.as_str()),
            service,
            kind,
            priority,
        }
    }

    /// Sends an answer of `kind` to `requester`.
    async fn answer(
        &self,
        requester: &NodeId,
        kind: MessageKind,
        service: &str,
        priority: Priority,
        body: Bytes,
    ) -> Result<(), SendError> {
        let (Some(core), Some(server)) = (self.core.upgrade(), self.server.upgrade()) else {
            return Err(SendError::Shutdown);
        };
        check_size(&self.config, &body)?;
        let deadline = Instant::now() + self.config.send_timeout();
        // Usually queued at once, its header encoded from the names in
        // place; otherwise as a frame, waiting for room.
        let header = self.header(&core, requester, service, kind, priority);
        let (seq, incarnation) = (header.seq, header.incarnation);
        if server.queue.try_push_message(&header, &body) {
            return Ok(());
        }
        let frame = OutFrame::Parts {
            header: Header::Message(MessageHeader {
                sender: self.id.clone(),
                incarnation,
                seq,
                target: Target::Node(requester.clone()),
                service: Arc::from(service),
                kind,
                priority,
            }),
            body,
        };
        enqueue(&server, &core, &self.config, frame, deadline).await
    }
}

/// Bodies above `limits.max_message_bytes` fail before anything is sent,
/// whatever the path.
pub(crate) fn check_size(config: &Config, body: &Bytes) -> Result<(), SendError> {
    let max = config.limits.max_message_bytes;
    if body.len() as u64 > max {
        return Err(SendError::PayloadTooLarge {
            size: body.len() as u64,
            max,
        });
    }
    Ok(())
}

/// Queues a frame to the message server by `deadline`.
pub(crate) async fn enqueue(
    server: &ServerLink,
    core: &CoreCell,
    config: &Config,
    frame: OutFrame,
    deadline: Instant,
) -> Result<(), SendError> {
    // Room at once, usually: no timer, no waiting future.
    match server
        .queue
        .push(frame, Lane::Data, Wait::Until(deadline))
        .await
    {
        Ok(()) => Ok(()),
        Err(PushError::Closed(_)) => Err(core.closed_error()),
        Err(PushError::Full(_) | PushError::Congested) => Err(SendError::Timeout {
            after: config.send_timeout(),
            waiting_for: vec![],
        }),
    }
}
