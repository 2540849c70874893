//! The async-nats peer: every [`Case`] run with the same pattern against a
//! local `nats-server` through the `async-nats` client, in the same run as
//! clustercomm (a second NATS column beside [`crate::nats_go`], NATS's own
//! Go client).
//!
//! [`Nats::start`] starts a [`NatsServer`] (installing nats-server with
//! `apt-get` if it is missing) with `max_payload` raised to
//! [`MAX_PAYLOAD`]. [`Nats::run`] then measures one case; each case opens
//! its own client connections, one per role (publisher, each subscriber,
//! responder, requester), like separate nodes, and closes them at the end.
//!
//! | case | NATS pattern | result |
//! | --- | --- | --- |
//! | `Notify`, `SendPipelined` (vs publish), `Session` | one publisher, one subscriber on one subject | messages/s received |
//! | `FixedRate` | the same, the publisher on a fixed schedule ([`latency::fixed_rate`]) | µs percentiles from each message's due time |
//! | `FanOutAll`, `FanOutGroup` | one publisher, `receivers` subscribers on one subject | deliveries/s (all subscribers) |
//! | `AnyOf` | one publisher, a queue group of `members` subscribers | messages/s received in all |
//! | `RequestLatency` | a responder echoing the payload, one requester, one request at a time | µs percentiles |
//! | `RequestRate` | the same responder, `outstanding` requester tasks on one client | requests/s |
//! | `Bulk` | bodies published as requests, answered with a 1-byte ack, [`BULK_IN_FLIGHT`] in flight | MB/s |
//! | `SendPipelined` (vs JetStream), `NotifyTls`, `LazyTls` | none: skipped (nats.go runs the JetStream and TLS `notify` cases) | |
//!
//! One-way cases publish as fast as the client takes messages, with a
//! [`Client::flush`] every [`FLUSH_EVERY`] messages or
//! [`FLUSH_EVERY_BYTES`] bytes, pipelined one deep. In async-nats 0.46
//! `flush` is local: it queues a command behind every publish already
//! handed to the client and resolves once the connection task has written
//! all of them to the socket and flushed the stream (a no-op for plain
//! TCP). It is no PING/PONG round trip and says nothing about the server
//! having them; it keeps the publisher at most two windows ahead of the
//! socket (the client's bounded command channel and write buffer hold it
//! back too).
//!
//! A slow subscriber may have messages dropped, by the client (its
//! subscription channel is full) or by the server (it disconnects a slow
//! consumer). The rate counts only what arrived, up to the moment the
//! last of it arrived; what did not arrive is the measurement's loss,
//! explained only by what async-nats itself reported through its event
//! callback (slow-consumer events, disconnects). `Bulk`'s path is
//! irrelevant here: both rows go through the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context};
use async_nats::{Client, ConnectOptions, Event, ServerError, Subject};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::latency::{self, PacedSender, Recorder};
use crate::nats_server::{NatsServer, ServerSetup};
use crate::options::{Options, WAIT_TIMEOUT};
use crate::raw_cases::{bulk_plans, BULK_IN_FLIGHT};
use crate::report::per_second;
use crate::suite::{Case, Latency, Measurement, Outcome, SendPeer};
use crate::transfer::{Plan, Transfer};
use crate::wait::{settle, Counter};

pub use crate::nats_server::{APT_TIMEOUT, MAX_PAYLOAD, MAX_PENDING, STARTUP_TIMEOUT};

/// One-way publishes between two flushes...
pub const FLUSH_EVERY: u64 = 4096;

/// ...or body bytes between two flushes, whichever comes first.
pub const FLUSH_EVERY_BYTES: u64 = 4 << 20;

/// Messages a subscription may queue inside the client before it drops
/// them as a slow consumer (async-nats's default is 65 536).
pub const SUBSCRIPTION_CAPACITY: usize = 1 << 20;

/// How long a count may stand still before it is taken as final.
pub use crate::wait::STALL;

