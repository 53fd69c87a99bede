package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// Phase names.
const (
	phWarmup   = "warmup"
	phIdle     = "idle"
	phRestart  = "warmup_after_restart"
	phSat      = "nonstream_saturation"
	phFriend   = "friend_nonstream_saturation" // gateway only: friend keys, one limit hold each
	phRate     = "nonstream_rate_"             // + rate
	phSSETTFB  = "sse_first_byte"
	phSSESat   = "sse_saturation"
	phStreams  = "long_streams"
	phBig      = "big_stream"
	sitePlain  = "plain"
	siteGW     = "gateway"
	quietAfter = 300 * time.Millisecond
)

// phase is one measured load on one site.
type phase struct {
	Round int    `json:"round"`
	Name  string `json:"name"`
	Site  string `json:"site"`
	// Users is how many users the gateway's requests were spread over,
	// CreditLease its credit_lease (the sweep changes both).
	Users       int    `json:"users"`
	CreditLease string `json:"credit_lease"`
	loadStats

	// DrainS is the time from the end of the load until the gateway's
	// last settlement write (0 for plain Caddy); SettledRPS counts it in.
	DrainS     float64 `json:"drain_s"`
	SettledRPS float64 `json:"settled_rps"`

	// CPU seconds used by each process over the load plus the drain, and
	// microseconds per successful request.
	CPU       map[string]float64 `json:"cpu_s"`
	CPUPerReq map[string]float64 `json:"cpu_us_per_request"`

	DB *dbStats `json:"db,omitempty"`

	// Holds is how the gateway served the phase's holds (its /metrics).
	Holds *holdStats `json:"holds,omitempty"`

	// LoadAvg is the machine's load average (1, 5, 15 min) when the phase
	// ended: everything here shares the same cores with whatever else runs.
	LoadAvg [3]float64 `json:"load_avg"`

	Mem *memStats `json:"memory,omitempty"`

	Billing *billingCheck `json:"billing,omitempty"`
}

type dbStats struct {
	Ops            int            `json:"ops"`
	RequestOps     int            `json:"request_ops"` // excluding heartbeats and key-pool refresh reads
	Reads          int            `json:"reads"`
	Writes         int            `json:"writes"`
	Background     int            `json:"background"`
	OpsPerReq      float64        `json:"request_ops_per_request"`
	ReadsPerReq    float64        `json:"reads_per_request"`
	WritesPerReq   float64        `json:"writes_per_request"`
	RTTP50Ms       float64        `json:"rtt_p50_ms"`
	RTTP99Ms       float64        `json:"rtt_p99_ms"`
	ByCommand      map[string]int `json:"by_command"`
	RequestLogDocs int            `json:"request_log_docs_inserted"`

	// The holds as the gateway timed them (its /metrics histogram): from
	// before the driver sends the command until it has the reply, so the
	// driver's own time and the counting proxy's hop are in.
	Holds      uint64 `json:"holds"`
	HoldP50Ms  jfloat `json:"hold_p50_ms"`  // null when no hold was a database write
	HoldMeanMs jfloat `json:"hold_mean_ms"` // (all carved from leases)

}

// holdStats is how the gateway's holds were served in a phase: taken by a
// database write of their own (store) or carved from a credit lease in
// memory (lease), and the leases taken and closed, from the differences
// of the gateway's counters over the phase and its drain.
type holdStats struct {
	Store        int `json:"store"`
	Lease        int `json:"lease"`
	LeasesTaken  int `json:"leases_taken"`
	LeasesClosed int `json:"leases_closed"`
	// LeaseDrainS is the time from the end of the settlement drain until the
	// gateway held nothing: no hold outstanding, every lease it took closed,
	// no hold, lease or receipt left in a user document. Drained is false
	// when that did not happen within the drain timeout.
	LeaseDrainS float64 `json:"lease_drain_s"`
	Drained     bool    `json:"drained"`
}

// jfloat is a float64 that is null in JSON when it is not a number
// (encoding/json refuses NaN and ±Inf): a figure with nothing to measure,
// like the hold wait of a phase whose holds all came from leases.
type jfloat float64

func (f jfloat) MarshalJSON() ([]byte, error) {
	if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
		return []byte("null"), nil
	}
	return json.Marshal(float64(f))
}

type memStats struct {
	Streams        int     `json:"streams,omitempty"`
	OpenAtPeak     int     `json:"open_at_sample,omitempty"`
	BaseRSS        int64   `json:"base_rss"`
	PeakRSS        int64   `json:"peak_rss"`
	BaseGo         int64   `json:"base_go_inuse"`
	PeakGo         int64   `json:"peak_go_inuse"`
	RSSPerStream   float64 `json:"rss_per_stream,omitempty"`
	GoPerStream    float64 `json:"go_inuse_per_stream,omitempty"`
	StreamBytes    int64   `json:"stream_bytes,omitempty"`
	MBps           float64 `json:"mb_per_s,omitempty"`
	PeakFromVmHWM  bool    `json:"peak_from_vmhwm"`
	RSSGrowth      int64   `json:"rss_growth"`
	GoGrowth       int64   `json:"go_inuse_growth"`
	SamplesTaken   int     `json:"samples"`
	SampleInterval string  `json:"sample_interval"`
}

