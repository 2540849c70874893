//! Message traces: a node (the `clustercomm trace` command) asks for the
//! headers, and optionally the bodies, of the messages that pass the server
//! and match a filter, for a bounded count or time. Operators use it to
//! investigate, as SAP's message server's "message log" is used.
//!
//! While no trace runs, routing pays one relaxed load per message. While
//! one runs, every message is matched under a lock, and each match is
//! queued to the tracer without waiting: a tracer that does not keep up
//! loses captures (counted and told at the end), never slows the cluster.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use transports::protocol::{
    Header, MessageRef, NodeId, Target, TargetRef, TraceRequest, Traced, TRACE_BODY_BYTES,
};
use transports::{Lane, OutFrame, OutQueue};

/// Most traces running at once.
pub(crate) const MAX_TRACES: usize = 8;

/// Longest a trace may run, in milliseconds.
pub(crate) const MAX_TRACE_MS: u64 = 10 * 60 * 1000;

/// Most messages a trace may capture.
pub(crate) const MAX_TRACE_MESSAGES: u64 = 100_000;

/// The traces running now.
#[derive(Debug, Default)]
pub(crate) struct Traces {
    active: AtomicUsize,
    running: Mutex<Vec<Running>>,
}

#[derive(Debug)]
struct Running {
    tracer: NodeId,
    queue: OutQueue,
    request: TraceRequest,
    until_ms: u64,
    captured: u64,
    dropped: u64,
}

impl Traces {
    fn running(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a trace for `tracer`, whose captures go to `queue`. A
    /// tracer's earlier trace is ended first.
    ///
    /// # Errors
    ///
    /// Why it cannot start (too many traces running).
    pub(crate) fn start(
        &self,
        tracer: &NodeId,
        queue: &OutQueue,
        mut request: TraceRequest,
        now_ms: u64,
    ) -> Result<(), String> {
        request.max_messages = request.max_messages.clamp(1, MAX_TRACE_MESSAGES);
        request.duration_ms = request.duration_ms.clamp(1, MAX_TRACE_MS);
        let mut running = self.running();
        running.retain(|r| &r.tracer != tracer);
        if running.len() >= MAX_TRACES {
            return Err(format!("{MAX_TRACES} traces run already"));
        }
        running.push(Running {
            tracer: tracer.clone(),
            queue: queue.clone(),
            until_ms: now_ms.saturating_add(request.duration_ms),
            request,
            captured: 0,
            dropped: 0,
        });
        self.active.store(running.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Whether any trace runs: one relaxed load, for the routing path.
    pub(crate) fn any(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }

    /// Offers a routed message to every trace; `body` is the message's
    /// body.
    pub(crate) fn capture(&self, h: &MessageRef<'_>, body: &[u8], now_ms: u64, unix_ms: u64) {
        let mut running = self.running();
        let mut ended = false;
        for r in running.iter_mut() {
            if !matches(&r.request, h) {
                continue;
            }
            let traced = Traced {
                at_unix_ms: unix_ms,
                sender: NodeId::new(h.sender),
                incarnation: h.incarnation,
                seq: h.seq,
                kind: h.kind,
                target: h.target.to_target(),
                service: h.service.to_owned(),
                body_bytes: body.len() as u64,
            };
            let body = if r.request.bodies {
                Bytes::copy_from_slice(&body[..body.len().min(TRACE_BODY_BYTES)])
            } else {
                Bytes::new()
            };
            let frame = OutFrame::Parts {
                header: Header::Traced(Box::new(traced)),
                body,
            };
            match r.queue.try_push(frame, Lane::Data) {
                Ok(()) => r.captured += 1,
                Err(_) => r.dropped += 1,
            }
            ended |= r.captured >= r.request.max_messages;
        }
        if ended || running.iter().any(|r| r.until_ms <= now_ms) {
            end_done(&mut running, now_ms);
            self.active.store(running.len(), Ordering::Relaxed);
        }
    }

    /// Ends the traces whose time is up (and those whose tracer left).
    pub(crate) fn expire(&self, now_ms: u64) {
        if !self.any() {
            return;
        }
        let mut running = self.running();
        end_done(&mut running, now_ms);
        self.active.store(running.len(), Ordering::Relaxed);
    }
}

/// Ends, with a `TraceEnd` to their tracers, the traces that are done.
fn end_done(running: &mut Vec<Running>, now_ms: u64) {
    running.retain(|r| {
        let reason = if r.queue.is_closed() {
            return false;
        } else if r.captured >= r.request.max_messages {
            "its count was reached"
        } else if r.until_ms <= now_ms {
            "its time was up"
        } else {
            return true;
        };
        let end = Header::TraceEnd {
            captured: r.captured,
            dropped: r.dropped,
            reason: reason.to_owned(),
        };
        // Behind the captures (in their class), so that the tracer reads
        // every capture before the end; ahead of them only if their class
        // is full.
        let pushed = match r.queue.try_push(OutFrame::control(end), Lane::Data) {
            Err(transports::PushError::Full(end)) => r.queue.try_push(*end, Lane::Control),
            other => other,
        };
        if pushed.is_err() {
            tracing::debug!(tracer = %r.tracer, "no room for the end of a trace");
        }
        false
    });
}

/// Whether `h` passes `request`'s filter.
fn matches(request: &TraceRequest, h: &MessageRef<'_>) -> bool {
    request
        .sender
        .as_ref()
        .is_none_or(|s| s.as_str() == h.sender)
        && request.service.as_deref().is_none_or(|s| s == h.service)
        && request
            .target
            .as_ref()
            .is_none_or(|t| same_target(t, h.target))
}

fn same_target(t: &Target, r: TargetRef<'_>) -> bool {
    match (t, r) {
        (Target::Node(a), TargetRef::Node(b)) => a.as_str() == b,
        (Target::Group(a), TargetRef::Group(b)) | (Target::AnyOf(a), TargetRef::AnyOf(b)) => a == b,
        (Target::All, TargetRef::All) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transports::protocol::MessageKind;

    fn message<'a>(sender: &'a str, target: TargetRef<'a>, service: &'a str) -> MessageRef<'a> {
        MessageRef {
            sender,
            incarnation: 1,
            seq: 1,
            target,
            service,
            kind: MessageKind::Send,
            priority: transports::protocol::Priority::Normal,
            expires_ms: None,
        }
    }

    #[test]
    fn filters_match_what_they_name_and_nothing_else() {
        let any = TraceRequest::default();
        let by_service = TraceRequest {
            service: Some("svc".into()),
            ..TraceRequest::default()
        };
        let by_all = TraceRequest {
            sender: Some(NodeId::new("a")),
            target: Some(Target::Group("web".into())),
            service: Some("svc".into()),
            ..TraceRequest::default()
        };
        let cases = [
            (&any, message("a", TargetRef::All, "x"), true),
            (&by_service, message("a", TargetRef::Node("b"), "svc"), true),
            (
                &by_service,
                message("a", TargetRef::Node("b"), "other"),
                false,
            ),
            (&by_all, message("a", TargetRef::Group("web"), "svc"), true),
            (&by_all, message("b", TargetRef::Group("web"), "svc"), false),
            (&by_all, message("a", TargetRef::AnyOf("web"), "svc"), false),
            (&by_all, message("a", TargetRef::Group("db"), "svc"), false),
        ];
        for (i, (request, h, expected)) in cases.iter().enumerate() {
            assert_eq!(matches(request, h), *expected, "case {i}");
        }
    }
}
