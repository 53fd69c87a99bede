package reconcile

import (
	"context"
	"fmt"
	"math"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/mongostore"
)

// userState is what a usersNew document says.
type userState struct {
	id string
	// balances holds the balance fields present, in nano-USD.
	balances map[string]billing.Nano
	hasNet   bool
	net      map[string]int64
	holds    map[string]*holdState
	held     int64
	receipts map[string]receiptState
	// malformed lists what could not be read.
	malformed []Item
}

type holdState struct {
	fields  []string
	amounts []billing.Nano
	at, exp time.Time
	owner   string
	log     string
}

func (h *holdState) total() billing.Nano {
	var t billing.Nano
	for _, a := range h.amounts {
		t = billing.AddSat(t, a)
	}
	return t
}

type receiptState struct {
	fields []string
	taken  []int64
}

var userProjection = func() bson.D {
	p := bson.D{}
	for _, f := range append(append([]string(nil), BalanceFields...), mongostore.FieldNet, mongostore.FieldHolds, mongostore.FieldHeld, mongostore.FieldDone) {
		p = append(p, bson.E{Key: f, Value: 1})
	}
	return p
}()

// readUsers reads the usersNew documents matching filter.
func readUsers(ctx context.Context, db *mongo.Database, filter bson.D) (map[string]*userState, error) {
	users := map[string]*userState{}
	err := findAll(ctx, db.Collection(mongostore.CollUsers), filter, options.Find().SetProjection(userProjection), func(raw bson.Raw) {
		u := parseUser(raw)
		users[u.id] = u
	})
	return users, err
}

// parseUser reads a usersNew document's balances and bookkeeping. It never
// fails: what cannot be read is left out and listed in malformed.
func parseUser(raw bson.Raw) *userState {
	u := &userState{id: idString(raw.Lookup("_id")), balances: map[string]billing.Nano{}}
	u.readBalances(raw)
	u.readNet(raw)
	u.readHolds(raw)
	if v := raw.Lookup(mongostore.FieldHeld); !absent(v) {
		n, ok := nanoValue(v)
		if !ok {
			u.bad("", "%s is %s, not a count", mongostore.FieldHeld, describe(v))
			n = int64(len(u.holds)) // reported above; do not report twice
		}
		u.held = n
	}
	u.readReceipts(raw)
	return u
}

// bad lists, as malformed, a value of the user's that cannot be read.
func (u *userState) bad(field, format string, args ...any) {
	u.malformed = append(u.malformed, Item{Kind: KindMalformed, User: u.id, Field: field, Detail: fmt.Sprintf(format, args...)})
}

// readBalances reads the balance fields present, in nano-USD.
func (u *userState) readBalances(raw bson.Raw) {
	for _, f := range BalanceFields {
		v := raw.Lookup(f)
		if absent(v) {
			continue
		}
		usd, ok := floatValue(v)
		if !ok {
			u.bad(f, "balance %s is %s, not a number", f, describe(v))
			continue
		}
		u.balances[f] = billing.NanoFromUSD(usd)
	}
}

// readNet reads llmNet, when present, field by field.
func (u *userState) readNet(raw bson.Raw) {
	v := raw.Lookup(mongostore.FieldNet)
	if absent(v) {
		return
	}
	u.hasNet = true
	u.net = map[string]int64{}
	doc, ok := v.DocumentOK()
	if !ok {
		u.bad("", "%s is %s, not a document", mongostore.FieldNet, describe(v))
	}
	elems, _ := doc.Elements()
	for _, e := range elems {
		n, ok := nanoValue(e.Value())
		if !ok {
			u.bad(e.Key(), "%s.%s is %s, not an integer amount", mongostore.FieldNet, e.Key(), describe(e.Value()))
			continue
		}
		u.net[e.Key()] = n
	}
}

// readHolds reads llmHolds. Every entry is a hold, even one that cannot be
// read (it then counts with nothing taken).
func (u *userState) readHolds(raw bson.Raw) {
	u.holds = map[string]*holdState{}
	v := raw.Lookup(mongostore.FieldHolds)
	if absent(v) {
		return
	}
	doc, ok := v.DocumentOK()
	if !ok {
		u.bad("", "%s is %s, not a document", mongostore.FieldHolds, describe(v))
	}
	elems, _ := doc.Elements()
	for _, e := range elems {
		u.holds[e.Key()] = u.readHold(e.Key(), e.Value())
	}
}

