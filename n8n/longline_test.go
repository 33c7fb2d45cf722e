package n8n

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// The reply reader's buffer (replyBufSize) is smaller than the lines the
// parsers accept. These tests decode replies with lines longer than it
// through the production reader and through the readers used before (64
// KiB) and a minimal one (16 bytes), fed whole, in uneven pieces and
// gzip-compressed, and require the same texts, format and error.

// decoded is what a reply decodes to, comparable across readers. Plain
// text is compared joined: its chunks follow the reads.
type decoded struct {
	texts  []string
	format Format
	reason Reason
	msg    string
	detail string
}

func (d decoded) String() string {
	n := 0
	for _, t := range d.texts {
		n += len(t)
	}
	return string(d.format) + " " + strconv.Itoa(len(d.texts)) + " texts of " + strconv.Itoa(n) + " bytes, error " +
		string(d.reason) + " " + d.msg
}

func decodedOf(texts []string, format Format, err error) decoded {
	d := decoded{texts: texts, format: format}
	if format == FormatText && len(texts) > 0 {
		d.texts = []string{strings.Join(texts, "")}
	}
	if err != nil {
		var p *protoError
		if !errors.As(err, &p) {
			d.reason, d.msg = "?", err.Error()
			return d
		}
		d.reason, d.msg, d.detail = p.reason, p.msg, p.detail
	}
	return d
}

func (d decoded) equal(o decoded) bool {
	if d.format != o.format || d.reason != o.reason || d.msg != o.msg || d.detail != o.detail || len(d.texts) != len(o.texts) {
		return false
	}
	for i := range d.texts {
		if d.texts[i] != o.texts[i] {
			return false
		}
	}
	return true
}

// bufSizes are the reader buffers compared: the production one, the 64
// KiB one it replaced, and bufio's minimum.
var bufSizes = []struct {
	name string
	make func(r io.Reader, maxReply int64) *bufio.Reader
}{
	{"new", newReplyReader},
	{"64KiB", func(r io.Reader, maxReply int64) *bufio.Reader {
		return bufio.NewReaderSize(&limitReader{r: r, n: maxReply, max: maxReply}, 64<<10)
	}},
	{"16B", func(r io.Reader, maxReply int64) *bufio.Reader {
		return bufio.NewReaderSize(&limitReader{r: r, n: maxReply, max: maxReply}, 16)
	}},
}

// unevenReader returns reads of varying sizes, as a network does.
type unevenReader struct {
	r io.Reader
	i int
}

func (u *unevenReader) Read(p []byte) (int, error) {
	u.i++
	n := []int{1, 7919, 13, 4096, 65537, 4097, 300}[u.i%7]
	return u.r.Read(p[:min(len(p), n)])
}

// sources feed a body to the reader: whole, in uneven pieces, one byte at
// a time (small bodies only) and gzip-compressed (gz, compressed once).
var sources = []struct {
	name string
	open func(t *testing.T, body, gz []byte) io.Reader
}{
	{"whole", func(_ *testing.T, body, _ []byte) io.Reader { return bytes.NewReader(body) }},
	{"uneven", func(_ *testing.T, body, _ []byte) io.Reader { return &unevenReader{r: bytes.NewReader(body)} }},
	{"bytewise", func(_ *testing.T, body, _ []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(body)) }},
	{"gzip", func(t *testing.T, _, gz []byte) io.Reader {
		zr, err := gzip.NewReader(&unevenReader{r: bytes.NewReader(gz)})
		if err != nil {
			t.Fatal(err)
		}
		return zr
	}},
}

func gzipped(body []byte) []byte {
	var z bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&z, gzip.BestSpeed)
	_, _ = zw.Write(body)
	_ = zw.Close()
	return z.Bytes()
}

// itemLine is an NDJSON item line whose length, without the "\n", is n.
func itemLine(n int) string {
	const pre, post = `{"type":"item","content":"`, `"}`
	return pre + filler(n-len(pre)-len(post)) + post
}

// filler is n bytes of JSON-safe text that varies along its length.
func filler(n int) string {
	var b strings.Builder
	for i := 0; b.Len() < n; i++ {
		b.WriteString(strconv.Itoa(i))
		b.WriteByte(' ')
	}
	return b.String()[:n]
}

