//! The node's [`NodeCore`] behind its lock, and what the runtime does with
//! what the core decides.
//!
//! Critical sections are short and never await: a task locks the core,
//! feeds it what it read or what the application asked, takes the events
//! the core produced, lets go, and only then acts on them (wakes the
//! waiting senders, tells the application, closes channels).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use cluster_manager::core::{Event, NodeCore, Transmit};
use cluster_manager::{Completion, SendError};
use tokio::sync::{oneshot, Notify};

/// Who waits on a tracked message: the sender's handle.
pub(crate) type Waiter = oneshot::Sender<Completion>;

/// The core and two things read without its lock.
#[derive(Debug)]
pub(crate) struct CoreCell {
    core: Mutex<NodeCore<Waiter>>,
    /// Whether the core knows an incarnation declared failed: every
    /// received one-way message asks, and the answer is nearly always no.
    any_failed: AtomicBool,
    /// Woken when the core's next deadline may have moved earlier.
    pub(crate) timers: Notify,
    /// Set once the node stops: read on every send, without a lock.
    stopping: AtomicBool,
}

/// What one visit to the core produced.
#[derive(Debug, Default)]
#[must_use = "the core's outputs must be acted on"]
pub(crate) struct Outputs {
    pub(crate) events: Vec<Event<Waiter>>,
    pub(crate) transmits: Vec<Transmit>,
}

impl CoreCell {
    pub(crate) fn new(core: NodeCore<Waiter>) -> Self {
        CoreCell {
            core: Mutex::new(core),
            any_failed: AtomicBool::new(false),
            timers: Notify::new(),
            stopping: AtomicBool::new(false),
        }
    }

    /// The core, for a look or a change that produces no events.
    pub(crate) fn lock(&self) -> MutexGuard<'_, NodeCore<Waiter>> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the core; returns its result and what the core wants
    /// done, to act on after the lock is let go.
    pub(crate) fn run<T>(&self, f: impl FnOnce(&mut NodeCore<Waiter>) -> T) -> (T, Outputs) {
        let mut core = self.lock();
        let result = f(&mut core);
        let mut out = Outputs::default();
        while let Some(event) = core.poll_event() {
            out.events.push(event);
        }
        while let Some(transmit) = core.poll_transmit() {
            out.transmits.push(transmit);
        }
        if core.members().any_failed() {
            self.any_failed.store(true, Ordering::Release);
        }
        (result, out)
    }

    /// Marks the node stopping; whether it was already.
    pub(crate) fn begin_stopping(&self) -> bool {
        self.stopping.swap(true, Ordering::SeqCst)
    }

    /// Whether the node is stopping.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// What a send whose connection went away fails with.
    pub(crate) fn closed_error(&self) -> SendError {
        if self.is_stopping() {
            SendError::Shutdown
        } else {
            SendError::Disconnected
        }
    }

    /// Whether some incarnation was declared failed (then ask the core
    /// which).
    pub(crate) fn any_failed(&self) -> bool {
        self.any_failed.load(Ordering::Acquire)
    }
}

/// Hands completions to their waiters (a sender that stopped waiting is
/// fine).
pub(crate) fn complete(waiter: Waiter, completion: Completion) {
    let _ = waiter.send(completion);
}

#[cfg(test)]
impl CoreCell {
    /// A core for node `id` in `incarnation`, connected to one server.
    pub(crate) fn for_tests(id: &str, incarnation: u64) -> std::sync::Arc<CoreCell> {
        use cluster_manager::core::CoreConfig;
        use cluster_manager::link::LinkPolicy;
        use std::time::Duration;
        let config = CoreConfig {
            id: transports::protocol::NodeId::new(id),
            incarnation,
            role: transports::protocol::Role::Server,
            groups: vec![],
            lazy_threshold_bytes: 1 << 16,
            lazy_services: vec!["*".into()],
            auto_activate_messages: 0,
            auto_activate_window: Duration::from_secs(1),
            max_message_bytes: 1 << 20,
            server_max_message_bytes: 1 << 20,
            link: LinkPolicy {
                addresses: 1,
                reconnect_delay: Duration::from_millis(100),
                reconnect_max_delay: Duration::from_secs(1),
                failure_timeout: Duration::from_secs(5),
                jitter_seed: 0,
            },
        };
        let core = NodeCore::new(config, vec![], 0, std::time::Instant::now());
        std::sync::Arc::new(CoreCell::new(core))
    }
}
