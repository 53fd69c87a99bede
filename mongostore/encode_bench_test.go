package mongostore

import (
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func benchHold() (billing.HoldRequest, []string, []billing.Nano) {
	plan, _ := billing.ParseCreditPlan([]string{"creditsNew"})
	now := time.Now()
	req := billing.HoldRequest{
		RequestID: "7f0c6c5e-3b1a-4f8e-9d2a-6a1b2c3d4e5f", User: "user-42", Plan: plan, Want: 14_705_340, Min: 90_000,
		Input: 90_000, Owner: "0b7c1f0e-9f5a-4b7d-8a31-2f7c9d1e6a40/5f2a9c1d7e3b", At: now, Expires: now.Add(15 * time.Minute),
		LogID: billing.NewLogID(now), Model: "claude-sonnet-4-5-20250929", KeyID: "sk-troll...8c70",
	}
	return req, plan.Fields(), []billing.Nano{req.Want}
}

// BenchmarkReserveUpdate measures building and encoding the update of the
// fast hold path, what the request path pays before the database round trip.
func BenchmarkReserveUpdate(b *testing.B) {
	s := New(nil)
	req, fields, taken := benchHold()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := bson.Marshal(s.reserveUpdate(req, fields, taken, nil)); err != nil {
			b.Fatal(err)
		}
	}
}
