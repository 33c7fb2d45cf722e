package handler

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/go-redis/redis_rate/v10"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// countingStore counts the calls that reach the database.
type countingStore struct {
	sessions.Store
	mu    sync.Mutex
	calls map[string]int
}

func (c *countingStore) count(op string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls[op]++
}

func (c *countingStore) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls = map[string]int{}
}

func (c *countingStore) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int, len(c.calls))
	for k, v := range c.calls {
		out[k] = v
	}
	return out
}

func (c *countingStore) CreateSession(ctx context.Context, s *sessions.Session) error {
	c.count("CreateSession")
	return c.Store.CreateSession(ctx, s)
}

func (c *countingStore) GetSession(ctx context.Context, id string) (*sessions.Session, error) {
	c.count("GetSession")
	return c.Store.GetSession(ctx, id)
}

func (c *countingStore) TouchSession(ctx context.Context, id string, at, expiresAt time.Time) error {
	c.count("TouchSession")
	return c.Store.TouchSession(ctx, id, at, expiresAt)
}

func (c *countingStore) DeleteSession(ctx context.Context, id string) error {
	c.count("DeleteSession")
	return c.Store.DeleteSession(ctx, id)
}

func (c *countingStore) RevokeSession(ctx context.Context, id string, at time.Time) error {
	c.count("RevokeSession")
	return c.Store.RevokeSession(ctx, id, at)
}

func (c *countingStore) AppendMessage(ctx context.Context, m *sessions.Message) error {
	c.count("AppendMessage")
	return c.Store.AppendMessage(ctx, m)
}

func (c *countingStore) AppendUserMessage(ctx context.Context, m *sessions.Message, kind string) (*sessions.Session, error) {
	c.count("AppendUserMessage")
	return c.Store.AppendUserMessage(ctx, m, kind)
}

func (c *countingStore) AppendExchange(ctx context.Context, m, reply *sessions.Message, kind string) (*sessions.Session, error) {
	c.count("AppendExchange")
	return c.Store.AppendExchange(ctx, m, reply, kind)
}

func (c *countingStore) FinishReply(ctx context.Context, m *sessions.Message) error {
	c.count("FinishReply")
	return c.Store.FinishReply(ctx, m)
}

func (c *countingStore) GetMessage(ctx context.Context, sessionID, id string) (*sessions.Message, error) {
	c.count("GetMessage")
	return c.Store.GetMessage(ctx, sessionID, id)
}

func (c *countingStore) ListMessages(ctx context.Context, sessionID, before string, limit int) (*sessions.Page, error) {
	c.count("ListMessages")
	return c.Store.ListMessages(ctx, sessionID, before, limit)
}

// openStore opens a fresh store of the given kind (sqlite or postgres).
func openStore(t *testing.T, kind string) sessions.Store {
	t.Helper()
	var store sessions.Store
	var err error
	switch kind {
	case "sqlite":
		store, err = sessions.OpenSQLite(filepath.Join(t.TempDir(), "chat.db"))
	case "postgres":
		store, err = sessions.OpenPostgres(testenv.PostgresURL(t))
	default:
		t.Fatalf("unknown store kind %q", kind)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	return store
}

// countedEnv is a handler over a counting store, in front of the shared
// fake n8n answering {"output":"ok"}.
type countedEnv struct {
	h     *Handler
	store *countingStore
}

func newCountedEnv(t *testing.T, kind string, limits map[guard.Tier][]redis_rate.Limit, bots *guard.BotScorer) *countedEnv {
	t.Helper()
	upstream := testkit.NewN8n(t, testkit.Output("ok"))
	store := &countingStore{Store: openStore(t, kind), calls: map[string]int{}}
	limiter, err := guard.NewLimiter(guard.LimiterConfig{Limits: limits})
	if err != nil {
		t.Fatal(err)
	}
	client, err := n8n.New(n8n.Config{WebhookURL: upstream.URL(), SessionSecret: xtN8nSecret})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	origins, err := guard.ParseOrigins([]string{xtOrigin})
	if err != nil {
		t.Fatal(err)
	}
	h := New(Config{
		Prefix:           "/api/v1",
		Origins:          origins,
		Sessions:         &sessions.Manager{Store: store, Tokens: sessions.NewTokens([]byte(xtJWTSecret), nil), TTL: time.Hour},
		Store:            store,
		Cookie:           Cookie{Name: "chat_session", SameSite: http.SameSiteLaxMode},
		MaxBodySize:      64 << 10,
		Logger:           zap.NewNop(),
		Limiter:          limiter,
		Bots:             bots,
		Upstream:         client,
		MaxMessageLength: 4000,
	})
	return &countedEnv{h: h, store: store}
}

// serve sends a request from ip with the allowed Origin, a browser
// User-Agent and a JSON body.
func (e *countedEnv) serve(t *testing.T, ip, method, path, body string, headers map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, "http://api.example.net"+path, strings.NewReader(body))
	r.Header.Set("User-Agent", xtBrowserUA)
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Origin", xtOrigin)
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), rec, nil)
	caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, ip)
	if err := e.h.ServeHTTP(rec, r, caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	return rec
}

