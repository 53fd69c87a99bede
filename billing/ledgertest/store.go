// Package ledgertest is an in-memory billing ledger for tests and
// simulations: a Store with the semantics of the MongoDB store (package
// mongostore) for billing.LeaseLedger, billing.Sweeper and the request
// log, that fails on purpose when asked to (see Fault) and shows its whole
// state for invariant checks (see Snapshot).
//
// It is deterministic: it starts no goroutine, reads no wall clock unless
// given one (SetClock), and returns everything it lists in a fixed order.
// It is safe for concurrent use.
//
// Conformance holds a store to the semantics the MongoDB store shares with
// this one (tests/mongostore runs it there). The package imports testing:
// import it from tests only.
package ledgertest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// balanceFields are the balance fields a user has, in a fixed order.
var balanceFields = []string{billing.FieldCreditsNew, billing.FieldCredits, billing.FieldRefCredits}

// Store is an in-memory billing ledger. Like the MongoDB store it keeps,
// per user, the balance fields, the outstanding holds, the receipts of
// settled holds whose log rows are not confirmed, the net amount moved on
// each field (llmNet) and the counts of holds and receipts the sweeper
// selects users by (llmHeld, llmDoneN, kept exactly as the MongoDB store
// keeps them, drift included: see Snapshot.Check). Times are kept to the
// millisecond, as the MongoDB store packs them.
//
// A Store is one connection to its data: Conn opens another, with faults
// of its own. The zero Store is not usable; call New.
type Store struct {
	*data
	faults func(Op) Fault // guarded by mu
}

// data is what every connection of a store shares.
type data struct {
	mu        sync.Mutex
	users     map[string]*user
	instances map[string]time.Time
	logs      map[billing.LogID]billing.RequestLog
	logOrder  []billing.LogID
	dupLogs   int
	usage     []billing.UsageBatch
	usageSeen map[string]bool
	clock     func() time.Time
	seen      time.Time // the latest time given to the store
	nextLogID uint64
}

// user is one user document.
type user struct {
	initial  map[string]billing.Nano
	bal      map[string]billing.Nano
	net      map[string]billing.Nano
	charged  map[string]billing.Nano
	holds    map[string]billing.Hold
	receipts map[string]billing.Receipt
	held     int64 // llmHeld
	doneN    int64 // llmDoneN
	settled  int64 // settlements applied
}

// New returns an empty store without faults, whose clock is the latest
// time it was given (see SetClock).
func New() *Store {
	return &Store{data: &data{
		users:     map[string]*user{},
		instances: map[string]time.Time{},
		logs:      map[billing.LogID]billing.RequestLog{},
		usageSeen: map[string]bool{},
	}}
}

// Conn returns another connection to the same store: the same data, clock
// and lock, with its own fault hook (none at first, see SetFaults). Give
// each simulated gateway instance its own, so that one instance's database
// calls can fail while another's pass.
func (s *Store) Conn() *Store { return &Store{data: s.data} }

// SetClock sets the clock that stamps receipts (the MongoDB store uses the
// wall clock there). Without one, the store's time is the latest time it
// was given: a HoldRequest's At, a heartbeat's time, an OrphanQuery's Now.
func (s *Store) SetClock(now func() time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clock = now
}

// SetFaults sets the hook that decides the fault of each call on this
// connection; nil means none. The hook is called with the store's lock
// held (one lock for all connections), once per call that reaches the
// database (calls refused by validation never do), so it may use a seeded
// random source without a lock of its own, and it must not call the store.
func (s *Store) SetFaults(hook func(Op) Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = hook
}

// AddUser creates the user with the balances b. For a user that exists it
// adds b to the balances, as a top-up: what the user was given (the
// Initial of Snapshot) grows by b too.
func (s *Store) AddUser(id string, b billing.Balances) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.users[id]
	if u == nil {
		u = &user{
			initial: map[string]billing.Nano{}, bal: map[string]billing.Nano{}, net: map[string]billing.Nano{},
			charged: map[string]billing.Nano{}, holds: map[string]billing.Hold{}, receipts: map[string]billing.Receipt{},
		}
		s.users[id] = u
	}
	for _, f := range balanceFields {
		u.initial[f] += b.Field(f)
		u.bal[f] += b.Field(f)
	}
}

