// Package reconcile proves that the gateway's billing ledger, the request
// logs and the users' balances agree, and lists any drift between them.
//
// It reads the bookkeeping the billing engine keeps in MongoDB, by the
// collection and field names of package mongostore (the writer's side):
//
//   - in each usersNew document, llmNet.<field> is the net amount in
//     nano-USD the gateway has moved on a balance field (holds taken are
//     negative, unused parts given back positive), llmHolds.<requestId> the
//     outstanding holds ({amt, fields, input, at, exp, owner, log}) and
//     llmHeld their count;
//   - each request_logs row with a requestId is one billed request, with
//     costNano, chargedNano, shortfallNano and takenNano ({field: nano}, what
//     it took from each balance field). Rows without a requestId are the
//     legacy proxy's and are ignored.
//
// [Run] checks, with exact integer arithmetic:
//
//  1. the ledger: per user and field, llmNet equals minus the takenNano of
//     the user's logged requests (each requestId once; rows of requests
//     still held are left out, since a row may be written just before its
//     hold is settled) minus the amounts of the outstanding holds;
//  2. each log row in the window: chargedNano = Σ takenNano, costNano =
//     chargedNano + shortfallNano, no negative amount, nothing taken from a
//     field outside its creditField, and no requestId logged twice;
//  3. the holds: a hold past its lease (or older than [Options.MaxHoldAge])
//     is a leftover;
//  4. the balances: none is negative, and, against a [Baseline] saved by an
//     earlier run, every balance moved exactly as the gateway's llmNet says;
//     anything else is an external movement (a top-up by the backend, or
//     tampering).
//
// The package reads with plain finds and projections and sums in Go, so it
// works on MongoDB 6+ and on FerretDB 1.24 alike; it never writes to the
// database. It does not import Caddy: the caddy llm-billing-reconcile
// subcommand (package caddymodule) only parses flags and calls [CLI.Run].
package reconcile

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
	"github.com/trollllm/caddy-llm-billing/mongostore"
)

// BalanceFields are the usersNew balance fields (USD doubles) whose
// movements are checked against a baseline and which must never be negative.
var BalanceFields = []string{billing.FieldCreditsNew, billing.FieldCredits, billing.FieldRefCredits}

// BalanceTolerance is how far, per user and field, a balance may move apart
// from llmNet before the difference counts as an external movement: the
// balances are doubles, the ledger integers.
const BalanceTolerance billing.Nano = 1

// MaxRecheckUsers bounds how many users with ledger drift are read again
// after [Options.RecheckDelay]; for the others the first reading stands.
const MaxRecheckUsers = 200

// Kind names a kind of drift.
type Kind string

// The kinds of drift. The sign and meaning of [Item.Amount] depend on it.
const (
	// KindChargeWithoutLog: llmNet is more negative than the logs and holds
	// explain. Amount is the unexplained charge (positive).
	KindChargeWithoutLog Kind = "charge-without-log"
	// KindLogWithoutCharge: the logs and holds claim more than llmNet shows
	// taken. Amount is the unexplained logged amount (positive).
	KindLogWithoutCharge Kind = "log-without-charge"
	// KindRowMismatch: a log row disagrees with itself. Amount is the
	// difference named in Detail (for example chargedNano − Σ takenNano).
	KindRowMismatch Kind = "row-mismatch"
	// KindDuplicateRequest: a requestId has more than one log row. Amount is
	// the chargedNano of the extra rows.
	KindDuplicateRequest Kind = "duplicate-request"
	// KindLeftoverHold: a hold past its lease or older than MaxHoldAge.
	// Amount is what the hold took.
	KindLeftoverHold Kind = "leftover-hold"
	// KindHeldCount: llmHeld differs from the number of llmHolds entries.
	// Amount is zero.
	KindHeldCount Kind = "held-count"
	// KindNegativeBalance: a balance field below zero. Amount is the balance.
	KindNegativeBalance Kind = "negative-balance"
	// KindExternalDebit: since the baseline a balance lost money the gateway
	// did not take. Amount is the movement (negative).
	KindExternalDebit Kind = "external-debit"
	// KindExternalCredit: since the baseline a balance gained money the
	// gateway did not give back (a top-up). Amount is the movement
	// (positive). It is drift unless Options.AllowCredit is set.
	KindExternalCredit Kind = "external-credit"
	// KindUserMissing: a user of the baseline has no document any more.
	// Amount is the user's balance total in the baseline.
	KindUserMissing Kind = "user-missing"
	// KindMalformed: a value of the bookkeeping cannot be read (a nano
	// amount that is not a number, a hold whose amt and fields differ in
	// length, a row without userId...). Amount is zero.
	KindMalformed Kind = "malformed"
)

