package testkit

import (
	"bufio"
	"encoding/json"
	"io"
	"strconv"
	"strings"
	"testing"
)

// NextSSE reads the next event from a live SSE stream, failing the test
// on anything a chat stream must not hold. Comment-only blocks
// (keepalives) are skipped. Lines must end with "\n" and hold no "\r"; the
// only fields are "id: " and "data: ".
func NextSSE(t testing.TB, br *bufio.Reader) SSEEvent {
	t.Helper()
	var ev SSEEvent
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the event stream: %v (read %q)", err, line)
		}
		line = strings.TrimSuffix(line, "\n")
		if strings.ContainsRune(line, '\r') {
			t.Fatalf("stream line holds a raw \\r: %q", line)
		}
		switch {
		case line == "":
			if ev.HasID || len(ev.Data) > 0 {
				return ev
			}
			ev = SSEEvent{} // a keepalive block
		case strings.HasPrefix(line, ":"):
			ev.Comments = append(ev.Comments, line[1:])
		case strings.HasPrefix(line, "id: "):
			ev.ID, ev.HasID = strings.TrimPrefix(line, "id: "), true
		case strings.HasPrefix(line, "data: "):
			ev.Data = append(ev.Data, strings.TrimPrefix(line, "data: "))
		default:
			t.Fatalf("unexpected stream line %q", line)
		}
	}
}

// SSEJSON is the JSON of a chat stream's event (begin, item, error, end).
type SSEJSON struct {
	Type      string `json:"type"`
	MessageID string `json:"message_id"`
	Content   string `json:"content"`
	Error     string `json:"error"`
	Message   string `json:"message"`
}

