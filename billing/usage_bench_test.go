package billing

import (
	"runtime"
	"testing"
)

// BenchmarkSSEScanner measures the scanner per event: single events written
// to a warm scanner (one op is one event), and whole fixture streams (one op
// is one response, and ns/event and allocs/event are reported; the only
// allocations are decoding the events that carry usage).
func BenchmarkSSEScanner(b *testing.B) {
	events := []struct {
		name string
		api  API
		ev   string
	}{
		{"anthropic/content_block_delta", Anthropic,
			"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"'m doing well, thank you for asking\"}}\n\n"},
		{"anthropic/message_delta", Anthropic,
			"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":12,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":30}}\n\n"},
		{"openai/chunk", OpenAI,
			`data: {"id":"chatcmpl-D8Z5oo6uDh67AD85p73ksdT1KxhE0","object":"chat.completion.chunk","created":1770933892,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_de604bd877","choices":[{"index":0,"delta":{"content":"Holiday"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"dTh"}` + "\n\n"},
		{"openai/usage_chunk", OpenAI,
			`data: {"id":"chatcmpl-D8Z5oo6uDh67AD85p73ksdT1KxhE0","object":"chat.completion.chunk","created":1770933892,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_de604bd877","choices":[],"usage":{"prompt_tokens":16,"completion_tokens":300,"total_tokens":316,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"h9RiQLL"}` + "\n\n"},
	}
	for _, bm := range events {
		b.Run(bm.name, func(b *testing.B) {
			p := []byte(bm.ev)
			s := NewSSEScanner(bm.api)
			s.Write(p)
			b.SetBytes(int64(len(p)))
			b.ReportAllocs()
			for b.Loop() {
				s.Write(p)
			}
		})
	}
	for _, fx := range loadSSEFixtures(b) {
		b.Run("stream/"+fx.name, func(b *testing.B) {
			stream := sseStream(b, fx.api, fx.chunks, "\n")
			s := NewSSEScanner(fx.api)
			events := s.Result().Events
			s.Write(stream)
			events = s.Result().Events - events
			b.SetBytes(int64(len(stream)))
			b.ReportAllocs()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			ops := 0
			for b.Loop() {
				s.Reset(fx.api)
				s.Write(stream)
				s.Result()
				ops++
			}
			runtime.ReadMemStats(&after)
			perEvent := float64(ops * events)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/perEvent, "ns/event")
			b.ReportMetric(float64(after.Mallocs-before.Mallocs)/perEvent, "allocs/event")
		})
	}
}

// BenchmarkParseUsageJSON measures ParseUsageJSON on the recorded
// non-streaming responses.
func BenchmarkParseUsageJSON(b *testing.B) {
	m := loadLLMManifest(b)
	for _, name := range sortedFixtureNames(m) {
		fx := m[name]
		if fx.JSON == nil {
			continue
		}
		b.Run(name, func(b *testing.B) {
			api := llmManifestAPI(b, name, fx.API)
			body := readLLMFixture(b, fx.JSON.File)
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				if _, problem, err := ParseUsageJSON(api, body, 0); problem != UsageValid || err != nil {
					b.Fatalf("ParseUsageJSON = %v, %v", problem, err)
				}
			}
		})
	}
}