func TestLongLinesParseAsBefore(t *testing.T) {
	const mib = 1 << 20
	k5, k100 := filler(5<<10), filler(100<<10)
	m1 := filler(mib)
	item := func(s string) string { return `{"type":"item","content":"` + s + `"}` + "\n" }
	begin, end := `{"type":"begin"}`+"\n", `{"type":"end"}`+"\n"

	type want struct {
		texts  []string
		format Format
		reason Reason
	}
	tests := []struct {
		name     string
		ct, body string
		maxLine  int
		maxReply int64
		want     want
	}{
		// NDJSON items longer than the buffer, after a short first line
		// (lineReader) and as the first line (readFirstLine).
		{name: "ndjson 5KiB item", ct: "application/json", body: begin + item(k5) + item("b") + end,
			want: want{[]string{k5, "b"}, FormatNDJSON, ""}},
		{name: "ndjson 100KiB item", ct: "application/json", body: begin + item(k100) + item(k5) + end,
			want: want{[]string{k100, k5}, FormatNDJSON, ""}},
		{name: "ndjson 1MiB item", ct: "application/json; charset=utf-8", body: begin + item("a") + item(m1) + item("z") + end, maxLine: 2 * mib,
			want: want{[]string{"a", m1, "z"}, FormatNDJSON, ""}},
		{name: "ndjson 1MiB first line", ct: "application/x-ndjson", body: item(m1) + item(k100) + end, maxLine: 2 * mib,
			want: want{[]string{m1, k100}, FormatNDJSON, ""}},
		{name: "ndjson 100KiB first line unlabelled", ct: "", body: item(k100), want: want{[]string{k100}, FormatNDJSON, ""}},
		{name: "ndjson crlf long lines", ct: "application/json", body: strings.ReplaceAll(begin+item(k100)+item(k5)+end, "\n", "\r\n"),
			want: want{[]string{k100, k5}, FormatNDJSON, ""}},
		{name: "ndjson line of exactly MaxLineBytes", ct: "application/json", body: begin + itemLine(mib) + "\n" + end,
			want: want{[]string{filler(mib - 28)}, FormatNDJSON, ""}},
		{name: "ndjson first line of exactly MaxLineBytes", ct: "application/json", body: itemLine(mib) + "\n" + end,
			want: want{[]string{filler(mib - 28)}, FormatNDJSON, ""}},
		{name: "ndjson line over MaxLineBytes", ct: "application/json", body: begin + item("ok") + itemLine(mib+1) + "\n" + end,
			want: want{[]string{"ok"}, FormatNDJSON, ReasonLineTooLong}},
		{name: "ndjson 1MiB item over default MaxLineBytes", ct: "application/json", body: begin + item(m1) + end,
			want: want{nil, FormatNDJSON, ReasonLineTooLong}},
		{name: "ndjson long line over MaxReplyBytes", ct: "application/json", body: begin + item("ok") + item(k100) + end, maxReply: 50 << 10,
			want: want{[]string{"ok"}, FormatNDJSON, ReasonTooLarge}},

		// SSE data lines longer than the buffer.
		{name: "sse 5KiB data", ct: "text/event-stream", body: "data: " + k5 + "\n\ndata: b\n\n",
			want: want{[]string{k5, "b"}, FormatSSE, ""}},
		{name: "sse 100KiB chunk object", ct: "text/event-stream", body: "data: " + item(k100) + "\ndata: [DONE]\n\n",
			want: want{[]string{k100}, FormatSSE, ""}},
		{name: "sse 1MiB data", ct: "text/event-stream", body: ": hi\r\ndata: " + m1 + "\r\n\r\ndata: {\"output\":\"o\"}\r\rdata: [DONE]\n\n", maxLine: 2 * mib,
			want: want{[]string{m1, "o"}, FormatSSE, ""}},
		{name: "sse long data lines joined", ct: "text/event-stream", body: "data: " + k100 + "\ndata: " + k5 + "\n\n",
			want: want{[]string{k100 + "\n" + k5}, FormatSSE, ""}},
		{name: "sse data line over MaxLineBytes", ct: "text/event-stream", body: "data: a\n\ndata: " + m1 + "\n\n",
			want: want{[]string{"a"}, FormatSSE, ReasonLineTooLong}},

		// Whole JSON documents longer than the buffer, on one line (longer
		// than MaxLineBytes too) or pretty-printed.
		{name: "json 100KiB", ct: "application/json", body: `{"output":"` + k100 + `"}`, want: want{[]string{k100}, FormatJSON, ""}},
		{name: "json 1MiB one line", ct: "application/json", body: `[{"output":"` + m1 + `","id":1}]`, want: want{[]string{m1}, FormatJSON, ""}},
		{name: "json 1MiB pretty", ct: "", body: "{\n  \"text\": \"" + m1 + "\",\n  \"x\": \"" + k100 + "\"\n}\n", want: want{[]string{m1}, FormatJSON, ""}},
		{name: "json long first line not a chunk", ct: "application/json", body: `{"type":"x","output":"` + k100 + `"}` + "\n",
			want: want{[]string{k100}, FormatJSON, ""}},
		{name: "json 1MiB over MaxReplyBytes", ct: "application/json", body: `{"output":"` + m1 + `"}`, maxReply: mib,
			want: want{nil, "", ReasonTooLarge}},
		{name: "broken 100KiB json", ct: "application/json", body: `{"output":"` + k100, want: want{nil, "", ReasonInvalid}},
		{name: "unlabelled 100KiB non-json is text", ct: "", body: `{` + k100, want: want{[]string{`{` + k100}, FormatText, ""}},

		// Plain text longer than the buffer.
		{name: "text 1MiB", ct: "text/plain; charset=utf-8", body: "Hello " + m1 + "\n" + k100, want: want{[]string{"Hello " + m1 + "\n" + k100}, FormatText, ""}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			maxLine, maxReply := tc.maxLine, tc.maxReply
			if maxLine == 0 {
				maxLine = DefaultMaxLineBytes
			}
			if maxReply == 0 {
				maxReply = DefaultMaxReplyBytes
			}
			body := []byte(tc.body)
			gz := gzipped(body)
			big := len(body) > 200<<10
			var first *decoded
			for _, src := range sources {
				if big && (src.name == "bytewise" || src.name == "uneven") {
					continue // slow under -race; the 100 KiB cases have them
				}
				for _, bs := range bufSizes {
					if big && bs.name == "16B" && src.name != "whole" {
						continue
					}
					got := decodedOf(decodeWith(bs.make(src.open(t, body, gz), maxReply), tc.ct, maxLine))
					if first == nil {
						first = &got
						w := decodedOf(tc.want.texts, tc.want.format, nil)
						w.reason, w.msg, w.detail = tc.want.reason, got.msg, got.detail
						if !got.equal(w) {
							t.Fatalf("%s/%s: got %v, want %v", src.name, bs.name, got, w)
						}
						continue
					}
					if !got.equal(*first) {
						t.Errorf("%s/%s: got %v, want %v as with %s/%s", src.name, bs.name, got, *first, sources[0].name, bufSizes[0].name)
					}
				}
			}
		})
	}
}