func widgetSendBody(sessionID, text string) string {
	return fmt.Sprintf(`{"action":"sendMessage","sessionId":%q,"chatInput":%q}`, sessionID, text)
}

// A client that has spent its ip budget is refused before the store is
// touched, on every chat route: flooding the @n8n/chat route with new
// sessionIds, or sending with the token of a young session (whose row the
// bot filter needs), costs no database work (issue 11 item 7).
func TestRateLimitBeforeAnyStoreAccess(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			// The bot filter's first-message check makes a young session's
			// message read its row.
			bots, err := guard.NewBotScorer(guard.BotConfig{MinFirstMessageDelay: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			e := newCountedEnv(t, kind, map[guard.Tier][]redis_rate.Limit{
				guard.TierIP: {redis_rate.PerMinute(2)}, guard.TierCreate: {redis_rate.PerMinute(100)},
			}, bots)

			// A session, created from another address, then this client's
			// whole ip budget spent on widget messages.
			rec := e.serve(t, "198.51.100.2", "POST", "/api/v1/session/create", `{}`, nil)
			if rec.Code != http.StatusCreated {
				t.Fatalf("create: %d %s", rec.Code, rec.Body)
			}
			token := decodeJSON[createSessionResponse](t, rec).Token
			const ip = "198.51.100.1"
			for i := range 2 {
				if rec := e.serve(t, ip, "POST", "/api/v1/n8n/chat", widgetSendBody(fmt.Sprintf("budget-session-%d", i), "hello"), nil); rec.Code != http.StatusOK {
					t.Fatalf("widget message %d: %d %s", i, rec.Code, rec.Body)
				}
			}

			e.store.reset()
			for i := range 20 {
				if rec := e.serve(t, ip, "POST", "/api/v1/n8n/chat", widgetSendBody(fmt.Sprintf("flood-session-%d", i), "hello"), nil); rec.Code != http.StatusTooManyRequests {
					t.Fatalf("flood %d: %d %s, want 429", i, rec.Code, rec.Body)
				}
			}
			for _, path := range []string{"/api/v1/chat/message", "/api/v1/chat/stream"} {
				if rec := e.serve(t, ip, "POST", path, `{"message":"hello"}`, map[string]string{"Authorization": "Bearer " + token}); rec.Code != http.StatusTooManyRequests {
					t.Fatalf("%s: %d %s, want 429", path, rec.Code, rec.Body)
				}
			}
			if calls := e.store.snapshot(); len(calls) != 0 {
				t.Fatalf("store calls for requests refused by the ip tier: %v, want none", calls)
			}
		})
	}
}

