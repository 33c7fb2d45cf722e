package streaming

import (
	"net/http"
	"strconv"
)

// SSEWriter writes the chat-proxy SSE stream (SPEC §4, amended), framed as
// n8n frames its streamed replies:
//
//	id: 1
//	data: {"type":"begin","message_id":"0193…"}
//
//	id: 2
//	data: {"type":"item","content":"Hel"}
//
//	: keepalive
//
//	id: 3
//	data: {"type":"error","error":"upstream_unavailable","message":"…"}
//
//	id: 4
//	data: {"type":"end"}
//
//	data: [DONE]
//
// Start writes begin, whose message_id is the X-Message-ID header the
// caller set before it (widgets written against n8n's stream open their
// reply bubble on begin); Done writes end and then [DONE]. Every event
// carries an "id:" line (1, 2, 3, …) and one JSON data line; the stream
// always ends with "data: [DONE]", which has no id.
type SSEWriter struct {
	stream
	lastID uint64
	resume bool // Options.ResumeAfter: no begin event
}

var _ Writer = (*SSEWriter)(nil)

var (
	sseKeepalive = []byte(": keepalive\n\n")
	sseDone      = []byte("data: [DONE]\n\n")
)

// MessageIDHeader is the response header that names the stored reply; the
// begin event carries the same id.
const MessageIDHeader = "X-Message-ID"

// NewSSEWriter returns a writer for w. Nothing is written before Start (or
// the first event), so the caller may still set headers such as X-Message-ID.
func NewSSEWriter(w http.ResponseWriter, opts Options) *SSEWriter {
	return &SSEWriter{stream: newStream(w, opts, sseKeepalive), lastID: opts.ResumeAfter, resume: opts.ResumeAfter > 0}
}

func setSSEHeaders(h http.Header) {
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache, no-transform")
	h.Set("X-Accel-Buffering", "no")
	h.Set("Incremental", "?1")
}

// Start writes the status 200 and the SSE headers (Content-Type:
// text/event-stream, Cache-Control: no-cache, no-transform,
// X-Accel-Buffering: no, Incremental: ?1) and the begin event, and
// flushes (with Options.Batch: leaves them for Flush).
func (s *SSEWriter) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return ErrDone
	}
	return s.ensureStartedLocked()
}

// ensureStartedLocked writes the headers and the begin event once.
func (s *SSEWriter) ensureStartedLocked() error {
	if s.started {
		return s.err
	}
	if s.resume {
		// A resumed stream: the client has begin (and more) already.
		return s.startLocked(setSSEHeaders, nil)
	}
	s.lastID++
	b := appendSSEDataStart(s.buf[:0], s.lastID)
	b = append(b, `{"type":"begin"`...)
	if id := s.w.Header().Get(MessageIDHeader); id != "" {
		b = append(b, `,"message_id":`...)
		b = appendJSONString(b, id)
	}
	s.buf = appendSSEDataEnd(b)
	err := s.startLocked(setSSEHeaders, s.buf)
	s.recycleBufLocked()
	return err
}

// Item writes "id: N" and data {"type":"item","content":content}.
func (s *SSEWriter) Item(content string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.beginLocked(); err != nil {
		return err
	}
	s.lastID++
	b := appendSSEDataStart(s.buf[:0], s.lastID)
	b = append(b, `{"type":"item","content":`...)
	b = appendJSONString(b, content)
	s.buf = appendSSEDataEnd(b)
	return s.emitBufLocked()
}

// Error writes data {"type":"error","error":code,"message":message}.
func (s *SSEWriter) Error(code, message string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.beginLocked(); err != nil {
		return err
	}
	s.lastID++
	b := appendSSEDataStart(s.buf[:0], s.lastID)
	b = append(b, `{"type":"error","error":`...)
	b = appendJSONString(b, code)
	b = append(b, `,"message":`...)
	b = appendJSONString(b, message)
	s.buf = appendSSEDataEnd(b)
	return s.writeBufLocked()
}

// Keepalive writes the comment ": keepalive".
func (s *SSEWriter) Keepalive() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.beginLocked(); err != nil {
		return err
	}
	return s.writeLocked(sseKeepalive)
}

// Done writes the end event and "data: [DONE]" once (with one Write) and
// stops the keepalive timer. It returns the write error, if any; later
// calls return nil.
func (s *SSEWriter) Done() error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return nil
	}
	err := s.ensureStartedLocked()
	if err == nil {
		s.lastID++
		b := appendSSEDataStart(s.buf[:0], s.lastID)
		b = append(b, `{"type":"end"`...)
		b = append(appendSSEDataEnd(b), sseDone...)
		s.buf = b
		err = s.writeBufLocked()
	}
	stopped := s.finishLocked()
	s.mu.Unlock()
	if stopped != nil {
		<-stopped
	}
	return err
}

// DoneWithoutEnd ends a stream with "data: [DONE]" alone, where the end
// events were written already: a resumed stream whose end the client has,
// or one carrying several replies each closed with End. It counts as Done
// (once; later calls, and Done, write nothing).
func (s *SSEWriter) DoneWithoutEnd() error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return nil
	}
	err := s.ensureStartedLocked()
	if err == nil {
		err = s.writeLocked(sseDone)
	}
	stopped := s.finishLocked()
	s.mu.Unlock()
	if stopped != nil {
		<-stopped
	}
	return err
}

// WriteChunk writes c: KindBegin starts the stream, KindEnd ends it (Done).
func (s *SSEWriter) WriteChunk(c Chunk) error { return writeChunk(s, c) }

// LastID returns the id of the last event written (0 before begin).
func (s *SSEWriter) LastID() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastID
}

// beginLocked refuses writes after Done and starts the stream if needed.
func (s *SSEWriter) beginLocked() error {
	if s.done {
		return ErrDone
	}
	return s.ensureStartedLocked()
}

// appendSSEDataStart appends an "id:" line, then "data: ".
// The data that follows must not contain '\n' or '\r' (appendJSONString
// escapes all control characters), so every event has one data line.
func appendSSEDataStart(b []byte, id uint64) []byte {
	b = append(b, "id: "...)
	b = strconv.AppendUint(b, id, 10)
	return append(b, "\ndata: "...)
}

// appendSSEDataEnd closes the JSON object, the data line and the event.
func appendSSEDataEnd(b []byte) []byte { return append(b, "}\n\n"...) }

func writeChunk(w Writer, c Chunk) error {
	switch c.Kind {
	case KindBegin:
		return w.Start()
	case KindItem:
		return w.Item(c.Content)
	case KindError:
		return w.Error(c.Code, c.Message)
	case KindKeepalive:
		return w.Keepalive()
	case KindEnd:
		return w.Done()
	default:
		return errUnknownKind
	}
}
