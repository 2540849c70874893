// Command nats-bench-go is the reference NATS peer of clustercomm's
// benchmark suite: nats-server driven by NATS's own Go client (nats.go), in
// the way `nats bench` drives it (publisher and subscribers on separate
// connections, the subscribers' receive rate counted, pending limits off).
//
// One invocation measures one round of one case against a running
// nats-server and prints machine-readable lines to stdout:
//
//	bucket <ns> <count>   latency modes: one line per non-empty histogram bucket
//	result key=value ...  last line: rate=, sent=, expected=, received=, lost=,
//	                      slow_consumer=, dropped=, disconnects=
//
// Errors go to stderr, with a non-zero exit status.
//
//	nats-bench-go MODE --url nats://127.0.0.1:4222 [--subs N] [--queue]
//	    [--body B] [--warmup 300ms] [--measure 600ms] [--rate R]
//	    [--outstanding N] [--bulk-bodies N] [--timeout 20s]
//	    [--tls-ca CA.pem --tls-cert CERT.pem --tls-key KEY.pem]
//
// With the three --tls- flags every connection is TLS: the server's
// certificate is checked against the CA (and against the URL's host, an IP
// address SAN for 127.0.0.1), and the client presents its certificate, for a
// server that verifies clients (nats.RootCAs, nats.ClientCert).
//
// Modes:
//
//	oneway     one publisher, --subs subscriber connections (one queue group with
//	           --queue); deliveries/s over the measured phase, and what was lost
//	fixedrate  one publisher at --rate msgs/s on a fixed schedule, one subscriber;
//	           latency from each message's due time (coordinated omission corrected)
//	reqlat     a responder echoing the payload, one request at a time; round trips
//	reqrate    the same responder, --outstanding requesters on one connection; requests/s
//	jspub      JetStream publish-with-ack to a file-backed stream, --outstanding
//	           unacknowledged; acks/s (needs a server started with -js)
//	jslat      JetStream publish-with-ack to a file-backed stream, one at a time;
//	           publish-to-ack times (needs a server started with -js)
//	bulk       --body bodies sent as requests, answered with 1 byte, 2 in flight,
//	           at least --bulk-bodies of them; MB/s (10^6 bytes)
//
// It uses the standard library and nats.go only, and builds offline with
// Debian's golang-go and golang-github-nats-io-go-nats-dev (nats.go 1.22):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o nats-bench-go main.go
//
// benches/src/nats_go.rs builds it that way and runs it.
package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
)

// stall is how long a count may stand still before it is taken as final
// (messages were lost), as in the Rust suite.
const stall = 500 * time.Millisecond

// timerSlackNs is the timer slack the paced publisher's thread asks the
// kernel for (PR_SET_TIMERSLACK), as latency::fine_timers does in Rust:
// with the default 50 µs the shortest sleep lasts about 70 µs.
const timerSlackNs = 1000

// prSetTimerslack is prctl's PR_SET_TIMERSLACK.
const prSetTimerslack = 29

// stampLen is the length of the due-time stamp at the start of a fixed-rate
// body: nanoseconds on this process's clock, big-endian.
const stampLen = 8

// bulkInFlight is how many bulk bodies are unacknowledged at once
// (BULK_IN_FLIGHT in the Rust suite).
const bulkInFlight = 2

// bulkAck is the byte a bulk body is answered with.
const bulkAck = 0x06

// clockCheckEvery is how many publishes go between two looks at the clock.
const clockCheckEvery = 16

// config is the command line.
type config struct {
	mode        string
	url         string
	subs        int
	queue       bool
	body        int
	warmup      time.Duration
	measure     time.Duration
	rate        float64
	outstanding int
	bulkBodies  int
	timeout     time.Duration
	tlsCA       string
	tlsCert     string
	tlsKey      string
}

