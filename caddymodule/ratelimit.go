package caddymodule

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"golang.org/x/time/rate"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// RateLimits are the request rate limits of one Caddy instance, shared by
// all its sites: per client key, by the kind of key, after authentication
// and before the body is read, and optionally per client IP before
// authentication (what nginx's limit_req did).
//
// Each limit is a token bucket (golang.org/x/time/rate) that holds Events
// tokens and refills Events per Window: a client may send Events requests at
// once, and Events per Window on average. The legacy proxy used a sliding
// window of the same size; a bucket gives the same long-run rate, is exact
// about when the next request is allowed (Retry-After) and costs no memory
// per request.
type RateLimits struct {
	// User limits sk-troll* user keys. Default: 2000 per minute.
	User *RateLimit `json:"user,omitempty"`
	// Friend limits sk-trollllm-friend-* keys. Default: 60 per minute.
	Friend *RateLimit `json:"friend,omitempty"`
	// Other limits any other key. Default: 300 per minute.
	Other *RateLimit `json:"other,omitempty"`
	// IP limits each client IP (Caddy's client_ip, which honours
	// trusted_proxies) before its key is read. Default: off.
	IP *RateLimit `json:"ip,omitempty"`
}

// RateLimit is one limit: Events requests per Window. Events 0 turns it off.
type RateLimit struct {
	Events int            `json:"events"`
	Window caddy.Duration `json:"window,omitempty"`
}

// The legacy limits.
var (
	defaultUserLimit   = RateLimit{Events: 2000, Window: caddy.Duration(time.Minute)}
	defaultFriendLimit = RateLimit{Events: 60, Window: caddy.Duration(time.Minute)}
	defaultOtherLimit  = RateLimit{Events: 300, Window: caddy.Duration(time.Minute)}
)

// Validate checks every limit.
func (rl *RateLimits) Validate() error {
	for _, l := range []struct {
		name string
		v    *RateLimit
	}{{"user", rl.User}, {"friend", rl.Friend}, {"other", rl.Other}, {"ip", rl.IP}} {
		if l.v == nil {
			continue
		}
		if l.v.Events < 0 {
			return fmt.Errorf("rate_limit %s: events must not be negative, got %d", l.name, l.v.Events)
		}
		if l.v.Events > 0 && l.v.Window <= 0 {
			return fmt.Errorf("rate_limit %s: the window must be positive, got %s", l.name, shortDuration(time.Duration(l.v.Window)))
		}
	}
	return nil
}

// limitOrDefault is l, or def when l is not configured.
func limitOrDefault(l *RateLimit, def RateLimit) RateLimit {
	if l == nil {
		return def
	}
	return *l
}

// Key kinds, the rate_limited_total label.
const (
	kindUser   = "user"
	kindFriend = "friend"
	kindOther  = "other"
	kindIP     = "ip"
)

// keyKind is the legacy classification of a client key by its prefix.
func keyKind(key string) string {
	switch {
	case strings.HasPrefix(key, billing.FriendKeyPrefix):
		return kindFriend
	case strings.HasPrefix(key, "sk-troll"):
		return kindUser
	}
	return kindOther
}

// limiters is the pooled state of the rate limits: one bucket per client key
// or IP. It outlives config reloads (a reload neither resets a client's
// budget nor lets it start over).
type limiters struct {
	mu      sync.Mutex
	buckets map[string]*rate.Limiter // by kind + "\x00" + key or IP
	stop    chan struct{}
}

func newLimiters() *limiters {
	l := &limiters{buckets: make(map[string]*rate.Limiter), stop: make(chan struct{})}
	go l.sweepLoop()
	return l
}

// Destruct stops the sweeper when the last config using the limits goes.
func (l *limiters) Destruct() error {
	close(l.stop)
	return nil
}

// maxBuckets bounds the buckets kept; past it, full (idle) buckets are
// dropped first, which changes nothing for their clients.
const maxBuckets = 1 << 20

