package billing

import (
	"errors"
	"strings"
	"testing"
)

func TestReadRequest(t *testing.T) {
	tests := []struct {
		body    string
		want    RequestInfo
		wantErr string
	}{
		{body: `{"model":"m","stream":true,"max_tokens":100}`, want: RequestInfo{Model: "m", Stream: true, MaxTokens: 100}},
		{body: `{"model":"m","stream_options":{"include_usage":true},"stream":true}`, want: RequestInfo{Model: "m", Stream: true, IncludeUsage: true, hasStreamOpt: true}},
		{body: `{"model":"m","max_completion_tokens":7}`, want: RequestInfo{Model: "m", MaxTokens: 7}},
		{body: `{"messages":[]}`, want: RequestInfo{}},
		{body: `{"model":"a","model":"b"}`, wantErr: `duplicate "model"`},
		{body: `{"model":"a","stream":false,"stream":true}`, wantErr: `duplicate "stream"`},
		{body: `{"model":"a","max_tokens":1,"max_tokens":100000}`, wantErr: `duplicate "max_tokens"`},
		{body: `{"model":5}`, wantErr: `"model" must be a string`},
		{body: `{"model":"m",`, wantErr: "invalid JSON"},
		{body: `["model"]`, wantErr: "invalid JSON"},
		{body: ``, wantErr: "invalid JSON"},
	}
	for _, tt := range tests {
		got, err := ReadRequest([]byte(tt.body))
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%s: err = %v, want %q", tt.body, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%s: got %+v, %v; want %+v", tt.body, got, err, tt.want)
		}
	}
	if _, err := ReadRequest([]byte("{")); !errors.Is(err, ErrInvalidJSON) {
		t.Errorf("want ErrInvalidJSON, got %v", err)
	}
}

func TestRewriteRequestKeepsEveryOtherByte(t *testing.T) {
	tests := []struct {
		api  API
		in   string
		want string
	}{
		{Anthropic, `{ "model" : "claude-sonnet-4-5" ,"temperature":0, "x":"model"}`, `{ "model" : "glm-4.6" ,"temperature":0, "x":"model"}`},
		{OpenAI, `{"model":"m","messages":[{"role":"user","content":"\"model\":\"m\""}]}`, `{"model":"glm-4.6","messages":[{"role":"user","content":"\"model\":\"m\""}]}`},
		// OpenAI streams get include_usage, in every form stream_options may take.
		{OpenAI, `{"model":"m","stream":true}`, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":null}`, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":{"include_usage":false}}`, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		{OpenAI, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, `{"model":"glm-4.6","stream":true,"stream_options":{"include_usage":true}}`},
		// Anthropic streams and non-streams are left alone.
		{Anthropic, `{"model":"m","stream":true}`, `{"model":"glm-4.6","stream":true}`},
		{OpenAI, `{"model":"m","stream":false}`, `{"model":"glm-4.6","stream":false}`},
	}
	for _, tt := range tests {
		info, err := ReadRequest([]byte(tt.in))
		if err != nil {
			t.Fatal(err)
		}
		in := []byte(tt.in)
		got, err := RewriteRequest(tt.api, in, info, "glm-4.6")
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != tt.want {
			t.Errorf("%s:\n got %s\nwant %s", tt.in, got, tt.want)
		}
		if string(in) != tt.in {
			t.Errorf("the input was modified: %s", in)
		}
	}
	// Same model upstream: the body is returned as is.
	in := []byte(`{"model":"same"}`)
	info, _ := ReadRequest(in)
	if out, _ := RewriteRequest(Anthropic, in, info, "same"); &out[0] != &in[0] {
		t.Error("an unchanged body was copied")
	}
}
