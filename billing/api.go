package billing

// API identifies the wire format of a request and its response.
type API uint8

const (
	// OpenAI is the Chat Completions API (POST /v1/chat/completions).
	OpenAI API = iota + 1
	// Anthropic is the Messages API (POST /v1/messages).
	Anthropic
)

// String returns "openai" or "anthropic".
func (a API) String() string {
	switch a {
	case OpenAI:
		return "openai"
	case Anthropic:
		return "anthropic"
	}
	return "unknown"
}

// Usage is the token usage of one response, normalised so that the four
// counts never overlap: Input excludes every cached token, whatever the API
// reported.
//
// Anthropic reports input_tokens exclusive of cache_creation_input_tokens and
// cache_read_input_tokens, so the numbers are taken as they are. OpenAI
// reports prompt_tokens inclusive of prompt_tokens_details.cached_tokens (and,
// from LiteLLM, of a top-level cache_creation_input_tokens), so Input is
// prompt_tokens minus those, never below zero.
type Usage struct {
	Input      int64 // uncached input tokens
	Output     int64 // output tokens, thinking included
	CacheWrite int64 // tokens written to the prompt cache
	CacheRead  int64 // tokens read from the prompt cache
}

// IsZero reports whether all counts are zero.
func (u Usage) IsZero() bool { return u == Usage{} }
