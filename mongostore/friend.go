package mongostore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// CollFriendKeys holds the friend keys (backend model FriendKey): _id is
// the key, ownerId the usersNew _id who pays, isActive, and modelLimits, a
// list of {modelId, limitUsd, usedUsd, enabled}; totalUsedUsd,
// requestsCount and lastUsedAt count its use.
const CollFriendKeys = "friend_keys"

// The friend key fields the gateway reads and writes. fFriendHolds is the
// gateway's own (the backend ignores it): llmFriendHolds.<requestId> is an
// outstanding hold, packed (encodeFriendHold). While a hold is out,
// its amount is counted in its model's usedUsd, so that one conditional
// $inc on usedUsd alone decides whether a limit has room, without a
// positional operator, $expr or a read; the settlement replaces it by what
// the owner was charged.
const (
	fLimits      = "modelLimits"
	fFriendHolds = "llmFriendHolds"
)

type friendDoc struct {
	OwnerID  string            `bson:"ownerId"`
	IsActive *bool             `bson:"isActive"`
	Limits   []friendLimitDoc  `bson:"modelLimits"`
	Holds    map[string]string `bson:"llmFriendHolds"`
}

type friendLimitDoc struct {
	ModelID string        `bson:"modelId"`
	Limit   bson.RawValue `bson:"limitUsd"`
	Used    bson.RawValue `bson:"usedUsd"`
	Enabled *bool         `bson:"enabled"`
}

func (d friendDoc) friendKey() *billing.FriendKey {
	f := &billing.FriendKey{Limits: make([]billing.FriendLimit, len(d.Limits))}
	for i, l := range d.Limits {
		f.Limits[i] = billing.FriendLimit{ModelID: l.ModelID, Slot: i, Limit: rawNano(l.Limit), Used: rawNano(l.Used),
			Enabled: l.Enabled == nil || *l.Enabled}
	}
	return f
}

// authenticateFriend resolves a friend key as the legacy proxy did: the
// key, then its owner, who must be active and migrated (or admin). An owner
// missing or not migrated reads as an unknown key, as before.
func (s *Store) authenticateFriend(ctx context.Context, key string) (billing.Principal, error) {
	var fk friendDoc
	err := s.db.Collection(CollFriendKeys).FindOne(ctx, bson.D{{Key: "_id", Value: key}},
		options.FindOne().SetProjection(bson.D{{Key: "ownerId", Value: 1}, {Key: "isActive", Value: 1}, {Key: fLimits, Value: 1}})).Decode(&fk)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		return billing.Principal{}, &billing.AuthError{Reason: billing.AuthInvalid}
	case err != nil:
		return billing.Principal{}, fmt.Errorf("reading friend_keys: %w", hideKey(err, key))
	case fk.IsActive != nil && !*fk.IsActive:
		return billing.Principal{}, &billing.AuthError{Reason: billing.AuthFriendInactive}
	case fk.OwnerID == "":
		return billing.Principal{}, &billing.AuthError{Reason: billing.AuthInvalid}
	}
	var u userDoc
	err = s.db.Collection(CollUsers).FindOne(ctx, bson.D{{Key: "_id", Value: fk.OwnerID}},
		options.FindOne().SetProjection(userAuthProjection)).Decode(&u)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		return billing.Principal{}, &billing.AuthError{Reason: billing.AuthInvalid}
	case err != nil:
		return billing.Principal{}, fmt.Errorf("reading friend key owner: %w", err)
	case u.IsActive != nil && !*u.IsActive:
		return billing.Principal{}, &billing.AuthError{Reason: billing.AuthFriendOwnerInactive}
	}
	role := strings.ToLower(strings.TrimSpace(u.Role))
	if role != "admin" && !u.Migration {
		return billing.Principal{}, &billing.AuthError{Reason: billing.AuthInvalid}
	}
	return billing.Principal{User: u.ID, Role: role, Balances: u.Bal.balances(), Friend: fk.friendKey()}, nil
}

