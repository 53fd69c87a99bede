// Package seed writes the legacy MongoDB documents the billing module reads
// (usersNew, user_keys, openhands_keys, openhands_bindings) in the shape the
// legacy system and its Node backend leave them, with the official driver.
//
// Numbers are written as the Node backend (Mongoose, js-bson) writes them:
// an integral value that fits in 32 bits as a BSON int32, any other value as
// a double. So a balance of 10 is an int32 and a balance of 2.5 a double, as
// in the production data; code reading these fields must accept both.
package seed

import (
	"context"
	"fmt"
	"math"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/mongostore"
)

// Collection names of the legacy data model: the store's own (package
// mongostore owns them), so that the seeded data is where the gateway reads.
const (
	UsersCollection       = mongostore.CollUsers
	UserKeysCollection    = mongostore.CollUserKeys
	UpstreamKeyCollection = mongostore.CollKeys
	BindingsCollection    = mongostore.CollBindings
	RequestLogsCollection = mongostore.CollRequestLog
	FriendKeysCollection  = mongostore.CollFriendKeys
)

// User is a usersNew document (_id = username).
type User struct {
	// ID is the username, the document's _id.
	ID string
	// APIKey is the user's personal key (sk-trollllm-...); the field is
	// left out when empty, as the unique sparse index expects.
	APIKey string
	// Role is "user", "admin" or "priority".
	Role string
	// Active is isActive; Migration is migration (false blocks non-admins).
	Active, Migration bool
	// Credits, RefCredits and CreditsNew are the USD balances.
	Credits, RefCredits, CreditsNew float64
	// ExpiresAt is the expiry of the legacy credits; nil writes null.
	ExpiresAt *time.Time
	// OmitRefCredits leaves refCredits out of the document (old users lack
	// it, which made the legacy chat2 path free: see legacy-goproxy.md §10).
	OmitRefCredits bool
}

// UserKey is a user_keys document (_id = the key).
type UserKey struct {
	// Key is the client API key, the document's _id.
	Key string
	// User is the owner's username (the name field).
	User string
	// Active is isActive.
	Active bool
	// ExpiresAt, when set, is written as expiresAt; nil leaves it out.
	ExpiresAt *time.Time
}

// UpstreamKey is an openhands_keys document: one upstream bearer token.
type UpstreamKey struct {
	// ID is the document's _id.
	ID string
	// APIKey is the bearer token sent to the upstream.
	APIKey string
	// Status is healthy, rate_limited, exhausted, need_refresh or error;
	// empty means healthy.
	Status string
}

// FriendKey is a friend_keys document (_id = the key): a key its owner
// gives a friend, billed to the owner within per-model USD limits.
type FriendKey struct {
	// Key is the friend key (sk-trollllm-friend- and 64 hex digits), the
	// document's _id.
	Key string
	// Owner is the ownerId: the usersNew _id who pays.
	Owner string
	// Active is isActive.
	Active bool
	// Limits are the modelLimits entries, in order.
	Limits []FriendLimit
}

// FriendLimit is one modelLimits entry of a friend key.
type FriendLimit struct {
	// Model is the modelId.
	Model string
	// Limit is limitUsd, Used usedUsd.
	Limit, Used float64
	// Enabled, when set, is written as enabled; nil leaves it out (the
	// backend's default: enabled).
	Enabled *bool
}

// Doc returns the friend_keys document of k, with createdAt = now.
func (k FriendKey) Doc(now time.Time) bson.D {
	limits := bson.A{}
	for _, l := range k.Limits {
		e := bson.D{{Key: "modelId", Value: l.Model}, {Key: "limitUsd", Value: number(l.Limit)}, {Key: "usedUsd", Value: number(l.Used)}}
		if l.Enabled != nil {
			e = append(e, bson.E{Key: "enabled", Value: *l.Enabled})
		}
		limits = append(limits, e)
	}
	return bson.D{
		{Key: "_id", Value: k.Key},
		{Key: "ownerId", Value: k.Owner},
		{Key: "isActive", Value: k.Active},
		{Key: "modelLimits", Value: limits},
		{Key: "totalUsedUsd", Value: number(0)},
		{Key: "requestsCount", Value: number(0)},
		{Key: "lastUsedAt", Value: nil},
		{Key: "createdAt", Value: now.UTC()},
	}
}

// number returns v as js-bson would store it: int32 when integral and in
// range, otherwise float64.
func number(v float64) any {
	if v == math.Trunc(v) && v >= math.MinInt32 && v <= math.MaxInt32 && !(v == 0 && math.Signbit(v)) {
		return int32(v)
	}
	return v
}

