package caddymodule

import (
	"context"
	"errors"
	"io"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// maxHeldError bounds an error answer held back while deciding whether to
// retry it on another key. A larger error body is passed through as it is.
const maxHeldError = 256 << 10

// holdWriter stands between reverse_proxy and the meter for one attempt on
// one upstream key. A success is committed at once and streams through
// untouched. An error answer (status >= 400) is held, headers and body, in a
// private header map (reverse_proxy writes upstream headers before
// WriteHeader), so that the handler can retry on another key before any
// byte reaches the client; replay sends it on when it is not retried.
//
// A success is first checked (see bodycheck.go): its Content-Type must be
// the one expect names, and its start is held until it proves to be JSON
// or server-sent events of JSON (checking). One that is not (garbage) is
// discarded, so that the handler answers 502 and bills nothing.
type holdWriter struct {
	m         *meter
	header    http.Header
	status    int
	held      bool
	committed bool
	body      []byte
	expect    int // expectJSON, expectSSE, or 0: a success is not checked
	checking  bool
	garbage   bool
}

func newHoldWriter(m *meter, expect int) *holdWriter {
	return &holdWriter{m: m, header: make(http.Header), expect: expect}
}

// Header returns the attempt's private headers until the answer is committed.
func (hw *holdWriter) Header() http.Header {
	if hw.committed {
		return hw.m.Header()
	}
	return hw.header
}

// WriteHeader commits a success and holds an error. Informational answers
// are not passed on: the final answer may come from another attempt.
func (hw *holdWriter) WriteHeader(code int) {
	if hw.committed || hw.held || code < 200 {
		return
	}
	hw.status = code
	switch {
	case code >= 400:
		hw.held = true
	case code >= 300 || hw.expect == 0:
		hw.commit()
	case !rightType(hw.expect, hw.header.Get("Content-Type")):
		hw.garbage = true
	default:
		hw.checking = true
	}
}

func (hw *holdWriter) commit() {
	h := hw.m.Header()
	for k, v := range hw.header {
		h[k] = v
	}
	hw.committed = true
	hw.m.WriteHeader(hw.status)
}

// Write streams a committed answer and keeps a held one.
func (hw *holdWriter) Write(p []byte) (int, error) {
	if hw.status == 0 {
		hw.WriteHeader(http.StatusOK)
	}
	switch {
	case hw.committed:
		return hw.m.Write(p)
	case hw.garbage:
		return len(p), nil // read to the end, never shown
	case hw.checking:
		hw.body = append(hw.body, p...)
		switch inspect(hw.expect, hw.body, false) {
		case looksRight:
			if err := hw.passOn(); err != nil {
				return 0, err
			}
		case garbage:
			hw.garbage, hw.checking, hw.body = true, false, nil
		}
		return len(p), nil
	}
	if len(hw.body)+len(p) > maxHeldError {
		// Too big to hold: it goes to the client as it is.
		hw.held = false
		hw.commit()
		if _, err := hw.m.Write(hw.body); err != nil {
			return 0, err
		}
		hw.body = nil
		return hw.m.Write(p)
	}
	hw.body = append(hw.body, p...)
	return len(p), nil
}

// passOn commits a checked success and sends what was held of it.
func (hw *holdWriter) passOn() error {
	hw.checking = false
	hw.commit()
	b := hw.body
	hw.body = nil
	_, err := hw.m.Write(b)
	return err
}

// endCheck rules on a success still held when its attempt ends. An answer
// the upstream finished is judged whole; one cut short (err) or whose client
// is gone goes on as it is, to be billed as such answers always were.
func (hw *holdWriter) endCheck(err error, clientGone bool) error {
	if !hw.checking {
		return nil
	}
	if err == nil && !clientGone && inspect(hw.expect, hw.body, true) != looksRight {
		hw.garbage, hw.checking, hw.body = true, false, nil
		return nil
	}
	return hw.passOn()
}

// replay sends a held error answer to the client, sanitised: the legacy
// status and message in the API's shape, none of the upstream's headers.
func (hw *holdWriter) replay(api billing.API) {
	if !hw.held {
		return
	}
	hw.held = false
	hw.committed = true
	e, raw := sanitizeUpstreamError(api, hw.status, hw.body)
	h := hw.m.Header()
	if ra := hw.header.Get("Retry-After"); ra != "" && (hw.status == http.StatusTooManyRequests || hw.status == 529) {
		h.Set("Retry-After", ra)
	}
	if raw != nil {
		writeJSON(hw.m, hw.status, raw)
		return
	}
	e.write(hw.m, api)
}

// FlushError flushes a committed answer (reverse_proxy flushes SSE events
// through http.ResponseController).
func (hw *holdWriter) FlushError() error {
	if !hw.committed {
		return nil
	}
	return http.NewResponseController(hw.m).Flush()
}

// Flush implements http.Flusher.
func (hw *holdWriter) Flush() { _ = hw.FlushError() }

// Unwrap exposes the meter once the answer is committed, for the
// ResponseController features the hold writer does not implement itself.
func (hw *holdWriter) Unwrap() http.ResponseWriter {
	if hw.committed {
		return hw.m
	}
	return nil
}

// ReadFrom keeps io.Copy from bypassing Write.
func (hw *holdWriter) ReadFrom(r io.Reader) (int64, error) {
	return io.Copy(writerOnly{hw}, r)
}

// forward sends the request upstream, on another key when a key fails
// before any byte has reached the client, within the engine's attempt and
// time budget. Every attempt is appended to pr.attempts and pr.upKey ends
// as the key that answered. When it answers the client itself (no key
// left, upstream unreachable) the meter sees nothing, so nothing is billed.
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, next upstreamHandler,
	m *meter, pr *proxied, fwd []byte, api billing.API) error {
	// Only allowed headers and query parameters go upstream: the pool key
	// is the only credential that leaves. Plain bytes from the upstream, so
	// the usage reader sees JSON, not gzip.
	h.headers.apply(r)
	r.Header.Set("Accept-Encoding", "identity")
	maxAttempts, budget, policy := h.eng.retryPolicy()
	for attempt := 1; ; attempt++ {
		t := tryKey(r, next, m, pr, fwd)
		v, done, err := h.judgeTry(w, r, pr, t, policy, api)
		if done {
			return err
		}
		h.applyVerdict(r, next, pr, t, v)
		if !v.Retry || attempt >= maxAttempts || time.Since(pr.start) > budget || pr.client.Err() != nil {
			h.giveUp(w, pr, t, api)
			return nil
		}
		if !h.switchKey(w, pr, t, v, attempt, api) {
			return nil
		}
	}
}