// A new @n8n/chat conversation costs a place of the create tier, charged
// before the insert that creates it: once the tier is spent, new
// sessionIds get 429 (tier create) and nothing is created, while the
// conversations that exist go on. The headers show the tightest window of
// both checks.
func TestWidgetNewConversationChargesCreateTier(t *testing.T) {
	e := newCountedEnv(t, "sqlite", map[guard.Tier][]redis_rate.Limit{
		guard.TierIP: {redis_rate.PerMinute(100)}, guard.TierCreate: {redis_rate.PerMinute(2)},
	}, nil)
	const ip = "198.51.100.5"
	for i, want := range []string{"1", "0"} {
		rec := e.serve(t, ip, "POST", "/api/v1/n8n/chat", widgetSendBody(fmt.Sprintf("conversation-%d", i), "hello"), nil)
		if rec.Code != http.StatusOK || rec.Header().Get("RateLimit-Limit") != "2" || rec.Header().Get("RateLimit-Remaining") != want {
			t.Fatalf("conversation %d: %d limit %q remaining %q, want 200 with the create tier's 2/%s", i, rec.Code,
				rec.Header().Get("RateLimit-Limit"), rec.Header().Get("RateLimit-Remaining"), want)
		}
	}
	e.store.reset()
	rec := e.serve(t, ip, "POST", "/api/v1/n8n/chat", widgetSendBody("conversation-2", "hello"), nil)
	if rec.Code != http.StatusTooManyRequests || decodeJSON[guard.RateLimitBody](t, rec).Tier != guard.TierCreate {
		t.Fatalf("third new conversation: %d %s, want 429 for the create tier", rec.Code, rec.Body)
	}
	// Without the bot filter the message's insert is tried first (it
	// finds no conversation and stores nothing); nothing is created.
	if calls := e.store.snapshot(); calls["CreateSession"] != 0 || calls["AppendUserMessage"] > 1 {
		t.Fatalf("a conversation refused by the create tier reached the store: %v", calls)
	}
	// An existing conversation is not a creation; its headers show the
	// ip tier, the only one it counts against besides session and domain.
	rec = e.serve(t, ip, "POST", "/api/v1/n8n/chat", widgetSendBody("conversation-0", "again"), nil)
	if rec.Code != http.StatusOK || rec.Header().Get("RateLimit-Limit") != "100" {
		t.Fatalf("existing conversation: %d %s limit %q", rec.Code, rec.Body, rec.Header().Get("RateLimit-Limit"))
	}
}

func decodeJSON[T any](t *testing.T, rec *httptest.ResponseRecorder) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(rec.Body.Bytes(), &v); err != nil {
		t.Fatalf("decoding %s: %v", rec.Body, err)
	}
	return v
}

// The store work of one message on a session that exists: the visitor's
// message (whose insert confirms the session is active) and the reply,
// with a widget conversation's expiry slide sent beside the reply; no
// session read, whatever the kind of session, unless the bot filter needs
// the session's age and message count (issue 13 item 2).
func TestMessageStoreCalls(t *testing.T) {
	oldBots, err := guard.NewBotScorer(guard.BotConfig{MinFirstMessageDelay: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		bots    *guard.BotScorer
		widget  bool
		reads   int
		touches int
	}{
		{"visitor session", nil, false, 0, 0},
		{"widget conversation", nil, true, 0, 1},
		{"widget conversation, bot filter on", oldBots, true, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newCountedEnv(t, "sqlite", nil, tc.bots)
			send := func() *httptest.ResponseRecorder {
				if tc.widget {
					return e.serve(t, "198.51.100.7", "POST", "/api/v1/n8n/chat", widgetSendBody("counted-conversation", "hello"), map[string]string{"Accept": "application/json"})
				}
				return nil
			}
			var token string
			if !tc.widget {
				rec := e.serve(t, "198.51.100.7", "POST", "/api/v1/session/create", `{}`, nil)
				if rec.Code != http.StatusCreated {
					t.Fatalf("create: %d %s", rec.Code, rec.Body)
				}
				token = decodeJSON[createSessionResponse](t, rec).Token
				send = func() *httptest.ResponseRecorder {
					return e.serve(t, "198.51.100.7", "POST", "/api/v1/chat/message", `{"message":"hello"}`,
						map[string]string{"Authorization": "Bearer " + token, "Accept": "application/json"})
				}
			}
			if rec := send(); rec.Code != http.StatusOK {
				t.Fatalf("first message: %d %s", rec.Code, rec.Body)
			}
			time.Sleep(5 * time.Millisecond) // past the bot filter's first-message delay
			e.store.reset()
			if rec := send(); rec.Code != http.StatusOK {
				t.Fatalf("second message: %d %s", rec.Code, rec.Body)
			}
			// Two writes either way: a chat API reply's row is stored
			// (streaming) with the message and finished at the end.
			want := map[string]int{"AppendUserMessage": 1, "AppendMessage": 1}
			if !tc.widget {
				want = map[string]int{"AppendExchange": 1, "FinishReply": 1}
			}
			if tc.reads > 0 {
				want["GetSession"] = tc.reads
			}
			if tc.touches > 0 {
				want["TouchSession"] = tc.touches
			}
			if got := e.store.snapshot(); !maps.Equal(got, want) {
				t.Errorf("store calls for a message: %v, want %v", got, want)
			}
		})
	}
}
