package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
)

type meta struct {
	Date       string            `json:"date"`
	NumCPU     int               `json:"nproc"`
	CPUModel   string            `json:"cpu_model"`
	Kernel     string            `json:"kernel"`
	GoVersion  string            `json:"go"`
	Caddy      string            `json:"caddy"`
	PostgreSQL string            `json:"postgresql,omitempty"`
	DBBackend  string            `json:"ferretdb_backend"`
	Modules    map[string]string `json:"modules"`
	Commit     string            `json:"commit"`
}

type results struct {
	Meta    *meta             `json:"meta"`
	Flags   map[string]string `json:"config"`
	Config  config            `json:"-"`
	Probes  []*probe          `json:"db_probes"`
	RTCost  []*rtCost         `json:"driver_round_trip_cost"`
	Phases  []*phase          `json:"phases"`
	Summary []row             `json:"summary"`
}

func newResults(c config, flags map[string]string) *results {
	return &results{Config: c, Flags: flags}
}

// row is one line of the summary table: medians over rounds.
type row struct {
	Figure  string    `json:"figure"`
	Plain   *float64  `json:"plain"`
	Gateway *float64  `json:"gateway"`
	Ratio   *float64  `json:"ratio,omitempty"`
	Delta   *float64  `json:"delta,omitempty"`
	Unit    string    `json:"unit"`
	Text    [2]string `json:"text,omitempty"` // for rows that are not numbers
	digits  int
}

func nproc() int { return runtime.NumCPU() }

func goVersion() string { return runtime.Version() }

func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// moduleVersions lists the versions of the modules this binary was built
// with that the figures depend on.
func moduleVersions() map[string]string {
	out := map[string]string{}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return out
	}
	for _, m := range bi.Deps {
		switch m.Path {
		case "github.com/FerretDB/FerretDB", "github.com/tsenart/vegeta/v12", "go.mongodb.org/mongo-driver/v2":
			out[m.Path] = m.Version
		}
	}
	return out
}

// pick returns the median over rounds of f on the phases named name of
// site; NaN when there is none.
func (r *results) pick(name, site string, f func(*phase) float64) float64 {
	var v []float64
	for _, p := range r.Phases {
		if p.Name == name && p.Site == site && p.Round > 0 {
			if x := f(p); !math.IsNaN(x) {
				v = append(v, x)
			}
		}
	}
	return median(v)
}

func fp(x float64) *float64 {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return nil
	}
	return &x
}

