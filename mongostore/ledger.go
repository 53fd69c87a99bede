package mongostore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// The gateway's bookkeeping fields in a usersNew document, exported for the
// packages that read them (reconcile). The backend ignores these fields.
//
//   - llmHolds.<requestId>: an outstanding hold, packed in one string
//     (EncodeHold).
//   - llmHeld: the number of outstanding holds, so the sweeper finds them.
//   - llmDone.<requestId>: the receipt of a settled hold whose request log
//     row is not confirmed yet, packed (EncodeReceipt).
//   - llmDoneN: the number of receipts.
//   - llmNet.<field>: the net amount, in nano-USD, the gateway has moved on
//     each balance field: holds taken are negative, unused parts given back
//     positive. Once every hold is settled it is minus the total charged,
//     which is what the reconciliation checks against the request logs.
//
// Every write of a balance field changes it and llmNet in the same update.
const (
	FieldHolds     = "llmHolds"
	FieldHeld      = "llmHeld"
	FieldDone      = "llmDone"
	FieldDoneCount = "llmDoneN"
	FieldNet       = "llmNet"
)

// validRequestID keeps a request id usable as a document field name.
func validRequestID(id string) error {
	if id == "" || len(id) > 128 || strings.ContainsAny(id, ".$\x00") {
		return fmt.Errorf("request id %q cannot key a hold", id)
	}
	return nil
}

func nanos(ns []billing.Nano) []int64 {
	out := make([]int64, len(ns))
	for i, n := range ns {
		out[i] = int64(n)
	}
	return out
}

func fromNanos(ns []int64) []billing.Nano {
	out := make([]billing.Nano, len(ns))
	for i, n := range ns {
		out[i] = billing.Nano(n)
	}
	return out
}

// Reserve takes a hold on the plan's fields: Want, or what the pool has
// when that is less, first field first, never driving a field below zero.
// It is one conditional update when the first field covers Want; otherwise
// a read, then a compare-and-set on the values read.
func (s *Store) Reserve(ctx context.Context, req billing.HoldRequest) (billing.Hold, error) {
	if err := validRequestID(req.RequestID); err != nil {
		return billing.Hold{}, err
	}
	if err := billing.CheckClear(req.Clear); err != nil {
		return billing.Hold{}, fmt.Errorf("taking a hold: %w", err)
	}
	fields := req.Plan.Fields()
	if len(fields) == 0 {
		return billing.Hold{}, errors.New("hold without a credit plan")
	}
	unlock, err := s.lockUser(ctx, req.User)
	if err != nil {
		return billing.Hold{}, err
	}
	defer unlock()
	h := billing.Hold{
		RequestID: req.RequestID, User: req.User, Plan: req.Plan, Taken: make([]billing.Nano, len(fields)),
		Owner: req.Owner, At: req.At, Expires: req.Expires, LogID: req.LogID, Model: req.Model, KeyID: req.KeyID,
	}
	if req.Want >= req.Min {
		// Fast path: one conditional update.
		ok, err := s.reserveWanted(ctx, req, fields, h.Taken)
		if err != nil {
			return billing.Hold{}, err
		}
		if ok {
			h.Input = min(req.Input, h.Amount())
			return h, nil
		}
	}
	// Slow path: read what the pool has and take it conditionally.
	for attempt := 0; attempt < casAttempts; attempt++ {
		done, err := s.reserveAvailable(ctx, req, fields, &h)
		if err != nil {
			return billing.Hold{}, err
		}
		if done {
			return h, nil
		}
	}
	return billing.Hold{}, fmt.Errorf("taking a hold on %s: balance kept changing after %d attempts", req.Plan, casAttempts)
}

