// Package mongostore is the gateway's MongoDB storage: it implements the
// billing store interfaces and owns the storage schema (the collection
// names, the gateway's bookkeeping fields and the packed strings of holds,
// receipts and friend holds) over the collections the legacy proxy and the
// Node backend share (usersNew, user_keys, friend_keys, openhands_keys,
// openhands_bindings and request_logs) and the gateway's own llm_billing_*
// collections. Other packages that read the database directly (reconcile)
// use its names and decoders instead of repeating them.
//
// Every operation is written to work on MongoDB 6+ and on FerretDB 1.24 (the
// test database): conditional filters, $inc, $set and plain finds only; no
// $expr, pipeline updates, transactions or positional operators.
package mongostore

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"strings"
	"sync/atomic"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Collection names shared with the backend.
const (
	CollUsers      = "usersNew"
	CollUserKeys   = "user_keys"
	CollKeys       = "openhands_keys"
	CollBindings   = "openhands_bindings"
	CollRequestLog = "request_logs"
	CollBackupKeys = "openhands_backup_keys"
	CollArchive    = "deleted_keys_archive"
	// CollClaims is the gateway's own: one document per rotation and per
	// claimed spare, whose unique _id makes each claim win exactly once
	// (a unique insert is atomic on MongoDB and on FerretDB alike, where
	// findOneAndUpdate is not).
	CollClaims = "llm_billing_claims"
	// CollInstances holds one heartbeat document per running gateway
	// process, so the sweeper can tell a hold whose owner died.
	CollInstances = "llm_billing_instances"
	// CollLocks holds the lease locks of IsolationShared.
	CollLocks = "llm_billing_locks"
)

// staleRotation is how old a rotation claim must be before another instance
// may take it over (its holder crashed half-way).
const staleRotation = 5 * time.Minute

// casAttempts bounds the read-then-compare-and-set loop of a partial charge.
const casAttempts = 8

// Store is the MongoDB implementation of billing.Authenticator,
// billing.Ledger, billing.KeyLoader and billing.Recorder.
type Store struct {
	db        *mongo.Database
	now       func() time.Time
	isolation atomic.Uint32 // an Isolation
	local     stripes
}

// New returns a store over db with IsolationProcess.
func New(db *mongo.Database) *Store {
	return NewWithIsolation(db, IsolationProcess)
}

// NewWithIsolation returns a store over db with the given isolation of
// balance writes.
func NewWithIsolation(db *mongo.Database, iso Isolation) *Store {
	s := &Store{db: db, now: time.Now}
	s.isolation.Store(uint32(iso))
	s.local.seed = maphash.MakeSeed()
	return s
}

// SetIsolation changes the isolation of balance writes; it may be called
// while the store is in use.
func (s *Store) SetIsolation(iso Isolation) { s.isolation.Store(uint32(iso)) }

// IsFerretDB reports whether the server is FerretDB, whose updates are not
// isolated (see Isolation). It asks buildInfo, which FerretDB answers with
// a ferretdbVersion field.
func IsFerretDB(ctx context.Context, db *mongo.Database) (bool, error) {
	var info bson.M
	if err := db.RunCommand(ctx, bson.D{{Key: "buildInfo", Value: 1}}).Decode(&info); err != nil {
		return false, fmt.Errorf("buildInfo: %w", err)
	}
	_, ok := info["ferretdbVersion"]
	return ok, nil
}

// IsFerretDB reports whether the store's server is FerretDB (see the
// function IsFerretDB).
func (s *Store) IsFerretDB(ctx context.Context) (bool, error) { return IsFerretDB(ctx, s.db) }

// Database returns the underlying database.
func (s *Store) Database() *mongo.Database { return s.db }

type userKeyDoc struct {
	Name      string     `bson:"name"`
	IsActive  *bool      `bson:"isActive"`
	ExpiresAt *time.Time `bson:"expiresAt"`
}