func main() {
	cfg, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "nats-bench-go: %v\n", err)
		os.Exit(2)
	}
	out := bufio.NewWriter(os.Stdout)
	if err := run(cfg, out); err != nil {
		fmt.Fprintf(os.Stderr, "nats-bench-go %s: %v\n", cfg.mode, err)
		os.Exit(1)
	}
	if err := out.Flush(); err != nil {
		fmt.Fprintf(os.Stderr, "nats-bench-go %s: writing stdout: %v\n", cfg.mode, err)
		os.Exit(1)
	}
}

func parseArgs(args []string) (config, error) {
	var cfg config
	if len(args) == 0 {
		return cfg, errors.New("usage: nats-bench-go MODE [flags] (modes: oneway fixedrate reqlat reqrate jspub jslat bulk)")
	}
	cfg.mode = args[0]
	fs := flag.NewFlagSet(cfg.mode, flag.ContinueOnError)
	fs.StringVar(&cfg.url, "url", nats.DefaultURL, "nats-server URL")
	fs.IntVar(&cfg.subs, "subs", 1, "subscriber connections (oneway)")
	fs.BoolVar(&cfg.queue, "queue", false, "subscribers form one queue group (oneway)")
	fs.IntVar(&cfg.body, "body", 128, "body bytes")
	fs.DurationVar(&cfg.warmup, "warmup", 300*time.Millisecond, "warm-up phase")
	fs.DurationVar(&cfg.measure, "measure", 600*time.Millisecond, "measured phase")
	fs.Float64Var(&cfg.rate, "rate", 0, "messages per second (fixedrate)")
	fs.IntVar(&cfg.outstanding, "outstanding", 1, "requests or publishes in flight (reqrate, jspub)")
	fs.IntVar(&cfg.bulkBodies, "bulk-bodies", 1, "least number of measured bodies (bulk)")
	fs.DurationVar(&cfg.timeout, "timeout", 20*time.Second, "upper bound on any single wait")
	fs.StringVar(&cfg.tlsCA, "tls-ca", "", "CA certificate (PEM) the server's is checked against")
	fs.StringVar(&cfg.tlsCert, "tls-cert", "", "client certificate (PEM)")
	fs.StringVar(&cfg.tlsKey, "tls-key", "", "client private key (PEM)")
	if err := fs.Parse(args[1:]); err != nil {
		return cfg, err
	}
	switch {
	case fs.NArg() > 0:
		return cfg, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case cfg.subs < 1:
		return cfg, errors.New("--subs must be at least 1")
	case cfg.body < 0:
		return cfg, errors.New("--body must not be negative")
	case cfg.outstanding < 1:
		return cfg, errors.New("--outstanding must be at least 1")
	case cfg.timeout <= 0:
		return cfg, errors.New("--timeout must be positive")
	case (cfg.tlsCA == "") != (cfg.tlsCert == "") || (cfg.tlsCert == "") != (cfg.tlsKey == ""):
		return cfg, errors.New("--tls-ca, --tls-cert and --tls-key go together")
	}
	return cfg, nil
}

func run(cfg config, out *bufio.Writer) error {
	switch cfg.mode {
	case "oneway":
		return oneway(cfg, out)
	case "fixedrate":
		return fixedRate(cfg, out)
	case "reqlat":
		return requestLatency(cfg, out)
	case "reqrate":
		return requestRate(cfg, out)
	case "jspub":
		return jetStreamPublish(cfg, out)
	case "jslat":
		return jetStreamLatency(cfg, out)
	case "bulk":
		return bulk(cfg, out)
	default:
		return fmt.Errorf("unknown mode %q", cfg.mode)
	}
}

// ---------------------------------------------------------------------------
// Clock, counters, connections
// ---------------------------------------------------------------------------

// clockStart is the origin of every time stamp of this process; time.Since
// uses the monotonic clock.
var clockStart = time.Now()

// now is nanoseconds since clockStart.
func now() int64 {
	return int64(time.Since(clockStart))
}

