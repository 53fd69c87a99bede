// Package testdb runs an embedded FerretDB (v1.24, SQLite backend) that
// speaks the MongoDB wire protocol on 127.0.0.1, so that tests and dev
// commands can use the official MongoDB driver without a MongoDB server.
//
// FerretDB 1.24 is not MongoDB: it lacks $expr, pipeline updates, the
// positional $ operator, arrayFilters, transactions, change streams, TTL
// indexes and Decimal128 (which drops the connection). It has conditional
// filters ($gte, $or), $inc, $set, $push, $pull, findOneAndUpdate, unique
// indexes and bulk writes.
package testdb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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

// DB is a running embedded FerretDB.
type DB struct {
	uri     string
	dir     string
	cancel  context.CancelFunc
	done    chan error
	closing *atomic.Bool

	closeOnce sync.Once
}

// Start starts FerretDB with its SQLite files in dir (created if missing),
// listening on a free port of 127.0.0.1, and waits until it answers a ping
// through the official driver. ctx bounds the start-up only: the database
// runs until [DB.Close].
//
// A nil logger means the default: text on standard error, WARN and above
// only (FerretDB logs every connection at INFO), and without the WARN
// records FerretDB writes for every failed command (a duplicate key, say),
// which the client receives as an error anyway, nor the "Connection
// stopped" warnings of the connections Close cuts.
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

	newMu.Lock()
	f, err := ferretdb.New(&ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: "127.0.0.1:0"},
		Logger:   logger,
		Handler:  "sqlite",
		// The SQLite handler wants a directory URI ending with a slash.
		SQLiteURL: "file:" + filepath.ToSlash(abs) + "/",
	})
	newMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("testdb: start ferretdb: %w", err)
	}

	// The listener is bound by ferretdb.New, so MongoDBURI does not block.
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	db := &DB{uri: f.MongoDBURI(), dir: abs, cancel: cancel, done: make(chan error, 1), closing: closing}
	go func() { db.done <- f.Run(runCtx) }()

	if err := db.waitReady(ctx); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// waitReady pings the server until it answers or ctx ends.
func (db *DB) waitReady(ctx context.Context) error {
	client, err := mongo.Connect(options.Client().ApplyURI(db.uri).SetServerSelectionTimeout(10 * time.Second))
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
		case err := <-db.done:
			db.done <- err // for Close
			return fmt.Errorf("testdb: ferretdb stopped during start-up: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// URI returns the MongoDB connection string, for example
// "mongodb://127.0.0.1:40123/". It names no database; pick one with
// client.Database.
func (db *DB) URI() string { return db.uri }

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

// Close stops FerretDB, closing its listener, its connections and its
// SQLite files, and waits until it has stopped. FerretDB gives clients
// still connected about 3 seconds to leave before it cuts them, so
// disconnect clients first for a fast Close. It is safe to call more than
// once.
func (db *DB) Close() {
	db.closeOnce.Do(func() {
		db.closing.Store(true)
		db.cancel()
		<-db.done
	})
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
