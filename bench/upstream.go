package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

// Request headers of the bench upstream. A request carrying neither
// HeaderEvents nor HeaderStreamBytes is served by the stand-in
// (tests/standin) unchanged: the recorded fixtures, steered by its
// X-Standin-* headers.
const (
	// HeaderEvents asks for a stream of exactly n events (n >= 5),
	// assembled from the recorded fixture's own events: the opening
	// events, text deltas cycled from the recording, and the closing
	// events with the recorded usage.
	HeaderEvents = "X-Bench-Events"
	// HeaderStreamBytes asks for a stream of at least n bytes, made of text
	// deltas of HeaderEventBytes bytes each (default 16 KiB), with the
	// recorded opening and closing events around them.
	HeaderStreamBytes = "X-Bench-Stream-Bytes"
	// HeaderEventBytes sets the size of the text of each delta of a
	// HeaderStreamBytes stream.
	HeaderEventBytes = "X-Bench-Event-Bytes"
	// HeaderEventDelay is the pause between two events (a Go duration);
	// X-Standin-Event-Delay is honoured too.
	HeaderEventDelay = "X-Bench-Event-Delay"
)

// upstreamMain is `bench upstream`: the stand-in upstream in its own
// process, plus the synthetic streams the stand-in's recordings cannot
// give (a stream of exactly 50 events, a 100 MB stream). It prints
// "READY <base url>" and runs until SIGINT or SIGTERM.
func upstreamMain(args []string) error {
	fs := flag.NewFlagSet("upstream", flag.ExitOnError)
	addr := fs.String("listen", "127.0.0.1:0", "listen address")
	keys := fs.String("keys", "", "accepted upstream keys, comma-separated")
	if err := fs.Parse(args); err != nil {
		return err
	}
	u := newUpstream(strings.Split(*keys, ","))
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: u, ReadHeaderTimeout: 30 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// The stand-in keeps a copy of every request for tests; forget
		// them so a long run does not grow.
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				u.standin.Reset()
			}
		}
	}()
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	fmt.Println("READY http://" + ln.Addr().String())
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		return err
	}
	return nil
}

type upstream struct {
	standin *standin.Server
	keys    map[string]bool
	ant     synthAPI
	oai     synthAPI
}

// synthAPI holds the recorded events a synthetic stream of one API is
// built from, each framed as an SSE event.
type synthAPI struct {
	head   [][]byte // opening events
	deltas [][]byte // recorded text deltas, cycled
	tail   [][]byte // closing events without usage
	usage  [][]byte // closing events carrying usage (OpenAI: only when asked)
	done   []byte   // OpenAI's data: [DONE]
	delta  func(text string) []byte
}