// billingCheck compares the requests the client saw admitted with the
// billing records of the same requests.
type billingCheck struct {
	Admitted        int   `json:"admitted"`          // 2xx answers (with the gateway's request id)
	Logged          int   `json:"logged"`            // request_logs documents written
	Matched         int   `json:"matched"`           // admitted requests with a log
	Lost            int   `json:"lost"`              // admitted requests without a log
	Duplicates      int   `json:"duplicates"`        // extra logs for one request id
	Unexpected      int   `json:"unexpected"`        // logs of requests not seen admitted
	ChargedNano     int64 `json:"charged_nano"`      // sum of chargedNano in the logs
	CostNano        int64 `json:"cost_nano"`         // sum of costNano
	BalanceNano     int64 `json:"balance_drop_nano"` // creditsNew taken from the users
	UsedNano        int64 `json:"used_rise_nano"`    // creditsNewUsed added
	ChargeMismatchN int64 `json:"charge_mismatch_nano"`
	Shortfalls      int   `json:"shortfalls"`
	ChargeErrors    int   `json:"charge_errors"`
	// Money in open holds and credit leases before and after the phase:
	// taken from the balances but unspent, so the balances' drop is the
	// charges plus what the holds gained. What is still open after the
	// drain is counted here, never as lost.
	HeldBeforeNano int64 `json:"held_before_nano"`
	HeldAfterNano  int64 `json:"held_after_nano"`
	HoldsLeft      int   `json:"holds_left"`
	LeasesLeft     int   `json:"leases_left"`
	ReceiptsLeft   int   `json:"receipts_left"`
}

// add sums o (when not nil) into b: the totals of the table.
func (b *billingCheck) add(o *billingCheck) {
	if o == nil {
		return
	}
	b.Admitted += o.Admitted
	b.Logged += o.Logged
	b.Lost += o.Lost
	b.Duplicates += o.Duplicates
	b.Unexpected += o.Unexpected
	b.ChargeErrors += o.ChargeErrors
	b.ChargeMismatchN += o.ChargeMismatchN
	b.HoldsLeft += o.HoldsLeft
	b.LeasesLeft += o.LeasesLeft
}

func (b *billingCheck) ok() bool {
	return b.Lost == 0 && b.Duplicates == 0 && b.ChargeMismatchN == 0 && b.ChargeErrors == 0
}

// measured runs load on site, drains the gateway's settlements, and
// measures CPU, database operations and billing around it.
//
// CPU and the settled throughput stop at the end of the settlement drain
// (every admitted request's log row written). The database operations,
// the hold counters and the billing check go on until the gateway holds
// nothing (waitDrained): with credit leases, the writes that close the
// leases after they go idle are the phase's too.
func (h *harness) measured(round int, name, site string, load func() ([]outcome, time.Duration)) (*phase, error) {
	ctx := context.Background()
	var before map[string]userBal
	var m0 gwMetrics
	if site == siteGW {
		var err error
		if before, err = h.balances(ctx); err != nil {
			return nil, fmt.Errorf("%s: balances before: %w", name, err)
		}
		if m0, err = h.scrape(); err != nil {
			return nil, fmt.Errorf("%s: metrics before: %w", name, err)
		}
	}
	h.proxy.take()
	s0 := h.snap()
	outs, wall := load()
	loadEnd := time.Now()
	admitted := 0
	for _, o := range outs {
		if o.ok() && o.reqID != "" {
			admitted++
		}
	}
	if site == siteGW {
		h.waitSettled(admitted)
	}
	s1 := h.snap()
	var hs *holdStats
	var m1 gwMetrics
	if site == siteGW {
		var err error
		if hs, m1, err = h.waitDrained(); err != nil {
			return nil, fmt.Errorf("%s: waiting for the drain: %w", name, err)
		}
	}
	ops := h.proxy.take()

	p := &phase{Round: round, Name: name, Site: site, Users: len(h.users), CreditLease: onOffText(h.cfg.CreditLease),
		loadStats: stats(outs, wall), LoadAvg: loadAvg(), Holds: hs}
	drain := s1.at.Sub(loadEnd)
	if site == siteGW {
		p.DrainS = drain.Seconds()
	}
	p.SettledRPS = p.RPS
	if site == siteGW && wall+drain > 0 {
		p.SettledRPS = float64(p.OK) / (wall + drain).Seconds()
	}
	p.CPU = map[string]float64{
		"caddy":    (s1.caddy - s0.caddy).Seconds(),
		"ferretdb": (s1.ferret - s0.ferret).Seconds(),
		"postgres": (s1.pg - s0.pg).Seconds(),
		"upstream": (s1.upstream - s0.upstream).Seconds(),
		"harness":  (s1.harnes - s0.harnes).Seconds(),
	}
	p.CPU["database"] = p.CPU["ferretdb"] + p.CPU["postgres"]
	p.CPUPerReq = map[string]float64{}
	if p.OK > 0 {
		for k, v := range p.CPU {
			p.CPUPerReq[k] = v * 1e6 / float64(p.OK)
		}
	}
	p.DB = dbSummary(ops, p.OK)
	if site == siteGW {
		d := m1.hold.since(m0.hold)
		p.DB.Holds, p.DB.HoldP50Ms, p.DB.HoldMeanMs = d.count, jfloat(d.quantileMs(0.5)), jfloat(d.meanMs())
		hs.Store = int(m1.holds["store"] - m0.holds["store"])
		hs.Lease = int(m1.holds["lease"] - m0.holds["lease"])
		hs.LeasesTaken = int(m1.leases["taken"] - m0.leases["taken"])
		hs.LeasesClosed = int(m1.leases["closed"] - m0.leases["closed"])
		var err error
		if p.Billing, err = h.checkBilling(ctx, outs, before); err != nil {
			return nil, fmt.Errorf("%s: billing check: %w", name, err)
		}
	}
	return p, nil
}