/// The byte a bulk receiver answers each body with.
pub const BULK_ACK: u8 = 0x06;

/// The queue group of [`Case::AnyOf`].
const QUEUE_GROUP: &str = "members";

/// A running nats-server on a loopback port and the async-nats side of
/// every case; the server is killed and reaped on drop.
pub struct Nats {
    server: NatsServer,
    subjects: AtomicU64,
}

impl Nats {
    /// Finds (or installs) nats-server, starts it on a free loopback port
    /// with `max_payload` raised to [`MAX_PAYLOAD`], and waits until it
    /// accepts a client. What it does beyond the lookup (installing, the
    /// server it started) goes to stderr. `quick` does not change the
    /// server: it is taken so that every peer starts the same way.
    ///
    /// # Errors
    ///
    /// A reason, if nats-server is not on `PATH` and `apt-get install -y
    /// nats-server` (after `apt-get update` if needed) did not make it so,
    /// or if it did not start and accept a client within
    /// [`STARTUP_TIMEOUT`].
    pub async fn start(quick: bool) -> Result<Nats, String> {
        let _ = quick;
        let server = NatsServer::start(ServerSetup::core("nats")).await?;
        Ok(Nats {
            server,
            subjects: AtomicU64::new(0),
        })
    }

    /// The server's client URL (`nats://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        self.server.url()
    }

    /// The largest payload the server accepts, as it announced it.
    pub fn max_payload(&self) -> usize {
        self.server.max_payload()
    }

    /// Measures `case` with the NATS pattern described in the module docs.
    /// One-way cases carry their loss (explained by what async-nats
    /// reported, if it reported anything). Never panics on a peer problem:
    /// failures come back as [`Outcome::Failed`], bodies over the server's
    /// limit and the JetStream and recoverable sends (which async-nats
    /// does not run) as [`Outcome::Skipped`].
    pub async fn run(&self, case: Case, options: &Options) -> Measurement {
        let result = match case {
            Case::SendPipelined {
                peer: SendPeer::JetStream,
                ..
            }
            | Case::NotifyTls { .. }
            | Case::LazyTls { .. }
            | Case::Stream { .. }
            | Case::HeadOfLine { .. }
            | Case::Priority { .. }
            | Case::RecoverableSend { .. }
            | Case::RecoverableLatency { .. } => Ok(Measurement::skipped("n/a")),
            Case::Notify { body } | Case::Session { body } | Case::SendPipelined { body, .. } => {
                self.one_way(1, Fan::Subject, body, options).await
            }
            Case::FanOutAll { receivers, body } | Case::FanOutGroup { receivers, body } => {
                self.one_way(receivers, Fan::Subject, body, options).await
            }
            Case::AnyOf { members, body } => self.one_way(members, Fan::Queue, body, options).await,
            Case::FixedRate { body, rate } => self.fixed_rate(body, rate, options).await,
            Case::RequestLatency { body } => self.request_latency(body, options).await,
            Case::RequestRate { body, outstanding } => self
                .request_rate(body, outstanding, options)
                .await
                .map(|rate| Outcome::Rate(rate).into()),
            Case::Bulk { body, .. } => self.bulk(body, options).await,
        };
        result.unwrap_or_else(|e| Measurement::failed(format!("{e:#}")))
    }

    /// A new client connection named `role`, counting what async-nats
    /// reports into `reported`.
    async fn connect(&self, role: &str, reported: &Reported) -> anyhow::Result<Client> {
        let events = reported.clone();
        tokio::time::timeout(
            WAIT_TIMEOUT,
            ConnectOptions::new()
                .name(format!("bench-{role}"))
                .request_timeout(Some(WAIT_TIMEOUT))
                .subscription_capacity(SUBSCRIPTION_CAPACITY)
                .event_callback(move |event| {
                    events.take(&event);
                    async {}
                })
                .connect(self.url()),
        )
        .await
        .with_context(|| format!("connecting {role} timed out"))?
        .with_context(|| format!("connecting {role} to {}", self.url()))
    }

    /// A subject no earlier case used.
    fn subject(&self, kind: &str) -> Subject {
        let n = self.subjects.fetch_add(1, Ordering::Relaxed);
        Subject::from(format!("bench.{kind}.{n}"))
    }

    /// One publisher, `subscribers` subscriber clients (plain or in one
    /// queue group): deliveries per second over the measured phase, and
    /// the deliveries that did not arrive as loss.
    async fn one_way(
        &self,
        subscribers: usize,
        fan: Fan,
        body: usize,
        options: &Options,
    ) -> anyhow::Result<Measurement> {
        ensure!(subscribers > 0, "no subscribers");
        let subject = self.subject("oneway");
        let reported = Reported::default();
        let received = Counter::new();
        let mut tasks = Tasks::default();
        let mut clients = Vec::with_capacity(subscribers);
        for i in 0..subscribers {
            let client = self.connect(&format!("subscriber-{i}"), &reported).await?;
            let mut subscription = match fan {
                Fan::Subject => client.subscribe(subject.clone()).await?,
                Fan::Queue => {
                    client
                        .queue_subscribe(subject.clone(), QUEUE_GROUP.to_owned())
                        .await?
                }
            };
            // The SUB is written to the socket; a round trip makes sure
            // the server has taken it before anything is published.
            round_trip(&client)
                .await
                .context("registering a subscription")?;
            let received = received.clone();
            tasks.spawn(async move {
                while subscription.next().await.is_some() {
                    received.add(1);
                }
            });
            clients.push(client);
        }
        let per_publish = match fan {
            Fan::Subject => subscribers as u64,
            Fan::Queue => 1,
        };
        let publisher = self.connect("publisher", &reported).await?;
        let payload = Bytes::from(vec![0xAB; body]);

        let warm = publish_for(&publisher, &subject, &payload, options.warmup).await?;
        settle(&received, warm * per_publish)
            .await
            .context("nats warm-up")?;

        let base = received.get();
        let start = Instant::now();
        let sent = publish_for(&publisher, &subject, &payload, options.measure).await?;
        let expected = sent * per_publish;
        let (count, done) = settle(&received, base + expected)
            .await
            .context("nats one-way")?;
        let got = count - base;
        ensure!(got > 0, "no message arrived");
        Ok(
            Measurement::from(Outcome::Rate(per_second(got, done - start)))
                .with_loss(expected.saturating_sub(got), reported.text()),
        )
    }

    /// One publisher on a fixed schedule at `rate`, one subscriber
    /// recording each message's latency from its due time.
    async fn fixed_rate(
        &self,
        body: usize,
        rate: u64,
        options: &Options,
    ) -> anyhow::Result<Measurement> {
        let subject = self.subject("fixedrate");
        let reported = Reported::default();
        let subscriber = self.connect("subscriber", &reported).await?;
        let mut subscription = subscriber.subscribe(subject.clone()).await?;
        round_trip(&subscriber)
            .await
            .context("registering the subscription")?;
        let recorder = Recorder::new();
        let mut tasks = Tasks::default();
        let recording = recorder.clone();
        tasks.spawn(async move {
            while let Some(message) = subscription.next().await {
                recording.record(&message.payload);
            }
        });
        let mut publisher = Publisher {
            client: self.connect("publisher", &reported).await?,
            subject,
        };
        let measured =
            latency::fixed_rate(&mut publisher, &recorder, body, rate as f64, options).await?;
        let lost = measured.lost;
        Ok(measured.with_loss(lost, reported.text()))
    }

    /// Starts a responder client echoing every request's payload (or
    /// answering `reply`) on a new subject; returns the subject, the
    /// client and its task.
    async fn responder(&self, reply: Option<Bytes>) -> anyhow::Result<(Subject, Client, Tasks)> {
        let subject = self.subject("request");
        let client = self.connect("responder", &Reported::default()).await?;
        let mut subscription = client.subscribe(subject.clone()).await?;
        round_trip(&client)
            .await
            .context("registering the responder")?;
        let mut tasks = Tasks::default();
        let answering = client.clone();
        tasks.spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(to) = message.reply else { continue };
                let answer = reply.clone().unwrap_or(message.payload);
                if answering.publish(to, answer).await.is_err() {
                    break;
                }
            }
        });
        Ok((subject, client, tasks))
    }

    /// Sequential requests: per-request round-trip percentiles.
    async fn request_latency(&self, body: usize, options: &Options) -> anyhow::Result<Measurement> {
        let (subject, _responder, _tasks) = self.responder(None).await?;
        let requester = self.connect("requester", &Reported::default()).await?;
        let payload = Bytes::from(vec![0xAB; body]);
        let start = Instant::now();
        while start.elapsed() < options.warmup {
            request(&requester, &subject, &payload).await?;
        }
        let mut samples = latency::histogram();
        let start = Instant::now();
        while start.elapsed() < options.measure {
            let sent = Instant::now();
            request(&requester, &subject, &payload).await?;
            latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
        }
        Latency::from_histogram(&samples)
            .map(|l| Outcome::Latency(l).into())
            .context("no request completed")
    }

    /// `outstanding` requester tasks on one client: requests per second.
    async fn request_rate(
        &self,
        body: usize,
        outstanding: usize,
        options: &Options,
    ) -> anyhow::Result<f64> {
        ensure!(outstanding > 0, "no requests in flight");
        let (subject, _responder, _tasks) = self.responder(None).await?;
        let requester = self.connect("requester", &Reported::default()).await?;
        let payload = Bytes::from(vec![0xAB; body]);
        requests_for(&requester, &subject, &payload, outstanding, options.warmup).await?;
        let (done, elapsed) =
            requests_for(&requester, &subject, &payload, outstanding, options.measure).await?;
        Ok(per_second(done, elapsed))
    }

    /// Bodies sent as requests, each answered with a 1-byte ack,
    /// [`BULK_IN_FLIGHT`] in flight: MB/s.
    async fn bulk(&self, body: usize, options: &Options) -> anyhow::Result<Measurement> {
        if body > self.max_payload() {
            return Ok(Measurement::skipped("over nats max_payload"));
        }
        let ack = Bytes::from_static(&[BULK_ACK]);
        let (subject, _receiver, _tasks) = self.responder(Some(ack)).await?;
        let sender = self.connect("bulk-sender", &Reported::default()).await?;
        let payload = Bytes::from(vec![0xAB; body]);
        let (warmup, measure) = bulk_plans(options);
        send_bodies(&sender, &subject, &payload, &warmup).await?;
        let transfer = send_bodies(&sender, &subject, &payload, &measure).await?;
        Ok(Outcome::Rate(transfer.mb_per_second()).into())
    }
}

