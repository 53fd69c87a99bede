package ledgertest

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Snapshot is a copy of the whole store at one moment, for checking
// invariants between the steps of a test or simulation.
type Snapshot struct {
	// Users are the users, ordered by ID.
	Users []UserState
	// Logs are the request log rows by ID; LogOrder their IDs in the order
	// they were inserted.
	Logs     map[billing.LogID]billing.RequestLog
	LogOrder []billing.LogID
	// DuplicateLogs counts the rows whose insert was absorbed because a
	// row with the same ID existed.
	DuplicateLogs int
	// Heartbeats are the owners' last heartbeats.
	Heartbeats map[string]time.Time
	// Usage are the usage batches recorded, in order, each once.
	Usage []billing.UsageBatch
}

// UserState is one user in a Snapshot. Amounts per field are keyed by the
// balance field name (billing.FieldCredits, ...).
type UserState struct {
	ID string
	// Initial is what the user was given (AddUser, top-ups included).
	Initial billing.Balances
	// Balance is what the user has now.
	Balance billing.Balances
	// Holds are the outstanding holds, by request id; Held sums their
	// Taken per field.
	Holds []billing.Hold
	Held  map[string]billing.Nano
	// Receipts are the receipts not cleared yet, by request id.
	Receipts []billing.Receipt
	// Charged is what every settlement applied so far took, per field:
	// the store's own count, whatever became of the receipts.
	Charged map[string]billing.Nano
	// Net is the net amount the ledger moved on each field (the MongoDB
	// store's llmNet): holds taken are negative, parts given back positive.
	Net map[string]billing.Nano
	// HeldCount and ReceiptCount are the MongoDB store's llmHeld and
	// llmDoneN, kept as it keeps them: the sweeper looks only at users with
	// one of them above zero.
	HeldCount, ReceiptCount int64
	// Settled counts the settlements applied.
	Settled int64
}

// Snapshot returns a copy of the store's state.
func (s *Store) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := Snapshot{
		Logs: make(map[billing.LogID]billing.RequestLog, len(s.logs)), LogOrder: slices.Clone(s.logOrder),
		DuplicateLogs: s.dupLogs, Heartbeats: maps.Clone(s.instances), Usage: slices.Clone(s.usage),
	}
	for id, row := range s.logs {
		snap.Logs[id] = cloneLog(row)
	}
	for _, id := range sortedKeys(s.users) {
		u := s.users[id]
		us := UserState{
			ID: id, Initial: balancesOf(u.initial), Balance: u.balances(), Held: map[string]billing.Nano{},
			Charged: maps.Clone(u.charged), Net: maps.Clone(u.net), HeldCount: u.held, ReceiptCount: u.doneN, Settled: u.settled,
		}
		for _, rid := range sortedKeys(u.holds) {
			h := cloneHold(u.holds[rid])
			us.Holds = append(us.Holds, h)
			for i, f := range h.Plan.Fields() {
				us.Held[f] += h.Taken[i]
			}
		}
		for _, rid := range sortedKeys(u.receipts) {
			us.Receipts = append(us.Receipts, cloneReceipt(u.receipts[rid]))
		}
		snap.Users = append(snap.Users, us)
	}
	return snap
}

func balancesOf(m map[string]billing.Nano) billing.Balances {
	return billing.Balances{CreditsNew: m[billing.FieldCreditsNew], Credits: m[billing.FieldCredits], RefCredits: m[billing.FieldRefCredits]}
}

// User returns the state of the user id, and whether it exists.
func (snap Snapshot) User(id string) (UserState, bool) {
	i, ok := slices.BinarySearchFunc(snap.Users, id, func(u UserState, id string) int {
		switch {
		case u.ID < id:
			return -1
		case u.ID > id:
			return 1
		}
		return 0
	})
	if !ok {
		return UserState{}, false
	}
	return snap.Users[i], true
}