// waitDrained waits, once the settlements are written, until the gateway
// holds nothing: its /metrics show no hold outstanding and every credit
// lease it took closed (an idle lease goes back after 5 s), and no user
// document has a hold, a lease or a receipt left. Money still held then
// is not lost: the billing check counts it as held. It returns the
// gateway's metrics at the end.
func (h *harness) waitDrained() (*holdStats, gwMetrics, error) {
	start := time.Now()
	deadline := start.Add(h.cfg.DrainTimeout)
	hs := &holdStats{}
	users := h.db.Collection(seed.UsersCollection)
	var ids []string
	for _, u := range h.users {
		ids = append(ids, u.ID)
	}
	open := append(usersFilter(ids), bson.E{Key: "$or", Value: bson.A{
		bson.D{{Key: mongostore.FieldHeld, Value: bson.D{{Key: "$gt", Value: 0}}}},
		bson.D{{Key: mongostore.FieldDoneCount, Value: bson.D{{Key: "$gt", Value: 0}}}},
	}})
	var m gwMetrics
	var lastErr error
	left := int64(-1)
	for {
		// A database too busy to answer is not drained yet: retried until
		// the deadline.
		mm, err := h.scrape()
		if err == nil {
			m = mm
		} else {
			lastErr = err
		}
		if err == nil && m.outstanding <= 0 && m.leasesOpen() <= 0 {
			// The gateway thinks it is done: ask the database.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			n, err := users.CountDocuments(ctx, open)
			cancel()
			if err != nil {
				lastErr = err
			} else {
				left = n
				hs.Drained = n == 0
			}
		}
		if hs.Drained || time.Now().After(deadline) {
			hs.LeaseDrainS = time.Since(start).Seconds()
			if !hs.Drained {
				logf("  still held after %s: %.0f holds outstanding, %.0f leases open (gateway metrics); %d users with a hold, lease or receipt (-1: not read); last error: %v",
					h.cfg.DrainTimeout, m.outstanding, m.leasesOpen(), left, lastErr)
			}
			return hs, m, nil
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// waitSettled waits until the gateway has inserted a request log for
// each admitted request and written nothing for quietAfter (at most 2 s
// more once the logs are all in, in case some periodic write never lets
// it be quiet); or, when logs are missing, until it has written nothing
// for 3 s; at most DrainTimeout.
func (h *harness) waitSettled(admitted int) {
	deadline := time.Now().Add(h.cfg.DrainTimeout)
	var allIn time.Time
	for time.Now().Before(deadline) {
		logged, last := 0, time.Time{}
		for _, o := range h.proxy.peek() {
			if o.class() == "write" && o.At.After(last) {
				last = o.At
			}
			if o.Cmd == "insert" && o.Coll == seed.RequestLogsCollection {
				logged += o.Docs
			}
		}
		idle := time.Since(last)
		if last.IsZero() {
			idle = time.Hour
		}
		if logged >= admitted && allIn.IsZero() {
			allIn = time.Now()
		}
		switch {
		case logged >= admitted && idle >= quietAfter,
			!allIn.IsZero() && time.Since(allIn) >= 2*time.Second,
			idle >= 3*time.Second:
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	logf("  settlements still running after %s", h.cfg.DrainTimeout)
}

// perRequest is the phase's request-path database operations per
// successful request, by command and collection, most frequent first:
// "update usersNew 1.02, insert request_logs 0.05, ...".
func (d *dbStats) perRequest(okReqs int) string {
	if d == nil || len(d.ByCommand) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(d.ByCommand))
	for k := range d.ByCommand {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if d.ByCommand[keys[i]] != d.ByCommand[keys[j]] {
			return d.ByCommand[keys[i]] > d.ByCommand[keys[j]]
		}
		return keys[i] < keys[j]
	})
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %.3f", k, float64(d.ByCommand[k])/float64(max(okReqs, 1)))
	}
	return strings.Join(parts, ", ")
}

func dbSummary(ops []dbOp, okReqs int) *dbStats {
	d := &dbStats{ByCommand: map[string]int{}}
	var rtt []time.Duration
	for _, o := range ops {
		d.Ops++
		if o.background() {
			d.Background++
			continue
		}
		d.RequestOps++
		switch o.class() {
		case "read":
			d.Reads++
		case "write":
			d.Writes++
		}
		k := o.Cmd
		if o.Coll != "" {
			k += " " + o.Coll
		}
		d.ByCommand[k]++
		if o.RTT >= 0 {
			rtt = append(rtt, o.RTT)
		}
		if o.Cmd == "insert" && o.Coll == seed.RequestLogsCollection {
			d.RequestLogDocs += o.Docs
		}
	}
	if okReqs > 0 {
		d.OpsPerReq = float64(d.RequestOps) / float64(okReqs)
		d.ReadsPerReq = float64(d.Reads) / float64(okReqs)
		d.WritesPerReq = float64(d.Writes) / float64(okReqs)
	}
	d.RTTP50Ms, d.RTTP99Ms = ms(pct(rtt, 50)), ms(pct(rtt, 99))
	return d
}

// checkBilling reads every request log written since the last check,
// matches them with the admitted requests by request id, compares the sum
// charged with what the users' balances moved, and deletes the logs (so
// each check reads only its own phase's).
//
// Money in open holds and credit leases is unspent: the balances' drop
// must equal the charges plus what the open holds gained over the phase,
// and creditsNewUsed must rise by the charges alone.
func (h *harness) checkBilling(ctx context.Context, outs []outcome, before map[string]userBal) (*billingCheck, error) {
	b := &billingCheck{}
	admitted := map[string]int{}
	for _, o := range outs {
		if o.ok() && o.reqID != "" {
			admitted[o.reqID] = 0
			b.Admitted++
		}
	}
	coll := h.db.Collection(seed.RequestLogsCollection)
	cur, err := coll.Find(ctx, bson.D{}, options.Find().SetProjection(bson.D{
		{Key: "requestId", Value: 1}, {Key: "chargedNano", Value: 1}, {Key: "costNano", Value: 1},
		{Key: "shortfallNano", Value: 1}, {Key: "chargeError", Value: 1},
	}))
	if err != nil {
		return nil, err
	}
	var ids []any
	for cur.Next(ctx) {
		var d struct {
			ID            any    `bson:"_id"`
			RequestID     string `bson:"requestId"`
			ChargedNano   int64  `bson:"chargedNano"`
			CostNano      int64  `bson:"costNano"`
			ShortfallNano int64  `bson:"shortfallNano"`
			ChargeError   string `bson:"chargeError"`
		}
		if err := cur.Decode(&d); err != nil {
			cur.Close(ctx)
			return nil, err
		}
		ids = append(ids, d.ID)
		b.Logged++
		b.ChargedNano += d.ChargedNano
		b.CostNano += d.CostNano
		if d.ShortfallNano > 0 {
			b.Shortfalls++
		}
		if d.ChargeError != "" {
			b.ChargeErrors++
		}
		n, ok := admitted[d.RequestID]
		switch {
		case !ok:
			b.Unexpected++
		case n > 0:
			b.Duplicates++
		default:
			b.Matched++
		}
		if ok {
			admitted[d.RequestID] = n + 1
		}
	}
	if err := cur.Err(); err != nil {
		return nil, err
	}
	cur.Close(ctx)
	b.Lost = b.Admitted - b.Matched
	// Delete what was read (by _id, so a log written meanwhile is kept for
	// the next check).
	for len(ids) > 0 {
		n := min(len(ids), 1000)
		if _, err := coll.DeleteMany(ctx, bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids[:n]}}}}); err != nil {
			return nil, err
		}
		ids = ids[n:]
	}

	after, err := h.balances(ctx)
	if err != nil {
		return nil, err
	}
	var drop, rise float64
	for id, a := range after {
		bf := before[id]
		drop += bf.credits - a.credits
		rise += a.used - bf.used
		b.HeldBeforeNano += bf.heldNano
		b.HeldAfterNano += a.heldNano
		b.HoldsLeft += a.holds
		b.LeasesLeft += a.leases
		b.ReceiptsLeft += a.receipts
	}
	b.BalanceNano = int64(math.Round(drop * 1e9))
	b.UsedNano = int64(math.Round(rise * 1e9))
	// Balances are USD doubles: allow the rounding of one double addition
	// per request (well under a nano-USD each at these magnitudes), and of
	// a few more per lease (taken, flushed, given back).
	tol := int64(b.Logged)/100 + 1
	spent := b.BalanceNano - (b.HeldAfterNano - b.HeldBeforeNano)
	mism := max(abs64(spent-b.ChargedNano), abs64(b.UsedNano-b.ChargedNano))
	if mism > tol {
		b.ChargeMismatchN = mism
	}
	return b, nil
}

