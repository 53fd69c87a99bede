package caddymodule

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/time/rate"
)

func TestLimiterTake(t *testing.T) {
	l := &limiters{buckets: map[string]*rate.Limiter{}}
	limit := RateLimit{Events: 3, Window: caddy.Duration(time.Minute)}
	now := time.Unix(1_700_000_000, 0)
	for i := 0; i < 3; i++ {
		ok, remaining, retry, reset := l.take("k", limit, now)
		require.True(t, ok)
		assert.Equal(t, 2-i, remaining)
		assert.Zero(t, retry)
		assert.Equal(t, time.Duration(i+1)*20*time.Second, reset)
	}
	ok, remaining, retry, _ := l.take("k", limit, now.Add(5*time.Second))
	assert.False(t, ok)
	assert.Zero(t, remaining)
	assert.Equal(t, 15*time.Second, retry, "one request comes back every 20s")

	ok, _, _, _ = l.take("k", limit, now.Add(20*time.Second))
	assert.True(t, ok, "a request is allowed once its token is back")
	ok, _, _, _ = l.take("other", limit, now)
	assert.True(t, ok, "each key has its own bucket")

	// A reload that changes the limit applies to the existing bucket.
	ok, remaining, _, _ = l.take("k", RateLimit{Events: 100, Window: caddy.Duration(time.Minute)}, now.Add(40*time.Second))
	assert.True(t, ok)
	assert.Less(t, remaining, 100, "a reload does not refill the bucket")

	// Full buckets are dropped by the sweep, busy ones kept.
	l.sweep(now.Add(41 * time.Second))
	assert.Contains(t, l.buckets, "k")
	l.sweep(now.Add(time.Hour))
	assert.Empty(t, l.buckets)
}

func TestKeyKind(t *testing.T) {
	assert.Equal(t, kindFriend, keyKind("sk-trollllm-friend-ab"))
	assert.Equal(t, kindUser, keyKind("sk-trollllm-abc"))
	assert.Equal(t, kindUser, keyKind("sk-troll-abc"))
	assert.Equal(t, kindOther, keyKind("sk-ant-abc"))
}

func TestRateLimitCaddyfile(t *testing.T) {
	var a App
	d := caddyfile.NewTestDispenser(`llm_billing {
		rate_limit {
			user 100
			friend 10 30s
			ip 0
		}
	}`)
	require.NoError(t, a.UnmarshalCaddyfile(d))
	require.NotNil(t, a.RateLimit)
	assert.Equal(t, RateLimit{Events: 100, Window: caddy.Duration(time.Minute)}, *a.RateLimit.User)
	assert.Equal(t, RateLimit{Events: 10, Window: caddy.Duration(30 * time.Second)}, *a.RateLimit.Friend)
	assert.Nil(t, a.RateLimit.Other)
	assert.Equal(t, 0, a.RateLimit.IP.Events)
	require.NoError(t, a.RateLimit.Validate())

	for _, bad := range []string{
		"rate_limit {\n robots 1 1m\n}",
		"rate_limit {\n user many\n}",
		"rate_limit {\n user 1 1m 2\n}",
		"rate_limit {\n user 1 soon\n}",
		"rate_limit {\n user 1\n user 2\n}",
	} {
		var a App
		err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser("llm_billing {\n" + bad + "\n}"))
		assert.Error(t, err, bad)
	}
	assert.Error(t, (&RateLimits{User: &RateLimit{Events: -1}}).Validate())
	assert.Error(t, (&RateLimits{User: &RateLimit{Events: 5}}).Validate(), "a limit needs a window")
}
