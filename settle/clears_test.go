package settle

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A hot user's receipts go out with its holds at most clearsPerHold at a
// time, each once, none lost.
func TestTakeGivesAtMostClearsPerHold(t *testing.T) {
	var c receiptClears
	now := time.Unix(1000, 0)
	var ids []string
	for i := range 2*clearsPerHold + 10 {
		ids = append(ids, fmt.Sprintf("r%d", i))
	}
	c.add("u", ids, now)
	var got []string
	for range 3 {
		part := c.take("u")
		assert.LessOrEqual(t, len(part), clearsPerHold)
		got = append(got, part...)
	}
	assert.Equal(t, ids, got, "every receipt once, in order")
	assert.Empty(t, c.take("u"))

	c.add("u", ids[:clearsPerHold+1], now)
	require.Len(t, c.take("u"), clearsPerHold)
	c.add("u", []string{"late"}, now.Add(time.Second))
	assert.Equal(t, []string{ids[clearsPerHold], "late"}, c.take("u"), "what is left keeps its place")
}