// Through the client, plain and compressed (flushed in pieces, so that
// lines span compressed blocks).
func TestLongLinesThroughClient(t *testing.T) {
	m1, k100 := filler(1<<20), filler(100<<10)
	item := func(s string) string { return `{"type":"item","content":"` + s + `"}` + "\n" }
	ndjsonBody := `{"type":"begin"}` + "\n" + item(k100) + item(m1) + `{"type":"end"}` + "\n"
	sseBody := "data: " + k100 + "\n\ndata: " + m1 + "\n\ndata: [DONE]\n\n"
	jsonBody := `{"output":"` + m1 + `"}`
	pieces := func(s string) []string { // cut inside the long lines
		return []string{s[:3000], s[3000 : 200<<10], s[200<<10 : 700<<10], s[700<<10:]}
	}
	for _, enc := range []string{"identity", "gzip", "br"} {
		for i, tc := range []struct {
			name, ct, body string
			want           string
			format         Format
		}{
			{"ndjson", "application/json; charset=utf-8", ndjsonBody, k100 + m1, FormatNDJSON},
			{"sse", "text/event-stream", sseBody, k100 + m1, FormatSSE},
			{"json", "application/json", jsonBody, m1, FormatJSON},
		} {
			if enc == "br" && i > 0 {
				continue // slow to compress under -race; gzip has them
			}
			t.Run(enc+"/"+tc.name, func(t *testing.T) {
				h := compressed(enc, tc.ct, pieces(tc.body)...)
				if enc == "identity" {
					h = reply(200, tc.ct, tc.body)
				}
				f := newFake(t, h)
				cfg := testConfig(f)
				cfg.MaxLineBytes = 2 << 20
				// Compressing megabytes is slow under -race on a busy machine.
				cfg.UpstreamTimeout, cfg.StreamIdleTimeout, cfg.MaxStreamDuration = time.Minute, time.Minute, 2*time.Minute
				c := newClient(t, cfg)
				r, err := c.Send(t.Context(), testRequest())
				if err != nil {
					t.Fatalf("Send: %v", err)
				}
				defer r.Close()
				if got := readAll(t, r); got != tc.want {
					t.Fatalf("reply of %d bytes, want %d", len(got), len(tc.want))
				}
				if r.Format() != tc.format {
					t.Errorf("format %s, want %s", r.Format(), tc.format)
				}
			})
		}
	}
}