// events counts what nats.go reported through its callbacks.
type events struct {
	slowConsumers atomic.Int64
	otherErrors   atomic.Int64
	disconnects   atomic.Int64
	lastError     atomic.Value
}

// report is the part of the result line every mode shares.
type report struct {
	sent, expected, received, lost    int64
	slowConsumer, dropped, disconnect int64
}

// connections are the client connections of one run, with their
// subscriptions, all closed at the end.
type connections struct {
	url   string
	tls   []nats.Option
	ev    events
	conns []*nats.Conn
	subs  []*nats.Subscription
}

// newConnections are the connections of one run to cfg's server, over TLS
// with cfg's certificates if it has them.
func newConnections(cfg config) *connections {
	c := &connections{url: cfg.url}
	if cfg.tlsCA != "" {
		c.tls = []nats.Option{nats.RootCAs(cfg.tlsCA), nats.ClientCert(cfg.tlsCert, cfg.tlsKey)}
	}
	return c
}

func (c *connections) connect(name string) (*nats.Conn, error) {
	options := append([]nats.Option{
		nats.Name("bench-go-" + name),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrSlowConsumer) {
				c.ev.slowConsumers.Add(1)
			} else {
				c.ev.otherErrors.Add(1)
			}
			c.ev.lastError.Store(err.Error())
		}),
		nats.DisconnectErrHandler(func(_ *nats.Conn, _ error) {
			c.ev.disconnects.Add(1)
		}),
	}, c.tls...)
	nc, err := nats.Connect(c.url, options...)
	if err != nil {
		return nil, fmt.Errorf("connecting %s to %s: %w", name, c.url, err)
	}
	c.conns = append(c.conns, nc)
	return nc, nil
}

// subscribe subscribes nc with pending limits off (as `nats bench` does)
// and waits until the server has registered it.
func (c *connections) subscribe(nc *nats.Conn, subject, queue string, handler nats.MsgHandler, timeout time.Duration) error {
	var sub *nats.Subscription
	var err error
	if queue == "" {
		sub, err = nc.Subscribe(subject, handler)
	} else {
		sub, err = nc.QueueSubscribe(subject, queue, handler)
	}
	if err != nil {
		return fmt.Errorf("subscribing to %s: %w", subject, err)
	}
	c.subs = append(c.subs, sub)
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		return fmt.Errorf("lifting pending limits: %w", err)
	}
	if err := nc.FlushTimeout(timeout); err != nil {
		return fmt.Errorf("registering the subscription: %w", err)
	}
	return nil
}

// dropped sums what the subscriptions dropped (client-side pending limits).
func (c *connections) dropped() int64 {
	var n int64
	for _, s := range c.subs {
		if d, err := s.Dropped(); err == nil {
			n += int64(d)
		}
	}
	return n
}

// fill completes r with what nats.go reported so far (before any Close,
// which calls the disconnect handler itself).
// The last asynchronous error, if any, goes to stderr.
func (c *connections) fill(r *report) {
	r.slowConsumer = c.ev.slowConsumers.Load()
	r.dropped = c.dropped()
	r.disconnect = c.ev.disconnects.Load()
	if last, ok := c.ev.lastError.Load().(string); ok {
		fmt.Fprintf(os.Stderr, "nats-bench-go: nats.go reported %d slow-consumer and %d other asynchronous errors, the last: %s\n",
			r.slowConsumer, c.ev.otherErrors.Load(), last)
	}
}

func (c *connections) close() {
	for _, nc := range c.conns {
		nc.Close()
	}
}

// subject is a subject of this process for kind.
func subject(kind string) string {
	return fmt.Sprintf("bench.go.%d.%s", os.Getpid(), kind)
}

