package caddymodule

import (
	"context"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// refusalRecorder wraps the ResponseWriter of a billed endpoint so that the
// refusal the gateway answers itself (apiError.write notes it) can be
// written to error_logs once the request is over.
type refusalRecorder struct {
	http.ResponseWriter
	refusal *apiError
	masked  string // the client's key, masked, once read
	user    string // the authenticated user, once known
	model   string // the canonical model id, once found in the site's models file
	status  int    // the first final status written to the client, 0 until then
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (rr *refusalRecorder) Unwrap() http.ResponseWriter { return rr.ResponseWriter }

// WriteHeader records the first final status (for requests_total).
func (rr *refusalRecorder) WriteHeader(code int) {
	if code >= 200 && rr.status == 0 {
		rr.status = code
	}
	rr.ResponseWriter.WriteHeader(code)
}

// Write records the implicit 200 of a body written without a status.
func (rr *refusalRecorder) Write(p []byte) (int, error) {
	if rr.status == 0 {
		rr.status = http.StatusOK
	}
	return rr.ResponseWriter.Write(p)
}

// Error logs are written in batches of at most errorLogBatch, at least every
// errorLogFlush; at most errorLogQueue wait, beyond which new ones are
// dropped (and counted in a warning) rather than ever slowing a request.
const (
	errorLogQueue = 4096
	errorLogBatch = 256
	errorLogFlush = time.Second
)

// logRefusal queues the error log of a request the gateway refused, if it
// did. Rate-limited requests are not logged (the legacy did not either;
// rate_limited_total counts them), nor are the upstream's own errors.
func (h *Handler) logRefusal(r *http.Request, rr *refusalRecorder) {
	e := rr.refusal
	if e == nil || e.status == http.StatusTooManyRequests || !h.eng.settings().errorLogs {
		return
	}
	ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	hdr := make(map[string]string, len(billing.ErrorLogHeaders))
	for _, name := range billing.ErrorLogHeaders {
		if v := r.Header.Get(name); v != "" {
			hdr[name] = truncate(v, 512)
		}
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	h.eng.recordRefusal(billing.ErrorLog{
		Method: r.Method, Path: r.URL.Path, Endpoint: scheme + "://" + r.Host + r.URL.Path,
		UserID: rr.user, UserKeyID: rr.masked, ClientIP: ip, UserAgent: truncate(r.UserAgent(), 512),
		StatusCode: e.status, ErrorType: billing.ErrorTypeFor(e.status), ErrorMessage: e.message,
		RequestHeaders: hdr, CreatedAt: time.Now(),
	})
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// recordRefusal queues an error log without ever blocking.
func (e *engine) recordRefusal(l billing.ErrorLog) {
	select {
	case e.errorLogs <- l:
	default:
		e.errorLogsDropped.Add(1)
	}
}

// errorLogLoop writes the queued error logs in batches until the engine
// stops, then writes what is left once.
func (e *engine) errorLogLoop() {
	defer e.workers.Done()
	el, ok := e.store.(billing.ErrorLogger)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
	if err := el.EnsureErrorLogIndexes(ctx); err != nil {
		e.log().Warn("error_logs indexes incomplete", zap.Error(err))
	}
	cancel()
	tick := time.NewTicker(errorLogFlush)
	defer tick.Stop()
	batch := make([]billing.ErrorLog, 0, errorLogBatch)
	for {
		select {
		case l := <-e.errorLogs:
			if batch = append(batch, l); len(batch) < errorLogBatch {
				continue
			}
		case <-tick.C:
		case <-e.stop:
			for len(batch) < errorLogBatch {
				select {
				case l := <-e.errorLogs:
					batch = append(batch, l)
					continue
				default:
				}
				break
			}
			e.writeErrorLogs(el, batch)
			return
		}
		batch = e.writeErrorLogs(el, batch)
	}
}

// writeErrorLogs writes one batch, once: error logs are diagnostics, and a
// batch the database refuses is dropped with a warning, never retried
// ahead of the money.
func (e *engine) writeErrorLogs(el billing.ErrorLogger, batch []billing.ErrorLog) []billing.ErrorLog {
	if n := e.errorLogsDropped.Swap(0); n > 0 {
		e.log().Warn("error_logs queue full; refusals not logged", zap.Int64("dropped", n))
	}
	if len(batch) == 0 {
		return batch
	}
	ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
	defer cancel()
	if err := el.InsertErrorLogs(ctx, batch); err != nil {
		e.log().Warn("writing error_logs failed; batch dropped", zap.Int("rows", len(batch)), zap.Error(err))
	}
	return batch[:0]
}