func newUpstream(keys []string) *upstream {
	u := &upstream{
		standin: standin.New(standin.Options{Keys: keys}),
		keys:    map[string]bool{},
	}
	for _, k := range keys {
		if k != "" {
			u.keys[k] = true
		}
	}

	// Anthropic, from ant-text: message_start, content_block_start, ping,
	// six text deltas, content_block_stop, message_delta, message_stop.
	ant := fixtures.Get("ant-text")
	evs := ant.Events(true)
	for i, ch := range ant.Chunks {
		var h struct{ Type string }
		_ = json.Unmarshal(ch, &h)
		switch h.Type {
		case "message_start", "content_block_start":
			u.ant.head = append(u.ant.head, evs[i])
		case "content_block_delta":
			u.ant.deltas = append(u.ant.deltas, evs[i])
		case "content_block_stop", "message_stop":
			u.ant.tail = append(u.ant.tail, evs[i])
		case "message_delta":
			// message_delta carries the usage; it goes before message_stop.
			u.ant.tail = append(u.ant.tail, evs[i])
		}
	}
	u.ant.delta = func(text string) []byte {
		b, _ := json.Marshal(map[string]any{"type": "content_block_delta", "index": 0,
			"delta": map[string]string{"type": "text_delta", "text": text}})
		return []byte("event: content_block_delta\ndata: " + string(b) + "\n\n")
	}

	// OpenAI, from oai-text: the role chunk, content chunks, the
	// finish_reason chunk, the usage chunk (sent when asked), [DONE].
	oai := fixtures.Get("oai-text")
	n := len(oai.Chunks)
	frame := func(ch []byte) []byte { return []byte("data: " + string(ch) + "\n\n") }
	u.oai.head = [][]byte{frame(oai.Chunks[0])}
	for _, ch := range oai.Chunks[1 : n-2] {
		u.oai.deltas = append(u.oai.deltas, frame(ch))
	}
	u.oai.tail = [][]byte{frame(oai.Chunks[n-2])}
	u.oai.usage = [][]byte{frame(oai.Chunks[n-1])}
	u.oai.done = []byte("data: [DONE]\n\n")
	var first struct {
		ID      string `json:"id"`
		Created int64  `json:"created"`
		Model   string `json:"model"`
	}
	_ = json.Unmarshal(oai.Chunks[0], &first)
	u.oai.delta = func(text string) []byte {
		b, _ := json.Marshal(map[string]any{"id": first.ID, "object": "chat.completion.chunk", "created": first.Created,
			"model": first.Model, "choices": []any{map[string]any{"index": 0, "delta": map[string]string{"content": text},
				"logprobs": nil, "finish_reason": nil}}, "usage": nil})
		return frame(b)
	}
	return u
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	nEvents, bytesTotal := r.Header.Get(HeaderEvents), r.Header.Get(HeaderStreamBytes)
	if nEvents == "" && bytesTotal == "" {
		u.standin.ServeHTTP(w, r)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 32<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	key := strings.TrimSpace(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "))
	if key == "" {
		key = r.Header.Get("X-Api-Key")
	}
	if !u.keys[key] {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"error":{"message":"Authentication Error","type":"auth_error","param":"None","code":"401"}}`))
		return
	}
	var api *synthAPI
	switch r.URL.Path {
	case standin.PathMessages:
		api = &u.ant
	case standin.PathChatCompletions:
		api = &u.oai
	default:
		http.NotFound(w, r)
		return
	}
	var req struct {
		StreamOptions *struct {
			IncludeUsage bool `json:"include_usage"`
		} `json:"stream_options"`
	}
	_ = json.Unmarshal(body, &req)
	includeUsage := api == &u.ant || (req.StreamOptions != nil && req.StreamOptions.IncludeUsage)

	var delay time.Duration
	for _, h := range []string{HeaderEventDelay, standin.HeaderEventDelay} {
		if v := r.Header.Get(h); v != "" {
			delay, _ = time.ParseDuration(v)
		}
	}

	// The middle of the stream: count deltas, each either cycled from the
	// recording or one big synthetic delta.
	var count int
	var next func(i int) []byte
	if nEvents != "" {
		n, err := strconv.Atoi(nEvents)
		fixed := len(api.head) + len(api.tail)
		if includeUsage {
			fixed += len(api.usage)
		}
		if api.done != nil {
			fixed++
		}
		if err != nil || n < fixed+1 {
			http.Error(w, fmt.Sprintf("bad %s: want at least %d", HeaderEvents, fixed+1), http.StatusBadRequest)
			return
		}
		count = n - fixed
		next = func(i int) []byte { return api.deltas[i%len(api.deltas)] }
	} else {
		total, err := strconv.ParseInt(bytesTotal, 10, 64)
		if err != nil || total <= 0 {
			http.Error(w, "bad "+HeaderStreamBytes, http.StatusBadRequest)
			return
		}
		size := 16 << 10
		if v := r.Header.Get(HeaderEventBytes); v != "" {
			if size, err = strconv.Atoi(v); err != nil || size <= 0 {
				http.Error(w, "bad "+HeaderEventBytes, http.StatusBadRequest)
				return
			}
		}
		ev := api.delta(strings.Repeat("lorem ipsum dolor sit amet, consectetur adipiscing elit. "[:8], size/8+1)[:size])
		count = int((total + int64(len(ev)) - 1) / int64(len(ev)))
		next = func(int) []byte { return ev }
	}

	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	_ = rc.Flush()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	first := true
	send := func(ev []byte) bool {
		if !first && delay > 0 {
			if timer == nil {
				timer = time.NewTimer(delay)
			} else {
				timer.Reset(delay)
			}
			select {
			case <-r.Context().Done():
				return false
			case <-timer.C:
			}
		}
		first = false
		if _, err := w.Write(ev); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	for _, ev := range api.head {
		if !send(ev) {
			return
		}
	}
	for i := 0; i < count; i++ {
		if !send(next(i)) {
			return
		}
	}
	// Anthropic's usage is in message_delta, part of tail; OpenAI's
	// usage chunk follows the finish_reason chunk when it was asked for.
	tailEvs := api.tail
	if includeUsage {
		tailEvs = append(append([][]byte{}, api.tail...), api.usage...)
	}
	for _, ev := range tailEvs {
		if !send(ev) {
			return
		}
	}
	if api.done != nil {
		send(api.done)
	}
}