func abs64(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

// probe is the per-request database round-trip count, from requests sent
// one at a time with the database quiet in between: the operations that
// started between sending the request and its first response byte, and
// those after (the settlement), until the next request.
type probe struct {
	Kind          string   `json:"kind"`
	Requests      int      `json:"requests"`
	BeforeMedian  float64  `json:"before_first_byte_median"`
	BeforeMax     int      `json:"before_first_byte_max"`
	AfterMedian   float64  `json:"after_first_byte_median"`
	AfterMax      int      `json:"after_first_byte_max"`
	BeforeOps     []string `json:"before_ops_example"`
	AfterOps      []string `json:"after_ops_example"`
	FirstByteMs   float64  `json:"first_byte_median_ms"`
	RTTMedianMs   float64  `json:"db_rtt_median_ms"`
	BackgroundOps int      `json:"background_ops_ignored"`
	Errors        int      `json:"errors"`

	Billing *billingCheck `json:"billing"`
}

func (h *harness) probe(kind string, stream bool) (*probe, error) {
	spec := reqSpec{site: siteGW, stream: stream}
	if stream {
		spec.events = h.cfg.SSEEvents
	}
	t := h.targets(spec)[0]
	ctx := context.Background()
	before, err := h.balances(ctx)
	if err != nil {
		return nil, err
	}
	// One request first so that the key is in the cache, as it is for a
	// client that keeps calling.
	var outs []outcome
	o := h.do(ctx, t, nil)
	outs = append(outs, o)
	if !o.ok() {
		return nil, fmt.Errorf("probe warm-up request failed: %d %s", o.code, o.err)
	}
	h.waitQuiet()
	h.proxy.take()
	type win struct{ start, first time.Time }
	var wins []win
	p := &probe{Kind: kind, Requests: h.cfg.Probes}
	var fb []time.Duration
	for i := 0; i < h.cfg.Probes; i++ {
		var w win
		w.start = time.Now()
		o := h.do(ctx, t, func() { w.first = time.Now() })
		outs = append(outs, o)
		if !o.ok() {
			p.Errors++
		}
		fb = append(fb, w.first.Sub(w.start))
		wins = append(wins, w)
		h.waitQuiet()
	}
	ops := h.proxy.take()
	sort.Slice(ops, func(i, j int) bool { return ops[i].At.Before(ops[j].At) })
	var nBefore, nAfter []float64
	var rtt []time.Duration
	for i, w := range wins {
		end := time.Now().Add(time.Hour)
		if i+1 < len(wins) {
			end = wins[i+1].start
		}
		var bo, ao []string
		for _, o := range ops {
			if o.At.Before(w.start) || !o.At.Before(end) {
				continue
			}
			if o.background() {
				p.BackgroundOps++
				continue
			}
			name := o.Cmd + " " + o.Coll
			// Before the first byte: the round trip was over by the time
			// the client got the first byte, so the answer could have
			// waited for it. A write sent while the answer was on its way
			// and finished after counts as after.
			if o.RTT >= 0 && o.At.Add(o.RTT).Before(w.first) {
				bo = append(bo, name)
			} else {
				ao = append(ao, name)
			}
			if o.RTT >= 0 {
				rtt = append(rtt, o.RTT)
			}
		}
		nBefore = append(nBefore, float64(len(bo)))
		nAfter = append(nAfter, float64(len(ao)))
		p.BeforeMax = max(p.BeforeMax, len(bo))
		p.AfterMax = max(p.AfterMax, len(ao))
		if i == len(wins)/2 {
			p.BeforeOps, p.AfterOps = bo, ao
		}
	}
	p.BeforeMedian, p.AfterMedian = median(nBefore), median(nAfter)
	p.FirstByteMs = ms(pct(fb, 50))
	p.RTTMedianMs = ms(pct(rtt, 50))
	if p.Billing, err = h.checkBilling(ctx, outs, before); err != nil {
		return nil, err
	}
	return p, nil
}

// waitQuiet waits until the gateway has sent no database write for
// ProbeQuiet (at most 3 ProbeQuiet).
func (h *harness) waitQuiet() {
	deadline := time.Now().Add(3 * h.cfg.ProbeQuiet)
	time.Sleep(h.cfg.ProbeQuiet)
	for time.Now().Before(deadline) {
		last := h.proxy.lastWrite()
		if last.IsZero() || time.Since(last) >= h.cfg.ProbeQuiet {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// addPhase records a measured phase and logs its line, its first failure
// and its database round trips; it passes err on.
func (h *harness) addPhase(p *phase, err error) error {
	if err != nil {
		return err
	}
	h.res.Phases = append(h.res.Phases, p)
	logf("  %-8s %-24s ok %6d  failed %4d  %8.1f req/s  p50 %7.2f ms  p99 %7.2f ms  caddy %6.0f µs/req%s",
		p.Site, p.Name, p.OK, p.Failed, p.RPS, p.P50Ms, p.P99Ms, p.CPUPerReq["caddy"], billingNote(p))
	if p.Failed > 0 {
		logf("           first failure: %s", p.FirstError)
	}
	logPhaseDB(p)
	return nil
}

// runAll runs the rounds. Within a round every test runs on both sites
// back to back; the site that goes first alternates from round to round.
func (h *harness) runAll() error {
	order := func(round int) []string {
		if round%2 == 1 {
			return []string{sitePlain, siteGW}
		}
		return []string{siteGW, sitePlain}
	}
	cfg := h.cfg
	add := h.addPhase
	warm := func(round int) error {
		for _, site := range []string{sitePlain, siteGW} {
			s := reqSpec{site: site}
			if err := add(h.measured(round, phWarmup, site, func() ([]outcome, time.Duration) {
				o1, w1 := h.attack(s, 0, min(cfg.SatConcurrency, 16), cfg.Warmup/2)
				s.stream, s.events = true, cfg.SSEEvents
				o2, w2 := h.attack(s, 0, min(cfg.SatConcurrency, 16), cfg.Warmup/2)
				return append(o1, o2...), w1 + w2
			})); err != nil {
				return err
			}
		}
		return nil
	}

	logf("warm-up")
	if err := warm(0); err != nil {
		return err
	}
	idle, err := h.measured(0, phIdle, "none", func() ([]outcome, time.Duration) {
		time.Sleep(h.cfg.Warmup)
		return nil, h.cfg.Warmup
	})
	if err != nil {
		return err
	}
	h.res.Phases = append(h.res.Phases, idle)
	logf("idle: Caddy %.1f%% of a core, FerretDB %.1f%%, PostgreSQL %.1f%%", 100*idle.CPU["caddy"]/idle.WallS,
		100*idle.CPU["ferretdb"]/idle.WallS, 100*idle.CPU["postgres"]/idle.WallS)

	logf("database round trips per request (sequential probes on the gateway)")
	for _, k := range []struct {
		name   string
		stream bool
	}{{"non-stream", false}, {fmt.Sprintf("sse-%d", cfg.SSEEvents), true}} {
		p, err := h.probe(k.name, k.stream)
		if err != nil {
			return err
		}
		h.res.Probes = append(h.res.Probes, p)
		logf("  %-10s before first byte: median %.1f max %d %v   after: median %.1f max %d %v",
			p.Kind, p.BeforeMedian, p.BeforeMax, p.BeforeOps, p.AfterMedian, p.AfterMax, p.AfterOps)
	}

	if cfg.Profile != "" {
		if err := h.profiles(); err != nil {
			return err
		}
		return h.measureRoundTrips()
	}
	for round := 1; round <= cfg.Rounds; round++ {
		logf("round %d of %d", round, cfg.Rounds)
		sites := order(round)
		for _, site := range sites {
			s := reqSpec{site: site}
			if err := add(h.measured(round, phSat, site, func() ([]outcome, time.Duration) {
				return h.attack(s, 0, cfg.SatConcurrency, cfg.SatDuration)
			})); err != nil {
				return err
			}
		}
		// Friend keys: the same load as the saturation phase, each request
		// also holding against its key's per-model limit.
		fs := reqSpec{site: siteGW, friend: true}
		if err := add(h.measured(round, phFriend, siteGW, func() ([]outcome, time.Duration) {
			return h.attack(fs, 0, cfg.SatConcurrency, cfg.SatDuration)
		})); err != nil {
			return err
		}
		for _, rate := range cfg.Rates {
			for _, site := range sites {
				s := reqSpec{site: site}
				if err := add(h.measured(round, fmt.Sprintf("%s%d", phRate, rate), site, func() ([]outcome, time.Duration) {
					return h.attack(s, rate, cfg.SatConcurrency, cfg.RateDuration)
				})); err != nil {
					return err
				}
			}
		}
		for _, site := range sites {
			s := reqSpec{site: site, stream: true, events: cfg.SSEEvents}
			if err := add(h.measured(round, phSSETTFB, site, func() ([]outcome, time.Duration) {
				return h.attack(s, cfg.SSERate, cfg.SatConcurrency, cfg.SSEDuration)
			})); err != nil {
				return err
			}
		}
		for _, site := range sites {
			s := reqSpec{site: site, stream: true, events: cfg.SSEEvents}
			if err := add(h.measured(round, phSSESat, site, func() ([]outcome, time.Duration) {
				return h.attack(s, 0, cfg.SatConcurrency, cfg.SSESatDuration)
			})); err != nil {
				return err
			}
		}
		// Memory: each measurement on a fresh Caddy process.
		for _, site := range sites {
			if err := add(h.memStreams(round, site)); err != nil {
				return err
			}
		}
		for _, site := range sites {
			if err := add(h.memBigStream(round, site)); err != nil {
				return err
			}
		}
	}
	return h.measureRoundTrips()
}

// measureRoundTrips measures the driver's CPU per round trip at each fixed
// rate (see rtCost).
func (h *harness) measureRoundTrips() error {
	rates := h.cfg.Rates
	if h.cfg.Profile != "" {
		rates = []int{h.cfg.ProfileRate}
	}
	logf("MongoDB Go driver CPU per round trip (harness client, paced)")
	for _, rate := range rates {
		rc, err := h.roundTripCost(rate, h.cfg.RateDuration)
		if err != nil {
			return fmt.Errorf("round-trip cost at %d/s: %w", rate, err)
		}
		h.res.RTCost = append(h.res.RTCost, rc)
		logf("  %4d/s: %d round trips, %.0f µs CPU each (idle %.0f µs/op subtracted; %.0f µs back to back), p50 %.2f ms (%.2f ms through the proxy)", rate, rc.Ops, rc.CPUPerOp, rc.IdleShare, rc.BackToBack, rc.P50Ms, rc.ProxiedP50Ms)
	}
	return nil
}

// logPhaseDB logs a gateway phase's database round trips per request, by
// command, and how its holds were served.
func logPhaseDB(p *phase) {
	if p.Site != siteGW || p.DB == nil || p.OK == 0 {
		return
	}
	logf("           db %.2f rt/req (reads %.2f, writes %.2f): %s", p.DB.OpsPerReq, p.DB.ReadsPerReq, p.DB.WritesPerReq, p.DB.perRequest(p.OK))
	if hs := p.Holds; hs != nil {
		logf("           holds: store %d, lease %d; leases taken %d, closed %d; held nothing %.1f s after the settlements%s; load avg %.2f",
			hs.Store, hs.Lease, hs.LeasesTaken, hs.LeasesClosed, hs.LeaseDrainS, map[bool]string{true: "", false: " (NOT DRAINED)"}[hs.Drained], p.LoadAvg[0])
	}
}

func billingNote(p *phase) string {
	if p.Billing == nil {
		return ""
	}
	b := p.Billing
	s := fmt.Sprintf("  billed %d/%d", b.Matched, b.Admitted)
	if !b.ok() || b.Unexpected > 0 {
		s += fmt.Sprintf(" LOST %d DUP %d unexpected %d mismatch %d nUSD charge-errors %d", b.Lost, b.Duplicates, b.Unexpected, b.ChargeMismatchN, b.ChargeErrors)
	}
	if b.HoldsLeft+b.LeasesLeft > 0 {
		s += fmt.Sprintf(" (still held: %d holds, %d leases, %.6f USD)", b.HoldsLeft, b.LeasesLeft, float64(b.HeldAfterNano)/1e9)
	}
	return s
}

// freshCaddy restarts Caddy and warms the site with a few requests per
// user (a measured phase of its own, billing checked), so that the memory
// measured next starts from a new, warm process.
func (h *harness) freshCaddy(round int, site string) error {
	if err := h.restartCaddy(); err != nil {
		return err
	}
	p, err := h.measured(round, phRestart, site, func() ([]outcome, time.Duration) {
		start := time.Now()
		var outs []outcome
		for _, stream := range []bool{false, true} {
			spec := reqSpec{site: site, stream: stream}
			if stream {
				spec.events = h.cfg.SSEEvents
			}
			for _, t := range h.targets(spec) {
				outs = append(outs, h.do(context.Background(), t, nil))
			}
		}
		return outs, time.Since(start)
	})
	if err != nil {
		return err
	}
	h.res.Phases = append(h.res.Phases, p)
	if p.Failed > 0 {
		return fmt.Errorf("warm-up after restart: %s", p.FirstError)
	}
	time.Sleep(500 * time.Millisecond)
	return nil
}

// memStreams holds cfg.Streams streams open at once on a fresh Caddy and
// reports its peak RSS and Go memory above the idle process, per stream.
func (h *harness) memStreams(round int, site string) (*phase, error) {
	if err := h.freshCaddy(round, site); err != nil {
		return nil, err
	}
	pid := h.caddy.pid()
	m := &memStats{Streams: h.cfg.Streams, SampleInterval: "100ms"}
	m.BaseGo = h.goMem(true)
	m.BaseRSS, _, _ = memStatus(pid)
	m.PeakFromVmHWM = resetPeakRSS(pid)
	p, err := h.measured(round, phStreams, site, func() ([]outcome, time.Duration) {
		start := time.Now()
		outs := h.holdStreams(site, h.cfg.Streams, h.cfg.StreamDelay, h.cfg.StreamHold, func(open func() int) {
			// Live memory with every stream open.
			time.Sleep(100 * time.Millisecond)
			m.OpenAtPeak = open()
			m.PeakGo = h.goMem(true)
			// Sample RSS while most streams are open.
			for open() > h.cfg.Streams/2 {
				rss, _, _ := memStatus(pid)
				m.PeakRSS = max(m.PeakRSS, rss)
				m.SamplesTaken++
				time.Sleep(100 * time.Millisecond)
			}
		})
		return outs, time.Since(start)
	})
	if err != nil {
		return nil, err
	}
	if _, hwm, err := memStatus(pid); err == nil && m.PeakFromVmHWM {
		m.PeakRSS = max(m.PeakRSS, hwm)
	}
	m.RSSGrowth = m.PeakRSS - m.BaseRSS
	m.GoGrowth = m.PeakGo - m.BaseGo
	if m.Streams > 0 {
		m.RSSPerStream = float64(m.RSSGrowth) / float64(m.Streams)
		m.GoPerStream = float64(m.GoGrowth) / float64(m.Streams)
	}
	p.Mem = m
	return p, nil
}

// memBigStream sends one stream of cfg.BigStreamMB MiB through a fresh
// Caddy as fast as the client reads it, sampling Caddy's memory.
func (h *harness) memBigStream(round int, site string) (*phase, error) {
	if err := h.freshCaddy(round, site); err != nil {
		return nil, err
	}
	pid := h.caddy.pid()
	m := &memStats{SampleInterval: "20ms"}
	m.BaseGo = h.goMem(true)
	m.BaseRSS, _, _ = memStatus(pid)
	m.PeakFromVmHWM = resetPeakRSS(pid)
	size := int64(h.cfg.BigStreamMB) << 20
	t := h.targets(reqSpec{site: site, stream: true, bytes: size, evSize: h.cfg.BigEventKB << 10})[0]
	p, err := h.measured(round, phBig, site, func() ([]outcome, time.Duration) {
		done := make(chan struct{})
		var o outcome
		start := time.Now()
		go func() {
			o = h.do(context.Background(), t, nil)
			close(done)
		}()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-done:
				return []outcome{o}, time.Since(start)
			case <-tick.C:
				rss, _, _ := memStatus(pid)
				m.PeakRSS = max(m.PeakRSS, rss)
				if i%10 == 0 {
					m.PeakGo = max(m.PeakGo, h.goMem(false))
				}
				m.SamplesTaken++
			}
		}
	})
	if err != nil {
		return nil, err
	}
	if _, hwm, err := memStatus(pid); err == nil && m.PeakFromVmHWM {
		m.PeakRSS = max(m.PeakRSS, hwm)
	}
	m.PeakGo = max(m.PeakGo, m.BaseGo)
	m.PeakRSS = max(m.PeakRSS, m.BaseRSS)
	m.RSSGrowth = m.PeakRSS - m.BaseRSS
	m.GoGrowth = m.PeakGo - m.BaseGo
	m.StreamBytes = size
	if p.WallS > 0 {
		m.MBps = float64(size) / (1 << 20) / p.WallS
	}
	p.Mem = m
	return p, nil
}

// profiles writes one CPU profile of the Caddy process per site, each taken
// from Caddy's admin endpoint (/debug/pprof/profile) while that site alone
// gets -profile-rate non-stream requests per second. The figures of the
// phases are reported as usual.
func (h *harness) profiles() error {
	cfg := h.cfg
	if err := os.MkdirAll(cfg.Profile, 0o755); err != nil {
		return err
	}
	for _, site := range []string{sitePlain, siteGW} {
		path := filepath.Join(cfg.Profile, fmt.Sprintf("caddy-%s-%d.pprof", site, cfg.ProfileRate))
		d := time.Duration(cfg.ProfileSeconds) * time.Second
		got := make(chan error, 1)
		go func() {
			got <- fetch(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", h.admin, cfg.ProfileSeconds), path)
		}()
		s := reqSpec{site: site}
		p, err := h.measured(1, fmt.Sprintf("profile%d", cfg.ProfileRate), site, func() ([]outcome, time.Duration) {
			return h.attack(s, cfg.ProfileRate, cfg.SatConcurrency, d+500*time.Millisecond)
		})
		if err != nil {
			return err
		}
		if err := <-got; err != nil {
			return fmt.Errorf("profile of %s: %w", site, err)
		}
		h.res.Phases = append(h.res.Phases, p)
		logf("  %-8s %6d ok, %d failed, p50 %.2f ms, caddy %.0f µs/req -> %s", site, p.OK, p.Failed, p.P50Ms, p.CPUPerReq["caddy"], path)
	}
	return nil
}

// fetch writes the body of a GET of url to path.
func fetch(url, path string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
