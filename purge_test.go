package chatproxy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/chatproxy/caddy-chatproxy/migrations"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// A provisioned handler purges exactly what is past its history_retention
// and expired sessions, and keeps message_count equal to the history the
// API shows. Provision itself purges nothing (the first run is delayed).
func TestPurgeRemovesExactlyPastRetention(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			cp := newTestProxy(t, kind, func(cp *ChatProxy) {
				cp.HistoryRetention = caddy.Duration(48 * time.Hour)
			})
			if cp.purger == nil || cp.purger.Retention != 48*time.Hour || cp.purger.Interval != sessions.DefaultPurgeInterval ||
				cp.purger.FirstDelay < time.Minute {
				t.Fatalf("purger = %+v", cp.purger)
			}
			store := cp.handlerStore()
			ctx := t.Context()
			now := time.Now()
			live := createSession(t, cp)
			gone := createSession(t, cp)
			// The second session expired a minute ago.
			expired := &sessions.Session{ID: "expired-by-hand", Site: "shop.example.com", ExpiresAt: now.Add(-time.Minute), CreatedAt: now.Add(-time.Hour)}
			if err := store.CreateSession(ctx, expired); err != nil {
				t.Fatal(err)
			}
			add := func(sessionID, content string, age time.Duration) {
				t.Helper()
				m := &sessions.Message{SessionID: sessionID, Role: sessions.RoleUser, Content: content, CreatedAt: now.Add(-age)}
				if err := store.AppendMessage(ctx, m); err != nil {
					t.Fatal(err)
				}
			}
			add(live.SessionID, "three days old", 72*time.Hour)
			add(live.SessionID, "just past retention", 48*time.Hour+time.Minute)
			add(live.SessionID, "just within retention", 48*time.Hour-time.Minute)
			add(live.SessionID, "new", 0)
			add(gone.SessionID, "other session, old", 49*time.Hour)
			add(gone.SessionID, "other session, new", time.Hour)
			add(expired.ID, "in an expired session", time.Minute)

			if st, err := store.Stats(ctx); err != nil || st.Sessions != 3 || st.Messages != 7 {
				t.Fatalf("before the purge: %+v, %v (Provision must not purge)", st, err)
			}
			if got := cp.purger.Once(ctx); got != sessions.PurgeDone {
				t.Fatalf("purge: %s", got)
			}
			st, err := store.Stats(ctx)
			if err != nil || st.Sessions != 2 || st.Messages != 3 {
				t.Fatalf("after the purge: %+v, %v; want 2 sessions, 3 messages", st, err)
			}
			rec := serve(t, cp, req{method: "GET", path: "/api/v1/chat/history", headers: bearer(live.Token)})
			h := decode[historyBody](t, rec)
			if len(h.Messages) != 2 || h.Messages[0].Content != "just within retention" || h.Messages[1].Content != "new" || h.TotalCount != 2 {
				t.Fatalf("history after the purge: %+v", h)
			}
			rec = serve(t, cp, req{method: "GET", path: "/api/v1/session/validate", headers: bearer(live.Token)})
			if !strings.Contains(rec.Body.String(), `"message_count":2`) {
				t.Fatalf("validate after the purge: %s", rec.Body)
			}
			if _, err := store.GetSession(ctx, expired.ID); !errors.Is(err, sessions.ErrNotFound) {
				t.Fatalf("expired session after the purge: %v", err)
			}
		})
	}
}

// DELETE {prefix}/session erases the visitor's messages at once, not at
// the next purge.
func TestDestroySessionErasesMessages(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			e.fake.setScript(fakeStream("Hi ", "there"))
			s := e.newSession(t)
			other := e.newSession(t)
			for _, tok := range []string{s.Token, s.Token, other.Token} {
				resp := e.do(t, "POST", "/api/v1/chat/message", `{"message":"hello"}`, authz(tok))
				if resp.StatusCode != 200 {
					t.Fatalf("chat: %d", resp.StatusCode)
				}
				_, _ = io.ReadAll(resp.Body)
				e.waitIdle(t)
			}
			if p, err := e.store.ListMessages(t.Context(), s.SessionID, "", 50); err != nil || p.TotalCount != 4 {
				t.Fatalf("before: %+v, %v", p, err)
			}
			rec := e.serve(t, "DELETE", "/api/v1/session", "", authz(s.Token))
			if rec.Code != http.StatusNoContent {
				t.Fatalf("destroy: %d %s", rec.Code, rec.Body)
			}
			p, err := e.store.ListMessages(t.Context(), s.SessionID, "", 50)
			if err != nil || p.TotalCount != 0 || len(p.Messages) != 0 {
				t.Fatalf("messages after destroy: %+v, %v", p, err)
			}
			if sess, err := e.store.GetSession(t.Context(), s.SessionID); err != nil || sess.MessageCount != 0 || sess.RevokedAt == nil {
				t.Fatalf("session after destroy: %+v, %v", sess, err)
			}
			if p, err := e.store.ListMessages(t.Context(), other.SessionID, "", 50); err != nil || p.TotalCount != 2 {
				t.Fatalf("another visitor's messages: %+v, %v", p, err)
			}
		})
	}
}