/// What async-nats reported through the event callbacks of one case's
/// connections (clones share the counts).
#[derive(Debug, Clone, Default)]
struct Reported {
    slow_consumers: Counter,
    disconnects: Counter,
}

impl Reported {
    /// Counts `event` if it says messages may have been lost. (Events
    /// reach the callback through a channel of 128 that drops what does
    /// not fit, so these are lower bounds.)
    fn take(&self, event: &Event) {
        match event {
            Event::SlowConsumer(_) | Event::ServerError(ServerError::SlowConsumer(_)) => {
                self.slow_consumers.add(1)
            }
            Event::Disconnected => self.disconnects.add(1),
            _ => {}
        }
    }

    /// What was reported, for a measurement's loss; `None` if nothing.
    fn text(&self) -> Option<String> {
        let mut parts = Vec::new();
        match self.slow_consumers.get() {
            0 => {}
            1 => parts.push("1 slow-consumer event".to_owned()),
            n => parts.push(format!("{n} slow-consumer events")),
        }
        match self.disconnects.get() {
            0 => {}
            1 => parts.push("1 disconnect".to_owned()),
            n => parts.push(format!("{n} disconnects")),
        }
        (!parts.is_empty()).then(|| format!("async-nats reported {}", parts.join(", ")))
    }
}