// reserveWanted takes req.Want from the first field of the plan (or, for a
// zero hold, checks that the pool has something) in one conditional
// update, and reports whether it matched. taken receives the amounts.
func (s *Store) reserveWanted(ctx context.Context, req billing.HoldRequest, fields []string, taken []billing.Nano) (bool, error) {
	notHeld := bson.E{Key: FieldHolds + "." + req.RequestID, Value: bson.D{{Key: "$exists", Value: false}}}
	notDone := bson.E{Key: FieldDone + "." + req.RequestID, Value: bson.D{{Key: "$exists", Value: false}}}
	var filter bson.D
	if req.Want > 0 {
		taken[0] = req.Want
		filter = bson.D{{Key: "_id", Value: req.User}, {Key: fields[0], Value: bson.D{{Key: "$gte", Value: req.Want.USD()}}}, notHeld, notDone}
		filter = append(filter, receiptsKept(req.Clear)...)
	} else {
		// A zero hold ("check" sizing): the pool must have something.
		any := bson.A{}
		for _, f := range fields {
			any = append(any, bson.D{{Key: f, Value: bson.D{{Key: "$gt", Value: 0}}}})
		}
		filter = bson.D{{Key: "_id", Value: req.User}, {Key: "$or", Value: any}, notHeld, notDone}
		filter = append(filter, receiptsKept(req.Clear)...)
	}
	r, err := s.db.Collection(CollUsers).UpdateOne(ctx, filter, s.reserveUpdate(req, fields, taken, nil))
	if err != nil {
		return false, fmt.Errorf("taking a hold: %w", err)
	}
	if r.MatchedCount != 1 {
		taken[0] = 0
		return false, nil
	}
	return true, nil
}

// reserveAvailable reads the pool and takes what it can of req.Want (at
// least req.Min) on the condition that the balances are still what it read.
// It reports done when h is final: taken now, or found taken before (a
// retry of the same request is idempotent). A changed balance is not done.
func (s *Store) reserveAvailable(ctx context.Context, req billing.HoldRequest, fields []string, h *billing.Hold) (bool, error) {
	holdPath := FieldHolds + "." + req.RequestID
	vals, held, settled, err := s.readForHold(ctx, req.User, fields, req.RequestID)
	if err != nil {
		return false, err
	}
	if settled && held == nil {
		// Held and settled before, its receipt still kept: a request is
		// held once, and a second hold would write a second receipt.
		return false, billing.ErrNoHold
	}
	var avail billing.Nano
	for _, fv := range vals {
		if fv.v > 0 {
			avail += billing.NanoFromUSD(fv.v)
		}
	}
	if held == nil && (avail <= 0 || avail < req.Min) {
		return false, &billing.InsufficientError{Balance: avail, Need: req.Min}
	}
	if len(req.Clear) > 0 {
		// Some of them may be gone (the fast path requires them all):
		// drop exactly those still kept, then hold without them.
		if err := s.clearReceipts(ctx, req.User, req.Clear); err != nil {
			return false, err
		}
		req.Clear = nil
	}
	if held != nil {
		// Taken already: idempotent.
		*h = *held
		h.RequestID, h.User = req.RequestID, req.User
		return true, nil
	}
	want := min(req.Want, avail)
	takes, taken, conds := takeFrom(fields, vals, want)
	notHeld := bson.E{Key: holdPath, Value: bson.D{{Key: "$exists", Value: false}}}
	filter := append(bson.D{{Key: "_id", Value: req.User}, notHeld}, conds...)
	if want == 0 {
		// A zero hold: what was seen positive must still be.
		filter = bson.D{{Key: "_id", Value: req.User}, notHeld}
		for i, fv := range vals {
			if fv.v > 0 {
				filter = append(filter, bson.E{Key: fields[i], Value: bson.D{{Key: "$gt", Value: 0}}})
				break
			}
		}
	}
	r, err := s.db.Collection(CollUsers).UpdateOne(ctx, filter, s.reserveUpdate(req, fields, taken, takes))
	if err != nil {
		return false, fmt.Errorf("taking a hold: %w", err)
	}
	if r.MatchedCount != 1 {
		return false, nil
	}
	h.Taken = taken
	h.Input = min(req.Input, h.Amount())
	return true, nil
}

// takeFrom plans taking amount from the fields, first to last, as they
// were read: a field that covers the rest gives it under a $gte condition;
// one that does not is drained to exactly zero (its $inc is the double read)
// under an equality condition; fields not needed only keep what they had,
// so the order "first field first" still holds when the update applies. It
// returns the doubles to decrement by, the Nano taken and the conditions.
func takeFrom(fields []string, vals []fieldValue, amount billing.Nano) ([]float64, []billing.Nano, bson.D) {
	takes := make([]float64, len(fields))
	taken := make([]billing.Nano, len(fields))
	var conds bson.D
	remaining := amount
	for i, fv := range vals {
		avail := billing.Nano(0)
		if fv.v > 0 {
			avail = billing.NanoFromUSD(fv.v)
		}
		var cond any
		switch {
		case remaining <= 0:
			continue
		case avail > remaining:
			takes[i], taken[i] = remaining.USD(), remaining
			cond = bson.D{{Key: "$gte", Value: remaining.USD()}}
			remaining = 0
		case avail > 0:
			takes[i], taken[i] = fv.v, avail
			cond = fv.v
			remaining -= avail
		case fv.present:
			cond = fv.v
		default:
			cond = bson.D{{Key: "$exists", Value: false}}
		}
		conds = append(conds, bson.E{Key: fields[i], Value: cond})
	}
	return takes, taken, conds
}

