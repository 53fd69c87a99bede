package reconcile

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Drop(context.Background()) })
	return db, f
}

func run(t *testing.T, db *mongo.Database, opts reconcile.Options) *reconcile.Report {
	t.Helper()
	rep, err := reconcile.Run(context.Background(), db, opts)
	require.NoError(t, err)
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
	if !assert.Equal(t, wants, got, "drift") {
		var text bytes.Buffer
		_ = rep.WriteText(&text)
		require.FailNow(t, "unexpected drift", "report:\n%s", text.String())
	}
	require.Equal(t, len(wants) == 0, rep.OK(), "OK() with %d drift item(s)", len(wants))
}

func mustExec(t *testing.T, err error) {
	t.Helper()
	require.NoError(t, err)
}

func inc(t *testing.T, db *mongo.Database, user string, set bson.D) {
	t.Helper()
	r, err := db.Collection("usersNew").UpdateOne(context.Background(), bson.D{{Key: "_id", Value: user}}, bson.D{{Key: "$inc", Value: set}})
	require.NoError(t, err)
	require.Equal(t, int64(1), r.MatchedCount, "no user %s", user)
}

func setUser(t *testing.T, db *mongo.Database, user string, set bson.D) {
	t.Helper()
	r, err := db.Collection("usersNew").UpdateOne(context.Background(), bson.D{{Key: "_id", Value: user}}, bson.D{{Key: "$set", Value: set}})
	require.NoError(t, err)
	require.Equal(t, int64(1), r.MatchedCount, "no user %s", user)
}

func setRow(t *testing.T, db *mongo.Database, id bson.ObjectID, set bson.D) {
	t.Helper()
	r, err := db.Collection("request_logs").UpdateOne(context.Background(), bson.D{{Key: "_id", Value: id}}, bson.D{{Key: "$set", Value: set}})
	require.NoError(t, err)
	require.Equal(t, int64(1), r.MatchedCount, "no row %s", id.Hex())
}

