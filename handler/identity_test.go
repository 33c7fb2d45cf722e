package handler_test

import (
	"encoding/json"
	"maps"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

const (
	testIdentitySecret  = "test-identity-secret-0123456789abcdefgh"
	otherIdentitySecret = "another-identity-secret-0123456789abcdef"
)

// identityEnv is a chat environment with identity_secret set (unless
// off) and its log observed.
func identityEnv(t *testing.T, kind string, off bool, mutate func(*envConfig)) (*chatEnv, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) {
		if !off {
			c.IdentitySecret = testIdentitySecret
		}
		c.Logger = zap.New(core)
		if mutate != nil {
			mutate(c)
		}
	}})
	return e, logs
}

func identityToken(t *testing.T, method jwt.SigningMethod, secret string, claims jwt.MapClaims) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(method, claims).SignedString([]byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// sessionCount is how many sessions the store holds.
func (e *chatEnv) sessionCount(t *testing.T) int64 {
	t.Helper()
	st, err := e.store.Stats(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return st.Sessions
}

// TestIdentityCreateMatrix is issue 16's matrix at POST
// {prefix}/session/create, on both stores: a good proof creates a session
// of that user, whose messages reach n8n with "user" (verified) in the
// body and the token; every bad one is 401 invalid_identity, creates
// nothing, and logs one line without the secret, the hash or the token.
func TestIdentityCreateMatrix(t *testing.T) {
	t.Parallel()
	hash := identity.Hash([]byte(testIdentitySecret), "user-42")
	exp := func(d time.Duration) int64 { return time.Now().Add(d).Unix() }
	hs256 := func(claims jwt.MapClaims) string {
		return identityToken(t, jwt.SigningMethodHS256, testIdentitySecret, claims)
	}
	cases := []struct {
		name     string
		off      bool // no identity_secret
		body     map[string]any
		wantUser *testkit.N8nUser // nil: refused
		reason   string
	}{
		{name: "good hash", body: map[string]any{"user_id": "user-42", "user_hash": hash, "name": "Ada Lovelace", "email": "ada@example.com"},
			wantUser: &testkit.N8nUser{ID: "user-42", Name: "Ada Lovelace", Email: "ada@example.com", Verified: true}},
		{name: "good token", body: map[string]any{"identity_token": hs256(jwt.MapClaims{"sub": "user-7", "exp": exp(time.Hour), "name": "Grace", "attributes": map[string]any{"plan": "pro"}})},
			wantUser: &testkit.N8nUser{ID: "user-7", Name: "Grace", Verified: true}},
		{name: "wrong hash", body: map[string]any{"user_id": "user-43", "user_hash": hash}, reason: identity.ReasonWrongHash},
		{name: "wrong secret", body: map[string]any{"user_id": "user-42", "user_hash": identity.Hash([]byte(otherIdentitySecret), "user-42")}, reason: identity.ReasonWrongHash},
		{name: "malformed hex", body: map[string]any{"user_id": "user-42", "user_hash": strings.Repeat("g", 64)}, reason: identity.ReasonMalformedHash},
		{name: "user_id alone", body: map[string]any{"user_id": "user-42"}, reason: identity.ReasonIncomplete},
		{name: "oversized user_id", body: map[string]any{"user_id": strings.Repeat("u", 300), "user_hash": identity.Hash([]byte(testIdentitySecret), strings.Repeat("u", 300))}, reason: identity.ReasonBadField},
		{name: "oversized name", body: map[string]any{"user_id": "user-42", "user_hash": hash, "name": strings.Repeat("n", 300)}, reason: identity.ReasonBadField},
		{name: "expired", body: map[string]any{"identity_token": hs256(jwt.MapClaims{"sub": "user-7", "exp": exp(-10 * time.Minute)})}, reason: identity.ReasonExpired},
		{name: "no exp", body: map[string]any{"identity_token": hs256(jwt.MapClaims{"sub": "user-7"})}, reason: identity.ReasonNoExpiry},
		{name: "far-future exp", body: map[string]any{"identity_token": hs256(jwt.MapClaims{"sub": "user-7", "exp": exp(48 * time.Hour)})}, reason: identity.ReasonTooFar},
		{name: "alg HS512", body: map[string]any{"identity_token": identityToken(t, jwt.SigningMethodHS512, testIdentitySecret, jwt.MapClaims{"sub": "user-7", "exp": exp(time.Hour)})}, reason: identity.ReasonMethod},
		{name: "token with the wrong secret", body: map[string]any{"identity_token": identityToken(t, jwt.SigningMethodHS256, otherIdentitySecret, jwt.MapClaims{"sub": "user-7", "exp": exp(time.Hour)})}, reason: identity.ReasonSignature},
		{name: "identity without identity_secret", off: true, body: map[string]any{"user_id": "user-42", "user_hash": hash}, reason: identity.ReasonNotConfigured},
	}
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					e, logs := identityEnv(t, kind, tc.off, nil)
					e.fake.SetScript(testkit.Output("hello"))
					tc.body = maps.Clone(tc.body) // the store kinds run in parallel
					tc.body["page_url"] = "https://shop.example.com/account"
					rec := e.serve(t, "POST", "/api/v1/session/create", jsonString(tc.body), map[string]string{"Origin": allowedOrigin})
					if tc.wantUser == nil {
						wantError(t, rec, http.StatusUnauthorized, "invalid_identity")
						if n := e.sessionCount(t); n != 0 {
							t.Fatalf("a refused proof created %d sessions", n)
						}
						if rec.Header().Get("Set-Cookie") != "" {
							t.Fatal("a refused proof set a cookie")
						}
						refusals := logs.FilterMessage("identity refused").All()
						if len(refusals) != 1 || refusals[0].ContextMap()["reason"] != tc.reason {
							t.Fatalf("refusal log lines %v, want one with reason %s", refusals, tc.reason)
						}
						for _, entry := range logs.All() {
							line := entry.Message + " " + jsonString(entry.ContextMap())
							for _, secret := range []any{testIdentitySecret, tc.body["user_hash"], tc.body["identity_token"]} {
								if s, _ := secret.(string); s != "" && strings.Contains(line, s) {
									t.Fatalf("log line %q holds a secret, hash or token", line)
								}
							}
						}
						return
					}
					if rec.Code != http.StatusCreated {
						t.Fatalf("create: %d %s", rec.Code, rec.Body)
					}
					s := decode[created](t, rec)
					stored, err := e.store.GetSession(t.Context(), s.SessionID)
					if err != nil || stored.User == nil || stored.User.ID != tc.wantUser.ID || stored.User.Name != tc.wantUser.Name {
						t.Fatalf("stored session %+v (%v): want user %+v", stored, err, tc.wantUser)
					}
					// The SSE API (the default answer to a chat message).
					rec = e.serve(t, "POST", "/api/v1/chat/message", `{"message":"hi"}`, authz(s.Token, "Origin", allowedOrigin))
					if rec.Code != http.StatusOK || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/event-stream") {
						t.Fatalf("message: %d %s %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
					}
					c := e.fake.Last(t)
					u := c.Body.User
					if u == nil || u.ID != tc.wantUser.ID || u.Name != tc.wantUser.Name || u.Email != tc.wantUser.Email || !u.Verified || len(u.Attributes) == 0 {
						t.Fatalf("n8n body user %+v (body %s), want %+v", u, c.Raw, tc.wantUser)
					}
					claim, _ := c.Claims["user"].(map[string]any)
					if claim["id"] != tc.wantUser.ID || claim["verified"] != true || claim["name"] != tc.wantUser.Name {
						t.Fatalf("n8n token user claim %v, want %+v", c.Claims["user"], tc.wantUser)
					}
				})
			}
		})
	}
}

