package caddymodule

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// A hold capped by the pool lowers the forwarded max_tokens to what it pays
// for; an upstream that answers more breaks its contract, and says so.
func TestMaxTokensLoweredToTheHold(t *testing.T) {
	h, fs := newTestHandler(t)
	core, logs := observer.New(zapcore.WarnLevel)
	h.logger = zap.New(core)
	m, ok := h.cat.Lookup("claude-sonnet-4-5")
	require.True(t, ok)
	body := []byte(`{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"hi"}]}`)
	terms := billing.HoldTerms(m, billing.ForwardedSize(len(body), m.PickUpstream(0)), 1024, DefaultMaxTokens)
	// The least pool that pays for 10 output tokens after the input bound.
	lo, hi := terms.Input, terms.Want
	for lo < hi {
		if mid := lo + (hi-lo)/2; terms.Cap(m, mid, 0) >= 10 {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	fs.balance = lo

	var fwd []byte
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		fwd, _ = io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(fwd))
		return upstream(false, 0).ServeHTTP(w, r) // 29 output tokens
	})
	rec := httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, body), next))
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	var sent struct {
		MaxTokens int64 `json:"max_tokens"`
	}
	require.NoError(t, json.Unmarshal(fwd, &sent))
	assert.Equal(t, int64(10), sent.MaxTokens)
	waitCharges(t, fs, 1)
	warned := logs.FilterMessageSnippet("more output than the forwarded max_tokens").All()
	if assert.Len(t, warned, 1) {
		assert.Equal(t, int64(10), warned[0].ContextMap()["max_tokens"])
	}

	// A pool that cannot pay one output token after the input bound: 402,
	// nothing forwarded, the hold given back.
	fs.balance = terms.Input
	fwd = nil
	rec = httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, body), next))
	assert.Equal(t, http.StatusPaymentRequired, rec.Code, rec.Body.String())
	assert.Nil(t, fwd)
}