// settle waits until count reaches target, or stands still for stall (then
// what arrived is final), never longer than timeout while it still moves.
// It returns the count.
func settle(count *atomic.Int64, target int64, timeout time.Duration) (int64, error) {
	deadline := time.Now().Add(timeout)
	last := count.Load()
	lastChange := time.Now()
	for {
		n := count.Load()
		if n >= target {
			return n, nil
		}
		t := time.Now()
		if n != last {
			last, lastChange = n, t
		} else if t.Sub(lastChange) >= stall {
			return n, nil
		}
		if t.After(deadline) {
			return n, fmt.Errorf("counted %d of %d within %v", n, target, timeout)
		}
		time.Sleep(time.Millisecond)
	}
}

func writeResult(out *bufio.Writer, rate float64, r report) {
	fmt.Fprintf(out, "result rate=%.3f sent=%d expected=%d received=%d lost=%d slow_consumer=%d dropped=%d disconnects=%d\n",
		rate, r.sent, r.expected, r.received, r.lost, r.slowConsumer, r.dropped, r.disconnect)
}

// ---------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------

// exactBelow is the value below which the histogram keeps values exactly;
// above, it keeps their top 11 bits (3 significant decimal digits).
const exactBelow = 2048

// histogram is a log-linear histogram of nanoseconds.
type histogram struct {
	mu     sync.Mutex
	counts []uint64
}

func newHistogram() *histogram {
	return &histogram{counts: make([]uint64, exactBelow+(64-11)*1024)}
}

// bucketIndex is the slot of v: v itself below exactBelow, else one slot
// per (shift, top 11 bits) pair.
func bucketIndex(v uint64) int {
	if v < exactBelow {
		return int(v)
	}
	shift := bits.Len64(v) - 11
	return exactBelow + (shift-1)*1024 + int(v>>uint(shift)) - 1024
}

// bucketValue is the lowest value of slot i.
func bucketValue(i int) uint64 {
	if i < exactBelow {
		return uint64(i)
	}
	j := i - exactBelow
	return uint64(j%1024+1024) << uint(j/1024+1)
}

func (h *histogram) record(ns int64) {
	if ns < 0 {
		ns = 0
	}
	i := bucketIndex(uint64(ns))
	h.mu.Lock()
	h.counts[i]++
	h.mu.Unlock()
}

// write prints every non-empty bucket as `bucket <ns> <count>`.
func (h *histogram) write(out *bufio.Writer) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	var total int64
	for i, c := range h.counts {
		if c > 0 {
			fmt.Fprintf(out, "bucket %d %d\n", bucketValue(i), c)
			total += int64(c)
		}
	}
	return total
}

// ---------------------------------------------------------------------------
// oneway
// ---------------------------------------------------------------------------

// publishFor publishes payload as fast as nc takes it for d, then flushes
// (a PING/PONG round trip in nats.go); it returns how many.
func publishFor(nc *nats.Conn, subj string, payload []byte, d, timeout time.Duration) (int64, error) {
	var sent int64
	start := time.Now()
	for time.Since(start) < d {
		for i := 0; i < clockCheckEvery; i++ {
			if err := nc.Publish(subj, payload); err != nil {
				return sent, fmt.Errorf("publishing: %w", err)
			}
		}
		sent += clockCheckEvery
	}
	if err := nc.FlushTimeout(timeout); err != nil {
		return sent, fmt.Errorf("flushing the publisher: %w", err)
	}
	return sent, nil
}

