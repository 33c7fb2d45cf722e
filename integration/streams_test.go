package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// slowN8n is the shared fake n8n (testkit.N8n) streaming a reply as n8n
// does (NDJSON: begin, items, end), one item at a time under the test's
// control: the first item at once, each further line only on next().
type slowN8n struct {
	*testkit.N8n
	gate     *testkit.StreamGate
	canceled chan struct{} // closed when the proxy abandoned a request
}

func newSlowN8n(t *testing.T, items ...string) *slowN8n {
	t.Helper()
	f := &slowN8n{N8n: testkit.NewN8n(t, nil), gate: testkit.NewStreamGate(), canceled: make(chan struct{})}
	gated := f.Gated(f.gate, false, items...)
	var once sync.Once
	f.SetScript(func(w http.ResponseWriter, r *http.Request, c *testkit.Call) {
		gated(w, r, c)
		if r.Context().Err() != nil {
			once.Do(func() { close(f.canceled) })
		}
	})
	return f
}

// next lets the stand-in write its next line.
func (f *slowN8n) next(t *testing.T) {
	t.Helper()
	f.gate.Next(t)
}

// sseReader reads an event stream as the widget does.
type sseReader struct {
	t  *testing.T
	br *bufio.Reader
}

type sseEvent struct {
	Data string
	JSON struct {
		Type      string `json:"type"`
		MessageID string `json:"message_id"`
		Content   string `json:"content"`
		Error     string `json:"error"`
		Message   string `json:"message"`
	}
}

// next returns the next event's data, skipping comments (keepalives).
func (s sseReader) next() sseEvent {
	s.t.Helper()
	var ev sseEvent
	for {
		line, err := s.br.ReadString('\n')
		if err != nil {
			s.t.Fatalf("reading the stream: %v (read %q)", err, line)
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "" && ev.Data != "":
			if ev.Data != "[DONE]" {
				if err := json.Unmarshal([]byte(ev.Data), &ev.JSON); err != nil {
					s.t.Fatalf("event data %q: %v", ev.Data, err)
				}
			}
			return ev
		case strings.HasPrefix(line, "data: "):
			ev.Data = strings.TrimPrefix(line, "data: ")
		}
	}
}

func (s sseReader) item(want string) {
	s.t.Helper()
	if ev := s.next(); ev.JSON.Type != "item" || ev.JSON.Content != want {
		s.t.Fatalf("event %q, want the item %q", ev.Data, want)
	}
}

// end expects the end event, [DONE] and then a clean end of the response.
func (s sseReader) end() {
	s.t.Helper()
	if ev := s.next(); ev.JSON.Type != "end" {
		s.t.Fatalf("event %q, want end", ev.Data)
	}
	if ev := s.next(); ev.Data != "[DONE]" {
		s.t.Fatalf("event %q, want [DONE]", ev.Data)
	}
	if rest, err := io.ReadAll(s.br); err != nil || len(rest) != 0 {
		s.t.Fatalf("after [DONE]: %q, %v (want a clean end of the response)", rest, err)
	}
}

// openStream posts a chat message and returns the event stream.
func openStream(t *testing.T, url, token, message string) sseReader {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(`{"message":"`+message+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36")
	resp, err := (&http.Client{}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("chat: %d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	s := sseReader{t: t, br: bufio.NewReader(resp.Body)}
	// The stream opens with begin, naming the reply as X-Message-ID does.
	if ev := s.next(); ev.JSON.Type != "begin" || ev.JSON.MessageID == "" || ev.JSON.MessageID != resp.Header.Get("X-Message-ID") {
		t.Fatalf("first event %q, want begin with the X-Message-ID %q", ev.Data, resp.Header.Get("X-Message-ID"))
	}
	return s
}

// createSession creates a session without an Origin (as a server would)
// and returns its id and token.
func createSession(t *testing.T, url string) (string, string) {
	t.Helper()
	c := client{t: t, http: &http.Client{Timeout: 5 * time.Second}}
	status, _, body := c.do("POST", url, "", nil)
	if status != 201 {
		t.Fatalf("create: %d %s", status, body)
	}
	var created struct {
		SessionID string `json:"session_id"`
		Token     string `json:"token"`
	}
	mustJSON(t, body, &created)
	return created.SessionID, created.Token
}

// freePorts returns n TCP ports nothing listens on now.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	var lns []net.Listener
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	for _, ln := range lns {
		_ = ln.Close()
	}
	return ports
}

func portURL(port int, path string) string { return fmt.Sprintf("http://127.0.0.1:%d%s", port, path) }
