package caddymodule

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// countingReader yields its bytes and counts how many were read.
type countingReader struct {
	r    io.Reader
	read int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.read += int64(n)
	return n, err
}

func newBudget(limit int64) *bodyBudget {
	b := new(bodyBudget)
	b.limit.Store(limit)
	return b
}

func payload(n int) []byte { return bytes.Repeat([]byte("x"), n) }

func TestReadBodyContentLength(t *testing.T) {
	const limit = 1 << 20
	for _, tc := range []struct {
		name   string
		sent   int   // bytes the client sends
		length int64 // its Content-Length
		status int   // 0: read
	}{
		{"exact", 300_000, 300_000, 0},
		{"empty", 0, 0, 0},
		{"at the limit", limit, limit, 0},
		{"short body", 1000, 2000, http.StatusBadRequest},
		{"longer than Content-Length", 2000, 1000, http.StatusBadRequest},
		{"Content-Length over the limit", limit + 1, limit + 1, http.StatusRequestEntityTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			budget := newBudget(DefaultBodyMemory)
			src := &countingReader{r: bytes.NewReader(payload(tc.sent))}
			b, held, aerr := readBody(src, tc.length, limit, budget)
			assert.Equal(t, held, budget.used.Load(), "held bytes are the counted bytes")
			budget.release(held)
			assert.Zero(t, budget.used.Load())
			if tc.status != 0 {
				require.NotNil(t, aerr)
				assert.Equal(t, tc.status, aerr.status)
				assert.Nil(t, b)
				if tc.status == http.StatusRequestEntityTooLarge {
					assert.Zero(t, src.read, "a body known to be too large is not read")
				}
				return
			}
			require.Nil(t, aerr)
			assert.Equal(t, payload(tc.sent), b)
			assert.Equal(t, tc.length, int64(cap(b)), "the buffer is exactly Content-Length")
			assert.Equal(t, tc.length, held)
		})
	}
}

func TestReadBodyChunked(t *testing.T) {
	const limit = 300_000 // not a power of two: the last step is clipped
	for _, tc := range []struct {
		name    string
		sent    int
		tooBig  bool
		maxRead int64 // most bytes read from the client
	}{
		{"small", 10, false, 10},
		{"one chunk", firstChunk, false, firstChunk},
		{"grows", 200_000, false, 200_000},
		{"at the limit", limit, false, limit},
		{"one byte over", limit + 1, true, limit + 1},
		{"far over", 10 * limit, true, limit + 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			budget := newBudget(DefaultBodyMemory)
			src := &countingReader{r: bytes.NewReader(payload(tc.sent))}
			b, held, aerr := readBody(src, -1, limit, budget)
			assert.Equal(t, held, budget.used.Load(), "held bytes are the counted bytes")
			assert.LessOrEqual(t, held, int64(limit+1), "the buffer never exceeds limit+1")
			assert.LessOrEqual(t, src.read, tc.maxRead)
			budget.release(held)
			assert.Zero(t, budget.used.Load())
			if tc.tooBig {
				require.NotNil(t, aerr)
				assert.Equal(t, http.StatusRequestEntityTooLarge, aerr.status)
				return
			}
			require.Nil(t, aerr)
			assert.Equal(t, payload(tc.sent), b)
			assert.Equal(t, int64(cap(b)), held, "the whole buffer is counted")
		})
	}
}

// A body that does not fit the budget gets 503 and is not read; the budget
// is whole again once the bodies are released.
func TestReadBodyBudget(t *testing.T) {
	const limit = 1 << 20
	budget := newBudget(1000)
	first, held1, aerr := readBody(bytes.NewReader(payload(600)), 600, limit, budget)
	require.Nil(t, aerr)
	require.Len(t, first, 600)

	src := &countingReader{r: bytes.NewReader(payload(600))}
	_, held2, aerr := readBody(src, 600, limit, budget)
	require.NotNil(t, aerr)
	assert.Equal(t, http.StatusServiceUnavailable, aerr.status)
	assert.Zero(t, held2)
	assert.Zero(t, src.read, "a body over budget is not read")
	assert.Equal(t, int64(600), budget.used.Load())

	budget.release(held1)
	second, held2, aerr := readBody(src, 600, limit, budget)
	require.Nil(t, aerr, "released bytes are available again")
	assert.Len(t, second, 600)
	budget.release(held2)
	assert.Zero(t, budget.used.Load())
}