// lockFriend serialises the writes of one friend key document (see
// Isolation). The shared lock is named by a hash of the key, so the key
// itself is never written elsewhere.
func (s *Store) lockFriend(ctx context.Context, key string) (func(), error) {
	sum := sha256.Sum256([]byte(key))
	return s.lockDoc(ctx, "friend:"+key, "friend_keys:"+hex.EncodeToString(sum[:16]))
}

func slotPath(slot int, field string) string {
	return fLimits + "." + strconv.Itoa(slot) + "." + field
}

// roomFilter matches the key's document when the limit entry at slot is
// still model's, enabled, at least limit, and its usedUsd is at most
// usedMax (or below limit when the hold is zero), and the request has no
// hold yet. usedUsd counts the outstanding holds, so this is the whole
// limit check, in the update's own filter.
func roomFilter(key string, slot int, model string, limit bson.E, used bson.D, holdPath string) bson.D {
	return bson.D{
		{Key: "_id", Value: key},
		{Key: "isActive", Value: bson.D{{Key: "$ne", Value: false}}},
		{Key: slotPath(slot, "modelId"), Value: model},
		limit,
		{Key: slotPath(slot, "enabled"), Value: bson.D{{Key: "$ne", Value: false}}},
		{Key: slotPath(slot, "usedUsd"), Value: used},
		{Key: holdPath, Value: bson.D{{Key: "$exists", Value: false}}},
	}
}

// notAbove matches a number at most v, a missing field and null (usedUsd
// is absent from a new entry).
func notAbove(v float64) bson.D {
	return bson.D{{Key: "$not", Value: bson.D{{Key: "$gt", Value: v}}}}
}

// ReserveFriend counts a hold against a friend key's limit for a model (see
// billing.FriendLedger). The first try is one conditional $inc with the
// limit as cached; when it does not match, the document is read: a hold
// the request has already is returned, holds whose process died (past
// their Expires) are given back, and the room left is taken under a
// condition that fails if another writer used it meanwhile.
func (s *Store) ReserveFriend(ctx context.Context, req billing.FriendHoldRequest) (billing.FriendHold, error) {
	if err := validRequestID(req.RequestID); err != nil {
		return billing.FriendHold{}, err
	}
	unlock, err := s.lockFriend(ctx, req.Key)
	if err != nil {
		return billing.FriendHold{}, err
	}
	defer unlock()
	coll := s.db.Collection(CollFriendKeys)
	holdPath := fFriendHolds + "." + req.RequestID
	h := billing.FriendHold{Key: req.Key, RequestID: req.RequestID, Model: req.Model, Slot: req.Slot, Amount: req.Want, Expires: req.Expires}
	take := func(filter bson.D) (bool, error) {
		upd := bson.D{{Key: "$inc", Value: bson.D{{Key: slotPath(h.Slot, "usedUsd"), Value: h.Amount.USD()}}},
			{Key: "$set", Value: bson.D{{Key: holdPath, Value: encodeFriendHold(h)}}}}
		r, err := coll.UpdateOne(ctx, filter, upd)
		if err != nil {
			return false, fmt.Errorf("taking a friend key hold: %w", hideKey(err, req.Key))
		}
		return r.MatchedCount == 1, nil
	}
	if req.Slot >= 0 && req.Limit > 0 && req.Want >= req.Min && req.Want <= req.Limit {
		used := notAbove((req.Limit - req.Want).USD())
		if req.Want == 0 {
			used = bson.D{{Key: "$not", Value: bson.D{{Key: "$gte", Value: req.Limit.USD()}}}}
		}
		limit := bson.E{Key: slotPath(req.Slot, "limitUsd"), Value: bson.D{{Key: "$gte", Value: (req.Limit - 1).USD()}}}
		if ok, err := take(roomFilter(req.Key, req.Slot, req.Model, limit, used, holdPath)); err != nil || ok {
			return h, err
		}
	}
	for attempt := 0; attempt < casAttempts; attempt++ {
		d, err := s.readFriend(ctx, req.Key)
		if err != nil {
			return billing.FriendHold{}, err
		}
		if packed, ok := d.Holds[req.RequestID]; ok {
			held, err := decodeFriendHold(packed)
			held.Key, held.RequestID = req.Key, req.RequestID
			return held, err // taken already: idempotent
		}
		if n, err := s.releaseExpired(ctx, req.Key, d); err != nil || n > 0 {
			if err != nil {
				return billing.FriendHold{}, err
			}
			continue // read again, with the room they gave back
		}
		filter, err := friendRoom(req, d, &h, holdPath)
		if err != nil {
			return billing.FriendHold{}, err
		}
		if ok, err := take(filter); err != nil || ok {
			return h, err
		}
	}
	return billing.FriendHold{}, fmt.Errorf("taking a friend key hold: the key kept changing after %d attempts", casAttempts)
}