type userDoc struct {
	ID        string     `bson:"_id"`
	IsActive  *bool      `bson:"isActive"`
	Role      string     `bson:"role"`
	Migration bool       `bson:"migration"`
	ExpiresAt *time.Time `bson:"expiresAt"`
	Bal       balanceDoc `bson:",inline"`
}

// balanceDoc is the balance fields of a usersNew document, kept raw so that
// a value of an unexpected type reads as 0 instead of failing the read.
type balanceDoc struct {
	CreditsNew bson.RawValue `bson:"creditsNew"`
	Credits    bson.RawValue `bson:"credits"`
	RefCredits bson.RawValue `bson:"refCredits"`
}

// balances converts the fields: a missing, null or non-numeric one is 0.
func (d balanceDoc) balances() billing.Balances {
	return billing.Balances{CreditsNew: rawNano(d.CreditsNew), Credits: rawNano(d.Credits), RefCredits: rawNano(d.RefCredits)}
}

func rawNano(v bson.RawValue) billing.Nano {
	switch v.Type {
	case bson.TypeDouble:
		return billing.NanoFromUSD(v.Double())
	case bson.TypeInt32:
		return billing.NanoFromUSD(float64(v.Int32()))
	case bson.TypeInt64:
		return billing.NanoFromUSD(float64(v.Int64()))
	}
	return 0
}

// balanceProjection reads the balance fields; userAuthProjection reads them
// with what authentication needs, so that the key lookup also gives the
// pre-check its balance without another round trip.
var (
	balanceProjection  = bson.D{{Key: billing.FieldCreditsNew, Value: 1}, {Key: billing.FieldCredits, Value: 1}, {Key: billing.FieldRefCredits, Value: 1}}
	userAuthProjection = append(bson.D{{Key: "_id", Value: 1}, {Key: "isActive", Value: 1}, {Key: "role", Value: 1}, {Key: "migration", Value: 1}, {Key: "expiresAt", Value: 1}}, balanceProjection...)
)

// Balances reads the user's balance fields (one find, no lock).
func (s *Store) Balances(ctx context.Context, user string) (billing.Balances, error) {
	var d balanceDoc
	err := s.db.Collection(CollUsers).FindOne(ctx, bson.D{{Key: "_id", Value: user}},
		options.FindOne().SetProjection(balanceProjection)).Decode(&d)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		return billing.Balances{}, billing.ErrUserNotFound
	case err != nil:
		return billing.Balances{}, fmt.Errorf("reading balance: %w", err)
	}
	return d.balances(), nil
}

// Authenticate resolves key as the legacy proxy did: a friend key
// (billing.IsFriendKey) in friend_keys, any other key in user_keys by _id
// first, then usersNew by apiKey. A missing isActive counts as active (the backend
// schema defaults it to true); a missing migration counts as not migrated.
func (s *Store) Authenticate(ctx context.Context, key string) (billing.Principal, error) {
	if billing.IsFriendKey(key) {
		return s.authenticateFriend(ctx, key)
	}
	now := s.now()
	var uk userKeyDoc
	err := s.db.Collection(CollUserKeys).FindOne(ctx, bson.D{{Key: "_id", Value: key}},
		options.FindOne().SetProjection(bson.D{{Key: "name", Value: 1}, {Key: "isActive", Value: 1}, {Key: "expiresAt", Value: 1}})).Decode(&uk)
	switch {
	case err == nil:
		return s.authenticateUserKey(ctx, uk, now)
	case !errors.Is(err, mongo.ErrNoDocuments):
		return billing.Principal{}, fmt.Errorf("reading user_keys: %w", err)
	}

	var u userDoc
	err = s.db.Collection(CollUsers).FindOne(ctx, bson.D{{Key: "apiKey", Value: key}},
		options.FindOne().SetProjection(userAuthProjection)).Decode(&u)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		return billing.Principal{}, &billing.AuthError{Reason: billing.AuthInvalid}
	case err != nil:
		return billing.Principal{}, fmt.Errorf("reading usersNew: %w", err)
	}
	if err := refuseInactive(u.IsActive, u.ExpiresAt, now); err != nil {
		return billing.Principal{}, err
	}
	role, err := migratedRole(u)
	if err != nil {
		return billing.Principal{}, err
	}
	return billing.Principal{User: u.ID, Role: role, Balances: u.Bal.balances()}, nil
}

