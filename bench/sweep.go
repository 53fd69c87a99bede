package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Phase names of the sweep.
const (
	phSweepKeys = "sweep_warmup_keys" // gateway: one request per active user (key cache)
)

// sweepCell is one number of users × credit_lease setting of the sweep.
type sweepCell struct {
	Users       int    `json:"users"`
	CreditLease bool   `json:"credit_lease"`
	Error       string `json:"error,omitempty"`
}

// runSweep measures the non-stream saturation of both sites for every
// number of users × credit_lease setting. Each cell runs on a fresh
// FerretDB process with a database of its own, seeded with the cell's
// users, and a fresh Caddy with a data folder of its own, so that nothing
// one cell leaves behind (a user document full of receipts, a settlement
// journal the next Caddy would replay, commands FerretDB is still working
// through after their client gave up) can slow the next. A cell: every user's key once on the gateway
// (into its key cache), the usual warm-up load on plain Caddy, then the
// saturation phase on both sites back to back, the site that goes first
// alternating from cell to cell. The gateway gets no warm-up load: its
// first seconds (the first holds of each user, the first leases) are part
// of what the cell measures, the same for every cell. A cell that fails is
// reported as such and the sweep goes on.
func (h *harness) runSweep() error {
	cfg := h.cfg
	var cells []sweepCell
	for _, n := range cfg.SweepUsers {
		for _, lease := range cfg.SweepLeases {
			cells = append(cells, sweepCell{Users: n, CreditLease: lease})
		}
	}
	for i := range cells {
		c := &cells[i]
		logf("sweep %d of %d: %d users, credit_lease %s (load average %.2f)", i+1, len(cells), c.Users, onOffText(c.CreditLease), loadAvg()[0])
		if err := h.sweepCell(i+1, c); err != nil {
			c.Error = err.Error()
			logf("  cell failed: %v", err)
		}
		// The table so far, so that a sweep stopped part way still has
		// the cells it ran.
		h.cells = cells[:i+1]
		if _, err := h.writeSweep(); err != nil {
			return err
		}
	}
	return nil
}

// sweepCell runs one cell (see runSweep); its phases are numbered cell.
func (h *harness) sweepCell(cell int, c *sweepCell) error {
	cfg := h.cfg
	add := h.addPhase
	h.cfg.CreditLease, h.cfg.Users = c.CreditLease, c.Users
	h.load.closeIdle()
	h.caddy.stop(60 * time.Second)
	h.dbName = fmt.Sprintf("%s_%d", dbName, cell)
	if err := h.restartFerret(); err != nil {
		return err
	}
	h.caddyHome = filepath.Join(h.work, fmt.Sprintf("cell-%d", cell))
	if err := os.MkdirAll(h.caddyHome, 0o755); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	err := h.seed(ctx)
	cancel()
	if err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	if err := h.startCaddy(); err != nil {
		return err
	}
	keys := h.targets(reqSpec{site: siteGW})
	if err := add(h.measured(cell, phSweepKeys, siteGW, func() ([]outcome, time.Duration) {
		return h.each(keys, cfg.SatConcurrency)
	})); err != nil {
		return err
	}
	plain := reqSpec{site: sitePlain}
	if err := add(h.measured(cell, phWarmup, sitePlain, func() ([]outcome, time.Duration) {
		return h.attack(plain, 0, min(cfg.SatConcurrency, 16), cfg.Warmup)
	})); err != nil {
		return err
	}
	sites := []string{sitePlain, siteGW}
	if cell%2 == 0 {
		sites = []string{siteGW, sitePlain}
	}
	for _, site := range sites {
		s := reqSpec{site: site}
		if err := add(h.measured(cell, phSat, site, func() ([]outcome, time.Duration) {
			return h.attack(s, 0, cfg.SatConcurrency, cfg.SatDuration)
		})); err != nil {
			return err
		}
	}
	return nil
}

