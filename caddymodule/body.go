package caddymodule

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// DefaultBodyMemory is the default bound on the memory held by request
// bodies in flight (App.BodyMemory): five bodies of the default 50 MB
// limit, or some hundreds of ordinary chat requests at once, while the
// worst a crowd of large bodies can take stays a fraction of a small
// server's memory.
const DefaultBodyMemory = 256 << 20

// firstChunk is the buffer a body of unknown length starts with.
const firstChunk = 64 << 10

// bodyBudget bounds the bytes held by request bodies in flight, across the
// sites and config generations of an engine. It is a counter with a limit
// rather than a semaphore, so that a reload can change the limit while
// bodies are held: their bytes stay counted until released, and new bodies
// are measured against the new limit. It never waits.
type bodyBudget struct {
	limit atomic.Int64
	used  atomic.Int64
}

// tryAcquire counts n more bytes, or reports false, counting nothing, when
// that would take the total beyond the limit.
func (b *bodyBudget) tryAcquire(n int64) bool {
	for {
		used := b.used.Load()
		if n > b.limit.Load()-used {
			return false
		}
		if b.used.CompareAndSwap(used, used+n) {
			return true
		}
	}
}

// release gives back n bytes counted by tryAcquire.
func (b *bodyBudget) release(n int64) { b.used.Add(-n) }

// errOverloaded answers a body that would take the bodies in flight beyond
// body_memory: the client may retry shortly.
var errOverloaded = &apiError{status: http.StatusServiceUnavailable,
	message: "The gateway is busy with other large requests. Please retry shortly.",
	oaiType: "server_error", oaiCode: "overloaded", antType: "overloaded_error", retryAfter: "1"}

// readBody reads a request body of at most limit bytes, counting its
// buffer in budget before the bytes are read. With a known length
// (contentLength ≥ 0) the buffer is exactly that long and filled once; a
// body of unknown length (chunked) grows by doubling, each step counted
// before it is allocated, up to limit+1 bytes, enough to tell that it is
// too large. The buffer never exceeds limit+1 bytes, and a body of known
// length is allocated once.
//
// It returns the body and how many bytes stay counted in budget (the
// caller releases them when it no longer needs the body, possibly on an
// error); the error is 413 beyond limit, 503 when the budget is spent
// (nothing more is read then), 400 for a body shorter or longer than its
// Content-Length or a failed read.
func readBody(body io.Reader, contentLength, limit int64, budget *bodyBudget) (b []byte, held int64, aerr *apiError) {
	if contentLength > limit {
		return nil, 0, errBodyTooLarge(limit)
	}
	if contentLength >= 0 {
		if !budget.tryAcquire(contentLength) {
			return nil, 0, errOverloaded
		}
		buf := make([]byte, contentLength)
		if _, err := io.ReadFull(body, buf); err != nil {
			return nil, contentLength, readError(err)
		}
		// The server stops at Content-Length; any other reader must too.
		var extra [1]byte
		if n, err := io.ReadFull(body, extra[:]); n > 0 || !errors.Is(err, io.EOF) {
			return nil, contentLength, errReadBody
		}
		return buf, contentLength, nil
	}
	return readChunked(io.LimitReader(body, limit+1), limit, budget)
}

// readChunked reads a body of unknown length from r, which yields at most
// limit+1 bytes, for readBody.
func readChunked(r io.Reader, limit int64, budget *bodyBudget) (b []byte, held int64, aerr *apiError) {
	size := min(firstChunk, limit+1)
	if !budget.tryAcquire(size) {
		return nil, 0, errOverloaded
	}
	buf, held := make([]byte, 0, size), size
	for {
		if len(buf) == cap(buf) {
			if int64(len(buf)) > limit {
				return nil, held, errBodyTooLarge(limit)
			}
			// Both buffers are counted while the bytes are copied.
			next := min(2*int64(cap(buf)), limit+1)
			if !budget.tryAcquire(next) {
				return nil, held, errOverloaded
			}
			grown := make([]byte, len(buf), next)
			copy(grown, buf)
			budget.release(int64(cap(buf)))
			buf, held = grown, next
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, held, readError(err)
		}
	}
	if int64(len(buf)) > limit {
		return nil, held, errBodyTooLarge(limit)
	}
	return buf, held, nil
}

// readError answers a failed body read: 413 when a limit set before this
// handler (Caddy's request_body) was reached, 400 otherwise.
func readError(err error) *apiError {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errBodyTooLarge(mbe.Limit)
	}
	return errReadBody
}

// admitBody runs the checks that come before the body, then reads it (see
// precheck and readBody). The held bytes stay counted in the engine's
// budget until the caller releases them, when the request ends, whatever
// the answer.
func (h *Handler) admitBody(r *http.Request, key string, p billing.Principal, api billing.API) (body []byte, held int64, aerr *apiError) {
	if aerr := h.precheck(r.Context(), key, p, api); aerr != nil {
		return nil, 0, aerr
	}
	return readBody(r.Body, r.ContentLength, h.MaxBodySize, &h.eng.bodies)
}

// precheck refuses, before the body is read, a user whose pool holds
// nothing: the balance read with the key (cached with it for
// key_cache_ttl) is trusted when positive, and read again when it is not,
// so that a top-up counts at once while only users who look broke pay a
// round trip. The hold, which needs the body, still decides after it.
func (h *Handler) precheck(ctx context.Context, key string, p billing.Principal, api billing.API) *apiError {
	if p.Balances.Pool(h.plan) > 0 {
		return nil
	}
	b, err := h.eng.freshBalances(ctx, key, p.User)
	switch {
	case errors.Is(err, billing.ErrUserNotFound):
		return errInvalidKey // as the hold would answer
	case err != nil:
		h.logger.Error("reading a balance failed; refusing the request", zap.String("user", p.User), zap.Error(err))
		return errUnavailable
	}
	if bal := b.Pool(h.plan); bal <= 0 {
		return errInsufficient(api, h.plan, bal)
	}
	return nil
}
