package reconcile

import (
	"bytes"
	"encoding/json"
	"math"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func raw(t *testing.T, d bson.D) bson.Raw {
	t.Helper()
	b, err := bson.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
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
			if strings.Contains(got, s) {
				t.Errorf("redact(%q) = %q: still contains %q", tc.msg, got, s)
			}
		}
		if strings.Contains(got, "mongodb://") && !strings.Contains(got, "mongodb://[redacted]") {
			t.Errorf("redact(%q) = %q: a URI is left", tc.msg, got)
		}
	}
	if got := redact("plain message", ""); got != "plain message" {
		t.Errorf("redact without a URI changed the message: %q", got)
	}
}

func TestNanoValue(t *testing.T) {
	doc := raw(t, bson.D{{Key: "i32", Value: int32(-7)}, {Key: "i64", Value: int64(1) << 60}, {Key: "f", Value: 20000000.0},
		{Key: "fr", Value: 2.6}, {Key: "s", Value: "12"}, {Key: "n", Value: nil}})
	for key, want := range map[string]int64{"i32": -7, "i64": 1 << 60, "f": 20000000, "fr": 3} {
		if got, ok := nanoValue(doc.Lookup(key)); !ok || got != want {
			t.Errorf("nanoValue(%s) = %d, %v; want %d", key, got, ok, want)
		}
	}
	if _, ok := nanoValue(doc.Lookup("s")); ok {
		t.Error("a string read as an amount")
	}
	if !absent(doc.Lookup("n")) || !absent(doc.Lookup("missing")) {
		t.Error("null or missing not absent")
	}
}

