package ledgertest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// InsertRequestLogs inserts the rows, as the MongoDB store does: a row
// whose ID exists already was written before (a retry, a replay, the
// sweeper) and is neither inserted again nor an error; the store counts it
// (Snapshot.DuplicateLogs). A row without an ID gets a fresh one, made of
// its CreatedAt and a counter, so that runs repeat.
func (s *Store) InsertRequestLogs(ctx context.Context, logs []billing.RequestLog) error {
	if len(logs) == 0 {
		return nil
	}
	f, err := s.enter(ctx, OpInsertLogs)
	if err != nil {
		return fmt.Errorf("inserting request logs: %w", err)
	}
	defer s.mu.Unlock()
	for _, row := range logs {
		if row.ID.IsZero() {
			row.ID = s.freshLogID(row)
		}
		if _, ok := s.logs[row.ID]; ok {
			s.dupLogs++
			continue
		}
		s.logs[row.ID] = cloneLog(row)
		s.logOrder = append(s.logOrder, row.ID)
	}
	if f == FailAfter {
		return fmt.Errorf("inserting request logs: %w", &FaultError{Op: OpInsertLogs, Fault: f})
	}
	return nil
}

// freshLogID is an ObjectID-shaped id: CreatedAt in seconds, then a
// counter instead of NewLogID's random bytes.
func (s *Store) freshLogID(row billing.RequestLog) billing.LogID {
	var id billing.LogID
	binary.BigEndian.PutUint32(id[:4], uint32(row.CreatedAt.Unix()))
	s.nextLogID++
	binary.BigEndian.PutUint64(id[4:], s.nextLogID)
	return id
}

func cloneLog(row billing.RequestLog) billing.RequestLog {
	row.TakenNano = maps.Clone(row.TakenNano)
	row.Attempts = slices.Clone(row.Attempts)
	return row
}

// AddUsage records the batch, as the MongoDB store adds its counters: a
// batch whose Writer and Seq were seen before adds nothing. The batches are
// kept for inspection (Snapshot.Usage), not summed.
func (s *Store) AddUsage(ctx context.Context, batch billing.UsageBatch) error {
	if batch.Seq == "" {
		return errors.New("adding usage: a batch needs a Seq")
	}
	f, err := s.enter(ctx, OpAddUsage)
	if err != nil {
		return fmt.Errorf("adding usage: %w", err)
	}
	defer s.mu.Unlock()
	if k := batch.Writer + "\x00" + batch.Seq; !s.usageSeen[k] {
		s.usageSeen[k] = true
		batch.Counters = slices.Clone(batch.Counters)
		s.usage = append(s.usage, batch)
	}
	if f == FailAfter {
		return fmt.Errorf("adding usage: %w", &FaultError{Op: OpAddUsage, Fault: f})
	}
	return nil
}
