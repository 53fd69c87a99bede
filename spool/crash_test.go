//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package spool

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The tests below re-exec the test binary as a child process: the test
// function named by -test.run sees childEnv, plays the child's part and
// never returns.
const (
	childEnv = "SPOOL_TEST_CHILD"
	dirEnv   = "SPOOL_TEST_DIR"
)

func childCmd(t *testing.T, test, mode, dir string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+mode, dirEnv+"="+dir)
	cmd.Stderr = os.Stderr
	return cmd
}

// runChild runs a child to completion and returns its output.
func runChild(t *testing.T, mode, dir string) string {
	t.Helper()
	out, err := childCmd(t, t.Name(), mode, dir).Output()
	require.NoError(t, err, "child %s: %s", mode, out)
	return string(out)
}

func TestSecondOpenFromAnotherProcess(t *testing.T) {
	if os.Getenv(childEnv) == "lock" {
		s, _, err := Open(os.Getenv(dirEnv), Options{})
		if err != nil {
			fmt.Println("error:", err)
		} else {
			fmt.Println("opened")
			s.Close()
		}
		os.Exit(0)
	}
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{})
	out := runChild(t, "lock", dir)
	assert.Contains(t, out, "spool "+dir+" in use", "Open from another process")
	assert.Contains(t, out, fmt.Sprintf("pid %d", os.Getpid()), "Open from another process")
	closeT(t, s)
	assert.Contains(t, runChild(t, "lock", dir), "opened", "Open from another process after Close")
}

// startChild starts a child and returns its output lines as they come; the
// channel is closed at the end of the output.
func startChild(t *testing.T, mode, dir string) (*exec.Cmd, <-chan string) {
	t.Helper()
	cmd := childCmd(t, t.Name(), mode, dir)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	lines := make(chan string, 1024)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	return cmd, lines
}

// kill9 SIGKILLs the child and checks that it died of it.
func kill9(t *testing.T, cmd *exec.Cmd, lines <-chan string) (rest []string) {
	t.Helper()
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	for l := range lines { // what the child wrote before it died
		rest = append(rest, l)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, "child did not die of a signal")
	require.Equal(t, syscall.SIGKILL, ee.Sys().(syscall.WaitStatus).Signal(), "child did not die of SIGKILL: %v", err)
	return rest
}

func TestKill9(t *testing.T) {
	const n = 600
	if os.Getenv(childEnv) == "kill9" {
		s, _, err := Open(os.Getenv(dirEnv), Options{SegmentSize: 4096})
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		for i := range n {
			id := fmt.Sprintf("k%d", i)
			if err := s.Append(id, dataFor(id, sizeFor(id))); err != nil {
				fmt.Println("error:", err)
				os.Exit(1)
			}
			if i%3 != 0 {
				if err := s.Done(id); err != nil {
					fmt.Println("error:", err)
					os.Exit(1)
				}
			}
		}
		fmt.Println("ready")
		time.Sleep(time.Hour) // no Close: the parent kills us
		os.Exit(1)
	}

	dir := t.TempDir()
	cmd, lines := startChild(t, "kill9", dir)
	select {
	case l := <-lines:
		require.Equal(t, "ready", l, "child")
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		require.FailNow(t, "child not ready")
	}
	kill9(t, cmd, lines)

	var want []string
	for i := 0; i < n; i += 3 {
		want = append(want, fmt.Sprintf("k%d", i))
	}
	s, recs := openT(t, dir, Options{SegmentSize: 4096}) // the dead child's lock is gone
	checkRecs(t, recs, want)
	closeT(t, s)
}

// A child appends and marks done from 8 goroutines as fast as it can and is
// killed at a random moment, three times over on one directory. It reports
// "A id" after an Append returned, "d id" before a Done and "D id" after it.
// Every record whose Append returned and whose Done was not begun must be
// there, none whose Done returned, and nothing else but the one record per
// goroutine whose Append was under way.
func TestKill9UnderLoad(t *testing.T) {
	const workers = 8
	if os.Getenv(childEnv) == "load" {
		s, _, err := Open(os.Getenv(dirEnv), Options{SegmentSize: 4096, SyncEvery: 2 * time.Millisecond})
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		round := os.Getenv("SPOOL_TEST_ROUND")
		for g := range workers {
			go func() {
				for i := 0; ; i++ {
					id := fmt.Sprintf("r%s-g%d-%d", round, g, i)
					if err := s.Append(id, dataFor(id, sizeFor(id))); err != nil {
						fmt.Println("error:", err)
						os.Exit(1)
					}
					fmt.Println("A", id)
					if i%4 != 0 {
						fmt.Println("d", id)
						if err := s.Done(id); err != nil {
							fmt.Println("error:", err)
							os.Exit(1)
						}
						fmt.Println("D", id)
					}
				}
			}()
		}
		time.Sleep(time.Hour)
		os.Exit(1)
	}

	dir := t.TempDir()
	appended, doneBegun, doneEnded := map[string]bool{}, map[string]bool{}, map[string]bool{}
	lastA := map[string]int{} // per round and goroutine: the last i reported appended
	for round := range 3 {
		os.Setenv("SPOOL_TEST_ROUND", fmt.Sprint(round))
		cmd, lines := startChild(t, "load", dir)
		os.Unsetenv("SPOOL_TEST_ROUND")
		threshold := 1000 + rand.IntN(3000)
		var out []string
		count := 0
		for count < threshold {
			l, ok := <-lines
			require.True(t, ok, "child ended: %v", out[max(0, len(out)-5):])
			out = append(out, l)
			if strings.HasPrefix(l, "A ") {
				count++
			}
		}
		out = append(out, kill9(t, cmd, lines)...)
		for _, l := range out {
			kind, id, ok := strings.Cut(l, " ")
			switch {
			case !ok || strings.HasPrefix(l, "error"):
				require.FailNow(t, "child failed", "child: %q", l)
			case kind == "A":
				appended[id] = true
				var r, g, i int
				fmt.Sscanf(id, "r%d-g%d-%d", &r, &g, &i)
				lastA[fmt.Sprintf("r%d-g%d", r, g)] = i
			case kind == "d":
				doneBegun[id] = true
			case kind == "D":
				doneEnded[id] = true
			}
		}

		s, recs := openT(t, dir, Options{})
		got := map[string]bool{}
		prev := map[string]int{}
		for _, r := range recs {
			var rd, g, i int
			n, _ := fmt.Sscanf(r.ID, "r%d-g%d-%d", &rd, &g, &i)
			require.Equal(t, 3, n, "record %q", r.ID)
			require.Equal(t, string(dataFor(r.ID, sizeFor(r.ID))), string(r.Data), "record %q: wrong data", r.ID)
			key := fmt.Sprintf("r%d-g%d", rd, g)
			if p, ok := prev[key]; ok {
				require.Less(t, p, i, "record %q out of order", r.ID)
			}
			prev[key] = i
			got[r.ID] = true
			require.False(t, doneEnded[r.ID], "record %q is back after its Done returned", r.ID)
			if !appended[r.ID] {
				// Its Append was under way: the goroutine's next record.
				last, ok := lastA[key]
				if !ok {
					last = -1
				}
				require.Equal(t, last+1, i, "record %q was never appended", r.ID)
			}
		}
		must := 0
		for id := range appended {
			if !doneBegun[id] {
				must++
				require.True(t, got[id], "round %d: record %q lost (appended, never done)", round, id)
			}
		}
		t.Logf("round %d: killed after %d appends; %d records back, %d of them required", round, len(appended), len(recs), must)
		closeT(t, s)
	}
}
