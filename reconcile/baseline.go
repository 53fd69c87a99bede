package reconcile

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// BaselineVersion is the format version written in a baseline file.
const BaselineVersion = 1

// Baseline is a checkpoint of every user's balances and llmNet, taken by a
// run ([Report.Baseline]) and compared against by a later one
// ([Options.Baseline]). It is stored as JSON:
//
//	{"version": 1, "takenAt": "2026-05-01T12:00:00Z",
//	 "users": {"alice": {"creditsNew": {"balanceNano": 9980000000, "netNano": -20000000}}}}
//
// A field missing from a user reads as a zero balance and a zero llmNet.
type Baseline struct {
	Version int       `json:"version"`
	TakenAt time.Time `json:"takenAt"`
	// Users maps usersNew _id to field to its values.
	Users map[string]map[string]BaselineField `json:"users"`
}

// BaselineField is one balance field of one user at the baseline.
type BaselineField struct {
	// Balance is the balance in nano-USD (billing.NanoFromUSD of the double).
	Balance billing.Nano `json:"balanceNano"`
	// Net is llmNet.<field>.
	Net billing.Nano `json:"netNano"`
}

// ReadBaselineFile reads a baseline written by WriteBaselineFile.
func ReadBaselineFile(path string) (*Baseline, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading baseline: %w", err)
	}
	var b Baseline
	if err := json.Unmarshal(data, &b); err != nil {
		return nil, fmt.Errorf("reading baseline %s: %w", path, err)
	}
	switch {
	case b.Version != BaselineVersion:
		return nil, fmt.Errorf("reading baseline %s: version %d, want %d", path, b.Version, BaselineVersion)
	case b.TakenAt.IsZero():
		return nil, fmt.Errorf("reading baseline %s: no takenAt", path)
	}
	if b.Users == nil {
		b.Users = map[string]map[string]BaselineField{}
	}
	return &b, nil
}

// WriteBaselineFile writes b to path atomically (a temporary file renamed
// over it), readable by its owner only: it holds every user's balance.
func WriteBaselineFile(path string, b *Baseline) error {
	if b == nil {
		return errors.New("writing baseline: nothing to write")
	}
	data, err := json.MarshalIndent(b, "", "  ")
	if err != nil {
		return fmt.Errorf("writing baseline: %w", err)
	}
	data = append(data, '\n')
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("writing baseline: %w", err)
	}
	tmp := f.Name()
	defer func() { _ = os.Remove(tmp) }() // no-op once renamed
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		return fmt.Errorf("writing baseline: %w", err)
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return fmt.Errorf("writing baseline: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing baseline: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("writing baseline: %w", err)
	}
	return nil
}