/// A fixed-rate publisher. Its `flush` is the trait's no-op: async-nats's
/// connection task writes whatever it is handed without being asked, and
/// its `Client::flush` would only wait for that write.
struct Publisher {
    client: Client,
    subject: Subject,
}

impl PacedSender for Publisher {
    async fn send(&mut self, body: Bytes) -> anyhow::Result<()> {
        self.client.publish(self.subject.clone(), body).await?;
        Ok(())
    }
}

/// How a one-way case's subscribers share the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fan {
    /// Every subscriber gets every message.
    Subject,
    /// One queue group: each message goes to one of them.
    Queue,
}

/// Tasks aborted when the case ends, however it ends.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// A flush, bounded: everything handed to the client so far is written
/// to its socket (no round trip; see the module docs).
async fn flush(client: &Client) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT_TIMEOUT, client.flush())
        .await
        .context("flush timed out")??;
    Ok(())
}

/// A round trip to the server, bounded: a request to a subject no one
/// answers, which the server turns down ("no responders") only after it
/// has processed everything the client sent before.
async fn round_trip(client: &Client) -> anyhow::Result<()> {
    let answer = tokio::time::timeout(
        WAIT_TIMEOUT,
        client.request("bench.round-trip", Bytes::new()),
    )
    .await
    .context("round trip timed out")?;
    match answer {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(e).context("round trip"),
    }
}

