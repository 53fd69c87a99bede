package billing

import "testing"

func BenchmarkRewriteRequest(b *testing.B) {
	body := []byte(`{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"Hello, how are you today? Tell me something nice."}],"tools":[{"name":"t","input_schema":{"type":"object"}}]}`)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		info, err := ReadRequest(body)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := RewriteRequest(OpenAI, body, info, "glm-4.6", 1024); err != nil {
			b.Fatal(err)
		}
	}
}
