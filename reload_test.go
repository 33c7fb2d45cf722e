package chatproxy

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// reloadServer serves like a Caddy server across a reload: each request
// runs to its end on the handler that was current when it arrived.
type reloadServer struct {
	cur      atomic.Pointer[ChatProxy]
	srv      *httptest.Server
	inflight atomic.Int32
}

func newReloadServer(t *testing.T, cp *ChatProxy) *reloadServer {
	rs := &reloadServer{}
	rs.cur.Store(cp)
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(passedOn)
		return nil
	})
	rs.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rs.inflight.Add(1)
		defer rs.inflight.Add(-1)
		h := rs.cur.Load()
		r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, nil)
		caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, chatClientIP)
		if err := h.ServeHTTP(w, r, next); err != nil {
			t.Errorf("ServeHTTP: %v", err)
		}
	}))
	t.Cleanup(rs.srv.Close)
	return rs
}

func (rs *reloadServer) do(t *testing.T, method, path, body string, headers map[string]string) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, method, rs.srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("User-Agent", chatUA)
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// A reload as Caddy does it (caddy.go unsyncedDecodeAndRun): the new
// config is provisioned while the old one runs, then the old context is
// cancelled, which cleans the old handler up. A stream running on the old
// handler finishes normally and is stored whole; the store is one pooled
// store whose reference count goes 1 → 2 → 1 and which stays open; new
// requests get the new config. The old handler's n8n client is closed by
// its Cleanup, which does not cut the reply it is reading.
func TestReloadDuringStream(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			fake := newN8nFake(t, nil)
			g := newStreamGate()
			fake.setScript(fake.fakeGated(g, false, "one ", "two ", "three"))
			var database string
			mk := func(mutate func(*ChatProxy)) (*ChatProxy, context.CancelFunc) {
				cp := &ChatProxy{
					N8nWebhook: fake.URL(), JWTSecret: testJWTSecret, SessionSecret: testSessionSecret,
					AllowedOrigins: []string{allowedOrigin}, RateLimits: generousLimits(), Database: database,
				}
				if mutate != nil {
					mutate(cp)
				}
				ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
				if err := cp.Provision(ctx); err != nil {
					t.Fatal(err)
				}
				if err := cp.Validate(); err != nil {
					t.Fatal(err)
				}
				// Caddy's context cancel runs Cleanup; cancel is idempotent.
				return cp, func() {
					cancel()
					if err := cp.Cleanup(); err != nil {
						t.Errorf("Cleanup: %v", err)
					}
				}
			}
			if kind == "postgres" {
				database = testenv.PostgresURL(t)
			} else {
				database = "sqlite:" + t.TempDir() + "/chat.db"
			}
			old, stopOld := mk(nil)
			defer stopOld()
			key := storeKeyOf(old)
			if n, _ := sessions.SharedReferences(key); n != 1 {
				t.Fatalf("references before the reload = %d, want 1", n)
			}
			rs := newReloadServer(t, old)
			c := createSession(t, old)
			resp := rs.do(t, "POST", "/api/v1/chat/message", `{"message":"Count to three"}`, authz(c.Token))
			br := afterBegin(t, resp.Body)
			if got := itemOf(t, nextSSE(t, br)); got != "one " {
				t.Fatalf("first item %q", got)
			}

			// The reload: a different path prefix and origin.
			fresh, stopFresh := mk(func(cp *ChatProxy) {
				cp.PathPrefix = "/api/v2"
				cp.AllowedOrigins = []string{"https://new.example.com"}
			})
			defer stopFresh()
			if storeKeyOf(fresh) != key {
				t.Fatalf("the new config got another store: %s", storeKeyOf(fresh))
			}
			if n, _ := sessions.SharedReferences(key); n != 2 {
				t.Fatalf("references during the reload = %d, want 2", n)
			}
			store := mtPooledStore(t, fresh)
			rs.cur.Store(fresh)
			stopOld()
			if n, _ := sessions.SharedReferences(key); n != 1 {
				t.Fatalf("references after the old config was cleaned up = %d, want 1", n)
			}
			if mtPooledStore(t, fresh) != store {
				t.Fatal("the pooled store changed")
			}

			// New requests get the new config.
			if r := rs.do(t, "GET", "/api/v2/session/validate", "", authz(c.Token)); r.StatusCode != 200 {
				t.Fatalf("validate on the new prefix: %d", r.StatusCode)
			}
			if r := rs.do(t, "GET", "/api/v1/session/validate", "", authz(c.Token)); r.StatusCode != passedOn {
				t.Fatalf("the old prefix after the reload: %d, want it passed on", r.StatusCode)
			}
			if r := rs.do(t, "POST", "/api/v2/session/create", "", map[string]string{"Origin": "https://new.example.com"}); r.StatusCode != 201 {
				t.Fatalf("create from the new origin: %d", r.StatusCode)
			}
			if r := rs.do(t, "POST", "/api/v2/session/create", "", map[string]string{"Origin": allowedOrigin}); r.StatusCode != 403 {
				t.Fatalf("create from the old origin: %d, want 403", r.StatusCode)
			}

			// The old stream runs to its end on the old handler.
			for _, want := range []string{"two ", "three"} {
				g.next(t)
				if got := itemOf(t, nextSSE(t, br)); got != want {
					t.Fatalf("item %q, want %q", got, want)
				}
			}
			g.next(t)
			wantEndDone(t, br)
			wantStreamEnd(t, br)
			deadline := time.Now().Add(5 * time.Second)
			for rs.inflight.Load() != 0 && time.Now().Before(deadline) {
				time.Sleep(2 * time.Millisecond)
			}
			p, err := store.ListMessages(t.Context(), c.SessionID, "", 50)
			if err != nil || len(p.Messages) != 2 || p.Messages[1].Content != "one two three" || p.Messages[1].Status != "complete" {
				t.Fatalf("stored: %+v, %v", p, err)
			}
			if err := store.Ping(t.Context()); err != nil {
				t.Fatalf("the store after the reload: %v", err)
			}
		})
	}
}
