package integration

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/signed"
)

// eventsCaddyfile: the max_message_length (which the reload changes), the
// webhook and the database.
const eventsCaddyfile = `
{
	admin localhost:2999
	skip_install_trust
	http_port 9080
	https_port 9443
	grace_period 10s
}

http://localhost:9080 {
	chat_proxy {
		n8n_webhook %s
		database sqlite:%s
		jwt_secret events-test-visitor-jwt-secret-0123456789
		session_secret events-test-n8n-session-secret-0123456789
		push_secret ` + eventsPushSecret + `
		max_message_length %d
	}
}
`

const eventsPushSecret = "events-test-push-secret-0123456789abcdef"

// eventsPush sends a signed push and returns the stored message's id.
func eventsPush(t *testing.T, sessionID, content string) string {
	t.Helper()
	body := `{"session_id":"` + sessionID + `","content":"` + content + `","role":"agent"}`
	ts, sig := signed.Sign([]byte(eventsPushSecret), []byte(body), time.Now())
	c := client{t: t, http: &http.Client{Timeout: 5 * time.Second}}
	status, _, resp := c.do("POST", "http://localhost:9080/api/v1/sessions/"+sessionID+"/messages", body,
		map[string]string{signed.HeaderTimestamp: ts, signed.HeaderSignature: sig, "Content-Type": "application/json"})
	if status != 201 {
		t.Fatalf("push: %d %s", status, resp)
	}
	var out struct {
		Message struct{ ID string } `json:"message"`
	}
	mustJSON(t, resp, &out)
	return out.Message.ID
}

// openEventStream opens the visitor's events stream and reads it up to
// ready, returning the events before ready.
func openEventStream(t *testing.T, token, lastEventID string) ([]testkit.NamedEvent, *bufio.Reader) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, "GET", "http://localhost:9080/api/v1/chat/events", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	resp, err := (&http.Client{}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	if resp.StatusCode != 200 {
		t.Fatalf("events: %d", resp.StatusCode)
	}
	br := bufio.NewReader(resp.Body)
	var before []testkit.NamedEvent
	for {
		ev := testkit.NextNamedEvent(t, br)
		if ev.Event == "ready" {
			return before, br
		}
		before = append(before, ev)
	}
}

// A page's events stream in a real Caddy across `caddy reload`: a signed
// push reaches it live; the reload ends it at once with an end event (the
// old config's hub closes when its server shuts down, or at the latest
// when the old config is cleaned up) rather than leaving it attached to a
// config that no longer takes pushes' subscriptions; the page reconnects
// with Last-Event-ID to the new config and misses nothing pushed in
// between.
func TestEventsStreamAcrossReload(t *testing.T) {
	n8n := newSlowN8n(t, "unused")
	db := filepath.Join(t.TempDir(), "chat.db")
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(eventsCaddyfile, n8n.URL(), db, 4000), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	sessionID, token := createSession(t, "http://localhost:9080/api/v1/session/create")
	_, br := openEventStream(t, token, "")
	first := eventsPush(t, sessionID, "Hi, I am Ana from support.")
	ev := testkit.NextNamedEvent(t, br)
	if ev.Event != "message" || ev.ID != first || !strings.Contains(ev.Data, "Ana from support") {
		t.Fatalf("live event %+v, want the pushed message %s", ev, first)
	}

	start := time.Now()
	ended := make(chan testkit.NamedEvent, 1)
	go func() { ended <- testkit.NextNamedEvent(t, br) }()
	tester.InitServer(fmt.Sprintf(eventsCaddyfile, n8n.URL(), db, 3000), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the reload took %v: it waited for the events stream", d)
	}
	select {
	case ev := <-ended:
		if ev.Event != "end" {
			t.Fatalf("event at the reload %+v, want end", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the events stream was not ended by the reload")
	}

	// Pushed while the page was away, then the page is back.
	missed := eventsPush(t, sessionID, "Are you still there?")
	before, br := openEventStream(t, token, first)
	if len(before) != 1 || before[0].ID != missed {
		t.Fatalf("caught up %+v, want only %s", before, missed)
	}
	live := eventsPush(t, sessionID, "Great, see you.")
	if ev := testkit.NextNamedEvent(t, br); ev.Event != "message" || ev.ID != live {
		t.Fatalf("live after the reload %+v, want %s", ev, live)
	}
}

// eventsStopCaddyfile: admin port, HTTP port, HTTPS port, listen port,
// webhook, database file. The grace period is long: the test shows an
// events stream does not hold an exiting Caddy for it.
const eventsStopCaddyfile = `
{
	admin localhost:%d
	skip_install_trust
	persist_config off
	http_port %d
	https_port %d
	grace_period 20s
}

http://127.0.0.1:%d {
	chat_proxy {
		n8n_webhook %s
		database sqlite:%s
		jwt_secret events-test-visitor-jwt-secret-0123456789
		session_secret events-test-n8n-session-secret-0123456789
		push_secret ` + eventsPushSecret + `
	}
}
`

// Stopping a real Caddy process (`caddy stop`) while a page's events
// stream is open: the stream, which never ends by itself, gets its end
// event as soon as the server begins to shut down (the shutdown hook),
// so the process exits (status 0) in well under its 20s grace period
// instead of waiting it out.
func TestEventsStreamEndsOnStop(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Caddy process")
	}
	n8n := newSlowN8n(t, "unused")
	dir := t.TempDir()
	ports := freePorts(t, 3)
	admin, httpPort, httpsPort := ports[0], ports[1], ports[2]
	cfg := filepath.Join(dir, "Caddyfile")
	if err := writeFile(cfg, fmt.Sprintf(eventsStopCaddyfile, admin, httpPort, httpsPort, httpPort, n8n.URL(), filepath.Join(dir, "chat.db"))); err != nil {
		t.Fatal(err)
	}
	child := startCaddy(t, dir, cfg)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(portURL(httpPort, "/health"))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Caddy did not come up: %v\n%s", err, child.output())
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, token := createSession(t, portURL(httpPort, "/api/v1/session/create"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", portURL(httpPort, "/api/v1/chat/events"), nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("events: %v %v", resp, err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if ev := testkit.NextNamedEvent(t, br); ev.Event != "ready" {
		t.Fatalf("first event %+v, want ready", ev)
	}

	start := time.Now()
	go func() {
		resp, err := http.Post(fmt.Sprintf("http://localhost:%d/stop", admin), "", nil)
		if err == nil {
			resp.Body.Close()
		}
	}()
	if ev := testkit.NextNamedEvent(t, br); ev.Event != "end" {
		t.Fatalf("event at the stop %+v, want end\n%s", ev, child.output())
	}
	if err := child.wait(15 * time.Second); err != nil {
		t.Fatalf("Caddy: %v\n%s", err, child.output())
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Caddy took %v to exit: the events stream held it", d)
	}
}
