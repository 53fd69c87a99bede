package certstorage

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.uber.org/zap"
)

// Lock timing. A holder refreshes its lock every LockRefresh; a lock whose
// expiry has passed (its holder stopped refreshing: killed, hung or cut off
// from the database for LockTTL) may be taken over. Clocks of the instances
// must agree to well within LockTTL (NTP does).
const (
	// LockTTL is how long a lock outlives its holder's last refresh.
	LockTTL = 10 * time.Second
	// LockRefresh is how often a holder pushes its lock's expiry to
	// LockTTL from now.
	LockRefresh = LockTTL / 4
	// pollMin and pollMax bound the wait between two attempts of Lock.
	pollMin = 100 * time.Millisecond
	pollMax = time.Second
)

// lockDoc is the document of one lock in caddy_locks; a takeover claim (see
// takeOver) has the same shape.
type lockDoc struct {
	Name    string    `bson:"_id"`
	Owner   string    `bson:"owner"`
	Expires time.Time `bson:"expires"`
}

// heldLock is a lock this Store holds, with its refresher.
type heldLock struct {
	owner string
	stop  chan struct{} // closed by Unlock
	done  chan struct{} // closed when the refresher has returned
}

// Lock takes the lock name, waiting (polling with backoff up to a second)
// while another holder has it and its expiry has not passed. It returns
// ctx's error if ctx ends first. The lock is refreshed until Unlock.
func (s *Store) Lock(ctx context.Context, name string) error {
	wait := pollMin
	for {
		ok, err := s.TryLock(ctx, name)
		if err != nil || ok {
			return err
		}
		t := time.NewTimer(wait/2 + mrand.N(wait))
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("locking %q: %w", name, ctx.Err())
		case <-t.C:
		}
		wait = min(2*wait, pollMax)
	}
}

// TryLock takes the lock name if it is free or expired, and reports
// whether it did, without waiting.
//
// A lock is taken by inserting its document (_id = name), which only one
// inserter can do, on MongoDB and FerretDB alike. An expired lock is taken
// over by the one instance that wins a unique claim on it (see takeOver),
// which deletes it only if it is still the expired one, then inserts anew.
func (s *Store) TryLock(ctx context.Context, name string) (bool, error) {
	for range 3 { // insert; at most twice more after a release or takeover
		owner := s.id + "-" + token()
		now := time.Now()
		_, err := s.locks.InsertOne(ctx, lockDoc{Name: name, Owner: owner, Expires: now.Add(LockTTL)})
		if err == nil {
			s.hold(name, owner)
			return true, nil
		}
		if !mongo.IsDuplicateKeyError(err) {
			return false, fmt.Errorf("locking %q: %w", name, err)
		}
		var cur lockDoc
		err = s.locks.FindOne(ctx, bson.D{{Key: "_id", Value: name}}).Decode(&cur)
		switch {
		case errors.Is(err, mongo.ErrNoDocuments):
			continue // released in between
		case err != nil:
			return false, fmt.Errorf("locking %q: %w", name, err)
		case cur.Expires.After(now):
			return false, nil // held
		}
		ok, err := s.takeOver(ctx, cur, now)
		if err != nil || !ok {
			return false, err
		}
		s.logger.Info("took over an expired lock", zap.String("lock", name), zap.Time("expired", cur.Expires))
	}
	return false, nil
}

// takeOver deletes the expired lock stale if this instance wins the claim
// to do so. The claim is a unique insert keyed by the stale holder's owner
// token, so however many instances saw the lock expire, one deletes it;
// the others cannot delete the lock the winner takes next (on FerretDB a
// delete is not isolated: a filter checked on the stale document could
// otherwise delete its successor). The claim expires like a lock, in case
// its winner dies before removing it.
func (s *Store) takeOver(ctx context.Context, stale lockDoc, now time.Time) (bool, error) {
	claim := lockDoc{Name: "takeover:" + stale.Owner, Owner: s.id, Expires: now.Add(LockTTL)}
	_, err := s.locks.InsertOne(ctx, claim)
	if mongo.IsDuplicateKeyError(err) {
		var cur lockDoc
		if s.locks.FindOne(ctx, bson.D{{Key: "_id", Value: claim.Name}}).Decode(&cur) == nil && cur.Expires.Before(now) {
			_, _ = s.locks.DeleteOne(ctx, bson.D{{Key: "_id", Value: claim.Name}, {Key: "expires", Value: cur.Expires}})
		}
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("taking over lock %q: %w", stale.Name, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_, _ = s.locks.DeleteOne(dctx, bson.D{{Key: "_id", Value: claim.Name}})
	}()
	_, err = s.locks.DeleteOne(ctx, bson.D{{Key: "_id", Value: stale.Name}, {Key: "owner", Value: stale.Owner}, {Key: "expires", Value: stale.Expires}})
	if err != nil {
		return false, fmt.Errorf("taking over lock %q: %w", stale.Name, err)
	}
	return true, nil
}

// Unlock releases the lock name if this Store holds it: it stops the
// refresher, then deletes the lock document only if it is still this
// acquisition's (owner token). Unlocking a lock this Store does not hold
// is refused with an error and changes nothing.
func (s *Store) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	h := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("unlocking %q: not held by this storage", name)
	}
	close(h.stop)
	<-h.done // no refresh in flight may rewrite a successor's lock
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if _, err := s.locks.DeleteOne(dctx, bson.D{{Key: "_id", Value: name}, {Key: "owner", Value: h.owner}}); err != nil {
		return fmt.Errorf("unlocking %q: %w", name, err)
	}
	return nil
}

// hold records a lock just taken and starts its refresher.
func (s *Store) hold(name, owner string) {
	h := &heldLock{owner: owner, stop: make(chan struct{}), done: make(chan struct{})}
	s.mu.Lock()
	s.held[name] = h
	s.mu.Unlock()
	go s.refresh(name, h)
}

// refresh pushes the lock's expiry forward every LockRefresh until Unlock.
// It gives up when the lock is no longer this holder's (taken over after a
// long outage) or the client is gone (the config was unloaded).
func (s *Store) refresh(name string, h *heldLock) {
	defer close(h.done)
	t := time.NewTicker(LockRefresh)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), LockRefresh)
		r, err := s.locks.UpdateOne(ctx, bson.D{{Key: "_id", Value: name}, {Key: "owner", Value: h.owner}},
			bson.D{{Key: "$set", Value: bson.D{{Key: "expires", Value: time.Now().Add(LockTTL)}}}})
		cancel()
		switch {
		case errors.Is(err, mongo.ErrClientDisconnected):
			return
		case err != nil:
			s.logger.Warn("refreshing lock", zap.String("lock", name), zap.Error(err)) // retried next tick
		case r.MatchedCount == 0:
			s.logger.Error("lock lost: it expired and was taken over", zap.String("lock", name))
			return
		}
	}
}

// token returns a random hex string unique to one lock acquisition.
func token() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
