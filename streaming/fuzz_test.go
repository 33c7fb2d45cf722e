package streaming

import (
	"encoding/json"
	"net/http/httptest"
	"strings"
	"testing"
)

// FuzzSSEFraming checks that no content, code or message can change the
// event structure: a WHATWG parser sees exactly begin, two items, one
// error, end and [DONE], each with one data line, and gets the text back.
func FuzzSSEFraming(f *testing.F) {
	for _, tc := range framingCases {
		f.Add(tc.content, "upstream_error", tc.content)
	}
	f.Fuzz(func(t *testing.T, content, code, message string) {
		rec := httptest.NewRecorder()
		sw := NewSSEWriter(rec, Options{KeepaliveInterval: -1})
		_ = sw.Item(content)
		_ = sw.Item(content + "2")
		_ = sw.Error(code, message)
		_ = sw.Done()
		events := parseSSE(rec.Body.String())
		if len(events) != 6 {
			t.Fatalf("%d events in %q", len(events), rec.Body.String())
		}
		for i, ev := range events {
			if len(ev.Data) != 1 || len(ev.Comments) != 0 {
				t.Fatalf("event %d: %+v", i, ev)
			}
		}
		if events[0].Data[0] != `{"type":"begin"}` || events[4].Data[0] != `{"type":"end"}` {
			t.Fatalf("not framed by begin and end: %q", rec.Body.String())
		}
		for i, ev := range events[:5] {
			if ev.ID != string(rune('1'+i)) {
				t.Fatalf("event %d id %q", i, ev.ID)
			}
		}
		for i, want := range []string{content, content + "2"} {
			var item struct {
				Type, Content string
			}
			if err := json.Unmarshal([]byte(events[i+1].Data[0]), &item); err != nil {
				t.Fatal(err)
			}
			if item.Type != "item" || item.Content != validUTF8(want) {
				t.Fatalf("item %d: %+v id %q", i, item, events[i].ID)
			}
		}
		var e struct {
			Type, Error, Message string
		}
		if err := json.Unmarshal([]byte(events[3].Data[0]), &e); err != nil {
			t.Fatal(err)
		}
		if e.Type != "error" || e.Error != validUTF8(code) || e.Message != validUTF8(message) {
			t.Fatalf("error event %+v", e)
		}
		if events[5].Data[0] != "[DONE]" || !strings.HasSuffix(rec.Body.String(), "\n\ndata: [DONE]\n\n") {
			t.Fatalf("does not end with [DONE]: %q", rec.Body.String())
		}
	})
}

// FuzzNDJSONFraming checks that every line is one JSON object and that the
// lines are exactly begin, item, error, end whatever the text.
func FuzzNDJSONFraming(f *testing.F) {
	for _, tc := range framingCases {
		f.Add(tc.content, tc.content)
	}
	f.Fuzz(func(t *testing.T, content, message string) {
		rec := httptest.NewRecorder()
		nw := NewNDJSONWriter(rec, Options{KeepaliveInterval: -1})
		_ = nw.Item(content)
		_ = nw.Error("code", message)
		_ = nw.Done()
		chunks := parseNDJSON(t, rec.Body.String())
		want := []string{"begin", "item", "error", "end"}
		if len(chunks) != len(want) {
			t.Fatalf("%d lines", len(chunks))
		}
		for i, c := range chunks {
			if c.Type != want[i] {
				t.Fatalf("line %d is %q", i, c.Type)
			}
		}
		if *chunks[1].Content != validUTF8(content) || *chunks[2].Content != validUTF8(message) {
			t.Fatalf("content changed")
		}
	})
}