func (r *results) summarize() {
	c := r.Config
	var rows []row
	noRatio := false
	both := func(fig, unit string, digits int, name string, f func(*phase) float64) {
		pl, gw := r.pick(name, sitePlain, f), r.pick(name, siteGW, f)
		rw := row{Figure: fig, Unit: unit, Plain: fp(pl), Gateway: fp(gw), digits: digits}
		if pl > 0 && !math.IsNaN(gw) && !noRatio {
			rw.Ratio = fp(gw / pl)
		}
		if !math.IsNaN(pl) && !math.IsNaN(gw) {
			rw.Delta = fp(gw - pl)
		}
		rows = append(rows, rw)
	}
	gwOnly := func(fig, unit string, digits int, name string, f func(*phase) float64) {
		rows = append(rows, row{Figure: fig, Unit: unit, Gateway: fp(r.pick(name, siteGW, f)), digits: digits})
	}
	rps := func(p *phase) float64 { return p.RPS }
	settled := func(p *phase) float64 { return p.SettledRPS }
	p50 := func(p *phase) float64 { return p.P50Ms }
	p99 := func(p *phase) float64 { return p.P99Ms }
	cpu := func(k string) func(*phase) float64 { return func(p *phase) float64 { return p.CPUPerReq[k] } }

	both("non-stream: max req/s at saturation", "req/s", 0, phSat, rps)
	both("non-stream: max req/s counting the settlement drain", "req/s", 0, phSat, settled)
	// Friend keys have no plain counterpart: set against plain's saturation.
	friendRow := func(fig, unit string, digits int, f func(*phase) float64) {
		pl, gw := r.pick(phSat, sitePlain, f), r.pick(phFriend, siteGW, f)
		rw := row{Figure: fig, Unit: unit, Plain: fp(pl), Gateway: fp(gw), digits: digits}
		if pl > 0 && !math.IsNaN(gw) {
			rw.Ratio, rw.Delta = fp(gw/pl), fp(gw-pl)
		}
		rows = append(rows, rw)
	}
	friendRow("friend keys, non-stream: max req/s at saturation (plain: its saturation phase)", "req/s", 0, rps)
	friendRow("friend keys, non-stream: p50 latency at saturation", "ms", 2, p50)
	for _, rate := range c.Rates {
		name := fmt.Sprintf("%s%d", phRate, rate)
		both(fmt.Sprintf("non-stream at %d req/s: p50 latency", rate), "ms", 2, name, p50)
		both(fmt.Sprintf("non-stream at %d req/s: p99 latency", rate), "ms", 2, name, p99)
	}
	both(fmt.Sprintf("SSE %d events at %d streams/s: first SSE byte p50", c.SSEEvents, c.SSERate), "ms", 2, phSSETTFB, func(p *phase) float64 { return p.TTFBP50Ms })
	both(fmt.Sprintf("SSE %d events at %d streams/s: first SSE byte p99", c.SSEEvents, c.SSERate), "ms", 2, phSSETTFB, func(p *phase) float64 { return p.TTFBP99Ms })
	both(fmt.Sprintf("SSE %d events: max streams/s at saturation", c.SSEEvents), "streams/s", 0, phSSESat, rps)
	both(fmt.Sprintf("SSE %d events: max streams/s counting the settlement drain", c.SSEEvents), "streams/s", 0, phSSESat, settled)

	both("Caddy CPU per non-stream request, saturation", "µs", 0, phSat, cpu("caddy"))
	if len(c.Rates) > 0 {
		last := c.Rates[len(c.Rates)-1]
		both(fmt.Sprintf("Caddy CPU per non-stream request, %d req/s", last), "µs", 0, fmt.Sprintf("%s%d", phRate, last), cpu("caddy"))
	}
	both(fmt.Sprintf("Caddy CPU per %d-event stream, saturation", c.SSEEvents), "µs", 0, phSSESat, cpu("caddy"))
	both(fmt.Sprintf("Caddy CPU per SSE event (per stream / %d), saturation", c.SSEEvents), "µs", 2, phSSESat, func(p *phase) float64 {
		return p.CPUPerReq["caddy"] / float64(c.SSEEvents)
	})
	// Plain Caddy uses no database: its column shows the background
	// (the gateway's heartbeats and key-pool refresh) per request.
	noRatio = true
	dbLabel := "FerretDB + PostgreSQL"
	if c.DB == "sqlite" {
		dbLabel = "FerretDB on SQLite"
	}
	both("database CPU per non-stream request ("+dbLabel+"), saturation", "µs", 0, phSat, cpu("database"))
	both(fmt.Sprintf("database CPU per %d-event stream, saturation", c.SSEEvents), "µs", 0, phSSESat, cpu("database"))
	noRatio = false
	gwOnly("database round trips per non-stream request under load (request path)", "ops", 2, phSat, func(p *phase) float64 { return p.DB.OpsPerReq })
	gwOnly("  of which reads / writes", "ops", 2, phSat, func(p *phase) float64 { return p.DB.ReadsPerReq })
	rows[len(rows)-1].Text[1] = fmt.Sprintf("%.2f / %.2f", r.pick(phSat, siteGW, func(p *phase) float64 { return p.DB.ReadsPerReq }),
		r.pick(phSat, siteGW, func(p *phase) float64 { return p.DB.WritesPerReq }))
	holdText := func(name string) string {
		st := r.pick(name, siteGW, func(p *phase) float64 { return holdsOf(p).store })
		ls := r.pick(name, siteGW, func(p *phase) float64 { return holdsOf(p).lease })
		return fmt.Sprintf("%.0f / %.0f", st, ls)
	}
	rows = append(rows,
		row{Figure: "holds at non-stream saturation: a database write each (store) / carved from a credit lease (lease)", Unit: "holds",
			Text: [2]string{"–", holdText(phSat)}},
		row{Figure: "credit leases taken / closed during non-stream saturation and its drain", Unit: "leases",
			Text: [2]string{"–", fmt.Sprintf("%.0f / %.0f", r.pick(phSat, siteGW, func(p *phase) float64 { return holdsOf(p).taken }),
				r.pick(phSat, siteGW, func(p *phase) float64 { return holdsOf(p).closed }))}},
		row{Figure: "after the settlement drain, time until the gateway held nothing (no hold, lease or receipt left)", Unit: "s",
			Gateway: fp(r.pick(phSat, siteGW, func(p *phase) float64 { return holdsOf(p).drainS })), digits: 1},
	)
	both("machine load average (1 min) at the end of non-stream saturation", "", 2, phSat, func(p *phase) float64 { return p.LoadAvg[0] })
	rows[len(rows)-1].Ratio, rows[len(rows)-1].Delta = nil, nil
	gwOnly(fmt.Sprintf("database round trips per %d-event stream under load", c.SSEEvents), "ops", 2, phSSESat, func(p *phase) float64 { return p.DB.OpsPerReq })
	gwOnly("database round trips per friend-key request under load (request path)", "ops", 2, phFriend, func(p *phase) float64 { return p.DB.OpsPerReq })
	for _, pr := range r.Probes {
		rows = append(rows, row{Figure: fmt.Sprintf("database round trips before / after the first byte, %s (sequential probe, median of %d; max)", pr.Kind, pr.Requests), Unit: "ops",
			Text: [2]string{"0 / 0", fmt.Sprintf("%g / %g (max %d / %d)", pr.BeforeMedian, pr.AfterMedian, pr.BeforeMax, pr.AfterMax)}})
	}
	// The round-trip time at every fixed rate, to set each added latency
	// against the database round trips it contains.
	gwOnly(fmt.Sprintf("database round-trip time p50 during the SSE first-byte phase (%d streams/s)", c.SSERate), "ms", 2, phSSETTFB, func(p *phase) float64 { return p.DB.RTTP50Ms })
	for _, rate := range c.Rates {
		ph := fmt.Sprintf("%s%d", phRate, rate)
		gwOnly(fmt.Sprintf("database round-trip time p50 at %d req/s (at the counting proxy)", rate), "ms", 2, ph, func(p *phase) float64 { return p.DB.RTTP50Ms })
		gwOnly(fmt.Sprintf("database round-trip time p99 at %d req/s", rate), "ms", 2, ph, func(p *phase) float64 { return p.DB.RTTP99Ms })
	}
	// The hold as the gateway waited for it (driver and proxy hop in), and
	// what the added latency is beyond it: the targets' "+ 0.5 ms".
	holdRows := func(label, ph string, added func(*phase) float64) {
		p50 := r.pick(ph, siteGW, func(p *phase) float64 { return float64(p.DB.HoldP50Ms) })
		mean := r.pick(ph, siteGW, func(p *phase) float64 { return float64(p.DB.HoldMeanMs) })
		if math.IsNaN(p50) {
			return
		}
		pl, gw := r.pick(ph, sitePlain, added), r.pick(ph, siteGW, added)
		if c.CreditLease {
			// Most holds are carved from a lease: most requests wait for
			// no round trip, and the histogram has only the others.
			rows = append(rows, row{Figure: "the holds written to the database (not carved from a lease) as the gateway waited for them, p50 / mean, " + label, Unit: "ms",
				Text: [2]string{"–", fmt.Sprintf("%.2f / %.2f", p50, mean)}})
			rows = append(rows, row{Figure: "added p50, gateway − plain (credit leases: most requests wait for no hold), " + label, Unit: "ms", Gateway: fp(gw - pl), digits: 2})
			return
		}
		rows = append(rows, row{Figure: "the hold as the gateway waited for it (its /metrics), p50 / mean, " + label, Unit: "ms",
			Text: [2]string{"–", fmt.Sprintf("%.2f / %.2f", p50, mean)}})
		rows = append(rows, row{Figure: "added p50 beyond that hold p50 (target ≤ 0.5), " + label, Unit: "ms", Gateway: fp(gw - pl - p50), digits: 2})
	}
	holdRows(fmt.Sprintf("SSE first byte at %d streams/s", c.SSERate), phSSETTFB, func(p *phase) float64 { return p.TTFBP50Ms })
	for _, rate := range c.Rates {
		holdRows(fmt.Sprintf("non-stream at %d req/s", rate), fmt.Sprintf("%s%d", phRate, rate), func(p *phase) float64 { return p.P50Ms })
	}

	// The driver's CPU per round trip, and what the gateway's Caddy CPU
	// is beyond the round trips it made, at the same rates.
	for _, rc := range r.RTCost {
		rows = append(rows, row{Figure: fmt.Sprintf("MongoDB Go driver CPU per database round trip, paced at %d/s / back to back (harness client, idle subtracted)", rc.Rate),
			Unit: "µs", Text: [2]string{"–", fmt.Sprintf("%.0f / %.0f", rc.CPUPerOp, rc.BackToBack)}})
		rows = append(rows, row{Figure: fmt.Sprintf("database round-trip time p50 seen by that client at %d/s: straight to FerretDB / through the counting proxy", rc.Rate),
			Unit: "ms", Text: [2]string{"–", fmt.Sprintf("%.2f / %.2f", rc.P50Ms, rc.ProxiedP50Ms)}})
		ph := fmt.Sprintf("%s%d", phRate, rc.Rate)
		pl, gw := r.pick(ph, sitePlain, cpu("caddy")), r.pick(ph, siteGW, cpu("caddy"))
		ops := r.pick(ph, siteGW, func(p *phase) float64 { return p.DB.OpsPerReq })
		if !math.IsNaN(pl) && !math.IsNaN(gw) && !math.IsNaN(ops) {
			rows = append(rows, row{Figure: fmt.Sprintf("Caddy CPU per non-stream request at %d req/s beyond plain Caddy and its %.2f round trips priced back to back (an upper bound of the module's own CPU)", rc.Rate, ops),
				Unit: "µs", Gateway: fp(gw - pl - ops*rc.BackToBack), digits: 0})
		}
	}

	mib := func(f func(*memStats) float64) func(*phase) float64 {
		return func(p *phase) float64 {
			if p.Mem == nil {
				return math.NaN()
			}
			return f(p.Mem) / (1 << 20)
		}
	}
	kib := func(f func(*memStats) float64) func(*phase) float64 {
		return func(p *phase) float64 {
			if p.Mem == nil {
				return math.NaN()
			}
			return f(p.Mem) / (1 << 10)
		}
	}
	both(fmt.Sprintf("%d concurrent streams: Caddy peak RSS", c.Streams), "MiB", 1, phStreams, mib(func(m *memStats) float64 { return float64(m.PeakRSS) }))
	both(fmt.Sprintf("%d concurrent streams: RSS per stream", c.Streams), "KiB", 1, phStreams, kib(func(m *memStats) float64 { return m.RSSPerStream }))
	both(fmt.Sprintf("%d concurrent streams: live Go heap+stacks per stream (after a forced GC)", c.Streams), "KiB", 1, phStreams, kib(func(m *memStats) float64 { return m.GoPerStream }))
	both(fmt.Sprintf("one %d MiB stream: Caddy RSS growth", c.BigStreamMB), "MiB", 1, phBig, mib(func(m *memStats) float64 { return float64(m.RSSGrowth) }))
	both(fmt.Sprintf("one %d MiB stream: Go heap+stacks growth", c.BigStreamMB), "MiB", 1, phBig, mib(func(m *memStats) float64 { return float64(m.GoGrowth) }))
	both(fmt.Sprintf("one %d MiB stream: throughput", c.BigStreamMB), "MiB/s", 0, phBig, func(p *phase) float64 {
		if p.Mem == nil {
			return math.NaN()
		}
		return p.Mem.MBps
	})

	// Totals over every phase, warm-ups included.
	var tot billingCheck
	for _, pr := range r.Probes {
		tot.add(pr.Billing)
	}
	failed := map[string]int{}
	for _, p := range r.Phases {
		failed[p.Site] += p.Failed
		tot.add(p.Billing)
	}
	rows = append(rows,
		row{Figure: "failed requests, all phases (non-2xx, transport error or cut answer)", Unit: "requests", Text: [2]string{fmt.Sprint(failed[sitePlain]), fmt.Sprint(failed[siteGW])}},
		row{Figure: "billing: admitted 2xx / request logs written", Unit: "requests", Text: [2]string{"–", fmt.Sprintf("%d / %d", tot.Admitted, tot.Logged)}},
		row{Figure: "billing: lost / duplicate / logged but not seen admitted", Unit: "requests", Text: [2]string{"–", fmt.Sprintf("%d / %d / %d", tot.Lost, tot.Duplicates, tot.Unexpected)}},
		row{Figure: "billing: balance moved ≠ sum charged in logs + money still in holds and leases; charge errors", Unit: "nano-USD; logs", Text: [2]string{"–", fmt.Sprintf("%d; %d", tot.ChargeMismatchN, tot.ChargeErrors)}},
		row{Figure: "billing: holds / credit leases still open after the drains (their money counted as held, not lost)", Unit: "", Text: [2]string{"–", fmt.Sprintf("%d / %d", tot.HoldsLeft, tot.LeasesLeft)}},
	)
	r.Summary = rows
}

