package streaming

import (
	"errors"
	"net/http"
	"strings"
	"sync"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// sseEvent is one event as a browser's EventSource would see it.
type sseEvent = testkit.SSEEvent

// parseSSE parses a stream as EventSource does (see testkit.ParseSSE).
func parseSSE(s string) []sseEvent { return testkit.ParseSSE(s) }

// chanWriter is an http.ResponseWriter that hands every Write to a channel
// and counts flushes. It is safe for the writer's goroutines.
type chanWriter struct {
	mu      sync.Mutex
	header  http.Header
	status  int
	writes  chan string
	flushes int
	failAt  int // fail the failAt-th write (1-based); 0 never
	nwrites int
}

func newChanWriter() *chanWriter {
	return &chanWriter{header: http.Header{}, writes: make(chan string, 1024)}
}

var errBrokenPipe = errors.New("broken pipe")

func (c *chanWriter) Header() http.Header { return c.header }

func (c *chanWriter) WriteHeader(code int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.status == 0 {
		c.status = code
	}
}

func (c *chanWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.status == 0 {
		c.status = http.StatusOK
	}
	c.nwrites++
	if c.failAt > 0 && c.nwrites >= c.failAt {
		return 0, errBrokenPipe
	}
	c.writes <- string(p)
	return len(p), nil
}

func (c *chanWriter) Flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.flushes++
}

func (c *chanWriter) all() string {
	var b strings.Builder
	for {
		select {
		case s := <-c.writes:
			b.WriteString(s)
		default:
			return b.String()
		}
	}
}
