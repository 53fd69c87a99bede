package mongostore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// CollErrorLogs is the legacy collection of refused requests, read by the
// dashboard.
const CollErrorLogs = "error_logs"

// errorLogSource is the legacy source value, kept so that the dashboard's
// filters keep working.
const errorLogSource = "goproxy"

// errorLogTTL is how long an error log is kept (the legacy 30 days).
const errorLogTTL = 30 * 24 * time.Hour

type errorLogDoc struct {
	Source         string            `bson:"source"`
	Method         string            `bson:"method"`
	Path           string            `bson:"path"`
	Endpoint       string            `bson:"endpoint"`
	UserID         string            `bson:"userId,omitempty"`
	UserKeyID      string            `bson:"userKeyId,omitempty"`
	ClientIP       string            `bson:"clientIp"`
	UserAgent      string            `bson:"userAgent"`
	StatusCode     int               `bson:"statusCode"`
	ErrorType      string            `bson:"errorType"`
	ErrorMessage   string            `bson:"errorMessage"`
	RequestHeaders map[string]string `bson:"requestHeaders"`
	CreatedAt      time.Time         `bson:"createdAt"`
}

// InsertErrorLogs inserts the rows unordered, in the legacy shape.
func (s *Store) InsertErrorLogs(ctx context.Context, logs []billing.ErrorLog) error {
	if len(logs) == 0 {
		return nil
	}
	docs := make([]any, len(logs))
	for i, l := range logs {
		docs[i] = errorLogDoc{Source: errorLogSource, Method: l.Method, Path: l.Path, Endpoint: l.Endpoint,
			UserID: l.UserID, UserKeyID: l.UserKeyID, ClientIP: l.ClientIP, UserAgent: l.UserAgent,
			StatusCode: l.StatusCode, ErrorType: l.ErrorType, ErrorMessage: l.ErrorMessage,
			RequestHeaders: l.RequestHeaders, CreatedAt: l.CreatedAt}
	}
	if _, err := s.db.Collection(CollErrorLogs).InsertMany(ctx, docs, options.InsertMany().SetOrdered(false)); err != nil {
		return fmt.Errorf("inserting error logs: %w", err)
	}
	return nil
}

// EnsureErrorLogIndexes creates the legacy indexes that are missing:
// createdAt with source, path and statusCode, and a 30-day expiry on
// createdAt. It sends createIndexes only for missing ones, so a start or
// reload against a database that has them writes nothing (FerretDB 1.24
// can drop the connection on a createIndexes of existing indexes, and the
// driver then fails every operation in flight). A database without TTL
// indexes (FerretDB 1.24) gets the others and ErrNoExpiry: old rows must
// then be deleted by hand.
func (s *Store) EnsureErrorLogIndexes(ctx context.Context) error {
	idx := s.db.Collection(CollErrorLogs).Indexes()
	have, err := indexNames(ctx, idx)
	if err != nil {
		return fmt.Errorf("listing error_logs indexes: %w", err)
	}
	var missing []mongo.IndexModel
	for _, keys := range []string{"source", "path", "statusCode"} {
		name := keys + "_1_createdAt_-1"
		if !have[name] {
			missing = append(missing, mongo.IndexModel{Keys: bson.D{{Key: keys, Value: 1}, {Key: "createdAt", Value: -1}},
				Options: options.Index().SetName(name)})
		}
	}
	if len(missing) > 0 {
		if _, err := idx.CreateMany(ctx, missing); err != nil {
			return fmt.Errorf("creating error_logs indexes: %w", err)
		}
	}
	if have[errorLogTTLIndex] {
		return nil
	}
	_, err = idx.CreateOne(ctx, mongo.IndexModel{Keys: bson.D{{Key: "createdAt", Value: 1}},
		Options: options.Index().SetName(errorLogTTLIndex).SetExpireAfterSeconds(int32(errorLogTTL.Seconds()))})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNoExpiry, err)
	}
	return nil
}

// errorLogTTLIndex is the name of the expiry index on error_logs.
const errorLogTTLIndex = "createdAt_1"

// indexNames lists the names of a collection's indexes; none for a
// collection that does not exist yet.
func indexNames(ctx context.Context, idx mongo.IndexView) (map[string]bool, error) {
	specs, err := idx.ListSpecifications(ctx)
	var ce mongo.CommandError
	if errors.As(err, &ce) && ce.Code == 26 { // NamespaceNotFound
		return map[string]bool{}, nil
	}
	if err != nil {
		return nil, err
	}
	have := make(map[string]bool, len(specs))
	for _, sp := range specs {
		have[sp.Name] = true
	}
	return have, nil
}

// ErrNoExpiry says that error_logs has its indexes but no expiry.
var ErrNoExpiry = errors.New("error_logs rows do not expire on this database (no TTL index); delete old rows yourself")

var _ billing.ErrorLogger = (*Store)(nil)
