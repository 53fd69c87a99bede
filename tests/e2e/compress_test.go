package e2e

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// Caddyfile.example's compress snippet in front of a real gateway: an SSE
// stream passes uncompressed and unbuffered, byte for byte, while a JSON
// answer above 1 KB is gzipped and still billed from its usage.
func TestCompressionNeverTouchesSSE(t *testing.T) {
	port := freePort()
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	site := exampleSnippet("compress") + fmt.Sprintf(`http://127.0.0.1:%d {
	import compress
	llm_billing {
		credit_field creditsNew
		models %s
		forward_headers X-Test-Id X-Standin-*
	}
	reverse_proxy %s
}
`, port, examples("models-chat.json"), env.UpstreamURL)
	require.NoError(t, loadCaddy(caddyfile(configOpts{extra: site})))
	t.Cleanup(func() { require.NoError(t, loadCaddy(caddyfile(configOpts{}))) })

	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})

	// A stream: the client accepts gzip and zstd, and gets neither.
	const delay = 150 * time.Millisecond
	start := time.Now()
	resp := post(t, url+"/v1/messages", key, streamBody("claude-sonnet-4-5"), map[string]string{
		"Accept-Encoding": "zstd, gzip", "X-Standin-Fixture": "ant-text", "X-Standin-Event-Delay": delay.String(),
	})
	require.Equal(t, 200, resp.StatusCode)
	require.True(t, strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream"), resp.Header.Get("Content-Type"))
	assert.Empty(t, resp.Header.Get("Content-Encoding"), "an SSE stream was compressed")
	br := bufio.NewReader(resp.Body)
	first, err := br.ReadBytes('\n')
	require.NoError(t, err)
	firstAt := time.Since(start)
	rest, err := io.ReadAll(br)
	require.NoError(t, err)
	resp.Body.Close()
	total := time.Since(start)
	assert.Equal(t, fixtures.Get("ant-text").SSE(true), append(first, rest...), "the stream is not the upstream's bytes")
	assert.Less(t, firstAt, total/2, "first byte after %v of a %v stream: encode buffered it", firstAt, total)

	// A JSON answer above encode's minimum_length is compressed.
	resp = post(t, url+"/v1/chat/completions", key, validBody("claude-sonnet-4-5")(), map[string]string{
		"Accept-Encoding": "gzip", "X-Standin-Fixture": "oai-text",
	})
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode, "%s", raw)
	require.Equal(t, "gzip", resp.Header.Get("Content-Encoding"), "a JSON answer of %d bytes was not compressed", len(raw))
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	require.NoError(t, err)
	plain, err := io.ReadAll(zr)
	require.NoError(t, err)
	assert.Equal(t, fixtures.Get("oai-text").NonStreamJSON(), plain, "the JSON answer is not the upstream's bytes")

	// Both were billed from their usage: the gateway reads a copy before
	// encode compresses it.
	for _, l := range waitLogs(t, u.ID, 2) {
		assert.Equal(t, "upstream", l["usageSource"], "request %v", l["endpoint"])
	}
}
