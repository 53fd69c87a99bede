package mongostore

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func TestPackedHoldAndReceiptRoundTrip(t *testing.T) {
	plan, _ := billing.ParseCreditPlan([]string{"credits", "refCredits"})
	at := time.UnixMilli(time.Now().UnixMilli())
	h := billing.Hold{Plan: plan, Taken: []billing.Nano{500, 7}, Input: 90, Owner: "0b7c1f0e-9f5a/5f2a", At: at, Expires: at.Add(time.Minute),
		LogID: billing.NewLogID(at), Model: "glm|4.6", KeyID: "sk-troll...8c70"}
	got, err := DecodeHold(EncodeHold(h))
	require.NoError(t, err)
	assert.Equal(t, "credits+refCredits", got.Plan.String(), "hold plan")
	assert.Equal(t, billing.Nano(507), got.Amount(), "hold amount")
	assert.Equal(t, billing.Nano(90), got.Input, "hold input")
	assert.True(t, got.At.Equal(at), "hold at %v, want %v", got.At, at)
	assert.True(t, got.Expires.Equal(h.Expires), "hold expires %v, want %v", got.Expires, h.Expires)
	assert.Equal(t, h.Owner, got.Owner, "hold owner")
	assert.Equal(t, h.LogID, got.LogID, "hold log id")
	assert.Equal(t, "glm_4.6", got.Model, "hold model")
	assert.Equal(t, h.KeyID, got.KeyID, "hold key id")

	r := billing.Receipt{Taken: []billing.Nano{500, 3}, Cost: 510, Charged: 503, Shortfall: 7, By: billing.SettledBySweeper, At: at, LogID: h.LogID}
	gr, gp, err := DecodeReceipt(EncodeReceipt(r, plan))
	require.NoError(t, err)
	assert.Equal(t, plan.String(), gp.String(), "receipt plan")
	assert.Equal(t, billing.Nano(503), gr.Charged, "receipt charged")
	assert.Equal(t, billing.Nano(7), gr.Shortfall, "receipt shortfall")
	assert.Equal(t, billing.Nano(510), gr.Cost, "receipt cost")
	assert.Equal(t, billing.SettledBySweeper, gr.By, "receipt by")
	if assert.Len(t, gr.Taken, 2, "receipt taken") {
		assert.Equal(t, billing.Nano(3), gr.Taken[1], "receipt taken[1]")
	}
	assert.True(t, gr.At.Equal(at), "receipt at %v, want %v", gr.At, at)
	assert.Equal(t, h.LogID, gr.LogID, "receipt log id")
	assert.Len(t, gr.Fields, 2, "receipt fields")

	for _, bad := range []string{"", "h1|creditsNew", "h1|creditsNew|x|1|2|3|o|00|m|k", "h2|creditsNew|1|1|2|3|o|" + h.LogID.String() + "|m|k", "h1|bogus|1|1|2|3|o|" + h.LogID.String() + "|m|k"} {
		_, err := DecodeHold(bad)
		assert.Error(t, err, "DecodeHold(%q) accepted", bad)
	}
	_, _, err = DecodeReceipt("r1|creditsNew|1,2|1|1|0|request|1|" + h.LogID.String())
	assert.Error(t, err, "a receipt with more amounts than fields was accepted")
}

func TestFriendHoldPacking(t *testing.T) {
	h := billing.FriendHold{Slot: 3, Amount: 12345, Expires: time.UnixMilli(1_700_000_000_123), Model: "odd|model.id"}
	got, err := decodeFriendHold(encodeFriendHold(h))
	require.NoError(t, err)
	assert.Equal(t, h.Slot, got.Slot)
	assert.Equal(t, h.Amount, got.Amount)
	assert.True(t, h.Expires.Equal(got.Expires))
	assert.Equal(t, h.Model, got.Model)
	_, err = decodeFriendHold("h1|x")
	assert.Error(t, err)
}