// receiptsKept is the filter that every receipt named exists: a hold's
// update counts each one it names as dropped.
func receiptsKept(ids []string) bson.D {
	out := make(bson.D, 0, len(ids))
	for _, rid := range ids {
		out = append(out, bson.E{Key: FieldDone + "." + rid, Value: bson.D{{Key: "$exists", Value: true}}})
	}
	return out
}

// reserveUpdate takes taken[i] from fields[i] (as the exact doubles takes[i]
// when given, for fields drained to zero) and records the hold.
func (s *Store) reserveUpdate(req billing.HoldRequest, fields []string, taken []billing.Nano, takes []float64) bson.D {
	inc := bson.D{{Key: FieldHeld, Value: int64(1)}}
	for i, t := range taken {
		if t == 0 {
			continue
		}
		usd := t.USD()
		if takes != nil {
			usd = takes[i]
		}
		inc = append(inc, bson.E{Key: fields[i], Value: -usd}, bson.E{Key: FieldNet + "." + fields[i], Value: -int64(t)})
	}
	var amount billing.Nano
	for _, t := range taken {
		amount += t
	}
	packed := EncodeHold(billing.Hold{
		Plan: req.Plan, Taken: taken, Input: min(req.Input, amount), Owner: req.Owner, At: req.At, Expires: req.Expires,
		LogID: req.LogID, Model: req.Model, KeyID: req.KeyID,
	})
	upd := bson.D{
		{Key: "$inc", Value: inc},
		{Key: "$set", Value: bson.D{{Key: FieldHolds + "." + req.RequestID, Value: packed}}},
	}
	if len(req.Clear) > 0 {
		unset := bson.D{}
		for _, rid := range req.Clear {
			unset = append(unset, bson.E{Key: FieldDone + "." + rid, Value: ""})
		}
		upd = append(upd, bson.E{Key: "$unset", Value: unset})
		upd[0].Value = append(inc, bson.E{Key: FieldDoneCount, Value: -int64(len(req.Clear))})
	}
	return upd
}

// readForHold reads the plan's fields and the hold, if any.
func (s *Store) readForHold(ctx context.Context, user string, fields []string, requestID string) ([]fieldValue, *billing.Hold, bool, error) {
	holdPath, donePath := FieldHolds+"."+requestID, FieldDone+"."+requestID
	proj := bson.D{{Key: holdPath, Value: 1}, {Key: donePath, Value: 1}}
	for _, f := range fields {
		proj = append(proj, bson.E{Key: f, Value: 1})
	}
	var raw bson.Raw
	err := s.db.Collection(CollUsers).FindOne(ctx, bson.D{{Key: "_id", Value: user}}, options.FindOne().SetProjection(proj)).Decode(&raw)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil, nil, false, billing.ErrUserNotFound
	}
	if err != nil {
		return nil, nil, false, fmt.Errorf("reading balance: %w", err)
	}
	vals, err := fieldValues(raw, fields)
	if err != nil {
		return nil, nil, false, err
	}
	var held *billing.Hold
	if v, err := raw.LookupErr(strings.Split(holdPath, ".")...); err == nil {
		h, err := unpackHold(v)
		if err != nil {
			return nil, nil, false, fmt.Errorf("reading hold: %w", err)
		}
		held = &h
	}
	_, err = raw.LookupErr(strings.Split(donePath, ".")...)
	return vals, held, err == nil, nil
}

// fieldValues reads the balance fields from a user document.
func fieldValues(raw bson.Raw, fields []string) ([]fieldValue, error) {
	vals := make([]fieldValue, len(fields))
	for i, f := range fields {
		v, err := raw.LookupErr(f)
		if err != nil || v.Type == bson.TypeNull {
			continue
		}
		var x any
		if err := v.Unmarshal(&x); err != nil {
			return nil, fmt.Errorf("balance field %s: %w", f, err)
		}
		n, ok := toFloat(x)
		if !ok {
			return nil, fmt.Errorf("balance field %s has type %s, want a number", f, v.Type)
		}
		vals[i] = fieldValue{v: n, present: true}
	}
	return vals, nil
}