// Item is one drift found.
type Item struct {
	Kind Kind
	// User is the usersNew _id (or a row's userId).
	User string
	// Field is the balance field concerned, when there is one.
	Field string
	// RequestID is the request concerned, when there is one.
	RequestID string
	// Amount is in nano-USD; see each Kind for its sign.
	Amount billing.Nano
	// Detail explains the item in words.
	Detail string
}

// Hold is an outstanding hold, as listed in the report.
type Hold struct {
	User      string
	RequestID string
	// Fields and Amounts are the hold's fields and what it took from each.
	Fields  []string
	Amounts []billing.Nano
	// Amount is the total taken.
	Amount billing.Nano
	At     time.Time
	Exp    time.Time
	Owner  string
	// LogID is the hex ObjectID the request's log row will have.
	LogID string
	// Leftover is set for a hold past its lease or older than MaxHoldAge;
	// Reason then says which.
	Leftover bool
	Reason   string
}

// Movement is a balance change since the baseline that llmNet does not
// explain: (balance_now − balance_base) − (net_now − net_base).
type Movement struct {
	User   string
	Field  string
	Amount billing.Nano
	// Allowed is set for a positive movement under Options.AllowCredit; it
	// is then listed but is not drift.
	Allowed bool
	// Detail says, for example, that the user is not in the baseline.
	Detail string
}

// Options select what Run checks.
type Options struct {
	// Since and Until bound the window of log rows checked one by one, on
	// createdAt (Since inclusive, Until exclusive); zero means unbounded.
	// The ledger check always uses every row: llmNet is cumulative.
	Since, Until time.Time
	// MaxHoldAge, when positive, makes a hold taken longer ago than this a
	// leftover even if its lease has not ended.
	MaxHoldAge time.Duration
	// Baseline, when set, enables the external movement check.
	Baseline *Baseline
	// AllowCredit accepts positive external movements (top-ups).
	AllowCredit bool
	// RecheckDelay, when positive, reads again, after this delay, the users
	// whose ledger disagreed, and keeps only what still disagrees: a
	// settlement between the read of the users and the read of the logs
	// (or a log row written late, in a batch) is not drift.
	RecheckDelay time.Duration
	// Now is the time holds are judged against and the baseline is stamped
	// with; zero means time.Now().
	Now time.Time
}

// Report is the result of Run.
type Report struct {
	// Now is when the check ran; Since and Until are the window (zero:
	// unbounded).
	Now, Since, Until time.Time
	// BaselineAt is when the baseline checked against was taken (zero
	// without a baseline).
	BaselineAt time.Time
	// UsersChecked is the number of users whose ledger was checked.
	UsersChecked int
	// RowsChecked is the number of log rows with a requestId in the window.
	RowsChecked int
	// Charged and Shortfall total the rows in the window (each requestId
	// once).
	Charged, Shortfall billing.Nano
	// HoldsOutstanding counts the holds, HoldsLeftover those of them that
	// are leftovers.
	HoldsOutstanding, HoldsLeftover int
	// ReceiptsPending counts settled holds (llmDone receipts, when the
	// engine keeps them) whose log row is not written yet: their amounts
	// stand in for the row in the ledger.
	ReceiptsPending int
	// Holds lists the outstanding holds.
	Holds []Hold
	// External lists the balance movements since the baseline that the
	// gateway did not make.
	External []Movement
	// Drift lists every disagreement found; empty when all agree.
	Drift []Item

	baseline *Baseline
}

// OK reports whether no drift was found.
func (r *Report) OK() bool { return len(r.Drift) == 0 }

// Baseline returns the balances and llmNet of every user as this run read
// them, to be saved (see WriteBaselineFile) and passed to a later run.
func (r *Report) Baseline() *Baseline { return r.baseline }

