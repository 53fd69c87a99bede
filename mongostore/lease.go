package mongostore

import (
	"context"
	"errors"
	"fmt"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// A credit lease is a hold (llmHolds.<lease id>, counted in llmHeld) whose
// packed amount FlushLease rewrites. The holds served from it are not in
// the document: a settlement of one leaves its receipt (llmDone.<request
// id>) like any other.

// usageSum is what settlements add to the user's usage counters.
type usageSum struct {
	charged                 billing.Nano
	weighted, input, output int64
}

// add counts one settlement that charged charged. One request adds at most
// billing.MaxRequestTokens to a counter, and the sums saturate, so no $inc
// of a stored total can overflow.
func (u *usageSum) add(req billing.SettleRequest, charged billing.Nano) {
	u.charged += charged
	u.weighted = billing.AddSat(u.weighted, billing.ClampTokens(req.WeightedTokens))
	u.input = billing.AddSat(u.input, billing.ClampTokens(req.Usage.Input))
	u.output = billing.AddSat(u.output, billing.ClampTokens(req.Usage.Output))
}

// incs appends the counters' $inc on a user charged on plan.
func (u *usageSum) incs(inc bson.D, plan billing.CreditPlan) bson.D {
	if u.charged > 0 {
		inc = append(inc, bson.E{Key: plan.UsedField(), Value: u.charged.USD()})
	}
	if tf := plan.TokensField(); tf != "" && u.weighted > 0 {
		inc = append(inc, bson.E{Key: tf, Value: u.weighted})
	}
	if u.input > 0 {
		inc = append(inc, bson.E{Key: "totalInputTokens", Value: u.input})
	}
	if u.output > 0 {
		inc = append(inc, bson.E{Key: "totalOutputTokens", Value: u.output})
	}
	return inc
}

// FlushLease applies f in one conditional update of the user's document
// (billing.PlanFlush says what it writes): only while the lease's packed
// string is EncodeHold(f.Lease), no settlement of f has a receipt and
// every receipt of f.Clear exists. When the update does not apply, the
// document is read under the same lock: a lease that is what the flush
// leaves (or gone, for a Close) with every settlement's receipt kept is
// the flush applied before, whose answer was lost, and gives the same
// lease and the stored receipts; a lease still f.Lease with no settlement
// settled means a receipt of f.Clear is gone, and the update is sent once
// more clearing only those kept; a lease still f.Lease with a settlement
// settled gives billing.ErrNotAllHeld; anything else
// billing.ErrLeaseMoved. Nothing is written when it returns an error.
func (s *Store) FlushLease(ctx context.Context, f billing.LeaseFlush) (billing.Hold, []billing.Receipt, error) {
	if err := flushIDs(f); err != nil {
		return billing.Hold{}, nil, err
	}
	p, err := billing.PlanFlush(f, s.now())
	if err != nil {
		return billing.Hold{}, nil, err
	}
	unlock, err := s.lockUser(ctx, f.Lease.User)
	if err != nil {
		return billing.Hold{}, nil, err
	}
	defer unlock()
	drop := f.Clear
	for attempt := 0; attempt < 2; attempt++ {
		filter, update := flushWrite(f, p, drop)
		r, err := s.db.Collection(CollUsers).UpdateOne(ctx, filter, update)
		if err != nil {
			return billing.Hold{}, nil, fmt.Errorf("flushing a lease: %w", err)
		}
		if r.MatchedCount == 1 {
			return p.Next, p.Receipts, nil
		}
		st, err := s.readLeaseState(ctx, f)
		if err != nil {
			return billing.Hold{}, nil, err
		}
		if rcs, ok := st.flushed(f, p); ok {
			return p.Next, rcs, nil
		}
		if !st.is(f.Lease) {
			return billing.Hold{}, nil, fmt.Errorf("flushing %s: %w", f.Lease.RequestID, billing.ErrLeaseMoved)
		}
		if st.settled(f) > 0 {
			return billing.Hold{}, nil, fmt.Errorf("flushing %s: %w", f.Lease.RequestID, billing.ErrNotAllHeld)
		}
		drop = st.kept(f.Clear)
	}
	return billing.Hold{}, nil, fmt.Errorf("flushing %s: the document kept changing", f.Lease.RequestID)
}

// flushIDs checks that every request id of f can key a hold or receipt.
func flushIDs(f billing.LeaseFlush) error {
	for _, id := range f.RequestIDs() {
		if err := validRequestID(id); err != nil {
			return err
		}
	}
	return nil
}

// flushWrite is the conditional update of a flush that drops the receipts
// drop.
func flushWrite(f billing.LeaseFlush, p billing.FlushPlan, drop []string) (filter, update bson.D) {
	plan, leasePath := f.Lease.Plan, FieldHolds+"."+f.Lease.RequestID
	filter = bson.D{{Key: "_id", Value: f.Lease.User}, {Key: leasePath, Value: EncodeHold(f.Lease)}}
	set, unset := bson.D{}, bson.D{}
	var use usageSum
	for i, st := range f.Settles {
		path := FieldDone + "." + st.Hold.RequestID
		filter = append(filter, bson.E{Key: path, Value: bson.D{{Key: "$exists", Value: false}}})
		set = append(set, bson.E{Key: path, Value: EncodeReceipt(p.Receipts[i], plan)})
		use.add(st, st.Cost)
	}
	filter = append(filter, receiptsKept(drop)...)
	inc := bson.D{{Key: FieldDoneCount, Value: int64(len(f.Settles) - len(drop))}}
	for j, fl := range plan.Fields() {
		if back := p.Back[j]; back != 0 {
			inc = append(inc, bson.E{Key: fl, Value: back.USD()}, bson.E{Key: FieldNet + "." + fl, Value: int64(back)})
		}
	}
	inc = use.incs(inc, plan)
	for _, rid := range drop {
		unset = append(unset, bson.E{Key: FieldDone + "." + rid, Value: ""})
	}
	if p.Closed {
		unset = append(unset, bson.E{Key: leasePath, Value: ""})
		inc = append(inc, bson.E{Key: FieldHeld, Value: int64(-1)})
	} else {
		set = append(set, bson.E{Key: leasePath, Value: EncodeHold(p.Next)})
	}
	update = bson.D{{Key: "$inc", Value: inc}}
	if len(set) > 0 {
		update = append(update, bson.E{Key: "$set", Value: set})
	}
	if len(unset) > 0 {
		update = append(update, bson.E{Key: "$unset", Value: unset})
	}
	return filter, update
}

// leaseState is a lease as read back after a flush did not apply, with
// the receipts the flush names.
type leaseState struct {
	Holds map[string]string        `bson:"llmHolds"`
	Done  map[string]bson.RawValue `bson:"llmDone"`
	lease string
}

// readLeaseState reads the lease of f and the receipts f names.
func (s *Store) readLeaseState(ctx context.Context, f billing.LeaseFlush) (*leaseState, error) {
	proj := bson.D{{Key: FieldHolds + "." + f.Lease.RequestID, Value: 1}}
	for _, st := range f.Settles {
		proj = append(proj, bson.E{Key: FieldDone + "." + st.Hold.RequestID, Value: 1})
	}
	for _, rid := range f.Clear {
		proj = append(proj, bson.E{Key: FieldDone + "." + rid, Value: 1})
	}
	st := &leaseState{lease: f.Lease.RequestID}
	err := s.db.Collection(CollUsers).FindOne(ctx, bson.D{{Key: "_id", Value: f.Lease.User}},
		options.FindOne().SetProjection(proj)).Decode(st)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil, billing.ErrUserNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("reading a lease: %w", err)
	}
	return st, nil
}

