package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"
)

// Response headers the harness reads (set by the bench Caddyfile, or by
// the client transport below on the response it hands to vegeta).
const (
	hdrRequestID = "X-Bench-Request-Id"
	hdrTTFB      = "X-Bench-Ttfb-Ns"     // request sent -> first body byte
	hdrComplete  = "X-Bench-Complete"    // "1" when the body ended as a finished answer
	hdrBodyBytes = "X-Bench-Body-Bytes"  // body bytes read
	hdrHeadersNs = "X-Bench-Headers-Ns"  // request sent -> response headers
	hdrFirstByte = "X-Bench-First-Ns-At" // unix ns of the first response byte
)

// loadClient is the HTTP client of every phase: keep-alive HTTP/1.1 on
// loopback, no compression, and a transport that times the first body
// byte and checks that each answer ended as a complete answer.
type loadClient struct {
	tr   *http.Transport
	http *http.Client
}

func newLoadClient() *loadClient {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        4096,
		MaxIdleConnsPerHost: 4096,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
		ForceAttemptHTTP2:   false,
	}
	return &loadClient{tr: tr, http: &http.Client{Transport: &timingTransport{next: tr}, Timeout: 5 * time.Minute}}
}

func (c *loadClient) closeIdle() { c.tr.CloseIdleConnections() }

// timingTransport wraps each response body so that reading it records,
// in the response's own header map, when the first body byte came, how
// many bytes the body had and whether it ended as a finished answer (a
// JSON body, or a stream whose last event is message_stop or [DONE]).
// vegeta hands the response headers back in its Result.
type timingTransport struct{ next http.RoundTripper }

func (t *timingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.next.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	resp.Header.Set(hdrHeadersNs, strconv.FormatInt(int64(time.Since(start)), 10))
	resp.Body = &timedBody{ReadCloser: resp.Body, start: start, h: resp.Header, sse: bytes.HasPrefix([]byte(resp.Header.Get("Content-Type")), []byte("text/event-stream"))}
	return resp, nil
}

type timedBody struct {
	io.ReadCloser
	start time.Time
	h     http.Header
	sse   bool
	n     int64
	last  [64]byte
	nl    int
	ended bool
}

func (b *timedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		if b.n == 0 {
			now := time.Now()
			b.h.Set(hdrTTFB, strconv.FormatInt(int64(now.Sub(b.start)), 10))
			b.h.Set(hdrFirstByte, strconv.FormatInt(now.UnixNano(), 10))
		}
		b.n += int64(n)
		// keep the last 64 bytes
		chunk := p[:n]
		if len(chunk) >= len(b.last) {
			copy(b.last[:], chunk[len(chunk)-len(b.last):])
			b.nl = len(b.last)
		} else {
			keep := min(b.nl, len(b.last)-len(chunk))
			copy(b.last[:], b.last[b.nl-keep:b.nl])
			copy(b.last[keep:], chunk)
			b.nl = keep + len(chunk)
		}
	}
	if err == io.EOF && !b.ended {
		b.ended = true
		b.h.Set(hdrBodyBytes, strconv.FormatInt(b.n, 10))
		last := bytes.TrimSpace(b.last[:b.nl])
		ok := false
		if b.sse {
			ok = bytes.HasSuffix(last, []byte(`{"type":"message_stop"}`)) || bytes.HasSuffix(last, []byte("data: [DONE]"))
		} else {
			ok = bytes.HasSuffix(last, []byte("}"))
		}
		if ok {
			b.h.Set(hdrComplete, "1")
		}
	}
	return n, err
}

// reqSpec describes the requests of one phase.
type reqSpec struct {
	site   string // "plain" or "gateway"
	stream bool
	events int           // events per stream (X-Bench-Events); 0 = the stand-in's recorded answer
	bytes  int64         // X-Bench-Stream-Bytes: one long stream of at least this many bytes
	evSize int           // X-Bench-Event-Bytes
	delay  time.Duration // pause between events
	friend bool          // gateway: the users' friend keys instead of their own
}

