package billing

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"
)

// LogID is the 12-byte id of a request's log row (a MongoDB ObjectID). It is
// chosen when the request's hold is taken and kept in the hold, so every
// path that writes the row (the settlement, a replay, the sweeper) writes
// the same document.
type LogID [12]byte

// NewLogID returns an ObjectID-shaped id: the time in seconds, then 8
// random bytes.
func NewLogID(at time.Time) LogID {
	var id LogID
	s := uint32(at.Unix())
	id[0], id[1], id[2], id[3] = byte(s>>24), byte(s>>16), byte(s>>8), byte(s)
	_, _ = rand.Read(id[4:])
	return id
}

// String returns the id in hex, as MongoDB shows an ObjectID.
func (id LogID) String() string { return hex.EncodeToString(id[:]) }

// IsZero reports whether the id is unset.
func (id LogID) IsZero() bool { return id == LogID{} }

// HoldRequest asks for credit to be reserved before a request is forwarded.
type HoldRequest struct {
	RequestID string
	User      string
	Plan      CreditPlan
	// Want is the request's worst-case cost. The hold is Want, or what the
	// pool has when that is less.
	Want Nano
	// Min is the least the pool must have for the request to go ahead;
	// below it Reserve returns an *InsufficientError. With Min = 0 any
	// positive balance is enough.
	Min Nano
	// Input is the cost of the request's estimated input, what an orphaned
	// hold is charged under the charge_input policy.
	Input Nano
	// Owner identifies the process that holds it (see Heartbeat).
	Owner string
	At    time.Time
	// Expires is the end of the hold's lease: past it, the sweeper may
	// resolve the hold even if its owner is alive.
	Expires time.Time
	LogID   LogID
	// Model and KeyID (the client's key, masked) are kept with the hold so
	// that the log row of an orphaned hold still says what it was.
	Model string
	KeyID string
	// Clear names receipts of the same user whose log rows are written:
	// the hold's update drops them too, saving a write of its own. They
	// must exist (see Ledger.ClearReceipts); when Reserve fails they are
	// not dropped. At most MaxClear.
	Clear []string
}

// MaxClear is the most receipts one hold or lease flush drops with its
// own write (HoldRequest.Clear, LeaseFlush.Clear): each one is a field of
// the write's filter and update, and a write naming thousands is slow
// enough to time out. Ledger.ClearReceipts takes any number.
const MaxClear = 256

// CheckClear refuses a Clear list longer than MaxClear.
func CheckClear(ids []string) error {
	if len(ids) > MaxClear {
		return fmt.Errorf("a write may drop at most %d receipts, got %d", MaxClear, len(ids))
	}
	return nil
}

// Hold is credit reserved for one request.
type Hold struct {
	RequestID string
	User      string
	Plan      CreditPlan
	// Taken is what was reserved from each field of the plan, in order.
	Taken []Nano
	// Input is HoldRequest.Input, capped by the hold.
	Input   Nano
	Owner   string
	At      time.Time
	Expires time.Time
	LogID   LogID
	Model   string
	KeyID   string
	// Friend is the hold on a friend key's limit that goes with this one
	// (nil for other keys); settling or releasing the hold settles it too.
	Friend *FriendHold `json:",omitempty"`
	// Lease is the credit lease the hold was served from, in memory
	// (empty for a hold the store took; see LeaseLedger).
	Lease string `json:",omitempty"`
}

// Amount is the total reserved.
func (h Hold) Amount() Nano {
	var t Nano
	for _, n := range h.Taken {
		t += n
	}
	return t
}

// InsufficientError is returned by Reserve when the pool cannot cover the
// request's minimum: nothing was reserved.
type InsufficientError struct {
	// Balance is the pool's spendable total (fields below zero count as 0).
	Balance Nano
	// Need is the minimum that was asked for.
	Need Nano
}

func (e *InsufficientError) Error() string {
	return fmt.Sprintf("insufficient credits: balance %s, need %s", e.Balance, e.Need)
}

// SettleSource says who settled a hold.
type SettleSource string

// The settlers of a hold.
const (
	SettledByRequest SettleSource = "request" // the request's own settlement, billed
	SettledByRelease SettleSource = "release" // the request's own settlement, unbilled: no log row
	SettledBySweeper SettleSource = "sweeper" // the sweeper, for an orphaned hold
)

// SettleRequest resolves a hold with the request's exact cost.
type SettleRequest struct {
	Hold           Hold
	Cost           Nano
	Usage          Usage
	WeightedTokens int64
	By             SettleSource
}

// Receipt is what a settlement did to the balance. The store keeps it in
// the user's document, written in the same atomic update that releases the
// hold, until the request log row exists: so a settlement interrupted
// between the two writes is finished from the receipt, never applied twice
// and never left without its log row.
type Receipt struct {
	RequestID string
	LogID     LogID
	Fields    []string
	// Taken is what the request finally took from each field (the hold's
	// unused part given back, any cost above the hold added).
	Taken     []Nano
	Cost      Nano
	Charged   Nano
	Shortfall Nano
	By        SettleSource
	At        time.Time
}

