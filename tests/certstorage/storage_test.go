// Package certstorage tests the caddy.storage.mongodb module against the
// embedded FerretDB: certmagic's storage semantics (keys and implicit
// directories), its locks across instances, and, with real Caddy
// processes, a certificate issued by one instance and served by another.
package certstorage

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/certstorage"
	"github.com/trollllm/caddy-llm-billing/tests/caddyproc"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

func TestMain(m *testing.M) {
	caddyproc.MaybeRunChild()
	maybeHoldLock()
	os.Exit(m.Run())
}

// dbName returns a database name of its own for one test.
func dbName() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return "certs_" + hex.EncodeToString(b[:])
}

// connect returns a client of db, disconnected in t.Cleanup.
func connect(t *testing.T, db *testdb.DB) *mongo.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := db.Connect(ctx)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	return c
}

func TestStoreLoadStatExists(t *testing.T) {
	db := testdb.StartForTest(t)
	s := certstorage.NewStore(connect(t, db).Database(dbName()))
	ctx := context.Background()

	require.NoError(t, s.Store(ctx, "certificates/local/a.test/a.test.crt", []byte("cert-1")))
	require.NoError(t, s.Store(ctx, "certificates/local/a.test/a.test.crt", []byte("cert-2"))) // overwrite
	got, err := s.Load(ctx, "certificates/local/a.test/a.test.crt")
	require.NoError(t, err)
	assert.Equal(t, "cert-2", string(got))

	_, err = s.Load(ctx, "certificates/local/a.test/a.test.key")
	assert.ErrorIs(t, err, fs.ErrNotExist)
	_, err = s.Load(ctx, "certificates/local/a.test") // a directory has no value
	assert.ErrorIs(t, err, fs.ErrNotExist)

	ki, err := s.Stat(ctx, "certificates/local/a.test/a.test.crt")
	require.NoError(t, err)
	assert.True(t, ki.IsTerminal)
	assert.Equal(t, int64(len("cert-2")), ki.Size)
	assert.WithinDuration(t, time.Now(), ki.Modified, time.Minute)

	ki, err = s.Stat(ctx, "certificates/local")
	require.NoError(t, err)
	assert.False(t, ki.IsTerminal, "a prefix of keys is a directory")
	assert.Equal(t, "certificates/local", ki.Key)

	_, err = s.Stat(ctx, "certificates/loc") // a string prefix, not a directory
	assert.ErrorIs(t, err, fs.ErrNotExist)

	for _, k := range []string{"certificates", "certificates/local/", "/certificates/local/a.test", "certificates/local/a.test/a.test.crt"} {
		assert.True(t, s.Exists(ctx, k), k)
	}
	for _, k := range []string{"certificates/loc", "certificates/local/a.test/a.test", "other"} {
		assert.False(t, s.Exists(ctx, k), k)
	}
}

