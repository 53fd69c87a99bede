package billing

import (
	"context"
	"strings"
	"time"
)

// IsFriendKey reports whether key has the friend key format:
// FriendKeyPrefix followed by 64 hexadecimal digits. Any other key is
// looked up as a user key, as the legacy proxy did.
func IsFriendKey(key string) bool {
	rest, ok := strings.CutPrefix(key, FriendKeyPrefix)
	if !ok || len(rest) != 64 {
		return false
	}
	for i := 0; i < len(rest); i++ {
		c := rest[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') && (c < 'A' || c > 'F') {
			return false
		}
	}
	return true
}

// FriendKey is what a friend key (friend_keys) carries besides its owner,
// who is the Principal's User and pays: the per-model spending limits, as
// read with the key (so as old as the key cache's entry). The limits
// decide which models the key may use; whether a limit has room is
// decided by FriendLedger.ReserveFriend, on the document itself.
type FriendKey struct {
	Limits []FriendLimit
}

// FriendLimit is one entry of friend_keys.modelLimits.
type FriendLimit struct {
	// ModelID is the canonical model id the limit applies to.
	ModelID string
	// Slot is the entry's position in the stored list, a hint for the
	// store's single-write fast path.
	Slot int
	// Limit is limitUsd and Used usedUsd, in nano-USD.
	Limit, Used Nano
	// Enabled is false only when the entry says enabled: false.
	Enabled bool
}

// FriendRefusal says why a friend key may not spend on a model.
type FriendRefusal uint8

// The legacy friend key refusals, all answered with a 402.
const (
	FriendNotAllowed    FriendRefusal = iota + 1 // no entry for the model, or limitUsd <= 0
	FriendModelDisabled                          // enabled: false
	FriendLimitExceeded                          // usedUsd and the holds reach limitUsd
)

// Check returns the limit of modelID and 0, or the refusal of a model the
// key may not use at all (FriendNotAllowed, FriendModelDisabled). The first
// entry of a model counts, as with the legacy positional update.
func (f *FriendKey) Check(modelID string) (FriendLimit, FriendRefusal) {
	for _, l := range f.Limits {
		if l.ModelID != modelID {
			continue
		}
		switch {
		case l.Limit <= 0:
			return l, FriendNotAllowed
		case !l.Enabled:
			return l, FriendModelDisabled
		}
		return l, 0
	}
	return FriendLimit{}, FriendNotAllowed
}

// FriendLimitError is returned by ReserveFriend when the key may not spend
// on the model; nothing was reserved.
type FriendLimitError struct{ Reason FriendRefusal }

func (e *FriendLimitError) Error() string {
	switch e.Reason {
	case FriendModelDisabled:
		return "model disabled for friend key"
	case FriendLimitExceeded:
		return "friend key spending limit exceeded"
	}
	return "model not allowed for friend key"
}

// FriendHoldRequest asks for room under a friend key's limit for one
// request, before it is forwarded.
type FriendHoldRequest struct {
	// Key is the friend key (friend_keys._id).
	Key       string
	RequestID string
	// Model is the canonical model id; Slot and Limit are its limit as
	// cached with the key (FriendLimit), used for a first conditional
	// write that needs no read.
	Model string
	Slot  int
	Limit Nano
	// Want is the request's worst-case cost: the hold is Want, or the room
	// left under the limit when that is less. Min is the least room the
	// request needs; below it (or with no room at all) ReserveFriend
	// returns a FriendLimitError with FriendLimitExceeded.
	Want, Min Nano
	// Expires is when a hold never settled (its process died) stops
	// counting against the limit.
	Expires time.Time
}

// FriendHold is room reserved under a friend key's limit: it counts
// against the limit until SettleFriend replaces it by what the owner was
// actually charged.
type FriendHold struct {
	// Key is the friend key itself, so it is never encoded: a settlement
	// journaled to disk does not carry it, and the store then finds the
	// hold by its request id.
	Key       string `json:"-"`
	RequestID string
	Model     string
	Slot      int
	Amount    Nano
	Expires   time.Time
}

// FriendSettlement replaces a friend hold by what its request cost the
// owner.
type FriendSettlement struct {
	Hold FriendHold
	// Charged is what the owner's balance actually paid (the settlement's
	// receipt), never the price when the owner could not pay it: it is
	// added to usedUsd and totalUsedUsd.
	Charged Nano
	// Billed is true for a billed request: requestsCount and lastUsedAt
	// change too. A release (nothing billed) only gives the hold back.
	Billed bool
	At     time.Time
}

// FriendLedger keeps the friend keys' per-model limits. Both methods are
// safe to call again with the same arguments.
type FriendLedger interface {
	// ReserveFriend counts a hold against the key's limit for the model,
	// atomically: concurrent holds never reserve more than the limit has
	// room for. It returns *FriendLimitError when there is no room,
	// *AuthError when the key is gone (AuthInvalid) or deactivated
	// (AuthFriendInactive), and the existing hold when the request has one.
	ReserveFriend(ctx context.Context, req FriendHoldRequest) (FriendHold, error)
	// SettleFriend releases the hold and adds what was charged to the
	// key's usage, once: a hold already settled (or expired) is a no-op.
	SettleFriend(ctx context.Context, s FriendSettlement) error
	// SettleFriends is SettleFriend for several holds, those of one key
	// in one write where it can: what a batch of settlements costs the
	// friend keys.
	SettleFriends(ctx context.Context, s []FriendSettlement) error
}
