package reconcile

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/reconcile"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

// server is the package's database server; each test seeds its own
// database in it.
var (
	server   *testdb.DB
	client   *mongo.Client
	dbSerial atomic.Int64
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "llm-billing-reconcile-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	server, err = testdb.Start(ctx, dir, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting the test database:", err)
		return 1
	}
	defer server.Close()
	client, err = server.Connect(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() { _ = client.Disconnect(context.Background()) }()
	return m.Run()
}

// freshDB seeds the consistent set in a new database.
func freshDB(t *testing.T) (*mongo.Database, *Fixture) {
	t.Helper()
	db := client.Database(fmt.Sprintf("rec%d", dbSerial.Add(1)))
	f, err := Seed(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Drop(context.Background()) })
	return db, f
}

func run(t *testing.T, db *mongo.Database, opts reconcile.Options) *reconcile.Report {
	t.Helper()
	rep, err := reconcile.Run(context.Background(), db, opts)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// want is a drift item as the tests name it.
type want struct {
	kind   reconcile.Kind
	user   string
	field  string
	amount string // billing.Nano.String()
}

func (w want) String() string { return fmt.Sprintf("%s %s %s %s", w.kind, w.user, w.field, w.amount) }

func driftOf(rep *reconcile.Report) []want {
	out := []want{}
	for _, it := range rep.Drift {
		out = append(out, want{it.Kind, it.User, it.Field, it.Amount.String()})
	}
	return out
}

func assertDrift(t *testing.T, rep *reconcile.Report, wants ...want) {
	t.Helper()
	got := driftOf(rep)
	if wants == nil {
		wants = []want{}
	}
	if !reflect.DeepEqual(got, wants) {
		var text bytes.Buffer
		_ = rep.WriteText(&text)
		t.Fatalf("drift:\n got %v\nwant %v\n%s", got, wants, text.String())
	}
	if rep.OK() != (len(wants) == 0) {
		t.Fatalf("OK() = %v with %d drift item(s)", rep.OK(), len(wants))
	}
}

func mustExec(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func inc(t *testing.T, db *mongo.Database, user string, set bson.D) {
	t.Helper()
	r, err := db.Collection("usersNew").UpdateOne(context.Background(), bson.D{{Key: "_id", Value: user}}, bson.D{{Key: "$inc", Value: set}})
	mustExec(t, err)
	if r.MatchedCount != 1 {
		t.Fatalf("no user %s", user)
	}
}

func setUser(t *testing.T, db *mongo.Database, user string, set bson.D) {
	t.Helper()
	r, err := db.Collection("usersNew").UpdateOne(context.Background(), bson.D{{Key: "_id", Value: user}}, bson.D{{Key: "$set", Value: set}})
	mustExec(t, err)
	if r.MatchedCount != 1 {
		t.Fatalf("no user %s", user)
	}
}

func setRow(t *testing.T, db *mongo.Database, id bson.ObjectID, set bson.D) {
	t.Helper()
	r, err := db.Collection("request_logs").UpdateOne(context.Background(), bson.D{{Key: "_id", Value: id}}, bson.D{{Key: "$set", Value: set}})
	mustExec(t, err)
	if r.MatchedCount != 1 {
		t.Fatalf("no row %s", id.Hex())
	}
}

func TestConsistentSetHasNoDrift(t *testing.T) {
	db, f := freshDB(t)
	rep := run(t, db, reconcile.Options{})
	assertDrift(t, rep)
	if rep.UsersChecked != 3 || rep.RowsChecked != 5 {
		t.Errorf("users checked %d, rows checked %d; want 3 and 5", rep.UsersChecked, rep.RowsChecked)
	}
	if rep.Charged != TotalCharged || rep.Shortfall != TotalShortfall {
		t.Errorf("charged %s shortfall %s; want %s and %s", rep.Charged, rep.Shortfall, billing.Nano(TotalCharged), billing.Nano(TotalShortfall))
	}
	if rep.HoldsOutstanding != 1 || rep.HoldsLeftover != 0 || len(rep.Holds) != 1 {
		t.Fatalf("holds %+v", rep.Holds)
	}
	h := rep.Holds[0]
	if h.User != "bob" || h.RequestID != "b2" || h.Amount != B2Hold || h.Leftover || h.Owner != "caddy-1" ||
		h.LogID != f.RowIDs["b2"].Hex() || !slices.Equal(h.Fields, []string{"refCredits"}) {
		t.Errorf("hold %+v", h)
	}
	var text bytes.Buffer
	mustExec(t, rep.WriteText(&text))
	if !strings.Contains(text.String(), "\nOK: ") || !strings.Contains(text.String(), "in-flight") {
		t.Errorf("text report:\n%s", text.String())
	}
}

// TestDriftDetected breaks the consistent set one way at a time.
func TestDriftDetected(t *testing.T) {
	type tc struct {
		name   string
		break_ func(t *testing.T, db *mongo.Database, f *Fixture)
		opts   reconcile.Options
		want   []want
		check  func(t *testing.T, rep *reconcile.Report)
	}
	tests := []tc{
		{
			name: "deleted log row",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				_, err := db.Collection("request_logs").DeleteOne(context.Background(), bson.D{{Key: "_id", Value: f.RowIDs["a2"]}})
				mustExec(t, err)
			},
			want: []want{{reconcile.KindChargeWithoutLog, "alice", "creditsNew", "$0.500000000"}},
		},
		{
			name: "duplicated log row",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				var row bson.D
				mustExec(t, db.Collection("request_logs").FindOne(context.Background(), bson.D{{Key: "_id", Value: f.RowIDs["b1"]}}).Decode(&row))
				row[0].Value = bson.NewObjectID()
				_, err := db.Collection("request_logs").InsertOne(context.Background(), row)
				mustExec(t, err)
			},
			want: []want{{reconcile.KindDuplicateRequest, "bob", "", "$0.030000000"}},
			check: func(t *testing.T, rep *reconcile.Report) {
				if rep.Drift[0].RequestID != "b1" || rep.RowsChecked != 6 || rep.Charged != TotalCharged {
					t.Errorf("duplicate %+v, rows %d, charged %s", rep.Drift[0], rep.RowsChecked, rep.Charged)
				}
			},
		},
		{
			name: "charged twice with two rows",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				var row bson.D
				mustExec(t, db.Collection("request_logs").FindOne(context.Background(), bson.D{{Key: "_id", Value: f.RowIDs["c1"]}}).Decode(&row))
				row[0].Value = bson.NewObjectID()
				_, err := db.Collection("request_logs").InsertOne(context.Background(), row)
				mustExec(t, err)
				inc(t, db, "carol", bson.D{{Key: "llmNet.creditsNew", Value: int64(-C1Charged)}, {Key: "creditsNew", Value: billing.Nano(-C1Charged).USD()}})
			},
			want: []want{
				{reconcile.KindChargeWithoutLog, "carol", "creditsNew", "$0.005000000"},
				{reconcile.KindDuplicateRequest, "carol", "", "$0.005000000"},
				{reconcile.KindNegativeBalance, "carol", "creditsNew", "-$0.005000000"},
			},
		},
		{
			name: "llmNet one nano more negative",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				inc(t, db, "carol", bson.D{{Key: "llmNet.creditsNew", Value: int64(-1)}})
			},
			want: []want{{reconcile.KindChargeWithoutLog, "carol", "creditsNew", "$0.000000001"}},
		},
		{
			name: "llmNet one nano less negative",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				inc(t, db, "bob", bson.D{{Key: "llmNet.refCredits", Value: int64(1)}})
			},
			want: []want{{reconcile.KindLogWithoutCharge, "bob", "refCredits", "$0.000000001"}},
		},
		{
			name: "expired hold",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				setUser(t, db, "bob", bson.D{{Key: "llmHolds.b2.exp", Value: f.Now.Add(-time.Minute)}})
			},
			want: []want{{reconcile.KindLeftoverHold, "bob", "refCredits", "$0.100000000"}},
			check: func(t *testing.T, rep *reconcile.Report) {
				if rep.HoldsOutstanding != 1 || rep.HoldsLeftover != 1 || !rep.Holds[0].Leftover || rep.Drift[0].RequestID != "b2" {
					t.Errorf("holds %+v, drift %+v", rep.Holds, rep.Drift)
				}
			},
		},
		{
			name: "hold older than max-hold-age",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				setUser(t, db, "bob", bson.D{{Key: "llmHolds.b2.at", Value: f.Now.Add(-time.Hour)}})
			},
			opts: reconcile.Options{MaxHoldAge: 30 * time.Minute},
			want: []want{{reconcile.KindLeftoverHold, "bob", "refCredits", "$0.100000000"}},
		},
		{
			name: "chargedNano is not the sum of takenNano",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				// costNano moves with it, so only that rule breaks.
				setRow(t, db, f.RowIDs["c1"], bson.D{{Key: "chargedNano", Value: int64(C1Charged + 7)}, {Key: "costNano", Value: int64(C1Cost + 7)}})
			},
			want: []want{{reconcile.KindRowMismatch, "carol", "", "$0.000000007"}},
			check: func(t *testing.T, rep *reconcile.Report) {
				if !strings.Contains(rep.Drift[0].Detail, "takenNano") || rep.Drift[0].RequestID != "c1" {
					t.Errorf("detail %q", rep.Drift[0].Detail)
				}
			},
		},
		{
			name: "costNano is not charged plus shortfall",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				setRow(t, db, f.RowIDs["c1"], bson.D{{Key: "shortfallNano", Value: int64(0)}})
			},
			want: []want{{reconcile.KindRowMismatch, "carol", "", "$0.003000000"}},
		},
		{
			name: "row outside the window is not checked row by row",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				// a1 is 48 h old.
				setRow(t, db, f.RowIDs["a1"], bson.D{{Key: "chargedNano", Value: int64(A1Cost + 1)}, {Key: "costNano", Value: int64(A1Cost + 1)}})
			},
			opts: reconcile.Options{Since: time.Now().Add(-24 * time.Hour)},
			check: func(t *testing.T, rep *reconcile.Report) {
				if rep.RowsChecked != 4 || rep.Charged != TotalCharged-A1Cost {
					t.Errorf("rows %d charged %s", rep.RowsChecked, rep.Charged)
				}
			},
		},
		{
			name: "row inside the window is",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				setRow(t, db, f.RowIDs["a1"], bson.D{{Key: "chargedNano", Value: int64(A1Cost + 1)}, {Key: "costNano", Value: int64(A1Cost + 1)}})
			},
			opts: reconcile.Options{Since: time.Now().Add(-72 * time.Hour), Until: time.Now().Add(time.Minute)},
			want: []want{{reconcile.KindRowMismatch, "alice", "", "$0.000000001"}},
		},
		{
			name: "negative balance",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				setUser(t, db, "carol", bson.D{{Key: "creditsNew", Value: -0.5}})
			},
			want: []want{{reconcile.KindNegativeBalance, "carol", "creditsNew", "-$0.500000000"}},
		},
		{
			name: "llmHeld disagrees with llmHolds",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				inc(t, db, "bob", bson.D{{Key: "llmHeld", Value: int64(1)}})
			},
			want: []want{{reconcile.KindHeldCount, "bob", "", "$0.000000000"}},
		},
		{
			name: "hold settled after the row: consistent",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				// Settle b2 as the engine does: give back the unused part,
				// drop the hold, in one update.
				back := int64(B2Hold - B2Taken)
				_, err := db.Collection("usersNew").UpdateOne(context.Background(), bson.D{{Key: "_id", Value: "bob"}}, bson.D{
					{Key: "$inc", Value: bson.D{{Key: "refCredits", Value: billing.Nano(back).USD()}, {Key: "llmNet.refCredits", Value: back}, {Key: "llmHeld", Value: int64(-1)}}},
					{Key: "$unset", Value: bson.D{{Key: "llmHolds.b2", Value: ""}}},
				})
				mustExec(t, err)
			},
			check: func(t *testing.T, rep *reconcile.Report) {
				if rep.HoldsOutstanding != 0 {
					t.Errorf("holds %+v", rep.Holds)
				}
			},
		},
		{
			name: "log row of a user without bookkeeping",
			break_: func(t *testing.T, db *mongo.Database, f *Fixture) {
				_, err := db.Collection("request_logs").InsertOne(context.Background(), bson.D{
					{Key: "userId", Value: "dave"}, {Key: "requestId", Value: "d1"}, {Key: "creditField", Value: "credits"},
					{Key: "createdAt", Value: f.Now}, {Key: "costNano", Value: int64(42)}, {Key: "chargedNano", Value: int64(42)},
					{Key: "shortfallNano", Value: int64(0)}, {Key: "takenNano", Value: bson.D{{Key: "credits", Value: int64(42)}}},
				})
				mustExec(t, err)
			},
			want: []want{{reconcile.KindLogWithoutCharge, "dave", "credits", "$0.000000042"}},
			check: func(t *testing.T, rep *reconcile.Report) {
				if rep.UsersChecked != 4 {
					t.Errorf("users checked %d", rep.UsersChecked)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db, f := freshDB(t)
			tt.break_(t, db, f)
			rep := run(t, db, tt.opts)
			assertDrift(t, rep, tt.want...)
			if tt.check != nil {
				tt.check(t, rep)
			}
		})
	}
}

