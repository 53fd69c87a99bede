// Package testdb runs an embedded FerretDB (v1.24, SQLite backend) that
// speaks the MongoDB wire protocol on 127.0.0.1, so that tests and dev
// commands can use the official MongoDB driver without a MongoDB server.
//
// FerretDB 1.24 is not MongoDB: it lacks $expr, pipeline updates, the
// positional $ operator, arrayFilters, transactions, change streams, TTL
// indexes and Decimal128 (which drops the connection). It has conditional
// filters ($gte, $or), $inc, $set, $push, $pull, findOneAndUpdate, unique
// indexes and bulk writes.
//
// A [DB] can be stopped and restarted on the same address with the same
// data ([DB.Stop], [DB.Restart]) to test how clients ride out an outage.
package testdb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// newMu serialises ferretdb.New, which writes a package-level variable of
// FerretDB (its version info) and would race when two databases start at
// once.
var newMu sync.Mutex

// DB is an embedded FerretDB behind a fixed address of 127.0.0.1. It can be
// stopped and restarted on the same address with the same data, so that a
// client of the official driver sees an outage and then reconnects by
// itself.
//
// Clients do not talk to FerretDB directly but through a small TCP relay of
// this package that owns the address, because FerretDB, when stopped,
// closes its listener but lets the connections already open serve
// commands for 3 more seconds (ctxutil.WithDelay in its clientconn
// package) and offers no way to cut them sooner. The relay cuts them at
// once: [DB.Stop] and [DB.Close] reset every client connection.
type DB struct {
	uri    string
	addr   string
	dir    string
	logger *slog.Logger
	// closing is true while the database is stopped or closed; it hides the
	// warnings of the connections cut on purpose.
	closing *atomic.Bool

	mu    sync.Mutex // serialises Stop, Restart and Close
	state dbState
	ferr  *instance // nil unless running
	relay *relay    // nil unless running
}

type dbState int

const (
	running dbState = iota
	stopped
	closed
)

// Start starts FerretDB with its SQLite files in dir (created if missing),
// listening on a free port of 127.0.0.1, and waits until it answers a ping
// through the official driver. ctx bounds the start-up only: the database
// runs until [DB.Close].
//
// The port is chosen outside the kernel's ephemeral port range (see
// /proc/sys/net/ipv4/ip_local_port_range) when there is room, so that
// while the database is stopped no listener on port 0 nor outgoing
// connection of this machine can be given it; [DB.Restart] needs it back.
//
// A nil logger means the default: text on standard error, WARN and above
// only (FerretDB logs every connection at INFO), and without the WARN
// records FerretDB writes for every failed command (a duplicate key, say),
// which the client receives as an error anyway, nor the "Connection
// stopped" warnings of the connections Stop and Close cut.
func Start(ctx context.Context, dir string, logger *slog.Logger) (*DB, error) {
	if dir == "" {
		return nil, errors.New("testdb: empty data directory")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("testdb: data directory: %w", err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return nil, fmt.Errorf("testdb: create data directory: %w", err)
	}
	closing := new(atomic.Bool)
	if logger == nil {
		logger = slog.New(&quietHandler{
			next:    slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}),
			closing: closing,
		}).With("component", "ferretdb")
	}

	ln, err := listenFree()
	if err != nil {
		return nil, fmt.Errorf("testdb: listen: %w", err)
	}
	in, err := startInstance(ctx, abs, logger)
	if err != nil {
		_ = ln.Close()
		return nil, err
	}
	addr := ln.Addr().String()
	return &DB{
		uri:     "mongodb://" + addr + "/",
		addr:    addr,
		dir:     abs,
		logger:  logger,
		closing: closing,
		ferr:    in,
		relay:   serveRelay(ln, in.addr),
	}, nil
}

// URI returns the MongoDB connection string, for example
// "mongodb://127.0.0.1:62123/". It names no database; pick one with
// client.Database. It stays the same across [DB.Stop] and [DB.Restart].
func (db *DB) URI() string { return db.uri }

// Addr returns the host:port of [DB.URI], for example "127.0.0.1:62123".
func (db *DB) Addr() string { return db.addr }

// Dir returns the absolute directory of the SQLite files.
func (db *DB) Dir() string { return db.dir }