func oneway(cfg config, out *bufio.Writer) error {
	c := newConnections(cfg)
	defer c.close()
	subj := subject("oneway")
	queue := ""
	perPublish := int64(cfg.subs)
	if cfg.queue {
		queue = "members"
		perPublish = 1
	}
	var received, lastArrival atomic.Int64
	handler := func(*nats.Msg) {
		received.Add(1)
		lastArrival.Store(now())
	}
	for i := 0; i < cfg.subs; i++ {
		nc, err := c.connect(fmt.Sprintf("subscriber-%d", i))
		if err != nil {
			return err
		}
		if err := c.subscribe(nc, subj, queue, handler, cfg.timeout); err != nil {
			return err
		}
	}
	pub, err := c.connect("publisher")
	if err != nil {
		return err
	}
	payload := make([]byte, cfg.body)
	for i := range payload {
		payload[i] = 0xAB
	}

	warm, err := publishFor(pub, subj, payload, cfg.warmup, cfg.timeout)
	if err != nil {
		return err
	}
	if _, err := settle(&received, warm*perPublish, cfg.timeout); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}

	base := received.Load()
	start := now()
	sent, err := publishFor(pub, subj, payload, cfg.measure, cfg.timeout)
	if err != nil {
		return err
	}
	expected := sent * perPublish
	count, err := settle(&received, base+expected, cfg.timeout)
	if err != nil {
		return err
	}
	got := count - base
	if got <= 0 {
		return errors.New("no message of the measured phase arrived")
	}
	elapsed := lastArrival.Load() - start
	if elapsed <= 0 {
		return errors.New("no time passed between the start and the last arrival")
	}
	r := report{sent: sent, expected: expected, received: got}
	if expected > got {
		r.lost = expected - got
	}
	c.fill(&r)
	writeResult(out, float64(got)/(float64(elapsed)/1e9), r)
	return nil
}

// ---------------------------------------------------------------------------
// fixedrate
// ---------------------------------------------------------------------------

// pace publishes stamped bodies at rate for d on a fixed schedule (message
// i due at start + i/rate), every message that is due, each stamped with
// its due time; it returns how many. Between due times it sleeps on its
// own OS thread with nanosleep and a 1 µs timer slack, as the Rust suite's
// pacer does (latency::pace): a spin would take a core from the server,
// and Go's time.Sleep is as coarse as the netpoller's timeout.
func pace(nc *nats.Conn, subj string, body []byte, rate float64, d time.Duration) (int64, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Best effort: without it the sleeps are coarser, which shows as
	// latency.
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, prSetTimerslack, timerSlackNs, 0)
	interval := 1e9 / rate
	start := now()
	due := func(i int64) int64 { return start + int64(float64(i)*interval) }
	end := start + int64(d)
	var taken int64
	for {
		t := now()
		if t >= end {
			return taken, nil
		}
		for due(taken) <= t {
			binary.BigEndian.PutUint64(body, uint64(due(taken)))
			if err := nc.Publish(subj, body); err != nil {
				return taken, fmt.Errorf("publishing: %w", err)
			}
			taken++
		}
		next := due(taken)
		if next > end {
			next = end
		}
		if gap := next - now(); gap > 0 {
			ts := syscall.NsecToTimespec(gap)
			_ = syscall.Nanosleep(&ts, nil)
		}
	}
}

func fixedRate(cfg config, out *bufio.Writer) error {
	if cfg.rate < 1 {
		return errors.New("--rate must be at least 1 message per second")
	}
	c := newConnections(cfg)
	defer c.close()
	subj := subject("fixedrate")
	hist := newHistogram()
	var arrived, measured, from atomic.Int64
	from.Store(1<<63 - 1)
	handler := func(m *nats.Msg) {
		at := now()
		arrived.Add(1)
		if len(m.Data) < stampLen {
			return
		}
		due := int64(binary.BigEndian.Uint64(m.Data))
		if due < from.Load() {
			return
		}
		hist.record(at - due)
		measured.Add(1)
	}
	sub, err := c.connect("subscriber")
	if err != nil {
		return err
	}
	if err := c.subscribe(sub, subj, "", handler, cfg.timeout); err != nil {
		return err
	}
	pub, err := c.connect("publisher")
	if err != nil {
		return err
	}
	size := cfg.body
	if size < stampLen {
		size = stampLen
	}
	body := make([]byte, size)
	for i := stampLen; i < size; i++ {
		body[i] = 0x5A
	}

	warm, err := pace(pub, subj, body, cfg.rate, cfg.warmup)
	if err != nil {
		return err
	}
	if _, err := settle(&arrived, warm, cfg.timeout); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	from.Store(now())
	sent, err := pace(pub, subj, body, cfg.rate, cfg.measure)
	if err != nil {
		return err
	}
	got, err := settle(&measured, sent, cfg.timeout)
	if err != nil {
		return err
	}
	if got == 0 {
		return errors.New("no message of the measured phase arrived")
	}
	r := report{sent: sent, expected: sent, received: got}
	if sent > got {
		r.lost = sent - got
	}
	c.fill(&r)
	hist.write(out)
	writeResult(out, cfg.rate, r)
	return nil
}