func TestConsistentSetHasNoDrift(t *testing.T) {
	db, f := freshDB(t)
	rep := run(t, db, reconcile.Options{})
	assertDrift(t, rep)
	assert.Equal(t, 3, rep.UsersChecked, "users checked")
	assert.Equal(t, 5, rep.RowsChecked, "rows checked")
	assert.Equal(t, billing.Nano(TotalCharged), rep.Charged, "charged")
	assert.Equal(t, billing.Nano(TotalShortfall), rep.Shortfall, "shortfall")
	require.Equal(t, 1, rep.HoldsOutstanding, "holds %+v", rep.Holds)
	require.Zero(t, rep.HoldsLeftover, "holds %+v", rep.Holds)
	require.Len(t, rep.Holds, 1)
	h := rep.Holds[0]
	assert.Equal(t, "bob", h.User, "hold %+v", h)
	assert.Equal(t, "b2", h.RequestID, "hold %+v", h)
	assert.Equal(t, billing.Nano(B2Hold), h.Amount, "hold %+v", h)
	assert.False(t, h.Leftover, "hold %+v", h)
	assert.Equal(t, "caddy-1", h.Owner, "hold %+v", h)
	assert.Equal(t, f.RowIDs["b2"].Hex(), h.LogID, "hold %+v", h)
	assert.Equal(t, []string{"refCredits"}, h.Fields, "hold %+v", h)
	var text bytes.Buffer
	require.NoError(t, rep.WriteText(&text))
	assert.Contains(t, text.String(), "\nOK: ", "text report")
	assert.Contains(t, text.String(), "in-flight", "text report")
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
				assert.Equal(t, "b1", rep.Drift[0].RequestID, "duplicate %+v", rep.Drift[0])
				assert.Equal(t, 6, rep.RowsChecked, "rows checked")
				assert.Equal(t, billing.Nano(TotalCharged), rep.Charged, "charged")
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
				assert.Equal(t, 1, rep.HoldsOutstanding, "holds %+v", rep.Holds)
				assert.Equal(t, 1, rep.HoldsLeftover, "holds %+v", rep.Holds)
				if assert.NotEmpty(t, rep.Holds) {
					assert.True(t, rep.Holds[0].Leftover, "holds %+v", rep.Holds)
				}
				assert.Equal(t, "b2", rep.Drift[0].RequestID, "drift %+v", rep.Drift)
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
				assert.Contains(t, rep.Drift[0].Detail, "takenNano", "detail")
				assert.Equal(t, "c1", rep.Drift[0].RequestID, "drift %+v", rep.Drift[0])
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
				assert.Equal(t, 4, rep.RowsChecked, "rows checked")
				assert.Equal(t, billing.Nano(TotalCharged-A1Cost), rep.Charged, "charged")
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
				assert.Zero(t, rep.HoldsOutstanding, "holds %+v", rep.Holds)
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
				assert.Equal(t, 4, rep.UsersChecked, "users checked")
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
	require.True(t, base.TakenAt.Equal(rep.Baseline().TakenAt), "baseline round trip: taken at %v, want %v", base.TakenAt, rep.Baseline().TakenAt)
	require.Equal(t, rep.Baseline().Users, base.Users, "baseline round trip")
	e := base.Users["alice"]["creditsNew"]
	require.EqualValues(t, -A1Cost-A2Cost, e.Net, "alice in the baseline: %+v", e)
	require.Equal(t, billing.NanoFromUSD(10)-A1Cost-A2Cost, e.Balance, "alice in the baseline: %+v", e)
	require.Contains(t, base.Users["dave"], "refCredits", "the legacy user is not in the baseline")

	// Nothing moved: no external movement.
	rep = run(t, db, reconcile.Options{Baseline: base})
	assertDrift(t, rep)
	require.Empty(t, rep.External, "external")
	require.True(t, rep.BaselineAt.Equal(base.TakenAt), "baseline at %v, want %v", rep.BaselineAt, base.TakenAt)

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
	require.Len(t, rep.External, 1, "external")
	require.True(t, rep.External[0].Allowed, "external %+v", rep.External[0])
	require.Equal(t, billing.Nano(10_000_000), rep.External[0].Amount, "external %+v", rep.External[0])
	require.Equal(t, "bob", rep.External[0].User, "external %+v", rep.External[0])

	// A new user with credits is a top-up too; a user gone is drift.
	_, err = db.Collection("usersNew").InsertOne(ctx, bson.D{{Key: "_id", Value: "erin"}, {Key: "creditsNew", Value: int32(2)}})
	mustExec(t, err)
	_, err = db.Collection("usersNew").DeleteOne(ctx, bson.D{{Key: "_id", Value: "dave"}})
	mustExec(t, err)
	rep = run(t, db, reconcile.Options{Baseline: base, AllowCredit: true})
	assertDrift(t, rep, want{reconcile.KindUserMissing, "dave", "", "$4.500000000"})
	require.Len(t, rep.External, 2, "external %+v", rep.External)
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
	// Without a recheck the transient state is reported...
	rep := run(t, db, reconcile.Options{})
	require.NotEmpty(t, rep.Drift, "a charge without its row yet")
	// ...and set back, with one, once the row is written.
	done := make(chan error, 1)
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
	require.NoError(t, err, "consistent: %s", out)
	require.Equal(t, reconcile.ExitOK, code, "consistent: %s", out)
	require.Contains(t, out, "OK: ", "consistent")
	_, err = reconcile.ReadBaselineFile(basePath)
	require.NoError(t, err, "saved baseline")

	inc(t, db, "alice", bson.D{{Key: "creditsNew", Value: 0.01}})
	code, out, err = cli(reconcile.CLI{BaselineFile: basePath, JSON: true})
	require.Equal(t, reconcile.ExitDrift, code, "top-up without --allow-credit: %v\n%s", err, out)
	require.ErrorContains(t, err, "1 item", "top-up without --allow-credit: %s", out)
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
	require.NoError(t, json.Unmarshal([]byte(out), &js))
	require.False(t, js.OK, "JSON report: %s", out)
	require.Len(t, js.Drift, 1, "JSON report: %s", out)
	d := js.Drift[0]
	require.Equal(t, "external-credit", d.Kind, "JSON report: %s", out)
	require.Equal(t, "alice", d.User, "JSON report: %s", out)
	require.Equal(t, "creditsNew", d.Field, "JSON report: %s", out)
	require.Equal(t, "$0.010000000", d.Amount, "JSON report: %s", out)
	require.Equal(t, int64(10_000_000), d.AmountNano, "JSON report: %s", out)

	// Allowed, and the baseline rolls forward in the same file.
	code, out, err = cli(reconcile.CLI{BaselineFile: basePath, SaveBaselineFile: basePath, Options: reconcile.Options{AllowCredit: true}})
	require.NoError(t, err, "--allow-credit: %s", out)
	require.Equal(t, reconcile.ExitOK, code, "--allow-credit: %s", out)
	require.Contains(t, out, "allowed (credit)", "--allow-credit")
	code, _, err = cli(reconcile.CLI{BaselineFile: basePath})
	require.NoError(t, err, "after the rolled baseline")
	require.Equal(t, reconcile.ExitOK, code, "after the rolled baseline")

	// Errors: exit 2, and the URI's secrets are never in the message.
	code, _, err = cli(reconcile.CLI{BaselineFile: filepath.Join(dir, "missing.json")})
	require.Error(t, err, "missing baseline")
	require.Equal(t, reconcile.ExitError, code, "missing baseline: %v", err)
	for _, bad := range []string{
		"mongodb://admin:Sup3rSecretPw@127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
		"mongodb://admin:Sup3rSecretPw@127.0.0.1:notaport/",
		"mongodb://admin:Sup3rSecretPw@@/%zz",
		"postgres://admin:Sup3rSecretPw@127.0.0.1/",
	} {
		code, out, err := cli(reconcile.CLI{URI: bad, ConnectTimeout: 500 * time.Millisecond})
		require.Error(t, err, bad)
		require.Equal(t, reconcile.ExitError, code, "%s: %v", bad, err)
		require.NotContains(t, err.Error(), "Sup3rSecretPw", "the URI leaked")
		require.NotContains(t, err.Error(), bad, "the URI leaked")
		require.NotContains(t, out, "Sup3rSecretPw", "the URI leaked")
		t.Logf("%v", err)
	}
}
