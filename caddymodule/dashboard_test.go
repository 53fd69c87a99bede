package caddymodule

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// registered returns the name and the label names of every series the
// module registers, and whether it is a histogram, read from the
// collectors' descriptions.
func registered(t *testing.T) map[string][]string {
	t.Helper()
	descs := make(chan *prometheus.Desc, 64)
	go func() {
		for _, c := range collectors() {
			c.Describe(descs)
		}
		close(descs)
	}()
	re := regexp.MustCompile(`fqName: "([a-z_]+)".*variableLabels: \{([a-z_,]*)\}`)
	out := map[string][]string{}
	for d := range descs {
		m := re.FindStringSubmatch(d.String())
		require.NotNil(t, m, d.String())
		labels := strings.Split(m[2], ",")
		if m[2] == "" {
			labels = nil
		}
		out[m[1]] = labels
	}
	return out
}

type dashPanel struct {
	ID      int    `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	Targets []struct {
		Expr         string `json:"expr"`
		LegendFormat string `json:"legendFormat"`
	} `json:"targets"`
	Panels []dashPanel `json:"panels"`
}

// The Grafana dashboard in docs parses, every query in it names only
// series the module registers and groups by labels they have, every
// legend names a grouped label, and every series the docs promise a panel
// for has one.
func TestGrafanaDashboard(t *testing.T) {
	raw, err := os.ReadFile("../docs/grafana-dashboard.json")
	require.NoError(t, err)
	var dash struct {
		Panels []dashPanel `json:"panels"`
	}
	require.NoError(t, json.Unmarshal(raw, &dash))
	known := registered(t)
	histograms := map[string]bool{
		"caddy_llm_billing_database_duration_seconds": true, "caddy_llm_billing_settlement_lag_seconds": true,
	}
	nameRE := regexp.MustCompile(`caddy_llm_billing_[a-z_]+`)
	byRE := regexp.MustCompile(`by \(([a-z_, ]+)\)`)
	legendRE := regexp.MustCompile(`\{\{ *([a-z_]+) *\}\}`)
	used := map[string]bool{}
	ids := map[int]bool{}
	var walk func([]dashPanel)
	walk = func(ps []dashPanel) {
		for _, p := range ps {
			assert.False(t, ids[p.ID], "panel id %d twice", p.ID)
			ids[p.ID] = true
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			require.NotEmpty(t, p.Targets, p.Title)
			for _, tg := range p.Targets {
				names := nameRE.FindAllString(tg.Expr, -1)
				require.NotEmpty(t, names, "%s: %s", p.Title, tg.Expr)
				labels := map[string]bool{"le": false}
				for _, n := range names {
					base := n
					for _, suffix := range []string{"_bucket", "_count", "_sum"} {
						if b, ok := strings.CutSuffix(n, suffix); ok && histograms[b] {
							base = b
							labels["le"] = suffix == "_bucket"
						}
					}
					ls, ok := known[base]
					if !assert.True(t, ok, "%s: %s is not a registered series", p.Title, n) {
						continue
					}
					used[base] = true
					for _, l := range ls {
						labels[l] = true
					}
				}
				grouped := map[string]bool{}
				for _, m := range byRE.FindAllStringSubmatch(tg.Expr, -1) {
					for _, l := range strings.Split(m[1], ",") {
						l = strings.TrimSpace(l)
						grouped[l] = true
						assert.True(t, labels[l], "%s: grouped by %s, which %v do not have", p.Title, l, names)
					}
				}
				for _, m := range legendRE.FindAllStringSubmatch(tg.LegendFormat, -1) {
					assert.True(t, grouped[m[1]], "%s: legend {{%s}} is not a grouped label", p.Title, m[1])
				}
			}
		}
	}
	walk(dash.Panels)
	for name := range known {
		assert.True(t, used[name], "no panel shows %s", name)
	}
}
