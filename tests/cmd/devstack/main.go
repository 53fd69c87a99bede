// Command devstack runs the gateway locally with everything embedded: a
// MongoDB-compatible store (FerretDB on SQLite) seeded with demo users, a
// stand-in for the OpenHands upstream, and Caddy with the llm_billing
// modules serving chat (bills creditsNew) and chat2 (bills credits, then
// refCredits) on localhost.
//
//	(cd tests && go run ./cmd/devstack)
//
// Flags choose the ports, the Caddy admin address and the data folder (which
// also holds the settlement journal); a taken address fails at once. Each
// billed request prints one line. Ctrl-C stops everything.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/trollllm/caddy-llm-billing/caddymodule"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/stack"
)

func main() {
	chatPort := flag.Int("chat", 8081, "port of the chat site (bills creditsNew)")
	chat2Port := flag.Int("chat2", 8082, "port of the chat2 site (bills credits, then refCredits)")
	upstream := flag.String("upstream", "127.0.0.1:8090", "listen address of the stand-in upstream")
	dataDir := flag.String("data", "", "folder for the embedded database and the settlement journal (default: a fresh temporary folder)")
	admin := flag.String("admin", "", "Caddy admin address (default: a free port on 127.0.0.1)")
	flag.Parse()

	if err := run(*chatPort, *chat2Port, *upstream, *admin, *dataDir); err != nil {
		// Plain text on stderr: Caddy redirects the log package to its JSON logger.
		fmt.Fprintln(os.Stderr, "devstack:", err)
		os.Exit(1)
	}
}

func run(chatPort, chat2Port int, upstream, admin, dataDir string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if admin == "" {
		a, err := freeAddr()
		if err != nil {
			return err
		}
		admin = a
	}
	for _, c := range []struct{ addr, flag string }{
		{admin, "admin"}, {upstream, "upstream"},
		{fmt.Sprintf("127.0.0.1:%d", chatPort), "chat"}, {fmt.Sprintf("127.0.0.1:%d", chat2Port), "chat2"},
	} {
		if err := checkFree(c.addr, c.flag); err != nil {
			return err
		}
	}

	fresh := dataDir == ""
	if fresh {
		d, err := os.MkdirTemp("", "llm-billing-devstack-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dataDir = d
	} else if err := os.MkdirAll(dataDir, 0o750); err != nil {
		return err
	}
	st, err := stack.Start(ctx, stack.StackOptions{Dir: dataDir, UpstreamAddr: upstream, NoSeed: !fresh && seeded(dataDir)})
	if err != nil {
		return fmt.Errorf("starting the embedded database and stand-in upstream: %w", err)
	}
	defer st.Close()
	_ = os.WriteFile(filepath.Join(dataDir, ".seeded"), nil, 0o600)

	examples := examplesDir()
	cf := fmt.Sprintf(`{
	admin %s
	persist_config off
	llm_billing {
		mongodb_uri %s
		database %s
		spool_dir %s
	}
}

http://localhost:%d {
	bind 127.0.0.1
	llm_billing {
		credit_field creditsNew
		models %s
		forward_headers X-Test-Id X-Standin-*
	}
	reverse_proxy %s
}

http://localhost:%d {
	bind 127.0.0.1
	llm_billing {
		credit_field credits refCredits
		models %s
		forward_headers X-Test-Id X-Standin-*
	}
	reverse_proxy %s
}
`, admin, st.MongoURI, st.Database, filepath.Join(dataDir, "spool"), chatPort, filepath.Join(examples, "models-chat.json"), st.UpstreamURL,
		chat2Port, filepath.Join(examples, "models-chat2.json"), st.UpstreamURL)
	raw, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
	if err != nil {
		return err
	}
	if err := caddy.Load(raw, true); err != nil {
		return fmt.Errorf("starting caddy: %w", err)
	}
	defer func() { _ = caddy.Stop() }()

	fmt.Printf(`
llm_billing dev stack is up (Ctrl-C stops it).

  chat   http://localhost:%[1]d   bills creditsNew
  chat2  http://localhost:%[2]d   bills credits, then refCredits
  MongoDB-compatible store: %[3]s (database %[4]s)

Demo keys:
  %[5]s   user %[6]s: creditsNew 10, credits 5, refCredits 2 (usersNew.apiKey)
  %[7]s                  user %[8]s: creditsNew 3, credits 1, refCredits 1 (user_keys)

Try:
  curl -s http://localhost:%[1]d/v1/messages -H 'x-api-key: %[5]s' -H 'content-type: application/json' \
    -d '{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{"role":"user","content":"Hello"}]}'
  curl -sN http://localhost:%[2]d/v1/chat/completions -H 'Authorization: Bearer %[5]s' -H 'content-type: application/json' \
    -d '{"model":"claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"Hello"}]}'

The stand-in upstream answers with canned recordings: their model name, text and
token counts do not match the request. Every billed request prints a line below
(site, model, tokens, cost, pool, and what the user has left in that pool).
Balances are in usersNew and the logs in request_logs.
  Caddy admin: http://%[9]s   settlement journal: %[10]s

`, chatPort, chat2Port, st.MongoURI, st.Database,
		seed.DemoUserKey, seed.DemoUser, seed.DemoAdminKey, seed.DemoAdminKeyUser, admin, filepath.Join(dataDir, "spool"))

	go followLogs(ctx, st.DB, os.Stdout, map[string]string{"creditsNew": "chat", "credits+refCredits": "chat2"},
		time.Now(), 300*time.Millisecond)

	<-ctx.Done()
	fmt.Println("\nstopping")
	return nil
}

func seeded(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, ".seeded"))
	return err == nil
}

// examplesDir finds the repository's examples folder from this source file
// or the working directory.
func examplesDir() string {
	if _, file, _, ok := runtime.Caller(0); ok {
		d := filepath.Join(filepath.Dir(file), "..", "..", "..", "examples")
		if _, err := os.Stat(d); err == nil {
			return d
		}
	}
	for _, d := range []string{"examples", "../examples"} {
		if _, err := os.Stat(d); err == nil {
			abs, _ := filepath.Abs(d)
			return abs
		}
	}
	return "examples"
}