// unpackHold reads a hold as the store writes it (EncodeHold).
func unpackHold(v bson.RawValue) (billing.Hold, error) {
	str, ok := v.StringValueOK()
	if !ok {
		return billing.Hold{}, fmt.Errorf("hold is %s, not a packed string", v.Type)
	}
	return DecodeHold(str)
}

// unpackReceipt reads a receipt as the store writes it (EncodeReceipt).
func unpackReceipt(rid string, v bson.RawValue) (billing.Receipt, error) {
	str, ok := v.StringValueOK()
	if !ok {
		return billing.Receipt{}, fmt.Errorf("receipt is %s, not a packed string", v.Type)
	}
	r, _, err := DecodeReceipt(str)
	r.RequestID = rid
	return r, err
}

// Settle releases the hold and charges the cost, in one conditional update
// that also leaves the receipt; see billing.Ledger. A hold served from a
// lease is settled as billing.LeaseLedger says (settleCarved); a lease
// itself is refused (billing.ErrCarvedLease).
func (s *Store) Settle(ctx context.Context, req billing.SettleRequest) (billing.Receipt, bool, error) {
	h := req.Hold
	if err := validRequestID(h.RequestID); err != nil {
		return billing.Receipt{}, false, err
	}
	if billing.IsLease(h.RequestID) {
		return billing.Receipt{}, false, fmt.Errorf("settling %s: %w", h.RequestID, billing.ErrCarvedLease)
	}
	fields := h.Plan.Fields()
	if len(fields) == 0 || len(h.Taken) != len(fields) {
		return billing.Receipt{}, false, errors.New("settling a hold without its credit plan")
	}
	if req.Cost < 0 {
		return billing.Receipt{}, false, errors.New("settling a negative cost")
	}
	if h.Lease != "" {
		return s.settleCarved(ctx, req)
	}
	unlock, err := s.lockUser(ctx, h.User)
	if err != nil {
		return billing.Receipt{}, false, err
	}
	defer unlock()
	st := s.newSettling(req, fields)
	extra := st.rc.Shortfall
	held := bson.D{{Key: "_id", Value: h.User}, {Key: FieldHolds + "." + h.RequestID, Value: bson.D{{Key: "$exists", Value: true}}}}
	if extra == 0 {
		ok, err := st.apply(ctx, held, nil, nil)
		if err != nil || ok {
			return st.rc, ok, err
		}
		return s.readReceipt(ctx, h.User, h.RequestID)
	}
	// A cost above the hold: the first field covers the rest...
	ok, err := st.apply(ctx, append(held, bson.E{Key: fields[0], Value: bson.D{{Key: "$gte", Value: extra.USD()}}}),
		[]float64{extra.USD()}, []billing.Nano{extra})
	if err != nil || ok {
		return st.rc, ok, err
	}
	// ...or what the fields have is taken, draining them to zero.
	for attempt := 0; attempt < casAttempts; attempt++ {
		vals, hd, _, err := s.readForHold(ctx, h.User, fields, h.RequestID)
		if err != nil {
			return billing.Receipt{}, false, err
		}
		if hd == nil {
			return s.readReceipt(ctx, h.User, h.RequestID)
		}
		takes, taken, conds := takeFrom(fields, vals, extra)
		ok, err := st.apply(ctx, append(slices.Clone(held), conds...), takes, taken)
		if err != nil || ok {
			return st.rc, ok, err
		}
	}
	return billing.Receipt{}, false, fmt.Errorf("settling a hold on %s: balance kept changing after %d attempts", h.Plan, casAttempts)
}

// settling is one hold's settlement on its way into the user's document:
// the receipt it writes, at first for the part of the cost the hold covers.
type settling struct {
	s      *Store
	req    billing.SettleRequest
	fields []string
	keep   []billing.Nano // what is kept of each field's hold, first field first
	rc     billing.Receipt
}

// newSettling splits the cost over the hold, first field first; the rest
// of the hold goes back, and the cost above it is the shortfall until
// something more is taken (apply).
func (s *Store) newSettling(req billing.SettleRequest, fields []string) *settling {
	h := req.Hold
	within := min(req.Cost, h.Amount())
	keep := make([]billing.Nano, len(fields))
	rest := within
	for i, t := range h.Taken {
		keep[i] = min(rest, t)
		rest -= keep[i]
	}
	return &settling{s: s, req: req, fields: fields, keep: keep, rc: billing.Receipt{
		RequestID: h.RequestID, LogID: h.LogID, Fields: fields, Taken: keep,
		Cost: req.Cost, Charged: within, Shortfall: req.Cost - within, By: req.By, At: s.now(),
	}}
}

