package caddymodule

import (
	"bytes"
	"encoding/json"
	"mime"
	"strings"
)

// What a successful upstream answer must be. The API promises JSON to a
// request without "stream": true and server-sent events to one with it; a
// 2xx that is neither (an HTML error page from a proxy in between, a
// truncated or non-JSON body, the wrong Content-Type) is not passed on as a
// success: the client gets a 502 in its API's shape and nothing is billed.
const (
	expectJSON = iota + 1
	expectSSE
)

// Bounds on what is held back while a 2xx answer proves its kind.
const (
	// maxCheckedJSON: a JSON answer up to this size is held whole and
	// parsed before its first byte reaches the client. A larger one is
	// passed on, unparsed, once its first byte shows a JSON object.
	maxCheckedJSON = 1 << 20
	// maxCheckedSSE: a stream is held until its first event with data,
	// which must be JSON (or [DONE]); a stream whose first such event has
	// not ended within this many bytes is refused. Later events are not
	// checked: once the first byte has gone out, a bad event can only end
	// the stream, and it is billed as a stream without usage would be.
	maxCheckedSSE = 64 << 10
)

// Body check verdicts.
const (
	undecided = iota
	looksRight
	garbage
)

// rightType reports whether a 2xx answer's Content-Type is the one the API
// promises: application/json (or any +json type), text/event-stream.
func rightType(expect int, contentType string) bool {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	if expect == expectSSE {
		return mt == "text/event-stream"
	}
	return mt == "application/json" || strings.HasSuffix(mt, "+json")
}

// inspect judges the start of a 2xx body, b (what is held of it). final is
// true when b is the whole body.
func inspect(expect int, b []byte, final bool) int {
	if expect == expectSSE {
		v := inspectSSE(b, final)
		if v == undecided && len(b) > maxCheckedSSE {
			return garbage
		}
		return v
	}
	t := bytes.TrimLeft(b, " \t\r\n")
	switch {
	case len(t) > 0 && t[0] != '{':
		return garbage
	case final && json.Valid(b):
		return looksRight
	case final:
		return garbage
	case len(b) > maxCheckedJSON:
		return looksRight // too big to hold: it starts as an object
	}
	return undecided
}

// inspectSSE finds the first event with data in b and checks that its data
// is JSON or [DONE]. Comments, pings and events without data before it are
// skipped.
func inspectSSE(b []byte, final bool) int {
	var data []byte
	seen := false
	judge := func() int {
		if d := bytes.TrimSpace(data); json.Valid(d) || string(d) == "[DONE]" {
			return looksRight
		}
		return garbage
	}
	for {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			break
		}
		line := bytes.TrimSuffix(b[:i], []byte("\r"))
		b = b[i+1:]
		if len(line) == 0 {
			if seen {
				return judge()
			}
			continue
		}
		if v, ok := bytes.CutPrefix(line, []byte("data:")); ok {
			if seen {
				data = append(data, '\n')
			}
			data = append(data, bytes.TrimPrefix(v, []byte(" "))...)
			seen = true
		}
	}
	switch {
	case final && seen:
		return judge() // the body ended without the blank line
	case final:
		return garbage
	}
	return undecided
}
