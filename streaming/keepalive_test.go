package streaming

import (
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestIdleStreamsHoldNoGoroutine opens many streams with the keepalive
// timer on and checks that, while idle, they add no goroutines: the timer
// is a runtime timer, not a goroutine per stream.
func TestIdleStreamsHoldNoGoroutine(t *testing.T) {
	const n = 1000
	before := runtime.NumGoroutine()
	ws := make([]Writer, 0, 2*n)
	for range n {
		sw := NewSSEWriter(newBenchSink(), Options{KeepaliveInterval: time.Hour})
		nw := NewNDJSONWriter(newBenchSink(), Options{KeepaliveInterval: time.Hour})
		for _, w := range []Writer{sw, nw} {
			if err := w.Start(); err != nil {
				t.Fatal(err)
			}
			if err := w.Item("x"); err != nil {
				t.Fatal(err)
			}
			ws = append(ws, w)
		}
	}
	during := runtime.NumGoroutine()
	t.Logf("%d idle streams: %+d goroutines (%.3f per stream)", len(ws), during-before, float64(during-before)/float64(len(ws)))
	// A little slack for unrelated goroutines of the test binary.
	if during-before > 10 {
		t.Errorf("%d idle streams added %d goroutines, want none", len(ws), during-before)
	}
	for _, w := range ws {
		if err := w.Done(); err != nil {
			t.Fatal(err)
		}
	}
	if after := runtime.NumGoroutine(); after-before > 10 {
		t.Errorf("%d goroutines left after Done", after-before)
	}
}

// stampWriter records each write and when it happened.
type stampWriter struct {
	mu     sync.Mutex
	header http.Header
	writes []stamped
}

type stamped struct {
	at time.Time
	s  string
}

func (w *stampWriter) Header() http.Header { return w.header }
func (w *stampWriter) WriteHeader(int)     {}
func (w *stampWriter) Flush()              {}
func (w *stampWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes = append(w.writes, stamped{time.Now(), string(p)})
	return len(p), nil
}

func (w *stampWriter) snapshot() []stamped {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]stamped(nil), w.writes...)
}

// TestKeepaliveOnTime runs many streams at once, each busy for a while
// and then silent, and checks that a keepalive is never written before the
// interval of silence has passed, and that silent streams do get them.
func TestKeepaliveOnTime(t *testing.T) {
	const (
		streams  = 100
		interval = 30 * time.Millisecond
	)
	type stream struct {
		w  *stampWriter
		sw *SSEWriter
	}
	ss := make([]stream, streams)
	for i := range ss {
		w := &stampWriter{header: http.Header{}}
		ss[i] = stream{w, NewSSEWriter(w, Options{KeepaliveInterval: interval})}
		if err := ss[i].sw.Start(); err != nil {
			t.Fatal(err)
		}
	}
	// Busy: an item every 5 ms on every stream, so none is silent long.
	for end := time.Now().Add(4 * interval); time.Now().Before(end); {
		for _, s := range ss {
			if err := s.sw.Item("tok"); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Silent: wait for two keepalives on every stream.
	deadline := time.Now().Add(10 * time.Second)
	for _, s := range ss {
		for {
			ws := s.w.snapshot()
			if n := countKeepalives(ws); n >= 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("keepalives missing: %d writes, last %q", len(ws), ws[len(ws)-1].s)
			}
			time.Sleep(interval / 2)
		}
	}
	var late time.Duration
	for _, s := range ss {
		if err := s.sw.Done(); err != nil {
			t.Fatal(err)
		}
		ws := s.w.snapshot()
		for i, w := range ws {
			if w.s != ": keepalive\n\n" || i == 0 {
				continue
			}
			gap := w.at.Sub(ws[i-1].at)
			if gap < interval {
				t.Fatalf("keepalive %v after the previous write, before the %v interval", gap, interval)
			}
			late = max(late, gap-interval)
		}
	}
	t.Logf("latest keepalive: %v after the interval", late)
}

func countKeepalives(ws []stamped) (n int) {
	for _, w := range ws {
		if w.s == ": keepalive\n\n" {
			n++
		}
	}
	return n
}

// TestDoneNeutralisesFiringCallback catches the timer callback after it has
// started but before it has the lock, then ends the stream: the callback
// must write nothing, and Done must not return before it has finished.
func TestDoneNeutralisesFiringCallback(t *testing.T) {
	for attempt := 0; ; attempt++ {
		if attempt == 50 {
			t.Fatal("the timer never fired while the lock was held")
		}
		cw := newChanWriter()
		sw := NewSSEWriter(cw, Options{KeepaliveInterval: time.Millisecond})
		if err := sw.Start(); err != nil { // writes begin
			t.Fatal(err)
		}
		if s := <-cw.writes; !strings.Contains(s, `"type":"begin"`) {
			t.Fatalf("Start wrote %q, want begin", s)
		}
		sw.mu.Lock()
		time.Sleep(20 * time.Millisecond) // the callback fires and blocks on mu
		stopped := sw.finishLocked()      // what Done does under the lock
		inFlight := sw.timer != nil       // Stop found the callback started
		sw.mu.Unlock()
		if !inFlight {
			<-stopped
			continue
		}
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			t.Fatal("the callback did not finish after Done")
		}
		sw.mu.Lock()
		timer := sw.timer
		sw.mu.Unlock()
		if timer != nil {
			t.Error("timer not released")
		}
		time.Sleep(5 * time.Millisecond)
		if s := cw.all(); s != "" {
			t.Fatalf("written after Done: %q", s)
		}
		return
	}
}

