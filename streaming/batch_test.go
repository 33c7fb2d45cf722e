package streaming

import (
	"regexp"
	"slices"
	"testing"
)

// TestBatch: with Options.Batch the headers and items wait for Flush, an
// error, keepalive or Done flushes them, Flush with nothing held costs no
// flush, and the bytes are exactly those of an unbatched stream.
func TestBatch(t *testing.T) {
	writers := []struct {
		name string
		open func(*chanWriter, Options) Writer
	}{
		{"sse", func(w *chanWriter, o Options) Writer { return NewSSEWriter(w, o) }},
		{"ndjson", func(w *chanWriter, o Options) Writer { return NewNDJSONWriter(w, o) }},
	}
	for _, wt := range writers {
		t.Run(wt.name, func(t *testing.T) {
			flushes := func(c *chanWriter) int {
				c.mu.Lock()
				defer c.mu.Unlock()
				return c.flushes
			}
			run := func(batch bool) (*chanWriter, []int) {
				c := newChanWriter()
				sw := wt.open(c, Options{KeepaliveInterval: -1, Batch: batch})
				var seen []int // flushes after each step
				step := func(err error) {
					t.Helper()
					if err != nil {
						t.Fatal(err)
					}
					seen = append(seen, flushes(c))
				}
				step(sw.Start())
				step(sw.Item("one"))
				step(sw.Item("two"))
				step(sw.Flush())
				step(sw.Flush())
				step(sw.Item("three"))
				step(sw.Error("upstream_timeout", "n8n went quiet"))
				step(sw.Item("four"))
				step(sw.Done())
				return c, seen
			}
			plain, plainFlushes := run(false)
			batched, batchFlushes := run(true)
			// NDJSON lines carry a millisecond timestamp: the two runs may
			// straddle a millisecond, which is not a difference in framing.
			if got, want := sameClock(batched.all()), sameClock(plain.all()); got != want {
				t.Fatalf("batched stream\n%q\nwant the unbatched bytes\n%q", got, want)
			}
			// start, one, two: held; Flush: 1; Flush again: nothing held;
			// three: held; Error flushes it; four: held; Done flushes.
			if want := []int{0, 0, 0, 1, 1, 1, 2, 2, 3}; !slices.Equal(batchFlushes, want) {
				t.Errorf("flushes after each step %v, want %v", batchFlushes, want)
			}
			if want := []int{1, 2, 3, 3, 3, 4, 5, 6, 7}; !slices.Equal(plainFlushes, want) {
				t.Errorf("unbatched flushes after each step %v, want %v", plainFlushes, want)
			}
		})
	}
}

var ndjsonTimestamp = regexp.MustCompile(`"timestamp":[0-9]+`)

// sameClock gives every NDJSON timestamp in s the same value.
func sameClock(s string) string {
	return ndjsonTimestamp.ReplaceAllString(s, `"timestamp":0`)
}
