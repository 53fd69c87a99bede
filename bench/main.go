// Command bench measures what the llm_billing Caddy module costs next to a
// plain Caddy reverse_proxy, end to end, on one machine: the stand-in
// upstream, FerretDB (PostgreSQL backend) as the database, one Caddy
// serving both sites, and a load generator (vegeta, as a library) in this
// process. See README.md; scripts/bench.sh builds and runs it.
//
//	bench [run] [flags]      the benchmark (this process: harness + load generator)
//	bench upstream [flags]   the stand-in upstream in its own process
//	bench ferretdb [flags]   FerretDB embedded in its own process
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

func main() {
	args := os.Args[1:]
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "run":
		err = runMain(args)
	case "upstream":
		err = upstreamMain(args)
	case "ferretdb":
		err = ferretMain(args)
	case "dbcost":
		err = dbcostMain(args)
	default:
		err = fmt.Errorf("unknown command %q (run, upstream, ferretdb, dbcost)", cmd)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// config is every knob of a run. Each flag can also be set with an
// environment variable BENCH_<FLAG> (upper case, '-' as '_'), for example
// BENCH_ROUNDS=5; a flag on the command line wins.
type config struct {
	Quick  bool `json:"quick"`
	Rounds int  `json:"rounds"`

	// Sweep replaces the rounds with the non-stream saturation of both
	// sites for each number of users × credit_lease setting.
	Sweep       bool   `json:"sweep"`
	SweepUsers  []int  `json:"sweep_users,omitempty"`
	SweepLeases []bool `json:"sweep_leases,omitempty"`

	Warmup         time.Duration `json:"warmup"`
	SatDuration    time.Duration `json:"sat_duration"`
	SatConcurrency int           `json:"sat_concurrency"`
	RateDuration   time.Duration `json:"rate_duration"`
	Rates          []int         `json:"rates"`

	SSEEvents      int           `json:"sse_events"`
	SSERate        int           `json:"sse_rate"`
	SSEDuration    time.Duration `json:"sse_duration"`
	SSESatDuration time.Duration `json:"sse_sat_duration"`

	Streams      int           `json:"streams"`
	StreamDelay  time.Duration `json:"stream_event_delay"`
	StreamHold   time.Duration `json:"stream_hold"`
	BigStreamMB  int           `json:"big_stream_mb"`
	BigEventKB   int           `json:"big_event_kb"`
	Probes       int           `json:"probes"`
	ProbeQuiet   time.Duration `json:"probe_quiet"`
	DrainTimeout time.Duration `json:"drain_timeout"`

	Users        int    `json:"users"`
	CreditLease  bool   `json:"credit_lease"`
	UpstreamKeys int    `json:"upstream_keys"`
	StaticKeys   bool   `json:"static_keys"`
	Isolation    string `json:"isolation"`
	API          string `json:"api"`
	DB           string `json:"db"`
	PGBin        string `json:"-"`
	PGConf       string `json:"pg_conf"`

	Profile        string `json:"-"`
	ProfileRate    int    `json:"-"`
	ProfileSeconds int    `json:"-"`

	Caddy   string `json:"-"`
	Repo    string `json:"-"`
	Models  string `json:"-"`
	Out     string `json:"-"`
	WorkDir string `json:"-"`
	Keep    bool   `json:"-"`
}

func runMain(args []string) error {
	var c config
	var rates, sweepUsers, sweepLeases string
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	fs.BoolVar(&c.Quick, "quick", false, "smoke run of about a minute: 1 round, short phases, fewer streams (explicit flags still win)")
	fs.IntVar(&c.Rounds, "rounds", 3, "rounds; every figure is the median over rounds")
	fs.DurationVar(&c.Warmup, "warmup", 2*time.Second, "warm-up load per site after each (re)start of Caddy")
	fs.DurationVar(&c.SatDuration, "sat-duration", 8*time.Second, "duration of the non-stream saturation phase")
	fs.IntVar(&c.SatConcurrency, "concurrency", 64, "concurrent requests in the saturation phases")
	fs.DurationVar(&c.RateDuration, "rate-duration", 5*time.Second, "duration of each fixed-rate phase")
	fs.StringVar(&rates, "rates", "100,300", "fixed rates (req/s) for the latency phases, comma-separated")
	fs.IntVar(&c.SSEEvents, "sse-events", 50, "events per stream in the SSE phases")
	fs.IntVar(&c.SSERate, "sse-rate", 50, "rate (streams/s) at which the first SSE byte is timed")
	fs.DurationVar(&c.SSEDuration, "sse-duration", 4*time.Second, "duration of the first-SSE-byte phase")
	fs.DurationVar(&c.SSESatDuration, "sse-sat-duration", 6*time.Second, "duration of the SSE saturation phase")
	fs.IntVar(&c.Streams, "streams", 200, "concurrent long streams held open for the memory figure")
	fs.DurationVar(&c.StreamDelay, "stream-event-delay", 200*time.Millisecond, "pause between events of the long streams")
	fs.DurationVar(&c.StreamHold, "stream-hold", 6*time.Second, "how long each long stream lasts")
	fs.IntVar(&c.BigStreamMB, "big-stream-mb", 100, "size of the one big stream, MiB")
	fs.IntVar(&c.BigEventKB, "big-event-kb", 16, "size of each event of the big stream, KiB")
	fs.IntVar(&c.Probes, "probes", 10, "sequential requests per kind for the before/after-first-byte database round trips")
	fs.DurationVar(&c.ProbeQuiet, "probe-quiet", 1600*time.Millisecond, "database silence that ends a probe request's window (longer than the gateway's background writes: counters every 500 ms, receipts after 1-1.5 s)")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 90*time.Second, "longest wait for settlements after a gateway phase")
	fs.IntVar(&c.Users, "users", 32, "seeded users (keys); requests go round-robin over them")
	fs.Var((*onOff)(&c.CreditLease), "credit-lease", "credit_lease of the gateway: on (busy users' holds carved from credit leases) or off")
	fs.IntVar(&c.UpstreamKeys, "upstream-keys", 4, "upstream keys in the pool")
	fs.StringVar(&c.Isolation, "isolation", "process", "llm_billing isolation: process (one gateway instance, as here) or shared/auto (the lock documents several instances on FerretDB need)")
	fs.BoolVar(&c.StaticKeys, "static-keys", false, "give the gateway upstream_keys in the Caddyfile instead of the openhands_keys pool")
	fs.StringVar(&c.API, "api", "anthropic", "API of the requests: anthropic (/v1/messages) or openai (/v1/chat/completions)")
	fs.StringVar(&c.DB, "db", "postgresql", "FerretDB backend: postgresql or sqlite")
	fs.StringVar(&c.PGBin, "pg-bin", "", "folder of the PostgreSQL server binaries (default: found under /usr/lib/postgresql)")
	fs.StringVar(&c.PGConf, "pg-conf", "", "extra PostgreSQL settings, name=value, comma-separated (default: the stock settings)")
	fs.BoolVar(&c.Sweep, "sweep", false, "instead of the rounds, the non-stream saturation of both sites for each of -sweep-users × -sweep-leases, one table")
	fs.StringVar(&sweepUsers, "sweep-users", "1,32,1000,10000", "numbers of users the sweep spreads the gateway's requests over, comma-separated")
	fs.StringVar(&sweepLeases, "sweep-leases", "off,on", "credit_lease settings of the sweep, comma-separated")
	fs.StringVar(&c.Profile, "profile", "", "instead of the rounds, write Caddy CPU profiles (pprof) of each site at -profile-rate into this folder")
	fs.IntVar(&c.ProfileRate, "profile-rate", 300, "rate (req/s, non-stream) of the -profile phases")
	fs.IntVar(&c.ProfileSeconds, "profile-seconds", 15, "length of each -profile phase, seconds")
	fs.StringVar(&c.Caddy, "caddy", "", "Caddy binary with the llm_billing module (scripts/bench.sh builds one with ./xcaddy.sh)")
	fs.StringVar(&c.Repo, "repo", "..", "the repository checkout (for examples/ and version info)")
	fs.StringVar(&c.Models, "models", "", "models file of the gateway site (default <repo>/examples/models-chat.json)")
	fs.StringVar(&c.Out, "out", "bench-results.json", "JSON results file")
	fs.StringVar(&c.WorkDir, "workdir", "", "folder for the database, logs and configs (default: a new temporary folder)")
	fs.BoolVar(&c.Keep, "keep", false, "keep the work folder (logs) after the run")

	// BENCH_<FLAG> environment variables set defaults.
	fs.VisitAll(func(f *flag.Flag) {
		env := "BENCH_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok && v != "" {
			if err := f.Value.Set(v); err != nil {
				fmt.Fprintf(os.Stderr, "bench: %s=%q: %v\n", env, v, err)
				os.Exit(2)
			}
		}
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		// Parsing stops at the first argument that is not a flag: what
		// follows would be dropped silently (-credit-lease on: write
		// -credit-lease or -credit-lease=on).
		return fmt.Errorf("unexpected argument %q (a boolean flag takes its value as -flag=value)", fs.Arg(0))
	}
	explicit := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { explicit[f.Name] = true })
	fs.VisitAll(func(f *flag.Flag) {
		env := "BENCH_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if _, ok := os.LookupEnv(env); ok {
			explicit[f.Name] = true
		}
	})
	if c.Quick {
		quick := map[string]string{
			"rounds": "1", "warmup": "1s", "sat-duration": "2s", "rate-duration": "2s",
			"sse-duration": "2s", "sse-sat-duration": "2s", "streams": "50", "stream-hold": "2s",
			"big-stream-mb": "32", "probes": "3", "drain-timeout": "45s",
		}
		for name, v := range quick {
			if !explicit[name] {
				if err := fs.Set(name, v); err != nil {
					return err
				}
			}
		}
	}
	for _, r := range strings.Split(rates, ",") {
		var n int
		if _, err := fmt.Sscan(strings.TrimSpace(r), &n); err != nil || n <= 0 {
			return fmt.Errorf("bad -rates %q", rates)
		}
		c.Rates = append(c.Rates, n)
	}
	if c.Sweep {
		for _, v := range strings.Split(sweepUsers, ",") {
			var n int
			if _, err := fmt.Sscan(strings.TrimSpace(v), &n); err != nil || n <= 0 {
				return fmt.Errorf("bad -sweep-users %q", sweepUsers)
			}
			c.SweepUsers = append(c.SweepUsers, n)
		}
		for _, v := range strings.Split(sweepLeases, ",") {
			var o onOff
			if err := o.Set(strings.TrimSpace(v)); err != nil {
				return fmt.Errorf("bad -sweep-leases %q: %w", sweepLeases, err)
			}
			c.SweepLeases = append(c.SweepLeases, bool(o))
		}
		// Each cell seeds a database of its own (see runSweep); the one
		// seeded at the start only serves the upstream keys.
		c.Users = 1
	}
	if c.Caddy == "" {
		return fmt.Errorf("-caddy is required: a Caddy binary built with the llm_billing module (./xcaddy.sh)")
	}
	if c.Rounds < 1 || c.Users < 1 || c.UpstreamKeys < 1 || c.SatConcurrency < 1 {
		return fmt.Errorf("rounds, users, upstream-keys and concurrency must be positive")
	}
	if c.API != "anthropic" && c.API != "openai" {
		return fmt.Errorf("-api must be anthropic or openai")
	}
	if c.DB != "postgresql" && c.DB != "sqlite" {
		return fmt.Errorf("-db must be postgresql or sqlite")
	}
	flags := map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { flags[f.Name] = f.Value.String() })
	return run(c, flags)
}

// onOff is a boolean flag that also reads on and off (BENCH_CREDIT_LEASE=on),
// as the Caddyfile spells it; -credit-lease alone means on.
type onOff bool

func (o *onOff) String() string {
	if o != nil && *o {
		return "on"
	}
	return "off"
}

func (o *onOff) Set(s string) error {
	switch strings.ToLower(s) {
	case "on", "true", "1", "yes":
		*o = true
	case "off", "false", "0", "no":
		*o = false
	default:
		return fmt.Errorf("%q is not on or off", s)
	}
	return nil
}

func (o *onOff) IsBoolFlag() bool { return true }