// Recorded is what the records say each settled request of the user took,
// per field: the log rows of the user's requests, once per request id
// however many rows it has, and the receipts of requests without a row
// yet. A row wins over a receipt of the same request: a receipt kept
// beside a row is either the same settlement waiting to be dropped, or the
// zero release of a request looked up again after the sweeper resolved
// and logged it (see settle's findHold); a second charge would show as a
// balance drop with no record.
func (snap Snapshot) Recorded(id string) map[string]billing.Nano {
	out := map[string]billing.Nano{}
	u, _ := snap.User(id)
	have := map[string]bool{}
	for _, lid := range snap.LogOrder {
		row := snap.Logs[lid]
		if row.UserID != id || have[row.RequestID] {
			continue
		}
		have[row.RequestID] = true
		for f, n := range row.TakenNano {
			out[f] += billing.Nano(n)
		}
	}
	for _, rc := range u.Receipts {
		if have[rc.RequestID] {
			continue
		}
		have[rc.RequestID] = true
		for i, f := range rc.Fields {
			out[f] += rc.Taken[i]
		}
	}
	return out
}

// Check verifies the money invariant and the store's bookkeeping, and
// returns every violation joined (nil when there is none). For each user
// and balance field:
//
//   - Balance + Held + Recorded == Initial: every nano that left the
//     balance is either held or recorded as charged, by a receipt or a log
//     row, exactly once. It fails when a charge has lost its record (a
//     receipt dropped before its log row was written), when a log row says
//     more or less than the settlement took, or when a settlement was given
//     a hold whose amounts are not the stored hold's.
//   - Balance + Held + Charged == Initial and Net == -(Held + Charged): the
//     store's own count of what settlements took agrees.
//   - the balance is not below zero (nor below Initial when that was
//     negative: the ledger never takes from a field below zero).
//
// And for the store: HeldCount and ReceiptCount equal the number of holds
// and receipts (the MongoDB store's counters can drift, and a receipt of a
// user whose counters read zero is never swept); no two log rows have the
// same request id (a request logged, so billed, twice).
//
// A credit lease is a hold like any other, whose Held shrinks as the holds
// served from it are charged: their settlements are charges and receipts
// like those of held requests.
func (snap Snapshot) Check() error {
	var errs []error
	for _, u := range snap.Users {
		rec := snap.Recorded(u.ID)
		for _, f := range balanceFields {
			bal, init, held := u.Balance.Field(f), u.Initial.Field(f), u.Held[f]
			if got := bal + held + rec[f]; got != init {
				errs = append(errs, fmt.Errorf("user %s %s: balance %d + held %d + recorded %d = %d, want %d (off by %d)",
					u.ID, f, bal, held, rec[f], got, init, got-init))
			}
			if got := bal + held + u.Charged[f]; got != init {
				errs = append(errs, fmt.Errorf("user %s %s: balance %d + held %d + charged %d = %d, want %d",
					u.ID, f, bal, held, u.Charged[f], got, init))
			}
			if u.Net[f] != -(held + u.Charged[f]) {
				errs = append(errs, fmt.Errorf("user %s %s: net %d, want -(held %d + charged %d)", u.ID, f, u.Net[f], held, u.Charged[f]))
			}
			if bal < 0 && bal < init {
				errs = append(errs, fmt.Errorf("user %s %s: balance %d below zero", u.ID, f, bal))
			}
		}
		if u.HeldCount != int64(len(u.Holds)) {
			errs = append(errs, fmt.Errorf("user %s: hold count %d, but %d holds", u.ID, u.HeldCount, len(u.Holds)))
		}
		if u.ReceiptCount != int64(len(u.Receipts)) {
			errs = append(errs, fmt.Errorf("user %s: receipt count %d, but %d receipts", u.ID, u.ReceiptCount, len(u.Receipts)))
		}
	}
	byRequest := map[string]billing.LogID{}
	for _, lid := range snap.LogOrder {
		row := snap.Logs[lid]
		if first, ok := byRequest[row.RequestID]; ok && row.RequestID != "" {
			errs = append(errs, fmt.Errorf("request %s logged twice: rows %s and %s", row.RequestID, first, lid))
			continue
		}
		byRequest[row.RequestID] = lid
	}
	return errors.Join(errs...)
}
