package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// goroutineAllowance is how many new goroutines, beyond the excluded
// infrastructure ones, a test may leave behind (timers and runtime helpers
// that end on their own a little later).
const goroutineAllowance = 2

// leakWait is how long noLeaks waits for goroutines and descriptors to go.
const leakWait = 5 * time.Second

// noLeaks records the test process's goroutines and open file descriptors
// and, when t ends, checks that the test left none behind: goroutines that
// did not exist at the start (test infrastructure and idle keep-alive
// connections excluded) may number at most goroutineAllowance, and the
// descriptors (regular files outside the stack's directory, pipes, and
// sockets that are not connections to the stack's own listeners: FerretDB,
// its relay, the stand-in) may not grow. Idle connections of http.DefaultClient and of clients are closed
// first. On failure it writes a goroutine dump to a file in os.TempDir()
// and names it.
func noLeaks(t *testing.T, clients ...*http.Client) {
	t.Helper()
	closeIdle(clients)
	start := goroutineIDs(allStacks())
	fds0 := openFDs()
	t.Cleanup(func() {
		var leaked []string
		var fds fdCount
		deadline := time.Now().Add(leakWait)
		for {
			closeIdle(clients)
			leaked = newGoroutines(allStacks(), start)
			fds = openFDs()
			if len(leaked) <= goroutineAllowance && !fds.grewFrom(fds0) {
				return
			}
			if time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		dump := writeDump(t, allStacks())
		if len(leaked) > goroutineAllowance {
			t.Errorf("%d goroutines leaked (allowance %d); dump in %s; first:\n%s",
				len(leaked), goroutineAllowance, dump, leaked[0])
		}
		if fds.grewFrom(fds0) {
			t.Errorf("file descriptors leaked: %+v at the start, %+v at the end; goroutine dump in %s", fds0, fds, dump)
		}
	})
}

func closeIdle(clients []*http.Client) {
	http.DefaultClient.CloseIdleConnections()
	for _, c := range clients {
		c.CloseIdleConnections()
	}
}

func allStacks() []byte {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return buf[:n]
		}
		buf = make([]byte, 2*len(buf))
	}
}

var goroutineHeader = regexp.MustCompile(`^goroutine (\d+) `)

// splitStacks returns the dump's goroutines by id.
func splitStacks(dump []byte) map[int]string {
	out := make(map[int]string)
	for _, g := range bytes.Split(dump, []byte("\n\n")) {
		if m := goroutineHeader.FindSubmatch(g); m != nil {
			id, _ := strconv.Atoi(string(m[1]))
			out[id] = string(g)
		}
	}
	return out
}

func goroutineIDs(dump []byte) map[int]bool {
	ids := make(map[int]bool)
	for id := range splitStacks(dump) {
		ids[id] = true
	}
	return ids
}

// infraGoroutine reports whether a goroutine belongs to the test
// infrastructure, or is an idle keep-alive connection (a leaked connection
// shows as a socket in the descriptor check instead).
func infraGoroutine(stack string) bool {
	for _, s := range []string{
		"github.com/FerretDB/",
		"go.mongodb.org/mongo-driver",
		"caddy-llm-billing/tests/testdb",
		"caddy-llm-billing/tests/standin",
		"caddy-llm-billing/tests/e2e.noLeaks", // this check itself
		"testing.(*T).Run",
		"testing.tRunner.func",
		"runtime.Stack",
	} {
		if strings.Contains(stack, s) {
			return true
		}
	}
	switch {
	case strings.Contains(stack, "net/http.(*persistConn).writeLoop"):
		return true
	case strings.Contains(stack, "net/http.(*persistConn).readLoop"):
		return strings.Contains(stack, "bufio.(*Reader).Peek") // idle, not a body left unread
	case strings.Contains(stack, "net/http.(*conn).serve"):
		// Idle server side: waiting for a request, or for the next one on
		// a keep-alive connection.
		return strings.Contains(stack, "net/http.(*conn).readRequest") || strings.Contains(stack, "bufio.(*Reader).Peek")
	}
	return false
}