// TakenByField returns Taken keyed by field name.
func (r Receipt) TakenByField() map[string]int64 {
	m := make(map[string]int64, len(r.Fields))
	for i, f := range r.Fields {
		if i < len(r.Taken) {
			m[f] = int64(r.Taken[i])
		}
	}
	return m
}

// ErrNoHold is returned by Settle when the hold is gone and no receipt is
// left: the request was settled and its log row written, by this caller
// earlier or by the sweeper.
var ErrNoHold = fmt.Errorf("hold already settled")

// Ledger reserves and settles credit. Every method is safe to call again
// with the same arguments (a retry after an error, a replay after a crash,
// another instance) without moving money twice.
type Ledger interface {
	// Reserve takes a hold: atomically, never driving a field below zero.
	// It returns *InsufficientError when the pool is below req.Min,
	// ErrUserNotFound when the user does not exist, and ErrNoHold when the
	// request's hold was taken and settled before and its receipt is still
	// kept (a request is held once). Asked again while the hold is out, it
	// returns that hold.
	Reserve(ctx context.Context, req HoldRequest) (Hold, error)
	// Settle releases a hold and charges the cost: the unused part of the
	// hold goes back; a cost above the hold is taken from what the pool
	// has, and what it cannot cover is the receipt's Shortfall. It returns
	// the receipt; applied is false when the hold had already been settled
	// (the receipt is then the earlier one, possibly the sweeper's). It
	// returns ErrNoHold when the hold and its receipt are both gone.
	Settle(ctx context.Context, req SettleRequest) (r Receipt, applied bool, err error)
	// SettleMany settles several holds at once, each with a cost within
	// its hold: the holds of one user and plan in one write, all or none of
	// them, and the writes of several users in as few round trips as the
	// store can. It returns ErrNotAllHeld when one of the holds was already
	// settled; the holds of other users may then have been settled, so the
	// caller settles each request again with Settle, which recognises them.
	SettleMany(ctx context.Context, reqs []SettleRequest) ([]Receipt, error)
	// ClearReceipts drops receipts whose request log rows are written.
	ClearReceipts(ctx context.Context, user string, requestIDs []string) error
	// Balances reads the user's balance fields now, in one round trip,
	// without a lock or a hold: for the pre-check of a user whose cached
	// balance looks empty. It returns ErrUserNotFound when the user does
	// not exist.
	Balances(ctx context.Context, user string) (Balances, error)
}

// ErrNotAllHeld is returned by SettleMany when one of the holds is gone.
var ErrNotAllHeld = fmt.Errorf("not every hold is still held")

// OrphanPolicy is what the sweeper charges for a hold whose request never
// settled (its process died, or the lease ran out).
type OrphanPolicy string

// The orphan policies.
const (
	// OrphanChargeInput charges the estimated input cost: the upstream
	// received the prompt; what it produced is unknown. The default.
	OrphanChargeInput OrphanPolicy = "charge_input"
	// OrphanChargeHold charges the whole hold: never gives tokens away,
	// may overcharge.
	OrphanChargeHold OrphanPolicy = "charge_hold"
	// OrphanRelease gives the whole hold back.
	OrphanRelease OrphanPolicy = "release"
)

// ParseOrphanPolicy validates a policy name.
func ParseOrphanPolicy(s string) (OrphanPolicy, error) {
	switch p := OrphanPolicy(s); p {
	case OrphanChargeInput, OrphanChargeHold, OrphanRelease:
		return p, nil
	}
	return "", fmt.Errorf("unknown orphan policy %q (want charge_input, charge_hold or release)", s)
}

// Cost is what the policy charges for h.
func (p OrphanPolicy) Cost(h Hold) Nano {
	switch p {
	case OrphanChargeHold:
		return h.Amount()
	case OrphanRelease:
		return 0
	}
	return min(h.Input, h.Amount())
}

// Orphan is a hold the sweeper found unresolved, or a receipt left without
// its log row.
type Orphan struct {
	Hold    Hold
	Receipt *Receipt // set when the hold is already settled but unlogged
}

// OrphanQuery says which holds and receipts the sweeper wants.
type OrphanQuery struct {
	Now time.Time
	// OwnerDeadline: a hold taken before it whose owner has not sent a
	// heartbeat since is orphaned.
	OwnerDeadline time.Time
	// Dead, when set, names owners known to be dead whatever their
	// heartbeat says (a restarted process's own earlier runs).
	Dead func(owner string) bool
	// ReceiptAge: receipts older than this are returned for their log rows.
	ReceiptAge time.Duration
	// Skip lists request ids the caller will settle itself.
	Skip map[string]bool
}

// Sweeper finds holds and receipts left behind by a crashed or stalled
// settlement. Resolving them goes through Settle, so several sweepers (one
// per instance) may run at once.
type Sweeper interface {
	// Heartbeat records that owner is alive at the given time.
	Heartbeat(ctx context.Context, owner string, at time.Time) error
	// Orphans returns the holds whose lease ended before q.Now, whose owner
	// is dead, or which were taken before q.OwnerDeadline by an owner
	// silent since; and the receipts older than q.ReceiptAge.
	Orphans(ctx context.Context, q OrphanQuery) ([]Orphan, error)
}
