package billing

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
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
