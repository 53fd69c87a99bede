package billing

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
)

// Credit field names of a usersNew document, as the legacy system and the
// backend use them.
const (
	FieldCreditsNew = "creditsNew"
	FieldCredits    = "credits"
	FieldRefCredits = "refCredits"
)

// CreditPlan is the ordered list of balance fields a site bills: the cost is
// taken from the first field, then from the next one when the first runs out.
// Only the plans the legacy deployments used are valid: creditsNew alone, and
// credits optionally followed by refCredits.
type CreditPlan struct {
	fields []string
}

// ParseCreditPlan validates the credit fields named by a site.
func ParseCreditPlan(fields []string) (CreditPlan, error) {
	switch {
	case len(fields) == 0:
		return CreditPlan{}, errors.New("no credit field given (want creditsNew, or credits [refCredits])")
	case len(fields) == 1 && (fields[0] == FieldCreditsNew || fields[0] == FieldCredits):
	case len(fields) == 2 && fields[0] == FieldCredits && fields[1] == FieldRefCredits:
	default:
		for _, f := range fields {
			if f != FieldCreditsNew && f != FieldCredits && f != FieldRefCredits {
				return CreditPlan{}, fmt.Errorf("unknown credit field %q (want creditsNew, or credits [refCredits])", f)
			}
		}
		return CreditPlan{}, fmt.Errorf("unsupported credit field combination %q (want creditsNew, or credits [refCredits])", strings.Join(fields, " "))
	}
	return CreditPlan{fields: append([]string(nil), fields...)}, nil
}

// MarshalJSON writes the plan as its list of fields.
func (p CreditPlan) MarshalJSON() ([]byte, error) { return json.Marshal(p.fields) }

// UnmarshalJSON reads a plan written by MarshalJSON and validates it.
func (p *CreditPlan) UnmarshalJSON(b []byte) error {
	var fields []string
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	if len(fields) == 0 {
		*p = CreditPlan{}
		return nil
	}
	q, err := ParseCreditPlan(fields)
	if err != nil {
		return err
	}
	*p = q
	return nil
}

// Fields returns the balance fields in the order they are spent.
func (p CreditPlan) Fields() []string { return p.fields }

// IsZero reports whether the plan is unset.
func (p CreditPlan) IsZero() bool { return len(p.fields) == 0 }

// UsedField is the lifetime counter incremented by the amount charged:
// creditsNewUsed for the creditsNew pool, creditsUsed for the credits pool.
func (p CreditPlan) UsedField() string {
	if p.isNew() {
		return "creditsNewUsed"
	}
	return "creditsUsed"
}

// TokensField is the weighted-token counter of the pool ("tokensUserNew"
// for creditsNew), or "" when the pool keeps none.
func (p CreditPlan) TokensField() string {
	if p.isNew() {
		return "tokensUserNew"
	}
	return ""
}

// CreditType is the request_logs.creditType the dashboard expects:
// "openhands" for creditsNew, "ohmygpt" for credits.
func (p CreditPlan) CreditType() string {
	if p.isNew() {
		return "openhands"
	}
	return "ohmygpt"
}

// String returns the fields joined by "+", e.g. "credits+refCredits".
func (p CreditPlan) String() string { return strings.Join(p.fields, "+") }

func (p CreditPlan) isNew() bool { return len(p.fields) > 0 && p.fields[0] == FieldCreditsNew }

// Principal is the identity an API key resolved to.
type Principal struct {
	// User is the billing username (usersNew._id).
	User string
	// Role is usersNew.role, lower-cased ("admin", "user", "priority", ...).
	Role string
	// InUserKeys is true when the key is a user_keys document, whose usage
	// counters are kept; false when it is usersNew.apiKey.
	InUserKeys bool
	// Balances are the user's balance fields as read with the key, so as
	// old as the key cache's entry: good for a cheap pre-check only (the
	// hold reads the balance afresh and is what decides).
	Balances Balances
	// Friend is set for a friend key: User is then its owner, who pays,
	// within the key's per-model limits.
	Friend *FriendKey
}

// Balances are the balance fields of a usersNew document, in nano-USD. A
// missing or non-numeric field reads as 0.
type Balances struct {
	CreditsNew Nano
	Credits    Nano
	RefCredits Nano
}

