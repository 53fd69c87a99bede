package billing

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

var requestSeeds = []string{
	`{"model":"m","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}`,
	`{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":[1,{"a":null}]}}`,
	`{"m\u006fdel":"m","stream_options":{"include_\u0075sage":true},"stream":true}`,
	`{"model":"m","stream_options":{"include_usage":true,"include_usage":false}}`,
	`{"model":"m","max_completion_tokens":7,"max_tokens":null,"system":[{"type":"text","text":"s"}]}`,
	`{"model":"m","thinking":{"type":"enabled","budget_tokens":2048},"max_tokens":4096}`,
	`{"model":"m","stream":"true","max_tokens":"10"}`,
	`{"model":"m","max_tokens":1.5}`,
	" {\n\t\"model\" : \"m\" , \"stream_options\" : null } ",
	`{}`, `[]`, `{"model":"\u00e9\ud83d\ude00"}`,
}

// decode is body decoded by encoding/json, the reference reader.
func decode(t *testing.T, body []byte) map[string]any {
	t.Helper()
	var v map[string]any
	d := json.NewDecoder(bytes.NewReader(body))
	d.UseNumber()
	if err := d.Decode(&v); err != nil {
		t.Fatalf("%s: %v", body, err)
	}
	return v
}

// FuzzReadRequest: ReadRequest never panics, and what it accepts, a
// standard JSON decoder reads the same way (so no duplicate or odd form of
// an owned field slips through); it is rewritten into valid JSON whose owned
// fields have the new values.
func FuzzReadRequest(f *testing.F) {
	for _, s := range requestSeeds {
		f.Add([]byte(s), "glm-4.6", int64(10), true)
	}
	f.Fuzz(func(t *testing.T, body []byte, model string, maxTokens int64, openAI bool) {
		info, err := ReadRequest(body)
		if err != nil || !json.Valid(body) {
			return
		}
		v := decode(t, body)
		// A lone surrogate escape decodes to U+FFFD in both readers, but
		// gjson may drop what follows it: such a model matches no catalogue
		// entry, and no key holding one can equal an owned key.
		if m, _ := v["model"].(string); m != info.Model && !strings.ContainsRune(m+info.Model, utf8.RuneError) {
			t.Fatalf("%s: model %q, decoder %q", body, info.Model, m)
		}
		if s, _ := v["stream"].(bool); s != info.Stream {
			t.Fatalf("%s: stream %v, decoder %v", body, info.Stream, s)
		}
		so, _ := v["stream_options"].(map[string]any)
		if iu, _ := so["include_usage"].(bool); iu != info.IncludeUsage {
			t.Fatalf("%s: include_usage %v, decoder %v", body, info.IncludeUsage, iu)
		}
		api := Anthropic
		if openAI {
			api = OpenAI
		}
		out, err := RewriteRequest(api, body, info, model, maxTokens)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		if !json.Valid(out) {
			t.Fatalf("%s -> invalid %s", body, out)
		}
		if maxTokens <= MaxTokensField && int64(len(out)) > ForwardedSize(len(body), model) {
			t.Fatalf("%s -> %s: longer than ForwardedSize", body, out)
		}
		w := decode(t, out)
		// A body without a model keeps none when the new one is "" too.
		if m, _ := json.Marshal(model); w["model"] != decodeString(m) && (model != "" || w["model"] != nil) {
			t.Fatalf("%s -> %s: model is not %q", body, out, model)
		}
		if maxTokens >= 0 {
			for _, k := range []string{"max_tokens", "max_completion_tokens"} {
				if n, ok := w[k].(json.Number); ok {
					if x, _ := n.Int64(); x > maxTokens {
						t.Fatalf("%s -> %s: %s above %d", body, out, k, maxTokens)
					}
				}
			}
			if w["max_tokens"] == nil && w["max_completion_tokens"] == nil {
				t.Fatalf("%s -> %s: no cap", body, out)
			}
		}
		if api == OpenAI && info.Stream {
			so, _ := w["stream_options"].(map[string]any)
			if so["include_usage"] != true {
				t.Fatalf("%s -> %s: no include_usage", body, out)
			}
		}
	})
}

// FuzzRewriteRequest is the property that the rewrite changes nothing but
// the values it owns, for any valid JSON body ReadRequest accepts: both
// bodies decode to the same value once the owned keys are removed.
func FuzzRewriteRequest(f *testing.F) {
	for _, s := range requestSeeds {
		f.Add([]byte(s), "glm-4.6", int64(10), true)
		f.Add([]byte(s), "m", int64(-1), false)
	}
	f.Fuzz(func(t *testing.T, body []byte, model string, maxTokens int64, openAI bool) {
		if !json.Valid(body) {
			return
		}
		info, err := ReadRequest(body)
		if err != nil {
			return
		}
		api := Anthropic
		if openAI {
			api = OpenAI
		}
		out, err := RewriteRequest(api, body, info, model, maxTokens)
		if err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		a, b := decode(t, body), decode(t, out)
		for _, m := range []map[string]any{a, b} {
			delete(m, "model")
			delete(m, "max_tokens")
			delete(m, "max_completion_tokens")
			switch so := m["stream_options"].(type) {
			case map[string]any:
				delete(so, "include_usage")
			case nil:
				delete(m, "stream_options") // null or absent; the rewrite may add it
			}
		}
		if _, ok := a["stream_options"]; !ok {
			if so, ok := b["stream_options"].(map[string]any); ok && len(so) == 0 {
				delete(b, "stream_options")
			}
		}
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("%s -> %s: more than the owned values changed", body, out)
		}
	})
}

func decodeString(b []byte) string {
	var s string
	_ = json.Unmarshal(b, &s)
	return s
}
