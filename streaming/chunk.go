// Package streaming writes chat replies to HTTP clients as they are produced:
// Server-Sent Events for the chat-proxy API (SSEWriter) and n8n-style NDJSON
// for the @n8n/chat widget (NDJSONWriter). Both share one chunk model and the
// same guarantees:
//
//   - every event is written with a single Write and flushed at once through
//     http.NewResponseController, so it passes Caddy's writer wrappers
//     (encode, the access-log recorder, ...) without being buffered;
//   - responses carry "Cache-Control: no-cache, no-transform" and
//     "Incremental: ?1", so Caddy's encode handler sends the headers at once
//     and neither compresses nor holds back the stream;
//   - content is JSON-encoded, so no text (newlines, "\r", "data:" lines,
//     invalid UTF-8) can break the framing or inject an event;
//   - a keepalive is written after a configurable silence (default 15 s);
//   - all methods are safe for concurrent use (one mutex serializes writes);
//   - Done ends the stream exactly once and is always the last thing written;
//   - write errors are returned (and remembered), so the caller can tell
//     that the client has gone.
//
// Typical use in a handler:
//
//	sw := streaming.NewSSEWriter(w, streaming.Options{})
//	sw.Header().Set("X-Message-ID", id)
//	defer sw.Done() // writes "data: [DONE]" and stops the keepalive timer
//	if err := sw.Start(); err != nil { return err }
//	for { text, err := reply.Next(); ...; if err := sw.Item(text); err != nil { /* client gone */ } }
package streaming

import (
	"errors"
	"net/http"
	"sync"
	"time"
)

// Kind is the kind of a Chunk.
type Kind string

// The kinds of chunk. Begin, End and Keepalive are framing; Item carries
// text and Error a failure.
const (
	KindBegin     Kind = "begin"
	KindItem      Kind = "item"
	KindEnd       Kind = "end"
	KindError     Kind = "error"
	KindKeepalive Kind = "keepalive"
)

// Chunk is one event of a reply stream, in the shape both writers share.
type Chunk struct {
	// Kind says what the chunk is.
	Kind Kind
	// Content is the text of an item chunk.
	Content string
	// Code is the stable error code of an error chunk (e.g. "upstream_timeout").
	Code string
	// Message is the human-readable text of an error chunk.
	Message string
}

// Writer is implemented by SSEWriter and NDJSONWriter.
type Writer interface {
	// Header returns the response headers; set extra ones before Start.
	Header() http.Header
	// Start writes the status line and headers (200) and flushes them.
	// Item, Error, Keepalive and Done call it when it has not been called.
	Start() error
	// Item writes one piece of reply text and flushes it.
	Item(content string) error
	// Error writes an error event and flushes it. The stream stays open:
	// call Done afterwards.
	Error(code, message string) error
	// Keepalive writes a keepalive and flushes it.
	Keepalive() error
	// Done ends the stream; it writes its final frame once and stops the
	// keepalive timer. Later calls return nil and write nothing.
	Done() error
	// WriteChunk writes c with the method matching c.Kind (KindBegin →
	// Start, KindEnd → Done).
	WriteChunk(c Chunk) error
	// Started reports whether the headers have been written.
	Started() bool
}

// ErrDone is returned when writing to a stream after Done.
var ErrDone = errors.New("streaming: stream already done")

// DefaultKeepaliveInterval is the silence after which a keepalive is written
// when Options.KeepaliveInterval is zero.
const DefaultKeepaliveInterval = 15 * time.Second

// Options configures a writer.
type Options struct {
	// KeepaliveInterval is the longest silence on the stream: when nothing
	// has been written for this long the writer writes a keepalive on its
	// own (from a timer goroutine, serialized with the caller's writes).
	// Zero means DefaultKeepaliveInterval (15 s); a negative value turns the
	// timer off, and the caller may then call Keepalive itself.
	KeepaliveInterval time.Duration
	// NodeID is the metadata.nodeId of NDJSON chunks; the widget groups the
	// chunks of one (nodeId, runIndex) into one bubble. Empty means
	// "chat_proxy". Ignored by SSEWriter.
	NodeID string
	// NodeName is the metadata.nodeName of NDJSON chunks. Empty means
	// "Chat Proxy". Ignored by SSEWriter.
	NodeName string
}