// authenticateUserKey resolves a key found in user_keys: the key must be
// active and not expired at now, and its user, when it exists, active and
// migrated (or an admin). A key whose user is missing is accepted without
// the user's checks, as the legacy proxy did.
func (s *Store) authenticateUserKey(ctx context.Context, uk userKeyDoc, now time.Time) (billing.Principal, error) {
	if err := refuseInactive(uk.IsActive, uk.ExpiresAt, now); err != nil {
		return billing.Principal{}, err
	}
	p := billing.Principal{User: uk.Name, InUserKeys: true}
	var u userDoc
	err := s.db.Collection(CollUsers).FindOne(ctx, bson.D{{Key: "_id", Value: uk.Name}},
		options.FindOne().SetProjection(userAuthProjection)).Decode(&u)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		// As the legacy proxy: the migration check is skipped; billing
		// then fails with ErrUserNotFound before anything is served.
		return p, nil
	case err != nil:
		return billing.Principal{}, fmt.Errorf("reading user of key: %w", err)
	}
	if err := refuseInactive(u.IsActive, nil, now); err != nil {
		return billing.Principal{}, err
	}
	if p.Role, err = migratedRole(u); err != nil {
		return billing.Principal{}, err
	}
	p.Balances = u.Bal.balances()
	return p, nil
}

// refuseInactive returns the AuthError of a key or user that is revoked
// (isActive false; a missing isActive counts as active) or, when expiresAt
// is set, expired at now; nil otherwise.
func refuseInactive(isActive *bool, expiresAt *time.Time, now time.Time) error {
	if isActive != nil && !*isActive {
		return &billing.AuthError{Reason: billing.AuthRevoked}
	}
	if expiresAt != nil && expiresAt.Before(now) {
		return &billing.AuthError{Reason: billing.AuthExpired}
	}
	return nil
}

// migratedRole returns the user's role, trimmed and lowercased, or the
// AuthError of a user who is neither an admin nor migrated.
func migratedRole(u userDoc) (string, error) {
	role := strings.ToLower(strings.TrimSpace(u.Role))
	if role != "admin" && !u.Migration {
		return "", &billing.AuthError{Reason: billing.AuthMigrationRequired}
	}
	return role, nil
}

// fieldValue is a balance field as read: its value and whether it exists.
type fieldValue struct {
	v       float64
	present bool
}

func toFloat(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case int32:
		return float64(n), true
	case int64:
		return float64(n), true
	case int:
		return float64(n), true
	}
	return 0, false
}

type keyDoc struct {
	ID            string     `bson:"_id"`
	APIKey        string     `bson:"apiKey"`
	Status        string     `bson:"status"`
	CooldownUntil *time.Time `bson:"cooldownUntil"`
}

