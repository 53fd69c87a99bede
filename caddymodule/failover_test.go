package caddymodule

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// failingUpstream answers like the provider, but fails for the keys in bad
// with the given status and a real-shaped error body.
func failingUpstream(bad map[string]int, good caddyhttp.Handler) caddyhttp.Handler {
	return caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		status, ok := bad[key]
		if !ok {
			return good.ServeHTTP(w, r)
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Upstream-Secret-Header", "from-the-failed-attempt")
		if status == http.StatusTooManyRequests {
			w.Header().Set("Retry-After", "7")
		}
		w.WriteHeader(status)
		_, _ = w.Write([]byte(`{"type":"error","error":{"type":"rate_limit_error","message":"key ` + key + ` failed"}}`))
		return nil
	})
}

func withKeys(h *Handler, keys ...string) {
	var ks []billing.UpstreamKey
	for _, k := range keys {
		ks = append(ks, billing.UpstreamKey{ID: "id-" + k, APIKey: k, Status: "healthy"})
	}
	h.eng.set(func(s *settings) { s.static = true }) // no database refresh in these tests
	h.eng.keys.Set(ks)
}

func TestFailoverRetriesOnAnotherKeyBeforeAnyByte(t *testing.T) {
	for _, sse := range []bool{false, true} {
		h, fs := newTestHandler(t)
		withKeys(h, "bad-401", "busy-429", "good")
		next := failingUpstream(map[string]int{"bad-401": 401, "busy-429": 429}, upstream(sse, 5))
		// Every rotation start: whichever key comes first, the client gets
		// the good key's answer and nothing of the failed attempts.
		for i := 0; i < 3; i++ {
			rec := httptest.NewRecorder()
			require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, bodyFor(sse)), next))
			require.Equal(t, 200, rec.Code, "client saw body %q", rec.Body)
			require.Empty(t, rec.Header().Get("X-Upstream-Secret-Header"), "client saw a failed attempt's header")
			require.NotContains(t, rec.Body.String(), "failed", "client saw a failed attempt's body")
		}
		waitLogged(t, fs, 3)
		fs.mu.Lock()
		for _, l := range fs.logs {
			if !assert.NotEmpty(t, l.Attempts, "log %s", l.TrollKeyID) {
				continue
			}
			last := l.Attempts[len(l.Attempts)-1]
			assert.Equal(t, "openhands:id-good", l.TrollKeyID, "log attempts %+v", l.Attempts)
			assert.Equal(t, "id-good", last.KeyID, "log %s attempts %+v", l.TrollKeyID, l.Attempts)
			assert.Equal(t, "ok", last.Reason, "log %s attempts %+v", l.TrollKeyID, l.Attempts)
			assert.LessOrEqual(t, len(l.Attempts), 3, "log %s attempts %+v", l.TrollKeyID, l.Attempts)
		}
		fs.mu.Unlock()
		assert.EqualValues(t, 3, fs.charges.Load(), "charges for 3 requests")
		// The failed keys are out of the pool: 401 for good once its probe
		// also got 401, 429 for its Retry-After.
		waitKeyStatus(t, h, "id-bad-401", billing.KeyNeedRefresh)
		now := time.Now()
		for i := 0; i < 10; i++ {
			k, err := h.eng.keys.Pick(now)
			require.NoError(t, err, "pick after failures")
			require.Equal(t, "good", k.APIKey, "pick after failures")
		}
		k, _ := h.eng.keys.Pick(now.Add(8 * time.Second))
		assert.NotEqual(t, "bad-401", k.APIKey, "a 401 key came back by itself")
	}
}