// TestIdentityAnonymousN8nHasNoUser: an anonymous visitor's messages reach
// n8n with no "user", neither in the body nor in the token, and a "user"
// the page puts in its context arrives as metadata.unverified_user, never
// as something that looks verified.
func TestIdentityAnonymousN8nHasNoUser(t *testing.T) {
	t.Parallel()
	e, _ := identityEnv(t, "sqlite", false, nil)
	e.fake.SetScript(testkit.Output("hello"))
	s := e.newSession(t)
	// The key as JSON may spell it: plain, or with escapes that decode to
	// "user" (n8n reads it as "user" all the same).
	for _, key := range []string{`"user"`, `"us\u0065r"`, `"\u0075\u0073\u0065\u0072"`} {
		rec := e.serve(t, "POST", "/api/v1/chat/message",
			`{"message":"hi","context":{`+key+`:{"id":"admin","name":"Mallory","verified":true},"page":"x"}}`,
			authz(s.Token, "Origin", allowedOrigin))
		if rec.Code != http.StatusOK || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/event-stream") {
			t.Fatalf("%s: %d %s", key, rec.Code, rec.Body)
		}
		c := e.fake.Last(t)
		if _, ok := c.Fields["user"]; ok || c.Body.User != nil {
			t.Fatalf("%s: anonymous body has user: %s", key, c.Raw)
		}
		if _, ok := c.Claims["user"]; ok {
			t.Fatalf("%s: anonymous token has user: %v", key, c.Claims)
		}
		var meta map[string]json.RawMessage
		if err := json.Unmarshal(c.Body.Metadata, &meta); err != nil {
			t.Fatal(err)
		}
		if _, ok := meta["user"]; ok || !strings.Contains(string(meta["unverified_user"]), `"Mallory"`) || string(meta["page"]) != `"x"` {
			t.Fatalf("%s: metadata %s: want the page's user under unverified_user", key, c.Body.Metadata)
		}
	}
}