// keyTry is one attempt of the request on one upstream key.
type keyTry struct {
	hw  *holdWriter     // the attempt's answer: held, committed or discarded
	at  billing.Attempt // its record; Reason is set when it is judged
	err error           // the attempt's error, else the check's on a held success
}

// tryKey sends the request once on pr.upKey, with the forwarded body fwd
// and the key as its credential, through a fresh hold writer. A success
// still being checked when the attempt ends has been ruled on (endCheck).
func tryKey(r *http.Request, next upstreamHandler, m *meter, pr *proxied, fwd []byte) *keyTry {
	setBody(r, fwd)
	r.Header.Set("Authorization", "Bearer "+pr.upKey.APIKey)
	hw := newHoldWriter(m, pr.expect)
	t0 := time.Now()
	err := next.ServeHTTP(hw, r)
	if cerr := hw.endCheck(err, pr.client.Err() != nil); err == nil {
		err = cerr
	}
	at := billing.Attempt{KeyID: pr.upKey.ID, Status: hw.status, LatencyMs: time.Since(t0).Milliseconds()}
	return &keyTry{hw: hw, at: at, err: err}
}

// judgeTry rules on an ended attempt. When the attempt ends the request (an
// answer committed to the client, a success not valid for its API, an empty
// answer, a client gone), it records the attempt where there is one to
// record, answers the client where it must, and returns done with what
// forward returns. Otherwise it returns the policy's verdict on the key and
// leaves the attempt to applyVerdict.
func (h *Handler) judgeTry(w http.ResponseWriter, r *http.Request, pr *proxied, t *keyTry,
	policy billing.KeyPolicy, api billing.API) (v billing.KeyVerdict, done bool, err error) {
	hw := t.hw
	switch {
	case hw.garbage:
		// Not what the API promises: never shown, never billed.
		t.at.Reason = "invalid_answer"
		pr.attempts = append(pr.attempts, t.at)
		h.logger.Warn("upstream answered a success that is not valid for its API; answering 502",
			zap.String("upstream_key", pr.upKey.ID), zap.Int("status", hw.status),
			zap.String("content_type", hw.header.Get("Content-Type")))
		errBadAnswer.write(w, api)
		return v, true, nil
	case hw.committed:
		t.at.Reason = "ok"
		if hw.status >= 400 {
			t.at.Reason = "error_passed_through"
		}
		pr.attempts = append(pr.attempts, t.at)
		return v, true, t.err
	case hw.held:
		return policy.JudgeResponse(hw.status, hw.body, hw.header.Get("Retry-After"), time.Now()), false, nil
	case t.err != nil && pr.client.Err() == nil && r.Context().Err() == nil:
		return policy.JudgeTransportError(), false, nil
	case t.err != nil:
		return v, true, nil // the client is gone; nothing to answer
	default:
		// An empty answer without a status: nothing reached the client.
		t.at.Reason = "empty"
		pr.attempts = append(pr.attempts, t.at)
		return v, true, nil
	}
}