func TestFailoverLimits(t *testing.T) {
	t.Run("no key left: legacy 503", func(t *testing.T) {
		h, fs := newTestHandler(t)
		withKeys(h, "a", "b")
		next := failingUpstream(map[string]int{"a": 429, "b": 429}, upstream(false, 0))
		rec := httptest.NewRecorder()
		_ = h.ServeHTTP(rec, newRequest(t, rec, fs.key, benchBody), next)
		var body struct {
			Type  string `json:"type"`
			Error struct{ Type, Message string }
		}
		require.Equal(t, 503, rec.Code, "body %s", rec.Body)
		require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &body), "body %s", rec.Body)
		assert.Equal(t, "api_error", body.Error.Type)
		assert.Equal(t, "Service temporarily unavailable. Please try again later.", body.Error.Message)
	})
	t.Run("attempts exhausted: the last answer is passed on, unbilled", func(t *testing.T) {
		h, fs := newTestHandler(t)
		withKeys(h, "a", "b", "c", "d")
		next := failingUpstream(map[string]int{"a": 500, "b": 500, "c": 500, "d": 500}, upstream(false, 0))
		rec := httptest.NewRecorder()
		_ = h.ServeHTTP(rec, newRequest(t, rec, fs.key, benchBody), next)
		require.Equal(t, 500, rec.Code, "body %s", rec.Body)
		require.True(t, json.Valid(rec.Body.Bytes()), "body %s", rec.Body)
		time.Sleep(50 * time.Millisecond)
		assert.Zero(t, fs.charges.Load(), "a failed request was charged")
		// Three attempts (the default), so one key was never tried.
		now := time.Now()
		k, err := h.eng.keys.Pick(now)
		assert.NoError(t, err, "the untried key is not usable: %v", k)
	})
	t.Run("a client error is not retried", func(t *testing.T) {
		h, fs := newTestHandler(t)
		withKeys(h, "a", "b")
		calls := 0
		next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			calls++
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(400)
			_, _ = w.Write([]byte(`{"type":"error","error":{"type":"invalid_request_error","message":"messages: field required"}}`))
			return nil
		})
		rec := httptest.NewRecorder()
		_ = h.ServeHTTP(rec, newRequest(t, rec, fs.key, benchBody), next)
		assert.Equal(t, 400, rec.Code, "body %s", rec.Body)
		assert.Equal(t, 1, calls, "upstream calls")
		assert.Contains(t, rec.Body.String(), "field required")
	})
}

func TestJudgeResponse(t *testing.T) {
	p := billing.KeyPolicy{RateLimitCooldown: time.Minute, ErrorCooldown: 10 * time.Second}
	now := time.Now()
	for _, tc := range []struct {
		status     int
		body       string
		retryAfter string
		want       billing.KeyVerdict
	}{
		{401, "", "", billing.KeyVerdict{Retry: true, Status: "error", Cooldown: 10 * time.Second, Reason: "unauthorized", Probe: true}},
		{402, "", "", billing.KeyVerdict{Retry: true, Status: "exhausted", Cooldown: 24 * time.Hour, Reason: "payment_required", Persist: true}},
		{403, "", "", billing.KeyVerdict{Retry: true, Status: "error", Cooldown: 10 * time.Second, Reason: "forbidden", Probe: true}},
		{400, `{"error":{"message":"Budget has been exceeded! Current cost: 10.01","type":"budget_exceeded"}}`, "", billing.KeyVerdict{Retry: true, Status: "exhausted", Cooldown: 24 * time.Hour, Reason: "budget_exceeded", Persist: true}},
		{400, `{"error":{"message":"prompt is too long"}}`, "", billing.KeyVerdict{}},
		{429, "", "", billing.KeyVerdict{Retry: true, Status: "rate_limited", Cooldown: time.Minute, Reason: "rate_limited", Persist: true}},
		{429, "", "12", billing.KeyVerdict{Retry: true, Status: "rate_limited", Cooldown: 12 * time.Second, Reason: "rate_limited", Persist: true}},
		{429, "", "999999", billing.KeyVerdict{Retry: true, Status: "rate_limited", Cooldown: time.Hour, Reason: "rate_limited", Persist: true}},
		{529, "", "", billing.KeyVerdict{Retry: true, Status: "rate_limited", Cooldown: time.Minute, Reason: "overloaded", Persist: true}},
		{503, "", "", billing.KeyVerdict{Retry: true, Status: "error", Cooldown: 10 * time.Second, Reason: "upstream_503"}},
		{404, "", "", billing.KeyVerdict{}},
		{499, "", "", billing.KeyVerdict{}},
	} {
		assert.Equal(t, tc.want, p.JudgeResponse(tc.status, []byte(tc.body), tc.retryAfter, now), "%d %q", tc.status, tc.body)
	}
}