// LoadUpstreamKeys loads the upstream key pool as the legacy proxy did: the
// keys named by active openhands_bindings whose status is not need_refresh,
// exhausted or error; every key when no binding is active.
func (s *Store) LoadUpstreamKeys(ctx context.Context) ([]billing.UpstreamKey, error) {
	type binding struct {
		ID    any    `bson:"_id"`
		KeyID string `bson:"openhandsKeyId"`
	}
	bindings, err := findPages(ctx, s.db.Collection(CollBindings), bson.D{{Key: "isActive", Value: true}},
		bson.D{{Key: "openhandsKeyId", Value: 1}}, func(b *binding) any { return b.ID })
	if err != nil {
		return nil, fmt.Errorf("reading bindings: %w", err)
	}
	filter := bson.D{}
	if len(bindings) > 0 {
		ids := make([]string, 0, len(bindings))
		for _, b := range bindings {
			ids = append(ids, b.KeyID)
		}
		filter = bson.D{
			{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}},
			{Key: "status", Value: bson.D{{Key: "$nin", Value: bson.A{"need_refresh", "exhausted", "error"}}}},
		}
	}
	docs, err := findPages(ctx, s.db.Collection(CollKeys), filter,
		bson.D{{Key: "apiKey", Value: 1}, {Key: "status", Value: 1}, {Key: "cooldownUntil", Value: 1}},
		func(d *keyDoc) any { return d.ID })
	if err != nil {
		return nil, fmt.Errorf("reading upstream keys: %w", err)
	}
	keys := make([]billing.UpstreamKey, 0, len(docs))
	for _, d := range docs {
		if d.APIKey == "" {
			continue
		}
		k := billing.UpstreamKey{ID: d.ID, APIKey: d.APIKey, Status: d.Status}
		if d.CooldownUntil != nil {
			k.CooldownUntil = *d.CooldownUntil
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// MarkUpstreamKey sets a key's status, cooldownUntil and lastError.
func (s *Store) MarkUpstreamKey(ctx context.Context, id, status string, cooldownUntil time.Time, lastError string) error {
	var until any
	if !cooldownUntil.IsZero() {
		until = cooldownUntil
	}
	set := bson.D{{Key: "status", Value: status}, {Key: "cooldownUntil", Value: until}}
	if lastError != "" {
		set = append(set, bson.E{Key: "lastError", Value: lastError})
	}
	_, err := s.db.Collection(CollKeys).UpdateOne(ctx, bson.D{{Key: "_id", Value: id}}, bson.D{{Key: "$set", Value: set}})
	if err != nil {
		return fmt.Errorf("marking upstream key: %w", err)
	}
	return nil
}

// RotateUpstreamKey replaces a failed key by a spare, as the legacy proxy
// did (claim a spare, insert it as a healthy key with replacedKey, repoint
// the bindings, archive and delete the old key), but race-free across
// instances: the rotation and the spare are claimed with unique inserts.
// The new key is inserted before the old one is removed, so the pool never
// shrinks half-way.
func (s *Store) RotateUpstreamKey(ctx context.Context, id, reason string) (string, error) {
	now := s.now()
	if rotated, err := s.claimRotation(ctx, id, reason, now); rotated || err != nil {
		return "", err
	}
	release := func() {
		_, _ = s.db.Collection(CollClaims).DeleteOne(context.WithoutCancel(ctx), bson.D{{Key: "_id", Value: "rotate:" + id}})
	}

	var old bson.M
	err := s.db.Collection(CollKeys).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&old)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return "", nil // rotated already
	}
	if err != nil {
		release()
		return "", fmt.Errorf("reading the failed key: %w", err)
	}
	newID, apiKey, err := s.claimSpare(ctx, id, now)
	if err != nil {
		release() // a spare added later may serve the next rotation
		return "", err
	}
	rot := rotation{id: id, reason: reason, newID: newID, apiKey: apiKey, old: old, now: now}
	if err := s.applyRotation(ctx, rot); err != nil {
		return "", err
	}
	return newID, nil
}