// A chunked body is refused as soon as its next buffer does not fit, with
// what it read so far still counted until released.
func TestReadBodyBudgetChunked(t *testing.T) {
	budget := newBudget(3 * firstChunk)
	src := &countingReader{r: bytes.NewReader(payload(10 * firstChunk))}
	_, held, aerr := readBody(src, -1, 1<<30, budget)
	require.NotNil(t, aerr)
	assert.Equal(t, http.StatusServiceUnavailable, aerr.status)
	assert.Equal(t, held, budget.used.Load())
	assert.LessOrEqual(t, src.read, int64(2*firstChunk), "nothing is read past the last buffer that fit")
	budget.release(held)
	assert.Zero(t, budget.used.Load())
}

// A limit set before the handler (Caddy's request_body) is a 413 too.
func TestReadBodyMaxBytesReader(t *testing.T) {
	r := http.MaxBytesReader(httptest.NewRecorder(), io.NopCloser(bytes.NewReader(payload(5000))), 1000)
	_, held, aerr := readBody(r, -1, 1<<20, newBudget(DefaultBodyMemory))
	require.NotNil(t, aerr)
	assert.Equal(t, http.StatusRequestEntityTooLarge, aerr.status)
	assert.Contains(t, aerr.message, "1000 bytes")
	assert.Positive(t, held)
}

func TestBodyBudgetLimitChanges(t *testing.T) {
	b := newBudget(100)
	require.True(t, b.tryAcquire(80))
	b.limit.Store(50) // a reload lowers the bound while 80 bytes are held
	assert.False(t, b.tryAcquire(1))
	b.release(80)
	assert.True(t, b.tryAcquire(50))
	assert.False(t, b.tryAcquire(1))
}

// gate is a body that blocks after its first bytes until closed: a
// request whose answer comes while it blocks was answered unread.
type gate struct {
	head []byte
	open chan struct{}
}

func (g *gate) Read(p []byte) (int, error) {
	if len(g.head) > 0 {
		n := copy(p, g.head)
		g.head = g.head[n:]
		return n, nil
	}
	<-g.open
	return 0, errors.New("gate closed")
}

// A user whose pool is empty gets the legacy 402 before the body is read;
// after a top-up the next request is served at once (the cached balance
// is read again), and the one after costs no balance read.
func TestHandlerPrecheckBeforeBody(t *testing.T) {
	h, fs := newTestHandler(t)
	fs.broke.Store(true)
	g := &gate{head: benchBody[:10], open: make(chan struct{})}
	defer close(g.open)
	rec := httptest.NewRecorder()
	r := newRequest(t, rec, fs.key, nil)
	r.Body, r.ContentLength = io.NopCloser(g), 50<<20
	require.NoError(t, h.ServeHTTP(rec, r, upstream(false, 0)))
	require.Equal(t, http.StatusPaymentRequired, rec.Code, rec.Body.String())
	var body antBody
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body))
	assert.Equal(t, "insufficient_credits", body.Error.Type)
	assert.True(t, strings.HasPrefix(body.Error.Message, "Insufficient creditsNew. Current balance: $0.00"), body.Error.Message)
	assert.Len(t, g.head, 10, "no byte of the body was read")
	assert.Equal(t, int64(1), fs.balanceReads.Load(), "an empty cached balance is read again")
	assert.Zero(t, fs.holds.Load())
	assert.Zero(t, h.eng.bodies.used.Load())

	fs.broke.Store(false) // the user tops up
	for i := 0; i < 2; i++ {
		rec = httptest.NewRecorder()
		require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, jsonBody), upstream(false, 0)))
		require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	}
	assert.Equal(t, int64(2), fs.balanceReads.Load(), "the fresh balance is kept with the key")
	assert.Equal(t, int64(1), fs.authRead.Load())
	assert.Zero(t, h.eng.bodies.used.Load(), "bodies are released when their requests end")
}

// A body over the budget gets 503 overloaded_error, unread and unbilled.
func TestHandlerBodyOverBudget(t *testing.T) {
	h, fs := newTestHandler(t)
	h.eng.bodies.limit.Store(int64(len(benchBody)) - 1)
	rec := httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, benchBody), upstream(false, 0)))
	require.Equal(t, http.StatusServiceUnavailable, rec.Code)
	assert.Equal(t, "1", rec.Header().Get("Retry-After"))
	var body antBody
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body))
	assert.Equal(t, "error", body.Type)
	assert.Equal(t, "overloaded_error", body.Error.Type)
	assert.Zero(t, fs.holds.Load())
	assert.Zero(t, h.eng.bodies.used.Load())
}