// now is the store's time; the lock is held.
func (s *Store) now() time.Time {
	if s.clock != nil {
		return s.clock()
	}
	return s.seen
}

// see advances the store's time to t when it is later; the lock is held.
func (s *Store) see(t time.Time) {
	if t.After(s.seen) {
		s.seen = t
	}
}

// enter locks the store and decides the call's fault. When it returns an
// error, nothing was applied and the store is unlocked; otherwise the
// caller unlocks it, and turns FailAfter into lost() once it has applied.
func (s *Store) enter(ctx context.Context, op Op) (Fault, error) {
	if err := ctx.Err(); err != nil {
		return Pass, err
	}
	s.mu.Lock()
	f := Pass
	if s.faults != nil {
		f = s.faults(op)
	}
	switch f {
	case FailBefore, Timeout:
		s.mu.Unlock()
		return f, &FaultError{Op: op, Fault: f}
	case Stall:
		s.mu.Unlock()
		if ctx.Done() == nil {
			return f, &FaultError{Op: op, Fault: f}
		}
		<-ctx.Done()
		return f, ctx.Err()
	}
	return f, nil
}

// validRequestID keeps a request id usable as a document field name, as
// the MongoDB store requires.
func validRequestID(id string) error {
	if id == "" || len(id) > 128 || strings.ContainsAny(id, ".$\x00") {
		return fmt.Errorf("request id %q cannot key a hold", id)
	}
	return nil
}

// ms truncates t to the millisecond, as a packed hold or receipt keeps it.
func ms(t time.Time) time.Time { return time.UnixMilli(t.UnixMilli()) }

func cloneHold(h billing.Hold) billing.Hold {
	h.Taken = slices.Clone(h.Taken)
	return h
}

func cloneReceipt(r billing.Receipt) billing.Receipt {
	r.Fields = slices.Clone(r.Fields)
	r.Taken = slices.Clone(r.Taken)
	return r
}

// Balances reads the user's balance fields; see billing.Ledger.
func (s *Store) Balances(ctx context.Context, id string) (billing.Balances, error) {
	f, err := s.enter(ctx, OpBalances)
	if err != nil {
		return billing.Balances{}, fmt.Errorf("reading balance: %w", err)
	}
	defer s.mu.Unlock()
	u := s.users[id]
	if f == FailAfter {
		return billing.Balances{}, fmt.Errorf("reading balance: %w", &FaultError{Op: OpBalances, Fault: f})
	}
	if u == nil {
		return billing.Balances{}, billing.ErrUserNotFound
	}
	return u.balances(), nil
}

func (u *user) balances() billing.Balances {
	return billing.Balances{CreditsNew: u.bal[billing.FieldCreditsNew], Credits: u.bal[billing.FieldCredits], RefCredits: u.bal[billing.FieldRefCredits]}
}

// takeFirstFirst takes amount from the fields, first to last, each giving
// at most what it has above zero; it returns what each gave.
func (u *user) takeFirstFirst(fields []string, amount billing.Nano) []billing.Nano {
	taken := make([]billing.Nano, len(fields))
	for i, f := range fields {
		if amount <= 0 {
			break
		}
		if v := u.bal[f]; v > 0 {
			taken[i] = min(v, amount)
			amount -= taken[i]
		}
	}
	return taken
}

// pool is what the plan's fields hold together, a field below zero
// counting as 0.
func (u *user) pool(fields []string) billing.Nano {
	var sum billing.Nano
	for _, f := range fields {
		if v := u.bal[f]; v > 0 {
			sum += v
		}
	}
	return sum
}

// move adds delta to a balance field and to its net.
func (u *user) move(field string, delta billing.Nano) {
	u.bal[field] += delta
	u.net[field] += delta
}

// clearExact drops the named receipts that exist and counts them out, as
// the MongoDB store's ClearReceipts does.
func (u *user) clearExact(ids []string) {
	for _, rid := range ids {
		if _, ok := u.receipts[rid]; ok {
			delete(u.receipts, rid)
			u.doneN--
		}
	}
}

var errNoPlan = errors.New("hold without a credit plan")