// holdFigures are a phase's holdStats as numbers (NaN without them).
type holdFigures struct{ store, lease, taken, closed, drainS float64 }

func holdsOf(p *phase) holdFigures {
	if p.Holds == nil {
		n := math.NaN()
		return holdFigures{n, n, n, n, n}
	}
	hs := p.Holds
	return holdFigures{float64(hs.Store), float64(hs.Lease), float64(hs.LeasesTaken), float64(hs.LeasesClosed), hs.LeaseDrainS}
}

func num(x *float64, digits int) string {
	if x == nil {
		return "–"
	}
	return fmt.Sprintf("%.*f", digits, *x)
}

// markdown renders the summary table and the run's facts.
func (r *results) markdown() string {
	var b strings.Builder
	m, c := r.Meta, r.Config
	fmt.Fprintf(&b, "### llm_billing gateway vs plain Caddy reverse_proxy\n\n")
	fmt.Fprintf(&b, "- machine: **%d cores** (nproc), %s, Linux %s\n", m.NumCPU, m.CPUModel, m.Kernel)
	fmt.Fprintf(&b, "- Caddy %s; harness %s; FerretDB %s (%s backend%s); vegeta %s; mongo-driver %s\n",
		m.Caddy, m.GoVersion, m.Modules["github.com/FerretDB/FerretDB"], m.DBBackend, pgNote(m), m.Modules["github.com/tsenart/vegeta/v12"], m.Modules["go.mongodb.org/mongo-driver/v2"])
	fmt.Fprintf(&b, "- checkout %s, %s; %d round(s), medians; saturation %s at concurrency %d, fixed rates %v for %s, SSE %d events, %d users, %d upstream keys (%s), credit_lease %s\n\n",
		m.Commit, m.Date, c.Rounds, c.SatDuration, c.SatConcurrency, c.Rates, c.RateDuration, c.SSEEvents, c.Users, c.UpstreamKeys, keySource(c), onOffText(c.CreditLease))
	fmt.Fprintf(&b, "| figure | unit | plain Caddy | gateway | gateway / plain | gateway − plain |\n|---|---|---:|---:|---:|---:|\n")
	for _, rw := range r.Summary {
		pl, gw := num(rw.Plain, rw.digits), num(rw.Gateway, rw.digits)
		if rw.Text[0] != "" {
			pl = rw.Text[0]
		}
		if rw.Text[1] != "" {
			gw = rw.Text[1]
		}
		ratio, delta := "–", "–"
		if rw.Ratio != nil {
			ratio = fmt.Sprintf("%.2f×", *rw.Ratio)
		}
		if rw.Delta != nil {
			delta = fmt.Sprintf("%+.*f", rw.digits, *rw.Delta)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", rw.Figure, rw.Unit, pl, gw, ratio, delta)
	}
	for _, pr := range r.Probes {
		fmt.Fprintf(&b, "\n- %s request, database operations before the first byte: %s; after: %s",
			pr.Kind, opsList(pr.BeforeOps), opsList(pr.AfterOps))
	}
	for _, p := range r.Phases {
		if p.Name == phIdle && p.WallS > 0 {
			fmt.Fprintf(&b, "\n- idle (no load, %.0f s): Caddy %.1f%% of one core, FerretDB %.1f%%%s: the background counted in every per-request CPU figure",
				p.WallS, 100*p.CPU["caddy"]/p.WallS, 100*p.CPU["ferretdb"]/p.WallS, pgShare(m, p.CPU["postgres"]/p.WallS))
		}
	}
	// The gateway's operations by command under load (first round).
	for _, p := range r.Phases {
		if p.Name == phSat && p.Site == siteGW && p.Round == 1 && p.DB != nil {
			fmt.Fprintf(&b, "\n- database operations per non-stream request at saturation and its drains (round 1): %s", p.DB.perRequest(p.OK))
			t := p.WallS + p.DrainS
			fmt.Fprintf(&b, "\n- during the non-stream saturation phase and its drain (round 1), the database processes used %.0f%% of one core (FerretDB %.0f%%%s), Caddy %.0f%%, the upstream %.0f%%, the harness %.0f%%",
				100*p.CPU["database"]/t, 100*p.CPU["ferretdb"]/t, pgShare(m, p.CPU["postgres"]/t), 100*p.CPU["caddy"]/t, 100*p.CPU["upstream"]/t, 100*p.CPU["harness"]/t)
		}
	}
	b.WriteString("\n")
	return b.String()
}

func pgShare(m *meta, share float64) string {
	if m.PostgreSQL == "" {
		return ""
	}
	return fmt.Sprintf(", PostgreSQL %.0f%%", 100*share)
}

func opsList(ops []string) string {
	if len(ops) == 0 {
		return "none"
	}
	return strings.Join(ops, ", ")
}

func pgNote(m *meta) string {
	if m.PostgreSQL == "" {
		return ""
	}
	return ", " + m.PostgreSQL
}

func onOffText(on bool) string {
	if on {
		return "on"
	}
	return "off"
}

func keySource(c config) string {
	if c.StaticKeys {
		return "static upstream_keys"
	}
	return "openhands_keys pool"
}

func (h *harness) report() error {
	r := h.res
	r.summarize()
	md := r.markdown()
	fmt.Println()
	fmt.Print(md)
	out, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(h.cfg.Out, out, 0o644); err != nil {
		return err
	}
	mdPath := strings.TrimSuffix(h.cfg.Out, ".json") + ".md"
	if err := os.WriteFile(mdPath, []byte(md), 0o644); err != nil {
		return err
	}
	logf("results: %s and %s", h.cfg.Out, mdPath)
	return nil
}
