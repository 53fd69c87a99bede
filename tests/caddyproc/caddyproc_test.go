package caddyproc

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	MaybeRunChild()
	os.Exit(m.Run())
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func get(url string) (string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// gone reports whether pid no longer exists (it has been reaped).
func gone(pid int) bool {
	return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}

// portFree reports whether addr can be listened on.
func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func TestKillRestartStop(t *testing.T) {
	// An upstream that sends one chunk and then holds the stream open,
	// for a kill in the middle of a response.
	hold := make(chan struct{})
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "first chunk\n")
		w.(http.Flusher).Flush()
		select {
		case <-hold:
		case <-r.Context().Done():
		}
	}))
	defer upstream.Close()
	defer close(hold)

	adminAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	siteAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	streamAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	siteURL := "http://" + siteAddr + "/"
	p := Start(t, Options{
		Caddyfile: fmt.Sprintf(`{
	admin %s
	persist_config off
	grace_period 2s
}

http://%s {
	respond "ok {env.GREETING}"
}

http://%s {
	reverse_proxy %s {
		flush_interval -1
	}
}
`, adminAddr, siteAddr, streamAddr, strings.TrimPrefix(upstream.URL, "http://")),
		Env:       []string{"GREETING=hello"},
		AdminAddr: adminAddr,
		ReadyURL:  siteURL,
	})
	if body, err := get(siteURL); err != nil || body != "ok hello" {
		t.Fatalf("GET %s = %q, %v; want \"ok hello\"", siteURL, body, err)
	}
	if _, err := get("http://" + adminAddr + "/config/"); err != nil {
		t.Errorf("admin endpoint: %v", err)
	}
	uuid := filepath.Join(p.Dir(), "data", "caddy", "instance.uuid")
	id1, err := os.ReadFile(uuid)
	if err != nil {
		t.Errorf("instance ID in the child's XDG_DATA_HOME: %v", err)
	}

	// Kill in the middle of a streamed response: the client sees the
	// stream break.
	resp, err := http.Get("http://" + streamAddr + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line := make([]byte, len("first chunk\n"))
	if _, err := io.ReadFull(resp.Body, line); err != nil {
		t.Fatalf("first chunk through caddy: %v", err)
	}
	pid := p.Pid()
	p.Kill()
	if p.Running() || !gone(pid) {
		t.Errorf("pid %d still exists after Kill", pid)
	}
	if rest, err := io.ReadAll(resp.Body); err == nil {
		t.Errorf("the stream ended cleanly (%q) after Kill; want an error", rest)
	} else {
		t.Logf("stream after Kill: %v", err)
	}
	for _, addr := range []string{siteAddr, adminAddr, streamAddr} {
		if !portFree(addr) {
			t.Errorf("%s still taken after Kill", addr)
		}
	}
	if _, err := get(siteURL); err == nil {
		t.Error("the site answers after Kill")
	}
	p.Kill() // a no-op once exited

	p.Restart(t)
	if p.Pid() == pid {
		t.Errorf("Restart kept pid %d", pid)
	}
	if body, err := get(siteURL); err != nil || body != "ok hello" {
		t.Fatalf("after Restart: GET %s = %q, %v", siteURL, body, err)
	}
	if id2, err := os.ReadFile(uuid); err != nil || string(id2) != string(id1) {
		t.Errorf("instance ID after Restart = %q, %v; want %q (same data directory)", id2, err, id1)
	}

	pid = p.Pid()
	p.Stop()
	if p.Running() || !gone(pid) {
		t.Errorf("pid %d still exists after Stop", pid)
	}
	if !portFree(siteAddr) {
		t.Errorf("%s still taken after Stop", siteAddr)
	}
	log, err := os.ReadFile(p.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	// Caddy logs these only on a graceful exit, after stopping its apps.
	for _, want := range []string{`"msg":"shutting down"`, `"msg":"shutdown complete"`} {
		if !strings.Contains(string(log), want) {
			t.Errorf("log %s lacks %s", p.LogPath(), want)
		}
	}
	if t.Failed() {
		t.Logf("log:\n%s", log)
	}
}

// TestTwoProcesses runs two children at once: different instance IDs.
func TestTwoProcesses(t *testing.T) {
	var ids []string
	for range 2 {
		admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		p := Start(t, Options{
			Caddyfile: fmt.Sprintf("{\n\tadmin %s\n}\n\nhttp://127.0.0.1:%d {\n\trespond ok\n}\n", admin, freePort(t)),
			AdminAddr: admin,
		})
		b, err := os.ReadFile(filepath.Join(p.Dir(), "data", "caddy", "instance.uuid"))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, string(b))
	}
	if ids[0] == ids[1] {
		t.Errorf("two processes share instance ID %s", ids[0])
	}
}

// TestStartFailure shows the log when Caddy refuses its config.
func TestStartFailure(t *testing.T) {
	ft := &fakeT{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Start(ft, Options{Caddyfile: "http://127.0.0.1:1 {\n\tno_such_directive\n}\n"})
	}()
	<-done
	if !ft.fatal {
		t.Fatal("Start with a bad Caddyfile did not fail")
	}
	if !strings.Contains(ft.msg, "no_such_directive") {
		t.Errorf("failure message does not show Caddy's error:\n%s", ft.msg)
	}
}

// fakeT records a Fatalf instead of failing the test.
type fakeT struct {
	testing.TB
	fatal bool
	msg   string
}

func (f *fakeT) Helper() {}

func (f *fakeT) Logf(string, ...any) {}

func (f *fakeT) Fatalf(format string, args ...any) {
	f.fatal, f.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}
