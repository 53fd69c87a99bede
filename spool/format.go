package spool

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
)

// Frame layout; see the package documentation.
const (
	headerLen = 24

	kindAppend = 1
	kindDone   = 2

	// MaxIDLen is the longest record id, in bytes.
	MaxIDLen = 256
	// MaxDataLen is the largest record payload, in bytes.
	MaxDataLen = 1 << 20
)

// magic starts every frame. 0xFF never occurs in UTF-8 text, so a JSON
// payload cannot contain a false frame start.
var magic = [4]byte{0xFF, 'S', 'P', 'L'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// appendFrame appends the frame of one record to b.
func appendFrame(b []byte, kind byte, seq uint64, id string, data []byte) []byte {
	start := len(b)
	b = append(b, magic[:]...)
	b = append(b, kind, 0)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(id)))
	b = binary.LittleEndian.AppendUint32(b, uint32(len(data)))
	b = binary.LittleEndian.AppendUint64(b, seq)
	b = append(b, 0, 0, 0, 0) // CRC, filled in below
	b = append(b, id...)
	b = append(b, data...)
	f := b[start:]
	c := crc32.Update(0, castagnoli, f[4:20])
	c = crc32.Update(c, castagnoli, f[headerLen:])
	binary.LittleEndian.PutUint32(f[20:24], c)
	return b
}

// frame is one intact frame found in a segment.
type frame struct {
	kind byte
	seq  uint64
	id   []byte
	data []byte
	off  int // offset of the frame in the segment
	n    int // length of the whole frame
}

// parseAt parses the frame at buf[p:]; ok is false unless a whole, intact
// frame with in-bounds lengths and a matching CRC is there.
func parseAt(buf []byte, p int) (f frame, ok bool) {
	if len(buf)-p < headerLen {
		return f, false
	}
	h := buf[p : p+headerLen]
	if [4]byte(h[0:4]) != magic || h[5] != 0 {
		return f, false
	}
	kind := h[4]
	idLen := int(binary.LittleEndian.Uint16(h[6:8]))
	dataLen := int(binary.LittleEndian.Uint32(h[8:12]))
	switch {
	case kind != kindAppend && kind != kindDone,
		idLen < 1 || idLen > MaxIDLen,
		dataLen > MaxDataLen,
		kind == kindDone && dataLen != 0,
		len(buf)-p-headerLen < idLen+dataLen:
		return f, false
	}
	n := headerLen + idLen + dataLen
	body := buf[p+headerLen : p+n]
	c := crc32.Update(0, castagnoli, h[4:20])
	c = crc32.Update(c, castagnoli, body)
	if c != binary.LittleEndian.Uint32(h[20:24]) {
		return f, false
	}
	return frame{
		kind: kind,
		seq:  binary.LittleEndian.Uint64(h[12:20]),
		id:   body[:idLen],
		data: body[idLen:],
		off:  p,
		n:    n,
	}, true
}

// damage is a stretch of a segment that held no intact frame.
type damage struct {
	off, n int
	tail   bool // it runs to the end of the segment (e.g. a torn last write)
}

// scan calls fn for every intact frame of buf, in order. Whatever cannot be
// parsed is skipped: the scan resumes at the next magic after the bad spot,
// so one damaged frame costs only itself. The damaged stretches are returned.
func scan(buf []byte, fn func(frame)) []damage {
	var bad []damage
	start := -1 // start of the current damaged stretch, or -1
	p := 0
	for p < len(buf) {
		if f, ok := parseAt(buf, p); ok {
			if start >= 0 {
				bad = append(bad, damage{off: start, n: p - start})
				start = -1
			}
			fn(f)
			p += f.n
			continue
		}
		if start < 0 {
			start = p
		}
		i := bytes.Index(buf[p+1:], magic[:])
		if i < 0 {
			p = len(buf)
			break
		}
		p += 1 + i
	}
	if start >= 0 {
		bad = append(bad, damage{off: start, n: len(buf) - start, tail: true})
	}
	return bad
}
