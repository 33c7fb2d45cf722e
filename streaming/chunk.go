// Package streaming writes chat replies to HTTP clients as they are produced:
// Server-Sent Events for the chat-proxy API (SSEWriter) and n8n-style NDJSON
// for the @n8n/chat widget (NDJSONWriter). Both share one chunk model and the
// same guarantees:
//
//   - every event is written with a single Write and flushed at once through
//     http.NewResponseController, so it passes Caddy's writer wrappers
//     (encode, the access-log recorder, ...) without being buffered; with
//     Options.Batch, the headers and items wait for the caller's Flush, so
//     a relay sends what arrived together in one write;
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
	// Start writes the status line and headers (200) and the opening
	// begin event, and flushes them.
	// Item, Error, Keepalive and Done call it when it has not been called.
	Start() error
	// Item writes one piece of reply text and flushes it (with
	// Options.Batch, leaves it for Flush).
	Item(content string) error
	// Flush sends what Start and Item left unflushed (Options.Batch).
	Flush() error
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
	// own (from a timer callback, serialized with the caller's writes; an
	// idle stream holds no goroutine).
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
	// Batch leaves the headers (Start) and items in the response buffer
	// until the caller's Flush; Error, Keepalive and Done flush as always.
	// For a relay that calls Flush whenever it is about to wait for more
	// upstream data: items that arrived together leave in one write
	// instead of one write each, and none waits while upstream is silent.
	Batch bool
	// ResumeAfter continues a reply's SSE stream for a client that has its
	// events up to this id: Start writes no begin event, and the next event
	// has id ResumeAfter+1. Zero: a stream from begin. Ignored by
	// NDJSONWriter.
	ResumeAfter uint64
}

// stream is the part both writers share: the mutex, the sticky write error,
// flushing, the frame buffer and the keepalive timer.
type stream struct {
	w  http.ResponseWriter
	rc http.ResponseController // a value, not a pointer: one allocation less per stream

	interval  time.Duration
	keepalive []byte // the frame the timer writes
	batch     bool   // Options.Batch

	mu      sync.Mutex
	started bool
	done    bool
	held    bool      // written but not flushed yet (batch)
	err     error     // first write or flush error; every later write returns it
	last    time.Time // time of the last successful write
	buf     []byte    // frame being encoded; reused so that events do not allocate
	// timer writes keepalives. It is a time.AfterFunc timer, so an idle
	// stream holds no goroutine. nil when off or stopped for good.
	timer *time.Timer
	// stopped is closed once the timer is stopped for good and no callback
	// can touch the ResponseWriter any more.
	stopped chan struct{}
}

// maxKeptBuf is the largest frame buffer kept between events: an idle
// stream should not pin the memory of one exceptionally long chunk.
const maxKeptBuf = 4 << 10

func newStream(w http.ResponseWriter, opts Options, keepalive []byte) stream {
	interval := opts.KeepaliveInterval
	if interval == 0 {
		interval = DefaultKeepaliveInterval
	}
	return stream{w: w, rc: *http.NewResponseController(w), interval: interval, keepalive: keepalive, batch: opts.Batch}
}

// Flush sends what Start and Item left unflushed (Options.Batch); it is
// cheap when nothing is, and returns the stream's write error, if any.
func (s *stream) Flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.held {
		return s.err
	}
	return s.flushLocked()
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
// flushes (batch: holds), then writes first (if any), and starts the
// keepalive timer.
func (s *stream) startLocked(setHeaders func(http.Header), first []byte) error {
	if s.started {
		return s.err
	}
	s.started = true
	h := s.w.Header()
	h.Del("Content-Length")
	setHeaders(h)
	s.w.WriteHeader(http.StatusOK)
	s.last = time.Now()
	switch {
	case first != nil:
		if err := s.emitLocked(first); err != nil {
			return err
		}
	case s.batch:
		s.held = true
	default:
		if err := s.flushLocked(); err != nil {
			return err
		}
	}
	if s.interval > 0 {
		s.stopped = make(chan struct{})
		// Armed under s.mu, which the callback takes first: it always
		// sees s.timer set.
		s.timer = time.AfterFunc(s.interval, s.keepaliveTick)
	}
	return nil
}

// writeLocked writes p with one Write and flushes. The first error is kept
// and returned by every later call.
func (s *stream) writeLocked(p []byte) error {
	if err := s.holdLocked(p); err != nil {
		return err
	}
	return s.flushLocked()
}

// holdLocked writes p with one Write and leaves it for Flush.
func (s *stream) holdLocked(p []byte) error {
	if s.err != nil {
		return s.err
	}
	if _, err := s.w.Write(p); err != nil {
		s.err = errors.Join(errWrite, err)
		return s.err
	}
	s.held = true
	return nil
}

// emitLocked writes an item or opening frame: held with Options.Batch,
// else flushed.
func (s *stream) emitLocked(p []byte) error {
	if s.batch {
		return s.holdLocked(p)
	}
	return s.writeLocked(p)
}

// writeBufLocked writes s.buf (the frame just encoded into it) and keeps
// the buffer for the next frame unless it grew too large.
func (s *stream) writeBufLocked() error {
	err := s.writeLocked(s.buf)
	s.recycleBufLocked()
	return err
}

// emitBufLocked is writeBufLocked for item frames (see emitLocked).
func (s *stream) emitBufLocked() error {
	err := s.emitLocked(s.buf)
	s.recycleBufLocked()
	return err
}

func (s *stream) recycleBufLocked() {
	if cap(s.buf) > maxKeptBuf {
		s.buf = nil
	} else {
		s.buf = s.buf[:0]
	}
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
	s.held = false
	s.last = time.Now()
	return nil
}

// keepaliveTick is the timer's callback, run on a short-lived goroutine of
// its own. It writes a keepalive when the stream has been silent for the
// interval and re-arms the timer for the next possible deadline, so writes
// never touch the timer. It stops for good once the stream is done or a
// write failed.
func (s *stream) keepaliveTick() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.timer == nil {
		return
	}
	if !s.done && s.err == nil {
		wait := s.interval - time.Since(s.last)
		if wait > 0 {
			s.timer.Reset(wait)
			return
		}
		if s.writeLocked(s.keepalive) == nil {
			s.timer.Reset(s.interval)
			return
		}
	}
	s.timer = nil
	close(s.stopped)
}

// finishLocked marks the stream done under the lock (the caller holds it)
// and stops the keepalive timer. It returns a channel to wait on after
// unlocking (nil: nothing to wait for): if a callback has already started
// it is blocked on s.mu, will see done without writing, and closes the
// channel, so that nothing uses the ResponseWriter once Done returns.
func (s *stream) finishLocked() <-chan struct{} {
	s.done = true
	s.buf = nil
	if s.timer != nil && s.timer.Stop() {
		s.timer = nil
		close(s.stopped)
	}
	return s.stopped
}
