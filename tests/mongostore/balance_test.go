package mongostore

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// The key lookup carries the user's balances, so the pre-check needs no
// round trip of its own; Balances reads them afresh. A field of another
// type reads as 0, never as an error.
func TestAuthenticateCarriesBalances(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db,
		seed.User{ID: "rich", APIKey: "sk-trollllm-rich", Role: "user", Active: true, Migration: true, CreditsNew: 1.5, Credits: 2.25, RefCredits: 0.000000001},
		seed.UserKey{Key: "sk-troll-rich", User: "rich", Active: true},
	))
	_, err := db.Collection("usersNew").InsertOne(ctx, bson.D{{Key: "_id", Value: "odd"}, {Key: "apiKey", Value: "sk-trollllm-odd"},
		{Key: "role", Value: "user"}, {Key: "isActive", Value: true}, {Key: "migration", Value: true},
		{Key: "creditsNew", Value: int32(3)}, {Key: "credits", Value: "7"}, {Key: "refCredits", Value: nil}})
	require.NoError(t, err)

	want := billing.Balances{CreditsNew: 1_500_000_000, Credits: 2_250_000_000, RefCredits: 1}
	for _, key := range []string{"sk-trollllm-rich", "sk-troll-rich"} {
		p, err := s.Authenticate(ctx, key)
		require.NoError(t, err, key)
		assert.Equal(t, want, p.Balances, key)
	}
	p, err := s.Authenticate(ctx, "sk-trollllm-odd")
	require.NoError(t, err)
	assert.Equal(t, billing.Balances{CreditsNew: 3_000_000_000}, p.Balances)

	_, err = db.Collection("usersNew").UpdateOne(ctx, bson.D{{Key: "_id", Value: "rich"}}, bson.D{{Key: "$set", Value: bson.D{{Key: "creditsNew", Value: 0.0}}}})
	require.NoError(t, err)
	b, err := s.Balances(ctx, "rich")
	require.NoError(t, err)
	assert.Equal(t, billing.Balances{Credits: 2_250_000_000, RefCredits: 1}, b)

	_, err = s.Balances(ctx, "nobody")
	assert.ErrorIs(t, err, billing.ErrUserNotFound)
}