// friendRoom decides, from the document as read, whether the request may
// have a hold and how large (set in h), and returns the filter that takes
// it only if the document has not lost that room meanwhile.
func friendRoom(req billing.FriendHoldRequest, d friendDoc, h *billing.FriendHold, holdPath string) (bson.D, error) {
	if d.IsActive != nil && !*d.IsActive {
		return nil, &billing.AuthError{Reason: billing.AuthFriendInactive}
	}
	lim, refusal := d.friendKey().Check(req.Model)
	if refusal != 0 {
		return nil, &billing.FriendLimitError{Reason: refusal}
	}
	raw := d.Limits[lim.Slot]
	room := lim.Limit - max(lim.Used, 0)
	if room <= 0 || room < req.Min {
		return nil, &billing.FriendLimitError{Reason: billing.FriendLimitExceeded}
	}
	h.Slot, h.Amount = lim.Slot, min(req.Want, room)
	// usedUsd may have grown by at most what leaves room for the hold; as
	// read, it is always allowed (the double as stored, whatever rounding
	// the nano-USD conversion did).
	usedMax := (lim.Limit - h.Amount).USD()
	if u, ok := toFloat(rawNumber(raw.Used)); ok && (u > usedMax || h.Amount == 0) {
		usedMax = u
	}
	limit := bson.E{Key: slotPath(lim.Slot, "limitUsd"), Value: raw.Limit}
	return roomFilter(req.Key, lim.Slot, req.Model, limit, notAbove(usedMax), holdPath), nil
}

// rawNumber returns a numeric raw value as a Go number, else nil.
func rawNumber(v bson.RawValue) any {
	switch v.Type {
	case bson.TypeDouble:
		return v.Double()
	case bson.TypeInt32:
		return v.Int32()
	case bson.TypeInt64:
		return v.Int64()
	}
	return nil
}

func (s *Store) readFriend(ctx context.Context, key string) (friendDoc, error) {
	var d friendDoc
	err := s.db.Collection(CollFriendKeys).FindOne(ctx, bson.D{{Key: "_id", Value: key}},
		options.FindOne().SetProjection(bson.D{{Key: "isActive", Value: 1}, {Key: fLimits, Value: 1}, {Key: fFriendHolds, Value: 1}})).Decode(&d)
	switch {
	case errors.Is(err, mongo.ErrNoDocuments):
		return friendDoc{}, &billing.AuthError{Reason: billing.AuthInvalid}
	case err != nil:
		return friendDoc{}, fmt.Errorf("reading friend key: %w", hideKey(err, key))
	}
	return d, nil
}

// releaseExpired gives back the holds of d past their Expires (their
// process died before settling them); it returns how many it released.
// The caller holds the key's lock.
func (s *Store) releaseExpired(ctx context.Context, key string, d friendDoc) (int, error) {
	now := s.now()
	n := 0
	for id, packed := range d.Holds {
		h, err := decodeFriendHold(packed)
		if err == nil && !h.Expires.Before(now) {
			continue
		}
		if err == nil {
			h.Slot = slotOf(d, h.Model)
		} else {
			h.Slot = -1 // unreadable: dropped, its amount unknown
		}
		h.Key, h.RequestID = key, id
		if err := s.applyFriend(ctx, billing.FriendSettlement{Hold: h, At: now}); err != nil && !errors.Is(err, errHoldMoved) {
			return n, err
		}
		n++
	}
	return n, nil
}

