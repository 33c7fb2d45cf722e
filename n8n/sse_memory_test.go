package n8n

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// TestSSELoneCRMemory: lines ended by a lone "\r" are decoded without a
// copy per line. Eight concurrent 1 MiB bodies of lone CRs (1 MiB is the
// default line limit) once cost about 120 MB of heap each.
func TestSSELoneCRMemory(t *testing.T) {
	const mib = 1 << 20
	bodies := map[string][]byte{
		"lone CRs":            bytes.Repeat([]byte("\r"), mib),
		"lone CRs then LF":    append(bytes.Repeat([]byte("\r"), mib-1), '\n'),
		"events split by CRs": []byte(strings.Repeat("data: x\r\r", mib/9) + "\n"),
	}
	for name, body := range bodies {
		t.Run(name, func(t *testing.T) {
			decode := func() {
				// As Reply reads a body: each text is handed on, not kept.
				dec, _, err := sniff(newReplyReader(bytes.NewReader(body), DefaultMaxReplyBytes), "text/event-stream", DefaultMaxLineBytes)
				if err != nil {
					t.Errorf("sniff: %v", err)
					return
				}
				n := 0
				for {
					_, err := dec.next()
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Errorf("decode: %v", err)
						return
					}
					n++
				}
				if name == "events split by CRs" && n != mib/9 {
					t.Errorf("%d texts, want %d", n, mib/9)
				}
			}
			decode() // warm up
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(decode)
			}
			wg.Wait()
			runtime.ReadMemStats(&after)
			// Everything allocated while decoding bounds what the heap
			// grew by.
			allocated := after.TotalAlloc - before.TotalAlloc
			t.Logf("8 decodes allocated %.2f MiB", float64(allocated)/mib)
			if limit := uint64(2 * mib); allocated > limit {
				t.Fatalf("8 decodes of a 1 MiB body allocated %.1f MiB, want under %d MiB", float64(allocated)/mib, limit/mib)
			}
		})
	}
}

// TestSSELineLimitCountsEveryLine: whatever ends them ("\n", "\r\n" or a
// lone "\r"), lines over the limit are refused, and lines under it are
// read, however many share one "\n".
func TestSSELineLimitCountsEveryLine(t *testing.T) {
	long := "data: " + strings.Repeat("y", 300)
	tests := []struct {
		name, body string
		want       []string
		tooLong    bool
	}{
		{"long line ended by CR", long + "\r\rdata: z\n\n", nil, true},
		{"long line ended by LF", long + "\n\n", nil, true},
		{"many short CR lines past the limit", strings.Repeat("data: a\r\r", 100) + "\n", repeat("a", 100), false},
		{"CRLF across a read", "data: a\r\n\r\ndata: b\r\n\r\n", []string{"a", "b"}, false},
		{"CR then LF is one end", "data: a\r\ndata: b\r\n\r\n", []string{"a\nb"}, false},
		{"CR CR is two ends", "data: a\r\rdata: b\r\r", []string{"a", "b"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, bs := range bufSizes {
				texts, _, err := decodeWith(bs.make(strings.NewReader(tc.body), 1<<20), "text/event-stream", 256)
				var p *protoError
				if tc.tooLong {
					if !errors.As(err, &p) || p.reason != ReasonLineTooLong {
						t.Fatalf("%s: got %q, %v; want line_too_long", bs.name, texts, err)
					}
					continue
				}
				if err != nil || strings.Join(texts, "|") != strings.Join(tc.want, "|") {
					t.Fatalf("%s: got %q, %v; want %q", bs.name, texts, err, tc.want)
				}
			}
		})
	}
}

func repeat(s string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}
