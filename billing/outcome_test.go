package billing

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// Measure decides each answer's usage source, end reason and problem; an
// untrusted usage is bound, never billed as reported.
func TestMeasure(t *testing.T) {
	valid := StreamResult{Usage: Usage{Input: 10, Output: 5}, HasUsage: true, Done: true, TextBytes: 400}
	partial := valid
	partial.Done = false
	noUsage := StreamResult{Done: true, TextBytes: 400, Problem: UsageMissing}
	cutNoUsage := StreamResult{TextBytes: 400, Problem: UsageMissing}
	bad := valid
	bad.Problem = UsageNegative
	errored := cutNoUsage
	errored.Errored = true
	est := Usage{Input: EstimateTokens(1000), Output: EstimateTokens(400)}
	tests := []struct {
		name string
		a    Answer
		want Outcome
	}{
		{"json with usage", Answer{API: Anthropic, Body: []byte(`{"usage":{"input_tokens":10,"output_tokens":5}}`), Bytes: 50},
			Outcome{Usage: Usage{Input: 10, Output: 5}, Source: SourceUpstream, End: "complete"}},
		{"json without usage is bound", Answer{API: Anthropic, Body: []byte(`{"id":"x"}`)},
			Outcome{Usage: Usage{}, Source: SourceHoldMissing, End: "complete", Problem: "missing_usage", Bound: true}},
		{"json with bad usage is bound", Answer{API: OpenAI, Body: []byte(`{"usage":{"prompt_tokens":-1,"completion_tokens":5}}`)},
			Outcome{Usage: Usage{}, Source: SourceHoldInvalid, End: "complete", Problem: "negative", Bound: true}},
		{"json too large is estimated", Answer{API: OpenAI, Overflow: true, Bytes: 400, RequestBytes: 1000},
			Outcome{Usage: est, Source: SourceEstimated, End: "no_usage"}},
		{"json not json is estimated, client gone", Answer{API: OpenAI, Body: []byte(`<html>`), Bytes: 400, RequestBytes: 1000, ClientGone: true},
			Outcome{Usage: est, Source: SourceEstimated, End: "client_gone"}},
		{"stream complete", Answer{Stream: true, Scan: valid},
			Outcome{Usage: valid.Usage, Source: SourceUpstream, End: "complete"}},
		{"stream cut after usage: never less output than seen", Answer{Stream: true, Scan: partial},
			Outcome{Usage: Usage{Input: 10, Output: EstimateTokens(400)}, Source: SourcePartial, End: "upstream_cut"}},
		{"stream done without usage is bound", Answer{Stream: true, Scan: noUsage},
			Outcome{Source: SourceHoldMissing, End: "complete", Problem: "missing_usage", Bound: true}},
		{"stream with bad usage is bound", Answer{Stream: true, Scan: bad},
			Outcome{Usage: bad.Usage, Source: SourceHoldInvalid, End: "complete", Problem: "negative", Bound: true}},
		{"stream cut before usage is estimated", Answer{Stream: true, Scan: cutNoUsage, RequestBytes: 1000},
			Outcome{Usage: est, Source: SourceEstimated, End: "upstream_cut", Problem: ProblemCutBeforeUsage}},
		{"stream error before usage", Answer{Stream: true, Scan: errored, RequestBytes: 1000},
			Outcome{Usage: est, Source: SourceEstimated, End: "upstream_error", Problem: ProblemCutBeforeUsage}},
		{"stream the client left: estimated, no problem", Answer{Stream: true, Scan: cutNoUsage, RequestBytes: 1000, ClientGone: true},
			Outcome{Usage: est, Source: SourceEstimated, End: "client_gone"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, Measure(tt.a))
		})
	}
}
