package streaming

import (
	"encoding/json"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
)

// Several replies in one stream: each begin names its message, every event
// has one data line and an increasing id, events of other types carry any
// text without breaking the framing, and [DONE] comes once, last.
func TestSSESeveralReplies(t *testing.T) {
	for _, tc := range framingCases {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			sw := NewSSEWriter(rec, Options{KeepaliveInterval: -1})
			sw.Header().Set(MessageIDHeader, "m1")
			steps := []func() error{
				func() error { return sw.Item(tc.content) },
				sw.End,
				func() error { return sw.Begin("m2") },
				func() error { return sw.Item("second") },
				func() error {
					return sw.Event(map[string]any{"type": "buttons", "buttons": []map[string]string{{"text": tc.content, "link": "https://x/?a=1&b=2"}}})
				},
				sw.End,
				func() error { return sw.Event(map[string]string{"type": "waiting"}) },
				sw.DoneWithoutEnd,
				sw.Done, // writes nothing after DoneWithoutEnd
				sw.DoneWithoutEnd,
			}
			for i, step := range steps {
				if err := step(); err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
			}
			if err := sw.Event([]int{1}); err == nil {
				t.Error("Event accepted a value that is not an object")
			}
			body := rec.Body.String()
			if strings.Count(body, "\n\ndata: [DONE]") != 1 || !strings.HasSuffix(body, "data: [DONE]\n\n") {
				t.Fatalf("stream does not end with one [DONE]: %q", body)
			}
			var types []string
			for i, ev := range strings.Split(strings.TrimSuffix(body, "data: [DONE]\n\n"), "\n\n") {
				if ev == "" {
					continue
				}
				lines := strings.Split(ev, "\n")
				if len(lines) != 2 || lines[0] != "id: "+strconv.Itoa(i+1) || !strings.HasPrefix(lines[1], "data: ") {
					t.Fatalf("event %d is not one id line and one data line: %q", i+1, ev)
				}
				var m map[string]any
				if err := json.Unmarshal([]byte(strings.TrimPrefix(lines[1], "data: ")), &m); err != nil {
					t.Fatalf("event %d: %v", i+1, err)
				}
				typ, _ := m["type"].(string)
				if typ == "begin" {
					typ += ":" + m["message_id"].(string)
				}
				if typ == "buttons" {
					b := m["buttons"].([]any)[0].(map[string]any)
					var want string
					enc, _ := json.Marshal(tc.content)
					_ = json.Unmarshal(enc, &want)
					if b["text"] != want {
						t.Errorf("button text = %q, want %q", b["text"], want)
					}
				}
				types = append(types, typ)
			}
			want := "begin:m1 item end begin:m2 item buttons end waiting"
			if got := strings.Join(types, " "); got != want {
				t.Errorf("events = %s, want %s", got, want)
			}
		})
	}
}
