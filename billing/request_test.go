package billing

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestReadRequest(t *testing.T) {
	tests := []struct {
		body string
		want RequestInfo // compared on the exported fields
	}{
		{`{"model":"m","stream":true,"max_tokens":100}`, RequestInfo{Model: "m", Stream: true, MaxTokens: 100, HasMaxTokens: true}},
		{`{"model":"m","stream_options":{"include_usage":true},"stream":true}`, RequestInfo{Model: "m", Stream: true, IncludeUsage: true}},
		{`{"model":"m","stream_options":{"include_\u0075sage":true}}`, RequestInfo{Model: "m", IncludeUsage: true}},
		{`{"model":"m","max_completion_tokens":7}`, RequestInfo{Model: "m", MaxTokens: 7, HasMaxTokens: true}},
		{`{"model":"m","max_tokens":0}`, RequestInfo{Model: "m", HasMaxTokens: true}},
		{`{"model":"m","max_tokens":null,"stream_options":null}`, RequestInfo{Model: "m"}},
		{`{"m\u006fdel":"m","thinking":{"type":"enabled","budget_tokens":2048},"max_tokens":4096}`, RequestInfo{Model: "m", ThinkingBudget: 2048, MaxTokens: 4096, HasMaxTokens: true}},
		{`{"model":"m","system":"s","messages":[]}`, RequestInfo{Model: "m"}},
		{`{"model":"m","system":[{"type":"text","text":"s"}]}`, RequestInfo{Model: "m"}},
		// Only the top level and the owned nested keys are guarded.
		{`{"model":"m","metadata":{"model":1,"model":2},"messages":[{"stream":"x"}]}`, RequestInfo{Model: "m"}},
		{` {"messages":[]} `, RequestInfo{}},
	}
	for _, tt := range tests {
		got, err := ReadRequest([]byte(tt.body))
		require.NoError(t, err, tt.body)
		assert.Equal(t, tt.want.Model, got.Model, tt.body)
		assert.Equal(t, tt.want.Stream, got.Stream, tt.body)
		assert.Equal(t, tt.want.MaxTokens, got.MaxTokens, tt.body)
		assert.Equal(t, tt.want.HasMaxTokens, got.HasMaxTokens, tt.body)
		assert.Equal(t, tt.want.IncludeUsage, got.IncludeUsage, tt.body)
		assert.Equal(t, tt.want.ThinkingBudget, got.ThinkingBudget, tt.body)
	}
}

func TestReadRequestRefusesDuplicatesAndWrongTypes(t *testing.T) {
	tests := []struct{ body, field, problem string }{
		{`{"model":"a","model":"b"}`, "model", "appears more than once"},
		{`{"model":"a","m\u006fdel":"b"}`, "model", "appears more than once"},
		{`{"model":"a","stream":false,"stream":true}`, "stream", "appears more than once"},
		{`{"model":"a","max_tokens":1,"max_tokens":100000}`, "max_tokens", "appears more than once"},
		{`{"model":"a","max_completion_tokens":1,"max_completion_\u0074okens":2}`, "max_completion_tokens", "appears more than once"},
		{`{"model":"a","stream_options":{},"stream_options":{}}`, "stream_options", "appears more than once"},
		{`{"model":"a","messages":[],"messages":[]}`, "messages", "appears more than once"},
		{`{"model":"a","system":"x","system":"y"}`, "system", "appears more than once"},
		{`{"model":"a","stream_options":{"include_usage":true,"include_usage":false}}`, "stream_options.include_usage", "appears more than once"},
		{`{"model":"a","stream_options":{"include_usage":true,"include_\u0075sage":false}}`, "stream_options.include_usage", "appears more than once"},
		{`{"model":"a","thinking":{"budget_tokens":1,"budget_tokens":2}}`, "thinking.budget_tokens", "appears more than once"},
		{`{"model":5}`, "model", "must be a string"},
		{`{"model":null}`, "model", "must be a string"},
		{`{"model":"m","stream":"true"}`, "stream", "must be a boolean"},
		{`{"model":"m","stream":1}`, "stream", "must be a boolean"},
		{`{"model":"m","stream_options":[]}`, "stream_options", "must be an object"},
		{`{"model":"m","stream_options":{"include_usage":"true"}}`, "stream_options.include_usage", "must be a boolean"},
		{`{"model":"m","max_tokens":"10"}`, "max_tokens", "must be an integer"},
		{`{"model":"m","max_tokens":1.5}`, "max_tokens", "must be an integer"},
		{`{"model":"m","max_tokens":-1}`, "max_tokens", "must be an integer"},
		{`{"model":"m","max_tokens":1e3}`, "max_tokens", "must be an integer"},
		{`{"model":"m","max_tokens":10000000000}`, "max_tokens", "must be an integer"},
		{`{"model":"m","max_tokens":1073741825}`, "max_tokens", "must be an integer"},
		{`{"model":"m","max_completion_tokens":true}`, "max_completion_tokens", "must be an integer"},
		{`{"model":"m","messages":{}}`, "messages", "must be an array"},
		{`{"model":"m","system":5}`, "system", "must be a string or an array"},
		{`{"model":"m","thinking":"on"}`, "thinking", "must be an object"},
		{`{"model":"m","thinking":{"budget_tokens":"1024"}}`, "thinking.budget_tokens", "must be an integer"},
	}
	for _, tt := range tests {
		_, err := ReadRequest([]byte(tt.body))
		var re *RequestError
		if assert.ErrorAs(t, err, &re, tt.body) {
			assert.Equal(t, tt.field, re.Field, tt.body)
			assert.Contains(t, re.Problem, tt.problem, tt.body)
			assert.Contains(t, err.Error(), `"`+tt.field+`" `+tt.problem, tt.body)
		}
	}
	for _, body := range []string{`{"model":"m",`, `["model"]`, ``, `"x"`, `{"a":1}x`, "{\"model\":\"\xa5\"}"} {
		_, err := ReadRequest([]byte(body))
		assert.ErrorIs(t, err, ErrInvalidJSON, body)
	}
}

