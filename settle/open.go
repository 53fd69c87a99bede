package settle

import (
	"strings"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// A hold served from a credit lease exists only in this process until its
// settlement is written: if the process dies while the request runs, the
// store has nothing the sweeper could charge, and the upstream's work
// would be free. JournalHold keeps such a hold in the journal while its
// request runs; the batch that settles the request marks it done with the
// settlement. The next run of the instance charges the holds still open in
// the journal under the orphan policy, as the sweeper charges a hold in
// the store, exactly once (the store recognises a request settled before).

// openPrefix starts the journal id of an open hold; the settlement of the
// same request is journaled under its bare request id.
const openPrefix = "open/"

func openID(requestID string) string { return openPrefix + requestID }

// JournalHold journals h, a hold served from a credit lease, while its
// request runs. Holds in the store need no journal: the sweeper finds them.
func (st *Settler) JournalHold(h billing.Hold) {
	j := st.journalOf()
	if j == nil || h.Lease == "" {
		return
	}
	if err := journal(j, openID(h.RequestID), &Settlement{Hold: h}); err != nil {
		st.log().Error("journaling a hold served from a credit lease failed", zap.String("request_id", h.RequestID), zap.Error(err))
	}
}

// journalIDs is what marks s done in the journal: its settlement, and the
// open hold of a hold served from a lease.
func journalIDs(s *Settlement) []string {
	var ids []string
	if s.journaled {
		ids = append(ids, s.Hold.RequestID)
	}
	if s.Hold.Lease != "" {
		ids = append(ids, openID(s.Hold.RequestID))
	}
	return ids
}

// recoverOpen keeps, of the open holds a previous run journaled, those
// whose settlement it did not journal: their requests died with it.
// settled names the request ids whose settlement was journaled.
func (st *Settler) recoverOpen(open []billing.Hold, settled map[string]bool) {
	st.retryMu.Lock()
	defer st.retryMu.Unlock()
	for _, h := range open {
		if !settled[h.RequestID] {
			st.open = append(st.open, h)
		}
	}
}

// chargeOpen charges the open holds of a previous run under the orphan
// policy. Those the database could not take are tried again at the next
// sweep.
func (st *Settler) chargeOpen() {
	st.retryMu.Lock()
	open := st.open
	st.open = nil
	st.retryMu.Unlock()
	if len(open) == 0 {
		return
	}
	policy := *st.policy.Load()
	var left []billing.Hold
	for _, h := range open {
		if st.resolveOne(billing.Orphan{Hold: h}, policy) {
			st.doneOpen(h)
		} else {
			left = append(left, h)
		}
	}
	st.retryMu.Lock()
	st.open = append(st.open, left...)
	st.retryMu.Unlock()
}

func (st *Settler) doneOpen(h billing.Hold) {
	if j := st.journalOf(); j != nil {
		if err := j.DoneAll([]string{openID(h.RequestID)}); err != nil {
			st.log().Warn("marking an open hold done in the spool failed", zap.String("request_id", h.RequestID), zap.Error(err))
		}
	}
}

// isOpen reports whether a journal record is an open hold.
func isOpen(id string) bool { return strings.HasPrefix(id, openPrefix) }
