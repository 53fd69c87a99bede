package caddymodule

import (
	"bytes"
	"encoding/json"
	"net/http"
	"regexp"
	"strings"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Messages of the legacy proxy for upstream errors it rewrote.
const (
	msgPromptTooLong  = "Prompt is too long. Your request exceeds the model's maximum context length. Please use /compact to summarize the conversation or start a new chat."
	msgThinkingBudget = "Invalid thinking configuration: max_tokens must be greater than thinking.budget_tokens, and budget_tokens at least 1024. Lower budget_tokens or raise max_tokens."
	msgToolHistory    = "Conversation history corrupted (tool_use without tool_result). Please start a new chat."
)

// sanitizeUpstreamError turns an upstream error answer into the error the
// client sees: the legacy proxy's status, type, code and message, in the
// client's API shape, without the upstream's internals (LiteLLM exception
// names, key aliases, spend figures). raw is non-nil when the upstream body
// is safe and more useful as it is (Anthropic image-size errors, as before).
func sanitizeUpstreamError(api billing.API, status int, body []byte) (e *apiError, raw []byte) {
	lower := bytes.ToLower(body)
	has := func(s string) bool { return bytes.Contains(lower, []byte(s)) }
	switch {
	case status == http.StatusBadRequest:
		switch {
		case has("prompt is too long") || has("too many tokens") || has("token limit") || has("context length") ||
			has("maximum context") || (has("tokens") && has("maximum")):
			return &apiError{status: 400, message: msgPromptTooLong, oaiType: "invalid_request_error", oaiCode: "context_length_exceeded", antType: "invalid_request_error"}, nil
		case has("budget_tokens"):
			return &apiError{status: 400, message: msgThinkingBudget, oaiType: "invalid_request_error", oaiCode: "invalid_thinking_config", antType: "invalid_request_error"}, nil
		case has("tool_use") && has("tool_result"):
			return &apiError{status: 400, message: msgToolHistory, oaiType: "invalid_request_error", oaiCode: "malformed_tool_history", antType: "invalid_request_error"}, nil
		case api == billing.Anthropic && has("image") && has("dimension") && json.Valid(body) && !hasSecrets(body):
			return nil, body
		}
		msg := upstreamMessage(body)
		if msg == "" {
			msg = "Bad request"
		}
		return &apiError{status: 400, message: msg, oaiType: "invalid_request_error", antType: "invalid_request_error"}, nil
	case status == http.StatusUnauthorized:
		return &apiError{status: status, message: "Authentication failed", oaiType: "authentication_error", oaiCode: "invalid_api_key", antType: "authentication_error"}, nil
	case status == http.StatusPaymentRequired:
		return &apiError{status: status, message: "Insufficient credits. Please purchase credits to continue.", oaiType: "insufficient_quota", oaiCode: "insufficient_credits", antType: "insufficient_credits"}, nil
	case status == http.StatusForbidden:
		return &apiError{status: status, message: "Access denied", oaiType: "permission_error", oaiCode: "permission_denied", antType: "permission_error"}, nil
	case status == http.StatusNotFound:
		return &apiError{status: status, message: "Resource not found", oaiType: "not_found_error", oaiCode: "not_found", antType: "not_found_error"}, nil
	case status == http.StatusTooManyRequests:
		return &apiError{status: status, message: "Rate limit exceeded", oaiType: "rate_limit_error", oaiCode: "rate_limit_exceeded", antType: "rate_limit_error"}, nil
	case status == 529:
		return &apiError{status: status, message: "The API is currently overloaded. Please retry your request after a brief wait.", oaiType: "overloaded_error", oaiCode: "service_overloaded", antType: "overloaded_error"}, nil
	case status == 500 || status == 502 || status == 503 || status == 504:
		return &apiError{status: status, message: "Upstream service unavailable", oaiType: "server_error", antType: "api_error"}, nil
	case status == 499:
		return &apiError{status: status, message: "Client closed request", oaiType: "invalid_request_error", antType: "invalid_request_error"}, nil
	}
	return &apiError{status: status, message: "Request failed", oaiType: "api_error", antType: "api_error"}, nil
}

var (
	// Upstream internals that never reach a client.
	secretLike     = regexp.MustCompile(`(?i)(sk-[a-z0-9_\-]{4,}|key=\S+|key_alias\S*|user_api_key\S*|team_id\S*)`)
	litellmPrefix  = regexp.MustCompile(`^(litellm\.)?[A-Za-z]+Error:\s*`)
	providerPrefix = regexp.MustCompile(`^[A-Za-z]+Exception\s*-\s*`)
)

func hasSecrets(b []byte) bool { return secretLike.Match(b) }

// upstreamMessage extracts a client-useful message from an upstream error
// body (Anthropic or OpenAI/LiteLLM shape), with LiteLLM's exception
// prefixes and anything key-like removed; "" when there is none.
func upstreamMessage(body []byte) string {
	var b struct {
		Error json.RawMessage `json:"error"`
	}
	if json.Unmarshal(body, &b) != nil || len(b.Error) == 0 {
		return ""
	}
	var inner struct {
		Message string `json:"message"`
	}
	msg := ""
	if json.Unmarshal(b.Error, &inner) == nil {
		msg = inner.Message
	} else {
		_ = json.Unmarshal(b.Error, &msg) // {"error": "text"}
	}
	msg = strings.TrimSpace(msg)
	for {
		next := providerPrefix.ReplaceAllString(litellmPrefix.ReplaceAllString(msg, ""), "")
		if next == msg {
			break
		}
		msg = next
	}
	// A nested provider body: keep its message only.
	if strings.HasPrefix(msg, "{") {
		if inner := upstreamMessage([]byte(msg)); inner != "" {
			msg = inner
		} else {
			return ""
		}
	}
	// LiteLLM appends its routing details: the upstream model group and
	// fallbacks are internals.
	for _, marker := range []string{"Received Model Group", "Available Model Group", "LiteLLM Retried"} {
		if i := strings.Index(msg, marker); i >= 0 {
			msg = strings.TrimSpace(msg[:i])
		}
	}
	msg = secretLike.ReplaceAllString(msg, "[redacted]")
	if len(msg) > 500 {
		msg = msg[:500]
	}
	return msg
}
