package mongostore

import (
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Holds and receipts are kept in the user's document as one string each,
// not as sub-documents: a document database rewrites the whole document on
// every update, and FerretDB's cost grows with the number of fields it
// holds (measured with `bench dbcost`: 20 holds as sub-documents made each
// write 3.7 times slower than the same holds packed as strings).
//
//	hold:    h1|<plan>|<taken,...>|<input>|<at ms>|<expires ms>|<owner>|<log id hex>|<model>|<key>
//	receipt: r1|<plan>|<taken,...>|<cost>|<charged>|<shortfall>|<by>|<at ms>|<log id hex>
//
// <plan> is billing.CreditPlan.String ("creditsNew", "credits+refCredits"),
// amounts are nano-USD, times Unix milliseconds. The format is the store's
// alone; the decoders are exported for the packages that read the store's
// documents directly (reconcile).

// EncodeHold packs a hold.
func EncodeHold(h billing.Hold) string {
	return strings.Join([]string{"h1", h.Plan.String(), joinNanos(h.Taken), strconv.FormatInt(int64(h.Input), 10),
		strconv.FormatInt(h.At.UnixMilli(), 10), strconv.FormatInt(h.Expires.UnixMilli(), 10),
		clean(h.Owner), h.LogID.String(), clean(h.Model), clean(h.KeyID)}, "|")
}

// DecodeHold unpacks a hold written by EncodeHold; RequestID and User are
// not in it.
func DecodeHold(s string) (billing.Hold, error) {
	p := strings.Split(s, "|")
	if len(p) != 10 || p[0] != "h1" {
		return billing.Hold{}, errors.New("not a packed hold")
	}
	var h billing.Hold
	var err error
	if h.Plan, err = billing.ParseCreditPlan(strings.Split(p[1], "+")); err != nil {
		return billing.Hold{}, fmt.Errorf("hold plan: %w", err)
	}
	if h.Taken, err = splitNanos(p[2]); err != nil || len(h.Taken) != len(h.Plan.Fields()) {
		return billing.Hold{}, fmt.Errorf("hold amounts %q", p[2])
	}
	in, err1 := strconv.ParseInt(p[3], 10, 64)
	at, err2 := strconv.ParseInt(p[4], 10, 64)
	exp, err3 := strconv.ParseInt(p[5], 10, 64)
	id, err4 := parseLogID(p[7])
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return billing.Hold{}, fmt.Errorf("hold: %w", err)
	}
	h.Input, h.At, h.Expires, h.Owner, h.LogID, h.Model, h.KeyID = billing.Nano(in), time.UnixMilli(at), time.UnixMilli(exp), p[6], id, p[8], p[9]
	return h, nil
}

// EncodeReceipt packs a receipt of a settlement on plan.
func EncodeReceipt(r billing.Receipt, plan billing.CreditPlan) string {
	return strings.Join([]string{"r1", plan.String(), joinNanos(r.Taken), strconv.FormatInt(int64(r.Cost), 10),
		strconv.FormatInt(int64(r.Charged), 10), strconv.FormatInt(int64(r.Shortfall), 10), clean(string(r.By)),
		strconv.FormatInt(r.At.UnixMilli(), 10), r.LogID.String()}, "|")
}

// DecodeReceipt unpacks a receipt written by EncodeReceipt; RequestID is
// not in it.
func DecodeReceipt(s string) (billing.Receipt, billing.CreditPlan, error) {
	p := strings.Split(s, "|")
	if len(p) != 9 || p[0] != "r1" {
		return billing.Receipt{}, billing.CreditPlan{}, errors.New("not a packed receipt")
	}
	plan, err := billing.ParseCreditPlan(strings.Split(p[1], "+"))
	if err != nil {
		return billing.Receipt{}, billing.CreditPlan{}, fmt.Errorf("receipt plan: %w", err)
	}
	var r billing.Receipt
	if r.Taken, err = splitNanos(p[2]); err != nil || len(r.Taken) != len(plan.Fields()) {
		return billing.Receipt{}, billing.CreditPlan{}, fmt.Errorf("receipt amounts %q", p[2])
	}
	cost, err1 := strconv.ParseInt(p[3], 10, 64)
	charged, err2 := strconv.ParseInt(p[4], 10, 64)
	short, err3 := strconv.ParseInt(p[5], 10, 64)
	at, err4 := strconv.ParseInt(p[7], 10, 64)
	id, err5 := parseLogID(p[8])
	if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
		return billing.Receipt{}, billing.CreditPlan{}, fmt.Errorf("receipt: %w", err)
	}
	r.Fields, r.Cost, r.Charged, r.Shortfall, r.By, r.At, r.LogID = plan.Fields(), billing.Nano(cost), billing.Nano(charged), billing.Nano(short), billing.SettleSource(p[6]), time.UnixMilli(at), id
	return r, plan, nil
}

// encodeFriendHold packs a friend hold as the store keeps it in
// llmFriendHolds (the model last: it may hold the separator):
//
//	f1|<slot>|<amount nano>|<expires ms>|<model>
func encodeFriendHold(h billing.FriendHold) string {
	return strings.Join([]string{"f1", strconv.Itoa(h.Slot), strconv.FormatInt(int64(h.Amount), 10),
		strconv.FormatInt(h.Expires.UnixMilli(), 10), h.Model}, "|")
}

// decodeFriendHold unpacks a friend hold written by encodeFriendHold; Key
// and RequestID are not in it.
func decodeFriendHold(s string) (billing.FriendHold, error) {
	p := strings.SplitN(s, "|", 5)
	if len(p) != 5 || p[0] != "f1" {
		return billing.FriendHold{}, errors.New("not a packed friend hold")
	}
	slot, err1 := strconv.Atoi(p[1])
	amount, err2 := strconv.ParseInt(p[2], 10, 64)
	exp, err3 := strconv.ParseInt(p[3], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return billing.FriendHold{}, fmt.Errorf("friend hold: %w", err)
	}
	return billing.FriendHold{Slot: slot, Amount: billing.Nano(amount), Expires: time.UnixMilli(exp), Model: p[4]}, nil
}

func joinNanos(ns []billing.Nano) string {
	parts := make([]string, len(ns))
	for i, n := range ns {
		parts[i] = strconv.FormatInt(int64(n), 10)
	}
	return strings.Join(parts, ",")
}

func splitNanos(s string) ([]billing.Nano, error) {
	parts := strings.Split(s, ",")
	out := make([]billing.Nano, len(parts))
	for i, p := range parts {
		n, err := strconv.ParseInt(p, 10, 64)
		if err != nil {
			return nil, err
		}
		out[i] = billing.Nano(n)
	}
	return out, nil
}

func parseLogID(s string) (billing.LogID, error) {
	var id billing.LogID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(id) {
		return id, fmt.Errorf("log id %q", s)
	}
	copy(id[:], b)
	return id, nil
}

// clean keeps the separator out of free-text parts.
func clean(s string) string { return strings.ReplaceAll(s, "|", "_") }
