package billing

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strconv"
	"strings"
	"time"
)

// A credit lease is a slice of a user's pool that one instance holds so it
// can serve that user's holds from memory. In the store a lease is a hold
// like any other (taken by Ledger.Reserve, found by the sweeper), whose
// request id says it is a lease (LeaseID) and whose amount changes as the
// requests served from it are charged (LeaseLedger.FlushLease). A hold
// served from a lease has Hold.Lease set and does not exist in the store
// until its settlement is written.

// leasePrefix starts every lease id; request ids are Caddy's UUIDs, which
// never do.
const leasePrefix = "lease-"

// LeaseID names the n-th lease an owner takes: the same owner and n always
// give the same id, so a Reserve retried after a lost answer finds the
// lease it took.
func LeaseID(owner string, n uint64) string {
	sum := sha256.Sum256([]byte(owner))
	return leasePrefix + hex.EncodeToString(sum[:8]) + "-" + strconv.FormatUint(n, 10)
}

// IsLease reports whether a hold's request id names a lease.
func IsLease(requestID string) bool { return strings.HasPrefix(requestID, leasePrefix) }

// ErrLeaseMoved is returned by FlushLease when the lease in the store is
// not the one the flush names: it is gone (closed by the sweeper) or holds
// something else. Nothing was written.
var ErrLeaseMoved = errors.New("credit lease changed in the store")

// LeaseFlush is one write on a lease: it charges requests served from the
// lease, and keeps, shrinks or closes it.
type LeaseFlush struct {
	// Lease is the lease as the store holds it now: as Reserve or the
	// previous FlushLease returned it.
	Lease Hold
	// Settles are requests served from the lease (Hold.Lease is
	// Lease.RequestID), each with a cost within its hold, which is part of
	// the lease. What each costs leaves the lease and is charged; the rest
	// of its hold stays in the lease.
	Settles []SettleRequest
	// Keep, when set, is what the lease holds after the flush, field by
	// field, at most what it holds once Settles are charged: the rest goes
	// back to the pool. Nil keeps it all. Ignored with Close.
	Keep []Nano
	// Expires, when set, is the lease's new expiry.
	Expires time.Time
	// Close drops the lease: what it holds once Settles are charged goes
	// back to the pool.
	Close bool
	// Clear names receipts of the same user whose log rows are written,
	// dropped by the same write (as HoldRequest.Clear). At most MaxClear.
	Clear []string
}

// RequestIDs lists every request id f names: the lease's, the receipts it
// clears, and its settlements', for a store to check that each can key a
// hold or a receipt.
func (f LeaseFlush) RequestIDs() []string {
	ids := append([]string{f.Lease.RequestID}, f.Clear...)
	for _, st := range f.Settles {
		ids = append(ids, st.Hold.RequestID)
	}
	return ids
}

// LeaseLedger is what credit leases need from a store beyond a Ledger.
//
// Its Ledger's Settle also settles a hold served from a lease (Hold.Lease
// set), which the store has never seen: exactly once, recognising a request
// settled before by its receipt, or by its request log row once the
// receipt is dropped (then ErrNoHold). The part of the cost within the hold
// is taken from the lease while the lease exists, and from the pool once
// it is gone (its remainder went back there); a cost above the hold is
// taken from the pool as for any hold.
type LeaseLedger interface {
	Ledger
	// FlushLease applies f in one conditional write on the user's
	// document: only while the lease is exactly f.Lease and none of
	// f.Settles has a receipt. It returns the lease as it is after the
	// write (zero when closed) and the settlements' receipts. It returns
	// ErrLeaseMoved when the lease is not f.Lease, and ErrNotAllHeld when
	// one of f.Settles has a receipt already: nothing is written. Asked
	// again after an answer was lost, it recognises the write it made
	// (the lease is what that write left, or gone after a Close, and every
	// settlement has its receipt) and returns the same.
	FlushLease(ctx context.Context, f LeaseFlush) (Hold, []Receipt, error)
}

// Carve splits amount over the lease's free part, field by field, first
// field first, and reports whether it fits: free is what the lease holds
// minus what its outstanding holds took.
func Carve(free []Nano, amount Nano) ([]Nano, bool) {
	out := make([]Nano, len(free))
	rest := amount
	for i, f := range free {
		out[i] = max(min(rest, f), 0)
		rest -= out[i]
	}
	return out, rest == 0
}

// SplitCost is what a settlement of cost takes from each field of a hold
// that took taken: the cost within the hold, first field first. The rest
// of the hold is its unused part.
func SplitCost(taken []Nano, cost Nano) []Nano {
	keep := make([]Nano, len(taken))
	rest := min(cost, sumNano(taken))
	for i, t := range taken {
		keep[i] = min(rest, t)
		rest -= keep[i]
	}
	return keep
}

func sumNano(ns []Nano) Nano {
	var t Nano
	for _, n := range ns {
		t += n
	}
	return t
}