func waitKeyStatus(t *testing.T, h *Handler, id, status string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, k := range h.eng.keys.Snapshot() {
			if k.ID == id && k.Status == status {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("key %s never got status %s: %+v", id, status, h.eng.keys.Snapshot())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A 401 to a client's request only suspects the key: the gateway's own
// probe (GET /v1/models with the key alone) decides. A key that passes it
// is back in service at once; one that fails it is demoted for good.
func TestKeyDemotedOnlyByItsProbe(t *testing.T) {
	for _, tc := range []struct {
		name        string
		probeStatus int
		want        string
	}{
		{"probe passes", 200, billing.KeyHealthy},
		{"probe refused", 401, billing.KeyNeedRefresh},
		{"probe forbidden", 403, billing.KeyNeedRefresh},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, fs := newTestHandler(t)
			withKeys(h, "sus", "good")
			good := upstream(false, 0)
			var probes atomic.Int32
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
				if r.Method == http.MethodGet && r.URL.Path == "/v1/models" {
					probes.Add(1)
					assert.Equal(t, "sus", key)
					w.WriteHeader(tc.probeStatus)
					return nil
				}
				if key == "sus" {
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(401)
					_, _ = w.Write([]byte(`{"error":{"message":"Authentication Error","type":"auth_error","code":"401"}}`))
					return nil
				}
				return good.ServeHTTP(w, r)
			})
			rec := httptest.NewRecorder() // the first pick is "sus"
			require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, jsonBody), next))
			require.Equal(t, 200, rec.Code, rec.Body.String())
			waitKeyStatus(t, h, "id-sus", tc.want)
			assert.EqualValues(t, 1, probes.Load())
		})
	}
}

// However many requests a key refuses, one probe of it runs at a time.
func TestOneProbePerKeyAtATime(t *testing.T) {
	h, fs := newTestHandler(t)
	withKeys(h, "sus") // alone: used again in its error cooldown
	var probes atomic.Int32
	release := make(chan struct{})
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if r.Method == http.MethodGet {
			probes.Add(1)
			<-release
			w.WriteHeader(200)
			return nil
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(401)
		_, _ = w.Write([]byte(`{"error":{"message":"Authentication Error","type":"auth_error","code":"401"}}`))
		return nil
	})
	for i := 0; i < 3; i++ {
		rec := httptest.NewRecorder()
		require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, benchBody), next))
		assert.True(t, json.Valid(rec.Body.Bytes()))
	}
	time.Sleep(50 * time.Millisecond)
	assert.EqualValues(t, 1, probes.Load())
	close(release)
	waitKeyStatus(t, h, "id-sus", billing.KeyHealthy)
}

func TestJudgeProbe(t *testing.T) {
	for status, want := range map[int]billing.ProbeOutcome{200: billing.ProbeKeyGood, 401: billing.ProbeKeyBad,
		403: billing.ProbeKeyBad, 404: billing.ProbeInconclusive, 429: billing.ProbeInconclusive, 500: billing.ProbeInconclusive, 0: billing.ProbeInconclusive} {
		got, v := billing.JudgeProbe(status)
		assert.Equal(t, want, got, status)
		assert.Equal(t, want == billing.ProbeKeyBad, v.Persist && v.Status == billing.KeyNeedRefresh, status)
	}
}
