package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"time"
)

// MongoDB wire protocol opcodes.
const (
	opReply      = 1
	opQuery      = 2004
	opCompressed = 2012
	opMsg        = 2013
)

// dbOp is one database request seen by the counting proxy.
type dbOp struct {
	At   time.Time     // when the proxy received the request from Caddy
	Cmd  string        // command name: find, insert, update, findAndModify, hello, ...
	Coll string        // the command's collection, when its value names one
	RTT  time.Duration // request forwarded to reply received; -1 when no reply is expected
	Docs int           // documents in the request's document sequences (inserted documents)
}

// class is "read", "write" or "other" (handshakes, heartbeats, sessions).
func (o dbOp) class() string { return cmdClass(o.Cmd) }

func cmdClass(cmd string) string {
	switch cmd {
	case "find", "aggregate", "count", "distinct", "getMore", "listCollections", "listIndexes", "listDatabases", "dbStats", "collStats":
		return "read"
	case "insert", "update", "delete", "findAndModify", "createIndexes", "create", "drop", "dropIndexes", "bulkWrite", "dropDatabase", "renameCollection":
		return "write"
	}
	return "other"
}

// background reports whether an operation is the gateway's periodic
// work rather than a request's: heartbeats, handshakes, the instance's
// own heartbeat document and the sweeper's read of the live instances
// (llm_billing_instances), and the reads of the upstream key pool refresh
// (openhands_keys, openhands_bindings, the spare-key cleanup).
func (o dbOp) background() bool {
	if o.Coll == "llm_billing_instances" {
		return true
	}
	switch o.class() {
	case "other":
		return true
	case "read":
		switch o.Coll {
		case "openhands_keys", "openhands_bindings", "openhands_backup_keys":
			return true
		}
	}
	return false
}

// dbProxy is a TCP proxy between Caddy and FerretDB that counts MongoDB
// wire messages: each request's command name and collection, the time it
// was sent, and its round-trip time to the reply. It forwards every byte
// unchanged.
type dbProxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	ops   []dbOp
	conns int
	wg    sync.WaitGroup
	live  map[net.Conn]struct{}
}

func startDBProxy(target string) (*dbProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &dbProxy{ln: ln, target: target, live: map[net.Conn]struct{}{}}
	go p.accept()
	return p, nil
}

func (p *dbProxy) addr() string { return p.ln.Addr().String() }

// setTarget sends the connections made from now on to target (a new
// FerretDB process).
func (p *dbProxy) setTarget(target string) {
	p.mu.Lock()
	p.target = target
	p.mu.Unlock()
}

// take returns the operations recorded since the last take and forgets
// them.
func (p *dbProxy) take() []dbOp {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.ops
	p.ops = make([]dbOp, 0, len(out))
	return out
}

// peek returns a copy of the operations recorded since the last take.
func (p *dbProxy) peek() []dbOp {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]dbOp(nil), p.ops...)
}

// lastWrite is the time of the latest write recorded since the last take
// (zero if none).
func (p *dbProxy) lastWrite() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	var last time.Time
	for i := len(p.ops) - 1; i >= 0 && i >= len(p.ops)-4096; i-- {
		if p.ops[i].class() == "write" && p.ops[i].At.After(last) {
			last = p.ops[i].At
		}
	}
	return last
}

func (p *dbProxy) record(op dbOp) {
	p.mu.Lock()
	p.ops = append(p.ops, op)
	p.mu.Unlock()
}

func (p *dbProxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for c := range p.live {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *dbProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

type pending struct {
	at   time.Time
	cmd  string
	coll string
	docs int
}

func (p *dbProxy) serve(client net.Conn) {
	defer p.wg.Done()
	p.mu.Lock()
	target := p.target
	p.mu.Unlock()
	server, err := net.Dial("tcp", target)
	if err != nil {
		_ = client.Close()
		return
	}
	for _, c := range []net.Conn{client, server} {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
	}
	p.mu.Lock()
	p.conns++
	p.live[client], p.live[server] = struct{}{}, struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.live, client)
		delete(p.live, server)
		p.mu.Unlock()
	}()

	var mu sync.Mutex
	waiting := map[int32]pending{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Replies: match responseTo with the request.
		_ = pump(server, client, func(hdr msgHeader, _ []byte) {
			if hdr.opCode != opMsg && hdr.opCode != opReply && hdr.opCode != opCompressed {
				return
			}
			now := time.Now()
			mu.Lock()
			w, ok := waiting[hdr.responseTo]
			delete(waiting, hdr.responseTo)
			mu.Unlock()
			if ok {
				p.record(dbOp{At: w.at, Cmd: w.cmd, Coll: w.coll, RTT: now.Sub(w.at), Docs: w.docs})
			}
		})
		_ = client.Close()
	}()
	_ = pump(client, server, func(hdr msgHeader, body []byte) {
		cmd, coll, docs, moreToCome := parseRequest(hdr, body)
		now := time.Now()
		if moreToCome {
			p.record(dbOp{At: now, Cmd: cmd, Coll: coll, RTT: -1, Docs: docs})
			return
		}
		mu.Lock()
		waiting[hdr.requestID] = pending{at: now, cmd: cmd, coll: coll, docs: docs}
		mu.Unlock()
	})
	_ = server.Close()
	<-done
}

