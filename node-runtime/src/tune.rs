//! The built-in service [`TUNE_SERVICE`] (`clustercomm.tune`): every node
//! offers it from its start, without the application doing anything, and
//! answers each request with an empty body. `clustercomm tune` times such
//! requests of growing bodies over the message-server path and over a lazy
//! channel, to find where the lazy channel starts to pay
//! (`lazy.threshold_bytes`).
//!
//! It is cheap and bounded: one inbox of [`TUNE_INBOX_CAPACITY`] messages
//! (and as many waiting to enter it), one task answering them in turn (none
//! per message), and a request that finds both full is refused with
//! `Overloaded` at once, never holding the node's connection back. A `send`
//! or `notify` to it is taken and dropped.
//!
//! It is registered with the node's other services (so the message server
//! routes to it, and a reconnect registers it again), and every node may
//! offer it whatever its `permissions.subscribe` says. Names starting with
//! [`RESERVED_SERVICE_PREFIX`] are the runtime's: [`crate::Node::subscribe`]
//! refuses them.

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::inbox::Inbox;
use crate::node::open_inbox;
use crate::runtime::Runtime;
use crate::services::WhenFull;
use crate::NodeError;

pub use cluster_config::permissions::{RESERVED_SERVICE_PREFIX, TUNE_SERVICE};

/// Requests the tune service's inbox holds; as many again wait to enter
/// it, and one more is refused with `Overloaded` at once. A sweep sends
/// one at a time; the bound is for anyone who sends more.
pub const TUNE_INBOX_CAPACITY: usize = 8;

/// Opens the tune service's inbox on `rt` and starts its answering task.
/// The caller registers the service with the message server (it is among
/// the services of the node's first registration).
///
/// # Errors
///
/// [`NodeError::AlreadySubscribed`], which cannot happen on a fresh node.
pub(crate) fn start(rt: &Runtime) -> Result<(), NodeError> {
    let inbox = open_inbox(
        rt,
        TUNE_SERVICE,
        TUNE_INBOX_CAPACITY,
        WhenFull::Refuse,
        crate::options::AckMode::OnReceipt,
    )?;
    rt.tasks.spawn(answer(inbox, rt.cancel.clone()));
    Ok(())
}

/// Answers every request in `inbox` with an empty body, until the node
/// stops.
async fn answer(mut inbox: Inbox, cancel: CancellationToken) {
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return,
            m = inbox.recv() => m,
        };
        let Some(message) = message else { return };
        if !message.is_request() {
            continue;
        }
        let (sender, seq) = (message.sender().clone(), message.seq());
        if let Err(error) = message.reply(Bytes::new()).await {
            tracing::debug!(%sender, seq, %error, "tune reply not sent");
        }
    }
}
