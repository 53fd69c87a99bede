package testdb

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// relay owns the database's address and pipes every client connection to
// the FerretDB instance of the moment, so that it can cut them all at once
// (FerretDB cannot, see [DB]).
type relay struct {
	ln      net.Listener
	backend string // FerretDB's host:port

	mu     sync.Mutex
	conns  map[net.Conn]struct{} // both ends of every pipe
	closed bool
	wg     sync.WaitGroup // the accept loop and the pipes
}

// serveRelay accepts connections on ln and pipes each to backend.
func serveRelay(ln net.Listener, backend string) *relay {
	r := &relay{ln: ln, backend: backend, conns: make(map[net.Conn]struct{})}
	r.wg.Add(1)
	go r.accept()
	return r
}

func (r *relay) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(20 * time.Millisecond) // EMFILE and the like
			continue
		}
		if !r.track(c, true) {
			reset(c)
			continue
		}
		go r.pipe(c)
	}
}

// track adds c to the connections to cut, and one pipe to wait for if
// pipe, unless the relay has been cut.
func (r *relay) track(c net.Conn, pipe bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	r.conns[c] = struct{}{}
	if pipe {
		r.wg.Add(1)
	}
	return true
}

func (r *relay) untrack(c net.Conn) {
	r.mu.Lock()
	delete(r.conns, c)
	r.mu.Unlock()
}

// pipe copies between client and a new connection to the backend until
// either side closes, then closes both. A MongoDB connection has no use
// for half-closed states.
func (r *relay) pipe(client net.Conn) {
	defer r.wg.Done()
	defer r.untrack(client)
	server, err := net.DialTimeout("tcp", r.backend, 5*time.Second)
	if err != nil {
		reset(client)
		return
	}
	if !r.track(server, false) {
		reset(server)
		reset(client)
		return
	}
	defer r.untrack(server)
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(server, client); done <- struct{}{} }()
	go func() { _, _ = io.Copy(client, server); done <- struct{}{} }()
	<-done
	_ = client.Close()
	_ = server.Close()
	<-done
}

// cut closes the listener, resets every connection and waits until the
// pipes have ended.
func (r *relay) cut() {
	r.mu.Lock()
	r.closed = true
	_ = r.ln.Close()
	for c := range r.conns {
		reset(c)
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// reset closes c with an RST rather than a FIN: the peer's next read or
// write fails at once with "connection reset by peer", and no TIME_WAIT
// is left on the database's port.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// listenFree listens on a free port of 127.0.0.1. It prefers ports the
// kernel never hands out by itself (above, else below, the ephemeral range
// of /proc/sys/net/ipv4/ip_local_port_range): while the database is
// stopped, a listener on port 0 or an outgoing connection of some other
// test could otherwise be given the port and keep Restart from binding it.
// Without that file (not Linux) it takes any free port.
func listenFree() (net.Listener, error) {
	if lo, hi, ok := localPortRange(); ok {
		first, last := hi+1, 65535
		if first > last {
			first, last = max(1024, lo-10000), lo-1
		}
		for i := 0; i < 64 && first <= last; i++ {
			port := first + rand.IntN(last-first+1)
			ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err == nil {
				return ln, nil
			}
		}
	}
	return net.Listen("tcp", "127.0.0.1:0")
}

// localPortRange reads the kernel's ephemeral port range.
func localPortRange() (lo, hi int, ok bool) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0, false
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, 0, false
	}
	lo, err1 := strconv.Atoi(f[0])
	hi, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || lo < 1 || hi < lo || hi > 65535 {
		return 0, 0, false
	}
	return lo, hi, true
}

// rebindWait is how long listenAgain retries a port in use (a variable
// for the tests).
var rebindWait = 10 * time.Second

// listenAgain listens on addr, retrying for up to rebindWait (or until ctx
// ends) while the port is in use. Go sets SO_REUSEADDR on listeners, so
// connections of the previous run in TIME_WAIT do not count; a listener or
// a connection of another process that took the port does.
func listenAgain(ctx context.Context, addr string) (net.Listener, error) {
	deadline := time.Now().Add(rebindWait)
	for {
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			return ln, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return nil, fmt.Errorf("testdb: listen again on %s: %w", addr, err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("testdb: listen again on %s: %w (%w)", addr, err, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
