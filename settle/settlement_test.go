package settle

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// A settlement is journaled to disk; the client's key (the user_keys _id
// its counters need) must not be in what is written.
func TestJournaledSettlementHasNoKey(t *testing.T) {
	key := "sk-trollllm-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	plan, err := billing.ParseCreditPlan([]string{"creditsNew"})
	require.NoError(t, err)
	s := &Settlement{
		Hold:     billing.Hold{RequestID: "r1", User: "u1", Plan: plan, Taken: []billing.Nano{10}, KeyID: billing.MaskKey(key)},
		Cost:     7,
		Bill:     true,
		Log:      billing.RequestLog{UserID: "u1", UserKeyID: billing.MaskKey(key), RequestID: "r1"},
		Counters: billing.UsageCounters{UserKey: key, UpstreamKeyID: "k1", WeightedTokens: 3},
	}
	b, err := json.Marshal(s)
	require.NoError(t, err)
	assert.NotContains(t, string(b), key)
	assert.NotContains(t, string(b), key[12:40])
	var back Settlement
	require.NoError(t, json.Unmarshal(b, &back))
	assert.Equal(t, billing.Nano(7), back.Cost)
	assert.Equal(t, "creditsNew", back.Hold.Plan.String())
	assert.Equal(t, "k1", back.Counters.UpstreamKeyID)
}

// usageStore records every AddUsage and fails the first fail of them; any
// other Store method is not expected (the embedded nil interface panics).
type usageStore struct {
	Store
	fail  int
	tries []usageTry
}

type usageTry struct {
	batch   billing.UsageBatch
	written bool
}

func (u *usageStore) AddUsage(_ context.Context, b billing.UsageBatch) error {
	ok := u.fail <= 0
	u.fail--
	u.tries = append(u.tries, usageTry{b, ok})
	if !ok {
		return errors.New("connection reset by peer")
	}
	return nil
}

// A usage counters batch whose write failed is sent again, unchanged (same
// Seq: the store can tell it already has it), before the counters queued
// after it, which go in a batch of their own.
func TestUsageBatchSentAgainUntilWritten(t *testing.T) {
	us := &usageStore{fail: 1}
	st := New(Config{Store: us, Owner: "inst/run1"})
	st.addUsage([]billing.UsageCounters{{UpstreamKeyID: "k1", RawTokens: 10}})
	require.False(t, st.FlushUsage(), "a failed write reported as written")
	st.addUsage([]billing.UsageCounters{{UpstreamKeyID: "k1", RawTokens: 5}})
	require.Equal(t, 2, st.usage.pending())
	require.True(t, st.FlushUsage(), "flush failed with the database back")

	require.Len(t, us.tries, 3)
	first, again, next := us.tries[0], us.tries[1], us.tries[2]
	assert.False(t, first.written)
	assert.True(t, again.written)
	assert.True(t, next.written)
	assert.Equal(t, first.batch, again.batch, "the retry is the same batch")
	assert.Equal(t, "inst", first.batch.Writer)
	assert.Equal(t, int64(10), first.batch.Counters[0].RawTokens)
	assert.NotEqual(t, first.batch.Seq, next.batch.Seq)
	assert.Equal(t, first.batch.Writer, next.batch.Writer)
	require.Len(t, next.batch.Counters, 1)
	assert.Equal(t, int64(5), next.batch.Counters[0].RawTokens)
	assert.Zero(t, st.usage.pending())
	assert.False(t, st.usage.stuck.Load())
}