func TestList(t *testing.T) {
	db := testdb.StartForTest(t)
	s := certstorage.NewStore(connect(t, db).Database(dbName()))
	ctx := context.Background()
	for _, k := range []string{"a/b/c.crt", "a/b/c.key", "a/d.json", "a/e/f/g", "a.txt", "ab/x", "x.txt"} {
		require.NoError(t, s.Store(ctx, k, []byte(k)))
	}

	got, err := s.List(ctx, "a", false)
	require.NoError(t, err)
	assert.Equal(t, []string{"a/b", "a/d.json", "a/e"}, got, "immediate children, keys and directories")

	got, err = s.List(ctx, "a/", true)
	require.NoError(t, err)
	assert.Equal(t, []string{"a/b", "a/b/c.crt", "a/b/c.key", "a/d.json", "a/e", "a/e/f", "a/e/f/g"}, got,
		"every key and directory below, as FileStorage's walk")

	got, err = s.List(ctx, "", false)
	require.NoError(t, err)
	assert.Equal(t, []string{"a", "a.txt", "ab", "x.txt"}, got)

	got, err = s.List(ctx, "a/d.json", false)
	require.NoError(t, err, "listing a key is not an error")
	assert.Empty(t, got)

	_, err = s.List(ctx, "nope", true)
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestDeletePrefix(t *testing.T) {
	db := testdb.StartForTest(t)
	s := certstorage.NewStore(connect(t, db).Database(dbName()))
	ctx := context.Background()
	for _, k := range []string{"a/b/c.crt", "a/b/d/e", "a/bc", "a/b.json"} {
		require.NoError(t, s.Store(ctx, k, []byte(k)))
	}

	require.NoError(t, s.Delete(ctx, "a/b"))
	assert.False(t, s.Exists(ctx, "a/b"))
	assert.False(t, s.Exists(ctx, "a/b/d/e"))
	assert.True(t, s.Exists(ctx, "a/bc"), "a key that only shares a string prefix stays")
	assert.True(t, s.Exists(ctx, "a/b.json"))

	require.NoError(t, s.Delete(ctx, "a/b.json"))
	assert.False(t, s.Exists(ctx, "a/b.json"))
	assert.NoError(t, s.Delete(ctx, "never/there"), "a missing key is not an error")
	got, err := s.List(ctx, "a", true)
	require.NoError(t, err)
	assert.Equal(t, []string{"a/bc"}, got)
}

// TestLockOneHolderAcrossInstances: goroutines of two storage instances
// (two clients, as two processes) lock one name; never two are inside.
func TestLockOneHolderAcrossInstances(t *testing.T) {
	db := testdb.StartForTest(t)
	name := dbName()
	stores := []*certstorage.Store{
		certstorage.NewStore(connect(t, db).Database(name)),
		certstorage.NewStore(connect(t, db).Database(name)),
	}
	var inside, maxInside, entries atomic.Int32
	var wg sync.WaitGroup
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := range 6 {
		s := stores[i%2]
		wg.Go(func() {
			for range 3 {
				if !assert.NoError(t, s.Lock(ctx, "issue_cert_a.test")) {
					return
				}
				n := inside.Add(1)
				for m := maxInside.Load(); n > m && !maxInside.CompareAndSwap(m, n); m = maxInside.Load() {
				}
				entries.Add(1)
				time.Sleep(20 * time.Millisecond)
				inside.Add(-1)
				assert.NoError(t, s.Unlock(ctx, "issue_cert_a.test"))
			}
		})
	}
	wg.Wait()
	assert.Equal(t, int32(18), entries.Load())
	assert.Equal(t, int32(1), maxInside.Load(), "two holders at once")
}

func TestLockNonHolderUnlockRefused(t *testing.T) {
	db := testdb.StartForTest(t)
	name := dbName()
	s1 := certstorage.NewStore(connect(t, db).Database(name))
	s2 := certstorage.NewStore(connect(t, db).Database(name))
	ctx := context.Background()

	require.NoError(t, s1.Lock(ctx, "l"))
	ok, err := s2.TryLock(ctx, "l")
	require.NoError(t, err)
	assert.False(t, ok)

	assert.Error(t, s2.Unlock(ctx, "l"), "a non-holder's unlock is refused")
	ok, err = s2.TryLock(ctx, "l")
	require.NoError(t, err)
	assert.False(t, ok, "the holder still holds the lock")

	require.NoError(t, s1.Unlock(ctx, "l"))
	assert.Error(t, s1.Unlock(ctx, "l"), "unlocking twice is refused")
	ok, err = s2.TryLock(ctx, "l")
	require.NoError(t, err)
	assert.True(t, ok)
	require.NoError(t, s2.Unlock(ctx, "l"))
}

// TestLockRefreshedThenExpires: a live holder keeps its lock past LockTTL
// (it refreshes it); once it stops refreshing (its client is cut, as a
// process killed), another instance gets the lock after the expiry, not
// before the last refresh's expiry and not much later.
func TestLockRefreshedThenExpires(t *testing.T) {
	db := testdb.StartForTest(t)
	name := dbName()
	c1 := connect(t, db)
	s1 := certstorage.NewStore(c1.Database(name))
	s2 := certstorage.NewStore(connect(t, db).Database(name))
	ctx := context.Background()

	require.NoError(t, s1.Lock(ctx, "l"))
	time.Sleep(certstorage.LockTTL + certstorage.LockRefresh)
	ok, err := s2.TryLock(ctx, "l")
	require.NoError(t, err)
	require.False(t, ok, "a refreshed lock was taken over")

	require.NoError(t, c1.Disconnect(ctx)) // s1's holder dies: no more refreshes
	cut := time.Now()
	lctx, cancel := context.WithTimeout(ctx, certstorage.LockTTL+5*time.Second)
	defer cancel()
	require.NoError(t, s2.Lock(lctx, "l"))
	waited := time.Since(cut)
	t.Logf("lock taken over %v after its holder stopped", waited.Round(time.Millisecond))
	assert.GreaterOrEqual(t, waited, certstorage.LockTTL-certstorage.LockRefresh-time.Second)
	assert.LessOrEqual(t, waited, certstorage.LockTTL+2*time.Second)
	require.NoError(t, s2.Unlock(ctx, "l"))
}

// TestStaleLockTakenOverOnce: a lock document whose expiry has passed (its
// holder died long ago) is taken at once, and by exactly one of many
// instances trying together.
func TestStaleLockTakenOverOnce(t *testing.T) {
	db := testdb.StartForTest(t)
	name := dbName()
	c := connect(t, db)
	ctx := context.Background()
	_, err := c.Database(name).Collection(certstorage.CollLocks).InsertOne(ctx, bson.D{
		{Key: "_id", Value: "l"}, {Key: "owner", Value: "dead-1"}, {Key: "expires", Value: time.Now().Add(-time.Minute)}})
	require.NoError(t, err)

	var won atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 8 {
		s := certstorage.NewStore(connect(t, db).Database(name))
		wg.Go(func() {
			<-start
			ok, err := s.TryLock(ctx, "l")
			assert.NoError(t, err)
			if ok {
				won.Add(1)
			}
		})
	}
	close(start)
	wg.Wait()
	assert.Equal(t, int32(1), won.Load(), "instances holding the taken-over lock")
}