func TestBalancesAgainstBaseline(t *testing.T) {
	db, _ := freshDB(t)
	rep := run(t, db, reconcile.Options{})
	assertDrift(t, rep)

	// The baseline goes through a file and comes back the same.
	path := filepath.Join(t.TempDir(), "baseline.json")
	mustExec(t, reconcile.WriteBaselineFile(path, rep.Baseline()))
	base, err := reconcile.ReadBaselineFile(path)
	mustExec(t, err)
	if !base.TakenAt.Equal(rep.Baseline().TakenAt) || !reflect.DeepEqual(base.Users, rep.Baseline().Users) {
		t.Fatalf("baseline round trip:\n got %+v\nwant %+v", base, rep.Baseline())
	}
	if e := base.Users["alice"]["creditsNew"]; e.Net != -A1Cost-A2Cost || e.Balance != billing.NanoFromUSD(10)-A1Cost-A2Cost {
		t.Fatalf("alice in the baseline: %+v", e)
	}
	if _, ok := base.Users["dave"]["refCredits"]; !ok {
		t.Fatal("the legacy user is not in the baseline")
	}

	// Nothing moved: no external movement.
	rep = run(t, db, reconcile.Options{Baseline: base})
	assertDrift(t, rep)
	if len(rep.External) != 0 || !rep.BaselineAt.Equal(base.TakenAt) {
		t.Fatalf("external %+v", rep.External)
	}

	// The gateway bills a new request: balance and llmNet move together,
	// the row is written. Still no drift.
	ctx := context.Background()
	inc(t, db, "alice", bson.D{{Key: "creditsNew", Value: billing.Nano(-30_000_000).USD()}, {Key: "llmNet.creditsNew", Value: int64(-30_000_000)}})
	_, err = db.Collection("request_logs").InsertOne(ctx, bson.D{
		{Key: "userId", Value: "alice"}, {Key: "requestId", Value: "a3"}, {Key: "creditField", Value: "creditsNew"},
		{Key: "createdAt", Value: time.Now()}, {Key: "costNano", Value: int64(30_000_000)}, {Key: "chargedNano", Value: int64(30_000_000)},
		{Key: "shortfallNano", Value: int64(0)}, {Key: "takenNano", Value: bson.D{{Key: "creditsNew", Value: int64(30_000_000)}}},
	})
	mustExec(t, err)
	assertDrift(t, run(t, db, reconcile.Options{Baseline: base}))

	// Tampering: −$0.01 behind the gateway's back.
	inc(t, db, "alice", bson.D{{Key: "creditsNew", Value: -0.01}})
	rep = run(t, db, reconcile.Options{Baseline: base, AllowCredit: true})
	assertDrift(t, rep, want{reconcile.KindExternalDebit, "alice", "creditsNew", "-$0.010000000"})
	inc(t, db, "alice", bson.D{{Key: "creditsNew", Value: 0.01}})
	assertDrift(t, run(t, db, reconcile.Options{Baseline: base}))

	// A top-up of $0.01: drift, unless credits are allowed.
	inc(t, db, "bob", bson.D{{Key: "credits", Value: 0.01}})
	rep = run(t, db, reconcile.Options{Baseline: base})
	assertDrift(t, rep, want{reconcile.KindExternalCredit, "bob", "credits", "$0.010000000"})
	rep = run(t, db, reconcile.Options{Baseline: base, AllowCredit: true})
	assertDrift(t, rep)
	if len(rep.External) != 1 || !rep.External[0].Allowed || rep.External[0].Amount != 10_000_000 || rep.External[0].User != "bob" {
		t.Fatalf("external %+v", rep.External)
	}

	// A new user with credits is a top-up too; a user gone is drift.
	_, err = db.Collection("usersNew").InsertOne(ctx, bson.D{{Key: "_id", Value: "erin"}, {Key: "creditsNew", Value: int32(2)}})
	mustExec(t, err)
	_, err = db.Collection("usersNew").DeleteOne(ctx, bson.D{{Key: "_id", Value: "dave"}})
	mustExec(t, err)
	rep = run(t, db, reconcile.Options{Baseline: base, AllowCredit: true})
	assertDrift(t, rep, want{reconcile.KindUserMissing, "dave", "", "$4.500000000"})
	if len(rep.External) != 2 {
		t.Fatalf("external %+v", rep.External)
	}
}