// apply settles under filter, taking extraTaken (extraTakes in USD) beyond
// the hold, and reports whether the filter matched; st.rc is then what was
// written.
func (st *settling) apply(ctx context.Context, filter bson.D, extraTakes []float64, extraTaken []billing.Nano) (bool, error) {
	r := st.rc
	r.Taken = append([]billing.Nano(nil), st.keep...)
	for i, t := range extraTaken {
		r.Taken[i] += t
		r.Charged += t
		r.Shortfall -= t
	}
	update := st.s.settleUpdate(st.req, st.fields, st.keep, extraTakes, extraTaken, r)
	res, err := st.s.db.Collection(CollUsers).UpdateOne(ctx, filter, update)
	if err != nil {
		return false, fmt.Errorf("settling a hold: %w", err)
	}
	if res.MatchedCount != 1 {
		return false, nil
	}
	st.rc = r
	return true, nil
}

// settleUpdate gives back the hold's unused part, takes any cost above the
// hold, moves the pool's counters, drops the hold and leaves the receipt.
func (s *Store) settleUpdate(req billing.SettleRequest, fields []string, keep []billing.Nano, extraTakes []float64, extraTaken []billing.Nano, rc billing.Receipt) bson.D {
	h := req.Hold
	inc := bson.D{{Key: FieldHeld, Value: int64(-1)}, {Key: FieldDoneCount, Value: int64(1)}}
	for i, f := range fields {
		back := h.Taken[i] - keep[i]
		var take billing.Nano
		var takeUSD float64
		if i < len(extraTaken) {
			take, takeUSD = extraTaken[i], extraTakes[i]
		}
		delta := back - take
		if delta == 0 {
			continue
		}
		usd := back.USD() - takeUSD // back > 0 and take > 0 never happen together
		inc = append(inc, bson.E{Key: f, Value: usd}, bson.E{Key: FieldNet + "." + f, Value: int64(delta)})
	}
	var use usageSum
	use.add(req, rc.Charged)
	inc = use.incs(inc, h.Plan)
	return bson.D{
		{Key: "$inc", Value: inc},
		{Key: "$unset", Value: bson.D{{Key: FieldHolds + "." + h.RequestID, Value: ""}}},
		{Key: "$set", Value: bson.D{{Key: FieldDone + "." + h.RequestID, Value: EncodeReceipt(rc, h.Plan)}}},
	}
}

// readReceipt returns the receipt of a hold settled earlier.
func (s *Store) readReceipt(ctx context.Context, user, rid string) (billing.Receipt, bool, error) {
	var raw bson.Raw
	err := s.db.Collection(CollUsers).FindOne(ctx, bson.D{{Key: "_id", Value: user}},
		options.FindOne().SetProjection(bson.D{{Key: FieldDone + "." + rid, Value: 1}})).Decode(&raw)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return billing.Receipt{}, false, billing.ErrUserNotFound
	}
	if err != nil {
		return billing.Receipt{}, false, fmt.Errorf("reading a receipt: %w", err)
	}
	v, err := raw.LookupErr(FieldDone, rid)
	if err != nil {
		return billing.Receipt{}, false, billing.ErrNoHold
	}
	rc, err := unpackReceipt(rid, v)
	if err != nil {
		return billing.Receipt{}, false, fmt.Errorf("reading a receipt: %w", err)
	}
	return rc, false, nil
}

// ClearReceipts drops the receipts of requests whose log rows are written,
// keeping the receipt count exact, billing.MaxClear at a time: one
// conditional update for one receipt, a read of which still exist then one
// update for several.
func (s *Store) ClearReceipts(ctx context.Context, user string, requestIDs []string) error {
	for len(requestIDs) > 0 {
		n := min(len(requestIDs), billing.MaxClear)
		if err := s.clearLocked(ctx, user, requestIDs[:n]); err != nil {
			return err
		}
		requestIDs = requestIDs[n:]
	}
	return nil
}

// clearLocked is clearReceipts under the user's lock.
func (s *Store) clearLocked(ctx context.Context, user string, requestIDs []string) error {
	unlock, err := s.lockUser(ctx, user)
	if err != nil {
		return err
	}
	defer unlock()
	return s.clearReceipts(ctx, user, requestIDs)
}

