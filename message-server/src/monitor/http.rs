//! The monitor's routes, served with axum, and its listener: at most
//! [`MONITOR_MAX_CONNECTIONS`] connections, each closed after
//! [`MONITOR_IDLE_TIMEOUT`] without reading or writing.

use std::future::{Future, IntoFuture};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::State as Extract;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::metrics::{self, Format};
use super::{State, MONITOR_IDLE_TIMEOUT, MONITOR_MAX_CONNECTIONS, MONITOR_SHUTDOWN_GRACE};

/// The page: self-contained (inline CSS and script, nothing fetched from
/// elsewhere); its script renders `/api/v1/snapshot` every 2 s.
const PAGE: &str = include_str!("page.html");

/// The page's policy: its own inline style and script, and requests to
/// this origin only.
const PAGE_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Serves `state` on `listener` until `shutdown`, then for at most the
/// grace period.
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let router = Router::new()
        .route("/", get(page))
        .route("/api/v1/snapshot", get(snapshot))
        .route("/api/v1/status", get(status))
        .route("/api/v1/members", get(members))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/events", get(events))
        .route("/api/v1/dead-letters", get(dead_letters))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state);
    let listener = CappedListener {
        inner: listener,
        places: Arc::new(Semaphore::new(MONITOR_MAX_CONNECTIONS)),
    };
    let stopping = CancellationToken::new();
    let stop = stopping.clone();
    let serving = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        stop.cancel();
    });
    tokio::select! {
        served = serving.into_future() => served,
        _ = async {
            stopping.cancelled().await;
            tokio::time::sleep(MONITOR_SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

/// No caching anywhere: every answer is the state now.
fn fresh(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn page() -> Response {
    let mut response =
        fresh(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn snapshot(Extract(state): Extract<Arc<State>>) -> Response {
    fresh(Json(state.snapshot()).into_response())
}

async fn status(Extract(state): Extract<Arc<State>>) -> Response {
    fresh(Json(state.snapshot().status).into_response())
}

async fn members(Extract(state): Extract<Arc<State>>) -> Response {
    fresh(Json(state.snapshot().members).into_response())
}

async fn nodes(Extract(state): Extract<Arc<State>>) -> Response {
    fresh(Json(state.snapshot().nodes).into_response())
}

async fn events(Extract(state): Extract<Arc<State>>) -> Response {
    fresh(Json(state.server.shared().events.recent()).into_response())
}

/// `/api/v1/dead-letters?limit=N`: 400 when `limit` is not a number.
async fn dead_letters(Extract(state): Extract<Arc<State>>, uri: Uri) -> Response {
    match super::dead_letters::limit(uri.query()) {
        Ok(limit) => {
            fresh(Json(super::dead_letters::gather(state.server.shared(), limit)).into_response())
        }
        Err(why) => (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
    }
}

async fn metrics(Extract(state): Extract<Arc<State>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    match metrics::encode(Arc::new(state.snapshot()), format) {
        Ok(text) => fresh(([(header::CONTENT_TYPE, format.content_type())], text).into_response()),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found: the monitor serves /, /api/v1/snapshot, /api/v1/status, /api/v1/members, /api/v1/nodes, /api/v1/events, /api/v1/dead-letters and /metrics\n",
    )
        .into_response()
}

/// The monitor's listener: a connection past the cap is closed at once.
struct CappedListener {
    inner: TcpListener,
    places: Arc<Semaphore>,
}

impl axum::serve::Listener for CappedListener {
    type Io = Capped;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Capped, std::net::SocketAddr) {
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, say: wait a little, as the
                    // message server's listener does.
                    tracing::debug!(error = %e, "monitor accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(place) = self.places.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "monitor connection refused: over the cap");
                continue;
            };
            let _ = stream.set_nodelay(true);
            return (Capped::new(stream, place), peer);
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// A monitor connection: holds its place under the cap, and fails with
/// `TimedOut` once it has neither read nor written for the idle timeout.
struct Capped {
    io: TcpStream,
    _place: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
}

impl Capped {
    fn new(io: TcpStream, place: OwnedSemaphorePermit) -> Capped {
        Capped {
            io,
            _place: place,
            idle: Box::pin(tokio::time::sleep(MONITOR_IDLE_TIMEOUT)),
        }
    }

    /// After progress: the idle timeout starts again.
    fn progressed(&mut self) {
        self.idle
            .as_mut()
            .reset(Instant::now() + MONITOR_IDLE_TIMEOUT);
    }

    /// No progress: an error once the idle timeout has passed.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx),
        }
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
