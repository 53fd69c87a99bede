package caddymodule

import (
	"io"
	"mime"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// maxJSONCopy bounds the copy of a non-streaming response kept to read its
// usage. A larger answer is still passed through whole; it is billed from
// an estimate and the log says so.
const maxJSONCopy = 16 << 20

// meter passes the response through untouched and reads usage from a copy:
// every Write goes to the client first, then to the scanner. It records the
// status and the time of the first byte.
type meter struct {
	*caddyhttp.ResponseWriterWrapper
	api       billing.API
	status    int
	sse       bool
	scanner   *billing.SSEScanner
	body      []byte
	overflow  bool
	bytes     int64
	firstByte time.Time
	// drain: once the client is gone (gone), the response is still read
	// to the end for its usage, and not written anywhere.
	drain bool
	gone  atomic.Bool
	// onStart, when set, runs when the first final status is written.
	onStart func()
}

var scanners = sync.Pool{New: func() any { return billing.NewSSEScanner(billing.OpenAI) }}

func newMeter(w http.ResponseWriter, api billing.API) *meter {
	return &meter{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, api: api}
}

// release returns pooled buffers; the meter must not be used afterwards.
func (m *meter) release() {
	if m.scanner != nil {
		scanners.Put(m.scanner)
		m.scanner = nil
	}
	m.body = nil
}

// WriteHeader records the first final status and what kind of body follows.
func (m *meter) WriteHeader(code int) {
	if code >= 200 && m.status == 0 {
		m.status = code
		if mt, _, err := mime.ParseMediaType(m.Header().Get("Content-Type")); err == nil && mt == "text/event-stream" {
			m.sse = true
			m.scanner = scanners.Get().(*billing.SSEScanner)
			m.scanner.Reset(m.api)
		}
	}
	m.ResponseWriterWrapper.WriteHeader(code)
	if m.onStart != nil && code >= 200 {
		m.onStart()
		m.onStart = nil
	}
}

// Write forwards p, then feeds the copy to the usage reader.
func (m *meter) Write(p []byte) (int, error) {
	if m.status == 0 {
		m.WriteHeader(http.StatusOK)
	}
	var n int
	var err error
	if m.drain && m.gone.Load() {
		n = len(p)
	} else {
		n, err = m.ResponseWriterWrapper.Write(p)
		if err != nil && m.drain {
			// The client is gone: keep reading the upstream for its usage.
			m.gone.Store(true)
			n, err = len(p), nil
		}
	}
	if n > 0 {
		if m.bytes == 0 {
			m.firstByte = time.Now()
		}
		m.bytes += int64(n)
		if m.status >= 200 && m.status < 300 {
			m.feed(p[:n])
		}
	}
	return n, err
}

func (m *meter) feed(p []byte) {
	if m.sse {
		_, _ = m.scanner.Write(p)
		return
	}
	if m.overflow {
		return
	}
	if len(m.body)+len(p) > maxJSONCopy {
		m.overflow, m.body = true, nil
		return
	}
	m.body = append(m.body, p...)
}

// ReadFrom keeps io.Copy from bypassing Write through the embedded
// ReadFrom (caddy issues #5022, #6546).
func (m *meter) ReadFrom(r io.Reader) (int64, error) {
	return io.Copy(writerOnly{m}, r)
}

type writerOnly struct{ io.Writer }

var _ io.ReaderFrom = (*meter)(nil)
