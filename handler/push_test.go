package handler_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/chatproxy/caddy-chatproxy/events"
	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/signed"
)

const testPushSecret = "test-push-secret-0123456789abcdef-push"

// pushConfig turns pushed messages on in a test handler, as the module's
// provisionPush does.
type pushConfig struct {
	Secret string
	// Redis carries replays and events across instances; nil: in process.
	Redis *redis.Client
	// Channel is the events channel, unique per test on the shared Redis.
	Channel        string
	HandoffURL     string
	HandoffTimeout time.Duration
	// Hub is set by apply: the handler's events hub.
	Hub *events.Hub
}

func (p *pushConfig) apply(t *testing.T, hc *handler.Config) {
	var rdb redis.UniversalClient
	if p.Redis != nil {
		rdb = p.Redis
	}
	hc.Push = &signed.Verifier{Secret: []byte(p.Secret), Replay: signed.NewReplay(rdb, p.Channel+":sig")}
	p.Hub = events.New(rdb, p.Channel, nil)
	t.Cleanup(p.Hub.Close)
	hc.Events = p.Hub
	hc.HandoffURL = p.HandoffURL
	hc.HandoffTimeout = p.HandoffTimeout
}

// pushRedis is a client for the shared test Redis and a channel name of
// this test's own; the replay keys under it are removed at the end.
func pushRedis(t *testing.T) (*redis.Client, string) {
	t.Helper()
	opts, err := guard.RedisOptions(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	channel := "chatproxy-test-" + strings.ToLower(rand.Text()[:12])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if keys, _ := rdb.Keys(ctx, channel+":*").Result(); len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
		_ = rdb.Close()
	})
	return rdb, channel
}

// pushEnv is a chat environment with pushes on (in process unless p has
// a Redis client).
func pushEnv(t *testing.T, kind string, p *pushConfig, mutate func(*envConfig)) *chatEnv {
	t.Helper()
	return newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) {
		c.Push = p
		if mutate != nil {
			mutate(c)
		}
	}})
}

// signedHeaders signs body with secret at time at.
func signedHeaders(secret, body string, at time.Time) map[string]string {
	ts, sig := signed.Sign([]byte(secret), []byte(body), at)
	return map[string]string{signed.HeaderTimestamp: ts, signed.HeaderSignature: sig}
}

// push sends a signed push to the session.
func (e *chatEnv) push(t *testing.T, sessionID, body string) *httptest.ResponseRecorder {
	t.Helper()
	return e.serve(t, "POST", "/api/v1/sessions/"+sessionID+"/messages", body, signedHeaders(testPushSecret, body, time.Now()))
}

type pushResp struct {
	SessionID string `json:"session_id"`
	Mode      string `json:"mode"`
	Message   *struct {
		ID, Role, Content, Status string
		CreatedAt                 string `json:"created_at"`
	} `json:"message"`
}

type modeBody struct {
	Mode         string `json:"mode"`
	MessageCount int    `json:"message_count"`
}

func (e *chatEnv) mode(t *testing.T, token string) string {
	t.Helper()
	rec := e.serve(t, "GET", "/api/v1/session/validate", "", authz(token))
	if rec.Code != http.StatusOK {
		t.Fatalf("validate: %d %s", rec.Code, rec.Body)
	}
	return decode[modeBody](t, rec).Mode
}

// TestPushSignatureMatrix: only a request signed with push_secret, fresh
// and not seen before, is stored; every other gets 401 and stores
// nothing, on one instance and on a second one sharing Redis.
func TestPushSignatureMatrix(t *testing.T) {
	rdb, channel := pushRedis(t)
	pg := testenv.PostgresURL(t)
	a := pushEnv(t, pg, &pushConfig{Secret: testPushSecret, Redis: rdb, Channel: channel}, nil)
	b := newChatEnv(t, chatEnvOpts{kind: pg, fake: a.fake, mutate: func(c *envConfig) {
		c.Push = &pushConfig{Secret: testPushSecret, Redis: rdb, Channel: channel}
	}})
	s := a.newSession(t)
	path := "/api/v1/sessions/" + s.SessionID + "/messages"
	body := `{"content":"Hi, I'm Ana from support.","role":"agent"}`
	now := time.Now()
	good := signedHeaders(testPushSecret, body, now)
	stored := 0
	tests := []struct {
		name    string
		env     *chatEnv
		body    string
		headers map[string]string
		want    int
	}{
		{"good", a, body, good, http.StatusCreated},
		{"replay on the same instance", a, body, good, http.StatusUnauthorized},
		{"replay on another instance sharing Redis", b, body, good, http.StatusUnauthorized},
		{"wrong secret", a, body, signedHeaders("another-secret-0123456789abcdef-xxxx", body, now), http.StatusUnauthorized},
		{"tampered body", a, strings.Replace(body, "Ana", "Eve", 1), signedHeaders(testPushSecret, body, now.Add(time.Second)), http.StatusUnauthorized},
		{"stale", a, body, signedHeaders(testPushSecret, body, now.Add(-6*time.Minute)), http.StatusUnauthorized},
		{"future", a, body, signedHeaders(testPushSecret, body, now.Add(6*time.Minute)), http.StatusUnauthorized},
		{"unsigned", a, body, nil, http.StatusUnauthorized},
		{"no signature", a, body, map[string]string{signed.HeaderTimestamp: good[signed.HeaderTimestamp]}, http.StatusUnauthorized},
		{"malformed signature", a, body, map[string]string{signed.HeaderTimestamp: good[signed.HeaderTimestamp], signed.HeaderSignature: "sha256=zz"}, http.StatusUnauthorized},
		{"malformed timestamp", a, body, map[string]string{signed.HeaderTimestamp: "yesterday", signed.HeaderSignature: good[signed.HeaderSignature]}, http.StatusUnauthorized},
		{"good on the second instance", b, body, signedHeaders(testPushSecret, body, now.Add(2*time.Second)), http.StatusCreated},
	}
	for _, tt := range tests {
		rec := tt.env.serve(t, "POST", path, tt.body, tt.headers)
		if rec.Code != tt.want {
			t.Errorf("%s: %d %s, want %d", tt.name, rec.Code, rec.Body, tt.want)
			continue
		}
		if tt.want == http.StatusCreated {
			stored++
		} else if code := decode[apiErr](t, rec).Error; code != "unauthorized" && code != "invalid_signature" {
			t.Errorf("%s: error %q", tt.name, code)
		}
		if got := a.history(t, s.Token).TotalCount; got != stored {
			t.Fatalf("%s: %d messages stored, want %d", tt.name, got, stored)
		}
	}
}