// Run reads the users and the request logs of db and checks that they agree
// (see the package documentation). An error means the check could not be
// made; drift is reported in the Report, never as an error.
func Run(ctx context.Context, db *mongo.Database, opts Options) (*Report, error) {
	if db == nil {
		return nil, errNoDB
	}
	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	rep := &Report{Now: now, Since: opts.Since, Until: opts.Until}
	if !opts.Since.IsZero() && !opts.Until.IsZero() && !opts.Since.Before(opts.Until) {
		return nil, fmt.Errorf("empty window: since %s is not before until %s", opts.Since.Format(time.RFC3339), opts.Until.Format(time.RFC3339))
	}

	users, err := readUsers(ctx, db, bson.D{})
	if err != nil {
		return nil, err
	}
	for _, u := range users {
		rep.Drift = append(rep.Drift, u.malformed...)
	}
	lg, windowUsers, err := rep.checkRows(ctx, db, users, opts)
	if err != nil {
		return nil, err
	}
	if err := rep.checkLedger(ctx, db, users, lg, windowUsers, opts.RecheckDelay); err != nil {
		return nil, err
	}
	rep.checkHolds(users, now, opts.MaxHoldAge)
	rep.checkBalances(users)
	rep.baseline = baselineOf(users, now)
	if opts.Baseline != nil {
		rep.BaselineAt = opts.Baseline.TakenAt
		compareBaseline(rep, opts.Baseline, users, opts.AllowCredit)
	}

	sortItems(rep.Drift)
	return rep, nil
}

// inWindow reports whether a log row is in the window of rows checked one
// by one: every row when the window is unbounded, else only rows with a
// createdAt inside it.
func (o Options) inWindow(r *logRow) bool {
	if o.Since.IsZero() && o.Until.IsZero() {
		return true
	}
	if !r.hasCreated {
		return false
	}
	return (o.Since.IsZero() || !r.createdAt.Before(o.Since)) && (o.Until.IsZero() || r.createdAt.Before(o.Until))
}

// checkRows reads every log row into a ledger (every row counts there:
// llmNet is cumulative) and checks the rows in the window one by one,
// counting them and totalling what their requests were charged (each
// requestId once). A request with more than one row whose first is in the
// window is drift. It returns the ledger and the users of the rows in the
// window.
func (rep *Report) checkRows(ctx context.Context, db *mongo.Database, users map[string]*userState, opts Options) (*ledger, map[string]bool, error) {
	lg := newLedger()
	windowUsers := map[string]bool{}
	err := scanRows(ctx, db, bson.D{}, func(r *logRow) {
		in := opts.inWindow(r)
		first := lg.add(r, users[r.user], in)
		if !in {
			return
		}
		rep.RowsChecked++
		rep.Drift = append(rep.Drift, checkRow(r)...)
		if r.hasUser {
			windowUsers[r.user] = true
		}
		if first {
			rep.Charged = billing.AddSat(rep.Charged, billing.Nano(r.charged))
			rep.Shortfall = billing.AddSat(rep.Shortfall, billing.Nano(r.shortfall))
		}
	})
	if err != nil {
		return nil, nil, err
	}
	for _, d := range lg.dups {
		if !d.inWindow {
			continue
		}
		rep.Drift = append(rep.Drift, Item{
			Kind: KindDuplicateRequest, User: d.user, RequestID: d.rid, Amount: billing.Nano(d.extraCharged),
			Detail: fmt.Sprintf("%d log rows for one request: the request is logged (or charged) more than once", d.rows),
		})
	}
	return lg, windowUsers, nil
}

// checkLedger checks the ledger of every user with ledger state (llmNet,
// holds or receipts) or a row in the window. When recheckDelay is positive,
// the users that disagree (up to MaxRecheckUsers) are read again after it
// and only what still disagrees is drift.
func (rep *Report) checkLedger(ctx context.Context, db *mongo.Database, users map[string]*userState,
	lg *ledger, windowUsers map[string]bool, recheckDelay time.Duration) error {
	check := map[string]bool{}
	for id, u := range users {
		if u.hasNet || len(u.holds) > 0 || len(u.receipts) > 0 {
			check[id] = true
		}
	}
	for id := range windowUsers {
		check[id] = true
	}
	rep.UsersChecked = len(check)
	var recheck []string
	for _, id := range sortedKeys(check) {
		items, pending := ledgerItems(id, users[id], lg.taken[id], lg.seen)
		rep.ReceiptsPending += pending
		if len(items) > 0 && recheckDelay > 0 && len(recheck) < MaxRecheckUsers {
			recheck = append(recheck, id)
			continue
		}
		rep.Drift = append(rep.Drift, items...)
	}
	if len(recheck) > 0 {
		items, err := recheckLedger(ctx, db, recheck, recheckDelay)
		if err != nil {
			return err
		}
		rep.Drift = append(rep.Drift, items...)
	}
	return nil
}

