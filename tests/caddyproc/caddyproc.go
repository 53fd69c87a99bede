// Package caddyproc runs real Caddy processes from a test, with the
// llm_billing modules and Caddy's standard modules, without xcaddy or a
// separate build: the test binary re-executes itself as Caddy.
//
// A test package that uses it calls [MaybeRunChild] first thing in its
// TestMain:
//
//	func TestMain(m *testing.M) {
//		caddyproc.MaybeRunChild() // in a child, runs Caddy and never returns
//		os.Exit(m.Run())
//	}
//
// and then, in a test:
//
//	p := caddyproc.Start(t, caddyproc.Options{
//		Caddyfile: cf,                                  // with `admin 127.0.0.1:<port>`
//		Env:       []string{"MONGODB_URI=" + db.URI()}, // read by {env.MONGODB_URI}
//		AdminAddr: "127.0.0.1:<port>",
//		ReadyURL:  "http://127.0.0.1:<site port>/",
//	})
//	p.Kill()      // SIGKILL, as a crash
//	p.Restart(t)  // same config, same data directories
//	p.Stop()      // SIGINT: Caddy stops its apps and runs module cleanups
//
// Each [Proc] has its own HOME, XDG_DATA_HOME and XDG_CONFIG_HOME under
// t.TempDir(), so two processes have different instance IDs and storage,
// and a restarted one keeps its own. The child runs in the test's working
// directory, so relative paths in the Caddyfile resolve as in the test.
// Its standard output and error (Caddy's default log) are appended to
// [Proc.LogPath]. Children are killed in t.Cleanup and, on Linux, when the
// test process dies.
//
// If the test binary was built with -race, so is the child: a data race
// in it makes it exit with status 66, which [Proc.Stop] reports.
package caddyproc

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/trollllm/caddy-llm-billing/caddymodule"
)

// The environment that makes the test binary a Caddy child: envChild=1 and
// the command line (without the program name) as a JSON array in envArgs.
const (
	envChild = "CADDYPROC_CHILD"
	envArgs  = "CADDYPROC_ARGS"
)

// MaybeRunChild turns the process into Caddy if it was started by [Start]
// (CADDYPROC_CHILD=1): it runs Caddy's own command line,
// `caddy run --config <file> --adapter caddyfile ...`, and never returns.
// Otherwise it returns at once. Call it at the very top of TestMain, before
// anything parses flags or starts tests.
func MaybeRunChild() {
	if os.Getenv(envChild) != "1" {
		return
	}
	var args []string
	if err := json.Unmarshal([]byte(os.Getenv(envArgs)), &args); err != nil {
		fmt.Fprintf(os.Stderr, "caddyproc: bad %s: %v\n", envArgs, err)
		os.Exit(1)
	}
	os.Args = append([]string{os.Args[0]}, args...)
	caddycmd.Main()
	os.Exit(0) // `caddy run` does not return; other commands might
}

// Options configures a Caddy child.
type Options struct {
	// Caddyfile is the configuration; Start writes it to a file and runs
	// `caddy run --config <file> --adapter caddyfile`.
	Caddyfile string
	// Env holds extra KEY=value entries for the child's environment, which
	// is otherwise the test process's with HOME, XDG_DATA_HOME,
	// XDG_CONFIG_HOME and XDG_CACHE_HOME pointing into the Proc's own
	// directory. An entry here overrides one of those.
	Env []string
	// AdminAddr is the admin endpoint the Caddyfile sets, for example
	// "127.0.0.1:2999" (Caddy's default, localhost:2019, is shared by every
	// process: set one per child). If ReadyURL is empty, its /config/ is
	// polled instead.
	AdminAddr string
	// ReadyURL is polled with GET once Caddy reports that its config is
	// loaded, until it answers with any HTTP status.
	ReadyURL string
	// LogPath receives the child's standard output and error, appended
	// across restarts. Empty means caddy.log in the Proc's directory.
	LogPath string
	// StartTimeout bounds each start; zero means a minute.
	StartTimeout time.Duration
	// StopTimeout is how long Stop waits for a graceful exit before it
	// kills the process; zero means a minute. Caddy waits for open
	// connections unless the Caddyfile sets a grace_period.
	StopTimeout time.Duration
}

