package seed_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

func database(t *testing.T) (*mongo.Database, context.Context) {
	t.Helper()
	db := testdb.StartForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	c, err := db.Connect(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	return c.Database("fproxy"), ctx
}

func raw(t *testing.T, ctx context.Context, db *mongo.Database, coll string, filter bson.D) bson.Raw {
	t.Helper()
	var r bson.Raw
	require.NoError(t, db.Collection(coll).FindOne(ctx, filter).Decode(&r), "find in %s", coll)
	return r
}

// wantField checks the BSON type and value of one field.
func wantField(t *testing.T, doc bson.Raw, key string, typ bson.Type, value any) {
	t.Helper()
	v, err := doc.LookupErr(key)
	if !assert.NoError(t, err, "%s: missing", key) || !assert.Equal(t, typ, v.Type, "%s: type", key) {
		return
	}
	var got any
	switch typ {
	case bson.TypeString:
		got = v.StringValue()
	case bson.TypeBoolean:
		got = v.Boolean()
	case bson.TypeInt32:
		got = v.Int32()
	case bson.TypeDouble:
		got = v.Double()
	case bson.TypeNull, bson.TypeDateTime:
		return
	}
	assert.Equal(t, value, got, key)
}

func wantAbsent(t *testing.T, doc bson.Raw, key string) {
	t.Helper()
	_, err := doc.LookupErr(key)
	assert.Error(t, err, "%s: present, want absent", key)
}

func TestDemoDocuments(t *testing.T) {
	db, ctx := database(t)
	require.NoError(t, seed.SeedDemo(ctx, db))

	alice := raw(t, ctx, db, seed.UsersCollection, bson.D{{Key: "apiKey", Value: seed.DemoUserKey}})
	wantField(t, alice, "_id", bson.TypeString, seed.DemoUser)
	wantField(t, alice, "isActive", bson.TypeBoolean, true)
	wantField(t, alice, "role", bson.TypeString, "user")
	wantField(t, alice, "migration", bson.TypeBoolean, true)
	wantField(t, alice, "creditsNew", bson.TypeInt32, int32(10))
	wantField(t, alice, "credits", bson.TypeInt32, int32(5))
	wantField(t, alice, "refCredits", bson.TypeInt32, int32(2))
	for _, k := range []string{"creditsUsed", "creditsNewUsed", "tokensUserNew", "totalInputTokens", "totalOutputTokens"} {
		wantField(t, alice, k, bson.TypeInt32, int32(0))
	}
	wantField(t, alice, "expiresAt", bson.TypeNull, nil)
	wantField(t, alice, "createdAt", bson.TypeDateTime, nil)

	bob := raw(t, ctx, db, seed.UsersCollection, bson.D{{Key: "_id", Value: seed.DemoAdminKeyUser}})
	wantAbsent(t, bob, "apiKey")
	wantField(t, bob, "creditsNew", bson.TypeInt32, int32(3))

	key := raw(t, ctx, db, seed.UserKeysCollection, bson.D{{Key: "_id", Value: seed.DemoAdminKey}})
	wantField(t, key, "name", bson.TypeString, seed.DemoAdminKeyUser)
	wantField(t, key, "isActive", bson.TypeBoolean, true)
	wantField(t, key, "tokensUsed", bson.TypeInt32, int32(0))
	wantField(t, key, "requestsCount", bson.TypeInt32, int32(0))
	wantField(t, key, "createdAt", bson.TypeDateTime, nil)
	wantAbsent(t, key, "expiresAt")

	up := raw(t, ctx, db, seed.UpstreamKeyCollection, bson.D{{Key: "_id", Value: seed.DemoUpstreamKeyID}})
	wantField(t, up, "apiKey", bson.TypeString, seed.DemoUpstreamAPIKey)
	wantField(t, up, "status", bson.TypeString, "healthy")
	wantField(t, up, "tokensUsed", bson.TypeInt32, int32(0))

	bind := raw(t, ctx, db, seed.BindingsCollection, bson.D{{Key: "openhandsKeyId", Value: seed.DemoUpstreamKeyID}})
	wantField(t, bind, "isActive", bson.TypeBoolean, true)
	wantField(t, bind, "priority", bson.TypeInt32, int32(1))
	wantField(t, bind, "proxyId", bson.TypeString, "default")
	wantField(t, bind, "updatedAt", bson.TypeDateTime, nil)

	// A double cost against an int32 balance: the $gte filter compares
	// across number types and $inc turns the field into a double, as on
	// MongoDB.
	res, err := db.Collection(seed.UsersCollection).UpdateOne(ctx,
		bson.D{{Key: "_id", Value: seed.DemoUser}, {Key: "creditsNew", Value: bson.D{{Key: "$gte", Value: 0.25}}}},
		bson.D{{Key: "$inc", Value: bson.D{{Key: "creditsNew", Value: -0.25}, {Key: "creditsNewUsed", Value: 0.25}}}})
	require.NoError(t, err, "conditional $inc on an int32 balance")
	require.Equal(t, int64(1), res.ModifiedCount, "conditional $inc on an int32 balance")
	alice = raw(t, ctx, db, seed.UsersCollection, bson.D{{Key: "_id", Value: seed.DemoUser}})
	wantField(t, alice, "creditsNew", bson.TypeDouble, 9.75)
	wantField(t, alice, "creditsNewUsed", bson.TypeDouble, 0.25)
	b, err := seed.Balances(ctx, db, seed.DemoUser)
	if assert.NoError(t, err, "balances") {
		assert.Equal(t, 9.75, b["creditsNew"], "balances %v", b)
		assert.Equal(t, 2.0, b["refCredits"], "balances %v", b)
	}

	// Seeding twice collides on _id.
	err = seed.SeedDemo(ctx, db)
	assert.True(t, mongo.IsDuplicateKeyError(err), "second SeedDemo: %v, want a duplicate key error", err)
}

func TestDemoKeyFormats(t *testing.T) {
	users, keys, upstream := seed.Demo()
	require.Len(t, users, 2, "demo users")
	require.Len(t, keys, 1, "demo user keys")
	require.Len(t, upstream, 1, "demo upstream keys")
	assert.Regexp(t, `^sk-trollllm-[0-9a-f]{64}$`, users[0].APIKey, "personal key is not sk-trollllm-<64 hex>")
	assert.Regexp(t, `^sk-troll-[A-Za-z0-9]{24}$`, keys[0].Key, "admin key is not sk-troll-<24 chars>")
	assert.Equal(t, users[1].ID, keys[0].User, "user_keys key does not belong to the second user")
	assert.Empty(t, users[1].APIKey, "the second user has a personal key")
	for i, want := range [][3]float64{{10, 5, 2}, {3, 1, 1}} {
		u := users[i]
		assert.EqualValues(t, want, [3]float64{u.CreditsNew, u.Credits, u.RefCredits}, "demo balances of user %d changed (creditsNew, credits, refCredits)", i)
	}
}

func TestUserVariantsAndBalances(t *testing.T) {
	db, ctx := database(t)
	exp := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	err := seed.Insert(ctx, db,
		seed.User{ID: "old", Role: "admin", Active: false, Credits: 2.5, CreditsNew: 0.125, ExpiresAt: &exp, OmitRefCredits: true},
		&seed.UserKey{Key: "sk-troll-expiring", User: "old", Active: false, ExpiresAt: &exp},
	)
	require.NoError(t, err)
	old := raw(t, ctx, db, seed.UsersCollection, bson.D{{Key: "_id", Value: "old"}})
	wantAbsent(t, old, "refCredits")
	wantAbsent(t, old, "apiKey")
	wantField(t, old, "credits", bson.TypeDouble, 2.5)
	wantField(t, old, "migration", bson.TypeBoolean, false)
	wantField(t, old, "isActive", bson.TypeBoolean, false)
	assert.True(t, old.Lookup("expiresAt").Time().Equal(exp), "expiresAt = %v, want %v", old.Lookup("expiresAt").Time(), exp)
	key := raw(t, ctx, db, seed.UserKeysCollection, bson.D{{Key: "_id", Value: "sk-troll-expiring"}})
	assert.True(t, key.Lookup("expiresAt").Time().Equal(exp), "user_keys expiresAt = %v, want %v", key.Lookup("expiresAt").Time(), exp)

	// Balances reads int32, int64 and double alike.
	_, err = db.Collection(seed.UsersCollection).UpdateOne(ctx, bson.D{{Key: "_id", Value: "old"}},
		bson.D{{Key: "$inc", Value: bson.D{
			{Key: "creditsNew", Value: -0.125},
			{Key: "totalInputTokens", Value: int64(1200)},
			{Key: "creditsNewUsed", Value: 0.125},
		}}})
	require.NoError(t, err)
	b, err := seed.Balances(ctx, db, "old")
	require.NoError(t, err)
	want := map[string]float64{
		"credits": 2.5, "creditsNew": 0, "creditsUsed": 0, "creditsNewUsed": 0.125,
		"tokensUserNew": 0, "totalInputTokens": 1200, "totalOutputTokens": 0,
	}
	assert.Equal(t, want, b, "balances (refCredits absent)")

	_, err = seed.Balances(ctx, db, "nobody")
	assert.ErrorIs(t, err, mongo.ErrNoDocuments, "Balances of a missing user")
	assert.Error(t, seed.Insert(ctx, db, 42), "Insert of an int succeeded")
}