// checkHolds lists every outstanding hold, by user and requestId, counts
// them and the leftovers among them (each leftover is drift), and reports
// a user whose llmHeld differs from the number of its holds.
func (rep *Report) checkHolds(users map[string]*userState, now time.Time, maxHoldAge time.Duration) {
	for _, id := range sortedKeys(users) {
		u := users[id]
		for _, rid := range sortedKeys(u.holds) {
			h := u.holds[rid]
			out := listHold(id, rid, h, now, maxHoldAge)
			rep.HoldsOutstanding++
			if out.Leftover {
				rep.HoldsLeftover++
				rep.Drift = append(rep.Drift, Item{
					Kind: KindLeftoverHold, User: id, RequestID: rid, Field: strings.Join(h.fields, "+"), Amount: out.Amount,
					Detail: "leftover hold: " + out.Reason + fmt.Sprintf(" (owner %q)", h.owner),
				})
			}
			rep.Holds = append(rep.Holds, out)
		}
		if u.held != int64(len(u.holds)) {
			rep.Drift = append(rep.Drift, Item{
				Kind: KindHeldCount, User: id,
				Detail: fmt.Sprintf("%s is %d but %s has %d hold(s)", mongostore.FieldHeld, u.held, mongostore.FieldHolds, len(u.holds)),
			})
		}
	}
}

// listHold is user's hold rid as the report lists it, judged a leftover at
// now when it has no lease end, its lease ended, or (maxHoldAge positive)
// it was taken more than maxHoldAge ago.
func listHold(user, rid string, h *holdState, now time.Time, maxHoldAge time.Duration) Hold {
	out := Hold{
		User: user, RequestID: rid, Fields: h.fields, Amounts: h.amounts, Amount: h.total(),
		At: h.at, Exp: h.exp, Owner: h.owner, LogID: h.log,
	}
	switch {
	case h.exp.IsZero():
		out.Leftover, out.Reason = true, "the hold has no lease end (exp)"
	case h.exp.Before(now):
		out.Leftover, out.Reason = true, fmt.Sprintf("its lease ended %s ago", roundDur(now.Sub(h.exp)))
	case maxHoldAge > 0 && !h.at.IsZero() && now.Sub(h.at) > maxHoldAge:
		out.Leftover, out.Reason = true, fmt.Sprintf("taken %s ago, more than the maximum hold age %s", roundDur(now.Sub(h.at)), maxHoldAge)
	}
	return out
}

// checkBalances reports every balance field below zero.
func (rep *Report) checkBalances(users map[string]*userState) {
	for _, id := range sortedKeys(users) {
		u := users[id]
		for _, f := range BalanceFields {
			if b, ok := u.balances[f]; ok && b < 0 {
				rep.Drift = append(rep.Drift, Item{Kind: KindNegativeBalance, User: id, Field: f, Amount: b, Detail: "balance below zero"})
			}
		}
	}
}

// recheckLedger waits delay, then reads each user and their rows again and
// returns the ledger drift that remains.
func recheckLedger(ctx context.Context, db *mongo.Database, ids []string, delay time.Duration) ([]Item, error) {
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-t.C:
	}
	var out []Item
	for _, id := range ids {
		users, err := readUsers(ctx, db, bson.D{{Key: "_id", Value: id}})
		if err != nil {
			return nil, err
		}
		lg := newLedger()
		err = scanRows(ctx, db, bson.D{{Key: "userId", Value: id}}, func(r *logRow) {
			if r.user == id {
				lg.add(r, users[id], false)
			}
		})
		if err != nil {
			return nil, err
		}
		items, _ := ledgerItems(id, users[id], lg.taken[id], lg.seen)
		out = append(out, items...)
	}
	return out, nil
}

// ledger sums what the logged requests took, per user and field.
type ledger struct {
	taken map[string]map[string]int64
	// seen maps each requestId to whether its first row is in the window.
	seen map[string]bool
	dups map[string]*dup
}

type dup struct {
	rid, user    string
	rows         int
	extraCharged int64
	inWindow     bool
}

func newLedger() *ledger {
	return &ledger{taken: map[string]map[string]int64{}, seen: map[string]bool{}, dups: map[string]*dup{}}
}

