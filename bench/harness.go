package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

const dbName = "fproxy"

// benchUser is a seeded user with a personal key.
type benchUser struct {
	ID, Key string
}

type harness struct {
	cfg  config
	work string

	pg         *postgres
	ferret     *child
	ferretArgs []string
	ferretN    int
	ferretURI  string
	proxy      *dbProxy
	up         *child
	upURL      string

	caddy    *child
	caddyN   int
	admin    string // host:port of Caddy's admin API
	plainURL string
	gwURL    string
	cfgPath  string

	client *mongo.Client
	db     *mongo.Database
	dbName string // the gateway's database (dbName; the sweep gives each cell its own)
	// caddyHome is Caddy's HOME and XDG folders: its instance id and the
	// settlement journal (the sweep gives each cell its own).
	caddyHome string

	users        []benchUser
	friendKeys   []string // one per user, owned by it (friend phase)
	upstreamKeys []string

	cells []sweepCell // the sweep's cells, as they ran

	load   *loadClient
	res    *results
	models string
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func run(cfg config, flags map[string]string) (err error) {
	h := &harness{cfg: cfg}
	repo, err := filepath.Abs(cfg.Repo)
	if err != nil {
		return err
	}
	h.cfg.Repo = repo
	if h.cfg.Caddy, err = filepath.Abs(cfg.Caddy); err != nil {
		return err
	}
	h.models = cfg.Models
	if h.models == "" {
		h.models = filepath.Join(repo, "examples", "models-chat.json")
	}
	if h.models, err = filepath.Abs(h.models); err != nil {
		return err
	}
	if _, err := os.Stat(h.models); err != nil {
		return fmt.Errorf("models file: %w", err)
	}

	if cfg.WorkDir == "" {
		if h.work, err = os.MkdirTemp("", "llm-billing-bench-"); err != nil {
			return err
		}
	} else {
		h.work = cfg.WorkDir
		if err := os.MkdirAll(h.work, 0o755); err != nil {
			return err
		}
	}
	_ = os.Chmod(h.work, 0o755)
	logf("work folder %s", h.work)

	// Ctrl-C stops the run cleanly: every child is stopped by teardown.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sig)
	go func() {
		if _, ok := <-sig; ok {
			logf("interrupted: stopping")
			h.teardown()
			os.Exit(130)
		}
	}()
	defer func() {
		h.teardown()
		if err == nil && !cfg.Keep && cfg.WorkDir == "" {
			_ = os.RemoveAll(h.work)
		} else {
			logf("logs kept in %s", h.work)
		}
	}()

	h.res = newResults(h.cfg, flags)
	if err := h.setup(); err != nil {
		return err
	}
	h.res.Meta = h.meta()
	if cfg.Sweep {
		if err := h.runSweep(); err != nil {
			return err
		}
		return h.reportSweep()
	}
	if err := h.runAll(); err != nil {
		return err
	}
	return h.report()
}

func (h *harness) setup() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}

	// The database: PostgreSQL (or nothing, for SQLite) and FerretDB in
	// its own process.
	ferretArgs := []string{"ferretdb", "-listen", "127.0.0.1:0"}
	if h.cfg.DB == "postgresql" {
		bin, err := pgBinDir(h.cfg.PGBin)
		if err != nil {
			return err
		}
		logf("starting PostgreSQL from %s", bin)
		var extra []string
		if h.cfg.PGConf != "" {
			extra = strings.Split(h.cfg.PGConf, ",")
		}
		if h.pg, err = startPostgres(bin, filepath.Join(h.work, "pg"), extra); err != nil {
			return err
		}
		ferretArgs = append(ferretArgs, "-handler", "postgresql", "-postgresql-url", h.pg.url())
	} else {
		dir := filepath.Join(h.work, "sqlite")
		_ = os.RemoveAll(dir)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		ferretArgs = append(ferretArgs, "-handler", "sqlite", "-sqlite-url", "file:"+dir+"/")
	}
	logf("starting FerretDB (%s backend)", h.cfg.DB)
	h.ferretArgs = ferretArgs
	if err := h.startFerret(); err != nil {
		return err
	}
	h.proxy, err = startDBProxy(strings.TrimSuffix(strings.TrimPrefix(h.ferretURI, "mongodb://"), "/"))
	if err != nil {
		return err
	}

	// Seed: the demo data, the bench users and upstream keys, with a
	// client of our own that talks to FerretDB directly (not through the
	// counting proxy).
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	h.client, err = mongo.Connect(options.Client().ApplyURI(h.ferretURI).SetTimeout(60 * time.Second))
	if err != nil {
		return err
	}
	h.dbName, h.caddyHome = dbName, h.work
	h.db = h.client.Database(h.dbName)
	if err := h.seed(ctx); err != nil {
		return fmt.Errorf("seed: %w", err)
	}

	// The stand-in upstream in its own process.
	pr2, pw2 := io.Pipe()
	if h.up, err = startChild("upstream", filepath.Join(h.work, "upstream.log"), pw2, nil, self,
		"upstream", "-listen", "127.0.0.1:0", "-keys", strings.Join(h.upstreamKeys, ",")); err != nil {
		return err
	}
	if h.upURL, err = readyLine(pr2, h.up, 30*time.Second); err != nil {
		return err
	}

	h.load = newLoadClient()
	return h.startCaddy()
}