// applyVerdict records a judged attempt with the verdict's reason
// ("not_retried" when it gives none), takes the key out of the pool when the
// verdict gives it a status, and probes the key when the verdict asks.
func (h *Handler) applyVerdict(r *http.Request, next upstreamHandler, pr *proxied, t *keyTry, v billing.KeyVerdict) {
	t.at.Reason = v.Reason
	if t.at.Reason == "" {
		t.at.Reason = "not_retried"
	}
	pr.attempts = append(pr.attempts, t.at)
	if v.Status != "" {
		h.eng.markKey(pr.upKey, v)
	}
	if v.Probe {
		h.probeKey(r, next, pr.upKey) // only its answer may demote the key for good
	}
}

// giveUp answers the client when an attempt is not retried: the held error,
// sanitised, or the legacy upstream error when there is none.
func (h *Handler) giveUp(w http.ResponseWriter, pr *proxied, t *keyTry, api billing.API) {
	if t.hw.held {
		t.hw.replay(api)
		return
	}
	if pr.client.Err() == nil {
		h.logger.Warn("upstream request failed", zap.String("upstream_key", pr.upKey.ID), zap.Error(t.err))
	}
	errUpstream.write(w, api)
}

// switchKey makes pr.upKey the next key to retry on and reports true, or,
// when no key is left, answers the client (the legacy 503 after a held
// error, else the upstream error) and reports false.
func (h *Handler) switchKey(w http.ResponseWriter, pr *proxied, t *keyTry, v billing.KeyVerdict, attempt int, api billing.API) bool {
	k, err := h.eng.pickKey()
	if err != nil {
		h.logger.Warn("no upstream key left to retry on", zap.Int("attempts", attempt))
		if t.hw.held {
			errNoKey.write(w, api) // no key can serve: the legacy 503
		} else {
			errUpstream.write(w, api)
		}
		return false
	}
	h.logger.Info("retrying on another upstream key",
		zap.String("failed_key", pr.upKey.ID), zap.String("reason", v.Reason), zap.String("next_key", k.ID))
	pr.upKey = k
	upstreamFailovers.WithLabelValues(v.Reason).Inc()
	return true
}

// markKey takes a failing key out of the in-memory pool at once and records
// its status in openhands_keys off the request path.
func (e *engine) markKey(k billing.UpstreamKey, v billing.KeyVerdict) {
	var until time.Time
	if v.Cooldown > 0 {
		until = time.Now().Add(v.Cooldown)
	}
	e.keys.Mark(k.ID, v.Status, until)
	if !v.Persist || upKeyID(k) == "" { // static keys live in the config only
		return
	}
	// A key that failed for good is replaced by a spare when there is one.
	rotate := v.Status == billing.KeyNeedRefresh || v.Status == billing.KeyExhausted
	select {
	case e.marks <- keyMark{id: k.ID, status: v.Status, until: until, lastError: v.Reason, rotate: rotate}:
	default:
		// The in-memory mark already applies; the next refresh would only
		// restore the key early. Never block a request for this.
		e.log().Warn("key status write queue full; dropping a status write", zap.String("upstream_key", k.ID))
	}
}

type keyMark struct {
	id, status, lastError string
	until                 time.Time
	rotate                bool
}

func (e *engine) markLoop() {
	defer e.workers.Done()
	for {
		select {
		case <-e.stop:
			return
		case km := <-e.marks:
			e.applyMark(km)
		}
	}
}

// applyMark rotates a key that failed for good (or leaves it to the
// instance already rotating it), and otherwise records its status as the
// legacy proxy did.
func (e *engine) applyMark(km keyMark) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*dbTimeout)
	defer cancel()
	if km.rotate {
		newID, err := e.store.RotateUpstreamKey(ctx, km.id, km.lastError)
		switch {
		case err == nil:
			if newID != "" {
				e.log().Info("upstream key replaced by a spare", zap.String("failed_key", km.id),
					zap.String("new_key", newID), zap.String("reason", km.lastError))
			}
			if err := e.reloadKeys(ctx); err != nil {
				e.log().Warn("reloading upstream keys after a rotation failed", zap.Error(err))
			}
			return
		case errors.Is(err, billing.ErrRotationInProgress):
			return
		case !errors.Is(err, billing.ErrNoSpareKey):
			e.log().Error("rotating upstream key failed", zap.String("failed_key", km.id), zap.Error(err))
		}
	}
	if err := e.store.MarkUpstreamKey(ctx, km.id, km.status, km.until, km.lastError); err != nil {
		e.log().Warn("writing upstream key status failed", zap.String("upstream_key", km.id), zap.Error(err))
	}
}