/// One request, bounded.
async fn request(client: &Client, subject: &Subject, payload: &Bytes) -> anyhow::Result<()> {
    tokio::time::timeout(
        WAIT_TIMEOUT,
        client.request(subject.clone(), payload.clone()),
    )
    .await
    .context("request timed out")??;
    Ok(())
}

/// Publishes `payload` for `duration` and returns how many. A flush is
/// started every [`FLUSH_EVERY`] messages or [`FLUSH_EVERY_BYTES`] bytes,
/// and the previous one awaited first; ends with a flush (everything
/// written to the client's socket).
async fn publish_for(
    client: &Client,
    subject: &Subject,
    payload: &Bytes,
    duration: Duration,
) -> anyhow::Result<u64> {
    let len = payload.len().max(1) as u64;
    let window = FLUSH_EVERY.min(FLUSH_EVERY_BYTES / len).max(1);
    let mut pending: Option<JoinHandle<anyhow::Result<()>>> = None;
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        for _ in 0..window {
            client.publish(subject.clone(), payload.clone()).await?;
        }
        sent += window;
        if let Some(previous) = pending.take() {
            tokio::time::timeout(WAIT_TIMEOUT, previous)
                .await
                .context("flush timed out")???;
        }
        let client = client.clone();
        pending = Some(tokio::spawn(async move { flush(&client).await }));
    }
    if let Some(previous) = pending {
        tokio::time::timeout(WAIT_TIMEOUT, previous)
            .await
            .context("flush timed out")???;
    }
    flush(client).await?;
    Ok(sent)
}

/// `tasks` requesters looping requests until `duration` has passed: how
/// many completed, and the time from the start until the last did.
async fn requests_for(
    client: &Client,
    subject: &Subject,
    payload: &Bytes,
    tasks: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let start = Instant::now();
    let done = Counter::new();
    let mut running: FuturesUnordered<JoinHandle<anyhow::Result<()>>> = (0..tasks)
        .map(|_| {
            let (client, subject, payload, done) = (
                client.clone(),
                subject.clone(),
                payload.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                while start.elapsed() < duration {
                    request(&client, &subject, &payload).await?;
                    done.add(1);
                }
                Ok(())
            })
        })
        .collect();
    let mut result = Ok(());
    while let Some(finished) = running.next().await {
        let outcome = finished.context("requester task panicked").and_then(|r| r);
        if result.is_ok() {
            result = outcome;
        }
    }
    result?;
    Ok((done.get(), start.elapsed()))
}

