package streaming

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// benchSink is the cheapest http.ResponseWriter that still flushes: it
// counts bytes, so a benchmark measures the writer, not the network.
type benchSink struct {
	header  http.Header
	written int64
	flushes int
}

func newBenchSink() *benchSink { return &benchSink{header: http.Header{}} }

func (s *benchSink) Header() http.Header         { return s.header }
func (s *benchSink) WriteHeader(int)             {}
func (s *benchSink) Flush()                      { s.flushes++ }
func (s *benchSink) Write(p []byte) (int, error) { s.written += int64(len(p)); return len(p), nil }

// Chunk texts as n8n's AI Agent streams them: a few tokens each; the long
// one has quotes, angle brackets and non-ASCII, which JSON escapes.
var benchChunks = map[string]string{
	"token":  "Hello",
	"phrase": "your order shipped yesterday and ",
	"long": strings.Repeat(`Voilà: <b>"naïve" café</b> — 2 × 3 ≤ 7 & done. `, 4) +
		"Here is a longer paragraph of text as a model might send it in one chunk.",
}

// One SSE item: encode, frame with its id, write, flush. This runs for
// every chunk of every reply.
func BenchmarkSSEWriterItem(b *testing.B) {
	for _, name := range []string{"token", "phrase", "long"} {
		content := benchChunks[name]
		for _, ka := range []struct {
			name     string
			interval time.Duration // -1: no timer; 0: the default 15 s
		}{{"keepalive-off", -1}, {"keepalive-on", 0}} {
			b.Run(name+"/"+ka.name, func(b *testing.B) {
				sink := newBenchSink()
				sw := NewSSEWriter(sink, Options{KeepaliveInterval: ka.interval})
				if err := sw.Start(); err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				b.SetBytes(int64(len(content)))
				for b.Loop() {
					if err := sw.Item(content); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				_ = sw.Done()
				b.ReportMetric(float64(sink.written)/float64(b.N), "wire-B/op")
			})
		}
	}
}

// The NDJSON writer's item (the @n8n/chat widget's stream), for comparison.
func BenchmarkNDJSONWriterItem(b *testing.B) {
	for _, name := range []string{"token", "phrase", "long"} {
		content := benchChunks[name]
		b.Run(name, func(b *testing.B) {
			sink := newBenchSink()
			nw := NewNDJSONWriter(sink, Options{KeepaliveInterval: -1})
			if err := nw.Start(); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.SetBytes(int64(len(content)))
			for b.Loop() {
				if err := nw.Item(content); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			_ = nw.Done()
			b.ReportMetric(float64(sink.written)/float64(b.N), "wire-B/op")
		})
	}
}

// A whole reply as the chat route writes it: a new writer, headers, eight
// items, [DONE], with the default keepalive timer (started and stopped
// once per stream).
func BenchmarkSSEWriterReply(b *testing.B) {
	content := benchChunks["phrase"]
	b.ReportAllocs()
	for b.Loop() {
		sink := newBenchSink()
		sw := NewSSEWriter(sink, Options{})
		sw.Header().Set("X-Message-ID", "0193a5b2-7c1e-7000-8000-000000000000")
		for range 8 {
			if err := sw.Item(content); err != nil {
				b.Fatal(err)
			}
		}
		if err := sw.Done(); err != nil {
			b.Fatal(err)
		}
	}
}
