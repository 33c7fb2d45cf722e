package n8n

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"
)

// TestReplyTextIsClean: NUL and invalid UTF-8 in n8n's reply never reach
// the caller (which relays and stores the text); a UTF-8 sequence split
// between two chunks is joined, not replaced.
func TestReplyTextIsClean(t *testing.T) {
	const euro = "\u20ac" // 3 bytes: e2 82 ac
	tests := []struct {
		name    string
		handler http.HandlerFunc
		want    string
	}{
		{"ndjson NUL", reply(200, "application/json", ndjson("a\x00b", "c")), "abc"},
		{"ndjson escaped NUL", reply(200, "application/json", chunkLine("begin", "")+`{"type":"item","content":"x\u0000y"}`+"\n"), "xy"},
		{"json NUL", reply(200, "application/json", `{"output":"nul\u0000 here"}`), "nul here"},
		{"sse invalid bytes and NUL", reply(200, "text/event-stream", "data: bad \xff\xfe byte\n\ndata: nul \x00.\n\n"), "bad \uFFFD bytenul ."},
		{"sse rune split between events", reply(200, "text/event-stream", "data: price 5"+euro[:1]+"\n\ndata: "+euro[1:]+" only\n\n"), "price 5" + euro + " only"},
		{"sse rune split, two bytes first", reply(200, "text/event-stream", "data: "+euro[:2]+"\n\ndata: "+euro[2:]+"!\n\n"), euro + "!"},
		{"sse truncated rune at the end", reply(200, "text/event-stream", "data: end "+euro[:2]+"\n\n"), "end \uFFFD"},
		{"sse truncated rune then more", reply(200, "text/event-stream", "data: a"+euro[:2]+"\n\ndata: b\n\n"), "a\uFFFDb"},
		{"text invalid bytes", reply(200, "text/plain", "plain \xc3\x28 and \x00nul"), "plain \uFFFD( and nul"},
		{"only NUL first", reply(200, "text/event-stream", "data: \x00\n\ndata: real\n\n"), "real"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, tc.handler)
			c := newClient(t, testConfig(f))
			r, err := c.Send(t.Context(), testRequest())
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			var chunks []string
			for {
				s, err := r.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("after %q: %v", chunks, err)
				}
				if s == "" || !utf8.ValidString(s) || strings.ContainsRune(s, 0) {
					t.Fatalf("chunk %q is not clean text", s)
				}
				chunks = append(chunks, s)
			}
			if got := strings.Join(chunks, ""); got != tc.want {
				t.Fatalf("reply %q (chunks %q), want %q", got, chunks, tc.want)
			}
		})
	}

	t.Run("ReadAll", func(t *testing.T) {
		f := newFake(t, reply(200, "text/event-stream", "data: x\x00\xff"+euro[:1]+"\n\ndata: "+euro[1:]+"\n\n"))
		c := newClient(t, testConfig(f))
		r, err := c.Send(t.Context(), testRequest())
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		if got := readAll(t, r); got != "x\uFFFD"+euro {
			t.Fatalf("ReadAll %q", got)
		}
	})

	t.Run("only NUL is empty", func(t *testing.T) {
		f := newFake(t, reply(200, "text/event-stream", "data: \x00\x00\n\n"))
		c := newClient(t, testConfig(f))
		_, err := c.Send(t.Context(), testRequest())
		if e := asError(t, err); e.Reason != ReasonEmpty {
			t.Fatalf("got %v, want %s", e, ReasonEmpty)
		}
	})
}
