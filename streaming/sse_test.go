package streaming

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// framingCases are contents that must never break the framing.
var framingCases = []struct {
	name    string
	content string
}{
	{"plain", "Hello"},
	{"empty", ""},
	{"newline", "line one\nline two"},
	{"crlf", "a\r\nb"},
	{"lone cr", "a\rb"},
	{"trailing newlines", "end\n\n"},
	{"data injection", "x\n\ndata: [DONE]\n\n"},
	{"event injection", "\nevent: error\ndata: {\"type\":\"error\"}\n\n"},
	{"id injection", "\rid: 999\r\rdata: evil"},
	{"comment injection", "\n: keepalive\n"},
	{"unicode", "Привет, 世界! 👋🏽 ﷽"},
	{"line separators", "a\u2028b\u2029c\u0085d"},
	{"controls", "nul\x00bell\x07esc\x1bdel\x7f"},
	{"html", "</script><script>alert(1)</script> & <b>"},
	{"json looking", `{"type":"item","content":"x"}`},
	{"quotes and backslashes", `"\"\\\n`},
	{"invalid utf8", "bad \xff\xfe byte and cut \xe2\x82"},
}

func TestSSEFramingNeverInjects(t *testing.T) {
	for _, tc := range framingCases {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			sw := NewSSEWriter(rec, Options{KeepaliveInterval: -1})
			if err := sw.Item(tc.content); err != nil {
				t.Fatal(err)
			}
			if err := sw.Item(tc.content + "2"); err != nil {
				t.Fatal(err)
			}
			if err := sw.Error("upstream_error", tc.content); err != nil {
				t.Fatal(err)
			}
			if err := sw.Done(); err != nil {
				t.Fatal(err)
			}
			checkSSEStream(t, rec.Body.String(), []string{tc.content, tc.content + "2"}, tc.content)
		})
	}
}

// validUTF8 replaces each invalid byte with U+FFFD, as encoding/json does.
func validUTF8(s string) string { return string([]rune(s)) }