// stream is the part both writers share: the mutex, the sticky write error,
// flushing, and the keepalive timer.
type stream struct {
	w  http.ResponseWriter
	rc *http.ResponseController

	interval time.Duration

	mu      sync.Mutex
	started bool
	done    bool
	err     error     // first write or flush error; every later write returns it
	last    time.Time // time of the last successful write
	stop    chan struct{}
	stopped chan struct{}
}

func newStream(w http.ResponseWriter, interval time.Duration) stream {
	if interval == 0 {
		interval = DefaultKeepaliveInterval
	}
	return stream{w: w, rc: http.NewResponseController(w), interval: interval}
}

// Header returns the response headers.
func (s *stream) Header() http.Header { return s.w.Header() }

// Started reports whether the headers have been written.
func (s *stream) Started() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.started
}

// startLocked writes the headers set by setHeaders and the status 200,
// flushes, then writes first (if any), and starts the keepalive timer.
func (s *stream) startLocked(setHeaders func(http.Header), first []byte, keepalive []byte) error {
	if s.started {
		return s.err
	}
	s.started = true
	h := s.w.Header()
	h.Del("Content-Length")
	setHeaders(h)
	s.w.WriteHeader(http.StatusOK)
	s.last = time.Now()
	if first != nil {
		if err := s.writeLocked(first); err != nil {
			return err
		}
	} else if err := s.flushLocked(); err != nil {
		return err
	}
	if s.interval > 0 {
		s.stop = make(chan struct{})
		s.stopped = make(chan struct{})
		go s.keepaliveLoop(keepalive, s.stop, s.stopped)
	}
	return nil
}

// writeLocked writes p with one Write and flushes. The first error is kept
// and returned by every later call.
func (s *stream) writeLocked(p []byte) error {
	if s.err != nil {
		return s.err
	}
	if _, err := s.w.Write(p); err != nil {
		s.err = errors.Join(errWrite, err)
		return s.err
	}
	return s.flushLocked()
}

var errWrite = errors.New("streaming: write to client failed")

func (s *stream) flushLocked() error {
	if s.err != nil {
		return s.err
	}
	// A writer that cannot flush (ErrNotSupported) still gets the bytes;
	// they just are not pushed early. Every other error means the client
	// is gone.
	if err := s.rc.Flush(); err != nil && !errors.Is(err, http.ErrNotSupported) {
		s.err = errors.Join(errWrite, err)
		return s.err
	}
	s.last = time.Now()
	return nil
}

// keepaliveLoop writes frame whenever the stream has been silent for the
// interval, until stop is closed, the stream is done or a write failed.
func (s *stream) keepaliveLoop(frame []byte, stop <-chan struct{}, stopped chan<- struct{}) {
	defer close(stopped)
	t := time.NewTimer(s.interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		if s.done || s.err != nil {
			s.mu.Unlock()
			return
		}
		wait := s.interval - time.Since(s.last)
		if wait <= 0 {
			if err := s.writeLocked(frame); err != nil {
				s.mu.Unlock()
				return
			}
			wait = s.interval
		}
		s.mu.Unlock()
		t.Reset(wait)
	}
}

// finish marks the stream done under the lock (the caller holds it) and
// returns a function that stops the keepalive goroutine and waits for it;
// call it after unlocking.
func (s *stream) finishLocked() func() {
	s.done = true
	stop, stopped := s.stop, s.stopped
	s.stop = nil
	return func() {
		if stop != nil {
			close(stop)
			<-stopped
		}
	}
}
