package ledgertest

import (
	"context"
	"fmt"
	"io"
)

// Op names a store operation, as the fault hook sees it.
type Op string

// The operations a fault can be injected into.
const (
	OpReserve       Op = "reserve"
	OpSettle        Op = "settle"
	OpSettleMany    Op = "settleMany"
	OpFlushLease    Op = "flushLease"
	OpClearReceipts Op = "clearReceipts"
	OpBalances      Op = "balances"
	OpInsertLogs    Op = "insertLogs"
	OpAddUsage      Op = "addUsage"
	OpOrphans       Op = "orphans"
	OpHeartbeat     Op = "heartbeat"
)

// Fault is what happens to one call of an operation.
type Fault uint8

// The faults a hook can ask for.
const (
	// Pass runs the operation normally.
	Pass Fault = iota
	// FailBefore fails the call with a *FaultError before anything is
	// applied: the request never reached the database.
	FailBefore
	// FailAfter applies the operation, then fails the call with a
	// *FaultError: the answer was lost on a dropped connection, so the
	// caller cannot tell whether the write happened.
	FailAfter
	// Stall blocks the call until its context ends and returns the
	// context's error, without applying anything: a database that stopped
	// answering. With a context that cannot end it returns a timeout
	// *FaultError at once, so that a test cannot hang.
	Stall
	// Timeout fails the call at once, without applying anything, with the
	// error a stall gives once the caller's deadline passed: a *FaultError
	// that wraps context.DeadlineExceeded. It is the stall of a
	// deterministic simulation, which must not wait for the wall clock.
	Timeout
)

// String names the fault, for messages.
func (f Fault) String() string {
	switch f {
	case Pass:
		return "pass"
	case FailBefore:
		return "fail before"
	case FailAfter:
		return "fail after"
	case Stall:
		return "stall"
	case Timeout:
		return "timeout"
	}
	return fmt.Sprintf("fault(%d)", uint8(f))
}

// FaultError is the error of an injected fault. It looks like a driver's
// network error, not like any billing sentinel: it satisfies net.Error
// (Timeout is true for Stall and Timeout) and wraps io.ErrUnexpectedEOF,
// as a read cut short by a dropped connection does, or for Timeout
// context.DeadlineExceeded. Callers must not tell it apart from a real
// database failure; tests may, with errors.As.
type FaultError struct {
	Op    Op
	Fault Fault
}

// Error reads like the driver's error for a connection cut mid-answer,
// and names the injected fault.
func (e *FaultError) Error() string {
	return fmt.Sprintf("connection(ledgertest) incomplete read of message header: %v (injected %s on %s)",
		e.Unwrap(), e.Fault, e.Op)
}

// Unwrap returns context.DeadlineExceeded for Timeout, io.ErrUnexpectedEOF
// otherwise.
func (e *FaultError) Unwrap() error {
	if e.Fault == Timeout {
		return context.DeadlineExceeded
	}
	return io.ErrUnexpectedEOF
}

// Timeout reports whether the fault is a stall or a timeout, as net.Error
// does for a deadline.
func (e *FaultError) Timeout() bool { return e.Fault == Stall || e.Fault == Timeout }

// Temporary reports true: a network error may pass on a retry.
func (e *FaultError) Temporary() bool { return true }