// Field returns the named balance field; 0 for an unknown name.
func (b Balances) Field(name string) Nano {
	switch name {
	case FieldCreditsNew:
		return b.CreditsNew
	case FieldCredits:
		return b.Credits
	case FieldRefCredits:
		return b.RefCredits
	}
	return 0
}

// Pool returns what plan's fields hold together, a field below zero
// counting as 0, as Reserve counts it (InsufficientError.Balance). It
// saturates instead of overflowing.
func (b Balances) Pool(plan CreditPlan) Nano {
	var sum Nano
	for _, f := range plan.Fields() {
		if v := b.Field(f); v > 0 {
			if sum > math.MaxInt64-v {
				return math.MaxInt64
			}
			sum += v
		}
	}
	return sum
}

// AuthFailure says why an API key was refused.
type AuthFailure uint8

// The reasons an API key can be refused, mirroring the legacy catalogue.
const (
	AuthInvalid             AuthFailure = iota + 1 // unknown key: 401
	AuthRevoked                                    // isActive false: 401
	AuthExpired                                    // expiresAt in the past: 402 credits_expired
	AuthMigrationRequired                          // migration not done and not admin: 403
	AuthFriendInactive                             // friend key isActive false: 401
	AuthFriendOwnerInactive                        // friend key owner isActive false: 401
)

// AuthError is returned by Authenticate for a key that is refused. Any other
// error is an infrastructure failure and must not be read as a refusal.
type AuthError struct{ Reason AuthFailure }

func (e *AuthError) Error() string {
	switch e.Reason {
	case AuthRevoked:
		return "api key revoked"
	case AuthExpired:
		return "credits expired"
	case AuthMigrationRequired:
		return "migration required"
	case AuthFriendInactive:
		return "friend key deactivated"
	case AuthFriendOwnerInactive:
		return "friend key owner inactive"
	}
	return "invalid api key"
}

// ErrUserNotFound is returned when the billed user document does not exist.
var ErrUserNotFound = errors.New("user not found")

// Authenticator resolves a client API key to a principal.
type Authenticator interface {
	Authenticate(ctx context.Context, key string) (Principal, error)
}

// UpstreamKey is one key of the upstream (OpenHands) key pool.
type UpstreamKey struct {
	ID            string
	APIKey        string
	Status        string
	CooldownUntil time.Time
}

// KeyLoader loads the upstream key pool and records what happened to a key.
type KeyLoader interface {
	LoadUpstreamKeys(ctx context.Context) ([]UpstreamKey, error)
	// MarkUpstreamKey sets a key's status, cooldown end (zero: none) and
	// last error, as the backend admin UI shows them.
	MarkUpstreamKey(ctx context.Context, id, status string, cooldownUntil time.Time, lastError string) error
	// RotateUpstreamKey replaces a key that failed for good by a spare from
	// openhands_backup_keys: exactly one caller wins for a given key, and
	// each spare is claimed once, even across instances. It returns the new
	// key's id, "" when the key was already rotated, ErrNoSpareKey when there
	// is no spare, or ErrRotationInProgress when another caller holds it.
	RotateUpstreamKey(ctx context.Context, id, reason string) (string, error)
	// CleanUsedSpares archives and deletes the spares used before cutoff,
	// each exactly once across instances; it returns how many it removed.
	CleanUsedSpares(ctx context.Context, cutoff time.Time) (int, error)
}

// Errors of KeyLoader.RotateUpstreamKey.
var (
	ErrNoSpareKey         = errors.New("no spare upstream key")
	ErrRotationInProgress = errors.New("upstream key rotation in progress elsewhere")
)

// RequestLog is the record of one billed request: the legacy fields the
// dashboard reads, then the gateway's own. The store decides how it is
// written (mongostore: one request_logs document).
type RequestLog struct {
	// ID identifies the row. It is chosen when the hold is taken, so that
	// writing the row again (a retry, a replay after a restart, the
	// sweeper) can never make a second one.
	ID               LogID
	UserID           string
	UserKeyID        string
	TrollKeyID       string
	Model            string
	InputTokens      int64
	OutputTokens     int64
	CacheWriteTokens int64
	CacheHitTokens   int64
	CreditsCost      float64
	CreditType       string
	TokensUsed       int64
	StatusCode       int
	LatencyMs        int64
	IsSuccess        bool
	CreatedAt        time.Time
	// FriendKeyID is the friend key, masked (MaskKey), when the request
	// used one: the dashboard's friend key filter reads it.
	FriendKeyID string

	RequestID     string
	CreditField   string
	Endpoint      string
	Stream        bool
	UpstreamModel string
	UsageSource   string
	EndReason     string
	CostNano      int64
	ChargedNano   int64
	Shortfall     float64
	ShortfallNano int64
	// HoldNano is the credit reserved before forwarding; TakenNano what
	// the request finally took from each balance field.
	HoldNano  int64
	TakenNano map[string]int64
	// Attempts lists every upstream attempt, the billed one last.
	Attempts []Attempt
}

