package streaming

import (
	"errors"
	"net/http"
	"strings"
	"sync"
)

// sseEvent is one event as a browser's EventSource would see it.
type sseEvent struct {
	id       string
	hasID    bool
	data     []string // each data line, in order
	comments []string // comment lines seen since the previous event
}

// parseSSE parses s the way the WHATWG EventSource algorithm does: lines end
// with "\r\n", "\n" or a lone "\r"; a blank line dispatches; ":" starts a
// comment; "field: value" with one optional space. Comments are attached to
// the next event; a trailing incomplete event is returned too, so that a
// test can see it.
func parseSSE(s string) (events []sseEvent) {
	var cur sseEvent
	seen := false
	for len(s) > 0 {
		i := strings.IndexAny(s, "\r\n")
		var line string
		if i < 0 {
			line, s = s, ""
		} else {
			line = s[:i]
			if s[i] == '\r' && i+1 < len(s) && s[i+1] == '\n' {
				s = s[i+2:]
			} else {
				s = s[i+1:]
			}
		}
		switch {
		case line == "":
			if seen {
				events = append(events, cur)
			}
			cur, seen = sseEvent{comments: nil}, false
		case line[0] == ':':
			cur.comments = append(cur.comments, line[1:])
		default:
			field, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			seen = true
			switch field {
			case "data":
				cur.data = append(cur.data, value)
			case "id":
				cur.id, cur.hasID = value, true
			default:
				cur.data = append(cur.data, "UNEXPECTED FIELD "+field)
			}
		}
	}
	if seen {
		events = append(events, cur)
	}
	return events
}

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