// clearReceipts drops at most billing.MaxClear receipts under the user's
// lock.
func (s *Store) clearReceipts(ctx context.Context, user string, requestIDs []string) error {
	users := s.db.Collection(CollUsers)
	if len(requestIDs) == 1 {
		// The common case: one conditional update.
		path := FieldDone + "." + requestIDs[0]
		_, err := users.UpdateOne(ctx, bson.D{{Key: "_id", Value: user}, {Key: path, Value: bson.D{{Key: "$exists", Value: true}}}}, bson.D{
			{Key: "$unset", Value: bson.D{{Key: path, Value: ""}}},
			{Key: "$inc", Value: bson.D{{Key: FieldDoneCount, Value: int64(-1)}}},
		})
		if err != nil {
			return fmt.Errorf("clearing a receipt: %w", err)
		}
		return nil
	}
	proj := bson.D{}
	for _, rid := range requestIDs {
		proj = append(proj, bson.E{Key: FieldDone + "." + rid, Value: 1})
	}
	var doc struct {
		Done map[string]bson.RawValue `bson:"llmDone"`
	}
	err := users.FindOne(ctx, bson.D{{Key: "_id", Value: user}}, options.FindOne().SetProjection(proj)).Decode(&doc)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading receipts: %w", err)
	}
	if len(doc.Done) == 0 {
		return nil
	}
	unset := bson.D{}
	for rid := range doc.Done {
		unset = append(unset, bson.E{Key: FieldDone + "." + rid, Value: ""})
	}
	_, err = users.UpdateOne(ctx, bson.D{{Key: "_id", Value: user}}, bson.D{
		{Key: "$unset", Value: unset},
		{Key: "$inc", Value: bson.D{{Key: FieldDoneCount, Value: -int64(len(unset))}}},
	})
	if err != nil {
		return fmt.Errorf("clearing receipts: %w", err)
	}
	return nil
}

// Heartbeat records that owner is alive.
func (s *Store) Heartbeat(ctx context.Context, owner string, at time.Time) error {
	_, err := s.db.Collection(CollInstances).UpdateOne(ctx, bson.D{{Key: "_id", Value: owner}},
		bson.D{{Key: "$set", Value: bson.D{{Key: "seen", Value: at}}}}, options.UpdateOne().SetUpsert(true))
	if err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	return nil
}

// Orphans returns the holds of dead owners, the holds taken before the
// owner deadline whose owner is silent since then, the holds whose lease
// ended, and the receipts older than receiptAge.
func (s *Store) Orphans(ctx context.Context, q billing.OrphanQuery) ([]billing.Orphan, error) {
	alive, err := s.aliveOwners(ctx, q.OwnerDeadline)
	if err != nil {
		return nil, err
	}
	docs, err := s.holdingUsers(ctx)
	if err != nil {
		return nil, err
	}
	var out []billing.Orphan
	for _, d := range docs {
		out = d.orphanHolds(out, q, alive)
		out = d.oldReceipts(out, q.Now, q.ReceiptAge)
	}
	return out, nil
}

// aliveOwners returns the instances that sent a heartbeat at or after
// deadline.
func (s *Store) aliveOwners(ctx context.Context, deadline time.Time) (map[string]bool, error) {
	type instance struct {
		ID string `bson:"_id"`
	}
	inst, err := findPages(ctx, s.db.Collection(CollInstances), bson.D{{Key: "seen", Value: bson.D{{Key: "$gte", Value: deadline}}}},
		bson.D{{Key: "_id", Value: 1}}, func(i *instance) any { return i.ID })
	if err != nil {
		return nil, fmt.Errorf("reading instances: %w", err)
	}
	alive := make(map[string]bool, len(inst))
	for _, i := range inst {
		alive[i.ID] = true
	}
	return alive, nil
}

// holdingUser is a user's open holds and settlement receipts, still packed.
type holdingUser struct {
	ID    string                   `bson:"_id"`
	Holds map[string]bson.RawValue `bson:"llmHolds"`
	Done  map[string]bson.RawValue `bson:"llmDone"`
}