// sweepRow is one cell of the sweep: its saturation phases.
type sweepRow struct {
	Users          int     `json:"users"`
	CreditLease    string  `json:"credit_lease"`
	PlainRPS       float64 `json:"plain_rps"`
	GatewayRPS     float64 `json:"gateway_rps"`
	SettledRPS     float64 `json:"gateway_settled_rps"`
	PlainP50Ms     float64 `json:"plain_p50_ms"`
	GatewayP50Ms   float64 `json:"gateway_p50_ms"`
	PlainCPU       float64 `json:"plain_caddy_cpu_us"`
	GatewayCPU     float64 `json:"gateway_caddy_cpu_us"`
	DatabaseCPU    float64 `json:"gateway_database_cpu_us"`
	OpsPerReq      float64 `json:"round_trips_per_request"`
	ReadsPerReq    float64 `json:"reads_per_request"`
	WritesPerReq   float64 `json:"writes_per_request"`
	ByCommand      string  `json:"round_trips_by_command"`
	HoldsStore     int     `json:"holds_store"`
	HoldsLease     int     `json:"holds_lease"`
	LeasesTaken    int     `json:"leases_taken"`
	LoadAvg        float64 `json:"load_avg_1m"`
	BillingOK      bool    `json:"billing_ok"`
	Failed         int     `json:"failed"`
	GatewayDrained bool    `json:"gateway_drained"`
	Error          string  `json:"error,omitempty"`
}

// sweepRows gathers each cell's saturation phases (phases numbered by
// cell, from 1).
func (r *results) sweepRows(cells []sweepCell) []sweepRow {
	rows := make([]sweepRow, len(cells))
	for i, c := range cells {
		rows[i] = sweepRow{Users: c.Users, CreditLease: onOffText(c.CreditLease), BillingOK: true, Error: c.Error}
	}
	for _, p := range r.Phases {
		if p.Round < 1 || p.Round > len(rows) {
			continue
		}
		sr := &rows[p.Round-1]
		if p.Billing != nil && !p.Billing.ok() {
			sr.BillingOK = false // any phase of the cell, warm-ups included
		}
		if p.Name != phSat {
			continue
		}
		sr.Failed += p.Failed
		sr.LoadAvg = math.Max(sr.LoadAvg, p.LoadAvg[0])
		if p.Site == sitePlain {
			sr.PlainRPS, sr.PlainP50Ms, sr.PlainCPU = p.RPS, p.P50Ms, p.CPUPerReq["caddy"]
			continue
		}
		sr.GatewayRPS, sr.SettledRPS, sr.GatewayP50Ms = p.RPS, p.SettledRPS, p.P50Ms
		sr.GatewayCPU, sr.DatabaseCPU = p.CPUPerReq["caddy"], p.CPUPerReq["database"]
		if p.DB != nil {
			sr.OpsPerReq, sr.ReadsPerReq, sr.WritesPerReq = p.DB.OpsPerReq, p.DB.ReadsPerReq, p.DB.WritesPerReq
			sr.ByCommand = p.DB.perRequest(p.OK)
		}
		if hs := p.Holds; hs != nil {
			sr.HoldsStore, sr.HoldsLease, sr.LeasesTaken, sr.GatewayDrained = hs.Store, hs.Lease, hs.LeasesTaken, hs.Drained
		}
	}
	return rows
}

