package caddymodule

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// A settlement is journaled to disk; the client's key (the user_keys _id
// its counters need) must not be in what is written.
func TestJournaledSettlementHasNoKey(t *testing.T) {
	key := "sk-trollllm-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	plan, _ := billing.ParseCreditPlan([]string{"creditsNew"})
	s := &settlement{
		Hold:     billing.Hold{RequestID: "r1", User: "u1", Plan: plan, Taken: []billing.Nano{10}, KeyID: billing.MaskKey(key)},
		Cost:     7,
		Bill:     true,
		Log:      billing.RequestLog{UserID: "u1", UserKeyID: billing.MaskKey(key), RequestID: "r1"},
		Counters: billing.UsageCounters{UserKey: key, UpstreamKeyID: "k1", WeightedTokens: 3},
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte(key)) || bytes.Contains(b, []byte(key[12:40])) {
		t.Fatalf("the journaled settlement carries the client's key: %s", b)
	}
	var back settlement
	if err := json.Unmarshal(b, &back); err != nil || back.Cost != 7 || back.Hold.Plan.String() != "creditsNew" || back.Counters.UpstreamKeyID != "k1" {
		t.Fatalf("round trip: %+v, %v", back, err)
	}
}
