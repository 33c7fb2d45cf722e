package chatproxy

// Helpers of the root package's tests: a provisioned chat_proxy
// (newTestProxy, newChatEnv), requests through it (serve), and the shared
// fake n8n under the names these tests use. Route behaviour is tested in
// handler/; here are Provision, the Caddyfile, reload, shutdown, drills
// and multi-instance tests.

import (
	"context"
	"encoding/json"
	"maps"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

const (
	testJWTSecret     = "test-visitor-jwt-secret-0123456789abcdef"
	testSessionSecret = "test-n8n-session-secret-0123456789abcdef"
	allowedOrigin     = "https://shop.example.com"
	passedOn          = 299 // status the next handler answers with
)

// storeKinds are the stores every route test runs against.
var storeKinds = []string{"sqlite", "postgres"}

// newTestProxy provisions a chat_proxy exactly as Caddy would, on a fresh
// store of the given kind.
func newTestProxy(t *testing.T, kind string, mutate func(*ChatProxy)) *ChatProxy {
	t.Helper()
	cp := &ChatProxy{
		N8nWebhook:     "http://127.0.0.1:9/webhook/chat",
		JWTSecret:      testJWTSecret,
		SessionSecret:  testSessionSecret,
		AllowedOrigins: []string{allowedOrigin, "https://*.example.org"},
		// Tests about other things make many requests from one address.
		RateLimits: generousLimits(),
	}
	switch kind {
	case "sqlite":
		cp.Database = "sqlite:" + t.TempDir() + "/chat.db"
	case "postgres":
		cp.Database = testenv.PostgresURL(t)
	default:
		t.Fatalf("unknown store kind %q", kind)
	}
	if mutate != nil {
		mutate(cp)
	}
	provision(t, cp)
	return cp
}

func generousLimits() map[string][]guard.Rate {
	return testRates(map[string][]string{"ip": {"100000/1m"}, "session": {"100000/1m"}, "domain": {"100000/1m"}, "create": {"100000/1m"}, "user": {"100000/1m"}})
}

func provision(t *testing.T, cp *ChatProxy) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := cp.Provision(ctx); err != nil {
		t.Fatalf("provision: %v", err)
	}
	if err := cp.Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	t.Cleanup(func() {
		if err := cp.Cleanup(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

type req struct {
	method, path string
	body         string
	headers      map[string]string
}

// serve sends one request through the provisioned module as Caddy's server
// would, with the client_ip var set.
func serve(t *testing.T, cp *ChatProxy, rq req) *httptest.ResponseRecorder {
	t.Helper()
	rec, err := testkit.Serve(cp, testkit.Request{Method: rq.method, Path: rq.path, Body: rq.body, ClientIP: "203.0.113.7", Headers: rq.headers}, passedOn)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// serveRecorded is serve for other goroutines: a handler error becomes a
// 599 response instead of a t.Fatalf.
func serveRecorded(cp *ChatProxy, rq req) *httptest.ResponseRecorder {
	rec, err := testkit.Serve(cp, testkit.Request{Method: rq.method, Path: rq.path, Body: rq.body, ClientIP: "203.0.113.7", Headers: rq.headers}, passedOn)
	if err != nil {
		rec.Code = 599
	}
	return rec
}

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

func createSession(t *testing.T, cp *ChatProxy) created {
	t.Helper()
	rec := serve(t, cp, req{method: "POST", path: "/api/v1/session/create", body: `{"page_url":"https://shop.example.com/p/1"}`,
		headers: map[string]string{"Origin": allowedOrigin}})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	return decode[created](t, rec)
}

func bearer(token string) map[string]string {
	return map[string]string{"Authorization": "Bearer " + token}
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

// chatUA is a real browser's User-Agent: chat requests carry one, so the
// bot filter has nothing to say about them.
const chatUA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"

// chatClientIP is the client_ip the test servers set, as Caddy would.
const chatClientIP = "203.0.113.7"

// chatEnv is a provisioned chat_proxy in front of a fake n8n, reachable
// both through serve (a recorder) and over real HTTP (srv), so streaming
// tests can read the client side incrementally.
type chatEnv struct {
	fake   *n8nFake
	cp     *ChatProxy
	store  sessions.Store
	srv    *httptest.Server
	client *http.Client

	live    *testkit.Live        // the live server: srv, client and reqCtxs are its
	reqCtxs chan context.Context // each live request's context, in arrival order
}

type chatEnvOpts struct {
	kind   string // store kind; default sqlite
	mutate func(*ChatProxy)
	encode bool // wrap the module in Caddy's `encode gzip zstd`
}

func newChatEnv(t *testing.T, o chatEnvOpts) *chatEnv {
	t.Helper()
	if o.kind == "" {
		o.kind = "sqlite"
	}
	e := &chatEnv{fake: newN8nFake(t, nil)}
	e.fake.requireJWT(testSessionSecret)
	e.cp = newTestProxy(t, o.kind, func(cp *ChatProxy) {
		cp.N8nWebhook = e.fake.URL()
		if o.mutate != nil {
			o.mutate(cp)
		}
	})
	e.store = e.cp.handlerStore()
	e.live = testkit.NewLive(t, e.cp, testkit.LiveOptions{ClientIP: chatClientIP, UserAgent: chatUA, PassedOn: passedOn, Encode: o.encode})
	e.srv, e.client, e.reqCtxs = e.live.Server, e.live.Client, e.live.ReqCtxs
	t.Cleanup(e.fake.release) // runs first: no handler waits on the fake
	return e
}

// serve sends a request through the module with a recorder (see serve);
// a browser User-Agent is set unless headers say otherwise.
func (e *chatEnv) serve(t *testing.T, method, path, body string, headers map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	h := map[string]string{"User-Agent": chatUA}
	maps.Copy(h, headers)
	return serve(t, e.cp, req{method: method, path: path, body: body, headers: h})
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
	afterBegin    = testkit.AfterBegin
	wantEndDone   = testkit.WantEndDone
	replyEvents   = testkit.ReplyEvents
	wantDone      = testkit.WantDone
	nextNDJSON    = testkit.NextNDJSON
	wantStreamEnd = testkit.WantStreamEnd
)

type healthBody struct {
	Status string `json:"status"`
	Checks map[string]struct {
		Status string `json:"status"`
	} `json:"checks"`
}

func (e *chatEnv) health(t *testing.T) (int, healthBody) {
	t.Helper()
	rec := e.serve(t, "GET", "/health", "", nil)
	return rec.Code, decode[healthBody](t, rec)
}

// lcMessage is a LangChain-serialised message as @n8n/chat reads it.
type lcMessage struct {
	LC     int            `json:"lc"`
	Type   string         `json:"type"`
	ID     []string       `json:"id"`
	Kwargs map[string]any `json:"kwargs"`
}

// widgetLoad sends the widget's loadPreviousSession exactly as @n8n/chat
// does and returns the data.
func (e *chatEnv) widgetLoad(t *testing.T, origin, sessionID string) []lcMessage {
	t.Helper()
	rec := e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"loadPreviousSession","sessionId":"`+sessionID+`","metadata":{}}`,
		map[string]string{"Origin": origin, "Content-Type": "application/json"})
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Fatalf("loadPreviousSession: %d %s", rec.Code, rec.Body)
	}
	var body struct {
		Data []lcMessage `json:"data"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Data == nil {
		t.Fatalf("loadPreviousSession body %s: %v", rec.Body, err)
	}
	return body.Data
}

// n8nFake is the shared fake n8n (testkit.N8n) under the names the root
// tests use.
type n8nFake struct {
	*testkit.N8n
	srv *httptest.Server
}

type (
	n8nScript = testkit.Script
	n8nCall   = testkit.Call
)

const (
	fakeWebhookPath = testkit.WebhookPath
	fakeWaitLimit   = testkit.WaitLimit
	n8nKeepalive    = testkit.N8nKeepalive
)

func newN8nFake(t *testing.T, script n8nScript) *n8nFake {
	f := testkit.NewN8n(t, script)
	return &n8nFake{N8n: f, srv: f.Server()}
}

func (f *n8nFake) setScript(s n8nScript)      { f.SetScript(s) }
func (f *n8nFake) requireJWT(secret string)   { f.RequireJWT(secret) }
func (f *n8nFake) release()                   { f.Release() }
func (f *n8nFake) last(t *testing.T) *n8nCall { t.Helper(); return f.Last(t) }
func (f *n8nFake) fakeHang() n8nScript        { return f.Hanging() }
func (f *n8nFake) fakeGated(g *streamGate, gzipped bool, items ...string) n8nScript {
	return f.Gated(g.StreamGate, gzipped, items...)
}

// streamGate is testkit.StreamGate under the root tests' names.
type streamGate struct{ *testkit.StreamGate }

func newStreamGate() *streamGate { return &streamGate{testkit.NewStreamGate()} }

func (g *streamGate) next(t *testing.T) { t.Helper(); g.Next(t) }

func (f *n8nFake) fakeThen(first string, gate <-chan struct{}, after func(w http.ResponseWriter, r *http.Request)) n8nScript {
	return f.Then(first, gate, after)
}

var (
	fakeReply     = testkit.Reply
	fakeOutput    = testkit.Output
	fakeStream    = testkit.Stream
	n8nLine       = testkit.N8nLine
	n8nStreamHead = testkit.N8nStreamHead
	fakeFlush     = testkit.Flush
)

func closedURL(t *testing.T) string { t.Helper(); return testkit.ClosedURL(t) }

func awaitSignal(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	testkit.AwaitSignal(t, ch, what)
}

// handlerStore exposes the provisioned store to tests.
func (cp *ChatProxy) handlerStore() sessions.Store {
	if cp.store == nil {
		panic("store not acquired")
	}
	return cp.store.Store
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
