package reconcile

import (
	"bytes"
	"encoding/json"
	"math"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func raw(t *testing.T, d bson.D) bson.Raw {
	t.Helper()
	b, err := bson.Marshal(d)
	require.NoError(t, err)
	return b
}

func TestRedact(t *testing.T) {
	tests := []struct {
		uri     string
		msg     string
		secrets []string
	}{
		{
			uri:     "mongodb://admin:s3cr3tpw@db.example:27017/fproxy?authSource=admin",
			msg:     `error parsing uri mongodb://admin:s3cr3tpw@db.example:27017/fproxy?authSource=admin: bad; auth failed for admin:s3cr3tpw`,
			secrets: []string{"s3cr3tpw", "admin:s3cr3tpw"},
		},
		{
			// Escaped characters in the password: neither form may leak.
			uri:     "mongodb+srv://bob:p%40ss%2Fw0rd@cluster0.example.net/?retryWrites=true",
			msg:     "dial: p%40ss%2Fw0rd and p@ss/w0rd and mongodb+srv://bob:p%40ss%2Fw0rd@cluster0.example.net/",
			secrets: []string{"p%40ss%2Fw0rd", "p@ss/w0rd"},
		},
		{
			// Not a valid URI: redacted all the same.
			uri:     "mongodb://u:hunter22@@/x?tlsCertificateKeyFilePassword=kfpass123",
			msg:     "invalid: u:hunter22@@ kfpass123",
			secrets: []string{"hunter22", "kfpass123"},
		},
	}
	for _, tc := range tests {
		got := redact(tc.msg, tc.uri)
		for _, s := range tc.secrets {
			assert.NotContains(t, got, s, "redact(%q)", tc.msg)
		}
		if strings.Contains(got, "mongodb://") {
			assert.Contains(t, got, "mongodb://[redacted]", "redact(%q): a URI is left", tc.msg)
		}
	}
	assert.Equal(t, "plain message", redact("plain message", ""), "redact without a URI changed the message")
}

func TestNanoValue(t *testing.T) {
	doc := raw(t, bson.D{{Key: "i32", Value: int32(-7)}, {Key: "i64", Value: int64(1) << 60}, {Key: "f", Value: 20000000.0},
		{Key: "fr", Value: 2.6}, {Key: "s", Value: "12"}, {Key: "n", Value: nil}})
	for key, want := range map[string]int64{"i32": -7, "i64": 1 << 60, "f": 20000000, "fr": 3} {
		got, ok := nanoValue(doc.Lookup(key))
		if assert.True(t, ok, "nanoValue(%s) not read", key) {
			assert.Equal(t, want, got, "nanoValue(%s)", key)
		}
	}
	_, ok := nanoValue(doc.Lookup("s"))
	assert.False(t, ok, "a string read as an amount")
	assert.True(t, absent(doc.Lookup("n")), "null not absent")
	assert.True(t, absent(doc.Lookup("missing")), "missing not absent")
}

func TestCheckRow(t *testing.T) {
	ok := &logRow{id: "r", user: "u", hasUser: true, rid: "q", creditField: "credits+refCredits",
		cost: 30, charged: 25, shortfall: 5, taken: []fieldAmount{{"credits", 10}, {"refCredits", 15}}}
	assert.Empty(t, checkRow(ok), "consistent row")
	bad := *ok
	bad.charged, bad.cost = 26, 31
	items := checkRow(&bad)
	if assert.Len(t, items, 1, "charged ≠ Σ taken") {
		assert.Equal(t, KindRowMismatch, items[0].Kind, "charged ≠ Σ taken")
		assert.Equal(t, billing.Nano(1), items[0].Amount, "charged ≠ Σ taken")
	}
	bad = *ok
	bad.shortfall = 4
	items = checkRow(&bad)
	if assert.Len(t, items, 1, "cost ≠ charged + shortfall") {
		assert.Equal(t, billing.Nano(1), items[0].Amount, "cost ≠ charged + shortfall")
		assert.Contains(t, items[0].Detail, "costNano", "cost ≠ charged + shortfall")
	}
	bad = *ok
	bad.taken = []fieldAmount{{"creditsNew", 25}}
	items = checkRow(&bad)
	if assert.Len(t, items, 1, "field outside the plan") {
		assert.Equal(t, "creditsNew", items[0].Field, "field outside the plan")
	}
}

func TestLedgerItems(t *testing.T) {
	u := &userState{
		id: "u", hasNet: true,
		net:   map[string]int64{"credits": -110, "refCredits": -5},
		holds: map[string]*holdState{"h": {fields: []string{"credits"}, amounts: []billing.Nano{100}}},
		receipts: map[string]receiptState{
			"logged":  {fields: []string{"credits"}, taken: []int64{999}}, // its row exists: ignored
			"pending": {fields: []string{"refCredits"}, taken: []int64{5}},
		},
	}
	seen := map[string]bool{"logged": true}
	items, pending := ledgerItems("u", u, map[string]int64{"credits": 10}, seen)
	assert.Empty(t, items, "consistent ledger")
	assert.Equal(t, 1, pending, "consistent ledger: pending")
	u.net["credits"] = -111
	items, _ = ledgerItems("u", u, map[string]int64{"credits": 10}, seen)
	if assert.Len(t, items, 1, "one nano more charged") {
		assert.Equal(t, KindChargeWithoutLog, items[0].Kind, "one nano more charged")
		assert.Equal(t, billing.Nano(1), items[0].Amount, "one nano more charged")
		assert.Equal(t, "credits", items[0].Field, "one nano more charged")
	}
	items, _ = ledgerItems("ghost", nil, map[string]int64{"creditsNew": 7}, seen)
	if assert.Len(t, items, 1, "rows of a user without a document") {
		assert.Equal(t, KindLogWithoutCharge, items[0].Kind, "rows of a user without a document")
		assert.Equal(t, billing.Nano(7), items[0].Amount, "rows of a user without a document")
	}
}

func TestParseUser(t *testing.T) {
	now := time.Now().UTC().Truncate(time.Millisecond)
	oid := bson.NewObjectID()
	u := parseUser(raw(t, bson.D{
		{Key: "_id", Value: "alice"},
		{Key: "creditsNew", Value: int32(10)},
		{Key: "credits", Value: 0.25},
		{Key: "llmNet", Value: bson.D{{Key: "creditsNew", Value: int64(-5)}, {Key: "credits", Value: int32(-3)}}},
		{Key: "llmHolds", Value: bson.D{
			{Key: "r1", Value: bson.D{{Key: "amt", Value: bson.A{int64(2), int64(3)}}, {Key: "fields", Value: bson.A{"credits", "refCredits"}},
				{Key: "at", Value: now}, {Key: "exp", Value: now.Add(time.Minute)}, {Key: "owner", Value: "i1"}, {Key: "log", Value: oid}}},
			{Key: "r2", Value: bson.D{{Key: "amt", Value: bson.A{int64(2)}}, {Key: "fields", Value: bson.A{"credits", "refCredits"}}}},
		}},
		{Key: "llmHeld", Value: int32(2)},
	}))
	assert.Equal(t, billing.Nano(10*1_000_000_000), u.balances["creditsNew"], "balances %v", u.balances)
	assert.Equal(t, billing.Nano(250_000_000), u.balances["credits"], "balances %v", u.balances)
	assert.NotContains(t, u.balances, "refCredits", "a missing balance read as present")
	assert.Equal(t, int64(-5), u.net["creditsNew"], "net %v", u.net)
	assert.Equal(t, int64(-3), u.net["credits"], "net %v", u.net)
	assert.True(t, u.hasNet, "hasNet")
	h := u.holds["r1"]
	if assert.NotNil(t, h, "hold r1") {
		assert.Equal(t, billing.Nano(5), h.total(), "hold r1 total")
		assert.Equal(t, "i1", h.owner, "hold r1 owner")
		assert.Equal(t, oid.Hex(), h.log, "hold r1 log")
		assert.True(t, h.exp.Equal(now.Add(time.Minute)), "hold r1 exp %v", h.exp)
	}
	assert.Equal(t, int64(2), u.held, "held")
	if assert.Len(t, u.malformed, 1, "malformed") {
		assert.Contains(t, u.malformed[0].Detail, "2 fields but 1 amounts")
	}
}

func TestBaselineFileRoundTrip(t *testing.T) {
	b := &Baseline{Version: BaselineVersion, TakenAt: time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC),
		Users: map[string]map[string]BaselineField{"alice": {"creditsNew": {Balance: 9_980_000_000, Net: -20_000_000}}}}
	path := filepath.Join(t.TempDir(), "base.json")
	require.NoError(t, WriteBaselineFile(path, b))
	got, err := ReadBaselineFile(path)
	require.NoError(t, err)
	assert.True(t, got.TakenAt.Equal(b.TakenAt), "round trip: taken at %v", got.TakenAt)
	assert.Equal(t, b.Users["alice"]["creditsNew"], got.Users["alice"]["creditsNew"], "round trip")
	_, err = ReadBaselineFile(filepath.Join(t.TempDir(), "none.json"))
	assert.Error(t, err, "a missing baseline read")
}

