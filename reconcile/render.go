package reconcile

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// WriteText writes the report for a human: the summary, the outstanding
// holds, the external movements, then each drift item, and a last line
// that starts with "OK" or "DRIFT".
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	r.writeSummary(&b)
	if len(r.Holds) > 0 {
		writeTable(&b, "Outstanding holds", "  STATE\tUSER\tREQUEST\tAMOUNT\tFIELDS\tAT\tEXPIRES\tOWNER", func(tw io.Writer) {
			for _, h := range r.Holds {
				state := "in-flight"
				if h.Leftover {
					state = "LEFTOVER"
				}
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", state, h.User, h.RequestID, h.Amount,
					holdFields(h), timeText(h.At), timeText(h.Exp), h.Owner)
			}
		})
	}
	if len(r.External) > 0 {
		writeTable(&b, "External balance movements since the baseline", "  USER\tFIELD\tAMOUNT\tVERDICT", func(tw io.Writer) {
			for _, m := range r.External {
				verdict := "drift"
				if m.Allowed {
					verdict = "allowed (credit)"
				}
				if m.Detail != "" {
					verdict += "; " + m.Detail
				}
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", m.User, m.Field, signed(m.Amount), verdict)
			}
		})
	}
	if len(r.Drift) > 0 {
		writeTable(&b, "Drift", "  KIND\tUSER\tFIELD\tAMOUNT\tREQUEST\tDETAIL", func(tw io.Writer) {
			for _, it := range r.Drift {
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\n", it.Kind, dash(it.User), dash(it.Field), it.Amount, dash(it.RequestID), it.Detail)
			}
		})
		fmt.Fprintf(&b, "\nDRIFT: %d item(s)\n", len(r.Drift))
	} else {
		b.WriteString("\nOK: the ledger, the request logs and the balances agree\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeSummary writes the report's summary lines: when and what was
// checked, the totals, and the baseline with its movements.
func (r *Report) writeSummary(b *strings.Builder) {
	fmt.Fprintf(b, "llm-billing reconcile at %s\n", r.Now.UTC().Format(time.RFC3339))
	fmt.Fprintf(b, "window:            %s\n", windowText(r.Since, r.Until))
	fmt.Fprintf(b, "users checked:     %d\n", r.UsersChecked)
	fmt.Fprintf(b, "log rows checked:  %d\n", r.RowsChecked)
	fmt.Fprintf(b, "charged:           %s\n", r.Charged)
	fmt.Fprintf(b, "shortfall:         %s\n", r.Shortfall)
	fmt.Fprintf(b, "holds:             %d outstanding, %d leftover\n", r.HoldsOutstanding, r.HoldsLeftover)
	if r.ReceiptsPending > 0 {
		fmt.Fprintf(b, "receipts:          %d settled hold(s) awaiting their log row\n", r.ReceiptsPending)
	}
	if r.BaselineAt.IsZero() {
		fmt.Fprintf(b, "baseline:          none (balances checked for negatives only)\n")
		return
	}
	allowed := 0
	for _, m := range r.External {
		if m.Allowed {
			allowed++
		}
	}
	fmt.Fprintf(b, "baseline:          %s, %d external movement(s), %d allowed\n", r.BaselineAt.UTC().Format(time.RFC3339), len(r.External), allowed)
}

// writeTable writes a blank line, title and a table whose columns (cells
// separated by tabs) are aligned: header, then the rows rows writes.
func writeTable(b *strings.Builder, title, header string, rows func(tw io.Writer)) {
	b.WriteString("\n" + title + ":\n")
	tw := tabwriter.NewWriter(b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	rows(tw)
	_ = tw.Flush()
}

// jsonReport is the JSON form of a Report (see WriteJSON).
type jsonReport struct {
	OK               bool           `json:"ok"`
	Now              time.Time      `json:"now"`
	Since            *time.Time     `json:"since,omitempty"`
	Until            *time.Time     `json:"until,omitempty"`
	BaselineAt       *time.Time     `json:"baselineAt,omitempty"`
	UsersChecked     int            `json:"usersChecked"`
	RowsChecked      int            `json:"rowsChecked"`
	Charged          string         `json:"charged"`
	ChargedNano      billing.Nano   `json:"chargedNano"`
	Shortfall        string         `json:"shortfall"`
	ShortfallNano    billing.Nano   `json:"shortfallNano"`
	HoldsOutstanding int            `json:"holdsOutstanding"`
	HoldsLeftover    int            `json:"holdsLeftover"`
	ReceiptsPending  int            `json:"receiptsPending"`
	DriftCount       int            `json:"driftCount"`
	Holds            []jsonHold     `json:"holds"`
	External         []jsonMovement `json:"external"`
	Drift            []jsonItem     `json:"drift"`
}

// jsonHold is the JSON form of a Hold.
type jsonHold struct {
	User      string       `json:"user"`
	RequestID string       `json:"requestId"`
	Fields    []string     `json:"fields"`
	Amounts   []int64      `json:"amountsNano"`
	Amount    string       `json:"amount"`
	AmountN   billing.Nano `json:"amountNano"`
	At        *time.Time   `json:"at,omitempty"`
	Exp       *time.Time   `json:"exp,omitempty"`
	Owner     string       `json:"owner,omitempty"`
	LogID     string       `json:"logId,omitempty"`
	Leftover  bool         `json:"leftover"`
	Reason    string       `json:"reason,omitempty"`
}

// jsonMovement is the JSON form of a Movement.
type jsonMovement struct {
	User    string       `json:"user"`
	Field   string       `json:"field"`
	Amount  string       `json:"amount"`
	AmountN billing.Nano `json:"amountNano"`
	Allowed bool         `json:"allowed"`
	Detail  string       `json:"detail,omitempty"`
}

// jsonItem is the JSON form of an Item.
type jsonItem struct {
	Kind      Kind         `json:"kind"`
	User      string       `json:"user,omitempty"`
	Field     string       `json:"field,omitempty"`
	RequestID string       `json:"requestId,omitempty"`
	Amount    string       `json:"amount"`
	AmountN   billing.Nano `json:"amountNano"`
	Detail    string       `json:"detail"`
}

// WriteJSON writes the report as one indented JSON object. Amounts appear
// twice: as text ("$0.010000000", billing.Nano.String) and as integers in
// nano-USD (the fields ending in "Nano").
func (r *Report) WriteJSON(w io.Writer) error {
	out := jsonReport{
		OK: r.OK(), Now: r.Now.UTC(), Since: optTime(r.Since), Until: optTime(r.Until), BaselineAt: optTime(r.BaselineAt),
		UsersChecked: r.UsersChecked, RowsChecked: r.RowsChecked,
		Charged: r.Charged.String(), ChargedNano: r.Charged, Shortfall: r.Shortfall.String(), ShortfallNano: r.Shortfall,
		HoldsOutstanding: r.HoldsOutstanding, HoldsLeftover: r.HoldsLeftover, ReceiptsPending: r.ReceiptsPending,
		DriftCount: len(r.Drift),
		Holds:      []jsonHold{}, External: []jsonMovement{}, Drift: []jsonItem{},
	}
	for _, h := range r.Holds {
		amts := make([]int64, len(h.Amounts))
		for i, a := range h.Amounts {
			amts[i] = int64(a)
		}
		out.Holds = append(out.Holds, jsonHold{
			User: h.User, RequestID: h.RequestID, Fields: h.Fields, Amounts: amts, Amount: h.Amount.String(), AmountN: h.Amount,
			At: optTime(h.At), Exp: optTime(h.Exp), Owner: h.Owner, LogID: h.LogID, Leftover: h.Leftover, Reason: h.Reason,
		})
	}
	for _, m := range r.External {
		out.External = append(out.External, jsonMovement{User: m.User, Field: m.Field, Amount: m.Amount.String(), AmountN: m.Amount, Allowed: m.Allowed, Detail: m.Detail})
	}
	for _, it := range r.Drift {
		out.Drift = append(out.Drift, jsonItem{Kind: it.Kind, User: it.User, Field: it.Field, RequestID: it.RequestID,
			Amount: it.Amount.String(), AmountN: it.Amount, Detail: it.Detail})
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

func windowText(since, until time.Time) string {
	switch {
	case since.IsZero() && until.IsZero():
		return "all time"
	case until.IsZero():
		return "from " + since.UTC().Format(time.RFC3339)
	case since.IsZero():
		return "until " + until.UTC().Format(time.RFC3339)
	}
	return since.UTC().Format(time.RFC3339) + " to " + until.UTC().Format(time.RFC3339)
}

func holdFields(h Hold) string {
	parts := make([]string, len(h.Fields))
	for i, f := range h.Fields {
		parts[i] = f + " " + h.Amounts[i].String()
	}
	return strings.Join(parts, ", ")
}

func timeText(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func optTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}

func signed(n billing.Nano) string {
	if n > 0 {
		return "+" + n.String()
	}
	return n.String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