// Attempt is one try of a request on one upstream key.
type Attempt struct {
	KeyID     string
	Status    int    // 0 for a transport error
	Reason    string // "ok", or why the key failed
	LatencyMs int64
}

// UsageCounters are the per-key counters kept beside a billed request.
type UsageCounters struct {
	// UserKey is user_keys._id, empty when the key is not in user_keys.
	// That _id is the client's API key itself, so it is never encoded
	// (json:"-"): a settlement journaled to disk does not carry it, and a
	// settlement replayed after a crash skips that one counter.
	UserKey        string `json:"-"`
	UpstreamKeyID  string // openhands_keys._id, empty for static keys
	WeightedTokens int64  // added to user_keys.tokensUsed
	RawTokens      int64  // input+output, added to openhands_keys.tokensUsed
	At             time.Time
}

// UsageBatch is one write of usage counters. Writer and Seq make it safe to
// send again after an error that left its outcome unknown: a key document
// keeps the Seq of the last batch of each Writer that reached it, and a
// batch it already has adds nothing. That holds as long as a writer sends
// its batches one at a time, each until it succeeds, before the next.
type UsageBatch struct {
	// Writer is stable for a gateway instance, across restarts (Caddy's
	// instance id), so that a key document keeps one mark per instance.
	Writer string
	// Seq is unique among the writer's batches, across restarts.
	Seq      string
	Counters []UsageCounters
}

// Recorder writes request logs and usage counters.
type Recorder interface {
	InsertRequestLogs(ctx context.Context, logs []RequestLog) error
	AddUsage(ctx context.Context, batch UsageBatch) error
}

// Store is everything the gateway needs from its database.
type Store interface {
	Authenticator
	LeaseLedger
	Sweeper
	KeyLoader
	Recorder
}

// FriendKeyPrefix starts every friend key (sk-trollllm-friend- and 64 hex
// digits): the owner's key for a friend, with per-model spending limits.
const FriendKeyPrefix = "sk-trollllm-friend-"

// MaskKey returns a key shortened for logs: its first 8 and last 4
// characters. Keys of 16 characters or fewer are fully masked.
func MaskKey(key string) string {
	if len(key) <= 16 {
		return "***"
	}
	return key[:8] + "..." + key[len(key)-4:]
}

// Settled completes the row of a billed request with what its settlement
// did (rc): what was charged, and from which fields. The shortfall is
// the receipt's, plus any part of CostNano above what was asked of the
// pool (a friend key's charge is capped by its hold).
func (l *RequestLog) Settled(rc Receipt) {
	l.ChargedNano = int64(rc.Charged)
	l.ShortfallNano = int64(rc.Shortfall) + max(l.CostNano-int64(rc.Cost), 0)
	l.Shortfall = Nano(l.ShortfallNano).USD()
	l.TakenNano = rc.TakenByField()
}

// OrphanRequestLog is the row of a hold the sweeper resolved under policy,
// or of a receipt whose row was never written: what the hold and the
// receipt say.
func OrphanRequestLog(h Hold, rc Receipt, policy OrphanPolicy) RequestLog {
	source, end := SourceHoldFallback, "orphaned:"+string(policy)
	if rc.By == SettledByRequest {
		source, end = SourceReceipt, "recovered"
	}
	return RequestLog{
		ID: rc.LogID, UserID: h.User, UserKeyID: h.KeyID, Model: h.Model,
		CreditsCost: rc.Cost.USD(), CreditType: h.Plan.CreditType(), StatusCode: 200, IsSuccess: true, CreatedAt: rc.At,
		RequestID: h.RequestID, CreditField: h.Plan.String(), UsageSource: source, EndReason: end,
		CostNano: int64(rc.Cost), ChargedNano: int64(rc.Charged), ShortfallNano: int64(rc.Shortfall), Shortfall: rc.Shortfall.USD(),
		HoldNano: int64(h.Amount()), TakenNano: rc.TakenByField(),
	}
}
