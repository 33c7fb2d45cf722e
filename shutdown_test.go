package chatproxy

import (
	"bufio"
	"context"
	"database/sql"
	"net/http"
	"reflect"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// These tests drive the hooks Caddy calls when it shuts a server down
// (Drain.ServerShutdown, the callback registered with RegisterOnShutdown) and
// unloads a config (Cleanup), with Drain.Exiting replaced: it can only
// become true in a process that is about to exit. The same path runs for
// real in integration.TestShutdownEndsStreams, which stops a Caddy child
// process.

func exiting(cp *ChatProxy, v bool) {
	cp.drain.Exiting = func() bool { return v }
}

// A stream still running when the grace period is about to end gets an
// error event (server_shutdown) and the end marker, on both stream
// protocols, and what it relayed is stored as a partial reply; the stream
// ran on until shortly before the grace period ended.
func TestShutdownDrainsStreams(t *testing.T) {
	const grace = 400 * time.Millisecond
	for _, route := range []string{"sse", "ndjson"} {
		t.Run(route, func(t *testing.T) {
			e := newChatEnv(t, chatEnvOpts{})
			exiting(e.cp, true)
			never := make(chan struct{})
			e.fake.setScript(e.fake.fakeThen("Partial words ", never, func(http.ResponseWriter, *http.Request) {}))
			s := e.newSession(t)
			var br *bufio.Reader
			if route == "sse" {
				resp := e.do(t, "POST", "/api/v1/chat/message", `{"message":"Long answer please"}`, authz(s.Token))
				br = afterBegin(t, resp.Body)
				if got := itemOf(t, nextSSE(t, br)); got != "Partial words " {
					t.Fatalf("first event %q", got)
				}
			} else {
				resp := e.do(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"widget-session-1","chatInput":"Long answer please"}`,
					map[string]string{"Origin": allowedOrigin, "Accept": "text/plain"})
				br = bufio.NewReader(resp.Body)
				for _, want := range []string{"begin", "item"} {
					if l := nextNDJSON(t, br); l.Type != want {
						t.Fatalf("line %+v, want %s", l, want)
					}
				}
			}
			start := time.Now()
			e.cp.drain.ServerShutdown(grace)
			if route == "sse" {
				ev := eventJSON(t, nextSSE(t, br))
				if ev.Type != "error" || ev.Error != handler.CodeServerShutdown || ev.Message == "" {
					t.Fatalf("want a server_shutdown error event, got %+v", ev)
				}
				wantEndDone(t, br)
			} else {
				l := nextNDJSON(t, br)
				if l.Type != "error" || l.Content == nil || *l.Content == "" {
					t.Fatalf("want an error line, got %+v", l)
				}
				if l = nextNDJSON(t, br); l.Type != "end" {
					t.Fatalf("want the end line, got %+v", l)
				}
			}
			wantStreamEnd(t, br) // a clean end, not a cut connection
			if d := time.Since(start); d < grace-handler.DrainMargin(grace)-50*time.Millisecond || d > grace {
				t.Errorf("the stream ended %v after the shutdown began; want just before the %v grace period ends", d, grace)
			}
			awaitSignal(t, e.fake.last(t).Canceled(), "n8n to see its request cancelled")
			e.waitIdle(t)
			if route == "sse" {
				wantExchange(t, e.history(t, s.Token), "Long answer please", "Partial words ", "partial")
			} else {
				msgs := e.widgetLoad(t, allowedOrigin, "widget-session-1")
				if len(msgs) != 2 {
					t.Fatalf("widget history: %+v", msgs)
				}
				wantStoredReply(t, sessions.SQLitePath(e.cp.Database), "Partial words ", sessions.StatusPartial)
			}
		})
	}
}

// wantStoredReply checks the one assistant message in the embedded store
// at path, read with SQL (a widget session's id is internal).
func wantStoredReply(t *testing.T, path, content, status string) {
	t.Helper()
	db, err := sql.Open("sqlite", path+"?_pragma=query_only(1)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var got, gotStatus string
	var n int
	err = db.QueryRowContext(t.Context(), `SELECT count(*), max(content), max(status) FROM chatproxy_messages WHERE role = 'assistant'`).
		Scan(&n, &got, &gotStatus)
	if err != nil || n != 1 || got != content || gotStatus != status {
		t.Fatalf("assistant messages: %d, last %q %s, %v; want one %q with status %s", n, got, gotStatus, err, content, status)
	}
}

// A stream that ends within the grace period is not touched, and a
// server shutting down for a reload (not exiting) or with the default
// eternal grace period never drains its streams.
func TestShutdownLeavesStreamsThatFinish(t *testing.T) {
	for _, tc := range []struct {
		name    string
		exiting bool
		grace   time.Duration
	}{
		{"exiting, stream ends within the grace period", true, 3 * time.Second},
		{"exiting, eternal grace period", true, 0},
		{"reload", false, time.Nanosecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newChatEnv(t, chatEnvOpts{})
			exiting(e.cp, tc.exiting)
			g := newStreamGate()
			e.fake.setScript(e.fake.fakeGated(g, false, "one ", "two ", "three"))
			s := e.newSession(t)
			resp := e.do(t, "POST", "/api/v1/chat/message", `{"message":"Count to three"}`, authz(s.Token))
			br := afterBegin(t, resp.Body)
			if got := itemOf(t, nextSSE(t, br)); got != "one " {
				t.Fatalf("first item %q", got)
			}
			e.cp.drain.ServerShutdown(tc.grace)
			time.Sleep(20 * time.Millisecond) // a drain would have started by now for the 1ns grace
			for _, want := range []string{"two ", "three"} {
				g.next(t)
				if got := itemOf(t, nextSSE(t, br)); got != want {
					t.Fatalf("item %q, want %q", got, want)
				}
			}
			g.next(t)
			wantEndDone(t, br)
			wantStreamEnd(t, br)
			e.waitIdle(t)
			wantExchange(t, e.history(t, s.Token), "Count to three", "one two three", "complete")
			if e.cp.drain.Started() {
				t.Error("the drain started")
			}
		})
	}
}

// When Caddy exits after the grace period (or without the hook, e.g. the
// handler was not under a caddyhttp.Server), Cleanup ends the streams
// still running and waits until they have stored their replies, before it
// releases the store that the process exit would otherwise close under
// them.
func TestCleanupOnExitStoresPartialReplies(t *testing.T) {
	e := newChatEnv(t, chatEnvOpts{})
	exiting(e.cp, true)
	never := make(chan struct{})
	e.fake.setScript(e.fake.fakeThen("Half a reply", never, func(http.ResponseWriter, *http.Request) {}))
	s := e.newSession(t)
	resp := e.do(t, "POST", "/api/v1/chat/message", `{"message":"Long answer please"}`, authz(s.Token))
	br := afterBegin(t, resp.Body)
	if got := itemOf(t, nextSSE(t, br)); got != "Half a reply" {
		t.Fatalf("first event %q", got)
	}
	path := sessions.SQLitePath(e.cp.Database)
	if err := e.cp.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if n := e.cp.drain.Active(); n != 0 {
		t.Fatalf("Cleanup returned with %d streams running", n)
	}
	// The store was released by Cleanup; read the file afresh.
	st, err := sessions.OpenSQLite(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	p, err := st.ListMessages(t.Context(), s.SessionID, "", 50)
	if err != nil || len(p.Messages) != 2 || p.Messages[1].Content != "Half a reply" || p.Messages[1].Status != sessions.StatusPartial {
		t.Fatalf("stored after Cleanup: %+v, %v", p, err)
	}
	ev := eventJSON(t, nextSSE(t, br))
	if ev.Type != "error" || ev.Error != handler.CodeServerShutdown {
		t.Fatalf("want a server_shutdown error event, got %+v", ev)
	}
	wantEndDone(t, br)
	wantStreamEnd(t, br)
}

// Provision registers the shutdown hook with the caddyhttp.Server it is
// provisioned under (Caddy puts it in the context while it provisions the
// server's routes).
func TestProvisionHooksServerShutdown(t *testing.T) {
	srv := new(caddyhttp.Server)
	base, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	ctx := base
	ctx.Context = context.WithValue(base.Context, caddyhttp.ServerCtxKey, srv)
	hooks := func() int { return reflect.ValueOf(srv).Elem().FieldByName("onShutdownFuncs").Len() }
	if hooks() != 0 {
		t.Fatal("server has hooks already")
	}
	cp := mtConfig(t, nil)
	if err := cp.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer cp.Cleanup()
	if hooks() != 1 {
		t.Fatalf("%d shutdown hooks registered, want 1", hooks())
	}
}
