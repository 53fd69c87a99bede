package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// postgres is a private PostgreSQL cluster in the work folder, run as the
// harness's child (as the "postgres" user when the harness is root:
// PostgreSQL refuses to run as root).
type postgres struct {
	bin     string // folder of initdb and postgres
	dir     string
	port    int
	proc    *child
	version string
}

// pgBinDir finds the folder of Debian's (or any) PostgreSQL server
// binaries.
func pgBinDir(hint string) (string, error) {
	if hint != "" {
		return hint, nil
	}
	for _, pat := range []string{"/usr/lib/postgresql/*/bin/postgres", "/usr/local/pgsql/bin/postgres"} {
		if p := findExecutable("", pat); p != "" {
			return filepath.Dir(p), nil
		}
	}
	if p, err := exec.LookPath("postgres"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Dir(r), nil
		}
		return filepath.Dir(p), nil
	}
	return "", fmt.Errorf("no PostgreSQL server found: install Debian's postgresql package (scripts/bench.sh does)")
}

// credential returns the uid/gid to run PostgreSQL as: the postgres user
// when we are root, else nil (ourselves).
func pgCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root needs a postgres user (Debian's postgresql package creates it): %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// startPostgres initialises a cluster in dir and starts it on a free port
// of 127.0.0.1, with trust authentication (loopback only). extra are
// "name=value" settings passed as -c options.
func startPostgres(binDir, dir string, extra []string) (*postgres, error) {
	cred, err := pgCredential()
	if err != nil {
		return nil, err
	}
	// A fresh cluster each run.
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "sock")
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(sock, 0o700); err != nil {
		return nil, err
	}
	if cred != nil {
		for _, d := range []string{dir, sock} {
			if err := os.Chown(d, int(cred.Uid), int(cred.Gid)); err != nil {
				return nil, err
			}
		}
		// The postgres user must be able to reach dir.
		for p := filepath.Dir(dir); p != "/" && p != "."; p = filepath.Dir(p) {
			if st, err := os.Stat(p); err == nil && st.Mode().Perm()&0o001 == 0 {
				_ = os.Chmod(p, st.Mode().Perm()|0o011)
			}
		}
	}
	pg := &postgres{bin: binDir, dir: dir}
	if out, err := exec.Command(filepath.Join(binDir, "postgres"), "--version").Output(); err == nil {
		pg.version = strings.TrimSpace(string(out))
	}

	initdb := exec.Command(filepath.Join(binDir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	initdb.Dir = dir
	if out, err := initdb.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}

	pg.port, err = freePort()
	if err != nil {
		return nil, err
	}
	args := []string{"-D", data, "-p", strconv.Itoa(pg.port), "-k", sock, "-c", "listen_addresses=127.0.0.1"}
	for _, e := range extra {
		if e = strings.TrimSpace(e); e != "" {
			args = append(args, "-c", e)
		}
	}
	logPath := filepath.Join(dir, "postgres.log")
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	if cred != nil {
		_ = lf.Chown(int(cred.Uid), int(cred.Gid))
	}
	cmd := exec.Command(filepath.Join(binDir, "postgres"), args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	c := &child{name: "postgres", cmd: cmd, log: lf, done: make(chan struct{})}
	go func() { c.err = cmd.Wait(); lf.Close(); close(c.done) }()
	pg.proc = c

	deadline := time.Now().Add(60 * time.Second)
	for {
		b, _ := os.ReadFile(logPath)
		if strings.Contains(string(b), "ready to accept connections") {
			return pg, nil
		}
		if c.exited() || time.Now().After(deadline) {
			pg.stop()
			return nil, fmt.Errorf("postgres did not start:\n%s", tail(logPath, 20))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// url is the connection string FerretDB uses.
func (pg *postgres) url() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?pool_min_conns=50&pool_max_conns=50", pg.port)
}

func (pg *postgres) pid() int { return pg.proc.pid() }

// stop shuts the cluster down (SIGINT is PostgreSQL's fast shutdown).
func (pg *postgres) stop() {
	if pg == nil || pg.proc == nil {
		return
	}
	pg.proc.stop(30 * time.Second)
}