func TestCompareBaseline(t *testing.T) {
	base := &Baseline{Version: 1, TakenAt: time.Now(), Users: map[string]map[string]BaselineField{
		"a":    {"credits": {Balance: 1000, Net: -10}},
		"gone": {"credits": {Balance: 50}},
	}}
	users := map[string]*userState{
		// The gateway took 20 more (net −30), the balance fell by 20 and
		// rose by a 500 top-up, and 1 nano of float noise.
		"a": {id: "a", balances: map[string]billing.Nano{"credits": 1481}, hasNet: true, net: map[string]int64{"credits": -30}},
		// A new user with a top-up and nothing spent.
		"new": {id: "new", balances: map[string]billing.Nano{"creditsNew": 7}},
	}
	rep := &Report{}
	compareBaseline(rep, base, users, false)
	sortItems(rep.Drift)
	require.Len(t, rep.External, 2, "external")
	require.Len(t, rep.Drift, 3, "drift %+v", rep.Drift)
	d := rep.Drift[0]
	assert.Equal(t, KindExternalCredit, d.Kind, "drift[0] %+v", d)
	assert.Equal(t, "a", d.User, "drift[0] %+v", d)
	assert.Equal(t, billing.Nano(501), d.Amount, "drift[0] %+v", d)
	d = rep.Drift[2]
	assert.Equal(t, KindUserMissing, d.Kind, "drift[2] %+v", d)
	assert.Equal(t, "gone", d.User, "drift[2] %+v", d)
	assert.Equal(t, billing.Nano(50), d.Amount, "drift[2] %+v", d)
	rep = &Report{}
	compareBaseline(rep, base, users, true)
	if assert.Len(t, rep.Drift, 1, "allow credit: drift") {
		assert.Equal(t, KindUserMissing, rep.Drift[0].Kind, "allow credit: drift")
	}
	if assert.NotEmpty(t, rep.External, "allow credit: external") {
		assert.True(t, rep.External[0].Allowed, "allow credit: external %+v", rep.External)
	}
}

