// Package e2e runs the gateway end to end: a real Caddy (in-process) with the
// llm_billing modules, a real MongoDB wire-protocol database (embedded
// FerretDB), the stand-in OpenHands upstream, and the official SDK clients.
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"go.mongodb.org/mongo-driver/v2/mongo"

	_ "github.com/trollllm/caddy-llm-billing/caddymodule"
	"github.com/trollllm/caddy-llm-billing/tests/stack"
)

var (
	env      *stack.Stack
	chatURL  string // bills creditsNew
	chat2URL string // bills credits then refCredits; 1 MiB body limit
	deadURL  string // bills creditsNew; its upstream refuses connections
	prioURL  string // the priority line: bills creditsNew, admin and priority roles, ×0.4 on glm-4.6
	db       *mongo.Database
	logFile  string // every Caddy log line of the run
	ports    [4]int
	deadPort int    // nothing listens there
	adminURL string // Caddy's admin API
)

const chat2BodyLimit = 1 << 20

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "llm-billing-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	env, err = stack.Start(ctx, stack.StackOptions{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting the test stack:", err)
		return 1
	}
	defer env.Close()
	db = env.DB
	logFile = filepath.Join(dir, "caddy.log")

	ports = [4]int{freePort(), freePort(), freePort(), freePort()}
	deadPort = freePort()
	adminPort := freePort()
	adminURL = fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	chatURL = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	chat2URL = fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	deadURL = fmt.Sprintf("http://127.0.0.1:%d", ports[2])
	prioURL = fmt.Sprintf("http://127.0.0.1:%d", ports[3])
	if err := loadCaddy(caddyfile(configOpts{})); err != nil {
		fmt.Fprintln(os.Stderr, "starting caddy:", err)
		return 1
	}
	code := m.Run()
	if err := caddy.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stopping caddy:", err)
		code = 1
	}
	if code == 0 {
		if err := checkNoSecretsLogged(); err != nil {
			fmt.Fprintln(os.Stderr, "log check:", err)
			code = 1
		}
	}
	return code
}

func examples(name string) string {
	p, err := filepath.Abs(filepath.Join("..", "..", "examples", name))
	if err != nil {
		panic(err)
	}
	return p
}

// configOpts are the knobs the reload test turns.
type configOpts struct {
	staticKeys    bool   // upstream_keys instead of openhands_keys
	cacheTTL      string // key_cache_ttl
	database      string // instead of the stack's
	appExtra      string // more lines for the llm_billing global option
	headerTimeout string // reverse_proxy response_header_timeout on chat
	extra         string // appended: more snippets and sites
}

func caddyfile(o configOpts) string {
	ttl := o.cacheTTL
	if ttl == "" {
		ttl = "2s"
	}
	database := env.Database
	if o.database != "" {
		database = o.database
	}
	keys := o.appExtra
	if os.Getenv("LLM_BILLING_TEST_CREDIT_LEASE") == "on" && !strings.Contains(keys, "credit_lease") {
		// The suite again with credit leases (scripts/test.sh runs the
		// integrity tests this way too).
		keys += "\n\t\tcredit_lease on"
	}
	if o.staticKeys {
		keys += "\n\t\tupstream_keys " + env.UpstreamKey
	}
	proxyOpts := ""
	if o.headerTimeout != "" {
		proxyOpts = " {\n\t\ttransport http {\n\t\t\tresponse_header_timeout " + o.headerTimeout + "\n\t\t}\n\t}"
	}
	// The log filters of Caddyfile.example, as they are there.
	return keyFreeLogSnippet() + fmt.Sprintf(`{
	admin %[13]s
	persist_config off
	grace_period 10s
	servers {
		timeouts {
			read_header %[17]s
		}
	}
	log {
		output file %[1]s
		level DEBUG
		import key_free_log
	}
	llm_billing {
		mongodb_uri %[2]s
		database %[3]s
		key_cache_ttl %[4]s%[5]s
	}
}

http://127.0.0.1:%[6]d {
	log {
		output file %[1]s
		import key_free_log
	}
	# A handler error, which Caddy logs with the request (TestLogsCarryNoKey).
	error /e2e-error "handler error for the log check" 500
	llm_billing {
		credit_field creditsNew
		models %[7]s
		forward_headers X-Test-Id X-Standin-*
	}
	reverse_proxy %[8]s%[14]s
}

http://127.0.0.1:%[9]d {
	log {
		output file %[1]s
		import key_free_log
	}
	llm_billing {
		credit_field credits refCredits
		models %[10]s
		forward_headers X-Test-Id X-Standin-*
		max_body_size 1MiB
		client_disconnect stop
	}
	reverse_proxy %[8]s
}

http://127.0.0.1:%[11]d {
	llm_billing {
		credit_field creditsNew
		models %[7]s
		forward_headers X-Test-Id X-Standin-*
	}
	reverse_proxy 127.0.0.1:%[12]d
}

http://127.0.0.1:%[15]d {
	llm_billing {
		credit_field creditsNew
		models %[16]s
		forward_headers X-Test-Id X-Standin-*
		allow_roles admin priority
		price_factor 0.4 {
			upstream_models glm-4.6* glm4-6*
			except_models *haiku*
		}
	}
	reverse_proxy %[8]s
}
`, logFile, env.MongoURI, database, ttl, keys,
		ports[0], examples("models-chat.json"), env.UpstreamURL,
		ports[1], examples("models-chat2.json"),
		ports[2], deadPort, strings.TrimPrefix(adminURL, "http://"), proxyOpts,
		ports[3], examples("models-priority.json"), readHeaderTimeout) + o.extra
}

// readHeaderTimeout is the servers' read_header timeout: a client that has
// not sent its request's headers by then is disconnected (slow-loris).
const readHeaderTimeout = 3 * time.Second

// loadCaddy adapts a Caddyfile and runs it in this process, as `caddy run`
// would.
func loadCaddy(cf string) error {
	raw, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
	if err != nil {
		return err
	}
	for _, w := range warnings {
		fmt.Fprintln(os.Stderr, "caddyfile warning:", w)
	}
	return caddy.Load(raw, true)
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// uniq returns a name unique to this test run, so tests never share users.
func uniq(t *testing.T, prefix string) string {
	return fmt.Sprintf("%s-%s-%d", prefix, strings.ReplaceAll(t.Name(), "/", "-"), time.Now().UnixNano())
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}