// Connect returns a new client of the official driver connected to the
// database. The caller disconnects it.
func (db *DB) Connect(ctx context.Context) (*mongo.Client, error) {
	client, err := mongo.Connect(options.Client().ApplyURI(db.uri))
	if err != nil {
		return nil, fmt.Errorf("testdb: connect: %w", err)
	}
	if err := client.Ping(ctx, nil); err != nil {
		_ = client.Disconnect(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("testdb: ping: %w", err)
	}
	return client, nil
}

// Stop takes the database down, as clients see a crashed server: it closes
// the listener (new connections are refused), resets every open client
// connection (a command in flight, or the next one on a pooled connection,
// fails with a network error instead of hanging), then stops FerretDB and
// waits until its SQLite files are closed. FerretDB itself stops cleanly:
// every acknowledged write is kept. A write in flight may or may not have
// been applied, as with a real crash. Clients get
// connection errors until [DB.Restart]; an operation's server selection
// waits for its context or the client's server selection timeout (30 s by
// default), as with a MongoDB server that is down.
//
// Stop does nothing if the database is not running. It is safe to call
// from any goroutine.
func (db *DB) Stop() {
	db.mu.Lock()
	defer db.mu.Unlock()
	if db.state != running {
		return
	}
	db.halt()
	db.state = stopped
}

// halt cuts the relay and stops FerretDB; db.mu is held.
func (db *DB) halt() {
	db.closing.Store(true)
	db.relay.cut()
	db.ferr.stop()
	db.relay, db.ferr = nil, nil
}

// Restart starts a stopped database again on the same address with the same
// files, and waits until it answers a ping. Clients of the official driver
// reconnect by themselves: their next server selection finds the server
// (the driver re-checks a server it lost every 500 ms while an operation
// waits, else every heartbeat, 10 s by default).
//
// If another process has taken the port in the meantime, Restart retries
// for up to 10 seconds (bounded by ctx) and then fails; the port is picked
// so that this should not happen (see [Start]). A ctx without a deadline
// is given one of a minute. Restart fails if the database is running or
// closed.
func (db *DB) Restart(ctx context.Context) error {
	db.mu.Lock()
	defer db.mu.Unlock()
	switch db.state {
	case running:
		return errors.New("testdb: restart: the database is running; Stop it first")
	case closed:
		return errors.New("testdb: restart: the database is closed")
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Minute)
		defer cancel()
	}
	// Take the address back first: clients that connect while FerretDB
	// starts wait in the listen backlog instead of being refused.
	ln, err := listenAgain(ctx, db.addr)
	if err != nil {
		return err
	}
	db.closing.Store(false)
	in, err := startInstance(ctx, db.dir, db.logger)
	if err != nil {
		db.closing.Store(true)
		_ = ln.Close()
		return err
	}
	db.ferr, db.relay = in, serveRelay(ln, in.addr)
	db.state = running
	return nil
}

// Close stops the database for good, closing its listener, cutting its
// connections and closing its SQLite files, and waits until it has
// stopped. It may be called in any state (running, stopped, closed) and
// more than once.
func (db *DB) Close() {
	db.mu.Lock()
	defer db.mu.Unlock()
	if db.state == running {
		db.halt()
	}
	db.state = closed
}

// instance is one run of FerretDB, on a port of its own that only the
// relay knows.
type instance struct {
	addr   string // host:port
	cancel context.CancelFunc
	done   chan struct{} // closed when Run has returned
}

// startInstance starts FerretDB on a free port and waits until it answers a
// ping or ctx ends.
func startInstance(ctx context.Context, dir string, logger *slog.Logger) (*instance, error) {
	newMu.Lock()
	f, err := ferretdb.New(&ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: "127.0.0.1:0"},
		Logger:   logger,
		Handler:  "sqlite",
		// The SQLite handler wants a directory URI ending with a slash.
		SQLiteURL: "file:" + filepath.ToSlash(dir) + "/",
	})
	newMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("testdb: start ferretdb: %w", err)
	}

	// The listener is bound by ferretdb.New, so MongoDBURI does not block.
	u, err := url.Parse(f.MongoDBURI())
	if err != nil {
		return nil, fmt.Errorf("testdb: ferretdb address: %w", err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	in := &instance{addr: u.Host, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(in.done)
		_ = f.Run(runCtx) // always nil
	}()
	if err := in.waitReady(ctx); err != nil {
		in.stop()
		return nil, err
	}
	return in, nil
}

// waitReady pings the server until it answers or ctx ends.
func (in *instance) waitReady(ctx context.Context) error {
	client, err := mongo.Connect(options.Client().ApplyURI("mongodb://" + in.addr + "/").
		SetServerSelectionTimeout(10 * time.Second))
	if err != nil {
		return fmt.Errorf("testdb: connect: %w", err)
	}
	defer func() { _ = client.Disconnect(context.WithoutCancel(ctx)) }()
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = client.Database("admin").RunCommand(pctx, bson.D{{Key: "ping", Value: 1}}).Err()
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("testdb: ferretdb did not answer a ping: %w", err)
		case <-in.done:
			return errors.New("testdb: ferretdb stopped during start-up")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop stops FerretDB and waits until it has closed its listener, its
// connections and its SQLite files. Connections still open get 3 seconds
// before FerretDB cuts them; the relay has closed its own before.
func (in *instance) stop() {
	in.cancel()
	<-in.done
}

// StartForTest starts a database in t.TempDir(), stops it in t.Cleanup, and
// fails the test if it cannot start.
func StartForTest(t testing.TB) *DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := Start(ctx, t.TempDir(), nil)
	if err != nil {
		t.Fatalf("start test database: %v", err)
	}
	t.Cleanup(db.Close)
	return db
}

// quietHandler drops FerretDB's noise (see Start) and passes the rest on.
type quietHandler struct {
	next    slog.Handler
	closing *atomic.Bool
}

func (h *quietHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

func (h *quietHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level < slog.LevelError &&
		(strings.HasPrefix(r.Message, "Response header: ") || strings.HasPrefix(r.Message, "Response message:")) {
		return nil
	}
	if r.Message == "Connection stopped" && h.closing.Load() {
		return nil
	}
	return h.next.Handle(ctx, r)
}

func (h *quietHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &quietHandler{next: h.next.WithAttrs(as), closing: h.closing}
}

func (h *quietHandler) WithGroup(name string) slog.Handler {
	return &quietHandler{next: h.next.WithGroup(name), closing: h.closing}
}
