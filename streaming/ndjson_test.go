package streaming

import (
	"bufio"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// widgetChunk is the StructuredChunk the @n8n/chat widget parses
// (dist/src/types/streaming.d.ts in @n8n/chat 1.37.0).
type widgetChunk struct {
	Type     string  `json:"type"`
	Content  *string `json:"content"`
	Metadata *struct {
		NodeID    *string `json:"nodeId"`
		NodeName  *string `json:"nodeName"`
		Timestamp *int64  `json:"timestamp"`
		RunIndex  *int    `json:"runIndex"`
		ItemIndex *int    `json:"itemIndex"`
	} `json:"metadata"`
}

// parseNDJSON splits body on "\n" (as the widget does), requires every line
// to be one JSON object with complete metadata, and returns the chunks.
func parseNDJSON(t *testing.T, body string) []widgetChunk {
	t.Helper()
	if !strings.HasSuffix(body, "\n") {
		t.Fatalf("body does not end with a newline: %q", body)
	}
	var out []widgetChunk
	for _, line := range strings.Split(strings.TrimSuffix(body, "\n"), "\n") {
		var c widgetChunk
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&c); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if dec.More() {
			t.Fatalf("line %q holds more than one value", line)
		}
		if c.Type != "keepalive" {
			m := c.Metadata
			if m == nil || m.NodeID == nil || m.NodeName == nil || m.Timestamp == nil || m.RunIndex == nil || m.ItemIndex == nil {
				t.Fatalf("line %q: incomplete metadata", line)
			}
			if *m.Timestamp < time.Now().Add(-time.Hour).UnixMilli() {
				t.Fatalf("line %q: timestamp is not milliseconds since the epoch", line)
			}
		}
		out = append(out, c)
	}
	return out
}

func TestNDJSONShape(t *testing.T) {
	for _, tc := range framingCases {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			nw := NewNDJSONWriter(rec, Options{KeepaliveInterval: -1})
			for _, step := range []func() error{
				nw.Start,
				func() error { return nw.Item(tc.content) },
				nw.Keepalive,
				func() error { return nw.Error("upstream_error", tc.content) },
				nw.Done,
			} {
				if err := step(); err != nil {
					t.Fatal(err)
				}
			}
			chunks := parseNDJSON(t, rec.Body.String())
			want := []string{"begin", "item", "keepalive", "error", "end"}
			if len(chunks) != len(want) {
				t.Fatalf("%d lines: %q", len(chunks), rec.Body.String())
			}
			for i, c := range chunks {
				if c.Type != want[i] {
					t.Errorf("line %d type %q, want %q", i, c.Type, want[i])
				}
				hasContent := c.Type == "item" || c.Type == "error"
				if (c.Content != nil) != hasContent {
					t.Errorf("line %d (%s): content present = %v", i, c.Type, c.Content != nil)
				}
				if hasContent && *c.Content != validUTF8(tc.content) {
					t.Errorf("line %d content %q, want %q", i, *c.Content, tc.content)
				}
			}
			if *chunks[0].Metadata.NodeID != "chat_proxy" || *chunks[0].Metadata.NodeName != "Chat Proxy" {
				t.Errorf("metadata %+v", *chunks[0].Metadata)
			}
		})
	}
}

func TestNDJSONHeaders(t *testing.T) {
	tests := []struct {
		name, preset, want string
	}{
		{"default type", "", "application/x-ndjson; charset=utf-8"},
		{"caller type kept", "application/json; charset=utf-8", "application/json; charset=utf-8"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			nw := NewNDJSONWriter(rec, Options{KeepaliveInterval: -1, NodeID: "n1", NodeName: "Bot"})
			if tc.preset != "" {
				nw.Header().Set("Content-Type", tc.preset)
			}
			if err := nw.Start(); err != nil {
				t.Fatal(err)
			}
			h := rec.Header()
			if h.Get("Content-Type") != tc.want || h.Get("Cache-Control") != "no-cache, no-transform" ||
				h.Get("Incremental") != "?1" || h.Get("X-Accel-Buffering") != "no" {
				t.Errorf("headers %v", h)
			}
			if !rec.Flushed || rec.Code != 200 {
				t.Errorf("flushed %v code %d", rec.Flushed, rec.Code)
			}
			chunks := parseNDJSON(t, rec.Body.String())
			if len(chunks) != 1 || chunks[0].Type != "begin" || *chunks[0].Metadata.NodeID != "n1" || *chunks[0].Metadata.NodeName != "Bot" {
				t.Errorf("start wrote %q", rec.Body.String())
			}
		})
	}
}

func TestNDJSONDoneOnceAndLast(t *testing.T) {
	rec := httptest.NewRecorder()
	nw := NewNDJSONWriter(rec, Options{KeepaliveInterval: -1})
	if err := nw.Done(); err != nil { // implicit Start: begin, end
		t.Fatal(err)
	}
	if err := nw.Done(); err != nil {
		t.Fatal(err)
	}
	if err := nw.Item("late"); !errors.Is(err, ErrDone) {
		t.Errorf("Item after Done = %v", err)
	}
	if err := nw.Keepalive(); !errors.Is(err, ErrDone) {
		t.Errorf("Keepalive after Done = %v", err)
	}
	chunks := parseNDJSON(t, rec.Body.String())
	if len(chunks) != 2 || chunks[0].Type != "begin" || chunks[1].Type != "end" {
		t.Errorf("got %q", rec.Body.String())
	}
}

func TestNDJSONKeepaliveAndWriteError(t *testing.T) {
	cw := newChanWriter()
	nw := NewNDJSONWriter(cw, Options{KeepaliveInterval: 5 * time.Millisecond})
	if err := nw.Start(); err != nil {
		t.Fatal(err)
	}
	if s := <-cw.writes; !strings.HasPrefix(s, `{"type":"begin"`) {
		t.Fatalf("first write %q", s)
	}
	select {
	case s := <-cw.writes:
		if s != "{\"type\":\"keepalive\"}\n" {
			t.Fatalf("got %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no keepalive")
	}
	cw.mu.Lock()
	cw.failAt = 1
	cw.mu.Unlock()
	if err := nw.Item("x"); !errors.Is(err, errBrokenPipe) {
		t.Errorf("Item = %v", err)
	}
	if err := nw.Done(); !errors.Is(err, errBrokenPipe) {
		t.Errorf("Done = %v", err)
	}
	// Lines are written whole: a reader splitting on "\n" sees only
	// complete objects.
	sc := bufio.NewScanner(strings.NewReader(cw.all()))
	for sc.Scan() {
		if !json.Valid(sc.Bytes()) {
			t.Errorf("partial line %q", sc.Text())
		}
	}
}
