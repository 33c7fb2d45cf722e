package streaming

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// The writers encode JSON by hand into a reused buffer. These tests pin
// their output to what encoding/json produced before, byte for byte.

// jsonStringCases are strings around every escaping rule of encoding/json.
func jsonStringCases() []string {
	cases := []string{
		"", "\u2028\u2029", "a\u2028b\u2029c", "\u2027\u202a", "\xe2\x80", "\xe2\x80\xa8x",
		"\xed\xa0\x80", "\xf4\x90\x80\x80", "\xc0\x80", "é", "\U0001F600", "\uFFFD", "<>&'\"\\/",
		"\x7f\u0080\u00a0", strings.Repeat("ab<", 100),
	}
	for _, tc := range framingCases {
		cases = append(cases, tc.content)
	}
	for b := range 256 {
		cases = append(cases, string([]byte{byte(b)}), "x"+string([]byte{byte(b)})+"y")
	}
	return cases
}

func marshalString(t testing.TB, s string) string {
	t.Helper()
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestAppendJSONStringMatchesEncodingJSON(t *testing.T) {
	for _, s := range jsonStringCases() {
		if got, want := string(appendJSONString([]byte("prefix"), s)), "prefix"+marshalString(t, s); got != want {
			t.Errorf("%q: got %s, want %s", s, got, want)
		}
	}
}

// refSSEItem and refSSEError are the events as the writer framed
// json.Marshal's output.
func refSSEItem(t testing.TB, id int, content string) string {
	data, err := json.Marshal(struct {
		Type    string `json:"type"`
		Content string `json:"content"`
	}{"item", content})
	if err != nil {
		t.Fatal(err)
	}
	return "id: " + strconv.Itoa(id) + "\ndata: " + string(data) + "\n\n"
}

func refSSEError(t testing.TB, id int, code, message string) string {
	data, err := json.Marshal(struct {
		Type    string `json:"type"`
		Error   string `json:"error"`
		Message string `json:"message"`
	}{"error", code, message})
	if err != nil {
		t.Fatal(err)
	}
	return "id: " + strconv.Itoa(id) + "\ndata: " + string(data) + "\n\n"
}

// refNDJSONLine is one line as json.Marshal made it of n8n's chunk shape.
func refNDJSONLine(t testing.TB, kind Kind, content *string, nodeID, nodeName string, ts int64) string {
	type meta struct {
		NodeID    string `json:"nodeId"`
		NodeName  string `json:"nodeName"`
		ItemIndex int    `json:"itemIndex"`
		RunIndex  int    `json:"runIndex"`
		Timestamp int64  `json:"timestamp"`
	}
	b, err := json.Marshal(struct {
		Type     Kind    `json:"type"`
		Content  *string `json:"content,omitempty"`
		Metadata meta    `json:"metadata"`
	}{kind, content, meta{NodeID: nodeID, NodeName: nodeName, Timestamp: ts}})
	if err != nil {
		t.Fatal(err)
	}
	return string(b) + "\n"
}

// lineTimestamp returns the timestamp that ends an NDJSON line
// (…"timestamp":123}}\n).
func lineTimestamp(t testing.TB, line string) int64 {
	t.Helper()
	s := strings.TrimSuffix(line, "}}\n")
	i := strings.LastIndex(s, ":")
	ts, err := strconv.ParseInt(s[i+1:], 10, 64)
	if err != nil {
		t.Fatalf("no timestamp at the end of %q", line)
	}
	return ts
}

func checkWireBytes(t testing.TB, content, code, message, nodeID, nodeName string) {
	rec := httptest.NewRecorder()
	sw := NewSSEWriter(rec, Options{KeepaliveInterval: -1})
	_ = sw.Item(content)
	_ = sw.Item(content + "2")
	_ = sw.Keepalive()
	_ = sw.Item(code)
	_ = sw.Error(code, message)
	_ = sw.Done()
	want := "id: 1\ndata: {\"type\":\"begin\"}\n\n" +
		refSSEItem(t, 2, content) + refSSEItem(t, 3, content+"2") + ": keepalive\n\n" +
		refSSEItem(t, 4, code) + refSSEError(t, 5, code, message) +
		"id: 6\ndata: {\"type\":\"end\"}\n\ndata: [DONE]\n\n"
	if got := rec.Body.String(); got != want {
		t.Fatalf("SSE bytes changed\n got %q\nwant %q", got, want)
	}

	rec = httptest.NewRecorder()
	nw := NewNDJSONWriter(rec, Options{KeepaliveInterval: -1, NodeID: nodeID, NodeName: nodeName})
	_ = nw.Start()
	_ = nw.Item(content)
	_ = nw.Keepalive()
	_ = nw.Error(code, message)
	_ = nw.Done()
	if nodeID == "" {
		nodeID = "chat_proxy"
	}
	if nodeName == "" {
		nodeName = "Chat Proxy"
	}
	lines := strings.SplitAfter(rec.Body.String(), "\n")
	if len(lines) != 6 || lines[5] != "" {
		t.Fatalf("NDJSON lines %q", lines)
	}
	for i, want := range []struct {
		kind    Kind
		content *string
	}{{KindBegin, nil}, {KindItem, &content}, {KindKeepalive, nil}, {KindError, &message}, {KindEnd, nil}} {
		var ref string
		if want.kind == KindKeepalive {
			ref = "{\"type\":\"keepalive\"}\n"
		} else {
			ref = refNDJSONLine(t, want.kind, want.content, nodeID, nodeName, lineTimestamp(t, lines[i]))
		}
		if lines[i] != ref {
			t.Fatalf("NDJSON line %d changed\n got %q\nwant %q", i, lines[i], ref)
		}
	}
}

func TestWireBytesMatchEncodingJSON(t *testing.T) {
	cases := jsonStringCases()
	for i, s := range cases {
		checkWireBytes(t, s, cases[(i+1)%len(cases)], cases[(i+7)%len(cases)], s, cases[(i+3)%len(cases)])
	}
}

// FuzzWireBytes checks that the hand-written encoding produces exactly the
// bytes encoding/json did, whatever the text.
func FuzzWireBytes(f *testing.F) {
	for _, tc := range framingCases {
		f.Add(tc.content, "upstream_error", tc.content, "", "")
	}
	f.Add("<b>", "\u2028", "\xff", "node\n1", `"Bot"`)
	f.Fuzz(func(t *testing.T, content, code, message, nodeID, nodeName string) {
		if got, want := appendJSONString(nil, content), marshalString(t, content); string(got) != want {
			t.Fatalf("%q: got %s, want %s", content, got, want)
		}
		if got := appendJSONString(nil, content); !json.Valid(got) || bytes.ContainsAny(got, "\r\n") || !utf8.Valid(got) {
			t.Fatalf("%q encodes to %q", content, got)
		}
		checkWireBytes(t, content, code, message, nodeID, nodeName)
	})
}

// Items must not allocate: the frame is encoded into the writer's buffer.
func TestItemDoesNotAllocate(t *testing.T) {
	for _, ka := range []time.Duration{-1, 0} {
		sw := NewSSEWriter(newBenchSink(), Options{KeepaliveInterval: ka})
		nw := NewNDJSONWriter(newBenchSink(), Options{KeepaliveInterval: ka})
		content := benchChunks["long"]
		for name, f := range map[string]func() error{
			"sse item":     func() error { return sw.Item(content) },
			"sse error":    func() error { return sw.Error("upstream_error", content) },
			"ndjson item":  func() error { return nw.Item(content) },
			"ndjson error": func() error { return nw.Error("upstream_error", content) },
		} {
			_ = f() // starts the stream and sizes the buffer
			if n := testing.AllocsPerRun(100, func() {
				if err := f(); err != nil {
					t.Fatal(err)
				}
			}); n != 0 {
				t.Errorf("%s (keepalive %v): %v allocs per call, want 0", name, ka, n)
			}
		}
		_ = sw.Done()
		_ = nw.Done()
	}
}