func TestCheckRow(t *testing.T) {
	ok := &logRow{id: "r", user: "u", hasUser: true, rid: "q", creditField: "credits+refCredits",
		cost: 30, charged: 25, shortfall: 5, taken: []fieldAmount{{"credits", 10}, {"refCredits", 15}}}
	if items := checkRow(ok); len(items) != 0 {
		t.Fatalf("consistent row: %+v", items)
	}
	bad := *ok
	bad.charged, bad.cost = 26, 31
	items := checkRow(&bad)
	if len(items) != 1 || items[0].Kind != KindRowMismatch || items[0].Amount != 1 {
		t.Fatalf("charged ≠ Σ taken: %+v", items)
	}
	bad = *ok
	bad.shortfall = 4
	items = checkRow(&bad)
	if len(items) != 1 || items[0].Amount != 1 || !strings.Contains(items[0].Detail, "costNano") {
		t.Fatalf("cost ≠ charged + shortfall: %+v", items)
	}
	bad = *ok
	bad.taken = []fieldAmount{{"creditsNew", 25}}
	items = checkRow(&bad)
	if len(items) != 1 || items[0].Field != "creditsNew" {
		t.Fatalf("field outside the plan: %+v", items)
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
	if len(items) != 0 || pending != 1 {
		t.Fatalf("consistent ledger: %+v, pending %d", items, pending)
	}
	u.net["credits"] = -111
	items, _ = ledgerItems("u", u, map[string]int64{"credits": 10}, seen)
	if len(items) != 1 || items[0].Kind != KindChargeWithoutLog || items[0].Amount != 1 || items[0].Field != "credits" {
		t.Fatalf("one nano more charged: %+v", items)
	}
	items, _ = ledgerItems("ghost", nil, map[string]int64{"creditsNew": 7}, seen)
	if len(items) != 1 || items[0].Kind != KindLogWithoutCharge || items[0].Amount != 7 {
		t.Fatalf("rows of a user without a document: %+v", items)
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
	if u.balances["creditsNew"] != 10*1_000_000_000 || u.balances["credits"] != 250_000_000 {
		t.Errorf("balances %v", u.balances)
	}
	if _, ok := u.balances["refCredits"]; ok {
		t.Error("a missing balance read as present")
	}
	if u.net["creditsNew"] != -5 || u.net["credits"] != -3 || !u.hasNet {
		t.Errorf("net %v", u.net)
	}
	h := u.holds["r1"]
	if h == nil || h.total() != 5 || h.owner != "i1" || h.log != oid.Hex() || !h.exp.Equal(now.Add(time.Minute)) {
		t.Errorf("hold r1 %+v", h)
	}
	if u.held != 2 {
		t.Errorf("held %d", u.held)
	}
	if len(u.malformed) != 1 || !strings.Contains(u.malformed[0].Detail, "2 fields but 1 amounts") {
		t.Errorf("malformed %+v", u.malformed)
	}
}

func TestBaselineFileRoundTrip(t *testing.T) {
	b := &Baseline{Version: BaselineVersion, TakenAt: time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC),
		Users: map[string]map[string]BaselineField{"alice": {"creditsNew": {Balance: 9_980_000_000, Net: -20_000_000}}}}
	path := filepath.Join(t.TempDir(), "base.json")
	if err := WriteBaselineFile(path, b); err != nil {
		t.Fatal(err)
	}
	got, err := ReadBaselineFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !got.TakenAt.Equal(b.TakenAt) || got.Users["alice"]["creditsNew"] != b.Users["alice"]["creditsNew"] {
		t.Fatalf("round trip: %+v", got)
	}
	if _, err := ReadBaselineFile(filepath.Join(t.TempDir(), "none.json")); err == nil {
		t.Fatal("a missing baseline read")
	}
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
	if len(rep.External) != 2 || len(rep.Drift) != 3 {
		t.Fatalf("external %+v drift %+v", rep.External, rep.Drift)
	}
	if d := rep.Drift[0]; d.Kind != KindExternalCredit || d.User != "a" || d.Amount != 501 {
		t.Errorf("drift[0] %+v", d)
	}
	if d := rep.Drift[2]; d.Kind != KindUserMissing || d.User != "gone" || d.Amount != 50 {
		t.Errorf("drift[2] %+v", d)
	}
	rep = &Report{}
	compareBaseline(rep, base, users, true)
	if len(rep.Drift) != 1 || rep.Drift[0].Kind != KindUserMissing || !rep.External[0].Allowed {
		t.Errorf("allow credit: external %+v drift %+v", rep.External, rep.Drift)
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
	if err := rep.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"users checked:     2", "charged:           $0.025000000", "in-flight", "OK: "} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text report lacks %q:\n%s", want, text.String())
		}
	}
	rep.Drift = []Item{{Kind: KindChargeWithoutLog, User: "alice", Field: "creditsNew", Amount: 1, Detail: "x"}}
	text.Reset()
	_ = rep.WriteText(&text)
	if !strings.Contains(text.String(), "DRIFT: 1 item(s)") || !strings.Contains(text.String(), "$0.000000001") {
		t.Errorf("text report with drift:\n%s", text.String())
	}
	var js bytes.Buffer
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
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
	if err := json.Unmarshal(js.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.OK || len(got.Drift) != 1 || got.Drift[0].Amount != "$0.000000001" || got.Drift[0].AmountNano != 1 ||
		got.ChargedNano != 25_000_000 || got.Since != "2026-04-30T12:00:00Z" {
		t.Errorf("JSON report: %s", js.String())
	}
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
	if got := l.taken["u"]["credits"]; got != math.MaxInt64 {
		t.Errorf("taken sum = %d, want saturated at max", got)
	}
	if got := l.dups["q"].extraCharged; got != math.MaxInt64 {
		t.Errorf("extra charged = %d, want saturated at max", got)
	}
	items, _ := ledgerItems("u", nil, l.taken["u"], l.seen)
	for _, it := range items {
		if it.Amount < 0 {
			t.Errorf("negative drift amount: %+v", it)
		}
	}
	// charged + shortfall past int64 max is still seen as a mismatch.
	bad := &logRow{id: "b", user: "u", hasUser: true, rid: "b", cost: math.MaxInt64, charged: math.MaxInt64, shortfall: 1,
		taken: []fieldAmount{{"credits", math.MaxInt64}}}
	if items := checkRow(bad); len(items) != 1 || !strings.Contains(items[0].Detail, "costNano") {
		t.Errorf("cost ≠ charged + shortfall at the limit: %+v", items)
	}
	if got := (&holdState{amounts: []billing.Nano{math.MaxInt64, math.MaxInt64}}).total(); got != math.MaxInt64 {
		t.Errorf("hold total = %d, want saturated", got)
	}
}