// targets returns one target per user (gateway: the user's key) or per
// upstream key (plain: the client sends the upstream key itself, as
// nothing in front swaps it), all with the same body and headers.
func (h *harness) targets(s reqSpec) []vegeta.Target {
	base, path := h.plainURL, "/v1/messages"
	if s.site == "gateway" {
		base = h.gwURL
	}
	var body string
	if h.cfg.API == "openai" {
		path = "/v1/chat/completions"
		if s.stream {
			body = `{"model":"claude-sonnet-4-5","stream":true,"stream_options":{"include_usage":true},"max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}`
		} else {
			body = `{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}`
		}
	} else {
		if s.stream {
			body = `{"model":"claude-sonnet-4-5","stream":true,"max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}`
		} else {
			body = `{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}`
		}
	}
	var keys []string
	switch {
	case s.site == "gateway" && s.friend:
		keys = h.friendKeys
	case s.site == "gateway":
		for _, u := range h.users {
			keys = append(keys, u.Key)
		}
	default:
		keys = h.upstreamKeys
	}
	var out []vegeta.Target
	for _, k := range keys {
		hd := http.Header{}
		hd.Set("Content-Type", "application/json")
		hd.Set("Anthropic-Version", "2023-06-01")
		if h.cfg.API == "openai" {
			hd.Set("Authorization", "Bearer "+k)
		} else {
			hd.Set("X-Api-Key", k)
		}
		if s.events > 0 {
			hd.Set(HeaderEvents, strconv.Itoa(s.events))
		}
		if s.bytes > 0 {
			hd.Set(HeaderStreamBytes, strconv.FormatInt(s.bytes, 10))
			hd.Set(HeaderEventBytes, strconv.Itoa(s.evSize))
		}
		if s.delay > 0 {
			hd.Set(HeaderEventDelay, s.delay.String())
		}
		out = append(out, vegeta.Target{Method: http.MethodPost, URL: base + path, Body: []byte(body), Header: hd})
	}
	return out
}

// each sends every target once, conc at a time, outside vegeta: one
// request per user, to put every active key in the gateway's cache.
func (h *harness) each(targets []vegeta.Target, conc int) ([]outcome, time.Duration) {
	start := time.Now()
	outs := make([]outcome, len(targets))
	next := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				outs[i] = h.do(context.Background(), targets[i], nil)
			}
		}()
	}
	for i := range targets {
		next <- i
	}
	close(next)
	wg.Wait()
	return outs, time.Since(start)
}

// outcome is what the harness keeps of one request.
type outcome struct {
	start    time.Time
	latency  time.Duration
	ttfb     time.Duration // first body byte; 0 if none
	code     int
	complete bool
	reqID    string
	err      string
}

func (o outcome) ok() bool { return o.code >= 200 && o.code < 300 && o.err == "" && o.complete }

// attack drives one phase with vegeta: at rate req/s, or at saturation
// with conc concurrent requests when rate is 0.
func (h *harness) attack(s reqSpec, rate, conc int, d time.Duration) (outs []outcome, wall time.Duration) {
	opts := []func(*vegeta.Attacker){
		vegeta.Client(h.load.http), vegeta.MaxBody(0),
	}
	pace := vegeta.Rate{Freq: rate, Per: time.Second}
	if rate == 0 {
		opts = append(opts, vegeta.Workers(uint64(conc)), vegeta.MaxWorkers(uint64(conc)))
	} else {
		opts = append(opts, vegeta.Workers(uint64(min(conc, rate))))
	}
	atk := vegeta.NewAttacker(opts...)
	start := time.Now()
	for r := range atk.Attack(vegeta.NewStaticTargeter(h.targets(s)...), pace, d, s.site) {
		outs = append(outs, fromResult(r))
	}
	return outs, time.Since(start)
}

func fromResult(r *vegeta.Result) outcome {
	o := outcome{start: r.Timestamp, latency: r.Latency, code: int(r.Code), err: r.Error}
	if r.Headers != nil {
		o.reqID = r.Headers.Get(hdrRequestID)
		o.complete = r.Headers.Get(hdrComplete) == "1"
		if v, err := strconv.ParseInt(r.Headers.Get(hdrTTFB), 10, 64); err == nil {
			o.ttfb = time.Duration(v)
		}
	}
	if o.code >= 200 && o.code < 300 && o.err == "" && !o.complete {
		o.err = "incomplete body"
	}
	return o
}

