package billing

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestIsFriendKey(t *testing.T) {
	hex64 := strings.Repeat("0a", 32)
	assert.True(t, IsFriendKey(FriendKeyPrefix+hex64))
	assert.True(t, IsFriendKey(FriendKeyPrefix+strings.ToUpper(hex64)))
	for _, k := range []string{
		FriendKeyPrefix + hex64[:63],       // too short
		FriendKeyPrefix + hex64 + "0",      // too long
		FriendKeyPrefix + hex64[:63] + "g", // not hex
		"sk-trollllm-" + hex64,             // a user key
		"",
	} {
		assert.False(t, IsFriendKey(k), k)
	}
}

func TestFriendKeyCheck(t *testing.T) {
	f := &FriendKey{Limits: []FriendLimit{
		{ModelID: "a", Slot: 0, Limit: 10, Enabled: true},
		{ModelID: "b", Slot: 1, Limit: 0, Enabled: true},
		{ModelID: "c", Slot: 2, Limit: 10, Enabled: false},
		{ModelID: "a", Slot: 3, Limit: 99, Enabled: true},
	}}
	l, r := f.Check("a")
	assert.Zero(t, r)
	assert.Equal(t, 0, l.Slot, "the first entry of a model counts")
	_, r = f.Check("b")
	assert.Equal(t, FriendNotAllowed, r)
	_, r = f.Check("c")
	assert.Equal(t, FriendModelDisabled, r)
	_, r = f.Check("d")
	assert.Equal(t, FriendNotAllowed, r)
}

func TestFriendHoldPacking(t *testing.T) {
	h := FriendHold{Slot: 3, Amount: 12345, Expires: time.UnixMilli(1_700_000_000_123), Model: "odd|model.id"}
	got, err := DecodeFriendHold(EncodeFriendHold(h))
	require.NoError(t, err)
	assert.Equal(t, h.Slot, got.Slot)
	assert.Equal(t, h.Amount, got.Amount)
	assert.True(t, h.Expires.Equal(got.Expires))
	assert.Equal(t, h.Model, got.Model)
	_, err = DecodeFriendHold("h1|x")
	assert.Error(t, err)
}
