// Package billing holds the parts of the LLM billing gateway that do not
// depend on Caddy: integer money, the model catalogue read from the legacy
// config JSON, prices and the cost formula, usage extraction from OpenAI and
// Anthropic responses (JSON and server-sent events), request body rewriting,
// and the store interface the Caddy module bills through.
//
// Everything here is deterministic and unit-tested on its own; the MongoDB
// implementation of the store, and its storage format, live in package
// mongostore beside this one.
package billing
