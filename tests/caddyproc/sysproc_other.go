//go:build !linux

package caddyproc

import "syscall"

// sysProcAttr: without Linux's parent-death signal, a child outlives a test
// process that dies without running its cleanups.
func sysProcAttr() *syscall.SysProcAttr { return nil }