// Doc returns the usersNew document of u, with createdAt = now.
func (u User) Doc(now time.Time) bson.D {
	d := bson.D{{Key: "_id", Value: u.ID}}
	if u.APIKey != "" {
		d = append(d, bson.E{Key: "apiKey", Value: u.APIKey})
	}
	d = append(d,
		bson.E{Key: "isActive", Value: u.Active},
		bson.E{Key: "role", Value: u.Role},
		bson.E{Key: "migration", Value: u.Migration},
		bson.E{Key: "credits", Value: number(u.Credits)},
	)
	if !u.OmitRefCredits {
		d = append(d, bson.E{Key: "refCredits", Value: number(u.RefCredits)})
	}
	var expires any // nil writes BSON null
	if u.ExpiresAt != nil {
		expires = u.ExpiresAt.UTC()
	}
	d = append(d,
		bson.E{Key: "creditsNew", Value: number(u.CreditsNew)},
		bson.E{Key: "creditsUsed", Value: number(0)},
		bson.E{Key: "creditsNewUsed", Value: number(0)},
		bson.E{Key: "tokensUserNew", Value: number(0)},
		bson.E{Key: "totalInputTokens", Value: number(0)},
		bson.E{Key: "totalOutputTokens", Value: number(0)},
		bson.E{Key: "expiresAt", Value: expires},
		bson.E{Key: "createdAt", Value: now.UTC()},
	)
	return d
}

// Doc returns the user_keys document of k, with createdAt = now.
func (k UserKey) Doc(now time.Time) bson.D {
	d := bson.D{
		{Key: "_id", Value: k.Key},
		{Key: "name", Value: k.User},
		{Key: "isActive", Value: k.Active},
		{Key: "tokensUsed", Value: number(0)},
		{Key: "requestsCount", Value: number(0)},
		{Key: "createdAt", Value: now.UTC()},
	}
	if k.ExpiresAt != nil {
		d = append(d, bson.E{Key: "expiresAt", Value: k.ExpiresAt.UTC()})
	}
	return d
}

// Doc returns the openhands_keys document of k, with createdAt = now.
func (k UpstreamKey) Doc(now time.Time) bson.D {
	status := k.Status
	if status == "" {
		status = "healthy"
	}
	return bson.D{
		{Key: "_id", Value: k.ID},
		{Key: "apiKey", Value: k.APIKey},
		{Key: "status", Value: status},
		{Key: "tokensUsed", Value: number(0)},
		{Key: "requestsCount", Value: number(0)},
		{Key: "createdAt", Value: now.UTC()},
	}
}

// BindingDoc returns the openhands_bindings document that puts the upstream
// key keyID in the request pool.
func BindingDoc(keyID string, now time.Time) bson.D {
	return bson.D{
		{Key: "proxyId", Value: "default"},
		{Key: "openhandsKeyId", Value: keyID},
		{Key: "priority", Value: number(1)},
		{Key: "isActive", Value: true},
		{Key: "createdAt", Value: now.UTC()},
		{Key: "updatedAt", Value: now.UTC()},
	}
}

// Insert writes each of docs into its collection: a User (or *User) into
// usersNew, a UserKey into user_keys, a FriendKey into friend_keys, an
// UpstreamKey into openhands_keys;
// slices of these are accepted too. Upstream keys are not bound: see
// [Bind]. It stops at the first error (a duplicate _id, for instance).
func Insert(ctx context.Context, db *mongo.Database, docs ...any) error {
	now := time.Now()
	for _, d := range docs {
		var (
			coll string
			doc  bson.D
		)
		switch v := d.(type) {
		case User:
			coll, doc = UsersCollection, v.Doc(now)
		case *User:
			coll, doc = UsersCollection, v.Doc(now)
		case UserKey:
			coll, doc = UserKeysCollection, v.Doc(now)
		case *UserKey:
			coll, doc = UserKeysCollection, v.Doc(now)
		case FriendKey:
			coll, doc = FriendKeysCollection, v.Doc(now)
		case *FriendKey:
			coll, doc = FriendKeysCollection, v.Doc(now)
		case UpstreamKey:
			coll, doc = UpstreamKeyCollection, v.Doc(now)
		case *UpstreamKey:
			coll, doc = UpstreamKeyCollection, v.Doc(now)
		case []User:
			if err := insertSlice(ctx, db, v); err != nil {
				return err
			}
			continue
		case []UserKey:
			if err := insertSlice(ctx, db, v); err != nil {
				return err
			}
			continue
		case []UpstreamKey:
			if err := insertSlice(ctx, db, v); err != nil {
				return err
			}
			continue
		case []FriendKey:
			if err := insertSlice(ctx, db, v); err != nil {
				return err
			}
			continue
		default:
			return fmt.Errorf("seed: cannot insert a %T", d)
		}
		if _, err := db.Collection(coll).InsertOne(ctx, doc); err != nil {
			return fmt.Errorf("seed: insert into %s: %w", coll, err)
		}
	}
	return nil
}

func insertSlice[T any](ctx context.Context, db *mongo.Database, s []T) error {
	for i := range s {
		if err := Insert(ctx, db, s[i]); err != nil {
			return err
		}
	}
	return nil
}