func TestRewriteRequestKeepsEveryOtherByte(t *testing.T) {
	tests := []struct {
		api  API
		in   string
		max  int64
		want string
	}{
		{Anthropic, `{ "model" : "claude-sonnet-4-5" ,"temperature":0, "x":"model"}`, -1, `{ "model" : "glm-4.6" ,"temperature":0, "x":"model"}`},
		{OpenAI, `{"model":"m","messages":[{"role":"user","content":"\"model\":\"m\""}]}`, -1, `{"model":"glm-4.6","messages":[{"role":"user","content":"\"model\":\"m\""}]}`},
		{OpenAI, `{"m\u006fdel":"m"}`, -1, `{"m\u006fdel":"glm-4.6"}`},
		// OpenAI streams get include_usage, in every form stream_options may take.
		{OpenAI, `{"model":"m","stream":true}`, -1, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":null}`, -1, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":{}}`, -1, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":{"x":1}}`, -1, `{"model":"glm-4.6","stream":true,"stream_options":{"x":1,"include_usage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":{"include_usage":false}}`, -1, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":{"include_\u0075sage":false}}`, -1, `{"model":"glm-4.6","stream":true,"stream_options":{"include_\u0075sage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, -1, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		// Anthropic streams and non-streams are left alone.
		{Anthropic, `{"model":"m","stream":true}`, -1, `{"model":"glm-4.6","stream":true}`},
		{OpenAI, `{"model":"m","stream":false}`, -1, `{"model":"glm-4.6","stream":false}`},
		// The output cap: lowered, never raised, inserted when absent.
		{Anthropic, `{"model":"m","max_tokens":1024}`, 10, `{"model":"glm-4.6","max_tokens":10}`},
		{Anthropic, `{"model":"m","max_tokens":5}`, 10, `{"model":"glm-4.6","max_tokens":5}`},
		{OpenAI, `{"model":"m","max_completion_tokens":100,"max_tokens":7}`, 10, `{"model":"glm-4.6","max_completion_tokens":10,"max_tokens":7}`},
		{OpenAI, `{"model":"m","max_tokens":null}`, 10, `{"model":"glm-4.6","max_tokens":10}`},
		{OpenAI, `{"model":"m","stream":true}`, 10, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true},"max_tokens":10}`},
		{OpenAI, "{\n}", 10, "{\n\"model\":\"glm-4.6\",\"max_tokens\":10}"},
		{OpenAI, " {} ", 10, ` {"model":"glm-4.6","max_tokens":10} `},
	}
	for _, tt := range tests {
		in := []byte(tt.in)
		info, err := ReadRequest(in)
		require.NoError(t, err, tt.in)
		got, err := RewriteRequest(tt.api, in, info, "glm-4.6", tt.max)
		require.NoError(t, err, tt.in)
		assert.Equal(t, tt.want, string(got), tt.in)
		assert.Equal(t, tt.in, string(in), "the input was modified")
		assert.True(t, json.Valid(got), tt.in)
	}
	// Same model upstream, no cap to lower: the body is returned as is.
	in := []byte(`{"model":"same","max_tokens":5}`)
	info, _ := ReadRequest(in)
	out, err := RewriteRequest(Anthropic, in, info, "same", 5)
	require.NoError(t, err)
	assert.Same(t, &in[0], &out[0], "an unchanged body was copied")
	_, err = RewriteRequest(Anthropic, []byte(`{}`), info, "x", 1)
	assert.Error(t, err, "info from another body")
}