// checkSSEStream parses body and checks it holds exactly begin, the
// items, one error event with errMsg, end, then [DONE], one data line per
// event and ids 1, 2, 3, … on all but [DONE].
func checkSSEStream(t *testing.T, body string, items []string, errMsg string) {
	t.Helper()
	events := parseSSE(body)
	if len(events) != len(items)+4 {
		t.Fatalf("got %d events, want %d; body %q", len(events), len(items)+4, body)
	}
	for i, ev := range events {
		if len(ev.Data) != 1 {
			t.Fatalf("event %d has %d data lines: %q", i, len(ev.Data), ev.Data)
		}
		if len(ev.Comments) != 0 {
			t.Fatalf("event %d preceded by comments %q", i, ev.Comments)
		}
	}
	for i, ev := range events[:len(events)-1] {
		if !ev.HasID || ev.ID != strconv.Itoa(i+1) {
			t.Errorf("event %d id = %q (has %v), want %d", i, ev.ID, ev.HasID, i+1)
		}
	}
	if events[0].Data[0] != `{"type":"begin"}` {
		t.Errorf("first event %q, want begin", events[0].Data[0])
	}
	if end := events[len(events)-2]; end.Data[0] != `{"type":"end"}` {
		t.Errorf("event before [DONE] %q, want end", end.Data[0])
	}
	for i, want := range items {
		ev := events[i+1]
		var got struct {
			Type    string `json:"type"`
			Content string `json:"content"`
		}
		if err := json.Unmarshal([]byte(ev.Data[0]), &got); err != nil {
			t.Fatalf("item %d: %v in %q", i, err, ev.Data[0])
		}
		if got.Type != "item" || got.Content != validUTF8(want) {
			t.Errorf("item %d = %+v, want content %q", i, got, want)
		}
	}
	errEv := events[len(items)+1]
	var e struct {
		Type    string `json:"type"`
		Error   string `json:"error"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal([]byte(errEv.Data[0]), &e); err != nil {
		t.Fatalf("error event: %v in %q", err, errEv.Data[0])
	}
	if e.Type != "error" || e.Error != "upstream_error" || e.Message != validUTF8(errMsg) {
		t.Errorf("error event = %+v", e)
	}
	if last := events[len(events)-1]; last.Data[0] != "[DONE]" || last.HasID {
		t.Errorf("last event = %+v, want data: [DONE]", last)
	}
	if !strings.HasSuffix(body, "data: [DONE]\n\n") {
		t.Errorf("body does not end with [DONE]: %q", body)
	}
}

func TestSSEExactBytes(t *testing.T) {
	rec := httptest.NewRecorder()
	sw := NewSSEWriter(rec, Options{KeepaliveInterval: -1})
	sw.Header().Set("X-Message-ID", "0193-msg")
	for _, step := range []func() error{
		func() error { return sw.Item("Hel") },
		func() error { return sw.Keepalive() },
		func() error { return sw.Item("lo <&>") },
		func() error { return sw.Error("upstream_unavailable", "n8n is down") },
		sw.Done,
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	want := "id: 1\ndata: {\"type\":\"begin\",\"message_id\":\"0193-msg\"}\n\n" +
		"id: 2\ndata: {\"type\":\"item\",\"content\":\"Hel\"}\n\n" +
		": keepalive\n\n" +
		"id: 3\ndata: {\"type\":\"item\",\"content\":\"lo \\u003c\\u0026\\u003e\"}\n\n" +
		"id: 4\ndata: {\"type\":\"error\",\"error\":\"upstream_unavailable\",\"message\":\"n8n is down\"}\n\n" +
		"id: 5\ndata: {\"type\":\"end\"}\n\n" +
		"data: [DONE]\n\n"
	if got := rec.Body.String(); got != want {
		t.Errorf("body\n got %q\nwant %q", got, want)
	}
	if sw.LastID() != 5 {
		t.Errorf("LastID = %d", sw.LastID())
	}
}

func TestSSEHeadersAndStart(t *testing.T) {
	rec := httptest.NewRecorder()
	rec.Header().Set("Content-Length", "12")
	sw := NewSSEWriter(rec, Options{KeepaliveInterval: -1})
	sw.Header().Set("X-Message-ID", "msg-1")
	if sw.Started() {
		t.Fatal("started before Start")
	}
	if err := sw.Start(); err != nil {
		t.Fatal(err)
	}
	if !rec.Flushed {
		t.Error("Start did not flush")
	}
	if rec.Code != http.StatusOK {
		t.Errorf("status %d", rec.Code)
	}
	for k, v := range map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-cache, no-transform",
		"X-Accel-Buffering": "no",
		"X-Message-ID":      "msg-1",
		"Incremental":       "?1",
		"Content-Length":    "",
	} {
		if got := rec.Header().Get(k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	// begin names the stored reply, as X-Message-ID does.
	wantBegin := "id: 1\ndata: {\"type\":\"begin\",\"message_id\":\"msg-1\"}\n\n"
	if got := rec.Body.String(); got != wantBegin {
		t.Errorf("Start wrote %q, want %q", got, wantBegin)
	}
	if err := sw.Start(); err != nil {
		t.Errorf("second Start: %v", err)
	}
	if got := rec.Body.String(); got != wantBegin {
		t.Errorf("second Start wrote more: %q", got)
	}
}

// begin1 is the begin event of a stream without X-Message-ID.
const begin1 = "id: 1\ndata: {\"type\":\"begin\"}\n\n"

func TestSSEDoneExactlyOnceAndLast(t *testing.T) {
	tests := []struct {
		name  string
		steps func(sw *SSEWriter)
		want  string
	}{
		{"done only", func(sw *SSEWriter) {}, begin1 + "id: 2\ndata: {\"type\":\"end\"}\n\ndata: [DONE]\n\n"},
		{"item then done", func(sw *SSEWriter) { _ = sw.Item("a") }, begin1 + "id: 2\ndata: {\"type\":\"item\",\"content\":\"a\"}\n\nid: 3\ndata: {\"type\":\"end\"}\n\ndata: [DONE]\n\n"},
		{"error then done", func(sw *SSEWriter) { _ = sw.Error("c", "m") }, begin1 + "id: 2\ndata: {\"type\":\"error\",\"error\":\"c\",\"message\":\"m\"}\n\nid: 3\ndata: {\"type\":\"end\"}\n\ndata: [DONE]\n\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			sw := NewSSEWriter(rec, Options{KeepaliveInterval: -1})
			tc.steps(sw)
			if err := sw.Done(); err != nil {
				t.Fatal(err)
			}
			if err := sw.Done(); err != nil {
				t.Fatalf("second Done: %v", err)
			}
			for name, f := range map[string]func() error{
				"Item":      func() error { return sw.Item("late") },
				"Error":     func() error { return sw.Error("c", "late") },
				"Keepalive": sw.Keepalive,
				"Start":     sw.Start,
			} {
				if err := f(); !errors.Is(err, ErrDone) {
					t.Errorf("%s after Done = %v, want ErrDone", name, err)
				}
			}
			if got := rec.Body.String(); got != tc.want {
				t.Errorf("body %q, want %q", got, tc.want)
			}
			if rec.Header().Get("Content-Type") != "text/event-stream" || rec.Code != 200 {
				t.Errorf("headers not written: %d %v", rec.Code, rec.Header())
			}
		})
	}
}

func TestSSEWriteErrorIsReturnedAndSticky(t *testing.T) {
	cw := newChanWriter()
	cw.failAt = 3 // begin, "one", then "two" fails
	sw := NewSSEWriter(cw, Options{KeepaliveInterval: -1})
	if err := sw.Item("one"); err != nil {
		t.Fatal(err)
	}
	err := sw.Item("two")
	if !errors.Is(err, errBrokenPipe) {
		t.Fatalf("Item = %v, want broken pipe", err)
	}
	if err2 := sw.Item("three"); !errors.Is(err2, errBrokenPipe) {
		t.Errorf("later Item = %v", err2)
	}
	if err := sw.Done(); !errors.Is(err, errBrokenPipe) {
		t.Errorf("Done = %v", err)
	}
}

func TestSSEKeepaliveAfterSilence(t *testing.T) {
	cw := newChanWriter()
	sw := NewSSEWriter(cw, Options{KeepaliveInterval: 5 * time.Millisecond})
	defer sw.Done()
	if err := sw.Start(); err != nil {
		t.Fatal(err)
	}
	if s := <-cw.writes; !strings.Contains(s, `"type":"begin"`) {
		t.Fatalf("first write %q, want begin", s)
	}
	for range 2 {
		select {
		case s := <-cw.writes:
			if s != ": keepalive\n\n" {
				t.Fatalf("got %q, want a keepalive", s)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no keepalive written")
		}
	}
	if err := sw.Done(); err != nil {
		t.Fatal(err)
	}
	// After Done the timer goroutine has stopped: [DONE] is the last write.
	rest := cw.all()
	if !strings.HasSuffix(rest, "data: [DONE]\n\n") {
		t.Fatalf("last writes %q", rest)
	}
	select {
	case s := <-cw.writes:
		t.Fatalf("write after Done: %q", s)
	default:
	}
}

func TestSSEKeepaliveStopsOnWriteError(t *testing.T) {
	cw := newChanWriter()
	cw.failAt = 2
	sw := NewSSEWriter(cw, Options{KeepaliveInterval: time.Millisecond})
	if err := sw.Start(); err != nil { // Start writes begin; the keepalive is the second write
		t.Fatal(err)
	}
	sw.mu.Lock()
	stopped := sw.stopped
	sw.mu.Unlock()
	select {
	case <-stopped: // the keepalive failed and its goroutine exited
	case <-time.After(5 * time.Second):
		t.Fatal("keepalive goroutine still running")
	}
	if err := sw.Item("x"); !errors.Is(err, errBrokenPipe) {
		t.Errorf("Item = %v, want the keepalive's write error", err)
	}
	cw.mu.Lock()
	n := cw.nwrites
	cw.mu.Unlock()
	if n != 2 {
		t.Errorf("%d writes attempted, want 2 (begin, then the failed keepalive)", n)
	}
	if err := sw.Done(); !errors.Is(err, errBrokenPipe) {
		t.Errorf("Done = %v", err)
	}
}

// TestSSEConcurrentWriters checks that writes from several goroutines and
// the keepalive timer never interleave inside an event.
func TestSSEConcurrentWriters(t *testing.T) {
	rec := &lockedRecorder{ResponseRecorder: httptest.NewRecorder()}
	sw := NewSSEWriter(rec, Options{KeepaliveInterval: time.Microsecond * 50})
	var wg sync.WaitGroup
	const n = 50
	for g := range 4 {
		wg.Go(func() {
			for i := range n {
				_ = sw.Item(strings.Repeat(strconv.Itoa(g), i%7+1) + "\n")
			}
		})
	}
	wg.Wait()
	if err := sw.Done(); err != nil {
		t.Fatal(err)
	}
	events := parseSSE(rec.body())
	if len(events) != 4*n+3 { // begin, the items, end, [DONE]
		t.Fatalf("%d events", len(events))
	}
	ids := map[string]bool{}
	for i, ev := range events[:4*n+2] {
		if len(ev.Data) != 1 || !ev.HasID || ids[ev.ID] {
			t.Fatalf("event %d malformed or duplicate id: %+v", i, ev)
		}
		ids[ev.ID] = true
		for _, c := range ev.Comments {
			if c != " keepalive" {
				t.Fatalf("comment %q", c)
			}
		}
	}
}

type lockedRecorder struct {
	mu sync.Mutex
	*httptest.ResponseRecorder
}

func (l *lockedRecorder) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ResponseRecorder.Write(p)
}

func (l *lockedRecorder) body() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.Body.String()
}

func TestWriteChunkDispatch(t *testing.T) {
	rec := httptest.NewRecorder()
	sw := NewSSEWriter(rec, Options{KeepaliveInterval: -1})
	for _, c := range []Chunk{
		{Kind: KindBegin},
		{Kind: KindItem, Content: "a"},
		{Kind: KindKeepalive},
		{Kind: KindError, Code: "upstream_error", Message: "m"},
		{Kind: KindEnd},
	} {
		if err := sw.WriteChunk(c); err != nil {
			t.Fatal(err)
		}
	}
	if err := sw.WriteChunk(Chunk{Kind: "bogus"}); err == nil {
		t.Error("unknown kind accepted")
	}
	want := begin1 + "id: 2\ndata: {\"type\":\"item\",\"content\":\"a\"}\n\n: keepalive\n\n" +
		"id: 3\ndata: {\"type\":\"error\",\"error\":\"upstream_error\",\"message\":\"m\"}\n\n" +
		"id: 4\ndata: {\"type\":\"end\"}\n\ndata: [DONE]\n\n"
	if rec.Body.String() != want {
		t.Errorf("got %q", rec.Body.String())
	}
}

// A resumed stream (Options.ResumeAfter) has no begin: its first event has
// the id after the one the client has; DoneWithoutEnd ends a stream whose
// end the client already has with [DONE] alone.
func TestSSEResumeAfter(t *testing.T) {
	rec := httptest.NewRecorder()
	w := NewSSEWriter(rec, Options{KeepaliveInterval: -1, ResumeAfter: 7})
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	if err := w.Item("x"); err != nil {
		t.Fatal(err)
	}
	if err := w.Done(); err != nil {
		t.Fatal(err)
	}
	want := "id: 8\ndata: {\"type\":\"item\",\"content\":\"x\"}\n\nid: 9\ndata: {\"type\":\"end\"}\n\ndata: [DONE]\n\n"
	if got := rec.Body.String(); got != want || rec.Header().Get("Content-Type") != "text/event-stream" {
		t.Fatalf("resumed stream %q, want %q", got, want)
	}

	rec = httptest.NewRecorder()
	w = NewSSEWriter(rec, Options{KeepaliveInterval: -1, ResumeAfter: 3})
	if err := w.DoneWithoutEnd(); err != nil {
		t.Fatal(err)
	}
	if err := w.Done(); err != nil || w.LastID() != 3 {
		t.Fatalf("Done after DoneWithoutEnd: %v, last id %d", err, w.LastID())
	}
	if got := rec.Body.String(); got != "data: [DONE]\n\n" {
		t.Fatalf("stream after its end %q", got)
	}
}
