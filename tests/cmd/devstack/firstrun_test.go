package main

import (
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"
)

func TestCheckFreeRefusesTakenAddress(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()

	err = checkFree(ln.Addr().String(), "admin")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "already in use")
	assert.Contains(t, err.Error(), "-admin")

	addr, err := freeAddr()
	require.NoError(t, err)
	assert.NoError(t, checkFree(addr, "admin"))
}

func TestFormatRow(t *testing.T) {
	r := logRow{ID: bson.NewObjectID(), CreatedAt: time.Now(), Endpoint: "/v1/messages", Model: "claude-sonnet-4-5",
		InputTokens: 12, OutputTokens: 34, CostNano: 1_234_567, CreditField: "creditsNew", UserID: "demo", UsageSource: "upstream"}
	line := formatRow(r, map[string]string{"creditsNew": "chat"})
	for _, want := range []string{"chat", "/v1/messages", "claude-sonnet-4-5", "in 12 out 34", "$0.001234567", "pool creditsNew", "user demo"} {
		assert.Contains(t, line, want)
	}
}

func TestFormatBalances(t *testing.T) {
	doc := bson.M{"creditsNew": 9.5, "credits": 1.25, "refCredits": 0.0}
	assert.Equal(t, "  left creditsNew $9.500000", formatBalances(doc, "creditsNew"))
	assert.Equal(t, "  left credits $1.250000 refCredits $0.000000", formatBalances(doc, "credits+refCredits"))
}