// startFerret starts FerretDB in its own process (ferretdb-N.log).
func (h *harness) startFerret() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	h.ferretN++
	pr, pw := io.Pipe()
	if h.ferret, err = startChild("ferretdb", filepath.Join(h.work, fmt.Sprintf("ferretdb-%d.log", h.ferretN)), pw, nil, self, h.ferretArgs...); err != nil {
		return err
	}
	h.ferretURI, err = readyLine(pr, h.ferret, 60*time.Second)
	return err
}

// restartFerret stops FerretDB and starts a new process on the same
// backend, which the counting proxy and the harness's client then use:
// work FerretDB had queued (it goes on with a command whose client gave
// up) ends with it. Caddy must be stopped first.
func (h *harness) restartFerret() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_ = h.client.Disconnect(ctx)
	cancel()
	h.ferret.stop(20 * time.Second)
	if err := h.startFerret(); err != nil {
		return err
	}
	h.proxy.setTarget(strings.TrimSuffix(strings.TrimPrefix(h.ferretURI, "mongodb://"), "/"))
	var err error
	h.client, err = mongo.Connect(options.Client().ApplyURI(h.ferretURI).SetTimeout(60 * time.Second))
	if err != nil {
		return err
	}
	h.db = h.client.Database(h.dbName)
	return nil
}

// seed inserts the demo data (tests/seed) plus cfg.Users users with large
// creditsNew balances and cfg.UpstreamKeys bound upstream keys.
func (h *harness) seed(ctx context.Context) error {
	h.users, h.friendKeys = nil, nil
	if err := seed.SeedDemo(ctx, h.db); err != nil {
		return err
	}
	h.upstreamKeys = []string{seed.DemoUpstreamAPIKey}
	var ups []seed.UpstreamKey
	for i := 1; i < h.cfg.UpstreamKeys; i++ {
		k := seed.UpstreamKey{ID: fmt.Sprintf("bench-upstream-%d", i), APIKey: fmt.Sprintf("sk-oh-bench-upstream-%032d", i), Status: "healthy"}
		ups = append(ups, k)
		h.upstreamKeys = append(h.upstreamKeys, k.APIKey)
	}
	var users []bson.D
	now := time.Now()
	for i := 0; i < h.cfg.Users; i++ {
		sum := sha256.Sum256(fmt.Appendf(nil, "bench-user-%d", i))
		u := benchUser{ID: fmt.Sprintf("bench-%03d", i), Key: "sk-trollllm-" + hex.EncodeToString(sum[:])}
		h.users = append(h.users, u)
		users = append(users, seed.User{ID: u.ID, APIKey: u.Key, Role: "user", Active: true, Migration: true,
			Credits: 1000, RefCredits: 1000, CreditsNew: 1000}.Doc(now))
	}
	var friends []bson.D
	if !h.cfg.Sweep { // the sweep has no friend phase
		for _, k := range h.friends() {
			friends = append(friends, k.Doc(now))
		}
	}
	if err := seed.Insert(ctx, h.db, ups); err != nil {
		return err
	}
	// Thousands of users one insert each would take minutes on FerretDB.
	start := time.Now()
	for coll, docs := range map[string][]bson.D{seed.UsersCollection: users, seed.FriendKeysCollection: friends} {
		if err := insertBatched(ctx, h.db.Collection(coll), docs); err != nil {
			return fmt.Errorf("seeding %s: %w", coll, err)
		}
	}
	logf("seeded %d users and %d friend keys in %.1f s", len(users), len(friends), time.Since(start).Seconds())
	if err := h.indexUserKeys(ctx); err != nil {
		return err
	}
	for _, k := range ups {
		if err := seed.Bind(ctx, h.db, k.ID); err != nil {
			return err
		}
	}
	return nil
}