// ---------------------------------------------------------------------------
// Request/reply
// ---------------------------------------------------------------------------

// responder starts a connection answering every request on a new subject
// with answer, or with its own payload if answer is nil.
func (c *connections) responder(answer []byte, timeout time.Duration) (string, error) {
	subj := subject("request")
	nc, err := c.connect("responder")
	if err != nil {
		return "", err
	}
	handler := func(m *nats.Msg) {
		reply := answer
		if reply == nil {
			reply = m.Data
		}
		// A failed answer shows up as the requester's timeout.
		_ = m.Respond(reply)
	}
	if err := c.subscribe(nc, subj, "", handler, timeout); err != nil {
		return "", err
	}
	return subj, nil
}

// requester starts a responder echoing every payload and connects a
// requester: the subject to request on, and the requester's connection.
func (c *connections) requester(timeout time.Duration) (string, *nats.Conn, error) {
	subj, err := c.responder(nil, timeout)
	if err != nil {
		return "", nil, err
	}
	nc, err := c.connect("requester")
	if err != nil {
		return "", nil, err
	}
	return subj, nc, nil
}

func filled(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = 0xAB
	}
	return b
}

func requestLatency(cfg config, out *bufio.Writer) error {
	c := newConnections(cfg)
	defer c.close()
	subj, nc, err := c.requester(cfg.timeout)
	if err != nil {
		return err
	}
	payload := filled(cfg.body)
	start := time.Now()
	for time.Since(start) < cfg.warmup {
		if _, err := nc.Request(subj, payload, cfg.timeout); err != nil {
			return fmt.Errorf("warm-up request: %w", err)
		}
	}
	hist := newHistogram()
	var done int64
	start = time.Now()
	for time.Since(start) < cfg.measure {
		t := now()
		if _, err := nc.Request(subj, payload, cfg.timeout); err != nil {
			return fmt.Errorf("request: %w", err)
		}
		hist.record(now() - t)
		done++
	}
	if done == 0 {
		return errors.New("no request completed")
	}
	r := report{sent: done, expected: done, received: done}
	c.fill(&r)
	hist.write(out)
	writeResult(out, float64(done)/cfg.measure.Seconds(), r)
	return nil
}

