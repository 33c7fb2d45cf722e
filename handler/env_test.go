package handler_test

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/replies"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

const (
	testJWTSecret     = "test-visitor-jwt-secret-0123456789abcdef"
	testSessionSecret = "test-n8n-session-secret-0123456789abcdef"
	allowedOrigin     = "https://shop.example.com"
	passedOn          = 299 // status the next handler answers with
)

// defaultSessionTTL is the module's session_ttl default.
const defaultSessionTTL = 7 * 24 * time.Hour

// storeKinds are the stores every route test runs against.
var storeKinds = []string{"sqlite", "postgres"}

// chatUA is a real browser's User-Agent: chat requests carry one, so the
// bot filter has nothing to say about them.
const chatUA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"

// chatClientIP is the client_ip the test servers set, as Caddy would.
const chatClientIP = "203.0.113.7"

// envConfig is what the route tests vary, starting from what the module
// configures by default (see newChatEnv).
type envConfig struct {
	// Database is a store kind ("sqlite", "postgres") or a PostgreSQL URL.
	Database string
	// Upstream configures the n8n client; WebhookURL is the fake's.
	Upstream n8n.Config
	// Bots turns the bot filter on (the module's default, threshold 50).
	Bots bool
	// Limits are the rate-limit tiers; generous by default, since tests
	// about other things make many requests from one address.
	Limits             map[guard.Tier][]redis_rate.Limit
	MaxMessageLength   int
	MaxBodySize        int64
	FinishOnDisconnect bool
	// BotThreshold is the bot filter's threshold; zero is the default.
	BotThreshold int
	// Redis is a redis:// URL for the limiter's state; empty keeps it in
	// process. RedisTimeout bounds each call (the limiter's default when
	// zero).
	Redis        string
	RedisTimeout time.Duration
	// SQLitePath is the embedded store's file (Database "sqlite"); empty:
	// a new one. Two handlers given one path share a store, as two
	// instances would.
	SQLitePath string
	// WaitTimeout is wait_timeout (zero: the default).
	WaitTimeout time.Duration
	// Drain is the handler's drain; nil: a new one.
	Drain *handler.Drain
	// Uploads is the uploads block; nil: absent.
	Uploads *upload.Config

	// Push turns pushed messages on (see push_test.go); nil: off.
	Push *pushConfig
	// IdentitySecret turns verified visitors on (identity_secret).
	IdentitySecret string
	// Logger receives the handler's log; nil discards it.
	Logger     *zap.Logger
	LogContent bool
	// Store, when set, is used instead of a fresh store of Database (a
	// second instance on the first one's database).
	Store sessions.Store
	// Replies is the live-reply hub; nil: the handler's own, in process.
	Replies *replies.Hub
	// DetachedTimeout is handler.Config's (zero: a reply stops when its
	// last client leaves).
	DetachedTimeout time.Duration
}

// defaultEnvConfig is the module's default configuration in front of n8n
// at webhook.
func defaultEnvConfig(webhook string) envConfig {
	return envConfig{
		Upstream: n8n.Config{
			WebhookURL:    webhook,
			SessionSecret: testSessionSecret,
			Auth:          n8n.Auth{Mode: n8n.AuthJWT},
		},
		Bots:             true,
		Limits:           generousLimits(),
		MaxMessageLength: 4000,
		MaxBodySize:      64 << 10,
	}
}

// limitsOver returns base with the given tiers replaced, as
// `rate_limit <tier> <rate>...` does over the defaults.
func limitsOver(base map[guard.Tier][]redis_rate.Limit, tiers map[string][]string) map[guard.Tier][]redis_rate.Limit {
	l := maps.Clone(base)
	for name, rates := range tiers {
		l[guard.Tier(name)] = nil
		for _, r := range rates {
			lim, err := guard.ParseRate(r)
			if err != nil {
				panic(err)
			}
			l[guard.Tier(name)] = append(l[guard.Tier(name)], lim)
		}
	}
	return l
}

// botDetection reads a bot_detection value ("" for the default).
func botDetection(t *testing.T, v string) (bool, int) {
	t.Helper()
	if v == "" {
		return true, 0
	}
	on, threshold, err := guard.ParseBotDetection(v)
	if err != nil {
		t.Fatal(err)
	}
	return on, threshold
}