// widgetBody is an @n8n/chat sendMessage body with metadata.
func widgetBody(action, sessionID string, metadata map[string]any) string {
	b := map[string]any{"action": action, "sessionId": sessionID, "metadata": metadata}
	if action == "sendMessage" {
		b["chatInput"] = "hello"
	}
	return jsonString(b)
}

// TestIdentityWidget: on the @n8n/chat route the proof comes in the
// widget's metadata with every request. A verified request reaches n8n
// with "user" and without the proof fields in metadata; the verified
// conversation is apart from the anonymous one of the same sessionId (it
// adopted it: the sessionId alone no longer reaches it); a
// bad proof is 401 for sendMessage and loadPreviousSession alike, and
// nothing reaches n8n or the store.
func TestIdentityWidget(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e, logs := identityEnv(t, kind, false, nil)
			e.fake.SetScript(testkit.Output("hello"))
			const sid = "widget-identity-0001"
			h := map[string]string{"Origin": allowedOrigin, "Content-Type": "application/json"}
			proof := map[string]any{"user_id": "user-42", "user_hash": identity.Hash([]byte(testIdentitySecret), "user-42"),
				"name": "Ada Lovelace", "email": "ada@example.com", "source": "shop", "user": map[string]any{"id": "admin", "verified": true}}

			// Anonymous first: n8n gets no user.
			rec := e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("sendMessage", sid, map[string]any{"source": "shop"}), h)
			if rec.Code != http.StatusOK {
				t.Fatalf("anonymous: %d %s", rec.Code, rec.Body)
			}
			anon := e.fake.Last(t)
			if _, ok := anon.Fields["user"]; ok {
				t.Fatalf("anonymous widget body has user: %s", anon.Raw)
			}

			// Verified, same sessionId.
			rec = e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("sendMessage", sid, proof), h)
			if rec.Code != http.StatusOK {
				t.Fatalf("verified: %d %s", rec.Code, rec.Body)
			}
			c := e.fake.Last(t)
			if u := c.Body.User; u == nil || u.ID != "user-42" || u.Name != "Ada Lovelace" || u.Email != "ada@example.com" || !u.Verified {
				t.Fatalf("verified widget body user %+v: %s", u, c.Raw)
			}
			if claim, _ := c.Claims["user"].(map[string]any); claim["id"] != "user-42" || claim["verified"] != true {
				t.Fatalf("token user claim %v", c.Claims["user"])
			}
			var meta map[string]json.RawMessage
			if err := json.Unmarshal(c.Body.Metadata, &meta); err != nil {
				t.Fatal(err)
			}
			for _, k := range []string{"user_id", "user_hash", "identity_token", "name", "email", "user"} {
				if _, ok := meta[k]; ok {
					t.Fatalf("forwarded metadata keeps %s: %s", k, c.Body.Metadata)
				}
			}
			if string(meta["source"]) != `"shop"` || !strings.Contains(string(meta["unverified_user"]), `"admin"`) {
				t.Fatalf("forwarded metadata %s", c.Body.Metadata)
			}
			if c.Body.SessionID == anon.Body.SessionID {
				t.Fatal("the verified conversation is the anonymous one of the same sessionId")
			}
			stored, err := e.store.GetSession(t.Context(), c.Body.SessionID)
			if err != nil || stored.User == nil || stored.User.ID != "user-42" {
				t.Fatalf("verified widget conversation %+v, %v", stored, err)
			}
			page, err := e.store.ListMessages(t.Context(), c.Body.SessionID, "", 10)
			if err != nil || len(page.Messages) == 0 || strings.Contains(string(page.Messages[0].Metadata), "user_hash") {
				t.Fatalf("stored user message %+v, %v: the hash must not be stored", page, err)
			}

			// History: the login adopted the anonymous conversation (see
			// TestWidgetUserDevices); the sessionId alone reaches none of it.
			anonHist := e.widgetLoadMeta(t, sid, map[string]any{})
			verHist := e.widgetLoadMeta(t, sid, proof)
			if len(anonHist) != 0 || len(verHist) != 4 {
				t.Fatalf("history: anonymous %d messages, verified %d; want 0 and 4", len(anonHist), len(verHist))
			}

			// A bad proof: 401, nothing forwarded or stored.
			hits := e.fake.Hits()
			bad := map[string]any{"user_id": "user-42", "user_hash": identity.Hash([]byte(otherIdentitySecret), "user-42")}
			for _, action := range []string{"sendMessage", "loadPreviousSession"} {
				rec = e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody(action, sid, bad), h)
				wantError(t, rec, http.StatusUnauthorized, "invalid_identity")
			}
			rec = e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("sendMessage", sid, map[string]any{"user_hash": 7}), h)
			wantError(t, rec, http.StatusUnauthorized, "invalid_identity")
			if e.fake.Hits() != hits {
				t.Fatal("a refused proof reached n8n")
			}
			if n := e.sessionCount(t); n != 1 {
				t.Fatalf("%d sessions, want the verified conversation only (the anonymous one adopted)", n)
			}
			if n := len(logs.FilterMessage("identity refused").All()); n != 3 {
				t.Fatalf("%d refusal log lines, want one per refused request (3)", n)
			}
		})
	}
}