func TestLedgerIgnoresBalanceNoise(t *testing.T) {
	// Balances are doubles: a sub-nano difference is not a movement.
	db, _ := freshDB(t)
	base := run(t, db, reconcile.Options{}).Baseline()
	inc(t, db, "alice", bson.D{{Key: "creditsNew", Value: 4e-10}})
	assertDrift(t, run(t, db, reconcile.Options{Baseline: base}))
}

func TestRecheckClearsTransientDrift(t *testing.T) {
	// A settlement whose row is written in a later batch: the first read
	// sees a charge without a log; the recheck, once the row is in, not.
	db, _ := freshDB(t)
	inc(t, db, "alice", bson.D{{Key: "llmNet.creditsNew", Value: int64(-1000)}, {Key: "creditsNew", Value: billing.Nano(-1000).USD()}})
	done := make(chan error, 1)
	go func() {
		time.Sleep(300 * time.Millisecond)
		_, err := db.Collection("request_logs").InsertOne(context.Background(), bson.D{
			{Key: "userId", Value: "alice"}, {Key: "requestId", Value: "a9"}, {Key: "creditField", Value: "creditsNew"},
			{Key: "createdAt", Value: time.Now()}, {Key: "costNano", Value: int64(1000)}, {Key: "chargedNano", Value: int64(1000)},
			{Key: "shortfallNano", Value: int64(0)}, {Key: "takenNano", Value: bson.D{{Key: "creditsNew", Value: int64(1000)}}},
		})
		done <- err
	}()
	// Without a recheck the transient state is reported...
	rep := run(t, db, reconcile.Options{})
	mustExec(t, <-done)
	if len(rep.Drift) == 0 {
		t.Skip("the row was written before the first read; nothing to recheck")
	}
	// ...and set back, with one.
	_, err := db.Collection("request_logs").DeleteOne(context.Background(), bson.D{{Key: "requestId", Value: "a9"}})
	mustExec(t, err)
	go func() {
		time.Sleep(200 * time.Millisecond)
		_, err := db.Collection("request_logs").InsertOne(context.Background(), bson.D{
			{Key: "userId", Value: "alice"}, {Key: "requestId", Value: "a9"}, {Key: "creditField", Value: "creditsNew"},
			{Key: "createdAt", Value: time.Now()}, {Key: "costNano", Value: int64(1000)}, {Key: "chargedNano", Value: int64(1000)},
			{Key: "shortfallNano", Value: int64(0)}, {Key: "takenNano", Value: bson.D{{Key: "creditsNew", Value: int64(1000)}}},
		})
		done <- err
	}()
	rep = run(t, db, reconcile.Options{RecheckDelay: 2 * time.Second})
	mustExec(t, <-done)
	assertDrift(t, rep)
}