/// Sends bodies for `plan` as requests, at most [`BULK_IN_FLIGHT`]
/// unanswered; the transfer from the first body to the last answer.
async fn send_bodies(
    client: &Client,
    subject: &Subject,
    payload: &Bytes,
    plan: &Plan,
) -> anyhow::Result<Transfer> {
    let mut in_flight = FuturesUnordered::new();
    let start = Instant::now();
    let mut sent = 0u64;
    while plan.more(sent, start.elapsed()) {
        if in_flight.len() >= BULK_IN_FLIGHT {
            wait_one(&mut in_flight).await?;
        }
        let (client, subject, payload) = (client.clone(), subject.clone(), payload.clone());
        in_flight.push(tokio::spawn(async move {
            request(&client, &subject, &payload).await
        }));
        sent += 1;
    }
    while !in_flight.is_empty() {
        wait_one(&mut in_flight).await?;
    }
    Ok(Transfer::new(sent, payload.len(), start.elapsed()))
}

/// Waits for one of the bulk requests to be answered.
async fn wait_one(
    in_flight: &mut FuturesUnordered<JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<()> {
    match in_flight.next().await {
        Some(done) => done.context("bulk request task panicked")?,
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{cases, BulkPath, FIXED_RATE_PERCENT};

    /// Needs nats-server (installs it with apt-get if it can):
    /// `cargo test -p clustercomm-benches --lib -- --ignored --nocapture`.
    /// Runs every case of a full run with short phases; the fixed-rate
    /// case at [`FIXED_RATE_PERCENT`] of the `notify` rate just measured,
    /// as the driver does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "starts nats-server, which CI need not have"]
    async fn nats_runs_every_case() {
        let nats = match Nats::start(true).await {
            Ok(nats) => nats,
            Err(why) => panic!("nats-server unavailable: {why}"),
        };
        let mut options = Options::from_args(["--quick"]);
        options.warmup = Duration::from_millis(100);
        options.measure = Duration::from_millis(500);
        let mut all = vec![
            Case::Notify { body: 128 },
            Case::RequestLatency { body: 128 },
        ];
        all.extend(cases(false));
        all.push(Case::Bulk {
            body: nats.max_payload() + 1,
            path: BulkPath::Server,
        });
        let mut notify_rate = 0.0;
        for case in all {
            let case = case.at_rate((notify_rate * FIXED_RATE_PERCENT as f64 / 100.0) as u64);
            let started = Instant::now();
            let measured = nats.run(case, &options).await;
            println!(
                "nats {case}: {measured} {} ({:.1} s)",
                case.unit(),
                started.elapsed().as_secs_f64()
            );
            match (case, &measured.outcome) {
                (Case::Notify { body: 128 }, Outcome::Rate(rate)) => notify_rate = *rate,
                (Case::Bulk { body, .. }, outcome) if body > nats.max_payload() => assert_eq!(
                    *outcome,
                    Outcome::Skipped("over nats max_payload".to_owned())
                ),
                (
                    Case::SendPipelined {
                        peer: SendPeer::JetStream,
                        ..
                    },
                    outcome,
                ) => assert_eq!(*outcome, Outcome::Skipped("n/a".to_owned())),
                (Case::FixedRate { .. }, Outcome::Latency(l)) => {
                    assert!(l.p50_us > 0.0 && l.rate.is_some_and(|r| r > 0.0), "{l:?}")
                }
                _ => {}
            }
            if !matches!(measured.outcome, Outcome::Skipped(_)) {
                assert!(
                    measured.outcome.value().is_some_and(|v| v > 0.0),
                    "{case}: {measured}"
                );
            }
        }
    }
}