// TestPushStored: a pushed message is stored and answered 201 with what
// was stored, on both stores; bad pushes are refused with the right
// status and store nothing; the route is not subject to the browser
// origin rules, and answers 404 when push_secret is not set.
func TestPushStored(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := pushEnv(t, kind, &pushConfig{Secret: testPushSecret, Channel: "c"}, func(c *envConfig) { c.MaxMessageLength = 50 })
			s := e.newSession(t)
			rec := e.push(t, s.SessionID, `{"content":"Hi, I'm Ana from support.","role":"agent"}`)
			if rec.Code != http.StatusCreated {
				t.Fatalf("push: %d %s", rec.Code, rec.Body)
			}
			got := decode[pushResp](t, rec)
			if got.SessionID != s.SessionID || got.Mode != "bot" || got.Message == nil || got.Message.Role != "agent" ||
				got.Message.Content != "Hi, I'm Ana from support." || got.Message.Status != "complete" || got.Message.ID == "" {
				t.Fatalf("push answered %+v", got)
			}
			// Role defaults to assistant; an Origin the site does not allow
			// changes nothing for a signed server-to-server call.
			body := `{"content":"Your order has shipped."}`
			h := signedHeaders(testPushSecret, body, time.Now())
			h["Origin"] = "https://evil.example"
			rec = e.serve(t, "POST", "/api/v1/sessions/"+s.SessionID+"/messages", body, h)
			if rec.Code != http.StatusCreated || decode[pushResp](t, rec).Message.Role != "assistant" {
				t.Fatalf("push with a foreign Origin: %d %s", rec.Code, rec.Body)
			}
			hist := e.history(t, s.Token)
			if hist.TotalCount != 2 || hist.Messages[0].ID != got.Message.ID || hist.Messages[0].Role != "agent" ||
				hist.Messages[1].Role != "assistant" || hist.Messages[1].Content != "Your order has shipped." {
				t.Fatalf("history = %+v", hist)
			}

			revoked := e.newSession(t)
			if rec := e.serve(t, "DELETE", "/api/v1/session", "", authz(revoked.Token)); rec.Code != http.StatusNoContent {
				t.Fatalf("revoke: %d", rec.Code)
			}
			for _, tc := range []struct {
				name, session, body string
				want                int
				code                string
			}{
				{"unknown session", "no-such-session", `{"content":"hi, nobody"}`, 404, "not_found"},
				{"revoked session", revoked.SessionID, `{"content":"hi, revoked"}`, 404, "not_found"},
				{"oversized content", s.SessionID, `{"content":"` + strings.Repeat("é", 51) + `"}`, 413, "message_too_long"},
				{"oversized body", s.SessionID, `{"content":"` + strings.Repeat("x", 70<<10) + `"}`, 413, "payload_too_large"},
				{"bad JSON", s.SessionID, `{"content":`, 400, "invalid_json"},
				{"not an object", s.SessionID, `["hi"]`, 400, "invalid_json"},
				{"bad role", s.SessionID, `{"content":"hi","role":"user"}`, 400, "invalid_request"},
				{"unknown field", s.SessionID, `{"content":"hi","rol":"agent"}`, 400, "invalid_json"},
				{"empty content", s.SessionID, `{"content":"  "}`, 400, "invalid_request"},
				{"nothing to do", s.SessionID, `{}`, 400, "invalid_request"},
				{"bad mode", s.SessionID, `{"mode":"robot"}`, 400, "invalid_request"},
				{"human mode without handoff_webhook", s.SessionID, `{"mode":"human"}`, 400, "invalid_request"},
				{"content of the wrong type", s.SessionID, `{"content":42}`, 400, "invalid_request"},
				{"session_id of another session", s.SessionID, `{"content":"hi","session_id":"` + revoked.SessionID + `"}`, 400, "invalid_request"},
			} {
				rec := e.push(t, tc.session, tc.body)
				if rec.Code != tc.want || decode[apiErr](t, rec).Error != tc.code {
					t.Errorf("%s: %d %s, want %d %s", tc.name, rec.Code, rec.Body, tc.want, tc.code)
				}
			}
			if got := e.history(t, s.Token).TotalCount; got != 2 {
				t.Errorf("%d messages after refused pushes, want 2", got)
			}
			if rec := e.serve(t, "GET", "/api/v1/sessions/"+s.SessionID+"/messages", "", nil); rec.Code != http.StatusMethodNotAllowed {
				t.Errorf("GET on the push route: %d", rec.Code)
			}
		})
	}
	t.Run("off without push_secret", func(t *testing.T) {
		e := newChatEnv(t, chatEnvOpts{})
		s := e.newSession(t)
		rec := e.push(t, s.SessionID, `{"content":"hi"}`)
		if rec.Code != http.StatusNotFound {
			t.Fatalf("push without push_secret: %d %s", rec.Code, rec.Body)
		}
		if rec := e.serve(t, "GET", "/api/v1/chat/events", "", authz(s.Token)); rec.Code != http.StatusNotFound {
			t.Fatalf("events without push_secret: %d %s", rec.Code, rec.Body)
		}
		if got := e.history(t, s.Token).TotalCount; got != 0 {
			t.Fatalf("%d messages stored", got)
		}
	})
}