// holdingUsers returns every user with an open hold or a receipt.
func (s *Store) holdingUsers(ctx context.Context) ([]holdingUser, error) {
	docs, err := findPages(ctx, s.db.Collection(CollUsers),
		bson.D{{Key: "$or", Value: bson.A{
			bson.D{{Key: FieldHeld, Value: bson.D{{Key: "$gt", Value: 0}}}},
			bson.D{{Key: FieldDoneCount, Value: bson.D{{Key: "$gt", Value: 0}}}},
		}}},
		bson.D{{Key: FieldHolds, Value: 1}, {Key: FieldDone, Value: 1}},
		func(d *holdingUser) any { return d.ID })
	if err != nil {
		return nil, fmt.Errorf("finding holds: %w", err)
	}
	return docs, nil
}

// orphanHolds appends to out the user's holds that no live owner will
// settle: the owner is dead (q.Dead), or silent since the owner deadline
// and the hold older than it, or the hold's lease ended. An unreadable hold
// is left alone.
func (d holdingUser) orphanHolds(out []billing.Orphan, q billing.OrphanQuery, alive map[string]bool) []billing.Orphan {
	for rid, v := range d.Holds {
		h, err := unpackHold(v)
		if err != nil {
			continue // not ours to judge: unreadable
		}
		// A hold younger than the deadline may belong to an instance
		// that has not sent its first heartbeat yet.
		dead := q.Dead != nil && q.Dead(h.Owner)
		if !dead && (alive[h.Owner] || !h.At.Before(q.OwnerDeadline)) && !h.Expires.Before(q.Now) {
			continue
		}
		h.RequestID, h.User = rid, d.ID
		out = append(out, billing.Orphan{Hold: h})
	}
	return out
}

// oldReceipts appends to out the user's readable receipts at least
// receiptAge old at now, each with the hold it settled as far as the
// receipt tells it.
func (d holdingUser) oldReceipts(out []billing.Orphan, now time.Time, receiptAge time.Duration) []billing.Orphan {
	for rid, v := range d.Done {
		rc, err := unpackReceipt(rid, v)
		if err != nil || now.Sub(rc.At) < receiptAge {
			continue
		}
		h := billing.Hold{RequestID: rid, User: d.ID, LogID: rc.LogID, At: rc.At}
		if p, err := billing.ParseCreditPlan(rc.Fields); err == nil {
			h.Plan = p
		}
		out = append(out, billing.Orphan{Hold: h, Receipt: &rc})
	}
	return out
}

// Interface guards.
var (
	_ billing.Ledger  = (*Store)(nil)
	_ billing.Sweeper = (*Store)(nil)
)

// SettleMany settles several holds, each with a cost its hold covers. The
// holds of one user and plan are settled by one conditional update that
// applies only while every one of them exists, and the updates of all the
// users go to the database in one command with IsolationAtomic (with the
// other isolations, one update per user under its lock: one command would
// hold every user's lock for its whole length and stall their holds). It
// returns billing.ErrNotAllHeld when an
// update did not apply because one of its holds was gone (settled before);
// the other users' updates may have applied, so the caller settles each
// request with Settle, which recognises what this call did settle. A lease
// or a hold served from one fails the call before anything is written
// (billing.ErrCarvedLease).
func (s *Store) SettleMany(ctx context.Context, reqs []billing.SettleRequest) ([]billing.Receipt, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	groups := groupSettlements(reqs)
	out := make([]billing.Receipt, len(reqs))
	now := s.now()
	filters := make([]bson.D, len(groups))
	updates := make([]bson.D, len(groups))
	for gi, g := range groups {
		f, u, err := settleGroup(reqs, g.idx, out, now)
		if err != nil {
			return nil, err
		}
		filters[gi], updates[gi] = f, u
	}
	var all bool
	var err error
	if Isolation(s.isolation.Load()) != IsolationAtomic || len(groups) == 1 {
		all, err = s.updateEachLocked(ctx, groups, filters, updates)
	} else {
		all, err = s.updateBulk(ctx, filters, updates)
	}
	switch {
	case err != nil:
		return nil, fmt.Errorf("settling holds: %w", err)
	case !all:
		return nil, billing.ErrNotAllHeld
	}
	return out, nil
}

// settleGroupOf is the settlements of one user and credit plan in a batch,
// by index: one update settles them all.
type settleGroupOf struct {
	user string
	idx  []int
}