// Bind inserts an active openhands_bindings document for the upstream key
// keyID (priority 1).
func Bind(ctx context.Context, db *mongo.Database, keyID string) error {
	if _, err := db.Collection(BindingsCollection).InsertOne(ctx, BindingDoc(keyID, time.Now())); err != nil {
		return fmt.Errorf("seed: bind %s: %w", keyID, err)
	}
	return nil
}

// Fixed demo data, printable in a README.
const (
	// DemoUser is the user with a personal key in usersNew.apiKey.
	DemoUser = "demo-alice"
	// DemoUserKey is DemoUser's personal key: sk-trollllm- and 64 hex digits.
	DemoUserKey = "sk-trollllm-5d1e7c0a9b3f42e68c1d0a7b9e4f3c2d1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d"
	// DemoAdminKeyUser is the user whose key lives in user_keys.
	DemoAdminKeyUser = "demo-bob"
	// DemoAdminKey is DemoAdminKeyUser's admin-issued key: sk-troll- and 24
	// characters.
	DemoAdminKey = "sk-troll-Dm7bQx2Lk9Rw4Tz8Hn3Vc6Jp"
	// DemoUpstreamKeyID is the _id of the demo upstream key.
	DemoUpstreamKeyID = "demo-upstream-1"
	// DemoUpstreamAPIKey is the bearer token the demo upstream key sends
	// (the stand-in accepts it).
	DemoUpstreamAPIKey = "sk-oh-demo-upstream-00000000000000000001"
)

// Demo returns the demo data: two users, both role "user" and migrated,
// DemoUser (creditsNew 10, credits 5, refCredits 2, personal key in
// usersNew.apiKey) and DemoAdminKeyUser (creditsNew 3, credits 1,
// refCredits 1, key in user_keys), and one healthy upstream key.
func Demo() (users []User, keys []UserKey, upstream []UpstreamKey) {
	users = []User{
		{ID: DemoUser, APIKey: DemoUserKey, Role: "user", Active: true, Migration: true,
			Credits: 5, RefCredits: 2, CreditsNew: 10},
		{ID: DemoAdminKeyUser, Role: "user", Active: true, Migration: true,
			Credits: 1, RefCredits: 1, CreditsNew: 3},
	}
	keys = []UserKey{{Key: DemoAdminKey, User: DemoAdminKeyUser, Active: true}}
	upstream = []UpstreamKey{{ID: DemoUpstreamKeyID, APIKey: DemoUpstreamAPIKey, Status: "healthy"}}
	return users, keys, upstream
}

// SeedDemo inserts [Demo] into db and binds its upstream keys.
func SeedDemo(ctx context.Context, db *mongo.Database) error {
	users, keys, upstream := Demo()
	if err := Insert(ctx, db, users, keys, upstream); err != nil {
		return err
	}
	for _, k := range upstream {
		if err := Bind(ctx, db, k.ID); err != nil {
			return err
		}
	}
	return nil
}

// BalanceFields are the usersNew fields [Balances] reads.
var BalanceFields = []string{
	"credits", "refCredits", "creditsNew",
	"creditsUsed", "creditsNewUsed", "tokensUserNew",
	"totalInputTokens", "totalOutputTokens",
}

// Balances reads the balance and counter fields (BalanceFields) of the
// usersNew document of user, converting int32, int64 and double alike to
// float64. A field missing from the document is missing from the map. It
// fails, wrapping mongo.ErrNoDocuments, when there is no such user, and when
// a field holds something other than a number.
func Balances(ctx context.Context, db *mongo.Database, user string) (map[string]float64, error) {
	proj := bson.D{}
	for _, f := range BalanceFields {
		proj = append(proj, bson.E{Key: f, Value: 1})
	}
	var raw bson.Raw
	err := db.Collection(UsersCollection).FindOne(ctx, bson.D{{Key: "_id", Value: user}},
		options.FindOne().SetProjection(proj)).Decode(&raw)
	if err != nil {
		return nil, fmt.Errorf("seed: read balances of %s: %w", user, err)
	}
	out := make(map[string]float64, len(BalanceFields))
	for _, f := range BalanceFields {
		v, err := raw.LookupErr(f)
		if err != nil { // not in the document
			continue
		}
		n, ok := Float(v)
		if !ok {
			return nil, fmt.Errorf("seed: %s.%s is a %s, not a number", user, f, v.Type)
		}
		out[f] = n
	}
	return out, nil
}

// Float converts a BSON int32, int64 or double to float64; ok is false for
// any other type.
func Float(v bson.RawValue) (f float64, ok bool) {
	switch v.Type {
	case bson.TypeDouble:
		return v.Double(), true
	case bson.TypeInt32:
		return float64(v.Int32()), true
	case bson.TypeInt64:
		return float64(v.Int64()), true
	}
	return 0, false
}
