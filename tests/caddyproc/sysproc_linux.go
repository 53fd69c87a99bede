package caddyproc

import "syscall"

// sysProcAttr puts the child in its own process group, so that a Ctrl-C
// meant for `go test` does not stop it gracefully behind the test's back,
// and has the kernel kill it if the test process dies (strictly: if the
// thread that started it exits, which the Go runtime does not do to a
// thread unless a goroutine locked to it exits).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
