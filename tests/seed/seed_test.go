package seed_test

import (
	"context"
	"errors"
	"regexp"
	"testing"
	"time"

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
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	return c.Database("fproxy"), ctx
}

func raw(t *testing.T, ctx context.Context, db *mongo.Database, coll string, filter bson.D) bson.Raw {
	t.Helper()
	var r bson.Raw
	if err := db.Collection(coll).FindOne(ctx, filter).Decode(&r); err != nil {
		t.Fatalf("find in %s: %v", coll, err)
	}
	return r
}

// wantField checks the BSON type and value of one field.
func wantField(t *testing.T, doc bson.Raw, key string, typ bson.Type, value any) {
	t.Helper()
	v, err := doc.LookupErr(key)
	if err != nil {
		t.Errorf("%s: missing", key)
		return
	}
	if v.Type != typ {
		t.Errorf("%s: type %s, want %s", key, v.Type, typ)
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
	if got != value {
		t.Errorf("%s = %v, want %v", key, got, value)
	}
}

func wantAbsent(t *testing.T, doc bson.Raw, key string) {
	t.Helper()
	if _, err := doc.LookupErr(key); err == nil {
		t.Errorf("%s: present, want absent", key)
	}
}

func TestDemoDocuments(t *testing.T) {
	db, ctx := database(t)
	if err := seed.SeedDemo(ctx, db); err != nil {
		t.Fatal(err)
	}

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
	if err != nil || res.ModifiedCount != 1 {
		t.Fatalf("conditional $inc on an int32 balance: %v, modified %d", err, res.ModifiedCount)
	}
	alice = raw(t, ctx, db, seed.UsersCollection, bson.D{{Key: "_id", Value: seed.DemoUser}})
	wantField(t, alice, "creditsNew", bson.TypeDouble, 9.75)
	wantField(t, alice, "creditsNewUsed", bson.TypeDouble, 0.25)
	if b, err := seed.Balances(ctx, db, seed.DemoUser); err != nil || b["creditsNew"] != 9.75 || b["refCredits"] != 2 {
		t.Errorf("balances = %v, %v", b, err)
	}

	// Seeding twice collides on _id.
	if err := seed.SeedDemo(ctx, db); !mongo.IsDuplicateKeyError(err) {
		t.Errorf("second SeedDemo: %v, want a duplicate key error", err)
	}
}

func TestDemoKeyFormats(t *testing.T) {
	users, keys, upstream := seed.Demo()
	if len(users) != 2 || len(keys) != 1 || len(upstream) != 1 {
		t.Fatalf("demo sizes %d/%d/%d, want 2/1/1", len(users), len(keys), len(upstream))
	}
	if !regexp.MustCompile(`^sk-trollllm-[0-9a-f]{64}$`).MatchString(users[0].APIKey) {
		t.Errorf("personal key %q is not sk-trollllm-<64 hex>", users[0].APIKey)
	}
	if !regexp.MustCompile(`^sk-troll-[A-Za-z0-9]{24}$`).MatchString(keys[0].Key) {
		t.Errorf("admin key %q is not sk-troll-<24 chars>", keys[0].Key)
	}
	if keys[0].User != users[1].ID || users[1].APIKey != "" {
		t.Errorf("user_keys key does not belong to the second user")
	}
	if users[0].CreditsNew != 10 || users[0].Credits != 5 || users[0].RefCredits != 2 ||
		users[1].CreditsNew != 3 || users[1].Credits != 1 || users[1].RefCredits != 1 {
		t.Errorf("demo balances changed: %+v", users)
	}
}

func TestUserVariantsAndBalances(t *testing.T) {
	db, ctx := database(t)
	exp := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	err := seed.Insert(ctx, db,
		seed.User{ID: "old", Role: "admin", Active: false, Credits: 2.5, CreditsNew: 0.125, ExpiresAt: &exp, OmitRefCredits: true},
		&seed.UserKey{Key: "sk-troll-expiring", User: "old", Active: false, ExpiresAt: &exp},
	)
	if err != nil {
		t.Fatal(err)
	}
	old := raw(t, ctx, db, seed.UsersCollection, bson.D{{Key: "_id", Value: "old"}})
	wantAbsent(t, old, "refCredits")
	wantAbsent(t, old, "apiKey")
	wantField(t, old, "credits", bson.TypeDouble, 2.5)
	wantField(t, old, "migration", bson.TypeBoolean, false)
	wantField(t, old, "isActive", bson.TypeBoolean, false)
	if got := old.Lookup("expiresAt").Time(); !got.Equal(exp) {
		t.Errorf("expiresAt = %v, want %v", got, exp)
	}
	key := raw(t, ctx, db, seed.UserKeysCollection, bson.D{{Key: "_id", Value: "sk-troll-expiring"}})
	if got := key.Lookup("expiresAt").Time(); !got.Equal(exp) {
		t.Errorf("user_keys expiresAt = %v, want %v", got, exp)
	}

	// Balances reads int32, int64 and double alike.
	_, err = db.Collection(seed.UsersCollection).UpdateOne(ctx, bson.D{{Key: "_id", Value: "old"}},
		bson.D{{Key: "$inc", Value: bson.D{
			{Key: "creditsNew", Value: -0.125},
			{Key: "totalInputTokens", Value: int64(1200)},
			{Key: "creditsNewUsed", Value: 0.125},
		}}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := seed.Balances(ctx, db, "old")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{
		"credits": 2.5, "creditsNew": 0, "creditsUsed": 0, "creditsNewUsed": 0.125,
		"tokensUserNew": 0, "totalInputTokens": 1200, "totalOutputTokens": 0,
	}
	if len(b) != len(want) {
		t.Errorf("balances = %v, want %v (refCredits absent)", b, want)
	}
	for k, v := range want {
		if got, ok := b[k]; !ok || got != v {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
		}
	}

	if _, err := seed.Balances(ctx, db, "nobody"); !errors.Is(err, mongo.ErrNoDocuments) {
		t.Errorf("Balances of a missing user: %v, want ErrNoDocuments", err)
	}
	if err := seed.Insert(ctx, db, 42); err == nil {
		t.Error("Insert of an int succeeded")
	}
}
