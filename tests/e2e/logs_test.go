package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"
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
// level, access logs included) and fails if a client key, the upstream key
// or the MongoDB URI is in it, or if the billing lines are missing.
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
	fmt.Fprintf(os.Stderr, "log check: %d bytes of Caddy logs, %d client keys, none logged\n", len(raw), n)
	return errors.Join(errs...)
}
