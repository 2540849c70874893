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

/// The request an answer is for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked<'a> {
    /// Who sent it.
    pub(crate) requester: &'a NodeId,
    /// The requester's incarnation.
    pub(crate) incarnation: u64,
    /// Its number.
    pub(crate) seq: u64,
    /// Its service.
    pub(crate) service: &'a str,
    /// Its priority, which the answer takes.
    pub(crate) priority: Priority,
}

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

    /// Sends `body` as the reply to `request`.
    ///
    /// # Errors
    ///
    /// `PayloadTooLarge`, `Timeout`, `Disconnected`; `Shutdown` if the
    /// node stopped.
    pub(crate) async fn send(&self, request: &Asked<'_>, body: Bytes) -> Result<(), SendError> {
        let kind = MessageKind::Reply {
            request_seq: request.seq,
            requester_incarnation: request.incarnation,
        };
        self.answer(request, kind, body).await
    }

    /// Sends an error answer (`code`, or `None`: dropped without a reply)
    /// with `text` to `request`.
    ///
    /// # Errors
    ///
    /// As [`Replier::send`].
    pub(crate) async fn send_error(
        &self,
        request: &Asked<'_>,
        code: Option<u32>,
        text: Bytes,
    ) -> Result<(), SendError> {
        let kind = MessageKind::ReplyError {
            request_seq: request.seq,
            requester_incarnation: request.incarnation,
            code,
        };
        self.answer(request, kind, text).await
    }

    /// Tells the requester that its `request` was dropped without a reply,
    /// without waiting: if the link's queue has no room now, the
    /// requester's own timeout ends its wait instead.
    pub(crate) fn no_reply_now(&self, request: &Asked<'_>) {
        let (Some(core), Some(server)) = (self.core.upgrade(), self.server.upgrade()) else {
            return;
        };
        let kind = MessageKind::ReplyError {
            request_seq: request.seq,
            requester_incarnation: request.incarnation,
            code: None,
        };
        let (requester, request_seq) = (request.requester, request.seq);
        let header = self.header(&core, request, kind);
        if !server.queue.try_push_message(&header, &Bytes::new()) {
            tracing::debug!(%requester, request_seq, "no room to say a request was dropped; the requester times out");
        }
    }

    /// The header of an answer of `kind` to `request`, numbered now.
    fn header<'a>(
        &'a self,
        core: &CoreCell,
        request: &Asked<'a>,
        kind: MessageKind,
    ) -> MessageRef<'a> {
        let (seq, incarnation) = {
            let mut core = core.lock();
            (core.next_seq(), core.incarnation())
        };
        MessageRef {
            sender: self.id.as_str(),
            incarnation,
            seq,
            target: TargetRef::Node(request.requester.as_str()),
            service: request.service,
            kind,
            priority: request.priority,
            expires_ms: None,
        }
    }

    /// Sends an answer of `kind` to `request`'s requester.
    async fn answer(
        &self,
        request: &Asked<'_>,
        kind: MessageKind,
        body: Bytes,
    ) -> Result<(), SendError> {
        let (Some(core), Some(server)) = (self.core.upgrade(), self.server.upgrade()) else {
            return Err(SendError::Shutdown);
        };
        check_size(&self.config, &body)?;
        let deadline = Instant::now() + self.config.send_timeout();
        // Usually queued at once, its header encoded from the names in
        // place; otherwise as a frame, waiting for room.
        let header = self.header(&core, request, kind);
        let (seq, incarnation) = (header.seq, header.incarnation);
        if server.queue.try_push_message(&header, &body) {
            return Ok(());
        }
        let frame = OutFrame::Parts {
            header: Header::Message(MessageHeader {
                sender: self.id.clone(),
                incarnation,
                seq,
                target: Target::Node(request.requester.clone()),
                service: Arc::from(request.service),
                kind,
                priority: request.priority,
                expires_ms: None,
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