func generousLimits() map[guard.Tier][]redis_rate.Limit {
	l := map[guard.Tier][]redis_rate.Limit{}
	for _, tier := range guard.Tiers() {
		l[tier] = []redis_rate.Limit{redis_rate.PerMinute(100000)}
	}
	return l
}

// newHandler builds the handler as the module does, from a handler.Config
// with a real store, limiter, bot filter and n8n client.
func newHandler(t *testing.T, c envConfig) (*handler.Handler, sessions.Store) {
	t.Helper()
	var store sessions.Store
	var err error
	switch {
	case c.Store != nil:
		store = c.Store
	case c.Database == "", c.Database == "sqlite":
		path := c.SQLitePath
		if path == "" {
			path = filepath.Join(t.TempDir(), "chat.db")
		}
		store, err = sessions.OpenSQLite(path)
	case c.Database == "postgres":
		store, err = sessions.OpenPostgres(testenv.PostgresURL(t))
	default:
		store, err = sessions.OpenPostgres(c.Database)
	}
	if err != nil {
		t.Fatal(err)
	}
	if c.Store == nil {
		t.Cleanup(func() { _ = store.Close() })
	}
	// A hash key of its own keeps this handler's budgets apart from every
	// other test's in the shared Redis.
	lc := guard.LimiterConfig{Limits: c.Limits, HashKey: []byte(rand.Text()), RedisTimeout: c.RedisTimeout}
	var rdb *redis.Client
	if c.Redis != "" {
		opts, err := guard.RedisOptions(c.Redis)
		if err != nil {
			t.Fatal(err)
		}
		rdb = redis.NewClient(opts)
		t.Cleanup(func() { _ = rdb.Close() })
		lc.Redis = rdb
	}
	limiter, err := guard.NewLimiter(lc)
	if err != nil {
		t.Fatal(err)
	}
	var bots *guard.BotScorer
	if c.Bots {
		if bots, err = guard.NewBotScorer(guard.BotConfig{Threshold: c.BotThreshold, Repeats: limiter}); err != nil {
			t.Fatal(err)
		}
	}
	upstream, err := n8n.New(c.Upstream)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = upstream.Close() })
	allowed := []string{allowedOrigin, "https://*.example.org"}
	origins, err := guard.ParseOrigins(allowed)
	if err != nil {
		t.Fatal(err)
	}
	hc := handler.Config{
		Prefix:  "/api/v1",
		Origins: origins,
		Sessions: &sessions.Manager{
			Store:  store,
			Tokens: sessions.NewTokensFor([]byte(testJWTSecret), sessions.BlockAudience(c.Upstream.WebhookURL), nil),
			TTL:    defaultSessionTTL,
		},
		Store:              store,
		Cookie:             handler.Cookie{Name: "chat_session", SameSite: http.SameSiteLaxMode},
		MaxBodySize:        c.MaxBodySize,
		Logger:             zap.NewNop(),
		Limiter:            limiter,
		Bots:               bots,
		Upstream:           upstream,
		MaxMessageLength:   c.MaxMessageLength,
		FinishOnDisconnect: c.FinishOnDisconnect,
		Drain:              handler.NewDrain(),
		Replies:            c.Replies,
		DetachedTimeout:    c.DetachedTimeout,
		Metrics:            metrics.NewRecorder("n8n-handler-test", allowed),
		MetricsAllow:       []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		WaitTimeout:        c.WaitTimeout,
	}
	if rdb != nil {
		hc.Redis = rdb
	}
	if c.Drain != nil {
		hc.Drain = c.Drain
	}
	if c.Uploads != nil {
		u := *c.Uploads
		u.TempDir = t.TempDir()
		if hc.Uploads, err = upload.NewParser(u); err != nil {
			t.Fatal(err)
		}
	}
	if c.Push != nil {
		c.Push.apply(t, &hc)
	}
	if c.IdentitySecret != "" {
		if hc.Identity, err = identity.NewVerifier([]byte(c.IdentitySecret), nil); err != nil {
			t.Fatal(err)
		}
	}
	if c.Logger != nil {
		hc.Logger = c.Logger
	}
	hc.LogContent = c.LogContent
	return handler.New(hc), store
}

