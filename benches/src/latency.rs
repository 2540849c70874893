//! Latency: percentiles from an HdrHistogram, and the fixed-rate load that
//! measures latency without coordinated omission.
//!
//! A fixed-rate sender follows a [`Schedule`]: message `i` is due at
//! `start + i / rate`. Each body starts with a [`STAMP_LEN`]-byte stamp of
//! the time it was *due*, not the time it left, so a sender that falls
//! behind (because the system under test pushed back) counts its own delay
//! against the system, as wrk2 does. The receiver's [`Recorder`] records
//! arrival minus stamp into a histogram. Every system of the suite in this
//! process shares the clock of [`now_ns`]; the Go client keeps its own
//! and reports its histogram's buckets, which [`record_buckets`] takes in.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{ensure, Context};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::options::Options;
use crate::suite::{Measurement, Outcome};
use crate::wait::{settle, Counter};

/// Bytes of the due-time stamp at the start of a fixed-rate body
/// (nanoseconds since [`epoch`], big-endian).
pub const STAMP_LEN: usize = 8;

/// Significant decimal digits the histograms keep (0.1% resolution).
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// Largest latency a histogram records, in nanoseconds (a minute); larger
/// values are recorded as this.
pub const HIGHEST_NS: u64 = 60_000_000_000;

/// The timer slack the suite asks for (see [`fine_timers`]).
pub const TIMER_SLACK_NS: u64 = 1_000;

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// The offered rate of a fixed-rate case, messages per second.
    pub rate: Option<f64>,
}

impl Latency {
    /// Percentiles of a histogram of nanoseconds; `None` if it is empty.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Option<Latency> {
        if histogram.is_empty() {
            return None;
        }
        let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1e3;
        Some(Latency {
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
            rate: None,
        })
    }

    /// The same percentiles, with the fixed rate they were measured at.
    pub fn at_rate(self, rate: f64) -> Latency {
        Latency {
            rate: Some(rate),
            ..self
        }
    }
}

/// An empty histogram of nanoseconds, 1 ns to [`HIGHEST_NS`], to
/// [`SIGNIFICANT_DIGITS`].
pub fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, HIGHEST_NS, SIGNIFICANT_DIGITS) {
        Ok(h) => h,
        // The bounds are constants that hdrhistogram accepts.
        Err(e) => unreachable!("histogram bounds: {e}"),
    }
}

/// Records `ns` (at least 1, at most [`HIGHEST_NS`]).
pub fn record(histogram: &mut Histogram<u64>, ns: u64) {
    histogram.saturating_record(ns.clamp(1, HIGHEST_NS));
}

/// Records `count` values of `ns` each, for each `(ns, count)` bucket
/// another program reported.
pub fn record_buckets(histogram: &mut Histogram<u64>, buckets: &[(u64, u64)]) {
    for &(ns, count) in buckets {
        // `record_n` fails only for values outside the bounds, which the
        // clamp rules out.
        let _ = histogram.record_n(ns.clamp(1, HIGHEST_NS), count);
    }
}

/// The clock every stamp counts from: the first time anything asked.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`] at `at`.
pub fn ns_at(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds since [`epoch`] now.
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// A body of `len` bytes (at least [`STAMP_LEN`]) stamped with `due_ns`.
pub fn stamped_body(due_ns: u64, len: usize) -> Bytes {
    let len = len.max(STAMP_LEN);
    let mut body = BytesMut::with_capacity(len);
    body.put_u64(due_ns);
    body.put_bytes(0x5A, len - STAMP_LEN);
    body.freeze()
}

/// The stamp at the start of `body`, if it is long enough to have one.
pub fn stamp_of(body: &[u8]) -> Option<u64> {
    let stamp: [u8; STAMP_LEN] = body.get(..STAMP_LEN)?.try_into().ok()?;
    Some(u64::from_be_bytes(stamp))
}

/// When each message of a fixed-rate load is due.
#[derive(Debug, Clone)]
pub struct Schedule {
    start: Instant,
    interval_ns: f64,
    taken: u64,
}

impl Schedule {
    /// `rate` messages per second from `start` (a rate below one a
    /// second is taken as one).
    pub fn new(rate: f64, start: Instant) -> Schedule {
        Schedule {
            start,
            interval_ns: 1e9 / rate.max(1.0),
            taken: 0,
        }
    }

    /// When message `i` is due.
    pub fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_nanos((i as f64 * self.interval_ns) as u64)
    }

    /// The due time of the next message, taken, if it is due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Option<Instant> {
        let due = self.due(self.taken);
        if due <= now {
            self.taken += 1;
            Some(due)
        } else {
            None
        }
    }

    /// Messages taken so far.
    pub fn taken(&self) -> u64 {
        self.taken
    }
}

/// What a fixed-rate load sends through.
pub trait PacedSender {
    /// Sends one message with `body` (returns once the system took it).
    fn send(&mut self, body: Bytes) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Nothing more is due for now: pushes out anything buffered.
    fn flush(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }
}

