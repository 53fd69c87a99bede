package mongostore

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// TestLedgerConformance runs the semantic table the in-memory ledger of
// the simulations is held to (package billing/ledgertest) against the
// MongoDB store, with each isolation, so that the two keep the same
// semantics.
func TestLedgerConformance(t *testing.T) {
	s, db := open(t)
	for _, iso := range []struct {
		name string
		iso  mongostore.Isolation
	}{{"process", mongostore.IsolationProcess}, {"shared", mongostore.IsolationShared}, {"atomic", mongostore.IsolationAtomic}} {
		t.Run(iso.name, func(t *testing.T) {
			s.SetIsolation(iso.iso)
			conformance(t, s, db)
		})
	}
}

func conformance(t *testing.T, s *mongostore.Store, db *mongo.Database) {
	ledgertest.Conformance(t, ledgertest.Subject{
		Store: s,
		AddUser: func(t *testing.T, id string, b billing.Balances) {
			require.NoError(t, seed.Insert(context.Background(), db, seed.User{ID: id, Active: true, Migration: true,
				CreditsNew: b.CreditsNew.USD(), Credits: b.Credits.USD(), RefCredits: b.RefCredits.USD()}))
		},
		LogRows: func(t *testing.T, id billing.LogID) int {
			n, err := db.Collection("request_logs").CountDocuments(context.Background(), bson.D{{Key: "_id", Value: bson.ObjectID(id)}})
			require.NoError(t, err)
			return int(n)
		},
	})
}