// groupSettlements groups reqs by user and plan, in the order each group
// first appears.
func groupSettlements(reqs []billing.SettleRequest) []*settleGroupOf {
	var groups []*settleGroupOf
	byKey := map[string]*settleGroupOf{}
	for i, req := range reqs {
		k := req.Hold.User + "\x00" + req.Hold.Plan.String()
		g := byKey[k]
		if g == nil {
			g = &settleGroupOf{user: req.Hold.User}
			byKey[k] = g
			groups = append(groups, g)
		}
		g.idx = append(g.idx, i)
	}
	return groups
}

// updateEachLocked sends the groups' updates one by one, each under its
// user's lock (the isolation FerretDB needs), and reports whether all
// matched.
func (s *Store) updateEachLocked(ctx context.Context, groups []*settleGroupOf, filters, updates []bson.D) (bool, error) {
	coll := s.db.Collection(CollUsers)
	all := true
	for gi, g := range groups {
		unlock, err := s.lockUser(ctx, g.user)
		if err != nil {
			return false, err
		}
		r, err := coll.UpdateOne(ctx, filters[gi], updates[gi])
		unlock()
		if err != nil {
			return false, err
		}
		all = all && r.MatchedCount == 1
	}
	return all, nil
}

// updateBulk sends the updates as one unordered bulk write, each atomic on
// its document, and reports whether all matched.
func (s *Store) updateBulk(ctx context.Context, filters, updates []bson.D) (bool, error) {
	models := make([]mongo.WriteModel, len(filters))
	for i := range filters {
		models[i] = mongo.NewUpdateOneModel().SetFilter(filters[i]).SetUpdate(updates[i])
	}
	r, err := s.db.Collection(CollUsers).BulkWrite(ctx, models, options.BulkWrite().SetOrdered(false))
	if err != nil {
		return false, err
	}
	return r.MatchedCount == int64(len(filters)), nil
}

// settleGroup builds the conditional update settling reqs[idx...], holds
// of one user and plan, and fills their receipts in out.
func settleGroup(reqs []billing.SettleRequest, idx []int, out []billing.Receipt, now time.Time) (filter, update bson.D, err error) {
	user, plan := reqs[idx[0]].Hold.User, reqs[idx[0]].Hold.Plan
	fields := plan.Fields()
	if len(fields) == 0 {
		return nil, nil, errors.New("settling holds without their credit plan")
	}
	filter = bson.D{{Key: "_id", Value: user}}
	deltas := make([]billing.Nano, len(fields))
	var use usageSum
	unset := make(bson.D, 0, len(idx))
	set := make(bson.D, 0, len(idx))
	for _, i := range idx {
		req := reqs[i]
		h := req.Hold
		if err := validRequestID(h.RequestID); err != nil {
			return nil, nil, err
		}
		if len(h.Taken) != len(fields) || req.Cost < 0 || req.Cost > h.Amount() {
			return nil, nil, errors.New("settling a hold without its credit plan, or with a cost above the hold, in a batch")
		}
		if h.Lease != "" || billing.IsLease(h.RequestID) {
			return nil, nil, fmt.Errorf("settling %s in a batch: %w", h.RequestID, billing.ErrCarvedLease)
		}
		keep := make([]billing.Nano, len(fields))
		rest := req.Cost
		for j, t := range h.Taken {
			keep[j] = min(rest, t)
			rest -= keep[j]
			deltas[j] += t - keep[j]
		}
		use.add(req, req.Cost)
		out[i] = billing.Receipt{RequestID: h.RequestID, LogID: h.LogID, Fields: fields, Taken: keep,
			Cost: req.Cost, Charged: req.Cost, By: req.By, At: now}
		filter = append(filter, bson.E{Key: FieldHolds + "." + h.RequestID, Value: bson.D{{Key: "$exists", Value: true}}})
		unset = append(unset, bson.E{Key: FieldHolds + "." + h.RequestID, Value: ""})
		set = append(set, bson.E{Key: FieldDone + "." + h.RequestID, Value: EncodeReceipt(out[i], plan)})
	}
	inc := bson.D{{Key: FieldHeld, Value: -int64(len(idx))}, {Key: FieldDoneCount, Value: int64(len(idx))}}
	for j, f := range fields {
		if deltas[j] != 0 {
			inc = append(inc, bson.E{Key: f, Value: deltas[j].USD()}, bson.E{Key: FieldNet + "." + f, Value: int64(deltas[j])})
		}
	}
	inc = use.incs(inc, plan)
	return filter, bson.D{{Key: "$inc", Value: inc}, {Key: "$unset", Value: unset}, {Key: "$set", Value: set}}, nil
}