func TestRender(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	rep := &Report{
		Now: now, Since: now.Add(-24 * time.Hour), UsersChecked: 2, RowsChecked: 3, Charged: 25_000_000, Shortfall: 3,
		HoldsOutstanding: 1,
		Holds: []Hold{{User: "bob", RequestID: "h1", Fields: []string{"refCredits"}, Amounts: []billing.Nano{100}, Amount: 100,
			At: now.Add(-time.Minute), Exp: now.Add(time.Minute), Owner: "i1"}},
	}
	var text bytes.Buffer
	require.NoError(t, rep.WriteText(&text))
	for _, want := range []string{"users checked:     2", "charged:           $0.025000000", "in-flight", "OK: "} {
		assert.Contains(t, text.String(), want, "text report")
	}
	rep.Drift = []Item{{Kind: KindChargeWithoutLog, User: "alice", Field: "creditsNew", Amount: 1, Detail: "x"}}
	text.Reset()
	_ = rep.WriteText(&text)
	assert.Contains(t, text.String(), "DRIFT: 1 item(s)", "text report with drift")
	assert.Contains(t, text.String(), "$0.000000001", "text report with drift")
	var js bytes.Buffer
	require.NoError(t, rep.WriteJSON(&js))
	var got struct {
		OK    bool `json:"ok"`
		Drift []struct {
			Kind       string `json:"kind"`
			Amount     string `json:"amount"`
			AmountNano int64  `json:"amountNano"`
		} `json:"drift"`
		ChargedNano int64  `json:"chargedNano"`
		Since       string `json:"since"`
	}
	require.NoError(t, json.Unmarshal(js.Bytes(), &got))
	assert.False(t, got.OK, "JSON report: %s", js.String())
	if assert.Len(t, got.Drift, 1, "JSON report: %s", js.String()) {
		assert.Equal(t, "$0.000000001", got.Drift[0].Amount, "JSON report: %s", js.String())
		assert.Equal(t, int64(1), got.Drift[0].AmountNano, "JSON report: %s", js.String())
	}
	assert.Equal(t, int64(25_000_000), got.ChargedNano, "JSON report: %s", js.String())
	assert.Equal(t, "2026-04-30T12:00:00Z", got.Since, "JSON report: %s", js.String())
}

// Amounts near int64 max (a row priced from absurd usage before the
// gateway refused it) saturate in every sum; nothing wraps negative.
func TestSumsSaturate(t *testing.T) {
	const huge = math.MaxInt64 - 1
	l := newLedger()
	r := &logRow{id: "r", user: "u", hasUser: true, rid: "q", cost: huge, charged: huge, taken: []fieldAmount{{"credits", huge}}}
	for range 3 {
		l.add(r, nil, true)
	}
	r2 := &logRow{id: "r2", user: "u", hasUser: true, rid: "q2", cost: huge, charged: huge, taken: []fieldAmount{{"credits", huge}}}
	l.add(r2, nil, true)
	assert.Equal(t, int64(math.MaxInt64), l.taken["u"]["credits"], "taken sum, want saturated at max")
	assert.Equal(t, int64(math.MaxInt64), l.dups["q"].extraCharged, "extra charged, want saturated at max")
	items, _ := ledgerItems("u", nil, l.taken["u"], l.seen)
	for _, it := range items {
		assert.GreaterOrEqual(t, it.Amount, billing.Nano(0), "negative drift amount: %+v", it)
	}
	// charged + shortfall past int64 max is still seen as a mismatch.
	bad := &logRow{id: "b", user: "u", hasUser: true, rid: "b", cost: math.MaxInt64, charged: math.MaxInt64, shortfall: 1,
		taken: []fieldAmount{{"credits", math.MaxInt64}}}
	if items := checkRow(bad); assert.Len(t, items, 1, "cost ≠ charged + shortfall at the limit") {
		assert.Contains(t, items[0].Detail, "costNano", "cost ≠ charged + shortfall at the limit")
	}
	assert.Equal(t, billing.Nano(math.MaxInt64), (&holdState{amounts: []billing.Nano{math.MaxInt64, math.MaxInt64}}).total(), "hold total, want saturated")
}