// do sends one request outside vegeta (the long streams, the big stream,
// the probes) and reads the body to its end. firstByte, when not nil, is
// called once the response headers are in.
func (h *harness) do(ctx context.Context, t vegeta.Target, gotHeaders func()) outcome {
	req, err := http.NewRequestWithContext(ctx, t.Method, t.URL, bytes.NewReader(t.Body))
	if err != nil {
		return outcome{err: err.Error()}
	}
	req.Header = t.Header.Clone()
	if gotHeaders != nil {
		req = req.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotFirstResponseByte: gotHeaders}))
	}
	o := outcome{start: time.Now()}
	resp, err := h.load.http.Do(req)
	if err != nil {
		o.err = err.Error()
		o.latency = time.Since(o.start)
		return o
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	o.latency = time.Since(o.start)
	o.code = resp.StatusCode
	o.reqID = resp.Header.Get(hdrRequestID)
	o.complete = resp.Header.Get(hdrComplete) == "1"
	if v, e := strconv.ParseInt(resp.Header.Get(hdrTTFB), 10, 64); e == nil {
		o.ttfb = time.Duration(v)
	}
	if err != nil {
		o.err = err.Error()
	} else if o.code < 200 || o.code >= 300 {
		o.err = resp.Status
	} else if !o.complete {
		o.err = "incomplete body"
	}
	return o
}

// summary of a set of outcomes.
type loadStats struct {
	Sent       int     `json:"sent"`
	OK         int     `json:"ok"`
	Failed     int     `json:"failed"`
	FirstError string  `json:"first_error,omitempty"`
	WallS      float64 `json:"wall_s"`
	RPS        float64 `json:"rps"`
	P50Ms      float64 `json:"p50_ms"`
	P90Ms      float64 `json:"p90_ms"`
	P99Ms      float64 `json:"p99_ms"`
	TTFBP50Ms  float64 `json:"ttfb_p50_ms"`
	TTFBP99Ms  float64 `json:"ttfb_p99_ms"`
}

func stats(outs []outcome, wall time.Duration) loadStats {
	s := loadStats{Sent: len(outs), WallS: wall.Seconds()}
	var lat, ttfb []time.Duration
	for _, o := range outs {
		if !o.ok() {
			s.Failed++
			if s.FirstError == "" {
				s.FirstError = fmt.Sprintf("%d %s", o.code, o.err)
			}
			continue
		}
		s.OK++
		lat = append(lat, o.latency)
		if o.ttfb > 0 {
			ttfb = append(ttfb, o.ttfb)
		}
	}
	if wall > 0 {
		s.RPS = float64(s.OK) / wall.Seconds()
	}
	s.P50Ms, s.P90Ms, s.P99Ms = ms(pct(lat, 50)), ms(pct(lat, 90)), ms(pct(lat, 99))
	s.TTFBP50Ms, s.TTFBP99Ms = ms(pct(ttfb, 50)), ms(pct(ttfb, 99))
	return s
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// pct is the p-th percentile (nearest rank) of ds; it sorts ds.
func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	i := int(p/100*float64(len(ds))+0.999999) - 1
	i = max(0, min(i, len(ds)-1))
	return ds[i]
}

// holdStreams opens n streams at once, each lasting about hold (events
// spaced by delay), and calls during() once all of them are open.
func (h *harness) holdStreams(site string, n int, delay, hold time.Duration, during func(open func() int)) []outcome {
	events := int(hold/delay) + 1
	events = max(events, 8)
	ts := h.targets(reqSpec{site: site, stream: true, events: events, delay: delay})
	var (
		wg     sync.WaitGroup
		opened atomic.Int64
		closed atomic.Int64
		outs   = make([]outcome, n)
	)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			outs[i] = h.do(context.Background(), ts[i%len(ts)], func() { opened.Add(1) })
			closed.Add(1)
		}(i)
	}
	open := func() int { return int(opened.Load() - closed.Load()) }
	deadline := time.Now().Add(hold + 30*time.Second)
	for opened.Load() < int64(n) && closed.Load() < int64(n) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	during(open)
	wg.Wait()
	return outs
}