// add counts a row; it reports whether the row is its request's first.
// A request's later rows are duplicates and do not count again; the row of
// a request still held (u.holds) does not count yet.
func (l *ledger) add(r *logRow, u *userState, inWindow bool) bool {
	if firstIn, seen := l.seen[r.rid]; seen {
		d := l.dups[r.rid]
		if d == nil {
			d = &dup{rid: r.rid, user: r.user, rows: 1, inWindow: firstIn}
			l.dups[r.rid] = d
		}
		d.rows++
		d.extraCharged = billing.AddSat(d.extraCharged, r.charged)
		d.inWindow = d.inWindow || inWindow
		return false
	}
	l.seen[r.rid] = inWindow
	if !r.hasUser {
		return true
	}
	if u != nil {
		if _, held := u.holds[r.rid]; held {
			return true
		}
	}
	m := l.taken[r.user]
	if m == nil {
		m = map[string]int64{}
		l.taken[r.user] = m
	}
	for _, t := range r.taken {
		m[t.field] = billing.AddSat(m[t.field], t.amount)
	}
	return true
}

// ledgerItems compares a user's llmNet with what the logs (taken), the
// outstanding holds and the pending receipts explain. u is nil when the
// user has no document. It also returns the number of pending receipts.
func ledgerItems(id string, u *userState, taken map[string]int64, seen map[string]bool) ([]Item, int) {
	expected := map[string]int64{}
	fields := map[string]bool{}
	for f, v := range taken {
		expected[f] = billing.SubSat(expected[f], v)
		fields[f] = true
	}
	net := map[string]int64{}
	pending := 0
	if u != nil {
		for f, v := range u.net {
			net[f] = v
			fields[f] = true
		}
		for _, h := range u.holds {
			for i, f := range h.fields {
				expected[f] = billing.SubSat(expected[f], int64(h.amounts[i]))
				fields[f] = true
			}
		}
		for rid, rc := range u.receipts {
			if _, logged := seen[rid]; logged {
				continue
			}
			pending++
			for i, f := range rc.fields {
				expected[f] = billing.SubSat(expected[f], rc.taken[i])
				fields[f] = true
			}
		}
	}
	var out []Item
	for _, f := range sortedKeys(fields) {
		diff := billing.SubSat(net[f], expected[f])
		switch {
		case diff < 0:
			out = append(out, Item{
				Kind: KindChargeWithoutLog, User: id, Field: f, Amount: billing.Nano(billing.SubSat(0, diff)),
				Detail: fmt.Sprintf("%s.%s is %s but the logs and holds explain %s", mongostore.FieldNet, f, billing.Nano(net[f]), billing.Nano(expected[f])),
			})
		case diff > 0:
			detail := fmt.Sprintf("%s.%s is %s but the logs and holds explain %s", mongostore.FieldNet, f, billing.Nano(net[f]), billing.Nano(expected[f]))
			if u == nil {
				detail += " (no " + mongostore.CollUsers + " document)"
			}
			out = append(out, Item{Kind: KindLogWithoutCharge, User: id, Field: f, Amount: billing.Nano(diff), Detail: detail})
		}
	}
	return out, pending
}

// checkRow checks one log row against itself.
func checkRow(r *logRow) []Item {
	var out []Item
	add := func(kind Kind, field string, amount int64, detail string) {
		out = append(out, Item{Kind: kind, User: r.user, Field: field, RequestID: r.rid, Amount: billing.Nano(amount), Detail: detail})
	}
	for _, m := range r.malformed {
		add(KindMalformed, "", 0, "log row "+r.id+": "+m)
	}
	if !r.hasUser {
		add(KindMalformed, "", 0, "log row "+r.id+" has no userId")
	}
	var sum int64
	var plan []string
	if r.creditField != "" {
		plan = strings.Split(r.creditField, "+")
	}
	for _, t := range r.taken {
		sum = billing.AddSat(sum, t.amount)
		if t.amount < 0 {
			add(KindRowMismatch, t.field, t.amount, "log row "+r.id+": negative takenNano."+t.field)
		}
		if plan != nil && !slices.Contains(plan, t.field) {
			add(KindRowMismatch, t.field, t.amount, fmt.Sprintf("log row %s: takenNano.%s outside its creditField %q", r.id, t.field, r.creditField))
		}
	}
	if r.charged != sum {
		add(KindRowMismatch, "", billing.SubSat(r.charged, sum), fmt.Sprintf("log row %s: chargedNano %s but Σ takenNano %s", r.id, billing.Nano(r.charged), billing.Nano(sum)))
	}
	// Exact for the non-negative amounts of a sound row (negative ones are
	// reported below); saturated, never wrapped, for any other.
	if paid := billing.AddSat(r.charged, r.shortfall); billing.SubSat(r.cost, r.charged) != r.shortfall {
		add(KindRowMismatch, "", billing.SubSat(billing.SubSat(r.cost, r.charged), r.shortfall), fmt.Sprintf("log row %s: costNano %s but chargedNano + shortfallNano %s",
			r.id, billing.Nano(r.cost), billing.Nano(paid)))
	}
	for _, v := range []struct {
		name string
		n    int64
	}{{"costNano", r.cost}, {"chargedNano", r.charged}, {"shortfallNano", r.shortfall}} {
		if v.n < 0 {
			add(KindRowMismatch, "", v.n, "log row "+r.id+": negative "+v.name)
		}
	}
	return out
}

