package integration

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/jackc/pgx/v5"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
)

// reloadCaddyfile is one config of the reload test; %s are the path
// prefix, the allowed origins, the webhook and the database.
const reloadCaddyfile = `
{
	admin localhost:2999
	skip_install_trust
	http_port 9080
	https_port 9443
	grace_period 10s
}

http://localhost:9080 {
	chat_proxy {
		path_prefix %s
		allowed_origins %s
		n8n_webhook %s
		database %s
		jwt_secret reload-test-visitor-jwt-secret-0123456789
		session_secret reload-test-n8n-session-secret-0123456789
		rate_limit ip 1000/1m
	}
}
`

// `caddy reload` (a POST to the admin /load, which is what the reload
// command does) while an SSE stream is open, in a real Caddy:
//   - the stream, served by the old config, gets every chunk and [DONE],
//     and its reply is stored complete, although the old config's Cleanup
//     (which closes its n8n client and releases its store reference) ran
//     in the middle of it;
//   - the new config (another path prefix and origin) applies to new
//     requests at once;
//   - the database pool is the same one: the URL caps the pool at one
//     connection and names it, and PostgreSQL shows that one connection
//     (same backend pid) serving both configs, and no second one. A second
//     pool would need a connection of its own; a pool closed and reopened
//     would show a new pid (and the stream's reply could not be stored).
func TestReloadWhileStreaming(t *testing.T) {
	base := testenv.PostgresURL(t)
	appName := randomSecret("chatproxy-reload-")
	db := withParams(t, base, map[string]string{"application_name": appName, "pool_max_conns": "1"})
	n8n := newSlowN8n(t, "one ", "two ", "three")
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(reloadCaddyfile, "/api/v1", "https://old.example.com", n8n.URL(), db), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	sessionID, token := createSession(t, "http://localhost:9080/api/v1/session/create")
	stream := openStream(t, "http://localhost:9080/api/v1/chat/message", token, "Count to three")
	stream.item("one ")
	pids := backends(t, base, appName)
	if len(pids) != 1 {
		t.Fatalf("%d connections named %s before the reload, want 1", len(pids), appName)
	}

	// The reload, with the stream open.
	start := time.Now()
	tester.InitServer(fmt.Sprintf(reloadCaddyfile, "/api/v2", "https://new.example.com", n8n.URL(), db), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	if d := time.Since(start); d > 8*time.Second {
		t.Errorf("the reload took %v: it waited for the stream", d)
	}

	// New requests get the new config.
	c := client{t: t, http: &http.Client{Timeout: 5 * time.Second}}
	if status, _, body := c.do("GET", "http://localhost:9080/api/v2/session/validate", "", map[string]string{"Authorization": "Bearer " + token}); status != 200 {
		t.Fatalf("validate on the new prefix: %d %s", status, body)
	}
	if status, _, _ := c.do("POST", "http://localhost:9080/api/v2/session/create", "", map[string]string{"Origin": "https://new.example.com"}); status != 201 {
		t.Fatalf("create from the new origin: %d", status)
	}
	if status, _, _ := c.do("POST", "http://localhost:9080/api/v2/session/create", "", map[string]string{"Origin": "https://old.example.com"}); status != 403 {
		t.Fatalf("create from the old origin: %d, want 403", status)
	}
	if status, _, body := c.do("POST", "http://localhost:9080/api/v1/session/create", "", nil); status == 201 || strings.Contains(body, "session_id") {
		t.Fatalf("the old prefix still creates sessions: %d %s", status, body)
	}

	// The old stream goes on to its end.
	n8n.next(t)
	stream.item("two ")
	n8n.next(t)
	stream.item("three")
	n8n.next(t)
	stream.end()

	var history struct {
		Messages []struct {
			Role, Content, Status string
		} `json:"messages"`
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		status, _, body := c.do("GET", "http://localhost:9080/api/v2/chat/history/"+sessionID, "", map[string]string{"Authorization": "Bearer " + token})
		if status != 200 {
			t.Fatalf("history: %d %s", status, body)
		}
		mustJSON(t, body, &history)
		if len(history.Messages) == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // the reply is stored just after [DONE]
	}
	if len(history.Messages) != 2 || history.Messages[1].Content != "one two three" || history.Messages[1].Status != "complete" {
		t.Fatalf("history after the stream: %+v", history.Messages)
	}
	after := backends(t, base, appName)
	if len(after) != 1 || after[0] != pids[0] {
		t.Fatalf("connections named %s after the reload: %v, want the one from before (%v): one pool, kept", appName, after, pids)
	}
}

// backends lists the PostgreSQL backend pids of connections with the
// given application_name.
func backends(t *testing.T, dbURL, appName string) []int32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid`, appName)
	if err != nil {
		t.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	return pids
}

// withParams adds query parameters to a URL.
func withParams(t *testing.T, raw string, params map[string]string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	for k, v := range params {
		q.Set(k, v)
	}
	u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
	return u.String()
}