// chatEnv is a handler in front of the fake n8n, reachable both through
// serve (a recorder) and over real HTTP (srv), so streaming tests can read
// the client side incrementally.
type chatEnv struct {
	fake     *testkit.N8n
	h        *handler.Handler
	audience string // the visitor tokens' audience (sessions.BlockAudience)
	store    sessions.Store
	srv      *httptest.Server
	client   *http.Client

	live    *testkit.Live        // the live server: srv, client and reqCtxs are its
	reqCtxs chan context.Context // each live request's context, in arrival order
}

type chatEnvOpts struct {
	kind   string // store kind; default sqlite
	mutate func(*envConfig)
	encode bool // wrap the handler in Caddy's `encode gzip zstd`
	// fake is the n8n to use instead of a new one: a second instance of
	// the same site (same webhook, so the same token audience).
	fake *testkit.N8n
}

func newChatEnv(t *testing.T, o chatEnvOpts) *chatEnv {
	t.Helper()
	e := &chatEnv{fake: o.fake}
	if e.fake == nil {
		e.fake = testkit.NewN8n(t, nil)
		e.fake.RequireJWT(testSessionSecret)
	}
	c := defaultEnvConfig(e.fake.URL())
	c.Database = o.kind
	if o.mutate != nil {
		o.mutate(&c)
	}
	e.h, e.store = newHandler(t, c)
	e.audience = sessions.BlockAudience(c.Upstream.WebhookURL)
	e.live = testkit.NewLive(t, e.h, testkit.LiveOptions{ClientIP: chatClientIP, UserAgent: chatUA, PassedOn: passedOn, Encode: o.encode})
	e.srv, e.client, e.reqCtxs = e.live.Server, e.live.Client, e.live.ReqCtxs
	t.Cleanup(e.fake.Release) // runs first: no handler waits on the fake
	return e
}

// serve sends a request through the module with a recorder (see serve);
// a browser User-Agent is set unless headers say otherwise.
func (e *chatEnv) serve(t *testing.T, method, path, body string, headers map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	h := map[string]string{"User-Agent": chatUA}
	maps.Copy(h, headers)
	return serve(t, e.h, req{method: method, path: path, body: body, headers: h})
}

// do sends a request to the live server; the response body is closed at
// the end of the test.
func (e *chatEnv) do(t *testing.T, method, path, body string, headers map[string]string) *http.Response {
	t.Helper()
	return e.live.Do(t, method, path, body, headers)
}

func (e *chatEnv) doCtx(t *testing.T, ctx context.Context, method, path, body string, headers map[string]string) *http.Response {
	t.Helper()
	return e.live.DoCtx(t, ctx, method, path, body, headers)
}

// waitIdle waits until the live server has finished every request, so
// what a handler stores after the client saw the end is in the store.
func (e *chatEnv) waitIdle(t *testing.T) {
	t.Helper()
	e.live.WaitIdle(t)
}

// newSession creates a visitor session from the allowed origin with the
// browser User-Agent.
func (e *chatEnv) newSession(t *testing.T) created {
	t.Helper()
	rec := e.serve(t, "POST", "/api/v1/session/create", `{"page_url":"https://shop.example.com/p/1"}`,
		map[string]string{"Origin": allowedOrigin})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	return decode[created](t, rec)
}

// authz is the bearer header for token plus extra header pairs.
func authz(token string, kv ...string) map[string]string {
	h := map[string]string{"Authorization": "Bearer " + token}
	for i := 0; i+1 < len(kv); i += 2 {
		h[kv[i]] = kv[i+1]
	}
	return h
}

func (e *chatEnv) history(t *testing.T, token string) historyBody {
	t.Helper()
	rec := e.serve(t, "GET", "/api/v1/chat/history", "", authz(token))
	if rec.Code != http.StatusOK {
		t.Fatalf("history: %d %s", rec.Code, rec.Body)
	}
	return decode[historyBody](t, rec)
}

func (e *chatEnv) messageCount(t *testing.T, token string) int {
	t.Helper()
	rec := e.serve(t, "GET", "/api/v1/session/validate", "", authz(token))
	if rec.Code != http.StatusOK {
		t.Fatalf("validate: %d %s", rec.Code, rec.Body)
	}
	return decode[struct {
		MessageCount int `json:"message_count"`
	}](t, rec).MessageCount
}

