package n8n

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
	"unicode/utf8"

	"github.com/chatproxy/caddy-chatproxy/internal/cleantext"
)

// checkDecoded asserts what must hold for any body: only parse errors (the
// input is in memory, so no I/O errors), and never an empty text.
func checkDecoded(t *testing.T, texts []string, err error) {
	t.Helper()
	var p *protoError
	if err != nil && !errors.As(err, &p) {
		t.Fatalf("unexpected error type %T: %v", err, err)
	}
	for i, s := range texts {
		if s == "" {
			t.Fatalf("text %d is empty", i)
		}
	}
}

// sameWithOtherBuffers decodes body with the 64 KiB and 16-byte readers
// (bufSizes) and wants what the production reader gave. Lines longer
// than the buffer are joined, so only sniffing may see less: it looks at
// what is buffered after the leading white space for an HTML start and
// the error detail, which differs when that white space ends near the
// buffer's end; such bodies are skipped.
func sameWithOtherBuffers(t *testing.T, body []byte, ct string, maxLine int, maxReply int64, want decoded) {
	t.Helper()
	lead := 0
	for lead < len(body) {
		if c := body[lead]; c == ' ' || c == '\t' || c == '\r' || c == '\n' {
			lead++
		} else if bytes.HasPrefix(body[lead:], []byte("\xef\xbb\xbf")) {
			lead += 3
		} else {
			break
		}
	}
	html := lead < len(body) && body[lead] == '<'
	for _, bs := range bufSizes[1:] {
		if html && (bs.name == "16B" || lead >= replyBufSize-256) {
			continue
		}
		got := decodedOf(decodeWith(bs.make(bytes.NewReader(body), maxReply), ct, maxLine))
		if !got.equal(want) {
			t.Fatalf("%s reader, %q: got %v (%q), want %v (%q)", bs.name, ct, got, got.texts, want, want.texts)
		}
	}
}

// FuzzNDJSONParser feeds arbitrary bodies to the reply parser (labelled as
// n8n labels its streams, and as other content types the sniffing must
// cope with), then checks that lines built from arbitrary texts
// round-trip.
func FuzzNDJSONParser(f *testing.F) {
	f.Add([]byte(ndjson("Hel", "lo")), "a", "b")
	f.Add([]byte(`{"type":"keepalive"}`+"\n"+chunkLine("item", "x")+`{"type":"error","content":null}`+"\n"), "", "\n")
	f.Add([]byte(`{"output":"x"}`), "{\"output\":\"u\"}", "é")
	f.Add([]byte("[{\"text\":\"t\"}]"), "\r\n", "data: x")
	f.Add([]byte("\xef\xbb\xbf {\"type\":\"item\",\"content\":{\"a\":1}}\n<html>"), "\x00", "\xff")
	f.Add([]byte(`{"executionStarted":true}`), "👋", "  ")
	contentTypes := []string{"application/json; charset=utf-8", "text/plain", "", "application/x-ndjson", "text/html"}
	f.Fuzz(func(t *testing.T, body []byte, a, b string) {
		for _, ct := range contentTypes {
			texts, format, err := decodeBody(body, ct, 256, 4096)
			checkDecoded(t, texts, err)
			sameWithOtherBuffers(t, body, ct, 256, 4096, decodedOf(texts, format, err))
		}

		// Round trip: begin, item a, keepalive, item b, end.
		var lines strings.Builder
		lines.WriteString(chunkLine("begin", ""))
		for _, s := range []string{a, b} {
			lines.WriteString(chunkLine("item", s))
			lines.WriteString(`{"type":"keepalive"}` + "\n")
		}
		lines.WriteString(chunkLine("end", ""))
		texts, format, err := decodeBody([]byte(lines.String()), "application/json", 1<<20, 1<<22)
		if err != nil || format != FormatNDJSON {
			t.Fatalf("round trip: %v (format %s)", err, format)
		}
		var want []string
		for _, s := range []string{a, b} {
			if s = unwrapItem(string([]rune(s))); s != "" {
				want = append(want, s)
			}
		}
		if strings.Join(texts, "|") != strings.Join(want, "|") || len(texts) != len(want) {
			t.Fatalf("got %q, want %q", texts, want)
		}
	})
}

