package caddymodule

import (
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func TestSanitizeUpstreamError(t *testing.T) {
	tests := []struct {
		name    string
		status  int
		body    string
		api     billing.API
		message string // exact, or a prefix ending in "…"
		oaiCode string
		raw     bool
	}{
		{"anthropic prompt too long", 400, `{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 215000 tokens > 200000 maximum"}}`,
			billing.Anthropic, msgPromptTooLong, "context_length_exceeded", false},
		{"litellm context window", 400, `{"error":{"message":"litellm.ContextWindowExceededError: This model's maximum context length is 128000 tokens.","type":null,"param":null,"code":"400"}}`,
			billing.OpenAI, msgPromptTooLong, "context_length_exceeded", false},
		{"thinking budget", 400, `{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens must be greater than thinking.budget_tokens"}}`,
			billing.Anthropic, msgThinkingBudget, "invalid_thinking_config", false},
		{"tool history through litellm", 400, `{"error":{"message":"litellm.BadRequestError: AnthropicException - {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"messages.1.content: tool_use ids were found without tool_result blocks immediately after: toolu_01\"}}","type":null,"param":null,"code":"400"}}`,
			billing.OpenAI, msgToolHistory, "malformed_tool_history", false},
		{"image dimensions pass through", 400, `{"type":"error","error":{"type":"invalid_request_error","message":"messages.0.content.1.image.source.base64.data: image dimensions exceed max allowed size: 8000 pixels"}}`,
			billing.Anthropic, "", "", true},
		{"other 400: the message without internals", 400, `{"error":{"message":"litellm.BadRequestError: OpenAIException - temperature: must be <= 2 Received Model Group=glm-4.6\nAvailable Model Group Fallbacks=None","type":"invalid_request_error","param":null,"code":"400"}}`,
			billing.OpenAI, "temperature: must be <= 2", "", false},
		{"budget 400 not retried: no key in the message", 400, `{"error":{"message":"Budget has been exceeded! Key=sk-abcdef123456 Current cost: 10.0123, Max budget: 10.0","type":"budget_exceeded","param":null,"code":"400"}}`,
			billing.OpenAI, "Budget has been exceeded! [redacted] Current cost: 10.0123, Max budget: 10.0", "", false},
		{"not json", 400, `<html>bad gateway</html>`, billing.OpenAI, "Bad request", "", false},
		{"401", 401, `{"error":{"message":"Authentication Error, Invalid proxy server token passed. Received API Key = sk-...1234","type":"auth_error","param":"None","code":"401"}}`,
			billing.OpenAI, "Authentication failed", "invalid_api_key", false},
		{"402", 402, `{}`, billing.Anthropic, "Insufficient credits. Please purchase credits to continue.", "insufficient_credits", false},
		{"403", 403, `{}`, billing.OpenAI, "Access denied", "permission_denied", false},
		{"404", 404, `{}`, billing.OpenAI, "Resource not found", "not_found", false},
		{"429", 429, `{}`, billing.OpenAI, "Rate limit exceeded", "rate_limit_exceeded", false},
		{"529", 529, `{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`, billing.Anthropic,
			"The API is currently overloaded. Please retry your request after a brief wait.", "service_overloaded", false},
		{"502", 502, `upstream connect error`, billing.OpenAI, "Upstream service unavailable", "", false},
		{"418", 418, `{}`, billing.OpenAI, "Request failed", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, raw := sanitizeUpstreamError(tt.api, tt.status, []byte(tt.body))
			if tt.raw {
				require.Equal(t, tt.body, string(raw), "raw")
				return
			}
			require.NotNil(t, e)
			require.Equal(t, tt.status, e.status, "status")
			require.Equal(t, tt.message, e.message, "message")
			require.Equal(t, tt.oaiCode, e.oaiCode, "OpenAI code")
			for _, api := range []billing.API{billing.OpenAI, billing.Anthropic} {
				rec := httptest.NewRecorder()
				e.write(rec, api)
				for _, internal := range []string{"sk-", "litellm", "glm-4.6"} {
					assert.NotContains(t, rec.Body.String(), internal, "internals reach the client")
				}
			}
		})
	}
}
