package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// usedKeys are the client keys the tests sent; none may appear in a log.
var usedKeys struct {
	sync.Mutex
	keys []string
}

func rememberKey(k string) {
	usedKeys.Lock()
	usedKeys.keys = append(usedKeys.keys, k)
	usedKeys.Unlock()
}

// checkNoSecretsLogged reads every line Caddy logged during the run (DEBUG
// level, access logs included) and fails if a client key, an upstream key
// of the database or the MongoDB URI is in it, or if the billing lines are
// missing.
func checkNoSecretsLogged() error {
	raw, err := os.ReadFile(logFile)
	if err != nil {
		return err
	}
	var errs []error
	usedKeys.Lock()
	none := len(usedKeys.keys) == 0
	usedKeys.Unlock()
	if none { // a -run filter that sent no key: nothing to look for
		return nil
	}
	if !bytes.Contains(raw, []byte(`"msg":"billed"`)) {
		errs = append(errs, errors.New(`no "billed" log line`))
	}
	if !bytes.Contains(raw, []byte(`"logger":"http.log.access`)) {
		errs = append(errs, errors.New("no access log line: the check would prove nothing"))
	}
	secrets := map[string]string{"upstream key": env.UpstreamKey, "MongoDB URI": env.MongoURI}
	pool, err := poolKeys(context.Background())
	if err != nil {
		errs = append(errs, fmt.Errorf("reading the pool keys: %w", err))
	}
	for i, k := range pool {
		secrets[fmt.Sprintf("pool key %d", i)] = k
	}
	usedKeys.Lock()
	for i, k := range usedKeys.keys {
		secrets[fmt.Sprintf("client key %d", i)] = k
	}
	n := len(usedKeys.keys)
	usedKeys.Unlock()
	for what, s := range secrets {
		for _, line := range bytes.Split(raw, []byte("\n")) {
			if bytes.Contains(line, []byte(s)) {
				shown := bytes.ReplaceAll(line, []byte(s), []byte("<"+what+">"))
				errs = append(errs, fmt.Errorf("the %s appears in a Caddy log line: %s", what, shown))
				break
			}
		}
	}
	fmt.Fprintf(os.Stderr, "log check: %d bytes of Caddy logs, %d client keys, %d pool keys, none logged\n", len(raw), n, len(pool))
	return errors.Join(errs...)
}

// keyFreeLogSnippet returns the key_free_log snippet of Caddyfile.example,
// so that the tests run with exactly the log filters production uses.
func keyFreeLogSnippet() string { return exampleSnippet("key_free_log") }

// exampleSnippet returns the snippet (name) of Caddyfile.example, as it is
// there.
func exampleSnippet(name string) string {
	raw, err := os.ReadFile(filepath.Join("..", "..", "Caddyfile.example"))
	if err != nil {
		panic(err)
	}
	s := string(raw)
	start := strings.Index(s, "\n("+name+") {\n")
	if start < 0 {
		panic("Caddyfile.example has no (" + name + ") snippet")
	}
	end := strings.Index(s[start:], "\n}\n")
	if end < 0 {
		panic("Caddyfile.example: the (" + name + ") snippet does not end")
	}
	return s[start+1:start+end+3] + "\n"
}

// poolKeys returns every upstream key of the database: the pool and its
// spares.
func poolKeys(ctx context.Context) ([]string, error) {
	var keys []string
	for _, coll := range []string{"openhands_keys", "openhands_backup_keys"} {
		cur, err := db.Collection(coll).Find(ctx, bson.M{})
		if err != nil {
			return nil, err
		}
		var docs []struct {
			APIKey string `bson:"apiKey"`
		}
		if err := cur.All(ctx, &docs); err != nil {
			return nil, err
		}
		for _, d := range docs {
			if d.APIKey != "" {
				keys = append(keys, d.APIKey)
			}
		}
	}
	return keys, nil
}