// insertBatched inserts docs with one insertMany per thousand.
func insertBatched(ctx context.Context, coll *mongo.Collection, docs []bson.D) error {
	for len(docs) > 0 {
		n := min(len(docs), 1000)
		batch := make([]any, n)
		for i := range batch {
			batch[i] = docs[i]
		}
		if _, err := coll.InsertMany(ctx, batch); err != nil {
			return err
		}
		docs = docs[n:]
	}
	return nil
}

// userKeyIndex is the index the harness gives usersNew.apiKey. The gateway
// looks a personal key up by it (mongostore.Store.Authenticate) but does
// not create an index for it: the backend that owns usersNew does. Without
// one, FerretDB reads the whole collection for each lookup, which at
// thousands of users costs more than everything else a request does.
const userKeyIndex = "bench_apiKey"

// indexUserKeys creates the usersNew.apiKey index unless the collection
// already has an index on apiKey, and logs what a lookup by key costs
// before and after.
func (h *harness) indexUserKeys(ctx context.Context) error {
	users := h.db.Collection(seed.UsersCollection)
	specs, err := users.Indexes().ListSpecifications(ctx)
	if err != nil {
		return fmt.Errorf("listing usersNew indexes: %w", err)
	}
	for _, sp := range specs {
		var keys bson.D
		if bson.Unmarshal(sp.KeysDocument, &keys) == nil && len(keys) > 0 && keys[0].Key == "apiKey" {
			logf("usersNew already has an index on apiKey (%s)", sp.Name)
			return nil
		}
	}
	before := h.keyLookupTime(ctx)
	if _, err := users.Indexes().CreateOne(ctx, mongo.IndexModel{
		Keys: bson.D{{Key: "apiKey", Value: 1}}, Options: options.Index().SetName(userKeyIndex),
	}); err != nil {
		return fmt.Errorf("indexing usersNew.apiKey: %w", err)
	}
	logf("usersNew.apiKey indexed: a lookup by key took %.2f ms before, %.2f ms after (%d users)",
		ms(before), ms(h.keyLookupTime(ctx)), len(h.users))
	return nil
}

// keyLookupTime is the median time of a few lookups of a user by apiKey,
// as the gateway makes them, straight to FerretDB.
func (h *harness) keyLookupTime(ctx context.Context) time.Duration {
	users := h.db.Collection(seed.UsersCollection)
	var ds []time.Duration
	for i := 0; i < 9; i++ {
		u := h.users[(i*7919)%len(h.users)]
		t0 := time.Now()
		if err := users.FindOne(ctx, bson.D{{Key: "apiKey", Value: u.Key}}, options.FindOne().SetProjection(bson.D{{Key: "_id", Value: 1}})).Err(); err != nil {
			return -1
		}
		ds = append(ds, time.Since(t0))
	}
	return pct(ds, 50)
}

// usersFilter selects the users of ids, or every user when ids is long:
// then a long $in costs the database more than reading the collection
// (which holds the bench users and a few demo users).
func usersFilter(ids []string) bson.D {
	if len(ids) <= 1000 {
		return bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: ids}}}}
	}
	return bson.D{}
}

// friendModel is the canonical id of the model the bench requests
// (claude-sonnet-4-5 is its alias): friend limits are kept by it.
const friendModel = "claude-sonnet-4-5-20250929"

// friends makes one friend key per bench user, owned by it, with a limit on
// the bench's model that no phase reaches.
func (h *harness) friends() []seed.FriendKey {
	var out []seed.FriendKey
	for _, u := range h.users {
		sum := sha256.Sum256(fmt.Appendf(nil, "bench-friend-%s", u.ID))
		k := seed.FriendKey{Key: "sk-trollllm-friend-" + hex.EncodeToString(sum[:]), Owner: u.ID, Active: true,
			Limits: []seed.FriendLimit{{Model: friendModel, Limit: 1_000_000}}}
		h.friendKeys = append(h.friendKeys, k.Key)
		out = append(out, k)
	}
	return out
}