// Proc is a Caddy child process. Its methods are safe for concurrent use.
type Proc struct {
	opts    Options
	exe     string
	dir     string
	cfgPath string
	logPath string

	mu  sync.Mutex
	t   testing.TB // of the last Start or Restart
	cur *run       // the last process started
}

// run is one process.
type run struct {
	cmd      *exec.Cmd
	exited   chan struct{} // closed once cmd has been waited for
	pingback net.Listener
	token    []byte
}

// Start starts Caddy with opts and waits until it has loaded its config
// (Caddy's --pingback) and ReadyURL (or the admin endpoint) answers. It
// fails the test if Caddy does not start, showing the end of its log, and
// kills the process in t.Cleanup.
func Start(t testing.TB, opts Options) *Proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("caddyproc: test executable: %v", err)
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = time.Minute
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = time.Minute
	}
	dir := t.TempDir()
	p := &Proc{opts: opts, exe: exe, dir: dir, cfgPath: filepath.Join(dir, "Caddyfile"), logPath: opts.LogPath}
	if p.logPath == "" {
		p.logPath = filepath.Join(dir, "caddy.log")
	}
	for _, d := range []string{"home", "data", "config", "cache"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatalf("caddyproc: %v", err)
		}
	}
	if err := os.WriteFile(p.cfgPath, []byte(opts.Caddyfile), 0o644); err != nil {
		t.Fatalf("caddyproc: write Caddyfile: %v", err)
	}
	p.start(t)
	return p
}

// Restart starts Caddy again with the same options and the same data
// directories, waiting as Start does. The previous process must have
// exited (Kill or Stop it first); Restart fails the test otherwise.
func (p *Proc) Restart(t testing.TB) {
	t.Helper()
	if r := p.current(); r != nil && !r.done() {
		t.Fatalf("caddyproc: Restart while pid %d is running; Kill or Stop it first", r.cmd.Process.Pid)
	}
	p.start(t)
}

// Kill kills the process with SIGKILL, as a crash, and waits until it has
// exited. It does nothing if the process has exited.
func (p *Proc) Kill() {
	r := p.current()
	if r == nil || r.done() {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.exited
}

// Stop stops the process gracefully and waits until it has exited: it
// sends SIGINT, on which Caddy stops its servers (waiting for open
// connections up to its grace_period), stops its apps and runs their
// cleanups, and exits with status 0. If the process has not exited after
// Options.StopTimeout, Stop kills it. A kill or a non-zero exit status
// fails the test (t.Errorf, so Stop may run on any goroutine). Stop does
// nothing if the process has exited.
func (p *Proc) Stop() {
	p.mu.Lock()
	r, t := p.cur, p.t
	p.mu.Unlock()
	if r == nil || r.done() {
		return
	}
	pid := r.cmd.Process.Pid
	if err := r.cmd.Process.Signal(os.Interrupt); err != nil && !r.done() {
		t.Errorf("caddyproc: SIGINT to caddy pid %d: %v", pid, err)
	}
	select {
	case <-r.exited:
	case <-time.After(p.opts.StopTimeout):
		p.Kill()
		t.Errorf("caddyproc: caddy pid %d did not exit within %v of SIGINT; killed\n--- end of %s ---\n%s",
			pid, p.opts.StopTimeout, p.logPath, p.logTail())
		return
	}
	if st := r.cmd.ProcessState; !st.Success() {
		t.Errorf("caddyproc: caddy pid %d: %v after SIGINT\n--- end of %s ---\n%s", pid, st, p.logPath, p.logTail())
	}
}

// Running reports whether the last process started has not exited yet.
func (p *Proc) Running() bool {
	r := p.current()
	return r != nil && !r.done()
}

// Pid returns the process ID of the last process started.
func (p *Proc) Pid() int {
	if r := p.current(); r != nil {
		return r.cmd.Process.Pid
	}
	return 0
}

// LogPath returns the file that receives the child's standard output and
// error.
func (p *Proc) LogPath() string { return p.logPath }

// Dir returns the Proc's directory: the Caddyfile, and the child's home
// (home), XDG_DATA_HOME (data, where Caddy keeps caddy/instance.uuid and
// its storage), XDG_CONFIG_HOME (config, for autosave.json) and
// XDG_CACHE_HOME (cache).
func (p *Proc) Dir() string { return p.dir }

func (p *Proc) current() *run {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cur
}

func (r *run) done() bool {
	select {
	case <-r.exited:
		return true
	default:
		return false
	}
}

// start starts a process and waits until it is ready, failing t if not.
func (p *Proc) start(t testing.TB) {
	t.Helper()
	began := time.Now()
	r, err := p.spawn()
	if err != nil {
		t.Fatalf("caddyproc: %v", err)
	}
	p.mu.Lock()
	p.t, p.cur = t, r
	p.mu.Unlock()
	t.Cleanup(p.Kill)
	if err := p.waitReady(r, began.Add(p.opts.StartTimeout)); err != nil {
		p.Kill()
		t.Fatalf("caddyproc: %v\n--- end of %s ---\n%s", err, p.logPath, p.logTail())
	}
	t.Logf("caddyproc: caddy pid %d ready in %v", r.cmd.Process.Pid, time.Since(began).Round(time.Millisecond))
}

// spawn starts the child with a pingback listener for waitReady.
func (p *Proc) spawn() (*run, error) {
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	defer logf.Close() // the child has its own descriptor

	// Caddy's --pingback: once its config is loaded, the child dials the
	// address and echoes its standard input, a token no stray connection
	// can guess.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("pingback listener: %w", err)
	}
	raw := make([]byte, 16)
	_, _ = rand.Read(raw)
	r := &run{exited: make(chan struct{}), pingback: ln, token: []byte(hex.EncodeToString(raw))}

	args, _ := json.Marshal([]string{"run", "--config", p.cfgPath, "--adapter", "caddyfile",
		"--pingback", ln.Addr().String()})
	r.cmd = exec.Command(p.exe)
	r.cmd.Stdin = bytes.NewReader(r.token)
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	r.cmd.SysProcAttr = sysProcAttr()
	r.cmd.Env = append(p.baseEnv(), p.opts.Env...)
	r.cmd.Env = append(r.cmd.Env, envChild+"=1", envArgs+"="+string(args))
	if err := r.cmd.Start(); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("start %s: %w", p.exe, err)
	}
	go func() {
		_ = r.cmd.Wait()
		close(r.exited)
	}()
	return r, nil
}