// claimRotation claims the rotation of key id with a unique insert of
// "rotate:"+id into CollClaims, taking over, once, a claim older than
// staleRotation (its holder died). It reports rotated when a claim exists
// and the key is gone already, and billing.ErrRotationInProgress when
// another instance holds a live claim. On a nil error with rotated false,
// the caller holds the claim.
func (s *Store) claimRotation(ctx context.Context, id, reason string, now time.Time) (rotated bool, err error) {
	claims := s.db.Collection(CollClaims)
	lockID := "rotate:" + id
	claim := func() error {
		_, err := claims.InsertOne(ctx, bson.D{{Key: "_id", Value: lockID}, {Key: "reason", Value: reason}, {Key: "createdAt", Value: now}})
		return err
	}
	err = claim()
	if err == nil {
		return false, nil
	}
	if !mongo.IsDuplicateKeyError(err) {
		return false, fmt.Errorf("claiming rotation: %w", err)
	}
	if n, err := s.db.Collection(CollKeys).CountDocuments(ctx, bson.D{{Key: "_id", Value: id}}); err == nil && n == 0 {
		return true, nil
	}
	// Take over a claim whose holder died, once.
	r, derr := claims.DeleteOne(ctx, bson.D{{Key: "_id", Value: lockID}, {Key: "createdAt", Value: bson.D{{Key: "$lt", Value: now.Add(-staleRotation)}}}})
	if derr != nil || r.DeletedCount != 1 {
		return false, billing.ErrRotationInProgress
	}
	if err := claim(); err != nil {
		return false, billing.ErrRotationInProgress
	}
	return false, nil
}

// claimSpare claims, for failed key id, the oldest unused spare with an API
// key that no other rotation claimed, with a unique insert of
// "spare:"+spareID into CollClaims. It returns the spare's id and API key,
// or billing.ErrNoSpareKey when none is left to claim.
func (s *Store) claimSpare(ctx context.Context, id string, now time.Time) (spareID, apiKey string, err error) {
	cur, err := s.db.Collection(CollBackupKeys).Find(ctx, bson.D{{Key: "isUsed", Value: false}},
		options.Find().SetSort(bson.D{{Key: "createdAt", Value: 1}, {Key: "_id", Value: 1}}).SetLimit(50))
	if err != nil {
		return "", "", fmt.Errorf("reading spare keys: %w", err)
	}
	var spares []struct {
		ID     string `bson:"_id"`
		APIKey string `bson:"apiKey"`
	}
	if err := cur.All(ctx, &spares); err != nil {
		return "", "", fmt.Errorf("reading spare keys: %w", err)
	}
	for _, sp := range spares {
		if sp.APIKey == "" {
			continue
		}
		_, err := s.db.Collection(CollClaims).InsertOne(ctx, bson.D{{Key: "_id", Value: "spare:" + sp.ID}, {Key: "usedFor", Value: id}, {Key: "createdAt", Value: now}})
		if err == nil {
			return sp.ID, sp.APIKey, nil
		}
		if !mongo.IsDuplicateKeyError(err) {
			return "", "", fmt.Errorf("claiming a spare key: %w", err)
		}
	}
	return "", "", billing.ErrNoSpareKey
}

// rotation is one claimed replacement of a failed upstream key by a spare.
type rotation struct {
	id, reason    string // the failed key and why it failed
	newID, apiKey string // the claimed spare
	old           bson.M // the failed key's document, archived as it was
	now           time.Time
}