// caddyfile is the one config: the same reverse_proxy to the stand-in
// behind two sites, plain and with llm_billing in front. Both add the
// request id to the answer, so the harness can match billing records to
// the requests it saw admitted.
func (h *harness) caddyfile(adminPort, plainPort, gwPort int) string {
	static := ""
	if h.cfg.StaticKeys {
		static = "\t\tupstream_keys " + strings.Join(h.upstreamKeys, " ") + "\n"
	}
	if h.cfg.Isolation != "" {
		static += "\t\tisolation " + h.cfg.Isolation + "\n"
	}
	if h.cfg.CreditLease {
		static += "\t\tcredit_lease on\n"
	}
	return fmt.Sprintf(`# Written by the llm_billing benchmark (bench/).
{
	admin 127.0.0.1:%d
	persist_config off
	grace_period 10s
	llm_billing {
		mongodb_uri {env.BENCH_MONGODB_URI}
		database %s
		# The limiter runs on every request, at limits no phase reaches.
		rate_limit {
			user   1000000 1m
			friend 1000000 1m
			other  1000000 1m
		}
%s	}
}

# The upstream as production's Caddyfile.example has it, with enough idle
# connections for the benchmark's concurrency.
(upstream) {
	reverse_proxy %s {
		flush_interval -1
		transport http {
			keepalive 2m
			keepalive_idle_conns_per_host 1024
		}
	}
}

# Plain Caddy: reverse_proxy only.
http://:%d {
	bind 127.0.0.1
	header X-Bench-Request-Id {http.request.uuid}
	import upstream
}

# The gateway: llm_billing in front of the same reverse_proxy.
http://:%d {
	bind 127.0.0.1
	header X-Bench-Request-Id {http.request.uuid}
	llm_billing {
		credit_field creditsNew
		models %s
		forward_headers X-Test-Id X-Standin-* X-Bench-*
	}
	import upstream
}
`, adminPort, h.dbName, static, h.upURL, plainPort, gwPort, h.models)
}

