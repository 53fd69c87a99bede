package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"math"
	"math/big"
	"net/http"
	"os"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

// price is a model's prices read straight from the models file as exact
// decimals, independently of the billing package, so the expected amounts
// below are computed without the code under test.
type price struct {
	in, out, cw, cr, mult *big.Rat
}

func loadPrices(t *testing.T, file string) map[string]price {
	t.Helper()
	raw, err := os.ReadFile(examples(file))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Models []struct {
			ID      string      `json:"id"`
			Aliases []string    `json:"id_aliases"`
			In      json.Number `json:"input_price_per_mtok"`
			Out     json.Number `json:"output_price_per_mtok"`
			CW      json.Number `json:"cache_write_price_per_mtok"`
			CR      json.Number `json:"cache_hit_price_per_mtok"`
			Mult    json.Number `json:"billing_multiplier"`
		} `json:"models"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		t.Fatal(err)
	}
	rat := func(n json.Number, def string) *big.Rat {
		if n == "" {
			n = json.Number(def)
		}
		r, ok := new(big.Rat).SetString(string(n))
		if !ok {
			t.Fatalf("bad number %q", n)
		}
		return r
	}
	out := map[string]price{}
	for _, m := range doc.Models {
		p := price{rat(m.In, "0"), rat(m.Out, "0"), rat(m.CW, "0"), rat(m.CR, "0"), rat(m.Mult, "1")}
		out[m.ID] = p
		for _, a := range m.Aliases {
			out[a] = p
		}
	}
	return out
}

// cost is the legacy formula in exact arithmetic, rounded up to a nano-USD:
// (in·P_in + out·P_out + cw·P_cw + cr·P_cr) / 1e6 × multiplier.
func (p price) cost(u fixtures.Usage) float64 {
	return p.scaledCost(u, big.NewRat(1, 1))
}

// scaledCost is cost with the exact amount multiplied by factor before the
// rounding up to a nano-USD (a site's price_factor).
func (p price) scaledCost(u fixtures.Usage, factor *big.Rat) float64 {
	sum := new(big.Rat)
	for _, term := range []struct {
		n int64
		p *big.Rat
	}{{u.Input, p.in}, {u.Output, p.out}, {u.CacheWrite, p.cw}, {u.CacheRead, p.cr}} {
		sum.Add(sum, new(big.Rat).Mul(big.NewRat(term.n, 1), term.p))
	}
	sum.Mul(sum, p.mult)
	sum.Mul(sum, factor)
	sum.Quo(sum, big.NewRat(1_000_000, 1))
	// ceil to nano-USD
	nano := new(big.Rat).Mul(sum, big.NewRat(1_000_000_000, 1))
	q, r := new(big.Int).QuoRem(nano.Num(), nano.Denom(), new(big.Int))
	if r.Sign() > 0 {
		q.Add(q, big.NewInt(1))
	}
	return float64(q.Int64()) / 1e9
}

// weighted is the legacy tokensUsed: int((in + out + cw·P_cw/P_in + cr·P_cr/P_in) × multiplier).
func (p price) weighted(u fixtures.Usage) int64 {
	w := new(big.Rat).SetInt64(u.Input + u.Output)
	w.Add(w, new(big.Rat).Mul(big.NewRat(u.CacheWrite, 1), new(big.Rat).Quo(p.cw, p.in)))
	w.Add(w, new(big.Rat).Mul(big.NewRat(u.CacheRead, 1), new(big.Rat).Quo(p.cr, p.in)))
	w.Mul(w, p.mult)
	return new(big.Int).Quo(w.Num(), w.Denom()).Int64()
}

func randHex(n int) string {
	b := make([]byte, n/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// newUser inserts a usersNew document with a personal key and returns both.
func newUser(t *testing.T, u seed.User) (seed.User, string) {
	t.Helper()
	if u.ID == "" {
		u.ID = uniq(t, "u")
	}
	if u.APIKey == "" {
		u.APIKey = "sk-trollllm-" + randHex(64)
	}
	if u.Role == "" {
		u.Role = "user"
	}
	if err := seed.Insert(context.Background(), db, u); err != nil {
		t.Fatal(err)
	}
	rememberKey(u.APIKey)
	return u, u.APIKey
}

func balances(t *testing.T, user string) map[string]float64 {
	t.Helper()
	b, err := seed.Balances(context.Background(), db, user)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// waitLogs waits until user has n request logs and returns them.
func waitLogs(t *testing.T, user string, n int) []bson.M {
	t.Helper()
	return waitLogsIn(t, db, user, n)
}

// waitLogsIn waits until user has n request logs in database d, oldest
// first; more than n fails the test (a request billed twice).
func waitLogsIn(t *testing.T, d *mongo.Database, user string, n int) []bson.M {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		cur, err := d.Collection("request_logs").Find(context.Background(), bson.D{{Key: "userId", Value: user}},
			options.Find().SetSort(bson.D{{Key: "createdAt", Value: 1}}))
		if err != nil {
			t.Fatal(err)
		}
		var logs []bson.M
		if err := cur.All(context.Background(), &logs); err != nil {
			t.Fatal(err)
		}
		if len(logs) > n {
			t.Fatalf("user %s has %d request logs, want %d", user, len(logs), n)
		}
		if len(logs) == n {
			return logs
		}
		if time.Now().After(deadline) {
			t.Fatalf("user %s has %d request logs after 20s, want %d", user, len(logs), n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// noLogsFor asserts that user never gets a request log (give settlement time to run).
func noLogsFor(t *testing.T, user string) {
	t.Helper()
	time.Sleep(300 * time.Millisecond)
	n, err := db.Collection("request_logs").CountDocuments(context.Background(), bson.D{{Key: "userId", Value: user}})
	if err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("user %s has %d request logs, want none", user, n)
	}
}

// upstreamRequests returns what the stand-in received with the given test id.
func upstreamRequests(testID string) []standin.Recorded {
	var out []standin.Recorded
	for _, r := range env.Standin.Requests() {
		if r.Header.Get("X-Test-Id") == testID {
			out = append(out, r)
		}
	}
	return out
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func num(t *testing.T, m bson.M, k string) float64 {
	t.Helper()
	switch v := m[k].(type) {
	case float64:
		return v
	case int32:
		return float64(v)
	case int64:
		return float64(v)
	}
	t.Fatalf("%s is %T (%v), want a number", k, m[k], m[k])
	return 0
}

func post(t *testing.T, url, key string, body []byte, hdr map[string]string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}