// is reports whether the lease is h, as packed.
func (st *leaseState) is(h billing.Hold) bool {
	packed, ok := st.Holds[st.lease]
	return ok && packed == EncodeHold(h)
}

// settled counts the settlements of f whose receipt exists.
func (st *leaseState) settled(f billing.LeaseFlush) int {
	n := 0
	for _, s := range f.Settles {
		if _, ok := st.Done[s.Hold.RequestID]; ok {
			n++
		}
	}
	return n
}

// kept returns the receipts of ids that exist.
func (st *leaseState) kept(ids []string) []string {
	var out []string
	for _, rid := range ids {
		if _, ok := st.Done[rid]; ok {
			out = append(out, rid)
		}
	}
	return out
}

// flushed reports whether the state is what the flush leaves, every
// settlement's receipt kept, and returns those receipts.
func (st *leaseState) flushed(f billing.LeaseFlush, p billing.FlushPlan) ([]billing.Receipt, bool) {
	_, held := st.Holds[st.lease]
	if p.Closed && held || !p.Closed && !st.is(p.Next) || st.settled(f) != len(f.Settles) {
		return nil, false
	}
	rcs := make([]billing.Receipt, len(f.Settles))
	for i, s := range f.Settles {
		rc, err := unpackReceipt(s.Hold.RequestID, st.Done[s.Hold.RequestID])
		if err != nil {
			rc = p.Receipts[i]
		}
		rcs[i] = rc
	}
	return rcs, true
}

