package handler

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/signed"
)

// A verified user's conversation across devices, the conversation list
// and erasure, on both stores. The user is handed to openSession as the
// create route does once the site's proof is verified.

const usErasureSecret = "erasure-secret-for-the-erasure-tests-0123456789"

func usStores() map[string]func(*testing.T) sessions.Store {
	return map[string]func(*testing.T) sessions.Store{"postgres": hdPostgres, "sqlite": hdSQLite}
}

func newUSEnv(t *testing.T, store sessions.Store) *hdEnv {
	return newHDEnv(t, store, func(c *Config) {
		c.Erasure = &signed.Verifier{Secret: []byte(usErasureSecret), Replay: signed.NewMemoryReplay(0, nil)}
	})
}

// usOpen opens a session for user (nil: anonymous) as the create route
// does, with the request's headers (a held token), and returns its id
// and token.
func usOpen(t *testing.T, e *hdEnv, user *sessions.User, newConversation bool, headers map[string]string) (string, string) {
	t.Helper()
	r := httptest.NewRequest("POST", "http://api.example.net/api/v1/session/create", nil)
	r.Header.Set("User-Agent", hdBrowserUA)
	r.Header.Set("Origin", hdOrigin)
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), httptest.NewRecorder(), nil)
	var u *sessions.User
	if user != nil {
		c := *user
		u = &c
	}
	s, token, _, err := e.h.openSession(r, sessions.NewSession{Site: "shop.example.com", User: u, Origin: hdOrigin, UserAgent: hdBrowserUA}, newConversation)
	if err != nil {
		t.Fatalf("openSession: %v", err)
	}
	return s.ID, token
}

func usBearer(token string) map[string]string {
	return hdHeaders("Authorization", "Bearer "+token, "Origin", hdOrigin)
}

// usCookie is a browser's cookie jar holding token, on the allowed origin.
func usCookie(token string) map[string]string {
	return hdHeaders("Cookie", "chat_session="+token, "Origin", hdOrigin)
}

func usSay(t *testing.T, e *hdEnv, auth map[string]string, message string) {
	t.Helper()
	h := hdHeaders("Accept", "application/json")
	for k, v := range auth {
		h[k] = v
	}
	rec := e.do(t, "POST", "/api/v1/chat/message", `{"message":`+strconvQuote(message)+`}`, h)
	if rec.Code != http.StatusOK {
		t.Fatalf("chat message: %d %s", rec.Code, rec.Body)
	}
}

func strconvQuote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