// applyRotation writes a claimed rotation in an order that never shrinks
// the pool: mark the spare used, insert it as a healthy key, repoint the
// bindings, archive the old key, delete it. It stops at the first write
// that fails and names its step.
func (s *Store) applyRotation(ctx context.Context, rot rotation) error {
	id, newID, now := rot.id, rot.newID, rot.now
	steps := []func() error{
		func() error {
			_, err := s.db.Collection(CollBackupKeys).UpdateOne(ctx, bson.D{{Key: "_id", Value: newID}},
				bson.D{{Key: "$set", Value: bson.D{{Key: "isUsed", Value: true}, {Key: "usedAt", Value: now}, {Key: "usedFor", Value: id}}}})
			return err
		},
		func() error {
			_, err := s.db.Collection(CollKeys).InsertOne(ctx, bson.D{
				{Key: "_id", Value: newID}, {Key: "apiKey", Value: rot.apiKey}, {Key: "status", Value: billing.KeyHealthy},
				{Key: "tokensUsed", Value: int64(0)}, {Key: "requestsCount", Value: int64(0)},
				{Key: "createdAt", Value: now}, {Key: "replacedKey", Value: id},
			})
			return err
		},
		func() error {
			_, err := s.db.Collection(CollBindings).UpdateMany(ctx, bson.D{{Key: "openhandsKeyId", Value: id}},
				bson.D{{Key: "$set", Value: bson.D{{Key: "openhandsKeyId", Value: newID}, {Key: "updatedAt", Value: now}}}})
			return err
		},
		func() error {
			_, err := s.db.Collection(CollArchive).InsertOne(ctx, bson.D{
				{Key: "sourceCollection", Value: CollKeys}, {Key: "sourceId", Value: id}, {Key: "reason", Value: rot.reason},
				{Key: "deletedBy", Value: "caddy-llm-billing"}, {Key: "deletedAt", Value: now}, {Key: "document", Value: rot.old},
				{Key: "metadata", Value: bson.D{{Key: "replacedBy", Value: newID}}},
			})
			return err
		},
		func() error {
			_, err := s.db.Collection(CollKeys).DeleteOne(ctx, bson.D{{Key: "_id", Value: id}})
			return err
		},
	}
	for i, step := range steps {
		if err := step(); err != nil {
			// The claims stay: a half-done rotation is finished by hand or
			// taken over once stale, never run twice at once.
			return fmt.Errorf("rotating upstream key, step %d: %w", i+1, err)
		}
	}
	return nil
}

// CleanUsedSpares is the legacy 6-hour cleanup of openhands_backup_keys,
// safe to run in every instance: each spare is claimed with a unique insert
// before it is archived and deleted, so it is archived once.
func (s *Store) CleanUsedSpares(ctx context.Context, cutoff time.Time) (int, error) {
	cur, err := s.db.Collection(CollBackupKeys).Find(ctx, bson.D{{Key: "isUsed", Value: true}, {Key: "usedAt", Value: bson.D{{Key: "$lt", Value: cutoff}}}},
		options.Find().SetLimit(100))
	if err != nil {
		return 0, fmt.Errorf("reading used spares: %w", err)
	}
	var docs []bson.M
	if err := cur.All(ctx, &docs); err != nil {
		return 0, fmt.Errorf("reading used spares: %w", err)
	}
	removed := 0
	for _, d := range docs {
		id, _ := d["_id"].(string)
		if id == "" {
			continue
		}
		_, err := s.db.Collection(CollClaims).InsertOne(ctx, bson.D{{Key: "_id", Value: "cleanup:" + id}, {Key: "createdAt", Value: s.now()}})
		if mongo.IsDuplicateKeyError(err) {
			continue // another instance has it
		}
		if err != nil {
			return removed, fmt.Errorf("claiming a used spare: %w", err)
		}
		if _, err := s.db.Collection(CollArchive).InsertOne(ctx, bson.D{
			{Key: "sourceCollection", Value: CollBackupKeys}, {Key: "sourceId", Value: id}, {Key: "reason", Value: "used_backup_cleanup"},
			{Key: "deletedBy", Value: "caddy-llm-billing"}, {Key: "deletedAt", Value: s.now()}, {Key: "document", Value: d},
		}); err != nil {
			return removed, fmt.Errorf("archiving a used spare: %w", err)
		}
		if _, err := s.db.Collection(CollBackupKeys).DeleteOne(ctx, bson.D{{Key: "_id", Value: id}}); err != nil {
			return removed, fmt.Errorf("deleting a used spare: %w", err)
		}
		removed++
	}
	return removed, nil
}