// handlerWriter fails the test when it is used after the handler returned
// (as net/http forbids).
type handlerWriter struct {
	header   http.Header
	returned atomic.Bool
	misuse   atomic.Int32
	mu       sync.Mutex
	last     string
}

func (w *handlerWriter) Header() http.Header { return w.header }
func (w *handlerWriter) WriteHeader(int)     { w.check() }
func (w *handlerWriter) Flush()              { w.check() }
func (w *handlerWriter) Write(p []byte) (int, error) {
	w.check()
	w.mu.Lock()
	w.last = string(p)
	w.mu.Unlock()
	return len(p), nil
}

func (w *handlerWriter) check() {
	if w.returned.Load() {
		w.misuse.Add(1)
	}
}

// TestNoWriteAfterDone races items, Done and keepalive timers firing every
// few microseconds: after Done returns the ResponseWriter is never touched,
// and the final frame is the last one. Run with -race.
func TestNoWriteAfterDone(t *testing.T) {
	var all []*handlerWriter
	for i := range 300 {
		for _, kind := range []string{"sse", "ndjson"} {
			w := &handlerWriter{header: http.Header{}}
			all = append(all, w)
			opts := Options{KeepaliveInterval: time.Duration(1+i%50) * time.Microsecond}
			var sw Writer
			if kind == "sse" {
				sw = NewSSEWriter(w, opts)
			} else {
				sw = NewNDJSONWriter(w, opts)
			}
			var wg sync.WaitGroup
			wg.Go(func() {
				for j := range 20 {
					_ = sw.Item(fmt.Sprint(j))
				}
			})
			if i%3 == 0 {
				time.Sleep(time.Duration(i%7) * 10 * time.Microsecond)
			}
			if err := sw.Done(); err != nil {
				t.Fatal(err)
			}
			w.returned.Store(true) // the handler has returned
			w.mu.Lock()
			last := w.last
			w.mu.Unlock()
			if kind == "sse" && !strings.HasSuffix(last, "data: {\"type\":\"end\"}\n\ndata: [DONE]\n\n") || kind == "ndjson" && !strings.HasPrefix(last, `{"type":"end",`) {
				t.Fatalf("%s: last write %q", kind, last)
			}
			wg.Wait()
		}
	}
	time.Sleep(10 * time.Millisecond) // let any stray timer fire
	for i, w := range all {
		if n := w.misuse.Load(); n > 0 {
			t.Fatalf("stream %d: ResponseWriter used %d times after Done", i, n)
		}
	}
}
