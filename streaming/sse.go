package streaming

import (
	"net/http"
	"strconv"
)

// SSEWriter writes the chat-proxy SSE stream (SPEC §4):
//
//	id: 1
//	data: {"type":"item","content":"Hel"}
//
//	: keepalive
//
//	data: {"type":"error","error":"upstream_unavailable","message":"…"}
//
//	data: [DONE]
//
// Every item carries an "id:" line (1, 2, 3, …); only item and error events
// carry JSON, one data line each; the stream always ends with "data: [DONE]".
type SSEWriter struct {
	stream
	lastID uint64
}

var _ Writer = (*SSEWriter)(nil)

var (
	sseKeepalive = []byte(": keepalive\n\n")
	sseDone      = []byte("data: [DONE]\n\n")
)

// NewSSEWriter returns a writer for w. Nothing is written before Start (or
// the first event), so the caller may still set headers such as X-Message-ID.
func NewSSEWriter(w http.ResponseWriter, opts Options) *SSEWriter {
	return &SSEWriter{stream: newStream(w, opts, sseKeepalive)}
}

func setSSEHeaders(h http.Header) {
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache, no-transform")
	h.Set("X-Accel-Buffering", "no")
	h.Set("Incremental", "?1")
}

// Start writes the status 200 and the SSE headers (Content-Type:
// text/event-stream, Cache-Control: no-cache, no-transform,
// X-Accel-Buffering: no, Incremental: ?1) and flushes them.
func (s *SSEWriter) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return ErrDone
	}
	return s.startLocked(setSSEHeaders, nil)
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
	b := appendSSEDataStart(s.buf[:0], 0)
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

// Done writes "data: [DONE]" once and stops the keepalive timer. It returns
// the write error, if any; later calls return nil.
func (s *SSEWriter) Done() error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return nil
	}
	err := s.startLocked(setSSEHeaders, nil)
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

// LastID returns the id of the last item written (0 before the first).
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
	return s.startLocked(setSSEHeaders, nil)
}

// appendSSEDataStart appends an "id:" line when id > 0, then "data: ".
// The data that follows must not contain '\n' or '\r' (appendJSONString
// escapes all control characters), so every event has one data line.
func appendSSEDataStart(b []byte, id uint64) []byte {
	if id > 0 {
		b = append(b, "id: "...)
		b = strconv.AppendUint(b, id, 10)
		b = append(b, '\n')
	}
	return append(b, "data: "...)
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