// slotOf returns the position of model's limit entry in d, or -1.
func slotOf(d friendDoc, model string) int {
	for i, l := range d.Limits {
		if l.ModelID == model {
			return i
		}
	}
	return -1
}

// SettleFriend replaces a friend key hold by what its request was charged
// (see billing.FriendLedger): one conditional update, which only applies
// while the hold is there, so it counts once. A hold journaled without its
// key is found by its request id.
func (s *Store) SettleFriend(ctx context.Context, st billing.FriendSettlement) error {
	h := &st.Hold
	if err := validRequestID(h.RequestID); err != nil {
		return err
	}
	holdPath := fFriendHolds + "." + h.RequestID
	if h.Key == "" {
		var d struct {
			ID string `bson:"_id"`
		}
		err := s.db.Collection(CollFriendKeys).FindOne(ctx, bson.D{{Key: holdPath, Value: bson.D{{Key: "$exists", Value: true}}}},
			options.FindOne().SetProjection(bson.D{{Key: "_id", Value: 1}})).Decode(&d)
		if errors.Is(err, mongo.ErrNoDocuments) {
			return nil // settled, or expired and given back
		}
		if err != nil {
			return fmt.Errorf("finding a friend key hold: %w", err)
		}
		h.Key = d.ID
	}
	unlock, err := s.lockFriend(ctx, h.Key)
	if err != nil {
		return err
	}
	defer unlock()
	for attempt := 0; attempt < casAttempts; attempt++ {
		if err := s.applyFriend(ctx, st); !errors.Is(err, errHoldMoved) {
			return err
		}
		d, err := s.readFriend(ctx, h.Key)
		var ae *billing.AuthError
		if errors.As(err, &ae) {
			return nil // the key was deleted, its holds with it
		}
		if err != nil {
			return err
		}
		if _, ok := d.Holds[h.RequestID]; !ok {
			return nil // settled already
		}
		h.Slot = slotOf(d, h.Model) // the limits were edited meanwhile
	}
	return fmt.Errorf("settling a friend key hold: the key kept changing after %d attempts", casAttempts)
}

// SettleFriends settles several friend holds: those of one key in one
// conditional update (while every one of them is there and their limit
// entries have not moved), the rest, and a key whose update did not apply,
// one by one with SettleFriend. Each hold counts once.
func (s *Store) SettleFriends(ctx context.Context, sts []billing.FriendSettlement) error {
	byKey := map[string][]billing.FriendSettlement{}
	var keys []string
	for _, st := range sts {
		if st.Hold.Key == "" {
			if err := s.SettleFriend(ctx, st); err != nil {
				return err
			}
			continue
		}
		if byKey[st.Hold.Key] == nil {
			keys = append(keys, st.Hold.Key)
		}
		byKey[st.Hold.Key] = append(byKey[st.Hold.Key], st)
	}
	for _, key := range keys {
		group := byKey[key]
		if len(group) > 1 {
			done, err := s.applyFriends(ctx, key, group)
			if err != nil || done {
				return err
			}
		}
		for _, st := range group {
			if err := s.SettleFriend(ctx, st); err != nil {
				return err
			}
		}
	}
	return nil
}

// applyFriends is applyFriend for several holds of one key in one update,
// under the key's lock; done is false when it did not apply, or when two
// holds name one limit entry for different models (the limits were edited
// between them), which one update cannot check.
func (s *Store) applyFriends(ctx context.Context, key string, group []billing.FriendSettlement) (done bool, err error) {
	if err := validFriendHolds(group); err != nil {
		return false, err
	}
	filter, upd, ok := friendUpdate(key, group)
	if !ok {
		return false, nil
	}
	unlock, err := s.lockFriend(ctx, key)
	if err != nil {
		return false, err
	}
	defer unlock()
	r, err := s.db.Collection(CollFriendKeys).UpdateOne(ctx, filter, upd)
	if err != nil {
		return false, fmt.Errorf("settling friend key holds: %w", hideKey(err, key))
	}
	return r.MatchedCount == 1, nil
}