// settleCarved settles a hold served from a lease: once, known by its
// receipt (returned, applied false) or, once the receipt is dropped, by
// its request log row (billing.ErrNoHold). The part of the cost within the
// hold leaves the lease, as far as the lease still has it; the rest is
// taken from the pool's fields as for a cost above any hold, and what they
// cannot cover is the Shortfall. One conditional update on the lease's
// packed string, the receipt's absence and the balances read, tried again
// when the document changed in between; the lease's other carves and
// llmHeld are not touched.
func (s *Store) settleCarved(ctx context.Context, req billing.SettleRequest) (billing.Receipt, bool, error) {
	h := req.Hold
	if err := validRequestID(h.Lease); err != nil {
		return billing.Receipt{}, false, err
	}
	unlock, err := s.lockUser(ctx, h.User)
	if err != nil {
		return billing.Receipt{}, false, err
	}
	defer unlock()
	for attempt := 0; attempt < casAttempts; attempt++ {
		cs, err := s.readCarve(ctx, h)
		if err != nil {
			return billing.Receipt{}, false, err
		}
		if cs.receipt != nil {
			return *cs.receipt, false, nil
		}
		logged, err := s.logged(ctx, h.LogID)
		if err != nil {
			return billing.Receipt{}, false, err
		}
		if logged {
			return billing.Receipt{}, false, billing.ErrNoHold
		}
		filter, update, rc := s.carveWrite(req, cs)
		r, err := s.db.Collection(CollUsers).UpdateOne(ctx, filter, update)
		if err != nil {
			return billing.Receipt{}, false, fmt.Errorf("settling a hold: %w", err)
		}
		if r.MatchedCount == 1 {
			return rc, true, nil
		}
	}
	return billing.Receipt{}, false, fmt.Errorf("settling a hold of lease %s: the document kept changing after %d attempts", h.Lease, casAttempts)
}

// carveState is what settleCarved reads: the balance fields, the lease
// (packed, empty when gone) and the request's receipt.
type carveState struct {
	vals    []fieldValue
	packed  string
	lease   *billing.Hold
	receipt *billing.Receipt
}