// FuzzSSEParser feeds arbitrary event streams to the parser, then checks
// that multi-line data round-trips.
func FuzzSSEParser(f *testing.F) {
	f.Add([]byte("data: a\n\ndata: {\"type\":\"item\",\"content\":\"b\"}\r\n\r\n: c\rdata: [DONE]\n\n"), "line1\nline2")
	f.Add([]byte("event: error\ndata: x\n\n"), "é 👋")
	f.Add([]byte("data:no space\ndata\n\nid: 3\nretry: 5\n\n"), "data: inner\n\nevent: x")
	f.Add([]byte("data: \"quoted\"\n\ndata: {\"output\":\"o\"}\n\n"), ":comment")
	f.Add([]byte("data: a\r\r\r\rdata: b\r\n\rdata: c\r"), "x\ny")
	f.Add([]byte("\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\n"), "z")
	f.Fuzz(func(t *testing.T, body []byte, s string) {
		texts, format, err := decodeBody(body, "text/event-stream", 256, 4096)
		checkDecoded(t, texts, err)
		want := decodedOf(texts, format, err)
		sameWithOtherBuffers(t, body, "text/event-stream", 256, 4096, want)

		// "\n", "\r\n" and a lone "\r" end lines alike.
		if !bytes.ContainsRune(body, '\r') {
			for _, end := range []string{"\r", "\r\n"} {
				other := bytes.ReplaceAll(body, []byte("\n"), []byte(end))
				if int64(len(other)) > 4096 {
					continue // past the reply limit where body is not
				}
				got := decodedOf(decodeBody(other, "text/event-stream", 256, 4096))
				if !got.equal(want) {
					t.Fatalf("lines ended by %q: got %v (%q), want %v (%q)", end, got, got.texts, want, want.texts)
				}
			}
		}

		t0 := strings.TrimSpace(s)
		if s == "" || strings.ContainsRune(s, '\r') || !utf8.ValidString(s) ||
			strings.HasPrefix(t0, "{") || strings.HasPrefix(t0, `"`) || s == "[DONE]" {
			return // empty, re-framed, or interpreted (JSON, [DONE]) data
		}
		var stream strings.Builder
		for line := range strings.SplitSeq(s, "\n") {
			stream.WriteString("data: " + line + "\n")
		}
		stream.WriteString("\n: keepalive\n\ndata: [DONE]\n\n")
		texts, format, err = decodeBody([]byte(stream.String()), "text/event-stream", 1<<20, 1<<22)
		if err != nil || format != FormatSSE {
			t.Fatalf("round trip: %v", err)
		}
		if len(texts) != 1 || texts[0] != s {
			t.Fatalf("got %q, want %q", texts, s)
		}
	})
}

// FuzzTextChunks reads plain-text bodies one byte at a time: chunks must
// concatenate to the body and never split a UTF-8 sequence.
func FuzzTextChunks(f *testing.F) {
	f.Add("héllo wörld 👋🏽 世界")
	f.Add("plain")
	f.Add("bad \xff\xe2\x82 end")
	f.Fuzz(func(t *testing.T, s string) {
		if strings.TrimLeft(s, " \t\r\n") != s || s == "" {
			return // leading white space is skipped while sniffing
		}
		d := &textDecoder{br: bufio.NewReader(iotest.OneByteReader(strings.NewReader(s)))}
		var got strings.Builder
		for {
			chunk, err := d.next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if utf8.ValidString(s) && !utf8.ValidString(chunk) {
				t.Fatalf("chunk %q splits a rune", chunk)
			}
			got.WriteString(chunk)
		}
		if got.String() != s {
			t.Fatalf("got %q, want %q", got.String(), s)
		}
	})
}

// FuzzCleanChunks splits a text into chunks at arbitrary points, as n8n's
// stream may, and reads them as Reply does: every text handed out is
// clean and not empty, and valid text comes out whole (without its NULs)
// however its characters were split.
func FuzzCleanChunks(f *testing.F) {
	f.Add("héllo wörld 👋🏽 世界", []byte{1, 2, 3, 7})
	f.Add("a\x00b\xffc\xe2\x82", []byte{2})
	f.Add("\u20ac\u20ac\u20ac", []byte{1, 1, 1, 1, 1, 1, 1, 1})
	f.Add("\x00\x00\xe2", []byte{1})
	f.Fuzz(func(t *testing.T, s string, cuts []byte) {
		var pieces []string
		rest := s
		for _, c := range cuts {
			n := int(c) % (len(rest) + 1)
			pieces = append(pieces, rest[:n])
			rest = rest[n:]
		}
		pieces = append(pieces, rest)
		r := &Reply{dec: &piecesDecoder{pieces: pieces}}
		var got strings.Builder
		for {
			text, err := r.nextText()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if text == "" || !cleantext.Valid(text) {
				t.Fatalf("text %q from pieces %q is not clean", text, pieces)
			}
			got.WriteString(text)
		}
		if want := strings.ReplaceAll(s, "\x00", ""); utf8.ValidString(s) && got.String() != want {
			t.Fatalf("pieces %q gave %q, want %q", pieces, got.String(), want)
		}
		if !utf8.ValidString(s) && !strings.Contains(got.String(), "\uFFFD") {
			t.Fatalf("invalid %q gave %q without a replacement character", s, got.String())
		}
	})
}

// piecesDecoder yields the given texts (skipping empty ones), then io.EOF.
type piecesDecoder struct{ pieces []string }

func (d *piecesDecoder) next() (string, error) {
	for len(d.pieces) > 0 {
		p := d.pieces[0]
		d.pieces = d.pieces[1:]
		if p != "" {
			return p, nil
		}
	}
	return "", io.EOF
}