// TestIdentityWidgetWithoutSecret: a widget proof without identity_secret
// is refused; metadata without a proof (user_id alone, a page's own user)
// passes unchanged, as before identity existed.
func TestIdentityWidgetWithoutSecret(t *testing.T) {
	t.Parallel()
	e, _ := identityEnv(t, "sqlite", true, nil)
	e.fake.SetScript(testkit.Output("hello"))
	h := map[string]string{"Origin": allowedOrigin, "Content-Type": "application/json"}
	rec := e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("sendMessage", "widget-identity-0002",
		map[string]any{"user_id": "user-42", "user_hash": identity.Hash([]byte(testIdentitySecret), "user-42")}), h)
	wantError(t, rec, http.StatusUnauthorized, "invalid_identity")
	rec = e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("sendMessage", "widget-identity-0002",
		map[string]any{"user_id": "user-42", "user": map[string]any{"id": "x"}}), h)
	if rec.Code != http.StatusOK {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	c := e.fake.Last(t)
	if _, ok := c.Fields["user"]; ok {
		t.Fatalf("unverified metadata produced a user: %s", c.Raw)
	}
	var meta map[string]json.RawMessage
	_ = json.Unmarshal(c.Body.Metadata, &meta)
	if string(meta["user_id"]) != `"user-42"` || string(meta["user"]) != `{"id":"x"}` {
		t.Fatalf("metadata %s changed without identity_secret", c.Body.Metadata)
	}
}