// openEvents opens the visitor's events stream on e's live server and
// reads up to its ready event, returning the events before it (the
// replayed messages) and the reader.
func openEvents(t *testing.T, e *chatEnv, token, query string, headers map[string]string) ([]testkit.NamedEvent, testkit.NamedEvent, *bufio.Reader) {
	t.Helper()
	h := authz(token)
	for k, v := range headers {
		h[k] = v
	}
	resp := e.do(t, "GET", "/api/v1/chat/events"+query, "", h)
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("events: %d %s", resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("events Content-Type %q", ct)
	}
	br := bufio.NewReader(resp.Body)
	var before []testkit.NamedEvent
	for {
		ev := testkit.NextNamedEvent(t, br)
		if ev.Event == "ready" {
			return before, ev, br
		}
		before = append(before, ev)
	}
}

type eventMessage struct {
	ID, Role, Content, Status string
}

func messageOf(t *testing.T, ev testkit.NamedEvent) eventMessage {
	t.Helper()
	if ev.Event != "message" {
		t.Fatalf("event %q (%s), want message", ev.Event, ev.Data)
	}
	var m eventMessage
	if err := json.Unmarshal([]byte(ev.Data), &m); err != nil {
		t.Fatal(err)
	}
	if m.ID != ev.ID {
		t.Fatalf("event id %q, message id %q", ev.ID, m.ID)
	}
	return m
}

// TestPushLiveOnAnotherInstance: a page whose events stream is open on
// instance B receives, live, a message pushed through instance A (the
// two share Redis and the store), and the change of mode; another
// visitor's push does not reach it.
func TestPushLiveOnAnotherInstance(t *testing.T) {
	rdb, channel := pushRedis(t)
	pg := testenv.PostgresURL(t)
	hook := newHandoffHook(t)
	a := pushEnv(t, pg, &pushConfig{Secret: testPushSecret, Redis: rdb, Channel: channel, HandoffURL: hook.srv.URL}, nil)
	b := newChatEnv(t, chatEnvOpts{kind: pg, fake: a.fake, mutate: func(c *envConfig) {
		c.Push = &pushConfig{Secret: testPushSecret, Redis: rdb, Channel: channel, HandoffURL: hook.srv.URL}
	}})
	s := a.newSession(t)
	other := a.newSession(t)
	_, ready, br := openEvents(t, b, s.Token, "", nil)
	var r struct{ SessionID, Mode string }
	if err := json.Unmarshal([]byte(ready.Data), &r); err != nil || r.Mode != "bot" {
		t.Fatalf("ready = %s (%v)", ready.Data, err)
	}
	if rec := a.push(t, other.SessionID, `{"content":"not for you","role":"agent"}`); rec.Code != http.StatusCreated {
		t.Fatalf("push to the other visitor: %d %s", rec.Code, rec.Body)
	}
	start := time.Now()
	rec := a.push(t, s.SessionID, `{"content":"A person will answer you now.","role":"agent"}`)
	if rec.Code != http.StatusCreated {
		t.Fatalf("push: %d %s", rec.Code, rec.Body)
	}
	answered := time.Since(start)
	pushed := decode[pushResp](t, rec).Message
	got := messageOf(t, testkit.NextNamedEvent(t, br))
	t.Logf("push answered in %v; on the other instance's stream %v after it was sent", answered, time.Since(start))
	if got.ID != pushed.ID || got.Content != "A person will answer you now." || got.Role != "agent" {
		t.Fatalf("live event = %+v, want the pushed %+v", got, pushed)
	}
	if rec := a.push(t, s.SessionID, `{"mode":"human"}`); rec.Code != http.StatusOK || decode[pushResp](t, rec).Mode != "human" {
		t.Fatalf("mode human: %d %s", rec.Code, rec.Body)
	}
	if ev := testkit.NextNamedEvent(t, br); ev.Event != "mode" || ev.Data != `{"mode":"human"}` {
		t.Fatalf("event after the mode change = %+v", ev)
	}
}