// A real run logs no key: user keys sent in Authorization, in x-api-key and
// in the query (of billed, refused and failed requests), an unknown key, the
// upstream pool keys and the MongoDB URI appear in no line of the access
// log, the error log (http.log.error carries the request's headers and URI)
// or any other Caddy log line, while the lines themselves are there.
func TestLogsCarryNoKey(t *testing.T) {
	fi, err := os.Stat(logFile)
	require.NoError(t, err)
	offset := fi.Size()
	testID := uniq(t, "logs")
	_, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
	unknown := "sk-trollllm-" + randHex(64) // not in the database: a 401
	rememberKey(unknown)

	type request struct {
		path   string
		auth   string // the Bearer key
		hdr    map[string]string
		body   []byte
		status int
	}
	h := func(kv ...string) map[string]string {
		m := map[string]string{"X-Test-Id": testID}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	q := "?beta=true&key=" + key + "&api_key=" + key + "&" + key
	requests := []request{
		{"/v1/chat/completions" + q, key, h(), validBody("claude-sonnet-4-5")(), 200},
		{"/v1/messages" + q, "", h("X-Api-Key", key), validBody("claude-sonnet-4-5")(), 200},
		{"/v1/messages", "", h("X-Api-Key", unknown), validBody("claude-sonnet-4-5")(), 401},
		{"/v1/messages?key=" + unknown, unknown, h(), validBody("claude-sonnet-4-5")(), 401},
		{"/" + key + "/v1/models", "", h("X-Api-Key", key), nil, 404},
		// Cut mid-stream after the answer started: reverse_proxy logs the
		// proxied request (the pool key in Authorization, the URI) at WARN.
		{"/v1/messages" + q, "", h("X-Api-Key", key, "X-Standin-Fixture", "ant-text", "X-Standin-Cut-After", "3"),
			streamBody("claude-sonnet-4-5"), 200},
		// A handler error: Caddy's error log (http.log.error) writes the
		// request as it arrived, headers and URI.
		{"/e2e-error" + q, key, h("X-Api-Key", key), nil, 500},
	}
	for _, r := range requests {
		resp := post(t, chatURL+r.path, r.auth, r.body, r.hdr)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		assert.Equal(t, r.status, resp.StatusCode, "%s", r.path)
	}

	// The lines of this test: every request's access line and the error line.
	var access, errorLines, proxyLines int
	var lines [][]byte
	deadline := time.Now().Add(10 * time.Second)
	for {
		raw, err := os.ReadFile(logFile)
		require.NoError(t, err)
		lines = bytes.Split(raw[offset:], []byte("\n"))
		access, errorLines, proxyLines = 0, 0, 0
		for _, l := range lines {
			if !bytes.Contains(l, []byte(testID)) {
				continue
			}
			switch {
			case bytes.Contains(l, []byte(`"logger":"http.log.access`)):
				access++
			case bytes.Contains(l, []byte(`"logger":"http.log.error`)):
				errorLines++
			case bytes.Contains(l, []byte(`"logger":"http.handlers.reverse_proxy`)):
				proxyLines++
			}
		}
		if (access >= len(requests) && errorLines >= 1 && proxyLines >= 1) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	require.GreaterOrEqual(t, access, len(requests), "access log lines of this test: the check would prove nothing")
	require.GreaterOrEqual(t, errorLines, 1, "no http.log.error line: the check would prove nothing")
	require.GreaterOrEqual(t, proxyLines, 1, "no reverse_proxy line with the request: the check would prove nothing")

	secrets := map[string]string{"the user key": key, "the unknown key": unknown, "the MongoDB URI": env.MongoURI}
	pool, err := poolKeys(context.Background())
	require.NoError(t, err)
	for i, k := range pool {
		secrets[fmt.Sprintf("pool key %d", i)] = k
	}
	require.Greater(t, len(secrets), 3, "no pool key in the database")
	for what, s := range secrets {
		var loggers []string
		var sample []byte
		for _, l := range lines {
			if !bytes.Contains(l, []byte(s)) {
				continue
			}
			var line struct{ Logger string }
			_ = json.Unmarshal(l, &line)
			if !slices.Contains(loggers, line.Logger) {
				loggers = append(loggers, line.Logger)
			}
			if sample == nil {
				sample = bytes.ReplaceAll(l, []byte(s), []byte("<"+what+">"))
			}
		}
		if loggers != nil {
			t.Errorf("%s appears in lines of the loggers %q, e.g. %s", what, loggers, sample)
		}
	}
	// The filters ran (and are not just a log that lacks the fields).
	var uris int
	for _, l := range lines {
		if bytes.Contains(l, []byte(testID)) && bytes.Contains(l, []byte(`?beta=REDACTED&key=REDACTED`)) {
			uris++
		}
	}
	assert.Positive(t, uris, "no filtered request URI in the log")
}
