package streaming

import (
	"encoding/json"
	"errors"
)

// A stream can carry several replies, one after the other (n8n's "Using
// Response Nodes" mode sends several messages for one visitor message):
//
//	begin (message_id 1) → item … → end
//	begin (message_id 2) → item … → { "type": "buttons", … } → end
//	{ "type": "waiting" }
//	[DONE]
//
// Start (or the first event) writes the first begin, naming the
// X-Message-ID header; Begin opens each further reply, End closes one
// without ending the stream, Event writes an event of another type, and
// Finish ends the stream with [DONE] alone.

// Begin writes a begin event naming messageID: the next reply in the
// stream. The stream is started first if it was not.
func (s *SSEWriter) Begin(messageID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.beginLocked(); err != nil {
		return err
	}
	s.lastID++
	b := appendSSEDataStart(s.buf[:0], s.lastID)
	b = append(b, `{"type":"begin","message_id":`...)
	b = appendJSONString(b, messageID)
	s.buf = appendSSEDataEnd(b)
	return s.writeBufLocked()
}

// End writes an end event: the current reply is complete; the stream
// stays open for another (Begin) or for Finish.
func (s *SSEWriter) End() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.beginLocked(); err != nil {
		return err
	}
	s.lastID++
	b := appendSSEDataStart(s.buf[:0], s.lastID)
	b = append(b, `{"type":"end"`...)
	s.buf = appendSSEDataEnd(b)
	return s.writeBufLocked()
}

// Event writes an event whose data is v encoded as a JSON object (it must
// encode to an object: {"type":…,…}); Go's encoding escapes every control
// character, so the event has one data line.
func (s *SSEWriter) Event(v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(data) < 2 || data[0] != '{' {
		return errNotObject
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.beginLocked(); err != nil {
		return err
	}
	s.lastID++
	b := appendSSEDataStart(s.buf[:0], s.lastID)
	b = append(b, data[:len(data)-1]...) // appendSSEDataEnd closes the object
	s.buf = appendSSEDataEnd(b)
	return s.writeBufLocked()
}

var errNotObject = errors.New("streaming: an event must be a JSON object")
