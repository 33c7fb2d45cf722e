package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
)

// resumeCaddyfile: admin port, HTTP port, HTTPS port, listen port,
// webhook, database URL, Redis URL. Two instances of one site: the same
// secrets, database and Redis.
const resumeCaddyfile = `
{
	admin localhost:%d
	skip_install_trust
	persist_config off
	http_port %d
	https_port %d
}

http://127.0.0.1:%d {
	chat_proxy {
		n8n_webhook %s
		database %s
		redis %s
		jwt_secret resume-test-visitor-jwt-secret-0123456789
		session_secret resume-test-n8n-session-secret-0123456789
	}
}
`

// startInstance starts one Caddy process of the two-instance site and
// waits until it answers; it returns its base URL.
func startInstance(t *testing.T, webhook, dbURL, redisURL string) string {
	t.Helper()
	dir := t.TempDir()
	ports := freePorts(t, 3)
	cfg := filepath.Join(dir, "Caddyfile")
	if err := writeFile(cfg, fmt.Sprintf(resumeCaddyfile, ports[0], ports[1], ports[2], ports[1], webhook, dbURL, redisURL)); err != nil {
		t.Fatal(err)
	}
	child := startCaddy(t, dir, cfg)
	base := portURL(ports[1], "")
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get(base + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return base
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Caddy did not come up: %v\n%s", err, child.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// idEvent is an event with its id ("" for [DONE]).
type idEvent struct{ id, data string }

func readIDEvent(t *testing.T, br *bufio.Reader) idEvent {
	t.Helper()
	var ev idEvent
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the stream: %v (read %q)", err, line)
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "" && ev.data != "":
			return ev
		case strings.HasPrefix(line, "id: "):
			ev.id = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "data: "):
			ev.data = strings.TrimPrefix(line, "data: ")
		}
	}
}

func authGet(t *testing.T, ctx context.Context, method, url, token string, headers ...string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// lastReply reads the conversation's last message from an instance's
// history.
func lastReply(t *testing.T, base, token string) (id, status, content string) {
	t.Helper()
	resp := authGet(t, context.Background(), "GET", base+"/api/v1/chat/history", token)
	var h struct {
		Messages []struct{ ID, Role, Status, Content string } `json:"messages"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil || len(h.Messages) == 0 {
		t.Fatalf("history: %v %+v", err, h)
	}
	m := h.Messages[len(h.Messages)-1]
	if m.Role != "assistant" {
		t.Fatalf("last message %+v, want the reply", m)
	}
	return m.ID, m.Status, m.Content
}

// Two real Caddy processes of one site, sharing PostgreSQL and Redis: a
// reply streaming from instance A, whose visitor goes away (a reload),
// is resumed on instance B from the last event the visitor saw, live
// through Redis, and ends there; instance B's history showed it as
// streaming meanwhile and shows it whole afterwards. Then a stop sent to
// B stops a reply A is producing: n8n's request is cancelled and A's
// stream ends with end and [DONE].
func TestResumeAndStopAcrossInstances(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two Caddy processes")
	}
	n8n := newSlowN8n(t, "One", " two", " three")
	dbURL, redisURL := testenv.PostgresURL(t), testenv.RedisURL(t)
	a := startInstance(t, n8n.URL(), dbURL, redisURL)
	b := startInstance(t, n8n.URL(), dbURL, redisURL)
	_, token := createSession(t, a+"/api/v1/session/create")

	// The reply starts on A; the visitor sees begin and the first item.
	visitor, leave := context.WithCancel(context.Background())
	defer leave()
	req, _ := http.NewRequestWithContext(visitor, "POST", a+"/api/v1/chat/stream", strings.NewReader(`{"message":"Count to three"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("chat on A: %v %v", resp, err)
	}
	br := bufio.NewReader(resp.Body)
	id := resp.Header.Get("X-Message-ID")
	if ev := readIDEvent(t, br); ev.id != "1" || !strings.Contains(ev.data, id) {
		t.Fatalf("first event %+v", ev)
	}
	if ev := readIDEvent(t, br); ev.id != "2" || !strings.Contains(ev.data, `"One"`) {
		t.Fatalf("second event %+v", ev)
	}
	if gotID, status, _ := lastReply(t, b, token); gotID != id || status != "streaming" {
		t.Fatalf("B's history while A streams: %s %s, want %s streaming", gotID, status, id)
	}
	leave() // the page reloads...

	// ...and the balancer sends it to B.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resumed := authGet(t, ctx, "GET", b+"/api/v1/chat/stream/"+id, token, "Last-Event-ID", "2")
	if resumed.StatusCode != 200 || resumed.Header.Get("X-Message-ID") != id {
		t.Fatalf("resume on B: %d", resumed.StatusCode)
	}
	rb := bufio.NewReader(resumed.Body)
	n8n.next(t)
	n8n.next(t)
	n8n.next(t)
	var got []string
	for {
		ev := readIDEvent(t, rb)
		got = append(got, ev.id+" "+ev.data)
		if ev.data == "[DONE]" {
			break
		}
	}
	want := []string{`3 {"type":"item","content":" two"}`, `4 {"type":"item","content":" three"}`, `5 {"type":"end"}`, ` [DONE]`}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("B's resumed stream:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, status, content := lastReply(t, b, token)
		if status == "complete" && content == "One two three" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stored reply %s %q, want complete %q", status, content, "One two three")
		}
		time.Sleep(20 * time.Millisecond)
	}

	// A stop sent to B stops the reply A produces.
	stream := openStream(t, a+"/api/v1/chat/message", token, "Count again")
	stream.item("One")
	stopID, _, _ := lastReply(t, a, token)
	stop := authGet(t, ctx, "POST", b+"/api/v1/chat/stop/"+stopID, token)
	body, _ := io.ReadAll(stop.Body)
	if stop.StatusCode != 200 || !strings.Contains(string(body), `"status":"partial"`) {
		t.Fatalf("stop on B: %d %s", stop.StatusCode, body)
	}
	stream.end()
	select {
	case <-n8n.canceled:
	case <-time.After(10 * time.Second):
		t.Fatal("n8n's request was not cancelled")
	}
	if _, status, content := lastReply(t, a, token); status != "partial" || content != "One" {
		t.Fatalf("stopped reply stored %s %q, want partial %q", status, content, "One")
	}
}
