package billing

// UsageProblem says why the usage an upstream reported cannot be billed as
// it stands. The zero value, UsageValid, means it can.
type UsageProblem uint8

// The problems a usage reader reports. Their String forms are a fixed set,
// fit for a metric label.
const (
	UsageValid        UsageProblem = iota // the usage can be billed
	UsageMissing                          // "missing_usage": no usage object at all
	UsageFieldMissing                     // "missing_field": a required count is absent or null
	UsageNegative                         // "negative": a count below zero
	UsageNotNumber                        // "not_a_number": a count that is a string, bool, object or array
	UsageNotInteger                       // "not_an_integer": a count with a fractional part
	UsageBeyondWindow                     // "beyond_context_window": more tokens than the model's context window
	UsageCacheExceeds                     // "cache_exceeds_whole": cached tokens above the prompt they are part of
)

// UsageProblems lists every problem but UsageValid, in order.
var UsageProblems = []UsageProblem{
	UsageMissing, UsageFieldMissing, UsageNegative, UsageNotNumber, UsageNotInteger, UsageBeyondWindow, UsageCacheExceeds,
}

// String returns the problem's snake_case name ("valid" for UsageValid).
func (p UsageProblem) String() string {
	switch p {
	case UsageValid:
		return "valid"
	case UsageMissing:
		return "missing_usage"
	case UsageFieldMissing:
		return "missing_field"
	case UsageNegative:
		return "negative"
	case UsageNotNumber:
		return "not_a_number"
	case UsageNotInteger:
		return "not_an_integer"
	case UsageBeyondWindow:
		return "beyond_context_window"
	case UsageCacheExceeds:
		return "cache_exceeds_whole"
	}
	return "unknown"
}

// CheckWindow returns UsageBeyondWindow when u's four counts together
// exceed window tokens (DefaultContextWindow when window <= 0), or a count
// is negative (UsageNegative); UsageValid otherwise. A valid usage thus has
// every count in [0, MaxContextWindow], so its price and token sums can
// never overflow.
func (u Usage) CheckWindow(window int64) UsageProblem {
	if window <= 0 {
		window = DefaultContextWindow
	}
	if u.Input < 0 || u.Output < 0 || u.CacheWrite < 0 || u.CacheRead < 0 {
		return UsageNegative
	}
	if u.Total() > window {
		return UsageBeyondWindow
	}
	return UsageValid
}