// waitReady waits for the pingback, then polls the readiness URL, until
// deadline or the process exits.
func (p *Proc) waitReady(r *run, deadline time.Time) error {
	defer r.pingback.Close()
	confirmed := make(chan error, 1)
	go func() { confirmed <- acceptPingback(r.pingback, r.token, deadline) }()
	select {
	case err := <-confirmed:
		if err != nil {
			return fmt.Errorf("caddy did not report a loaded config: %w", err)
		}
	case <-r.exited:
		return fmt.Errorf("caddy exited during start-up: %v", r.cmd.ProcessState)
	}

	url := p.opts.ReadyURL
	if url == "" && p.opts.AdminAddr != "" {
		url = "http://" + p.opts.AdminAddr + "/config/"
	}
	if url == "" {
		return nil
	}
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{DisableKeepAlives: true},
	}
	for {
		resp, err := client.Get(url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("caddy loaded its config but GET %s fails: %w", url, err)
		}
		select {
		case <-r.exited:
			return fmt.Errorf("caddy exited during start-up: %v", r.cmd.ProcessState)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// acceptPingback accepts connections until one sends token.
func acceptPingback(ln net.Listener, token []byte, deadline time.Time) error {
	if tl, ok := ln.(*net.TCPListener); ok {
		_ = tl.SetDeadline(deadline)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		_ = c.SetReadDeadline(deadline)
		got, err := io.ReadAll(io.LimitReader(c, 64))
		_ = c.Close()
		if err == nil && bytes.Equal(got, token) {
			return nil
		}
	}
}

// baseEnv is the test process's environment with the child's own home and
// XDG directories, and without a caller's CADDYPROC_* variables.
func (p *Proc) baseEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", envChild, envArgs:
			continue
		}
		env = append(env, kv)
	}
	return append(env,
		"HOME="+filepath.Join(p.dir, "home"),
		"XDG_DATA_HOME="+filepath.Join(p.dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(p.dir, "config"),
		"XDG_CACHE_HOME="+filepath.Join(p.dir, "cache"),
	)
}

// logTail returns the last lines of the log, for error messages.
func (p *Proc) logTail() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return err.Error()
	}
	const max = 4 << 10
	if len(b) > max {
		b = b[len(b)-max:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return string(b)
}