// compareBaseline adds the external movements since base to rep.
func compareBaseline(rep *Report, base *Baseline, users map[string]*userState, allowCredit bool) {
	ids := map[string]bool{}
	for id := range base.Users {
		ids[id] = true
	}
	for id, u := range users {
		if len(u.balances) > 0 || u.hasNet {
			ids[id] = true
		}
	}
	for _, id := range sortedKeys(ids) {
		b, inBase := base.Users[id]
		u := users[id]
		if u == nil {
			var total billing.Nano
			for _, e := range b {
				total = billing.AddSat(total, e.Balance)
			}
			rep.Drift = append(rep.Drift, Item{Kind: KindUserMissing, User: id, Amount: total,
				Detail: "the user is in the baseline but has no " + mongostore.CollUsers + " document any more"})
			continue
		}
		fields := map[string]bool{}
		for f := range b {
			fields[f] = true
		}
		for f := range u.balances {
			fields[f] = true
		}
		for f := range u.net {
			fields[f] = true
		}
		for _, f := range sortedKeys(fields) {
			ext := billing.SubSat(billing.SubSat(u.balances[f], b[f].Balance), billing.SubSat(billing.Nano(u.net[f]), b[f].Net))
			if ext >= -BalanceTolerance && ext <= BalanceTolerance {
				continue
			}
			m := Movement{User: id, Field: f, Amount: ext, Allowed: ext > 0 && allowCredit}
			kind := KindExternalDebit
			if ext > 0 {
				kind = KindExternalCredit
			}
			detail := fmt.Sprintf("%s moved by %s, of which the gateway moved %s", f, billing.SubSat(u.balances[f], b[f].Balance), billing.SubSat(billing.Nano(u.net[f]), b[f].Net))
			if !inBase {
				m.Detail = "not in the baseline"
				detail += " (the user is not in the baseline)"
			}
			rep.External = append(rep.External, m)
			if !m.Allowed {
				rep.Drift = append(rep.Drift, Item{Kind: kind, User: id, Field: f, Amount: ext, Detail: detail})
			}
		}
	}
}

var kindOrder = map[Kind]int{
	KindChargeWithoutLog: 1, KindLogWithoutCharge: 2, KindDuplicateRequest: 3, KindRowMismatch: 4,
	KindLeftoverHold: 5, KindHeldCount: 6, KindNegativeBalance: 7, KindExternalDebit: 8,
	KindExternalCredit: 9, KindUserMissing: 10, KindMalformed: 11,
}

func sortItems(items []Item) {
	slices.SortStableFunc(items, func(a, b Item) int {
		if c := kindOrder[a.Kind] - kindOrder[b.Kind]; c != 0 {
			return c
		}
		if c := strings.Compare(a.User, b.User); c != 0 {
			return c
		}
		if c := strings.Compare(a.Field, b.Field); c != 0 {
			return c
		}
		return strings.Compare(a.RequestID, b.RequestID)
	})
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func roundDur(d time.Duration) time.Duration {
	if d >= time.Minute {
		return d.Round(time.Second)
	}
	return d.Round(time.Millisecond)
}

// findAll runs a find and calls fn with each document.
func findAll(ctx context.Context, coll *mongo.Collection, filter bson.D, opts *options.FindOptionsBuilder, fn func(bson.Raw)) error {
	cur, err := coll.Find(ctx, filter, opts)
	if err != nil {
		return fmt.Errorf("reading %s: %w", coll.Name(), err)
	}
	defer func() { _ = cur.Close(context.WithoutCancel(ctx)) }()
	for cur.Next(ctx) {
		fn(cur.Current)
	}
	if err := cur.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", coll.Name(), err)
	}
	return nil
}

// errNoDB is returned for a nil database.
var errNoDB = errors.New("reconcile: no database")