// logDoc is a request_logs document: the legacy fields the dashboard
// reads, then the gateway's own.
type logDoc struct {
	ID               bson.ObjectID `bson:"_id"`
	UserID           string        `bson:"userId,omitempty"`
	UserKeyID        string        `bson:"userKeyId"`
	TrollKeyID       string        `bson:"trollKeyId,omitempty"`
	Model            string        `bson:"model"`
	InputTokens      int64         `bson:"inputTokens"`
	OutputTokens     int64         `bson:"outputTokens"`
	CacheWriteTokens int64         `bson:"cacheWriteTokens"`
	CacheHitTokens   int64         `bson:"cacheHitTokens"`
	CreditsCost      float64       `bson:"creditsCost"`
	CreditType       string        `bson:"creditType"`
	TokensUsed       int64         `bson:"tokensUsed"`
	StatusCode       int           `bson:"statusCode"`
	LatencyMs        int64         `bson:"latencyMs"`
	IsSuccess        bool          `bson:"isSuccess"`
	CreatedAt        time.Time     `bson:"createdAt"`
	FriendKeyID      string        `bson:"friendKeyId,omitempty"`

	RequestID     string           `bson:"requestId"`
	CreditField   string           `bson:"creditField"`
	Endpoint      string           `bson:"endpoint"`
	Stream        bool             `bson:"stream"`
	UpstreamModel string           `bson:"upstreamModel"`
	UsageSource   string           `bson:"usageSource"`
	EndReason     string           `bson:"endReason"`
	CostNano      int64            `bson:"costNano"`
	ChargedNano   int64            `bson:"chargedNano"`
	Shortfall     float64          `bson:"shortfall"`
	ShortfallNano int64            `bson:"shortfallNano"`
	HoldNano      int64            `bson:"holdNano"`
	TakenNano     map[string]int64 `bson:"takenNano"`
	Attempts      []attemptDoc     `bson:"attempts,omitempty"`
}

// attemptDoc is one upstream attempt in a request_logs document.
type attemptDoc struct {
	KeyID     string `bson:"keyId"`
	Status    int    `bson:"status"`
	Reason    string `bson:"reason"`
	LatencyMs int64  `bson:"latencyMs"`
}

// newLogDoc is l as a document; a row without an id gets one.
func newLogDoc(l billing.RequestLog) *logDoc {
	id := l.ID
	if id.IsZero() {
		id = billing.NewLogID(l.CreatedAt)
	}
	d := &logDoc{
		ID: bson.ObjectID(id), UserID: l.UserID, UserKeyID: l.UserKeyID, TrollKeyID: l.TrollKeyID, Model: l.Model,
		InputTokens: l.InputTokens, OutputTokens: l.OutputTokens, CacheWriteTokens: l.CacheWriteTokens,
		CacheHitTokens: l.CacheHitTokens, CreditsCost: l.CreditsCost, CreditType: l.CreditType, TokensUsed: l.TokensUsed,
		StatusCode: l.StatusCode, LatencyMs: l.LatencyMs, IsSuccess: l.IsSuccess, CreatedAt: l.CreatedAt,
		FriendKeyID: l.FriendKeyID, RequestID: l.RequestID, CreditField: l.CreditField, Endpoint: l.Endpoint,
		Stream: l.Stream, UpstreamModel: l.UpstreamModel, UsageSource: l.UsageSource, EndReason: l.EndReason,
		CostNano: l.CostNano, ChargedNano: l.ChargedNano, Shortfall: l.Shortfall, ShortfallNano: l.ShortfallNano,
		HoldNano: l.HoldNano, TakenNano: l.TakenNano,
	}
	for _, a := range l.Attempts {
		d.Attempts = append(d.Attempts, attemptDoc(a))
	}
	return d
}