type msgHeader struct {
	length, requestID, responseTo, opCode int32
}

// pump copies whole wire messages from src to dst, calling seen with each
// message's header and body (the bytes after the header) before
// forwarding it.
func pump(src io.Reader, dst io.Writer, seen func(msgHeader, []byte)) error {
	buf := make([]byte, 64<<10)
	for {
		if _, err := io.ReadFull(src, buf[:16]); err != nil {
			return err
		}
		h := msgHeader{
			length:     int32(binary.LittleEndian.Uint32(buf[0:])),
			requestID:  int32(binary.LittleEndian.Uint32(buf[4:])),
			responseTo: int32(binary.LittleEndian.Uint32(buf[8:])),
			opCode:     int32(binary.LittleEndian.Uint32(buf[12:])),
		}
		if h.length < 16 || h.length > 64<<20 {
			return errors.New("dbproxy: bad message length")
		}
		if int(h.length) > len(buf) {
			nb := make([]byte, h.length)
			copy(nb, buf[:16])
			buf = nb
		}
		msg := buf[:h.length]
		if _, err := io.ReadFull(src, msg[16:]); err != nil {
			return err
		}
		seen(h, msg[16:])
		if _, err := dst.Write(msg); err != nil {
			return err
		}
	}
}

// parseRequest returns the command name (the first key of the command
// document), the collection when the command's value is a string, the
// number of documents in its document sequences (an insert's documents),
// and whether the client expects no reply (OP_MSG moreToCome).
func parseRequest(h msgHeader, b []byte) (cmd, coll string, docs int, moreToCome bool) {
	switch h.opCode {
	case opMsg:
		if len(b) < 5 {
			return "?", "", 0, false
		}
		flags := binary.LittleEndian.Uint32(b)
		moreToCome = flags&2 != 0
		b = b[4:]
		if flags&1 != 0 && len(b) >= 4 { // checksumPresent
			b = b[:len(b)-4]
		}
		cmd = "?"
		// Sections: kind 0 is the command document; kind 1 a document
		// sequence: size, identifier, then documents.
		for len(b) >= 5 {
			kind := b[0]
			size := int(binary.LittleEndian.Uint32(b[1:]))
			if size < 4 || 1+size > len(b) {
				break
			}
			switch kind {
			case 0:
				cmd, coll = firstElement(b[1 : 1+size])
			case 1:
				seq := b[5 : 1+size]
				if i := bytes.IndexByte(seq, 0); i >= 0 {
					seq = seq[i+1:]
					for len(seq) >= 5 {
						n := int(binary.LittleEndian.Uint32(seq))
						if n < 5 || n > len(seq) {
							break
						}
						docs++
						seq = seq[n:]
					}
				}
			}
			b = b[1+size:]
		}
		if cmd == "insert" && docs == 0 {
			docs = 1 // documents inline in the command document
		}
		return cmd, coll, docs, moreToCome
	case opQuery:
		// flags, fullCollectionName (cstring), numberToSkip,
		// numberToReturn, query document.
		if len(b) < 4 {
			return "?", "", 0, false
		}
		b = b[4:]
		i := bytes.IndexByte(b, 0)
		if i < 0 || len(b) < i+1+8 {
			return "?", "", 0, false
		}
		cmd, coll = firstElement(b[i+1+8:])
		return cmd, coll, 0, false
	case opCompressed:
		return "compressed", "", 0, false
	}
	return "op" + strconv.Itoa(int(h.opCode)), "", 0, false
}

// firstElement returns the key of the first element of the BSON document
// at doc, and its value when it is a string.
func firstElement(doc []byte) (key, str string) {
	if len(doc) < 6 {
		return "?", ""
	}
	typ := doc[4]
	rest := doc[5:]
	i := bytes.IndexByte(rest, 0)
	if i < 0 {
		return "?", ""
	}
	key = string(rest[:i])
	rest = rest[i+1:]
	if typ == 0x02 && len(rest) >= 4 {
		n := int(binary.LittleEndian.Uint32(rest))
		if n >= 1 && 4+n <= len(rest) {
			str = string(rest[4 : 4+n-1])
		}
	}
	return key, str
}