// friendUpdate is the conditional update that replaces the holds of group
// (all of key) by what their requests were charged: only while every hold
// is there and each limit entry they name is still their model's. usedUsd
// of each entry gets its holds' charges instead of the holds; totalUsedUsd
// the charges; billed requests count in requestsCount and lastUsedAt. ok
// is false when two holds name one entry for different models.
func friendUpdate(key string, group []billing.FriendSettlement) (filter, upd bson.D, ok bool) {
	filter = bson.D{{Key: "_id", Value: key}}
	unset := bson.D{}
	used := map[int]billing.Nano{}
	models := map[int]string{}
	var slots []int
	var total billing.Nano
	var billed int32
	var last time.Time
	for _, st := range group {
		h := st.Hold
		holdPath := fFriendHolds + "." + h.RequestID
		filter = append(filter, bson.E{Key: holdPath, Value: bson.D{{Key: "$exists", Value: true}}})
		unset = append(unset, bson.E{Key: holdPath, Value: ""})
		if h.Slot >= 0 {
			if m, seen := models[h.Slot]; !seen {
				models[h.Slot] = h.Model
				slots = append(slots, h.Slot)
				filter = append(filter, bson.E{Key: slotPath(h.Slot, "modelId"), Value: h.Model})
			} else if m != h.Model {
				return nil, nil, false
			}
			used[h.Slot] += st.Charged - h.Amount
		}
		total += max(st.Charged, 0)
		if st.Billed {
			billed++
			if st.At.After(last) {
				last = st.At
			}
		}
	}
	inc := bson.D{}
	for _, slot := range slots {
		inc = append(inc, bson.E{Key: slotPath(slot, "usedUsd"), Value: used[slot].USD()})
	}
	if total > 0 {
		inc = append(inc, bson.E{Key: "totalUsedUsd", Value: total.USD()})
	}
	upd = bson.D{{Key: "$unset", Value: unset}}
	if billed > 0 {
		inc = append(inc, bson.E{Key: "requestsCount", Value: billed})
		upd = append(upd, bson.E{Key: "$set", Value: bson.D{{Key: "lastUsedAt", Value: last}}})
	}
	if len(inc) > 0 {
		upd = append(upd, bson.E{Key: "$inc", Value: inc})
	}
	return filter, upd, true
}

// validFriendHolds checks that every hold's request id can key a hold
// and that none is named twice (the update would unset one path twice).
func validFriendHolds(group []billing.FriendSettlement) error {
	seen := make(map[string]bool, len(group))
	for _, st := range group {
		if err := validRequestID(st.Hold.RequestID); err != nil {
			return err
		}
		if seen[st.Hold.RequestID] {
			return fmt.Errorf("settling friend key holds: request %q named twice", st.Hold.RequestID)
		}
		seen[st.Hold.RequestID] = true
	}
	return nil
}

// errHoldMoved: the hold is not where the update looked (settled already,
// or its limit entry moved).
var errHoldMoved = errors.New("friend hold not found where expected")

// applyFriend is SettleFriend's update (friendUpdate of the one hold),
// with the lock held.
func (s *Store) applyFriend(ctx context.Context, st billing.FriendSettlement) error {
	filter, upd, _ := friendUpdate(st.Hold.Key, []billing.FriendSettlement{st})
	r, err := s.db.Collection(CollFriendKeys).UpdateOne(ctx, filter, upd)
	switch {
	case err != nil:
		return fmt.Errorf("settling a friend key hold: %w", hideKey(err, st.Hold.Key))
	case r.MatchedCount == 0:
		return errHoldMoved
	}
	return nil
}

// hideKey masks the friend key in err's text: the key is the document's
// _id, which the server's error messages quote, and errors are logged.
// The error still unwraps to err.
func hideKey(err error, key string) error {
	if err == nil || key == "" || !strings.Contains(err.Error(), key) {
		return err
	}
	return &keyHidden{err: err, key: key}
}

type keyHidden struct {
	err error
	key string
}

func (e *keyHidden) Error() string {
	return strings.ReplaceAll(e.err.Error(), e.key, billing.MaskKey(e.key))
}

func (e *keyHidden) Unwrap() error { return e.err }

// Interface guard.
var _ billing.FriendLedger = (*Store)(nil)