func TestRetentionOptions(t *testing.T) {
	d := caddyfile.NewTestDispenser("chat_proxy {\n\thistory_retention 90d\n\tpurge_interval 15m\n}")
	var cp ChatProxy
	if err := cp.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if cp.HistoryRetention != caddy.Duration(90*24*time.Hour) || cp.PurgeInterval != caddy.Duration(15*time.Minute) {
		t.Fatalf("parsed %v, %v", cp.HistoryRetention, cp.PurgeInterval)
	}
	for input, want := range map[string]string{
		"chat_proxy {\n\thistory_retention\n}":                      "chat_proxy: option 'history_retention' needs a value, at Testfile:2",
		"chat_proxy {\n\thistory_retention soon\n}":                 `chat_proxy: option 'history_retention': invalid duration "soon" (use e.g. 30s, 10m, 7d), at Testfile:2`,
		"chat_proxy {\n\tpurge_interval 1h 2h\n}":                   "chat_proxy: option 'purge_interval' takes one value, at Testfile:2",
		"chat_proxy {\n\tpurge_interval 1h\n\tpurge_interval 2h\n}": "chat_proxy: duplicate option 'purge_interval', at Testfile:3",
	} {
		var cp ChatProxy
		err := cp.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
		if err == nil || err.Error() != want {
			t.Errorf("%q: err = %v, want %s", input, err, want)
		}
	}

	// Defaults, and the bounds Provision enforces.
	def := mtConfig(t, nil)
	if err := mtProvision(t, def); err != nil {
		t.Fatal(err)
	}
	if def.HistoryRetention != caddy.Duration(30*24*time.Hour) || def.PurgeInterval != caddy.Duration(time.Hour) {
		t.Fatalf("defaults: %v, %v", def.HistoryRetention, def.PurgeInterval)
	}
	for _, tc := range []struct {
		mutate func(*ChatProxy)
		want   string
	}{
		{func(c *ChatProxy) { c.HistoryRetention = caddy.Duration(30 * time.Minute) }, "history_retention: must be at least 1h, got 30m0s"},
		{func(c *ChatProxy) { c.PurgeInterval = caddy.Duration(time.Second) }, "purge_interval: must be at least 1m, got 1s"},
	} {
		err := mtProvision(t, mtConfig(t, tc.mutate))
		if err == nil || err.Error() != tc.want {
			t.Errorf("err = %v, want %s", err, tc.want)
		}
	}
}

// `caddy chatproxy status` prints the schema version and the counts, for
// both stores; `migrate` prints the version it brought the schema to.
func TestStatusCommand(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			cp := newTestProxy(t, kind, nil)
			for range 2 {
				createSession(t, cp)
			}
			c := createSession(t, cp)
			if err := cp.handlerStore().AppendMessage(t.Context(), &sessions.Message{SessionID: c.SessionID, Role: sessions.RoleUser, Content: "x"}); err != nil {
				t.Fatal(err)
			}
			targets, err := commandTargets("", "", cp.Database)
			if err != nil || len(targets) != 1 {
				t.Fatalf("targets: %v, %v", targets, err)
			}
			out := captureStdout(t, func() error { return runStatus(t.Context(), targets[0]) })
			latest := migrations.Latest(migrations.SQLite)
			if !strings.HasSuffix(out, fmt.Sprintf(": schema version %d, 3 sessions, 1 messages\n", latest)) || strings.Contains(out, "@") {
				t.Fatalf("status printed %q", out)
			}
			out = captureStdout(t, func() error { return runMigrate(t.Context(), targets[0]) })
			if !strings.HasSuffix(out, fmt.Sprintf(": schema version %d\n", latest)) {
				t.Fatalf("migrate printed %q", out)
			}
		})
	}
}

// captureStdout runs fn with os.Stdout going to a pipe and returns what it
// printed. Tests using it must not run in parallel.
func captureStdout(t *testing.T, fn func() error) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stdout
	os.Stdout = w
	var buf bytes.Buffer
	copied := make(chan struct{})
	go func() {
		_, _ = io.Copy(&buf, r)
		close(copied)
	}()
	err = fn()
	os.Stdout = old
	_ = w.Close()
	<-copied
	_ = r.Close()
	if err != nil {
		t.Fatal(err)
	}
	return buf.String()
}