// startCaddy starts a fresh Caddy process with the bench Caddyfile (new
// ports each time) and waits until both sites answer.
func (h *harness) startCaddy() error {
	var ports [3]int
	for i := range ports {
		p, err := freePort()
		if err != nil {
			return err
		}
		ports[i] = p
	}
	h.admin = fmt.Sprintf("127.0.0.1:%d", ports[0])
	h.plainURL = fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	h.gwURL = fmt.Sprintf("http://127.0.0.1:%d", ports[2])
	h.cfgPath = filepath.Join(h.work, "Caddyfile")
	if err := os.WriteFile(h.cfgPath, []byte(h.caddyfile(ports[0], ports[1], ports[2])), 0o644); err != nil {
		return err
	}
	h.caddyN++
	logPath := filepath.Join(h.work, fmt.Sprintf("caddy-%d.log", h.caddyN))
	env := []string{"BENCH_MONGODB_URI=mongodb://" + h.proxy.addr() + "/", "HOME=" + h.caddyHome, "XDG_DATA_HOME=" + h.caddyHome, "XDG_CONFIG_HOME=" + h.caddyHome}
	var err error
	h.caddy, err = startChild("caddy", logPath, nil, env, h.cfg.Caddy, "run", "--config", h.cfgPath, "--adapter", "caddyfile")
	if err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		ok := true
		for _, u := range []string{h.plainURL + "/", h.gwURL + "/health"} {
			resp, err := http.Get(u)
			if err != nil {
				ok = false
				break
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		if ok {
			return nil
		}
		if h.caddy.exited() || time.Now().After(deadline) {
			return fmt.Errorf("caddy did not start:\n%s", tail(logPath, 30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// restartCaddy stops Caddy (its settlements drain on the way out) and
// starts a fresh process: the memory figures start from a new heap.
func (h *harness) restartCaddy() error {
	h.load.closeIdle()
	h.caddy.stop(60 * time.Second)
	return h.startCaddy()
}

func (h *harness) teardown() {
	if h.caddy != nil {
		h.caddy.stop(30 * time.Second)
	}
	if h.up != nil {
		h.up.stop(10 * time.Second)
	}
	if h.client != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = h.client.Disconnect(ctx)
		cancel()
		h.client = nil
	}
	if h.proxy != nil {
		h.proxy.close()
		h.proxy = nil
	}
	if h.ferret != nil {
		h.ferret.stop(20 * time.Second)
	}
	if h.pg != nil {
		h.pg.stop()
	}
}

// goMem returns Caddy's Go memory in use (HeapInuse + StackInuse) from the
// admin API's /debug/vars. With gc, Caddy collects garbage first (through
// /debug/pprof/heap?gc=1), so the figure is the live memory.
func (h *harness) goMem(gc bool) int64 {
	if gc {
		if resp, err := http.Get("http://" + h.admin + "/debug/pprof/heap?gc=1"); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
	resp, err := http.Get("http://" + h.admin + "/debug/vars")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var v struct {
		Memstats struct {
			HeapInuse  int64
			StackInuse int64
		} `json:"memstats"`
	}
	if json.NewDecoder(resp.Body).Decode(&v) != nil {
		return 0
	}
	return v.Memstats.HeapInuse + v.Memstats.StackInuse
}

// cpuSnap is the CPU time used so far by each measured process.
type cpuSnap struct {
	at                                  time.Time
	caddy, ferret, pg, upstream, harnes time.Duration
}

func (h *harness) snap() cpuSnap {
	s := cpuSnap{at: time.Now()}
	if h.caddy != nil && !h.caddy.exited() {
		s.caddy, _, _ = cpuTime(h.caddy.pid())
	}
	s.ferret, _, _ = cpuTime(h.ferret.pid())
	if h.pg != nil {
		s.pg = treeCPU(h.pg.pid())
	}
	s.upstream, _, _ = cpuTime(h.up.pid())
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		s.harnes = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	return s
}

// userBal is what the billing check reads of a bench user's document.
type userBal struct {
	credits, used float64 // creditsNew and creditsNewUsed, USD
	// heldNano is the creditsNew in the user's open holds and credit leases
	// (llmHolds): taken from the balance, not spent, so neither lost nor
	// charged.
	heldNano                int64
	holds, leases, receipts int
}

// balances reads the balance, the open holds and leases, and the receipts
// of every bench user.
func (h *harness) balances(ctx context.Context) (map[string]userBal, error) {
	ids := make(map[string]bool, len(h.users))
	list := make([]string, 0, len(h.users))
	for _, u := range h.users {
		ids[u.ID] = true
		list = append(list, u.ID)
	}
	filter := usersFilter(list)
	cur, err := h.db.Collection(seed.UsersCollection).Find(ctx, filter, options.Find().SetProjection(bson.D{
		{Key: "creditsNew", Value: 1}, {Key: "creditsNewUsed", Value: 1},
		{Key: mongostore.FieldHolds, Value: 1}, {Key: mongostore.FieldDoneCount, Value: 1},
	}))
	if err != nil {
		return nil, err
	}
	defer cur.Close(ctx)
	out := make(map[string]userBal, len(list))
	for cur.Next(ctx) {
		var id string
		raw := cur.Current
		_ = raw.Lookup("_id").Unmarshal(&id)
		if !ids[id] {
			continue
		}
		var b userBal
		b.credits, _ = seed.Float(raw.Lookup("creditsNew"))
		b.used, _ = seed.Float(raw.Lookup("creditsNewUsed"))
		if n, ok := seed.Float(raw.Lookup(mongostore.FieldDoneCount)); ok {
			b.receipts = int(n)
		}
		if doc, ok := raw.Lookup(mongostore.FieldHolds).DocumentOK(); ok {
			elems, err := doc.Elements()
			if err != nil {
				return nil, err
			}
			for _, e := range elems {
				packed, ok := e.Value().StringValueOK()
				if !ok {
					return nil, fmt.Errorf("user %s: %s.%s is not a packed hold", id, mongostore.FieldHolds, e.Key())
				}
				hd, err := mongostore.DecodeHold(packed)
				if err != nil {
					return nil, fmt.Errorf("user %s: %s.%s: %w", id, mongostore.FieldHolds, e.Key(), err)
				}
				if billing.IsLease(e.Key()) {
					b.leases++
				} else {
					b.holds++
				}
				for i, f := range hd.Plan.Fields() {
					if f == "creditsNew" {
						b.heldNano += int64(hd.Taken[i])
					}
				}
			}
		}
		out[id] = b
	}
	return out, cur.Err()
}

func (h *harness) meta() *meta {
	m := &meta{
		Date:      time.Now().UTC().Format(time.RFC3339),
		NumCPU:    nproc(),
		GoVersion: goVersion(),
		Kernel:    readTrim("/proc/sys/kernel/osrelease"),
		CPUModel:  cpuModel(),
		DBBackend: h.cfg.DB,
	}
	if out, err := exec.Command(h.cfg.Caddy, "version").Output(); err == nil {
		m.Caddy = strings.TrimSpace(string(out))
	}
	if h.pg != nil {
		m.PostgreSQL = h.pg.version
	}
	m.Modules = moduleVersions()
	if out, err := exec.Command("git", "-C", h.cfg.Repo, "describe", "--always", "--dirty", "--abbrev=12").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	return m
}
