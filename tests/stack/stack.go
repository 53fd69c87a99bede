// Package stack starts what the gateway needs around it, all in process: an
// embedded FerretDB seeded with the demo data (package seed) and a stand-in
// for the OpenHands upstream (package standin) that accepts the demo
// upstream key. The e2e tests and the devstack command build on it.
package stack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

// DefaultDatabase is the database name used when StackOptions.Database is
// empty (the legacy default of MONGODB_DB_NAME).
const DefaultDatabase = "fproxy"

// StackOptions configures Start. The zero value is a fresh, seeded stack on
// free ports.
type StackOptions struct {
	// Dir holds the database files; empty means a new temporary directory,
	// removed by Close.
	Dir string
	// Database is the database name; empty means DefaultDatabase.
	Database string
	// UpstreamAddr is the stand-in's listen address; empty means
	// 127.0.0.1:0 (a free port).
	UpstreamAddr string
	// NoSeed skips inserting seed.Demo (for a Dir seeded before).
	NoSeed bool
	// EventDelay is the stand-in's pause between stream events.
	EventDelay time.Duration
	// Logger is given to FerretDB and the stand-in; nil means their quiet
	// defaults.
	Logger *slog.Logger
}

// Stack is a running database and stand-in upstream.
type Stack struct {
	// MongoURI is the MongoDB connection string of the database, for
	// example "mongodb://127.0.0.1:40123/".
	MongoURI string
	// Database is the database name the demo data is in.
	Database string
	// UpstreamURL is the stand-in's base URL, "http://127.0.0.1:<port>"
	// (what reverse_proxy points at).
	UpstreamURL string
	// UpstreamKey is the bearer token the stand-in accepts (the demo
	// upstream key, also in openhands_keys).
	UpstreamKey string
	// Standin is the stand-in upstream, for its recorded requests and
	// failure switches.
	Standin *standin.Server
	// DB is the database through a connected client of the official
	// driver; Close disconnects it.
	DB *mongo.Database
	// TestDB is the embedded FerretDB.
	TestDB *testdb.DB

	client       *mongo.Client
	closeStandin func()
	tempDir      string
}

// Start starts the database in opts.Dir, seeds the demo data unless
// opts.NoSeed, and starts the stand-in. ctx bounds the start-up only; the
// stack runs until Close. On error everything started is stopped.
func Start(ctx context.Context, opts StackOptions) (st *Stack, err error) {
	st = &Stack{Database: opts.Database, UpstreamKey: seed.DemoUpstreamAPIKey}
	if st.Database == "" {
		st.Database = DefaultDatabase
	}
	defer func() {
		if err != nil {
			st.Close()
			st = nil
		}
	}()

	dir := opts.Dir
	if dir == "" {
		d, err := os.MkdirTemp("", "llm-billing-stack-")
		if err != nil {
			return st, fmt.Errorf("stack: temporary directory: %w", err)
		}
		dir, st.tempDir = d, d
	}
	st.TestDB, err = testdb.Start(ctx, dir, opts.Logger)
	if err != nil {
		return st, fmt.Errorf("stack: %w", err)
	}
	st.MongoURI = st.TestDB.URI()
	st.client, err = st.TestDB.Connect(ctx)
	if err != nil {
		return st, fmt.Errorf("stack: %w", err)
	}
	st.DB = st.client.Database(st.Database)
	if !opts.NoSeed {
		if err := seed.SeedDemo(ctx, st.DB); err != nil {
			return st, fmt.Errorf("stack: seed demo data: %w", err)
		}
	}

	st.Standin = standin.New(standin.Options{
		Keys:       []string{seed.DemoUpstreamAPIKey},
		EventDelay: opts.EventDelay,
		Logger:     opts.Logger,
	})
	addr := opts.UpstreamAddr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	st.UpstreamURL, st.closeStandin, err = st.Standin.Listen(addr)
	if err != nil {
		return st, fmt.Errorf("stack: %w", err)
	}
	return st, nil
}

// Close stops the stand-in, disconnects the client, stops the database
// (waiting for it) and removes the temporary directory, if Start made one.
// It is safe on a partly started stack and more than once.
func (st *Stack) Close() {
	if st == nil {
		return
	}
	if st.closeStandin != nil {
		st.closeStandin()
		st.closeStandin = nil
	}
	// Disconnect first: FerretDB gives open connections a few seconds
	// before it cuts them.
	if st.client != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = st.client.Disconnect(ctx)
		cancel()
		st.client = nil
	}
	if st.TestDB != nil {
		st.TestDB.Close()
	}
	if st.tempDir != "" {
		if err := os.RemoveAll(st.tempDir); err != nil && !errors.Is(err, os.ErrNotExist) {
			slog.Warn("stack: remove temporary directory", "dir", st.tempDir, "error", err)
		}
		st.tempDir = ""
	}
}

// StartForTest is Start in t.TempDir() with t.Cleanup(Close); it fails the
// test if the stack cannot start.
func StartForTest(t testing.TB, opts StackOptions) *Stack {
	t.Helper()
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("start stack: %v", err)
	}
	t.Cleanup(st.Close)
	return st
}