// readCarve reads the plan's fields, the lease of h and the receipt of h.
func (s *Store) readCarve(ctx context.Context, h billing.Hold) (*carveState, error) {
	fields := h.Plan.Fields()
	proj := bson.D{{Key: FieldHolds + "." + h.Lease, Value: 1}, {Key: FieldDone + "." + h.RequestID, Value: 1}}
	for _, f := range fields {
		proj = append(proj, bson.E{Key: f, Value: 1})
	}
	var raw bson.Raw
	err := s.db.Collection(CollUsers).FindOne(ctx, bson.D{{Key: "_id", Value: h.User}}, options.FindOne().SetProjection(proj)).Decode(&raw)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil, billing.ErrUserNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("reading a lease: %w", err)
	}
	cs := &carveState{}
	if cs.vals, err = fieldValues(raw, fields); err != nil {
		return nil, err
	}
	if v, err := raw.LookupErr(FieldDone, h.RequestID); err == nil {
		rc, err := unpackReceipt(h.RequestID, v)
		if err != nil {
			return nil, fmt.Errorf("reading a receipt: %w", err)
		}
		cs.receipt = &rc
	}
	if v, err := raw.LookupErr(FieldHolds, h.Lease); err == nil {
		l, err := unpackHold(v)
		if err != nil {
			return nil, fmt.Errorf("reading a lease: %w", err)
		}
		cs.packed, cs.lease = v.StringValue(), &l
	}
	return cs, nil
}

// logged reports whether the request log row id exists.
func (s *Store) logged(ctx context.Context, id billing.LogID) (bool, error) {
	err := s.db.Collection(CollRequestLog).FindOne(ctx, bson.D{{Key: "_id", Value: bson.ObjectID(id)}},
		options.FindOne().SetProjection(bson.D{{Key: "_id", Value: 1}})).Err()
	if errors.Is(err, mongo.ErrNoDocuments) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading a request log row: %w", err)
	}
	return true, nil
}

// carveWrite is the conditional update settling req as cs was read, and
// the receipt it leaves.
func (s *Store) carveWrite(req billing.SettleRequest, cs *carveState) (filter, update bson.D, rc billing.Receipt) {
	h := req.Hold
	fields := h.Plan.Fields()
	leasePath := FieldHolds + "." + h.Lease
	rc = billing.Receipt{RequestID: h.RequestID, LogID: h.LogID, Fields: fields, Taken: make([]billing.Nano, len(fields)),
		Cost: req.Cost, By: req.By, At: s.now()}
	set := bson.D{}
	filter = bson.D{{Key: "_id", Value: h.User}, {Key: FieldDone + "." + h.RequestID, Value: bson.D{{Key: "$exists", Value: false}}}}
	if cs.lease != nil && cs.lease.Plan.String() == h.Plan.String() {
		next := *cs.lease
		next.Taken = append([]billing.Nano(nil), next.Taken...)
		for j, k := range billing.SplitCost(h.Taken, req.Cost) {
			rc.Taken[j] = min(k, next.Taken[j])
			next.Taken[j] -= rc.Taken[j]
			rc.Charged += rc.Taken[j]
		}
		next.Input = min(next.Input, next.Amount())
		filter = append(filter, bson.E{Key: leasePath, Value: cs.packed})
		set = append(set, bson.E{Key: leasePath, Value: EncodeHold(next)})
	} else {
		filter = append(filter, bson.E{Key: leasePath, Value: cs.packedOrGone()})
	}
	takes, taken, conds := takeFrom(fields, cs.vals, req.Cost-rc.Charged)
	filter = append(filter, conds...)
	inc := bson.D{{Key: FieldDoneCount, Value: int64(1)}}
	for j, f := range fields {
		if taken[j] != 0 {
			inc = append(inc, bson.E{Key: f, Value: -takes[j]}, bson.E{Key: FieldNet + "." + f, Value: -int64(taken[j])})
		}
		rc.Taken[j] += taken[j]
		rc.Charged += taken[j]
	}
	rc.Shortfall = req.Cost - rc.Charged
	var use usageSum
	use.add(req, rc.Charged)
	inc = use.incs(inc, h.Plan)
	set = append(set, bson.E{Key: FieldDone + "." + h.RequestID, Value: EncodeReceipt(rc, h.Plan)})
	return filter, bson.D{{Key: "$inc", Value: inc}, {Key: "$set", Value: set}}, rc
}

// packedOrGone is the filter value that the lease is as read: its packed
// string, or absent.
func (cs *carveState) packedOrGone() any {
	if cs.lease == nil {
		return bson.D{{Key: "$exists", Value: false}}
	}
	return cs.packed
}

// Interface guard.
var _ billing.LeaseLedger = (*Store)(nil)
