//! `node.monitor_listen`: the node's own metrics over HTTP, for a node whose
//! application has no `/metrics` of its own to merge them into (see
//! [`crate::Node::register_metrics`]).
//!
//! The listener is hostile ground like every other: it answers `GET` (and
//! `HEAD`) of `/metrics` and `/` only, over one request per connection. A
//! request head is read into at most [`MAX_REQUEST_BYTES`] within
//! [`REQUEST_DEADLINE`]; at most [`MAX_CONNECTIONS`] are served at once and
//! more are closed at once, before anything is read. It has no access
//! control: keep it on loopback or a management network. A plain HTTP/1.1
//! responder is enough here and spares every application an HTTP stack.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::runtime::Runtime;

/// Connections served at once; more are closed unread.
pub const MAX_CONNECTIONS: usize = 8;
/// Largest request head read (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head, and again to take the
/// answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// The Prometheus text format's content type (version 0.0.4).
const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The OpenMetrics text format's content type, for scrapers that ask.
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Accepts connections until the node stops.
pub(crate) async fn serve(rt: Runtime, listener: TcpListener) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut turned_away = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = rt.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => {
                let Ok(place) = places.clone().try_acquire_owned() else {
                    drop(stream);
                    turned_away += 1;
                    if turned_away.is_power_of_two() {
                        tracing::warn!(%addr, total = turned_away, "monitor connection refused: {MAX_CONNECTIONS} already open");
                    }
                    continue;
                };
                let rt2 = rt.clone();
                rt.tasks.spawn(async move {
                    tokio::select! {
                        _ = rt2.cancel.cancelled() => {}
                        () = answer(&rt2, stream, place) => {}
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a monitor connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads one request and answers it; any failure closes the connection.
async fn answer(rt: &Runtime, mut stream: TcpStream, _place: OwnedSemaphorePermit) {
    let head = match tokio::time::timeout(REQUEST_DEADLINE, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        // Closed or broken before a whole head: nothing to answer.
        Ok(Ok(None)) | Ok(Err(_)) => return,
        Err(_) => {
            let reply = Reply::error(408, "Request Timeout", "no whole request within 5 s\n");
            let _ = write(&mut stream, &reply, false).await;
            return;
        }
    };
    let (reply, head_only) = match head {
        Head::TooLarge => (
            Reply::error(
                431,
                "Request Header Fields Too Large",
                "request head over 8 KiB\n",
            ),
            false,
        ),
        Head::Complete(bytes) => route(rt, &bytes),
    };
    let _ = tokio::time::timeout(REQUEST_DEADLINE, write(&mut stream, &reply, head_only)).await;
}

/// A request head as read.
enum Head {
    /// Up to and without the blank line.
    Complete(Vec<u8>),
    /// Over [`MAX_REQUEST_BYTES`] without a blank line.
    TooLarge,
}

/// Reads until the blank line that ends a request head. `None`: the peer
/// closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_blank_line(&head[searched_from..]) {
            head.truncate(searched_from + end);
            return Ok(Some(Head::Complete(head)));
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Ok(Some(Head::TooLarge));
        }
    }
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n")
}

/// An answer to write.
struct Reply {
    code: u16,
    reason: &'static str,
    content_type: &'static str,
    allow: bool,
    body: String,
}

impl Reply {
    fn error(code: u16, reason: &'static str, body: &str) -> Reply {
        Reply {
            code,
            reason,
            content_type: "text/plain; charset=utf-8",
            allow: false,
            body: body.to_owned(),
        }
    }
}

/// The answer to a request head, and whether it is a `HEAD` (no body).
fn route(rt: &Runtime, head: &[u8]) -> (Reply, bool) {
    let Ok(head) = std::str::from_utf8(head) else {
        return (
            Reply::error(400, "Bad Request", "request is not UTF-8\n"),
            false,
        );
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (
            Reply::error(400, "Bad Request", "malformed request line\n"),
            false,
        );
    };
    if !version.starts_with("HTTP/1.") {
        return (
            Reply::error(505, "HTTP Version Not Supported", "HTTP/1.x only\n"),
            false,
        );
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut reply = Reply::error(405, "Method Not Allowed", "GET or HEAD only\n");
            reply.allow = true;
            return (reply, false);
        }
    };
    let path = target.split('?').next().unwrap_or_default();
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, value)| value.trim());
    let reply = match path {
        "/metrics" => metrics(rt, accept),
        "/" => Reply {
            code: 200,
            reason: "OK",
            content_type: "text/plain; charset=utf-8",
            allow: false,
            body: format!(
                "clustercomm node {}: its metrics are at /metrics\n",
                rt.id.as_str()
            ),
        },
        _ => Reply::error(404, "Not Found", "only / and /metrics are here\n"),
    };
    (reply, head_only)
}

/// The node's metrics, in OpenMetrics text if the scraper asks for it and
/// in the Prometheus text format otherwise.
fn metrics(rt: &Runtime, accept: Option<&str>) -> Reply {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(crate::metrics::NodeCollector::new(rt.clone())));
    let mut body = String::new();
    let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut body, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut body, &registry)
    };
    match encoded {
        Ok(()) => Reply {
            code: 200,
            reason: "OK",
            content_type: if openmetrics {
                OPENMETRICS_TEXT
            } else {
                PROMETHEUS_TEXT
            },
            allow: false,
            body,
        },
        Err(_) => Reply::error(500, "Internal Server Error", "cannot encode the metrics\n"),
    }
}

async fn write(stream: &mut TcpStream, reply: &Reply, head_only: bool) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        reply.code,
        reply.reason,
        reply.content_type,
        reply.body.len()
    );
    if reply.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&reply.body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blank_line_is_found_across_reads() {
        assert_eq!(find_blank_line(b"GET / HTTP/1.1\r\n\r\n"), Some(14));
        assert_eq!(find_blank_line(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(find_blank_line(b""), None);
    }
}