// readHold reads hold rid, packed (mongostore.EncodeHold, as the gateway
// writes holds) or as a document, keeping what it can read.
func (u *userState) readHold(rid string, v bson.RawValue) *holdState {
	h := &holdState{}
	if str, ok := v.StringValueOK(); ok {
		ph, err := mongostore.DecodeHold(str)
		if err != nil {
			u.bad("", "hold %s: %v", rid, err)
			return h
		}
		h.fields, h.amounts, h.at, h.exp, h.owner, h.log = ph.Plan.Fields(), ph.Taken, ph.At, ph.Expires, ph.Owner, ph.LogID.String()
		return h
	}
	hd, ok := v.DocumentOK()
	if !ok {
		u.bad("", "hold %s is %s, not a document", rid, describe(v))
		return h
	}
	var problems []string
	h.fields, h.amounts, problems = pairs(hd, "amt")
	for _, p := range problems {
		u.bad("", "hold %s: %s", rid, p)
	}
	h.at, _ = hd.Lookup("at").TimeOK()
	h.exp, _ = hd.Lookup("exp").TimeOK()
	h.owner, _ = hd.Lookup("owner").StringValueOK()
	if oid, ok := hd.Lookup("log").ObjectIDOK(); ok {
		h.log = oid.Hex()
	}
	return h
}

// readReceipts reads llmDone, leaving out a receipt that cannot be read.
func (u *userState) readReceipts(raw bson.Raw) {
	u.receipts = map[string]receiptState{}
	v := raw.Lookup(mongostore.FieldDone)
	if absent(v) {
		return
	}
	doc, _ := v.DocumentOK()
	elems, _ := doc.Elements()
	for _, e := range elems {
		if rc, ok := u.readReceipt(e.Key(), e.Value()); ok {
			u.receipts[e.Key()] = rc
		}
	}
}

// readReceipt reads receipt rid, packed (mongostore.EncodeReceipt) or as a
// document. It reports false for a receipt it cannot read at all; a
// document's unreadable pairs are left out.
func (u *userState) readReceipt(rid string, v bson.RawValue) (receiptState, bool) {
	if str, ok := v.StringValueOK(); ok {
		r, plan, err := mongostore.DecodeReceipt(str)
		if err != nil {
			u.bad("", "receipt %s: %v", rid, err)
			return receiptState{}, false
		}
		return newReceipt(plan.Fields(), r.Taken), true
	}
	rd, ok := v.DocumentOK()
	if !ok {
		u.bad("", "receipt %s is %s, not a document", rid, describe(v))
		return receiptState{}, false
	}
	fields, amounts, problems := pairs(rd, "taken")
	for _, p := range problems {
		u.bad("", "receipt %s: %s", rid, p)
	}
	return newReceipt(fields, amounts), true
}

// newReceipt is a receipt that took amounts[i] from fields[i].
func newReceipt(fields []string, amounts []billing.Nano) receiptState {
	rc := receiptState{fields: fields}
	for _, a := range amounts {
		rc.taken = append(rc.taken, int64(a))
	}
	return rc
}

// pairs reads the parallel arrays fields and <amounts> of a hold or a
// receipt, keeping the pairs it can read and saying what it cannot.
func pairs(doc bson.Raw, amountsKey string) ([]string, []billing.Nano, []string) {
	var problems []string
	fa, okF := doc.Lookup("fields").ArrayOK()
	aa, okA := doc.Lookup(amountsKey).ArrayOK()
	if !okF || !okA {
		return nil, nil, []string{"fields or " + amountsKey + " is not an array"}
	}
	fv, _ := fa.Values()
	av, _ := aa.Values()
	if len(fv) != len(av) {
		problems = append(problems, fmt.Sprintf("%d fields but %d amounts", len(fv), len(av)))
	}
	var fields []string
	var amounts []billing.Nano
	for i := range min(len(fv), len(av)) {
		f, ok := fv[i].StringValueOK()
		if !ok {
			problems = append(problems, fmt.Sprintf("fields[%d] is %s, not a string", i, describe(fv[i])))
			continue
		}
		n, ok := nanoValue(av[i])
		if !ok {
			problems = append(problems, fmt.Sprintf("%s[%d] is %s, not an integer amount", amountsKey, i, describe(av[i])))
			continue
		}
		if n < 0 {
			problems = append(problems, fmt.Sprintf("%s[%d] is negative (%s)", amountsKey, i, billing.Nano(n)))
		}
		fields = append(fields, f)
		amounts = append(amounts, billing.Nano(n))
	}
	return fields, amounts, problems
}

// logRow is what a request_logs row with a requestId says.
type logRow struct {
	id                       string
	user                     string
	hasUser                  bool
	rid                      string
	createdAt                time.Time
	hasCreated               bool
	creditField              string
	cost, charged, shortfall int64
	taken                    []fieldAmount
	malformed                []string
}

type fieldAmount struct {
	field  string
	amount int64
}

var rowProjection = bson.D{
	{Key: "_id", Value: 1}, {Key: "userId", Value: 1}, {Key: "requestId", Value: 1}, {Key: "createdAt", Value: 1},
	{Key: "creditField", Value: 1}, {Key: "costNano", Value: 1}, {Key: "chargedNano", Value: 1},
	{Key: "shortfallNano", Value: 1}, {Key: "takenNano", Value: 1},
}

