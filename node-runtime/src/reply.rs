//! Answering a delivered request: what a request message keeps to reply
//! with, held weakly so that a message the application keeps does not
//! keep its node alive.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use cluster_config::Config;
use cluster_manager::SendError;
use tokio::time::Instant;
use transports::protocol::{
    Header, MessageHeader, MessageKind, MessageRef, NodeId, Target, TargetRef,
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
    /// `requester`'s `requester_incarnation`.
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
        body: Bytes,
    ) -> Result<(), SendError> {
        let (Some(core), Some(server)) = (self.core.upgrade(), self.server.upgrade()) else {
            return Err(SendError::Shutdown);
        };
        check_size(&self.config, &body)?;
        let deadline = Instant::now() + self.config.send_timeout();
        let kind = MessageKind::Reply {
            request_seq,
            requester_incarnation,
        };
        let (seq, incarnation) = {
            let mut core = core.lock();
            (core.next_seq(), core.incarnation())
        };
        // Usually queued at once, its header encoded from the names in
        // place; otherwise as a frame, waiting for room.
        let header = MessageRef {
            sender: self.id.as_str(),
            incarnation,
            seq,
            target: TargetRef::Node(requester.as_str()),
            service,
            kind,
        };
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
