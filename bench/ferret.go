package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

// ferretMain is `bench ferretdb`: FerretDB embedded in its own process,
// so that its CPU time is measured apart from the harness and Caddy. It
// prints "READY <mongodb uri>" once listening and runs until SIGINT or
// SIGTERM.
func ferretMain(args []string) error {
	fs := flag.NewFlagSet("ferretdb", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "TCP listen address")
	handler := fs.String("handler", "postgresql", "backend: postgresql or sqlite")
	pgURL := fs.String("postgresql-url", "", "PostgreSQL connection string (postgresql backend)")
	sqliteURL := fs.String("sqlite-url", "", "SQLite directory URI, e.g. file:/tmp/db/ (sqlite backend)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	f, err := ferretdb.New(&ferretdb.Config{
		Listener:      ferretdb.ListenerConfig{TCP: *listen},
		Logger:        logger,
		Handler:       *handler,
		PostgreSQLURL: *pgURL,
		SQLiteURL:     *sqliteURL,
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	// The listener is bound by New, so the URI is known now.
	fmt.Println("READY " + strings.TrimSpace(f.MongoDBURI()))
	return <-done
}