// newGoroutines returns the stacks of goroutines not in start, infrastructure
// excluded.
func newGoroutines(dump []byte, start map[int]bool) []string {
	var out []string
	for id, g := range splitStacks(dump) {
		if !start[id] && !infraGoroutine(g) {
			out = append(out, g)
		}
	}
	return out
}

// fdCount counts the process's open descriptors by kind.
type fdCount struct {
	Files, Pipes, Sockets, Other int
}

func (c fdCount) grewFrom(start fdCount) bool {
	// Pipes are counted but not compared: the first test of a run sees
	// the stack open four (lazily, not per request), and no code under
	// test opens pipes.
	return c.Files > start.Files || c.Sockets > start.Sockets || c.Other > start.Other
}

// openFDs counts /proc/self/fd. Sockets that are connections to or from
// a listener of the test stack (not of Caddy's sites) are not counted:
// their pools grow and shrink on their own.
func openFDs() fdCount {
	var c fdCount
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		panic(fmt.Sprintf("noLeaks needs /proc/self/fd: %v", err))
	}
	infra := infraSockets()
	stackDir := filepath.Dir(logFile) + string(filepath.Separator)
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil {
			continue // closed while reading, e.g. ReadDir's own descriptor
		}
		switch {
		case strings.HasPrefix(target, "socket:["):
			if !infra[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] {
				c.Sockets++
			}
		case strings.HasPrefix(target, "pipe:["):
			c.Pipes++
		case strings.HasPrefix(target, stackDir):
			// FerretDB's SQLite files and Caddy's log: opened per
			// database connection, or once.
		case strings.HasPrefix(target, "/"):
			c.Files++
		default:
			c.Other++ // anon_inode: epoll, eventfd...
		}
	}
	return c
}

// infraSockets returns the inodes of TCP sockets that listen on, or connect
// to, a port of the test stack: every listening port of the process except
// the gateway's own (its sites and the admin API).
func infraSockets() map[string]bool {
	type sock struct{ local, remote, inode string }
	var socks []sock
	listening := make(map[string]bool)
	for _, f := range []string{"/proc/self/net/tcp", "/proc/self/net/tcp6"} {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(data))
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 {
				continue
			}
			s := sock{port(fs[1]), port(fs[2]), fs[9]}
			socks = append(socks, s)
			if fs[3] == "0A" { // LISTEN
				listening[s.local] = true
			}
		}
	}
	for _, p := range gatewayPorts() {
		delete(listening, p)
	}
	infra := make(map[string]bool)
	for _, s := range socks {
		if listening[s.local] || listening[s.remote] {
			infra[s.inode] = true
		}
	}
	return infra
}

// port returns the hex port of a /proc/net/tcp address "ADDR:PORT".
func port(addr string) string {
	return addr[strings.LastIndexByte(addr, ':')+1:]
}

func gatewayPorts() []string {
	out := []string{fmt.Sprintf("%04X", deadPort)}
	for _, p := range ports {
		out = append(out, fmt.Sprintf("%04X", p))
	}
	if i := strings.LastIndexByte(adminURL, ':'); i >= 0 {
		if p, err := strconv.Atoi(adminURL[i+1:]); err == nil {
			out = append(out, fmt.Sprintf("%04X", p))
		}
	}
	return out
}

// writeDump writes dump to a new file in os.TempDir() and returns its path.
func writeDump(t *testing.T, dump []byte) string {
	f, err := os.CreateTemp("", "noleaks-"+strings.ReplaceAll(t.Name(), "/", "_")+"-*.txt")
	if err != nil {
		return "(not written: " + err.Error() + ")"
	}
	defer f.Close()
	if _, err := f.Write(dump); err != nil {
		return "(not written: " + err.Error() + ")"
	}
	return f.Name()
}