// TestEventsReplayAfter: a page that was away gets, first, the messages
// stored after the one it names (?after= or Last-Event-ID), in order,
// then live ones; an id not in its conversation is 400; another
// visitor's conversation cannot be read this way.
func TestEventsReplayAfter(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			p := &pushConfig{Secret: testPushSecret, Channel: "c"}
			e := pushEnv(t, kind, p, nil)
			s := e.newSession(t)
			var ids []string
			for _, text := range []string{"one", "two", "three"} {
				rec := e.push(t, s.SessionID, `{"content":"`+text+`","role":"agent"}`)
				if rec.Code != http.StatusCreated {
					t.Fatalf("push: %d %s", rec.Code, rec.Body)
				}
				ids = append(ids, decode[pushResp](t, rec).Message.ID)
			}
			for _, tc := range []struct {
				name, query string
				headers     map[string]string
			}{
				{"after", "?after=" + ids[0], nil},
				{"Last-Event-ID", "", map[string]string{"Last-Event-ID": ids[0]}},
			} {
				missed, _, _ := openEvents(t, e, s.Token, tc.query, tc.headers)
				if len(missed) != 2 || messageOf(t, missed[0]).Content != "two" || messageOf(t, missed[1]).Content != "three" ||
					missed[1].ID != ids[2] {
					t.Fatalf("%s: replayed %+v, want two and three", tc.name, missed)
				}
			}
			// EventSource reconnects to the URL it was made with (the
			// page's ?after= at load) and adds Last-Event-ID, the last
			// event it got since: the later one counts, so what the page
			// has already shown is not sent again.
			missed, _, _ := openEvents(t, e, s.Token, "?after="+ids[0], map[string]string{"Last-Event-ID": ids[1]})
			if len(missed) != 1 || missed[0].ID != ids[2] {
				t.Fatalf("?after=one with Last-Event-ID two: replayed %+v, want three only", missed)
			}
			missed, _, br := openEvents(t, e, s.Token, "?after="+ids[2], nil)
			if len(missed) != 0 {
				t.Fatalf("after the newest: replayed %+v", missed)
			}
			rec := e.push(t, s.SessionID, `{"content":"four"}`)
			if got := messageOf(t, testkit.NextNamedEvent(t, br)); got.Content != "four" || got.ID != decode[pushResp](t, rec).Message.ID {
				t.Fatalf("live after replay = %+v", got)
			}
			other := e.newSession(t)
			for _, after := range []string{"no-such-message", ids[0]} {
				resp := e.do(t, "GET", "/api/v1/chat/events?after="+after, "", authz(other.Token))
				if resp.StatusCode != http.StatusBadRequest {
					t.Errorf("after=%s for another visitor: %d", after, resp.StatusCode)
				}
			}
			if resp := e.do(t, "GET", "/api/v1/chat/events", "", nil); resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("events without a token: %d", resp.StatusCode)
			}
		})
	}
}

// TestEventsEndOnShutdown: when the server shuts down (or reloads) the
// hub closes and an open stream ends with an end event, instead of
// holding the old server open.
func TestEventsEndOnShutdown(t *testing.T) {
	p := &pushConfig{Secret: testPushSecret, Channel: "c"}
	e := pushEnv(t, "", p, func(c *envConfig) {})
	s := e.newSession(t)
	_, _, br := openEvents(t, e, s.Token, "", nil)
	p.Hub.Close()
	if ev := testkit.NextNamedEvent(t, br); ev.Event != "end" {
		t.Fatalf("event after shutdown = %+v, want end", ev)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("stream still open after end: %v", err)
	}
	resp := e.do(t, "GET", "/api/v1/chat/events", "", authz(s.Token))
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("events after shutdown: %d", resp.StatusCode)
	}
}

// handoffHook is a stand-in handoff webhook that checks each call's
// signature as a receiver would, and records the calls.
type handoffHook struct {
	srv    *httptest.Server
	mu     sync.Mutex
	calls  []handoffCall
	raw    []rawCall
	status int
	v      *signed.Verifier
}

// rawCall is a handoff call as it arrived: its body and signature headers.
type rawCall struct {
	body    string
	headers map[string]string
}

type handoffCall struct {
	Event     string `json:"event"`
	SessionID string `json:"session_id"`
	Site      string `json:"site"`
	Message   struct {
		ID, Role, Content string
	} `json:"message"`
}