func TestCLI(t *testing.T) {
	db, _ := freshDB(t)
	uri := server.URI()
	dir := t.TempDir()
	basePath := filepath.Join(dir, "base.json")
	ctx := context.Background()

	cli := func(c reconcile.CLI) (int, string, error) {
		var out bytes.Buffer
		c.Stdout = &out
		if c.URI == "" {
			c.URI = uri
		}
		if c.Database == "" {
			c.Database = db.Name()
		}
		code, err := c.Run(ctx)
		return code, out.String(), err
	}

	code, out, err := cli(reconcile.CLI{SaveBaselineFile: basePath})
	if code != reconcile.ExitOK || err != nil || !strings.Contains(out, "OK: ") {
		t.Fatalf("consistent: exit %d, %v\n%s", code, err, out)
	}
	if _, err := reconcile.ReadBaselineFile(basePath); err != nil {
		t.Fatalf("saved baseline: %v", err)
	}

	inc(t, db, "alice", bson.D{{Key: "creditsNew", Value: 0.01}})
	code, out, err = cli(reconcile.CLI{BaselineFile: basePath, JSON: true})
	if code != reconcile.ExitDrift || err == nil || !strings.Contains(err.Error(), "1 item") {
		t.Fatalf("top-up without --allow-credit: exit %d, %v\n%s", code, err, out)
	}
	var js struct {
		OK    bool `json:"ok"`
		Drift []struct {
			Kind       string `json:"kind"`
			User       string `json:"user"`
			Field      string `json:"field"`
			Amount     string `json:"amount"`
			AmountNano int64  `json:"amountNano"`
		} `json:"drift"`
		External []struct {
			Allowed bool `json:"allowed"`
		} `json:"external"`
	}
	mustExec(t, json.Unmarshal([]byte(out), &js))
	if js.OK || len(js.Drift) != 1 || js.Drift[0].Kind != "external-credit" || js.Drift[0].User != "alice" ||
		js.Drift[0].Field != "creditsNew" || js.Drift[0].Amount != "$0.010000000" || js.Drift[0].AmountNano != 10_000_000 {
		t.Fatalf("JSON report: %s", out)
	}

	// Allowed, and the baseline rolls forward in the same file.
	code, out, err = cli(reconcile.CLI{BaselineFile: basePath, SaveBaselineFile: basePath, Options: reconcile.Options{AllowCredit: true}})
	if code != reconcile.ExitOK || err != nil || !strings.Contains(out, "allowed (credit)") {
		t.Fatalf("--allow-credit: exit %d, %v\n%s", code, err, out)
	}
	code, _, err = cli(reconcile.CLI{BaselineFile: basePath})
	if code != reconcile.ExitOK || err != nil {
		t.Fatalf("after the rolled baseline: exit %d, %v", code, err)
	}

	// Errors: exit 2, and the URI's secrets are never in the message.
	code, _, err = cli(reconcile.CLI{BaselineFile: filepath.Join(dir, "missing.json")})
	if code != reconcile.ExitError || err == nil {
		t.Fatalf("missing baseline: exit %d, %v", code, err)
	}
	for _, bad := range []string{
		"mongodb://admin:Sup3rSecretPw@127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
		"mongodb://admin:Sup3rSecretPw@127.0.0.1:notaport/",
		"mongodb://admin:Sup3rSecretPw@@/%zz",
		"postgres://admin:Sup3rSecretPw@127.0.0.1/",
	} {
		code, out, err := cli(reconcile.CLI{URI: bad, ConnectTimeout: 500 * time.Millisecond})
		if code != reconcile.ExitError || err == nil {
			t.Fatalf("%s: exit %d, %v", bad, code, err)
		}
		if strings.Contains(err.Error(), "Sup3rSecretPw") || strings.Contains(err.Error(), bad) || strings.Contains(out, "Sup3rSecretPw") {
			t.Fatalf("the URI leaked: %v", err)
		}
		t.Logf("%v", err)
	}
}
