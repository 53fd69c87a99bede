package billing

import (
	"testing"
	"time"
)

func TestPackedHoldAndReceiptRoundTrip(t *testing.T) {
	plan, _ := ParseCreditPlan([]string{"credits", "refCredits"})
	at := time.UnixMilli(time.Now().UnixMilli())
	h := Hold{Plan: plan, Taken: []Nano{500, 7}, Input: 90, Owner: "0b7c1f0e-9f5a/5f2a", At: at, Expires: at.Add(time.Minute),
		LogID: NewLogID(at), Model: "glm|4.6", KeyID: "sk-troll...8c70"}
	got, err := DecodeHold(EncodeHold(h))
	if err != nil {
		t.Fatal(err)
	}
	if got.Plan.String() != "credits+refCredits" || got.Amount() != 507 || got.Input != 90 || !got.At.Equal(at) || !got.Expires.Equal(h.Expires) ||
		got.Owner != h.Owner || got.LogID != h.LogID || got.Model != "glm_4.6" || got.KeyID != h.KeyID {
		t.Fatalf("hold round trip: %+v", got)
	}
	r := Receipt{Taken: []Nano{500, 3}, Cost: 510, Charged: 503, Shortfall: 7, By: SettledBySweeper, At: at, LogID: h.LogID}
	gr, gp, err := DecodeReceipt(EncodeReceipt(r, plan))
	if err != nil {
		t.Fatal(err)
	}
	if gp.String() != plan.String() || gr.Charged != 503 || gr.Shortfall != 7 || gr.Cost != 510 || gr.By != SettledBySweeper ||
		gr.Taken[1] != 3 || !gr.At.Equal(at) || gr.LogID != h.LogID || len(gr.Fields) != 2 {
		t.Fatalf("receipt round trip: %+v", gr)
	}
	for _, bad := range []string{"", "h1|creditsNew", "h1|creditsNew|x|1|2|3|o|00|m|k", "h2|creditsNew|1|1|2|3|o|" + h.LogID.String() + "|m|k", "h1|bogus|1|1|2|3|o|" + h.LogID.String() + "|m|k"} {
		if _, err := DecodeHold(bad); err == nil {
			t.Errorf("DecodeHold(%q) accepted", bad)
		}
	}
	if _, _, err := DecodeReceipt("r1|creditsNew|1,2|1|1|0|request|1|" + h.LogID.String()); err == nil {
		t.Error("a receipt with more amounts than fields was accepted")
	}
}