// sweepMarkdown renders the sweep's table.
func (r *results) sweepMarkdown(rows []sweepRow) string {
	var b strings.Builder
	m, c := r.Meta, r.Config
	fmt.Fprintf(&b, "### llm_billing sweep: users × credit_lease, non-stream saturation, gateway vs plain Caddy\n\n")
	fmt.Fprintf(&b, "- machine: **%d cores** (nproc), %s, Linux %s\n", m.NumCPU, m.CPUModel, m.Kernel)
	fmt.Fprintf(&b, "- Caddy %s; harness %s; FerretDB %s (%s backend%s); vegeta %s; mongo-driver %s\n",
		m.Caddy, m.GoVersion, m.Modules["github.com/FerretDB/FerretDB"], m.DBBackend, pgNote(m), m.Modules["github.com/tsenart/vegeta/v12"], m.Modules["go.mongodb.org/mongo-driver/v2"])
	fmt.Fprintf(&b, "- checkout %s, %s; each cell on a database and a Caddy of its own: every user's key once on the gateway, %s of warm-up load on plain Caddy, then %s of saturation at concurrency %d on each site; %d upstream keys (%s)\n\n",
		m.Commit, m.Date, c.Warmup, c.SatDuration, c.SatConcurrency, c.UpstreamKeys, keySource(c))
	fmt.Fprintf(&b, "| users | credit_lease | plain req/s | gateway req/s | gateway / plain | gateway req/s counting the settlement drain | p50 ms plain / gateway | Caddy CPU µs/req plain / gateway | database CPU µs/req | db round trips/req (reads / writes) | holds: store / lease | leases taken | load avg (1 min) | billing |\n")
	fmt.Fprintf(&b, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, sr := range rows {
		ratio := "–"
		if sr.PlainRPS > 0 {
			ratio = fmt.Sprintf("%.2f×", sr.GatewayRPS/sr.PlainRPS)
		}
		bill := "ok"
		if !sr.BillingOK {
			bill = "**FAILED**"
		}
		if !sr.GatewayDrained {
			bill += " (not drained)"
		}
		if sr.Error != "" {
			bill += "; cell failed: " + strings.ReplaceAll(sr.Error, "|", "/")
		}
		if sr.Failed > 0 {
			bill += fmt.Sprintf(", %d failed requests", sr.Failed)
		}
		fmt.Fprintf(&b, "| %d | %s | %.0f | %.0f | %s | %.0f | %.2f / %.2f | %.0f / %.0f | %.0f | %.2f (%.2f / %.2f) | %d / %d | %d | %.2f | %s |\n",
			sr.Users, sr.CreditLease, sr.PlainRPS, sr.GatewayRPS, ratio, sr.SettledRPS, sr.PlainP50Ms, sr.GatewayP50Ms,
			sr.PlainCPU, sr.GatewayCPU, sr.DatabaseCPU, sr.OpsPerReq, sr.ReadsPerReq, sr.WritesPerReq,
			sr.HoldsStore, sr.HoldsLease, sr.LeasesTaken, sr.LoadAvg, bill)
	}
	b.WriteString("\nDatabase round trips per gateway request at saturation (until nothing is held), by command and collection:\n")
	for _, sr := range rows {
		fmt.Fprintf(&b, "\n- %d users, credit_lease %s: %s", sr.Users, sr.CreditLease, sr.ByCommand)
	}

	var tot billingCheck
	for _, p := range r.Phases {
		tot.add(p.Billing)
	}
	fmt.Fprintf(&b, "\n\nBilling over every gateway phase of the sweep (warm-ups included): %d admitted, %d logged; lost %d, duplicate %d, logged but not seen admitted %d; balance moved ≠ charged + held %d nano-USD; charge errors %d; holds / leases still open %d / %d.\n",
		tot.Admitted, tot.Logged, tot.Lost, tot.Duplicates, tot.Unexpected, tot.ChargeMismatchN, tot.ChargeErrors, tot.HoldsLeft, tot.LeasesLeft)
	return b.String()
}

// reportSweep prints the sweep's table and writes it with every phase.
func (h *harness) reportSweep() error {
	md, err := h.writeSweep()
	if err != nil {
		return err
	}
	fmt.Println()
	fmt.Print(md)
	logf("results: %s and %s", h.cfg.Out, strings.TrimSuffix(h.cfg.Out, ".json")+".md")
	return nil
}

// writeSweep writes the table of the cells run so far (.md) and every
// phase (.json), and returns the table.
func (h *harness) writeSweep() (string, error) {
	r := h.res
	rows := r.sweepRows(h.cells)
	md := r.sweepMarkdown(rows)
	out, err := json.MarshalIndent(struct {
		*results
		Sweep []sweepRow `json:"sweep"`
	}{r, rows}, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(h.cfg.Out, out, 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(strings.TrimSuffix(h.cfg.Out, ".json")+".md", []byte(md), 0o644); err != nil {
		return "", err
	}
	return md, nil
}
