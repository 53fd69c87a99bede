package settle

import (
	"context"
	"sync"
	"time"
)

// waitingSettlements counts, per user, the settlements submitted and not
// yet settled, so that a hold refused for want of credit can first wait
// for the user's own earlier requests to give back the rest of their holds.
type waitingSettlements struct {
	mu     sync.Mutex
	users  map[string]int
	change chan struct{} // closed and replaced whenever settlements finish
}

func (w *waitingSettlements) add(s *Settlement) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.users == nil {
		w.users = map[string]int{}
		w.change = make(chan struct{})
	}
	w.users[s.Hold.User]++
	s.queued = true
}

func (w *waitingSettlements) done(ss []*Settlement) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, s := range ss {
		if !s.queued {
			continue // replayed from the journal: never counted
		}
		s.queued = false
		n++
		if w.users[s.Hold.User]--; w.users[s.Hold.User] <= 0 {
			delete(w.users, s.Hold.User)
		}
	}
	if n > 0 {
		close(w.change)
		w.change = make(chan struct{})
	}
}

// pending returns how many of the user's settlements are waiting, and a
// channel closed when some settlement finishes.
func (w *waitingSettlements) pending(user string) (int, <-chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.users[user], w.change
}

// AwaitUser waits, at most d, until none of the user's settlements is
// waiting; it reports whether there were any to wait for. It tells the
// collector not to linger.
func (st *Settler) AwaitUser(ctx context.Context, user string, d time.Duration) bool {
	n, change := st.waiting.pending(user)
	if n == 0 {
		return false
	}
	select {
	case st.hurry <- struct{}{}:
	default:
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for n > 0 {
		select {
		case <-change:
		case <-t.C:
			return true
		case <-ctx.Done():
			return true
		}
		n, change = st.waiting.pending(user)
	}
	return true
}