/// The receiving end of a fixed-rate load: counts every arrival and
/// records the latency of those due since [`Recorder::measure_from`].
/// Clones share the count and the histogram (one per receiver task).
#[derive(Debug, Clone)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

#[derive(Debug)]
struct RecorderInner {
    histogram: Mutex<Histogram<u64>>,
    from_ns: std::sync::atomic::AtomicU64,
    arrived: Counter,
    measured: Counter,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

impl Recorder {
    /// A recorder that counts arrivals and records nothing yet.
    pub fn new() -> Recorder {
        Recorder {
            inner: Arc::new(RecorderInner {
                histogram: Mutex::new(histogram()),
                from_ns: std::sync::atomic::AtomicU64::new(u64::MAX),
                arrived: Counter::new(),
                measured: Counter::new(),
            }),
        }
    }

    /// Takes in one arrived body (a body without a stamp is counted and
    /// not recorded).
    pub fn record(&self, body: &[u8]) {
        let now = now_ns();
        self.inner.arrived.add(1);
        let Some(due) = stamp_of(body) else { return };
        if due
            < self
                .inner
                .from_ns
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Ok(mut h) = self.inner.histogram.lock() {
            record(&mut h, now.saturating_sub(due));
        }
        self.inner.measured.add(1);
    }

    /// Records only messages due at or after `from_ns`.
    pub fn measure_from(&self, from_ns: u64) {
        self.inner
            .from_ns
            .store(from_ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every arrival so far.
    pub fn arrived(&self) -> &Counter {
        &self.inner.arrived
    }

    /// Arrivals recorded (due since [`Recorder::measure_from`]).
    pub fn measured(&self) -> &Counter {
        &self.inner.measured
    }

    /// A copy of the histogram so far.
    pub fn histogram(&self) -> Histogram<u64> {
        match self.inner.histogram.lock() {
            Ok(h) => h.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Asks the kernel for timers of microsecond precision in this process:
/// sets the timer slack of the calling thread, which threads it creates
/// afterwards inherit (the default, 50 µs, makes the shortest sleep last
/// about 70 µs). Call it first thing in `main`, before the runtime starts.
/// Without it a fixed-rate load is paced more coarsely, which shows as
/// latency of every system alike.
///
/// # Errors
///
/// If `/proc/self/timerslack_ns` cannot be written (a kernel before 4.6).
pub fn fine_timers() -> std::io::Result<()> {
    std::fs::write("/proc/self/timerslack_ns", TIMER_SLACK_NS.to_string())
}

/// A thread that wakes the pacer when its next message is due.
///
/// Waiting for a due time in the pacer's task would take either tokio's
/// timer, whose resolution is a millisecond, or a spin that keeps a core
/// busy and takes it from the system under test (on two cores that shows
/// as milliseconds of tail latency). The ticker sleeps instead, on a
/// thread of its own, to the microsecond where the kernel allows (see
/// [`fine_timers`]).
struct Ticker {
    shared: Arc<TickerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct TickerShared {
    /// The due time (ns since [`epoch`]) the pacer waits for, or
    /// [`NOT_WAITING`].
    due_ns: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
    due: tokio::sync::Notify,
}

const NOT_WAITING: u64 = u64::MAX;

impl Ticker {
    fn start() -> anyhow::Result<Ticker> {
        let shared = Arc::new(TickerShared {
            due_ns: std::sync::atomic::AtomicU64::new(NOT_WAITING),
            stop: std::sync::atomic::AtomicBool::new(false),
            due: tokio::sync::Notify::new(),
        });
        let ticking = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pacer-ticker".to_owned())
            .spawn(move || {
                use std::sync::atomic::Ordering;
                while !ticking.stop.load(Ordering::Acquire) {
                    let due = ticking.due_ns.swap(NOT_WAITING, Ordering::AcqRel);
                    if due == NOT_WAITING {
                        std::thread::park_timeout(Duration::from_millis(1));
                        continue;
                    }
                    let now = now_ns();
                    if due > now {
                        std::thread::sleep(Duration::from_nanos(due - now));
                    }
                    ticking.due.notify_one();
                }
            })
            .context("starting the pacer's ticker thread")?;
        Ok(Ticker {
            shared,
            thread: Some(thread),
        })
    }

    /// Waits until `due`.
    async fn until(&self, due: Instant) {
        self.shared
            .due_ns
            .store(ns_at(due), std::sync::atomic::Ordering::Release);
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
        self.shared.due.notified().await;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            // The thread sleeps at most until the due time it was given,
            // which a running pacer keeps near.
            let _ = thread.join();
        }
    }
}

/// Sends stamped bodies of `body_len` bytes through `sender` at `rate`
/// for `duration`: how many. Whatever is due is sent at once, each body
/// stamped with its own due time, then the pacer waits on a ticker thread
/// for the next.
///
/// # Errors
///
/// The first error of `sender`, or if the ticker thread cannot start.
pub async fn pace<S: PacedSender>(
    sender: &mut S,
    body_len: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<u64> {
    let ticker = Ticker::start()?;
    let start = Instant::now();
    let mut schedule = Schedule::new(rate, start);
    loop {
        let now = Instant::now();
        if now - start >= duration {
            break;
        }
        let mut sent_any = false;
        while let Some(due) = schedule.take_due(now) {
            sender.send(stamped_body(ns_at(due), body_len)).await?;
            sent_any = true;
        }
        if sent_any {
            sender.flush().await?;
        }
        let next = schedule.due(schedule.taken()).min(start + duration);
        if next > Instant::now() {
            ticker.until(next).await;
        }
    }
    Ok(schedule.taken())
}

/// A fixed-rate case: a warm-up at `rate`, then the measured phase;
/// waits for what was sent to arrive (or to stop arriving) and gives the
/// latency of the measured phase's messages, with what did not arrive as
/// loss (unexplained: the caller adds what its system reported).
///
/// # Errors
///
/// A send failed, or nothing of the measured phase arrived.
pub async fn fixed_rate<S: PacedSender>(
    sender: &mut S,
    recorder: &Recorder,
    body_len: usize,
    rate: f64,
    options: &Options,
) -> anyhow::Result<Measurement> {
    ensure!(rate > 0.0, "no rate to send at");
    let warm = pace(sender, body_len, rate, options.warmup).await?;
    settle(recorder.arrived(), warm)
        .await
        .context("fixed-rate warm-up")?;
    recorder.measure_from(now_ns());
    let sent = pace(sender, body_len, rate, options.measure).await?;
    let (got, _) = settle(recorder.measured(), sent)
        .await
        .context("fixed rate")?;
    let latency = Latency::from_histogram(&recorder.histogram())
        .context("no message of the measured phase arrived")?;
    Ok(Measurement::from(Outcome::Latency(latency.at_rate(rate)))
        .with_loss(sent.saturating_sub(got), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            record(&mut h, us * 1000);
        }
        let l = Latency::from_histogram(&h).expect("samples");
        assert!((l.p50_us - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_us - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.p999_us - 999.0).abs() < 1.0, "{l:?}");
        assert_eq!(Latency::from_histogram(&histogram()), None);
        // Out of range values are clamped, not lost.
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 1002);
        let mut buckets = histogram();
        record_buckets(&mut buckets, &[(2_000, 3), (5_000, 1)]);
        assert_eq!(buckets.len(), 4);
        assert_eq!(buckets.value_at_quantile(0.5), 2_000);
    }

    #[test]
    fn a_schedule_spaces_messages_evenly_and_catches_up() {
        let start = Instant::now();
        let mut s = Schedule::new(1000.0, start);
        assert_eq!(s.take_due(start), Some(start));
        assert_eq!(s.take_due(start), None);
        // 5 ms late: the messages due meanwhile come at once, each with
        // its own due time.
        let later = start + Duration::from_millis(5);
        let mut due = Vec::new();
        while let Some(at) = s.take_due(later) {
            due.push(at - start);
        }
        assert_eq!(due.len(), 5);
        assert_eq!(due[0], Duration::from_millis(1));
        assert_eq!(due[4], Duration::from_millis(5));
        assert_eq!(s.taken(), 6);
    }

    #[test]
    fn stamps_round_trip_and_short_bodies_have_none() {
        let body = stamped_body(123_456_789, 128);
        assert_eq!(body.len(), 128);
        assert_eq!(stamp_of(&body), Some(123_456_789));
        assert_eq!(stamped_body(7, 2).len(), STAMP_LEN);
        assert_eq!(stamp_of(&[1, 2, 3]), None);
    }

    /// A sender that hands bodies straight to a recorder.
    struct Loopback(Recorder);

    impl PacedSender for Loopback {
        async fn send(&mut self, body: Bytes) -> anyhow::Result<()> {
            self.0.record(&body);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_fixed_rate_run_records_only_the_measured_phase() {
        let recorder = Recorder::new();
        let mut options = Options::from_args(["--quick"]);
        options.warmup = Duration::from_millis(20);
        options.measure = Duration::from_millis(50);
        let mut sender = Loopback(recorder.clone());
        let m = fixed_rate(&mut sender, &recorder, 64, 20_000.0, &options)
            .await
            .expect("runs");
        assert_eq!(m.lost, 0);
        let Outcome::Latency(l) = m.outcome else {
            panic!("{m:?}")
        };
        assert_eq!(l.rate, Some(20_000.0));
        let measured = recorder.measured().get();
        assert!(measured > 0 && measured < recorder.arrived().get());
        assert_eq!(recorder.histogram().len(), measured);
    }
}