// requestsFor runs n requesters on nc looping requests until d has passed:
// how many completed and the time from the start until the last did.
func requestsFor(nc *nats.Conn, subj string, payload []byte, n int, d, timeout time.Duration) (int64, time.Duration, error) {
	var done atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < d {
				if _, err := nc.Request(subj, payload, timeout); err != nil {
					errs <- fmt.Errorf("request: %w", err)
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err, ok := <-errs; ok {
		return done.Load(), elapsed, err
	}
	return done.Load(), elapsed, nil
}

func requestRate(cfg config, out *bufio.Writer) error {
	c := newConnections(cfg)
	defer c.close()
	subj, nc, err := c.requester(cfg.timeout)
	if err != nil {
		return err
	}
	payload := filled(cfg.body)
	if _, _, err := requestsFor(nc, subj, payload, cfg.outstanding, cfg.warmup, cfg.timeout); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	done, elapsed, err := requestsFor(nc, subj, payload, cfg.outstanding, cfg.measure, cfg.timeout)
	if err != nil {
		return err
	}
	r := report{sent: done, expected: done, received: done}
	c.fill(&r)
	writeResult(out, float64(done)/elapsed.Seconds(), r)
	return nil
}

// ---------------------------------------------------------------------------
// jspub
// ---------------------------------------------------------------------------

// waitAck waits for one publish's acknowledgement, at most timeout.
func waitAck(f nats.PubAckFuture, timeout time.Duration) error {
	select {
	case <-f.Ok():
		return nil
	case err := <-f.Err():
		return fmt.Errorf("publish not acknowledged: %w", err)
	default:
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-f.Ok():
		return nil
	case err := <-f.Err():
		return fmt.Errorf("publish not acknowledged: %w", err)
	case <-timer.C:
		return fmt.Errorf("no acknowledgement within %v", timeout)
	}
}

// publishAcked publishes payload with acks for d, at most outstanding
// unacknowledged (waiting for the oldest before the next publish), then
// waits for every ack; it returns how many were acknowledged and the time
// until the last was.
func publishAcked(js nats.JetStreamContext, subj string, payload []byte, outstanding int, d, timeout time.Duration) (int64, time.Duration, error) {
	pending := make(chan nats.PubAckFuture, outstanding)
	var acked int64
	start := time.Now()
	for time.Since(start) < d {
		if len(pending) == outstanding {
			if err := waitAck(<-pending, timeout); err != nil {
				return acked, 0, err
			}
			acked++
		}
		f, err := js.PublishAsync(subj, payload)
		if err != nil {
			return acked, 0, fmt.Errorf("publishing: %w", err)
		}
		pending <- f
	}
	for len(pending) > 0 {
		if err := waitAck(<-pending, timeout); err != nil {
			return acked, 0, err
		}
		acked++
	}
	return acked, time.Since(start), nil
}

// fileStream creates this process's file-backed stream on js (deleting an
// earlier one of the same name first): its subject, and a function that
// deletes it.
func fileStream(js nats.JetStreamContext, url string) (string, func(), error) {
	name := fmt.Sprintf("BENCH_GO_%d", os.Getpid())
	subj := subject("jetstream")
	switch err := js.DeleteStream(name); {
	case err == nil, errors.Is(err, nats.ErrStreamNotFound):
	case errors.Is(err, nats.ErrNoResponders), errors.Is(err, nats.ErrJetStreamNotEnabled):
		return "", nil, fmt.Errorf("JetStream is not enabled on %s (start nats-server with -js): %w", url, err)
	default:
		return "", nil, fmt.Errorf("deleting an earlier stream %s: %w", name, err)
	}
	if _, err := js.AddStream(&nats.StreamConfig{
		Name:     name,
		Subjects: []string{subj},
		Storage:  nats.FileStorage,
	}); err != nil {
		return "", nil, fmt.Errorf("creating stream %s (is JetStream enabled?): %w", name, err)
	}
	return subj, func() { _ = js.DeleteStream(name) }, nil
}

func jetStreamPublish(cfg config, out *bufio.Writer) error {
	c := newConnections(cfg)
	defer c.close()
	nc, err := c.connect("jetstream-publisher")
	if err != nil {
		return err
	}
	// The program keeps the window itself; nats.go's own limit sits one
	// above it so that its stall (which in 1.22 can miss the wake-up of
	// the last ack and wait out its stall timeout) never engages.
	js, err := nc.JetStream(nats.PublishAsyncMaxPending(cfg.outstanding + 1))
	if err != nil {
		return fmt.Errorf("JetStream context: %w", err)
	}
	subj, deleteStream, err := fileStream(js, cfg.url)
	if err != nil {
		return err
	}
	defer deleteStream()
	payload := filled(cfg.body)
	if _, _, err := publishAcked(js, subj, payload, cfg.outstanding, cfg.warmup, cfg.timeout); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	acked, elapsed, err := publishAcked(js, subj, payload, cfg.outstanding, cfg.measure, cfg.timeout)
	if err != nil {
		return err
	}
	r := report{sent: acked, expected: acked, received: acked}
	c.fill(&r)
	writeResult(out, float64(acked)/elapsed.Seconds(), r)
	return nil
}

// ---------------------------------------------------------------------------
// jslat
// ---------------------------------------------------------------------------

// jetStreamLatency publishes with acks one at a time (js.Publish, which
// waits for the ack) and records the time from each publish to its ack.
func jetStreamLatency(cfg config, out *bufio.Writer) error {
	c := newConnections(cfg)
	defer c.close()
	nc, err := c.connect("jetstream-publisher")
	if err != nil {
		return err
	}
	js, err := nc.JetStream(nats.MaxWait(cfg.timeout))
	if err != nil {
		return fmt.Errorf("JetStream context: %w", err)
	}
	subj, deleteStream, err := fileStream(js, cfg.url)
	if err != nil {
		return err
	}
	defer deleteStream()
	payload := filled(cfg.body)
	start := time.Now()
	for time.Since(start) < cfg.warmup {
		if _, err := js.Publish(subj, payload); err != nil {
			return fmt.Errorf("warm-up publish: %w", err)
		}
	}
	hist := newHistogram()
	var done int64
	start = time.Now()
	for time.Since(start) < cfg.measure {
		t := now()
		if _, err := js.Publish(subj, payload); err != nil {
			return fmt.Errorf("publish not acknowledged: %w", err)
		}
		hist.record(now() - t)
		done++
	}
	if done == 0 {
		return errors.New("no publish was acknowledged")
	}
	r := report{sent: done, expected: done, received: done}
	c.fill(&r)
	hist.write(out)
	writeResult(out, float64(done)/cfg.measure.Seconds(), r)
	return nil
}

// ---------------------------------------------------------------------------
// bulk
// ---------------------------------------------------------------------------

// sendBodies sends bodies as requests, bulkInFlight at once, until at least
// minBodies were started and d has passed; it returns how many were
// answered and the time from the first start to the last answer.
func sendBodies(nc *nats.Conn, subj string, payload []byte, minBodies int64, d, timeout time.Duration) (int64, time.Duration, error) {
	var mu sync.Mutex
	var started, answered int64
	var firstErr error
	start := time.Now()
	more := func() bool {
		mu.Lock()
		defer mu.Unlock()
		if firstErr != nil || (started >= minBodies && time.Since(start) >= d) {
			return false
		}
		started++
		return true
	}
	var wg sync.WaitGroup
	for i := 0; i < bulkInFlight; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for more() {
				_, err := nc.Request(subj, payload, timeout)
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = fmt.Errorf("bulk request: %w", err)
				} else if err == nil {
					answered++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return answered, time.Since(start), firstErr
}

func bulk(cfg config, out *bufio.Writer) error {
	c := newConnections(cfg)
	defer c.close()
	subj, err := c.responder([]byte{bulkAck}, cfg.timeout)
	if err != nil {
		return err
	}
	nc, err := c.connect("bulk-sender")
	if err != nil {
		return err
	}
	if max := nc.MaxPayload(); int64(cfg.body) > max {
		return fmt.Errorf("a body of %d bytes is over the server's max_payload of %d", cfg.body, max)
	}
	payload := filled(cfg.body)
	if _, _, err := sendBodies(nc, subj, payload, 1, cfg.warmup, cfg.timeout); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	bodies, elapsed, err := sendBodies(nc, subj, payload, int64(cfg.bulkBodies), cfg.measure, cfg.timeout)
	if err != nil {
		return err
	}
	r := report{sent: bodies, expected: bodies, received: bodies}
	c.fill(&r)
	writeResult(out, float64(bodies)*float64(cfg.body)/1e6/elapsed.Seconds(), r)
	return nil
}
