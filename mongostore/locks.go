package mongostore

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"sync"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
)

// Isolation says how the store keeps two writers of one user document from
// interleaving.
//
// MongoDB applies every single-document update atomically, so its
// conditional updates need nothing more. FerretDB 1.24 (the test database)
// does not: it reads, modifies and writes a document without isolation, so
// two concurrent updates of one document can lose one (measured here: 40
// concurrent conditional $inc, 15 applied). One process is made exact by
// serialising its own writes per document; several processes sharing such
// a database need a lock in the database itself.
type Isolation uint8

const (
	// IsolationProcess serialises this process's writes per user document.
	// Exact on MongoDB with any number of instances, and on FerretDB with
	// one instance. The default.
	IsolationProcess Isolation = iota
	// IsolationShared adds a lease lock per user document in the database
	// (a unique-_id insert, which is atomic on FerretDB too), so several
	// instances sharing FerretDB are exact. It costs two more round trips
	// per balance write.
	IsolationShared
	// IsolationAtomic takes no lock at all: for a database that applies
	// every single-document update atomically and in isolation (MongoDB),
	// where the conditional updates are exact by themselves. SettleMany
	// then sends the updates of several users in one command. What
	// isolation auto picks when the server is not FerretDB.
	IsolationAtomic
)

// lockLease is how long a shared lock lives if its holder dies with it.
const lockLease = 15 * time.Second

// stripes serialises writes to one document with a fixed set of mutexes.
type stripes struct {
	seed maphash.Seed
	mu   [256]sync.Mutex
}

func (s *stripes) index(key string) int {
	return int(maphash.String(s.seed, key) % uint64(len(s.mu)))
}

func (s *stripes) lock(key string) func() {
	m := &s.mu[s.index(key)]
	m.Lock()
	return m.Unlock
}

// lockUser serialises the balance writes of one user: in this process
// (IsolationProcess), across processes too (IsolationShared), or not at all
// (IsolationAtomic).
func (s *Store) lockUser(ctx context.Context, user string) (func(), error) {
	return s.lockDoc(ctx, user, CollUsers+":"+user)
}

// takeOver deletes the lock id if its holder died with it (it expired)
// and this process wins the claim to do so, and reports whether it did.
// The claim is a unique insert keyed by the dead holder's token, so however
// many processes saw the lock expire, one deletes it: on FerretDB a delete
// is not isolated, and two deleting by the stale token could otherwise
// remove the lock the first of them takes next. A claim left by a process
// that died during its takeover expires like a lock.
func (s *Store) takeOver(ctx context.Context, id string, now time.Time) bool {
	locks := s.db.Collection(CollLocks)
	var cur struct {
		Token string    `bson:"token"`
		Exp   time.Time `bson:"exp"`
	}
	if err := locks.FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&cur); err != nil || !cur.Exp.Before(now) {
		return false
	}
	claim := "takeover:" + id + ":" + cur.Token
	if _, err := locks.InsertOne(ctx, bson.D{{Key: "_id", Value: claim}, {Key: "exp", Value: now.Add(lockLease)}}); err != nil {
		var old struct {
			Exp time.Time `bson:"exp"`
		}
		if mongo.IsDuplicateKeyError(err) && locks.FindOne(ctx, bson.D{{Key: "_id", Value: claim}}).Decode(&old) == nil && old.Exp.Before(now) {
			_, _ = locks.DeleteOne(ctx, bson.D{{Key: "_id", Value: claim}, {Key: "exp", Value: old.Exp}})
		}
		return false
	}
	_, err := locks.DeleteOne(ctx, bson.D{{Key: "_id", Value: id}, {Key: "token", Value: cur.Token}})
	_, _ = locks.DeleteOne(ctx, bson.D{{Key: "_id", Value: claim}})
	return err == nil
}

// lockDoc serialises the writes of one document as lockUser does: local
// keys the in-process stripe, id the shared lock's _id.
func (s *Store) lockDoc(ctx context.Context, local, id string) (func(), error) {
	iso := Isolation(s.isolation.Load())
	if iso == IsolationAtomic {
		return func() {}, nil
	}
	unlockLocal := s.local.lock(local)
	if iso != IsolationShared {
		return unlockLocal, nil
	}
	locks := s.db.Collection(CollLocks)
	var tb [8]byte
	_, _ = crand.Read(tb[:])
	token := hex.EncodeToString(tb[:])
	backoff := time.Millisecond
	for tries := 0; ; tries++ {
		now := s.now()
		_, err := locks.InsertOne(ctx, bson.D{{Key: "_id", Value: id}, {Key: "token", Value: token}, {Key: "exp", Value: now.Add(lockLease)}})
		if err == nil {
			return func() {
				ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				defer cancel()
				_, _ = locks.DeleteOne(ctx, bson.D{{Key: "_id", Value: id}, {Key: "token", Value: token}})
				unlockLocal()
			}, nil
		}
		if !mongo.IsDuplicateKeyError(err) {
			unlockLocal()
			return nil, fmt.Errorf("locking %s: %w", id, err)
		}
		if tries%16 == 15 && s.takeOver(ctx, id, now) {
			continue
		}
		t := time.NewTimer(backoff/2 + rand.N(backoff))
		select {
		case <-ctx.Done():
			t.Stop()
			unlockLocal()
			return nil, fmt.Errorf("locking %s: %w", id, ctx.Err())
		case <-t.C:
		}
		backoff = min(2*backoff, 20*time.Millisecond)
	}
}