// scanRows calls fn with each request_logs row matching filter that has a
// requestId, in _id order. Legacy rows (no requestId, or an empty one) are
// skipped.
func scanRows(ctx context.Context, db *mongo.Database, filter bson.D, fn func(*logRow)) error {
	f := append(append(bson.D{}, filter...), bson.E{Key: "requestId", Value: bson.D{{Key: "$exists", Value: true}}})
	return findAll(ctx, db.Collection(mongostore.CollRequestLog), f,
		options.Find().SetProjection(rowProjection).SetSort(bson.D{{Key: "_id", Value: 1}}),
		func(raw bson.Raw) {
			if r := parseRow(raw); r != nil {
				fn(r)
			}
		})
}

func parseRow(raw bson.Raw) *logRow {
	rid, ok := raw.Lookup("requestId").StringValueOK()
	if !ok || rid == "" {
		return nil
	}
	r := &logRow{id: idString(raw.Lookup("_id")), rid: rid}
	if v := raw.Lookup("userId"); !absent(v) {
		r.user = idString(v)
		r.hasUser = r.user != ""
	}
	r.createdAt, r.hasCreated = raw.Lookup("createdAt").TimeOK()
	r.creditField, _ = raw.Lookup("creditField").StringValueOK()
	num := func(key string) int64 {
		v := raw.Lookup(key)
		if absent(v) {
			return 0
		}
		n, ok := nanoValue(v)
		if !ok {
			r.malformed = append(r.malformed, fmt.Sprintf("%s is %s, not an integer amount", key, describe(v)))
		}
		return n
	}
	r.cost, r.charged, r.shortfall = num("costNano"), num("chargedNano"), num("shortfallNano")
	if v := raw.Lookup("takenNano"); !absent(v) {
		doc, ok := v.DocumentOK()
		if !ok {
			r.malformed = append(r.malformed, "takenNano is "+describe(v)+", not a document")
		}
		elems, _ := doc.Elements()
		for _, e := range elems {
			n, ok := nanoValue(e.Value())
			if !ok {
				r.malformed = append(r.malformed, fmt.Sprintf("takenNano.%s is %s, not an integer amount", e.Key(), describe(e.Value())))
				continue
			}
			r.taken = append(r.taken, fieldAmount{field: e.Key(), amount: n})
		}
	}
	return r
}

// baselineOf returns the baseline of the users as read.
func baselineOf(users map[string]*userState, at time.Time) *Baseline {
	b := &Baseline{Version: BaselineVersion, TakenAt: at.UTC(), Users: map[string]map[string]BaselineField{}}
	for id, u := range users {
		if len(u.balances) == 0 && len(u.net) == 0 {
			continue
		}
		m := map[string]BaselineField{}
		for f, v := range u.balances {
			e := m[f]
			e.Balance = v
			m[f] = e
		}
		for f, v := range u.net {
			e := m[f]
			e.Net = billing.Nano(v)
			m[f] = e
		}
		b.Users[id] = m
	}
	return b
}

// absent reports a missing or null value.
func absent(v bson.RawValue) bool {
	return v.Type == 0 || v.Type == bson.TypeNull || v.Type == bson.TypeUndefined
}

// nanoValue reads an integer amount stored as an int32, an int64 or a
// double (rounded to the nearest integer).
func nanoValue(v bson.RawValue) (int64, bool) {
	switch v.Type {
	case bson.TypeInt32:
		return int64(v.Int32()), true
	case bson.TypeInt64:
		return v.Int64(), true
	case bson.TypeDouble:
		f := v.Double()
		if math.IsNaN(f) || math.IsInf(f, 0) || math.Abs(f) >= 0x1p63 {
			return 0, false
		}
		return int64(math.Round(f)), true
	}
	return 0, false
}

// floatValue reads a USD balance stored as a double, an int32 or an int64.
func floatValue(v bson.RawValue) (float64, bool) {
	switch v.Type {
	case bson.TypeDouble:
		f := v.Double()
		return f, !math.IsNaN(f) && !math.IsInf(f, 0)
	case bson.TypeInt32:
		return float64(v.Int32()), true
	case bson.TypeInt64:
		return float64(v.Int64()), true
	}
	return 0, false
}

// idString renders an _id or a userId: a string as is, anything else as
// its extended JSON.
func idString(v bson.RawValue) string {
	if s, ok := v.StringValueOK(); ok {
		return s
	}
	if oid, ok := v.ObjectIDOK(); ok {
		return oid.Hex()
	}
	if v.Type == 0 {
		return ""
	}
	return v.String()
}

// describe names a value's type, and the value when it is short.
func describe(v bson.RawValue) string {
	s := v.String()
	if len(s) > 40 {
		s = s[:40] + "…"
	}
	return fmt.Sprintf("a %s (%s)", v.Type, s)
}