// wantExchange checks that the history holds exactly the user's message
// and an assistant reply with the given content and status.
func wantExchange(t *testing.T, h historyBody, user, reply, status string) {
	t.Helper()
	if len(h.Messages) != 2 || h.TotalCount != 2 {
		t.Fatalf("history has %d messages (total %d), want 2: %+v", len(h.Messages), h.TotalCount, h.Messages)
	}
	u, a := h.Messages[0], h.Messages[1]
	if u.Role != "user" || u.Content != user || u.Status != "complete" {
		t.Fatalf("user message = %+v, want %q complete", u, user)
	}
	if a.Role != "assistant" || a.Content != reply || a.Status != status {
		t.Fatalf("assistant message = %+v, want %q with status %s", a, reply, status)
	}
}

// The stream readers are testkit's, under the names these tests use.
var (
	nextSSE       = testkit.NextSSE
	eventJSON     = testkit.EventJSON
	itemOf        = testkit.ItemOf
	wantBegin     = testkit.WantBegin
	afterBegin    = testkit.AfterBegin
	wantEndDone   = testkit.WantEndDone
	replyEvents   = testkit.ReplyEvents
	wantDone      = testkit.WantDone
	nextNDJSON    = testkit.NextNDJSON
	wantStreamEnd = testkit.WantStreamEnd
)

type req struct {
	method, path string
	body         string
	headers      map[string]string
}

// serve sends one request through the provisioned module as Caddy's server
// would, with the client_ip var set.
func serve(t *testing.T, h caddyhttp.MiddlewareHandler, rq req) *httptest.ResponseRecorder {
	t.Helper()
	rec, err := testkit.Serve(h, testkit.Request{Method: rq.method, Path: rq.path, Body: rq.body, ClientIP: "203.0.113.7", Headers: rq.headers}, passedOn)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// serveRecorded is serve for other goroutines: a handler error becomes a
// 599 response instead of a t.Fatalf.

func decode[T any](t *testing.T, rec *httptest.ResponseRecorder) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(rec.Body.Bytes(), &v); err != nil {
		t.Fatalf("decoding %q: %v", rec.Body.String(), err)
	}
	return v
}

type created struct {
	SessionID string `json:"session_id"`
	Token     string `json:"token"`
	ExpiresAt string `json:"expires_at"`
}

type apiErr struct {
	Error   string `json:"error"`
	Message string `json:"message"`
}

func wantError(t *testing.T, rec *httptest.ResponseRecorder, status int, code string) {
	t.Helper()
	if rec.Code != status {
		t.Fatalf("status = %d, want %d; body %s", rec.Code, status, rec.Body)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json; charset=utf-8" {
		t.Fatalf("Content-Type = %q", ct)
	}
	e := decode[apiErr](t, rec)
	if e.Error != code || e.Message == "" {
		t.Fatalf("error body = %+v, want code %q", e, code)
	}
}

type historyBody struct {
	SessionID string `json:"session_id"`
	Messages  []struct {
		ID        string `json:"id"`
		Role      string `json:"role"`
		Content   string `json:"content"`
		CreatedAt string `json:"created_at"`
		Status    string `json:"status"`
	} `json:"messages"`
	TotalCount int  `json:"total_count"`
	HasMore    bool `json:"has_more"`
}

func bearer(token string) map[string]string {
	return map[string]string{"Authorization": "Bearer " + token}
}

// newTestProxy builds a handler as the module would, on a fresh store of
// the given kind, in front of an n8n nothing listens for.
func newTestProxy(t *testing.T, kind string, mutate func(*envConfig)) *grHandler {
	t.Helper()
	return grProxy(t, "", func(c *envConfig) {
		c.Database = kind
		if mutate != nil {
			mutate(c)
		}
	})
}

func createSession(t *testing.T, h caddyhttp.MiddlewareHandler) created {
	t.Helper()
	rec := serve(t, h, req{method: "POST", path: "/api/v1/session/create", body: `{"page_url":"https://shop.example.com/p/1"}`,
		headers: map[string]string{"Origin": allowedOrigin}})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	return decode[created](t, rec)
}

// serveRecorded is serve for goroutines: a failing ServeHTTP shows as 599.
func serveRecorded(h caddyhttp.MiddlewareHandler, rq req) *httptest.ResponseRecorder {
	rec, err := testkit.Serve(h, testkit.Request{Method: rq.method, Path: rq.path, Body: rq.body, ClientIP: "203.0.113.7", Headers: rq.headers}, passedOn)
	if err != nil {
		rec.Code = 599
	}
	return rec
}