// EventJSON decodes an event's single data line; a key SSEJSON does not
// know fails the test.
func EventJSON(t testing.TB, ev SSEEvent) SSEJSON {
	t.Helper()
	if len(ev.Data) != 1 {
		t.Fatalf("event has %d data lines: %+v", len(ev.Data), ev)
	}
	var v SSEJSON
	dec := json.NewDecoder(strings.NewReader(ev.Data[0]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("event data %q: %v", ev.Data[0], err)
	}
	return v
}

// ItemOf returns the content of an item event, which must carry an id.
func ItemOf(t testing.TB, ev SSEEvent) string {
	t.Helper()
	v := EventJSON(t, ev)
	if v.Type != "item" || !ev.HasID {
		t.Fatalf("want an item event with an id, got %+v (%+v)", v, ev)
	}
	return v.Content
}

// WantBegin reads a stream's first event: begin, with id 1 and the id of
// the stored reply (SPEC §4 amended). It returns that id.
func WantBegin(t testing.TB, br *bufio.Reader) string {
	t.Helper()
	ev := NextSSE(t, br)
	v := EventJSON(t, ev)
	if v.Type != "begin" || ev.ID != "1" || v.MessageID == "" {
		t.Fatalf("want begin with id 1 and a message_id, got %+v (%+v)", v, ev)
	}
	return v.MessageID
}

// AfterBegin reads a stream body's begin event and returns the reader
// positioned after it.
func AfterBegin(t testing.TB, body io.Reader) *bufio.Reader {
	t.Helper()
	br := bufio.NewReader(body)
	WantBegin(t, br)
	return br
}

// WantEndDone reads the end event (with its id) and then data: [DONE].
func WantEndDone(t testing.TB, br *bufio.Reader) {
	t.Helper()
	ev := NextSSE(t, br)
	if v := EventJSON(t, ev); v.Type != "end" || !ev.HasID {
		t.Fatalf("want the end event, got %+v (%+v)", v, ev)
	}
	WantDone(t, NextSSE(t, br))
}

// ReplyEvents checks a whole stream's framing — begin (id 1, naming the
// reply) first, end just before [DONE], ids 1, 2, … on every event but
// [DONE] — and returns the events between begin and end, then [DONE].
func ReplyEvents(t testing.TB, events []SSEEvent) []SSEEvent {
	t.Helper()
	if len(events) < 3 {
		t.Fatalf("%d events, want at least begin, end and [DONE]: %+v", len(events), events)
	}
	if v := EventJSON(t, events[0]); v.Type != "begin" || v.MessageID == "" {
		t.Fatalf("first event %+v, want begin with a message_id", events[0])
	}
	if v := EventJSON(t, events[len(events)-2]); v.Type != "end" {
		t.Fatalf("event before [DONE] %+v, want end", events[len(events)-2])
	}
	for i, ev := range events[:len(events)-1] {
		if !ev.HasID || ev.ID != strconv.Itoa(i+1) {
			t.Fatalf("event %d has id %q (has %v), want %d", i+1, ev.ID, ev.HasID, i+1)
		}
	}
	out := append([]SSEEvent(nil), events[1:len(events)-2]...)
	return append(out, events[len(events)-1])
}

// WantDone checks that ev is the closing "data: [DONE]" (without an id).
func WantDone(t testing.TB, ev SSEEvent) {
	t.Helper()
	if len(ev.Data) != 1 || ev.Data[0] != "[DONE]" || ev.HasID {
		t.Fatalf("want data: [DONE], got %+v", ev)
	}
}

// NDLine is one line of an NDJSON stream framed as n8n frames it.
type NDLine struct {
	Type     string  `json:"type"`
	Content  *string `json:"content"`
	Metadata *struct {
		NodeID    string `json:"nodeId"`
		NodeName  string `json:"nodeName"`
		ItemIndex *int   `json:"itemIndex"`
		RunIndex  *int   `json:"runIndex"`
		Timestamp int64  `json:"timestamp"`
	} `json:"metadata"`
}

// NextNDJSON reads the next line that is not a keepalive and checks that
// it is framed as n8n frames it: full metadata, content only on item and
// error lines.
func NextNDJSON(t testing.TB, br *bufio.Reader) NDLine {
	t.Helper()
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the NDJSON stream: %v (read %q)", err, line)
		}
		var l NDLine
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if l.Type == "keepalive" {
			continue
		}
		if l.Metadata == nil || l.Metadata.NodeID == "" || l.Metadata.ItemIndex == nil || l.Metadata.RunIndex == nil || l.Metadata.Timestamp <= 0 {
			t.Fatalf("line %q lacks n8n's metadata", line)
		}
		if (l.Type == "begin" || l.Type == "end") != (l.Content == nil) {
			t.Fatalf("line %q: begin/end carry no content, item/error do", line)
		}
		return l
	}
}

// WantStreamEnd checks that nothing follows the end of a stream.
func WantStreamEnd(t testing.TB, r io.Reader) {
	t.Helper()
	rest, err := io.ReadAll(r)
	if err != nil || len(rest) != 0 {
		t.Fatalf("after the end of the stream: %q, %v", rest, err)
	}
}

// NamedEvent is one event of a stream that names its events (the chat
// events stream): the event, id and data fields.
type NamedEvent struct {
	Event, ID, Data string
	Comments        []string // comment lines seen before it (keepalives)
}

// NextNamedEvent reads the next event of a live SSE stream whose events
// have names; retry fields and comments are skipped (comments are kept
// on the event). Any other field fails the test, as does a second data
// line.
func NextNamedEvent(t testing.TB, br *bufio.Reader) NamedEvent {
	t.Helper()
	var ev NamedEvent
	seen := false
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the event stream: %v (read %q)", err, line)
		}
		line = strings.TrimSuffix(line, "\n")
		field, value, _ := strings.Cut(line, ": ")
		switch {
		case line == "":
			if seen {
				return ev
			}
		case strings.HasPrefix(line, ":"):
			ev.Comments = append(ev.Comments, line[1:])
		case field == "retry":
		case field == "event":
			ev.Event, seen = value, true
		case field == "id":
			ev.ID, seen = value, true
		case field == "data":
			if ev.Data != "" {
				t.Fatalf("event %q has a second data line %q", ev.Event, value)
			}
			ev.Data, seen = value, true
		default:
			t.Fatalf("unexpected stream line %q", line)
		}
	}
}
