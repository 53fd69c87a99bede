// Package certstorage is the certmagic storage module caddy.storage.mongodb:
// it keeps Caddy's certificates, keys, ACME state and locks in MongoDB, so
// that a fleet of Caddy instances behind one DNS name shares its
// certificates and issues each one once.
//
// Items live in the collection caddy_storage (_id = key), locks in
// caddy_locks (_id = lock name). Every operation works on MongoDB 6+ and on
// FerretDB 1.24, which does not isolate updates: a lock is taken by a
// unique insert, kept alive by its holder and taken over only once it has
// expired (see [Store.Lock]).
//
// Caddyfile (global option):
//
//	storage mongodb {
//		uri      {env.MONGODB_URI}
//		database {env.MONGODB_DB_NAME}
//	}
package certstorage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(MongoDB{})
}

// clients shares one MongoDB client per URI among the storage modules of
// every loaded config, so a reload does not reconnect.
var clients = caddy.NewUsagePool()

// MongoDB is the caddy.storage.mongodb module: Caddy's storage (certificates,
// keys, ACME accounts, OCSP staples, locks) in a MongoDB database shared by
// every instance that names the same database.
type MongoDB struct {
	// URI is the MongoDB connection string. Placeholders such as
	// {env.MONGODB_URI} are resolved at provisioning, so the secret never
	// enters the stored config. It is never logged. Required.
	URI string `json:"uri,omitempty"`

	// Database is the database that holds the collections caddy_storage and
	// caddy_locks. Placeholders are resolved at provisioning. Required.
	Database string `json:"database,omitempty"`

	store   *Store
	poolKey string // set once the pooled client is acquired
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (MongoDB) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.mongodb",
		New: func() caddy.Module { return new(MongoDB) },
	}
}

// Validate checks the settings as written; it does no I/O. Provision calls
// it before it resolves the placeholders, and Caddy calls it again after.
func (m *MongoDB) Validate() error {
	if strings.TrimSpace(m.URI) == "" {
		return errors.New("uri is required (use a placeholder such as {env.MONGODB_URI})")
	}
	if strings.TrimSpace(m.Database) == "" {
		return errors.New("database is required (use a placeholder such as {env.MONGODB_DB_NAME})")
	}
	return nil
}

// Provision resolves the placeholders and acquires the pooled client for
// the URI. It does no network I/O (the driver connects lazily), so
// `caddy validate` does not need the database.
func (m *MongoDB) Provision(ctx caddy.Context) error {
	if err := m.Validate(); err != nil {
		return err
	}
	m.logger = ctx.Logger()
	repl := caddy.NewReplacer()
	uri, err := repl.ReplaceOrErr(m.URI, true, true)
	if err != nil {
		return fmt.Errorf("uri: %v", err)
	}
	db, err := repl.ReplaceOrErr(m.Database, true, true)
	if err != nil {
		return fmt.Errorf("database: %v", err)
	}
	if err := checkDatabaseName(db); err != nil {
		return err
	}
	sum := sha256.Sum256([]byte(uri))
	key := "caddy.storage.mongodb:" + hex.EncodeToString(sum[:])
	v, _, err := clients.LoadOrNew(key, func() (caddy.Destructor, error) {
		c, err := mongo.Connect(options.Client().ApplyURI(uri))
		if err != nil {
			return nil, connectErr(err, uri)
		}
		return pooledClient{c}, nil
	})
	if err != nil {
		return err
	}
	m.poolKey = key
	m.store = NewStore(v.(pooledClient).Database(db))
	m.store.logger = m.logger
	return nil
}

// Cleanup releases the pooled client; the last config to release it
// disconnects it. Locks still held stop being refreshed once the client is
// gone, so they expire as a dead holder's do.
func (m *MongoDB) Cleanup() error {
	if m.poolKey == "" {
		return nil
	}
	_, err := clients.Delete(m.poolKey)
	m.poolKey = ""
	return err
}

// CertMagicStorage returns the storage Caddy and certmagic use.
func (m *MongoDB) CertMagicStorage() (certmagic.Storage, error) {
	if m.store == nil {
		return nil, errors.New("mongodb storage is not provisioned")
	}
	return m.store, nil
}

// pooledClient is the client shared through clients.
type pooledClient struct{ *mongo.Client }

// Destruct disconnects the client once no config uses it.
func (p pooledClient) Destruct() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return p.Disconnect(ctx)
}

// checkDatabaseName rejects what MongoDB refuses as a database name.
func checkDatabaseName(db string) error {
	if db == "" || len(db) > 63 || strings.ContainsAny(db, "/\\. \"$\x00") {
		return fmt.Errorf("database: invalid name %q", db)
	}
	return nil
}

// connectErr describes a connection-string error without repeating the
// URI, which may hold a password.
func connectErr(err error, uri string) error {
	if strings.Contains(err.Error(), uri) {
		return errors.New("uri: invalid connection string")
	}
	return fmt.Errorf("uri: %w", err)
}

// Interface guards.
var (
	_ caddy.Provisioner      = (*MongoDB)(nil)
	_ caddy.Validator        = (*MongoDB)(nil)
	_ caddy.CleanerUpper     = (*MongoDB)(nil)
	_ caddy.StorageConverter = (*MongoDB)(nil)
)