// take spends one request of the bucket of id under limit at now. It returns
// whether the request may go, what is left, and how long until the next
// request is allowed (when refused) and until the bucket is full again.
func (l *limiters) take(id string, limit RateLimit, now time.Time) (ok bool, remaining int, retry, reset time.Duration) {
	every := rate.Limit(float64(limit.Events) / time.Duration(limit.Window).Seconds())
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[id]
	if b == nil {
		if len(l.buckets) >= maxBuckets {
			l.sweepLocked(now)
		}
		b = rate.NewLimiter(every, limit.Events)
		l.buckets[id] = b
	} else if b.Limit() != every || b.Burst() != limit.Events {
		b.SetLimitAt(now, every) // a reload changed the limit
		b.SetBurstAt(now, limit.Events)
	}
	ok = b.AllowN(now, 1)
	tokens := b.TokensAt(now)
	if !ok {
		retry = time.Duration(math.Ceil((1 - tokens) / float64(every) * float64(time.Second)))
	}
	reset = time.Duration(math.Ceil((float64(limit.Events) - tokens) / float64(every) * float64(time.Second)))
	return ok, int(math.Max(0, math.Floor(tokens))), retry, reset
}

// sweep drops the buckets that are full again: a new bucket would be the same.
func (l *limiters) sweep(now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweepLocked(now)
}

func (l *limiters) sweepLocked(now time.Time) {
	for id, b := range l.buckets {
		if b.TokensAt(now) >= float64(b.Burst()) {
			delete(l.buckets, id)
		}
	}
}

// rateLimitPool holds the process's limiters across config reloads.
var rateLimitPool = caddy.NewUsagePool()

const rateLimitPoolKey = "llm_billing:rate_limits"

func acquireLimiters() (*limiters, error) {
	v, _, err := rateLimitPool.LoadOrNew(rateLimitPoolKey, func() (caddy.Destructor, error) {
		return newLimiters(), nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*limiters), nil
}

// rateLimiter is one config's view of the limits over the pooled buckets.
type rateLimiter struct {
	state                   *limiters
	user, friend, other, ip RateLimit
}

// allowIP applies the per-IP limit, before authentication. It answers the
// 429 itself and returns false when the request must stop.
func (rl *rateLimiter) allowIP(w http.ResponseWriter, r *http.Request, api billing.API) bool {
	if rl == nil || rl.ip.Events == 0 {
		return true
	}
	ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	return rl.allow(w, api, kindIP, ip, rl.ip)
}

// allowKey applies the limit of the key's kind, after authentication, and
// sets the X-RateLimit headers every later answer carries.
func (rl *rateLimiter) allowKey(w http.ResponseWriter, api billing.API, key string) bool {
	if rl == nil {
		return true
	}
	kind, limit := keyKind(key), rl.other
	switch kind {
	case kindUser:
		limit = rl.user
	case kindFriend:
		limit = rl.friend
	}
	if limit.Events == 0 {
		return true
	}
	return rl.allow(w, api, kind, key, limit)
}

func (rl *rateLimiter) allow(w http.ResponseWriter, api billing.API, kind, id string, limit RateLimit) bool {
	now := time.Now()
	ok, remaining, retry, reset := rl.state.take(kind+"\x00"+id, limit, now)
	h := w.Header()
	h.Set("X-RateLimit-Limit", strconv.Itoa(limit.Events))
	h.Set("X-RateLimit-Remaining", strconv.Itoa(remaining))
	h.Set("X-RateLimit-Reset", strconv.FormatInt(now.Add(reset).Unix(), 10))
	if ok {
		return true
	}
	secs := int64(math.Ceil(retry.Seconds()))
	if secs < 1 {
		secs = 1
	}
	h.Set("Retry-After", strconv.FormatInt(secs, 10))
	rateLimited.WithLabelValues(kind).Inc()
	errRateLimited(secs).write(w, api)
	return false
}

// sweepLoop drops idle buckets now and then, for as long as the pool lives.
func (l *limiters) sweepLoop() {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case now := <-t.C:
			l.sweep(now)
		}
	}
}
