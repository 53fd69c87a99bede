package billing

// The request log's usageSource values: where the usage billed for a 2xx
// answer came from (the README lists them).
const (
	// SourceUpstream: the upstream's usage, complete and valid.
	SourceUpstream = "upstream"
	// SourcePartial: the valid usage reported before the stream ended
	// early, with output never below what was seen.
	SourcePartial = "upstream_partial"
	// SourceEstimated: no usage, and none was due any more: a stream cut
	// (by the upstream, or by the gateway after its client left), or a
	// body that is not JSON or too large to keep. Estimated from the bytes.
	SourceEstimated = "estimated"
	// SourceHoldInvalid / SourceHoldMissing: the usage is invalid, or is
	// missing from an answer that promised it; the hold is billed.
	SourceHoldInvalid = "hold_invalid_usage"
	SourceHoldMissing = "hold_missing_usage"
	// SourceBoundInvalid / SourceBoundMissing: the same under hold check,
	// where there is no hold: billed the most the client could have
	// caused, its body's bytes as input tokens plus max_tokens of output.
	SourceBoundInvalid = "bound_invalid_usage"
	SourceBoundMissing = "bound_missing_usage"
	// SourceHoldFallback: the sweeper resolved an orphaned hold under the
	// orphan policy (OrphanRequestLog).
	SourceHoldFallback = "hold_fallback"
	// SourceReceipt: the row of a settled request rebuilt from its receipt.
	SourceReceipt = "receipt"
)

// ProblemCutBeforeUsage is the usage problem of a stream the upstream
// ended (cut, or with an error event) before any usage.
const ProblemCutBeforeUsage = "cut_before_usage"

// Answer is what the gateway saw of a 2xx answer.
type Answer struct {
	API API
	// Stream: an event stream, read by an SSEScanner (Scan); otherwise a
	// JSON body, kept whole (Body) unless it was too large (Overflow).
	Stream   bool
	Scan     StreamResult
	Body     []byte
	Overflow bool
	// Bytes is the size of the answer's body.
	Bytes int64
	// RequestBytes is the size of the forwarded request body.
	RequestBytes  int64
	ContextWindow int64
	// ClientGone: the client left before the answer ended.
	ClientGone bool
}

// Outcome is what a 2xx answer is billed for.
type Outcome struct {
	Usage  Usage
	Source string // the request log's usageSource
	End    string // the request log's endReason
	// Problem is why the upstream's usage is not billed as reported (a
	// UsageProblem's name, or ProblemCutBeforeUsage), "" when it is.
	Problem string
	// Bound: Usage cannot be trusted; bill the hold (or, with no hold, the
	// most the request could have used).
	Bound bool
}

// Measure decides what an answer is billed for. Usage that is invalid, or
// missing where it was due, is never billed as reported: the outcome is
// Bound. Usage is due on a non-streaming JSON answer, and on a stream that
// ended normally (the gateway forces include_usage on OpenAI streams;
// Anthropic always reports). A stream that ended early without usage is
// estimated instead: if the upstream cut it, the client could not have
// caused that and the hold would bill max_tokens for a broken answer; if
// the gateway cut it (client_disconnect stop, or the drain timeout), the
// upstream stopped generating too, and the estimate covers what was sent.
func Measure(a Answer) Outcome {
	if a.Stream {
		return measureStream(a)
	}
	est := Usage{Input: EstimateTokens(a.RequestBytes), Output: EstimateTokens(a.Bytes)}
	r := Outcome{Source: SourceEstimated, End: "no_usage", Usage: est}
	if a.ClientGone {
		r.End = "client_gone"
	}
	if a.Overflow {
		return r
	}
	u, problem, err := ParseUsageJSON(a.API, a.Body, a.ContextWindow)
	switch {
	case err != nil:
		return r
	case problem == UsageMissing:
		r.Source, r.Problem, r.Bound = SourceHoldMissing, problem.String(), true
	case problem != UsageValid:
		r.Source, r.Problem, r.Bound = SourceHoldInvalid, problem.String(), true
	default:
		r.Usage, r.Source = u, SourceUpstream
	}
	if !a.ClientGone {
		r.End = "complete"
	}
	return r
}

// measureStream is Measure for an event stream.
func measureStream(a Answer) Outcome {
	res := a.Scan
	r := Outcome{Usage: res.Usage, Source: SourceUpstream, End: "complete"}
	switch {
	case a.ClientGone:
		r.End = "client_gone"
	case res.Done:
	case res.Errored:
		r.End = "upstream_error"
	default:
		r.End = "upstream_cut"
	}
	switch {
	case res.Problem == UsageValid && !res.Done:
		// Ended before the final usage: never bill less output than seen.
		r.Usage.Output = max(r.Usage.Output, EstimateTokens(res.TextBytes))
		r.Source = SourcePartial
	case res.Problem == UsageValid:
	case res.Problem != UsageMissing:
		r.Source, r.Problem, r.Bound = SourceHoldInvalid, res.Problem.String(), true
	case res.Done:
		r.Source, r.Problem, r.Bound = SourceHoldMissing, res.Problem.String(), true
	default:
		r.Usage = Usage{Input: EstimateTokens(a.RequestBytes), Output: EstimateTokens(res.TextBytes)}
		r.Source = SourceEstimated
		if !a.ClientGone {
			r.Problem = ProblemCutBeforeUsage
		}
	}
	return r
}
