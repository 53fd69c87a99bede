package certstorage

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
	"go.uber.org/zap"
)

// The collections of a [Store].
const (
	// CollItems holds one document per key: _id (the key), value (bytes),
	// modified (time) and size (bytes).
	CollItems = "caddy_storage"
	// CollLocks holds one document per held lock: _id (the lock name),
	// owner (a token unique to one acquisition) and expires (time).
	CollLocks = "caddy_locks"
)

// Store is a certmagic.Storage (and TryLocker) on one MongoDB database. Keys
// are slash-separated paths; a "directory" is any prefix of a key up to a
// slash, and exists while a key below it does, as in certmagic's
// FileStorage. It is safe for concurrent use.
type Store struct {
	db     *mongo.Database
	items  *mongo.Collection
	locks  *mongo.Collection
	id     string // names this instance in String and in its lock owners
	logger *zap.Logger

	mu   sync.Mutex
	held map[string]*heldLock // locks this instance holds, by name
}

// NewStore returns a Store on db. It does no I/O.
func NewStore(db *mongo.Database) *Store {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &Store{
		db:     db,
		items:  db.Collection(CollItems),
		locks:  db.Collection(CollLocks),
		id:     hex.EncodeToString(b[:]),
		logger: zap.NewNop(),
		held:   make(map[string]*heldLock),
	}
}

// String names the store for logs (the database, never the URI).
func (s *Store) String() string { return "MongoDBStorage:" + s.db.Name() }

// item is the document of one key.
type item struct {
	Key      string    `bson:"_id"`
	Value    []byte    `bson:"value"`
	Modified time.Time `bson:"modified"`
	Size     int64     `bson:"size"`
}

// clean normalises a key as FileStorage's path joining does: no leading,
// trailing or doubled slashes, no dot segments. The root is "".
func clean(key string) string {
	return strings.TrimPrefix(path.Clean("/"+key), "/")
}

// under matches the keys strictly below the directory dir ("" is the root:
// every key). '0' is the byte after '/', so the range holds exactly the
// keys that start with dir+"/".
func under(dir string) bson.D {
	if dir == "" {
		return bson.D{}
	}
	return bson.D{{Key: "_id", Value: bson.D{{Key: "$gte", Value: dir + "/"}, {Key: "$lt", Value: dir + "0"}}}}
}

// keyOrUnder matches the key itself and every key below it.
func keyOrUnder(key string) bson.D {
	if key == "" {
		return bson.D{}
	}
	return bson.D{{Key: "$or", Value: bson.A{bson.D{{Key: "_id", Value: key}}, under(key)}}}
}

// notExist is the error of a missing key: it wraps fs.ErrNotExist, as
// certmagic expects.
func notExist(key string) error {
	return fmt.Errorf("key %q: %w", key, fs.ErrNotExist)
}

// Store puts value at key, replacing any value there.
func (s *Store) Store(ctx context.Context, key string, value []byte) error {
	key = clean(key)
	if key == "" {
		return errors.New("storing: empty key")
	}
	doc := item{Key: key, Value: value, Modified: time.Now().UTC(), Size: int64(len(value))}
	_, err := s.items.ReplaceOne(ctx, bson.D{{Key: "_id", Value: key}}, doc, options.Replace().SetUpsert(true))
	if mongo.IsDuplicateKeyError(err) {
		// Two upserts raced to insert the key; the other one inserted it,
		// so this one now replaces it.
		_, err = s.items.ReplaceOne(ctx, bson.D{{Key: "_id", Value: key}}, doc, options.Replace().SetUpsert(true))
	}
	if err != nil {
		return fmt.Errorf("storing %q: %w", key, err)
	}
	return nil
}

// Load returns the value at key, or an error wrapping fs.ErrNotExist if
// there is none (a directory has no value).
func (s *Store) Load(ctx context.Context, key string) ([]byte, error) {
	key = clean(key)
	var it item
	err := s.items.FindOne(ctx, bson.D{{Key: "_id", Value: key}}).Decode(&it)
	if errors.Is(err, mongo.ErrNoDocuments) {
		return nil, notExist(key)
	}
	if err != nil {
		return nil, fmt.Errorf("loading %q: %w", key, err)
	}
	return it.Value, nil
}

// Delete deletes key and, if key is a directory, every key below it. A
// missing key is not an error.
func (s *Store) Delete(ctx context.Context, key string) error {
	key = clean(key)
	if _, err := s.items.DeleteMany(ctx, keyOrUnder(key)); err != nil {
		return fmt.Errorf("deleting %q: %w", key, err)
	}
	return nil
}

// Exists reports whether key is a key or a directory. It reports false if
// the database cannot be asked.
func (s *Store) Exists(ctx context.Context, key string) bool {
	key = clean(key)
	err := s.items.FindOne(ctx, keyOrUnder(key), options.FindOne().SetProjection(bson.D{{Key: "_id", Value: 1}})).Err()
	return err == nil
}

// Stat describes key: a terminal with its size and time, or a directory
// (IsTerminal false) if keys exist below it; otherwise an error wrapping
// fs.ErrNotExist.
func (s *Store) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	key = clean(key)
	var it item
	err := s.items.FindOne(ctx, bson.D{{Key: "_id", Value: key}},
		options.FindOne().SetProjection(bson.D{{Key: "value", Value: 0}})).Decode(&it)
	switch {
	case err == nil:
		return certmagic.KeyInfo{Key: key, Modified: it.Modified, Size: it.Size, IsTerminal: true}, nil
	case !errors.Is(err, mongo.ErrNoDocuments):
		return certmagic.KeyInfo{}, fmt.Errorf("stat %q: %w", key, err)
	}
	err = s.items.FindOne(ctx, under(key), options.FindOne().SetProjection(bson.D{{Key: "_id", Value: 1}})).Err()
	switch {
	case err == nil:
		return certmagic.KeyInfo{Key: key}, nil
	case errors.Is(err, mongo.ErrNoDocuments):
		return certmagic.KeyInfo{}, notExist(key)
	default:
		return certmagic.KeyInfo{}, fmt.Errorf("stat %q: %w", key, err)
	}
}

// List returns the keys below the directory dir, sorted. Not recursive: its
// immediate children, keys and directories alike. Recursive: every key and
// every directory below it, as FileStorage's walk does. A dir that is a key
// has nothing below it (no keys, no error); a dir that does not exist
// returns an error wrapping fs.ErrNotExist.
func (s *Store) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	dir = clean(dir)
	cur, err := s.items.Find(ctx, under(dir), options.Find().SetProjection(bson.D{{Key: "_id", Value: 1}}))
	if err != nil {
		return nil, fmt.Errorf("listing %q: %w", dir, err)
	}
	var ids []struct {
		Key string `bson:"_id"`
	}
	if err := cur.All(ctx, &ids); err != nil {
		return nil, fmt.Errorf("listing %q: %w", dir, err)
	}
	if len(ids) == 0 {
		if dir != "" && s.Exists(ctx, dir) {
			return nil, nil // a key, not a directory
		}
		return nil, notExist(dir)
	}
	base := dir
	if base != "" {
		base += "/"
	}
	seen := make(map[string]struct{})
	for _, id := range ids {
		rel := strings.TrimPrefix(id.Key, base)
		if !recursive {
			first, _, _ := strings.Cut(rel, "/")
			seen[base+first] = struct{}{}
			continue
		}
		for i := 0; i <= len(rel); i++ { // each directory on the way, and the key
			if i == len(rel) || rel[i] == '/' {
				seen[base+rel[:i]] = struct{}{}
			}
		}
	}
	keys := make([]string, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys, nil
}