type usHistory struct {
	SessionID string `json:"session_id"`
	Messages  []struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"messages"`
	TotalCount int `json:"total_count"`
}

func usHistoryOf(t *testing.T, e *hdEnv, auth map[string]string, query string) usHistory {
	t.Helper()
	rec := e.do(t, "GET", "/api/v1/chat/history"+query, "", auth)
	if rec.Code != http.StatusOK {
		t.Fatalf("history%s: %d %s", query, rec.Code, rec.Body)
	}
	var h usHistory
	if err := json.Unmarshal(rec.Body.Bytes(), &h); err != nil {
		t.Fatal(err)
	}
	return h
}

func usContents(h usHistory) []string {
	var out []string
	for _, m := range h.Messages {
		out = append(out, m.Role+":"+m.Content)
	}
	return out
}

func usWantContents(t *testing.T, what string, h usHistory, want ...string) {
	t.Helper()
	if got := usContents(h); strings.Join(got, "|") != strings.Join(want, "|") || h.TotalCount != len(want) {
		t.Errorf("%s: history %q (total %d), want %q", what, got, h.TotalCount, want)
	}
}

var (
	usAda   = &sessions.User{ID: "user-42", Name: "Ada", Email: "ada@example.com"}
	usGrace = &sessions.User{ID: "user-7", Name: "Grace"}
)

// Two devices of one user (one with a bearer token, one with a cookie)
// see and continue one conversation; signing out on one leaves the other
// and the conversation alone.
func TestUserOneConversationAcrossDevices(t *testing.T) {
	for name, open := range usStores() {
		t.Run(name, func(t *testing.T) {
			e := newUSEnv(t, open(t))
			laptop, laptopToken := usOpen(t, e, usAda, false, nil)
			usSay(t, e, usBearer(laptopToken), "hello from the laptop")

			phone, phoneToken := usOpen(t, e, usAda, false, nil)
			if phone != laptop {
				t.Fatalf("the phone got session %s, want the laptop's %s", phone, laptop)
			}
			if phoneToken == laptopToken {
				t.Fatal("the phone got the laptop's token; each device needs its own")
			}
			phoneJar := usCookie(phoneToken)
			usWantContents(t, "phone", usHistoryOf(t, e, phoneJar, ""),
				"user:hello from the laptop", "assistant:"+hdReply)
			usSay(t, e, phoneJar, "and from the phone")
			want := []string{"user:hello from the laptop", "assistant:" + hdReply, "user:and from the phone", "assistant:" + hdReply}
			usWantContents(t, "laptop", usHistoryOf(t, e, usBearer(laptopToken), ""), want...)

			// Signing out on the phone ends the phone's token only.
			rec := e.do(t, "DELETE", "/api/v1/session", "", phoneJar)
			if rec.Code != http.StatusNoContent {
				t.Fatalf("destroy on the phone: %d %s", rec.Code, rec.Body)
			}
			if c := rec.Header().Get("Set-Cookie"); !strings.Contains(c, "chat_session=;") {
				t.Errorf("destroy did not clear the phone's cookie: %q", c)
			}
			hdWantError(t, e.do(t, "GET", "/api/v1/chat/history", "", phoneJar), http.StatusUnauthorized, "session_expired")
			hdWantError(t, e.do(t, "POST", "/api/v1/chat/message", `{"message":"still here?"}`,
				hdHeaders("Authorization", "Bearer "+phoneToken, "Accept", "application/json")), http.StatusUnauthorized, "session_expired")
			usWantContents(t, "laptop after the phone signed out", usHistoryOf(t, e, usBearer(laptopToken), ""), want...)
			usSay(t, e, usBearer(laptopToken), "laptop goes on")

			// The phone signs in again: the same conversation, a new token.
			again, againToken := usOpen(t, e, usAda, false, nil)
			if again != laptop || againToken == phoneToken {
				t.Errorf("after signing in again the phone got %s", again)
			}
			if h := usHistoryOf(t, e, usBearer(againToken), ""); h.TotalCount != 6 {
				t.Errorf("after signing in again the phone sees %d messages, want 6", h.TotalCount)
			}

			// Another user never lands in it.
			other, _ := usOpen(t, e, usGrace, false, nil)
			if other == laptop {
				t.Fatal("another user was given Ada's conversation")
			}
			// An anonymous visitor still gets a session of their own.
			anon, _ := usOpen(t, e, nil, false, nil)
			if anon == laptop {
				t.Fatal("an anonymous visitor was given Ada's conversation")
			}
			e.hdNoErrorLogs(t)
		})
	}
}

type usConversations struct {
	Conversations []struct {
		ID            string  `json:"id"`
		CreatedAt     string  `json:"created_at"`
		LastMessageAt *string `json:"last_message_at"`
		MessageCount  int     `json:"message_count"`
		Preview       string  `json:"preview"`
		Current       bool    `json:"current"`
	} `json:"conversations"`
	HasMore bool `json:"has_more"`
}

func usList(t *testing.T, e *hdEnv, auth map[string]string, query string) usConversations {
	t.Helper()
	rec := e.do(t, "GET", "/api/v1/chat/conversations"+query, "", auth)
	if rec.Code != http.StatusOK {
		t.Fatalf("conversations%s: %d %s", query, rec.Code, rec.Body)
	}
	var c usConversations
	if err := json.Unmarshal(rec.Body.Bytes(), &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// new_conversation starts a fresh conversation, which other devices then
// continue; the list pages through them newest first, and history reads
// any of the user's own, never another user's.
func TestUserNewConversationAndList(t *testing.T) {
	for name, open := range usStores() {
		t.Run(name, func(t *testing.T) {
			e := newUSEnv(t, open(t))
			first, firstToken := usOpen(t, e, usAda, false, nil)
			usSay(t, e, usBearer(firstToken), "about my order")
			ids := []string{first}
			tokens := []string{firstToken}
			for i := range 3 {
				time.Sleep(2 * time.Millisecond) // distinct creation times, whatever the clock's grain
				id, token := usOpen(t, e, usAda, true, nil)
				if id == ids[len(ids)-1] {
					t.Fatalf("new_conversation #%d continued %s", i, id)
				}
				ids = append(ids, id)
				tokens = append(tokens, token)
			}
			// Another device continues the newest.
			newest := ids[len(ids)-1]
			if id, _ := usOpen(t, e, usAda, false, nil); id != newest {
				t.Errorf("another device continued %s, want the newest %s", id, newest)
			}

			var listed []string
			before := ""
			for page := 0; page < 10; page++ {
				q := "?limit=3"
				if before != "" {
					q += "&before=" + url.QueryEscape(before)
				}
				c := usList(t, e, usBearer(tokens[1]), q)
				for _, conv := range c.Conversations {
					listed = append(listed, conv.ID)
					if conv.Current != (conv.ID == ids[1]) {
						t.Errorf("%s: current = %v", conv.ID, conv.Current)
					}
					if conv.ID == first {
						if conv.MessageCount != 2 || conv.Preview != "about my order" || conv.LastMessageAt == nil {
							t.Errorf("first conversation listed as %+v", conv)
						}
					} else if conv.MessageCount != 0 || conv.LastMessageAt != nil || conv.Preview != "" {
						t.Errorf("empty conversation listed as %+v", conv)
					}
				}
				if !c.HasMore {
					break
				}
				before = c.Conversations[len(c.Conversations)-1].ID
			}
			want := []string{ids[3], ids[2], ids[1], ids[0]}
			if strings.Join(listed, ",") != strings.Join(want, ",") {
				t.Errorf("listed %v, want newest first %v", listed, want)
			}

			// History of another of Ada's conversations, by query or path.
			usWantContents(t, "first by session_id", usHistoryOf(t, e, usBearer(tokens[3]), "?session_id="+url.QueryEscape(first)),
				"user:about my order", "assistant:"+hdReply)
			if h := usHistoryOf(t, e, usBearer(tokens[3]), "/"+url.PathEscape(first)); h.SessionID != first || h.TotalCount != 2 {
				t.Errorf("first by path: %+v", h)
			}
			// Never another user's, nor from an anonymous session.
			graceID, graceToken := usOpen(t, e, usGrace, false, nil)
			_, anonToken := usOpen(t, e, nil, false, nil)
			for who, token := range map[string]string{"grace": graceToken, "anonymous": anonToken} {
				hdWantError(t, e.do(t, "GET", "/api/v1/chat/history?session_id="+url.QueryEscape(first), "", usBearer(token)), http.StatusNotFound, "not_found")
				hdWantError(t, e.do(t, "GET", "/api/v1/chat/history/"+url.PathEscape(first), "", usBearer(token)), http.StatusNotFound, "not_found")
				if who == "grace" {
					if c := usList(t, e, usBearer(token), ""); len(c.Conversations) != 1 || c.Conversations[0].ID == first {
						t.Errorf("grace lists %+v", c.Conversations)
					}
				}
			}
			hdWantError(t, e.do(t, "GET", "/api/v1/chat/conversations", "", usBearer(anonToken)), http.StatusForbidden, "not_verified")
			hdWantError(t, e.do(t, "GET", "/api/v1/chat/conversations", "", nil), http.StatusUnauthorized, "unauthorized")
			for _, q := range []string{"?limit=0", "?limit=x", "?before=nobody", "?before=" + url.QueryEscape(graceID)} {
				hdWantError(t, e.do(t, "GET", "/api/v1/chat/conversations"+q, "", usBearer(tokens[0])), http.StatusBadRequest, "invalid_request")
			}
			e.hdNoErrorLogs(t)
		})
	}
}

// An anonymous conversation becomes the user's when they sign in in the
// same browser: every message is kept, under a new session id, and the
// anonymous token stops working.
func TestUserAdoptsAnonymousConversation(t *testing.T) {
	for name, open := range usStores() {
		t.Run(name, func(t *testing.T) {
			for _, held := range []string{"bearer", "cookie"} {
				t.Run(held, func(t *testing.T) {
					e := newUSEnv(t, open(t))
					// Ada already has a conversation on another device.
					older, _ := usOpen(t, e, usAda, false, nil)

					anon, anonToken := usOpen(t, e, nil, false, nil)
					auth := usBearer(anonToken)
					if held == "cookie" {
						auth = usCookie(anonToken)
					}
					usSay(t, e, auth, "before signing in")

					id, token := usOpen(t, e, usAda, false, auth)
					if id == anon || id == older {
						t.Fatalf("signing in gave session %s (anonymous %s, older %s), want the anonymous conversation under a new id", id, anon, older)
					}
					usWantContents(t, "adopted", usHistoryOf(t, e, usBearer(token), ""),
						"user:before signing in", "assistant:"+hdReply)
					usSay(t, e, usBearer(token), "after signing in")
					hdWantError(t, e.do(t, "GET", "/api/v1/chat/history", "", auth), http.StatusUnauthorized, "session_expired")
					hdWantError(t, e.do(t, "POST", "/api/v1/chat/message", `{"message":"old token"}`,
						hdHeaders("Authorization", "Bearer "+anonToken, "Accept", "application/json")), http.StatusUnauthorized, "session_expired")

					// It is now Ada's latest: her other device continues it.
					if again, _ := usOpen(t, e, usAda, false, nil); again != id {
						t.Errorf("Ada's other device continued %s, want the adopted %s", again, id)
					}
					c := usList(t, e, usBearer(token), "")
					if len(c.Conversations) != 2 {
						t.Errorf("Ada lists %d conversations, want 2 (older, adopted)", len(c.Conversations))
					}
					e.hdNoErrorLogs(t)
				})
			}
		})
	}
}

// An anonymous session with nothing said is not adopted: the user
// continues their conversation; new_conversation leaves the anonymous
// one alone.
func TestUserAnonymousWithoutMessagesNotAdopted(t *testing.T) {
	for name, open := range usStores() {
		t.Run(name, func(t *testing.T) {
			e := newUSEnv(t, open(t))
			older, olderToken := usOpen(t, e, usAda, false, nil)
			usSay(t, e, usBearer(olderToken), "earlier")
			_, emptyToken := usOpen(t, e, nil, false, nil)
			if id, _ := usOpen(t, e, usAda, false, usBearer(emptyToken)); id != older {
				t.Errorf("signing in with an empty anonymous session gave %s, want the latest %s", id, older)
			}

			anon, anonToken := usOpen(t, e, nil, false, nil)
			usSay(t, e, usBearer(anonToken), "anonymous words")
			fresh, _ := usOpen(t, e, usAda, true, usBearer(anonToken))
			if fresh == anon || fresh == older {
				t.Errorf("new_conversation gave %s", fresh)
			}
			usWantContents(t, "anonymous after new_conversation", usHistoryOf(t, e, usBearer(anonToken), ""),
				"user:anonymous words", "assistant:"+hdReply)
		})
	}
}

func usSigned(t *testing.T, e *hdEnv, secret, body string, at time.Time) *httptest.ResponseRecorder {
	t.Helper()
	ts, sig := signed.Sign([]byte(secret), []byte(body), at)
	return e.do(t, "DELETE", "/api/v1/user/data", body, hdHeaders(signed.HeaderTimestamp, ts, signed.HeaderSignature, sig))
}

// DELETE /user/data signed with identity_secret erases every
// conversation of the user, whose tokens then fail; unsigned, badly
// signed, stale or replayed calls are refused and erase nothing.
func TestUserErasure(t *testing.T) {
	for name, open := range usStores() {
		t.Run(name, func(t *testing.T) {
			e := newUSEnv(t, open(t))
			_, laptopToken := usOpen(t, e, usAda, false, nil)
			usSay(t, e, usBearer(laptopToken), "my address is ...")
			_, phoneToken := usOpen(t, e, usAda, false, nil)
			_, secondToken := usOpen(t, e, usAda, true, nil)
			usSay(t, e, usBearer(secondToken), "second conversation")
			_, graceToken := usOpen(t, e, usGrace, false, nil)
			usSay(t, e, usBearer(graceToken), "grace stays")
			_, anonToken := usOpen(t, e, nil, false, nil)
			usSay(t, e, usBearer(anonToken), "anonymous stays")
			countBefore := usStats(t, e)

			body := `{"user_id":"user-42"}`
			now := time.Now()
			good := func() (string, string) { return signed.Sign([]byte(usErasureSecret), []byte(body), now) }
			ts, sig := good()
			for _, tc := range []struct {
				name    string
				headers map[string]string
				body    string
			}{
				{"unsigned", nil, body},
				{"wrong secret", func() map[string]string {
					ts, sig := signed.Sign([]byte("another-secret-of-32-bytes-or-more-0123456"), []byte(body), now)
					return hdHeaders(signed.HeaderTimestamp, ts, signed.HeaderSignature, sig)
				}(), body},
				{"signature of another body", hdHeaders(signed.HeaderTimestamp, ts, signed.HeaderSignature, sig), `{"user_id":"user-7"}`},
				{"stale", func() map[string]string {
					ts, sig := signed.Sign([]byte(usErasureSecret), []byte(body), now.Add(-time.Hour))
					return hdHeaders(signed.HeaderTimestamp, ts, signed.HeaderSignature, sig)
				}(), body},
				{"malformed", hdHeaders(signed.HeaderTimestamp, ts, signed.HeaderSignature, "sha256=zz"), body},
			} {
				rec := e.do(t, "DELETE", "/api/v1/user/data", tc.body, tc.headers)
				if rec.Code != http.StatusUnauthorized {
					t.Errorf("%s: %d %s, want 401", tc.name, rec.Code, rec.Body)
				}
			}
			if got := usStats(t, e); got != countBefore {
				t.Fatalf("refused erasures changed the store: %+v, was %+v", got, countBefore)
			}

			rec := e.do(t, "DELETE", "/api/v1/user/data", body, hdHeaders(signed.HeaderTimestamp, ts, signed.HeaderSignature, sig))
			if rec.Code != http.StatusNoContent || rec.Body.Len() != 0 {
				t.Fatalf("erasure: %d %s, want 204", rec.Code, rec.Body)
			}
			// The same signed request again is a replay.
			hdWantError(t, e.do(t, "DELETE", "/api/v1/user/data", body, hdHeaders(signed.HeaderTimestamp, ts, signed.HeaderSignature, sig)),
				http.StatusUnauthorized, "invalid_signature")

			for _, token := range []string{laptopToken, phoneToken, secondToken} {
				hdWantError(t, e.do(t, "GET", "/api/v1/chat/history", "", usBearer(token)), http.StatusUnauthorized, "session_expired")
				hdWantError(t, e.do(t, "POST", "/api/v1/chat/message", `{"message":"hello?"}`,
					hdHeaders("Authorization", "Bearer "+token, "Accept", "application/json")), http.StatusUnauthorized, "session_expired")
			}
			after := usStats(t, e)
			if after.Sessions != countBefore.Sessions-2 || after.Messages != countBefore.Messages-4 {
				t.Errorf("after erasure %+v, want 2 sessions and 4 messages fewer than %+v", after, countBefore)
			}
			usWantContents(t, "grace", usHistoryOf(t, e, usBearer(graceToken), ""), "user:grace stays", "assistant:"+hdReply)
			usWantContents(t, "anonymous", usHistoryOf(t, e, usBearer(anonToken), ""), "user:anonymous stays", "assistant:"+hdReply)
			// Signing in again starts from nothing.
			_, fresh := usOpen(t, e, usAda, false, nil)
			if c := usList(t, e, usBearer(fresh), ""); len(c.Conversations) != 1 || c.Conversations[0].MessageCount != 0 {
				t.Errorf("after erasure Ada lists %+v", c.Conversations)
			}

			// Idempotent: an unknown user, or Ada again, is 204 (signed a
			// few seconds on: the same second's signature of the same body
			// would be the one already used).
			for _, b := range []string{`{"user_id":"nobody"}`, `{"user_id":"user-42"}`} {
				if rec := usSigned(t, e, usErasureSecret, b, now.Add(3*time.Second)); rec.Code != http.StatusNoContent {
					t.Errorf("erasure of %s: %d %s", b, rec.Code, rec.Body)
				}
			}
			// Signed but not a user: 400.
			for _, b := range []string{`{"user_id":""}`, `{}`, `[1]`, `{"user_id":"a"} x`} {
				if rec := usSigned(t, e, usErasureSecret, b, time.Now()); rec.Code != http.StatusBadRequest {
					t.Errorf("erasure with %s: %d %s, want 400", b, rec.Code, rec.Body)
				}
			}
			e.hdNoErrorLogs(t)
		})
	}
}

// Without identity_secret there is nothing to erase by: 404.
func TestUserErasureOff(t *testing.T) {
	e := newHDEnv(t, hdSQLite(t), nil)
	hdWantError(t, usSigned(t, e, usErasureSecret, `{"user_id":"user-42"}`, time.Now()), http.StatusNotFound, "not_found")
}

func usStats(t *testing.T, e *hdEnv) sessions.Stats {
	t.Helper()
	st, err := e.store.Stats(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return *st
}

// failingErase is a store whose DeleteUser fails while failures > 0.
type failingErase struct {
	sessions.Store
	failures int
}

func (f *failingErase) DeleteUser(ctx context.Context, realm, userID string) (int64, int64, error) {
	if f.failures > 0 {
		f.failures--
		return 0, 0, errors.New("database is down")
	}
	return f.Store.DeleteUser(ctx, realm, userID)
}

// An erasure the store failed is 503 and erases nothing, and the site's
// retry of the very same signed request is carried out, not refused as
// a replay.
func TestUserErasureRetryAfterStoreFailure(t *testing.T) {
	for name, open := range usStores() {
		t.Run(name, func(t *testing.T) {
			store := &failingErase{Store: open(t), failures: 1}
			e := newHDEnv(t, store, func(c *Config) {
				c.Erasure = &signed.Verifier{Secret: []byte(usErasureSecret), Replay: signed.NewMemoryReplay(0, nil)}
			})
			_, token := usOpen(t, e, usAda, false, nil)
			usSay(t, e, usBearer(token), "please forget me")

			body := `{"user_id":"user-42"}`
			ts, sig := signed.Sign([]byte(usErasureSecret), []byte(body), time.Now())
			headers := hdHeaders(signed.HeaderTimestamp, ts, signed.HeaderSignature, sig)
			hdWantError(t, e.do(t, "DELETE", "/api/v1/user/data", body, headers), http.StatusServiceUnavailable, "store_unavailable")
			if h := usHistoryOf(t, e, usBearer(token), ""); h.TotalCount != 2 {
				t.Fatalf("after the failed erasure %d messages, want 2 kept", h.TotalCount)
			}
			if rec := e.do(t, "DELETE", "/api/v1/user/data", body, headers); rec.Code != http.StatusNoContent {
				t.Fatalf("retry of the same request: %d %s, want 204", rec.Code, rec.Body)
			}
			hdWantError(t, e.do(t, "GET", "/api/v1/chat/history", "", usBearer(token)), http.StatusUnauthorized, "session_expired")
			// Once carried out, the signature is spent.
			hdWantError(t, e.do(t, "DELETE", "/api/v1/user/data", body, headers), http.StatusUnauthorized, "invalid_signature")
		})
	}
}