func (e *chatEnv) widgetLoadMeta(t *testing.T, sessionID string, metadata map[string]any) []lcMessage {
	t.Helper()
	rec := e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("loadPreviousSession", sessionID, metadata),
		map[string]string{"Origin": allowedOrigin, "Content-Type": "application/json"})
	if rec.Code != http.StatusOK {
		t.Fatalf("loadPreviousSession: %d %s", rec.Code, rec.Body)
	}
	var body struct {
		Data []lcMessage `json:"data"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		t.Fatal(err)
	}
	return body.Data
}

// TestIdentityUserRateLimit: the user tier counts a verified user's
// messages across their sessions: two sessions ("devices") of one user
// share its budget, while another user's is their own.
func TestIdentityUserRateLimit(t *testing.T) {
	t.Parallel()
	e, _ := identityEnv(t, "sqlite", false, func(c *envConfig) {
		c.Limits = limitsOver(generousLimits(), map[string][]string{"user": {"2/1m"}})
	})
	e.fake.SetScript(testkit.Output("ok"))
	create := func(id string) created {
		rec := e.serve(t, "POST", "/api/v1/session/create",
			jsonString(map[string]any{"user_id": id, "user_hash": identity.Hash([]byte(testIdentitySecret), id)}), map[string]string{"Origin": allowedOrigin})
		if rec.Code != http.StatusCreated {
			t.Fatalf("create: %d %s", rec.Code, rec.Body)
		}
		return decode[created](t, rec)
	}
	send := func(s created) int {
		return e.serve(t, "POST", "/api/v1/chat/message", `{"message":"hi"}`, authz(s.Token, "Origin", allowedOrigin, "Accept", "application/json")).Code
	}
	phone, laptop, other := create("user-42"), create("user-42"), create("user-43")
	if c := send(phone); c != http.StatusOK {
		t.Fatalf("first message: %d", c)
	}
	if c := send(laptop); c != http.StatusOK {
		t.Fatalf("second message, other device: %d", c)
	}
	rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"hi"}`, authz(phone.Token, "Origin", allowedOrigin, "Accept", "application/json"))
	if rec.Code != http.StatusTooManyRequests || decode[guard.RateLimitBody](t, rec).Tier != guard.TierUser {
		t.Fatalf("third message of the user: %d %s, want 429 from the user tier", rec.Code, rec.Body)
	}
	if c := send(other); c != http.StatusOK {
		t.Fatalf("another user's message: %d", c)
	}

	// The widget's conversations of one user share it too.
	h := map[string]string{"Origin": allowedOrigin, "Content-Type": "application/json"}
	proof := map[string]any{"user_id": "user-44", "user_hash": identity.Hash([]byte(testIdentitySecret), "user-44")}
	for i, sid := range []string{"widget-identity-a001", "widget-identity-b001", "widget-identity-a001"} {
		rec := e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("sendMessage", sid, proof), h)
		want := http.StatusOK
		if i == 2 {
			want = http.StatusTooManyRequests
		}
		if rec.Code != want {
			t.Fatalf("widget message %d: %d %s, want %d", i+1, rec.Code, rec.Body, want)
		}
	}
}

// TestIdentityLogPrivacy: with log_content off (the default) no log line
// holds a verified user's name or email, nor the id a refused proof
// claimed; with it on the refusal names the claimed id.
func TestIdentityLogPrivacy(t *testing.T) {
	t.Parallel()
	for _, logContent := range []bool{false, true} {
		e, logs := identityEnv(t, "sqlite", false, func(c *envConfig) { c.LogContent = logContent })
		e.fake.SetScript(testkit.Output("ok"))
		const name, email, id = "Ada Lovelace-7f3", "ada-7f3@example.com", "user-7f3"
		rec := e.serve(t, "POST", "/api/v1/session/create", jsonString(map[string]any{
			"user_id": id, "user_hash": identity.Hash([]byte(testIdentitySecret), id), "name": name, "email": email}), map[string]string{"Origin": allowedOrigin})
		if rec.Code != http.StatusCreated {
			t.Fatalf("create: %d %s", rec.Code, rec.Body)
		}
		s := decode[created](t, rec)
		if rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"hi"}`, authz(s.Token, "Origin", allowedOrigin, "Accept", "application/json")); rec.Code != 200 {
			t.Fatalf("message: %d", rec.Code)
		}
		if rec := e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("sendMessage", "widget-identity-log1", map[string]any{
			"user_id": id, "user_hash": identity.Hash([]byte(testIdentitySecret), id), "name": name, "email": email}),
			map[string]string{"Origin": allowedOrigin, "Content-Type": "application/json"}); rec.Code != 200 {
			t.Fatalf("widget: %d", rec.Code)
		}
		rec = e.serve(t, "POST", "/api/v1/session/create", jsonString(map[string]any{
			"user_id": id, "user_hash": strings.Repeat("0", 64), "name": name, "email": email}), map[string]string{"Origin": allowedOrigin})
		wantError(t, rec, http.StatusUnauthorized, "invalid_identity")
		e.waitIdle(t)
		if logs.Len() == 0 {
			t.Fatal("nothing was logged; the test observes nothing")
		}
		claimed := false
		for _, entry := range logs.All() {
			line := entry.Message + " " + jsonString(entry.ContextMap())
			if strings.Contains(line, name) || strings.Contains(line, email) {
				t.Fatalf("log_content %v: log line %q holds the user's name or email", logContent, line)
			}
			claimed = claimed || strings.Contains(line, id)
		}
		if claimed != logContent {
			t.Fatalf("log_content %v: the claimed user id logged: %v", logContent, claimed)
		}
	}
}