func newHandoffHook(t *testing.T) *handoffHook {
	h := &handoffHook{status: http.StatusOK, v: &signed.Verifier{Secret: []byte(testPushSecret), Replay: signed.NewMemoryReplay(0, nil)}}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if err := h.v.Verify(r.Context(), r.Header, body); err != nil {
			t.Errorf("handoff call with a bad signature: %v", err)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var c handoffCall
		if err := json.Unmarshal(body, &c); err != nil {
			t.Errorf("handoff body %s: %v", body, err)
		}
		h.mu.Lock()
		h.calls = append(h.calls, c)
		h.raw = append(h.raw, rawCall{string(body), map[string]string{
			signed.HeaderTimestamp: r.Header.Get(signed.HeaderTimestamp), signed.HeaderSignature: r.Header.Get(signed.HeaderSignature)}})
		status := h.status
		h.mu.Unlock()
		w.WriteHeader(status)
	}))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *handoffHook) Calls() []handoffCall {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]handoffCall(nil), h.calls...)
}

func (h *handoffHook) SetStatus(s int) {
	h.mu.Lock()
	h.status = s
	h.mu.Unlock()
}

// TestHumanModeHandoff: while a conversation is in human mode the
// visitor's messages (chat API and @n8n/chat route) are stored and sent,
// signed, to the handoff webhook and not to n8n; a failing webhook gets
// the visitor 502 handoff_failed with the message kept; back in bot
// mode, messages go to n8n again. The mode shows in validate and
// history.
func TestHumanModeHandoff(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			hook := newHandoffHook(t)
			e := pushEnv(t, kind, &pushConfig{Secret: testPushSecret, Channel: "c", HandoffURL: hook.srv.URL, HandoffTimeout: 5 * time.Second}, nil)
			e.fake.SetScript(testkit.Output("bot answer"))
			s := e.newSession(t)
			send := func(text string) *httptest.ResponseRecorder {
				return e.serve(t, "POST", "/api/v1/chat/message", `{"message":"`+text+`"}`, authz(s.Token, "Accept", "application/json"))
			}
			if rec := send("hello bot"); rec.Code != http.StatusOK || e.fake.Hits() != 1 {
				t.Fatalf("bot mode: %d %s, n8n hits %d", rec.Code, rec.Body, e.fake.Hits())
			}
			if rec := e.push(t, s.SessionID, `{"mode":"human"}`); rec.Code != http.StatusOK {
				t.Fatalf("mode human: %d %s", rec.Code, rec.Body)
			}
			if got := e.mode(t, s.Token); got != "human" {
				t.Fatalf("validate mode = %q", got)
			}
			rec := send("I want a person")
			if rec.Code != http.StatusOK || rec.Header().Get(handler.ModeHeader) != "human" {
				t.Fatalf("human mode: %d %s %v", rec.Code, rec.Body, rec.Header())
			}
			if e.fake.Hits() != 1 {
				t.Fatalf("n8n was called in human mode (%d hits)", e.fake.Hits())
			}
			calls := hook.Calls()
			if len(calls) != 1 || calls[0].SessionID != s.SessionID || calls[0].Message.Content != "I want a person" ||
				calls[0].Message.Role != "user" || calls[0].Event != "message" || calls[0].Site != "shop.example.com" {
				t.Fatalf("handoff calls = %+v", calls)
			}
			hist := e.history(t, s.Token)
			if hist.TotalCount != 3 || hist.Messages[2].ID != calls[0].Message.ID || hist.Messages[2].Role != "user" {
				t.Fatalf("history = %+v", hist)
			}
			var hm struct{ Mode string }
			_ = json.Unmarshal(e.serve(t, "GET", "/api/v1/chat/history", "", authz(s.Token)).Body.Bytes(), &hm)
			if hm.Mode != "human" {
				t.Fatalf("history mode = %q", hm.Mode)
			}

			// A streaming client gets an empty stream, marked human.
			resp := e.do(t, "POST", "/api/v1/chat/stream", `{"message":"streamed to a person"}`, authz(s.Token))
			if resp.StatusCode != http.StatusOK || resp.Header.Get(handler.ModeHeader) != "human" {
				t.Fatalf("stream in human mode: %d %v", resp.StatusCode, resp.Header)
			}
			br := bufio.NewReader(resp.Body)
			if begin := eventJSON(t, nextSSE(t, br)); begin.Type != "begin" || begin.MessageID != "" {
				t.Fatalf("first event in human mode = %+v, want a begin naming no reply", begin)
			}
			wantEndDone(t, br)

			// The webhook failing: 502, the message kept.
			hook.SetStatus(http.StatusInternalServerError)
			rec = send("are you there?")
			if rec.Code != http.StatusBadGateway || decode[apiErr](t, rec).Error != "handoff_failed" {
				t.Fatalf("failing webhook: %d %s", rec.Code, rec.Body)
			}
			hist = e.history(t, s.Token)
			if last := hist.Messages[len(hist.Messages)-1]; last.Content != "are you there?" || last.Role != "user" {
				t.Fatalf("message after a failed handoff not kept: %+v", hist.Messages)
			}
			hook.SetStatus(http.StatusOK)

			// The @n8n/chat route: its conversation, handed over too.
			widget := func(text string) *httptest.ResponseRecorder {
				return e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"handoff-widget-1","chatInput":"`+text+`"}`,
					map[string]string{"Origin": allowedOrigin})
			}
			if rec := widget("hi from the widget"); rec.Code != http.StatusOK || e.fake.Hits() != 2 {
				t.Fatalf("widget in bot mode: %d %s", rec.Code, rec.Body)
			}
			widgetID := e.fake.Last(t).Body.SessionID
			if rec := e.push(t, widgetID, `{"mode":"human","session_id":"`+widgetID+`"}`); rec.Code != http.StatusOK {
				t.Fatalf("widget mode human: %d %s", rec.Code, rec.Body)
			}
			if rec := widget("a person please"); rec.Code != http.StatusOK || e.fake.Hits() != 2 {
				t.Fatalf("widget in human mode: %d %s, n8n hits %d", rec.Code, rec.Body, e.fake.Hits())
			}
			if calls := hook.Calls(); len(calls) != 4 || calls[3].SessionID != widgetID || calls[3].Message.Content != "a person please" {
				t.Fatalf("widget handoff calls = %+v", calls)
			}

			// Back to the bot.
			if rec := e.push(t, s.SessionID, `{"mode":"bot"}`); rec.Code != http.StatusOK {
				t.Fatalf("mode bot: %d %s", rec.Code, rec.Body)
			}
			if rec := send("bot again"); rec.Code != http.StatusOK || rec.Header().Get(handler.ModeHeader) != "" || e.fake.Hits() != 3 {
				t.Fatalf("back in bot mode: %d %s, n8n hits %d", rec.Code, rec.Body, e.fake.Hits())
			}
			if got := e.mode(t, s.Token); got != "bot" {
				t.Fatalf("validate mode = %q", got)
			}
		})
	}
}

// TestPushRedisDown: with redis configured but not answering, a push
// cannot be checked for replay and is refused with 503 (nothing stored,
// never accepted unchecked), and the events stream answers 503 too.
func TestPushRedisDown(t *testing.T) {
	down := redis.NewClient(&redis.Options{Addr: testkit.ClosedPort(t), MaxRetries: -1, DialTimeout: time.Second})
	t.Cleanup(func() { _ = down.Close() })
	e := pushEnv(t, "", &pushConfig{Secret: testPushSecret, Redis: down, Channel: "c"}, nil)
	s := e.newSession(t)
	rec := e.push(t, s.SessionID, `{"content":"lost?"}`)
	if rec.Code != http.StatusServiceUnavailable || decode[apiErr](t, rec).Error != "unavailable" || rec.Header().Get("Retry-After") == "" {
		t.Fatalf("push with Redis down: %d %s", rec.Code, rec.Body)
	}
	if got := e.history(t, s.Token).TotalCount; got != 0 {
		t.Fatalf("%d messages stored", got)
	}
	resp := e.do(t, "GET", "/api/v1/chat/events", "", authz(s.Token))
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("events with Redis down: %d", resp.StatusCode)
	}
}

// TestPushRetryAfterStoreFailure: a push refused with 503 because the
// store failed stored nothing, so the caller's retry of the very same
// signed request (n8n's Retry On Fail sends the same headers) is
// accepted and stored, not refused as a replay, when its body names the
// session; once stored, it is one.
func TestPushRetryAfterStoreFailure(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e := pushEnv(t, kind, &pushConfig{Secret: testPushSecret}, nil)
			s := e.newSession(t)
			body := `{"session_id":"` + s.SessionID + `","content":"Your order has shipped."}`
			headers := signedHeaders(testPushSecret, body, time.Now())
			path := "/api/v1/sessions/" + s.SessionID + "/messages"
			failMessageInserts(t, e.store)
			rec := e.serve(t, "POST", path, body, headers)
			wantError(t, rec, http.StatusServiceUnavailable, "store_unavailable")
			healMessageInserts(t, e.store)
			if rec := e.serve(t, "POST", path, body, headers); rec.Code != http.StatusCreated {
				t.Fatalf("the same push retried after the store failed: %d %s", rec.Code, rec.Body)
			}
			if h := e.history(t, s.Token); h.TotalCount != 1 || h.Messages[0].Content != "Your order has shipped." {
				t.Fatalf("history %+v", h)
			}
			wantError(t, e.serve(t, "POST", path, body, headers), http.StatusUnauthorized, "invalid_signature")

			// Without session_id the signature is not bound to the path's
			// session: it stays used, so that whoever saw it cannot send it
			// to another conversation; the retry is signed anew.
			unbound := `{"content":"Unbound."}`
			headers = signedHeaders(testPushSecret, unbound, time.Now())
			failMessageInserts(t, e.store)
			wantError(t, e.serve(t, "POST", path, unbound, headers), http.StatusServiceUnavailable, "store_unavailable")
			healMessageInserts(t, e.store)
			other := e.newSession(t)
			wantError(t, e.serve(t, "POST", "/api/v1/sessions/"+other.SessionID+"/messages", unbound, headers), http.StatusUnauthorized, "invalid_signature")
		})
	}
}

// healMessageInserts undoes failMessageInserts.
func healMessageInserts(t *testing.T, store sessions.Store) {
	t.Helper()
	ctx := context.Background()
	switch s := store.(type) {
	case *sessions.PostgresStore:
		if _, err := s.Pool().Exec(ctx, `DROP TRIGGER chat_test_fail ON chatproxy_messages; DROP FUNCTION chat_test_fail()`); err != nil {
			t.Fatal(err)
		}
	case *sessions.SQLiteStore:
		db, err := sql.Open("sqlite", s.Path())
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if _, err := db.ExecContext(ctx, `DROP TRIGGER chat_test_fail`); err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("unknown store %T", store)
	}
}

// TestEventsEndWhenThisDeviceSignsOut: a verified user's conversation is
// shared by their devices, and signing out gives up one device's token
// only. A page left open on the device that signed out (a shared
// computer) must not go on receiving what is pushed into the
// conversation: its stream ends instead; the other device's stream gets
// the message.
func TestEventsEndWhenThisDeviceSignsOut(t *testing.T) {
	e, _ := identityEnv(t, "sqlite", false, func(c *envConfig) {
		c.Push = &pushConfig{Secret: testPushSecret, Channel: "c"}
	})
	proof := jsonString(map[string]any{"user_id": "user-77", "user_hash": identity.Hash([]byte(testIdentitySecret), "user-77")})
	origin := map[string]string{"Origin": allowedOrigin}
	var devices [2]created
	for i := range devices {
		rec := e.serve(t, "POST", "/api/v1/session/create", proof, origin)
		if rec.Code != http.StatusCreated {
			t.Fatalf("create: %d %s", rec.Code, rec.Body)
		}
		devices[i] = decode[created](t, rec)
	}
	if devices[0].SessionID != devices[1].SessionID {
		t.Fatalf("two devices, two conversations: %s %s", devices[0].SessionID, devices[1].SessionID)
	}
	_, _, left := openEvents(t, e, devices[0].Token, "", origin)
	_, _, other := openEvents(t, e, devices[1].Token, "", origin)
	if rec := e.serve(t, "DELETE", "/api/v1/session", "", authz(devices[0].Token, "Origin", allowedOrigin)); rec.Code != http.StatusNoContent {
		t.Fatalf("sign out: %d %s", rec.Code, rec.Body)
	}
	if rec := e.push(t, devices[0].SessionID, `{"content":"Your account balance is 1,234 EUR.","role":"agent"}`); rec.Code != http.StatusCreated {
		t.Fatalf("push: %d %s", rec.Code, rec.Body)
	}
	if m := messageOf(t, testkit.NextNamedEvent(t, other)); m.Content != "Your account balance is 1,234 EUR." {
		t.Fatalf("the signed-in device got %+v", m)
	}
	if ev := testkit.NextNamedEvent(t, left); ev.Event != "end" || ev.Data != `{"reason":"session_ended"}` {
		t.Fatalf("the signed-out device's open stream got %+v, want its end", ev)
	}
}

// TestEventsReadyIsAPosition: ready's id is where the stream stands (the
// newest message, or "start" for a conversation without one), so a page
// whose stream ended before any message came live (a reload, a dropped
// Redis connection) reconnects with it as Last-Event-ID, as EventSource
// does, and gets what was pushed while it was away, nothing before.
func TestEventsReadyIsAPosition(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := pushEnv(t, kind, &pushConfig{Secret: testPushSecret, Channel: "c"}, nil)
			s := e.newSession(t)
			_, ready, _ := openEvents(t, e, s.Token, "", nil)
			if ready.ID != "start" {
				t.Fatalf("ready on an empty conversation: id %q, want start", ready.ID)
			}
			// Away: a person answers meanwhile.
			if rec := e.push(t, s.SessionID, `{"content":"Hi, I'm Ana.","role":"agent"}`); rec.Code != http.StatusCreated {
				t.Fatalf("push: %d %s", rec.Code, rec.Body)
			}
			missed, ready2, _ := openEvents(t, e, s.Token, "", map[string]string{"Last-Event-ID": ready.ID})
			if len(missed) != 1 || messageOf(t, missed[0]).Content != "Hi, I'm Ana." || ready2.ID != missed[0].ID {
				t.Fatalf("reconnected after start: %+v then ready %+v", missed, ready2)
			}
			// A stream opened later stands at the newest message.
			_, ready3, _ := openEvents(t, e, s.Token, "", nil)
			if ready3.ID != missed[0].ID {
				t.Fatalf("ready id %q, want the newest message %q", ready3.ID, missed[0].ID)
			}
			if rec := e.push(t, s.SessionID, `{"content":"Still there?","role":"agent"}`); rec.Code != http.StatusCreated {
				t.Fatalf("push: %d %s", rec.Code, rec.Body)
			}
			missed, _, _ = openEvents(t, e, s.Token, "", map[string]string{"Last-Event-ID": ready3.ID})
			if len(missed) != 1 || messageOf(t, missed[0]).Content != "Still there?" {
				t.Fatalf("reconnected after the newest: %+v", missed)
			}
		})
	}
}

// TestPushRefusalLogBounded: the push route has no rate limit (its
// callers are servers), and a refused push is logged with the path's
// session id, which anyone can make as long as a URL: the log line keeps
// only a bounded prefix of it.
func TestPushRefusalLogBounded(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	e := pushEnv(t, "sqlite", &pushConfig{Secret: testPushSecret, Channel: "c"}, func(c *envConfig) { c.Logger = zap.New(core) })
	long := strings.Repeat("x", 32<<10)
	body := `{"content":"hi"}`
	headers := signedHeaders("not-the-push-secret-0123456789abcdef", body, time.Now())
	wantError(t, e.serve(t, "POST", "/api/v1/sessions/"+long+"/messages", body, headers), http.StatusUnauthorized, "invalid_signature")
	refused := logs.FilterMessage("push refused").AllUntimed()
	if len(refused) != 1 {
		t.Fatalf("%d refusal log lines", len(refused))
	}
	if id, _ := refused[0].ContextMap()["session_id"].(string); len(id) > 128 {
		t.Fatalf("the refusal logged a session id of %d bytes", len(id))
	}
}

// TestEventsCatchUpBounded: a catch-up holds at most about 1 MiB of
// messages (as a history page does) rather than every message since the
// page's id in memory at once; when more are stored, the stream ends
// after ready, whose id is the last one sent, and the reconnection brings
// the rest, so nothing is skipped and nothing live comes before it.
func TestEventsCatchUpBounded(t *testing.T) {
	e := pushEnv(t, "sqlite", &pushConfig{Secret: testPushSecret, Channel: "c"}, func(c *envConfig) {
		c.MaxMessageLength = 1 << 20
		c.MaxBodySize = 2 << 20
	})
	s := e.newSession(t)
	pushed := func(content string) string {
		t.Helper()
		rec := e.push(t, s.SessionID, `{"content":"`+content+`"}`)
		if rec.Code != http.StatusCreated {
			t.Fatalf("push: %d %s", rec.Code, rec.Body)
		}
		return decode[pushResp](t, rec).Message.ID
	}
	first := pushed("before")
	var big []string
	for _, c := range []string{"a", "b", "c"} {
		big = append(big, pushed(strings.Repeat(c, 400<<10)))
	}
	missed, ready, br := openEvents(t, e, s.Token, "?after="+first, nil)
	if len(missed) != 2 || missed[0].ID != big[0] || missed[1].ID != big[1] || ready.ID != big[1] {
		t.Fatalf("first catch-up: %d messages, ready id %q; want the first two of 1.2 MiB", len(missed), ready.ID)
	}
	if ev := testkit.NextNamedEvent(t, br); ev.Event != "end" || ev.Data != `{"reason":"reconnect"}` {
		t.Fatalf("after a partial catch-up: %+v, want end", ev)
	}
	missed, ready, br = openEvents(t, e, s.Token, "?after="+first, map[string]string{"Last-Event-ID": ready.ID})
	if len(missed) != 1 || missed[0].ID != big[2] || ready.ID != big[2] {
		t.Fatalf("reconnected: %d messages, ready id %q; want the third", len(missed), ready.ID)
	}
	live := pushed("live")
	if got := messageOf(t, testkit.NextNamedEvent(t, br)); got.ID != live {
		t.Fatalf("live after the whole catch-up: %+v", got)
	}
}

// TestHandoffCallIsNotAPush: the proxy signs its handoff calls with
// push_secret, and their receiver (a help-desk tool) holds no more than
// that: such a call, sent on as it came to the push route of the same
// conversation, is not a push (its fields are not a push's) and stores
// nothing, so the receiver cannot make the visitor's words look like the
// bot's or a person's.
func TestHandoffCallIsNotAPush(t *testing.T) {
	hook := newHandoffHook(t)
	e := pushEnv(t, "sqlite", &pushConfig{Secret: testPushSecret, Channel: "c", HandoffURL: hook.srv.URL, HandoffTimeout: 5 * time.Second}, nil)
	s := e.newSession(t)
	if rec := e.push(t, s.SessionID, `{"mode":"human"}`); rec.Code != http.StatusOK {
		t.Fatalf("mode human: %d %s", rec.Code, rec.Body)
	}
	if rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"refund me"}`, authz(s.Token, "Accept", "application/json")); rec.Code != http.StatusOK {
		t.Fatalf("message: %d %s", rec.Code, rec.Body)
	}
	hook.mu.Lock()
	raw := hook.raw
	hook.mu.Unlock()
	if len(raw) != 1 {
		t.Fatalf("%d handoff calls", len(raw))
	}
	rec := e.serve(t, "POST", "/api/v1/sessions/"+s.SessionID+"/messages", raw[0].body, raw[0].headers)
	if rec.Code != http.StatusBadRequest {
		t.Fatalf("a handoff call sent on to the push route: %d %s", rec.Code, rec.Body)
	}
	if h := e.history(t, s.Token); h.TotalCount != 1 || h.Messages[0].Role != "user" {
		t.Fatalf("history %+v", h)
	}
}