// InsertRequestLogs inserts the rows unordered, so that one bad row does
// not drop the rest. A row whose _id exists already was written before (a
// retry, a replay, the sweeper) and is not an error: the write is
// idempotent. Rows without an id get a fresh one.
func (s *Store) InsertRequestLogs(ctx context.Context, logs []billing.RequestLog) error {
	if len(logs) == 0 {
		return nil
	}
	docs := make([]any, len(logs))
	for i := range logs {
		docs[i] = newLogDoc(logs[i])
	}
	_, err := s.db.Collection(CollRequestLog).InsertMany(ctx, docs, options.InsertMany().SetOrdered(false))
	if err == nil {
		return nil
	}
	var bwe mongo.BulkWriteException
	if errors.As(err, &bwe) && bwe.WriteConcernError == nil {
		var rest []error
		for _, we := range bwe.WriteErrors {
			if we.Code != 11000 && we.Code != 11001 {
				rest = append(rest, we)
			}
		}
		if len(rest) == 0 {
			return nil
		}
		return fmt.Errorf("inserting request logs: %w", errors.Join(rest...))
	}
	return fmt.Errorf("inserting request logs: %w", err)
}

// AddUsage adds the usage counters the legacy proxy kept: user_keys
// tokensUsed (weighted), requestsCount and lastUsedAt; openhands_keys
// tokensUsed (input+output), requestsCount and lastUsedAt. Counters of the
// same key are summed into one update, which also sets
// llmUsage.<writer> to the batch's Seq and only applies to a document that
// does not have that Seq yet: sending a batch again never counts it twice.
func (s *Store) AddUsage(ctx context.Context, batch billing.UsageBatch) error {
	if batch.Seq == "" {
		return errors.New("adding usage: a batch needs a Seq")
	}
	mark := fUsage + "." + usageWriterField(batch.Writer)
	counters := batch.Counters
	type agg struct {
		tokens, requests int64
		last             time.Time
	}
	userKeys := map[string]*agg{}
	upKeys := map[string]*agg{}
	add := func(m map[string]*agg, id string, tokens int64, at time.Time) {
		a := m[id]
		if a == nil {
			a = &agg{}
			m[id] = a
		}
		// Clamped per request and saturated, so no $inc can overflow.
		a.tokens = billing.AddSat(a.tokens, billing.ClampTokens(tokens))
		a.requests++
		if at.After(a.last) {
			a.last = at
		}
	}
	for _, c := range counters {
		if c.UserKey != "" {
			add(userKeys, c.UserKey, c.WeightedTokens, c.At)
		}
		if c.UpstreamKeyID != "" {
			add(upKeys, c.UpstreamKeyID, c.RawTokens, c.At)
		}
	}
	write := func(coll string, m map[string]*agg) error {
		if len(m) == 0 {
			return nil
		}
		models := make([]mongo.WriteModel, 0, len(m))
		for id, a := range m {
			models = append(models, mongo.NewUpdateOneModel().
				SetFilter(bson.D{{Key: "_id", Value: id}, {Key: mark, Value: bson.D{{Key: "$ne", Value: batch.Seq}}}}).
				SetUpdate(bson.D{
					{Key: "$inc", Value: bson.D{{Key: "tokensUsed", Value: a.tokens}, {Key: "requestsCount", Value: a.requests}}},
					{Key: "$set", Value: bson.D{{Key: "lastUsedAt", Value: a.last}, {Key: mark, Value: batch.Seq}}},
				}))
		}
		_, err := s.db.Collection(coll).BulkWrite(ctx, models, options.BulkWrite().SetOrdered(false))
		if err != nil {
			return fmt.Errorf("updating %s usage: %w", coll, err)
		}
		return nil
	}
	return errors.Join(write(CollUserKeys, userKeys), write(CollKeys, upKeys))
}

// fUsage holds, in a user_keys or openhands_keys document, the Seq of the
// last usage batch of each writer that reached it.
const fUsage = "llmUsage"

// usageWriterField makes a writer name a field name: no dots, no leading $.
func usageWriterField(w string) string {
	if w == "" {
		return "_"
	}
	w = strings.ReplaceAll(w, ".", "_")
	if w[0] == '$' {
		w = "_" + w[1:]
	}
	return w
}

// Interface guards.
var (
	_ billing.Authenticator = (*Store)(nil)
	_ billing.KeyLoader     = (*Store)(nil)
	_ billing.Recorder      = (*Store)(nil)
)
