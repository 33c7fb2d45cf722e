package handler_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

func TestSessionLifecycle(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			cp := newTestProxy(t, kind, nil)
			before := time.Now().UTC()
			rec := serve(t, cp, req{method: "POST", path: "/api/v1/session/create",
				body:    `{"origin_domain":"evil.example","page_url":"https://shop.example.com/p/1","metadata":{"lang":"en"}}`,
				headers: map[string]string{"Origin": allowedOrigin, "User-Agent": "Mozilla/5.0 test"}})
			if rec.Code != http.StatusCreated {
				t.Fatalf("create: %d %s", rec.Code, rec.Body)
			}
			c := decode[created](t, rec)
			exp, err := time.Parse(time.RFC3339, c.ExpiresAt)
			if err != nil || !strings.HasSuffix(c.ExpiresAt, "Z") {
				t.Fatalf("expires_at %q is not RFC 3339 UTC: %v", c.ExpiresAt, err)
			}
			if d := exp.Sub(before); d < defaultSessionTTL-time.Minute || d > defaultSessionTTL+time.Minute {
				t.Fatalf("expires_at %v is not 7 days away", exp)
			}
			cookies := rec.Result().Cookies()
			if len(cookies) != 1 {
				t.Fatalf("cookies = %v", cookies)
			}
			ck := cookies[0]
			if ck.Name != "chat_session" || ck.Value != c.Token || !ck.HttpOnly || ck.Path != "/" ||
				ck.SameSite != http.SameSiteLaxMode || ck.Secure || ck.MaxAge < 604000 {
				t.Fatalf("cookie = %+v", ck)
			}

			// The site comes from the Origin, never from the body.
			s, err := cp.handlerStore().GetSession(context.Background(), c.SessionID)
			if err != nil {
				t.Fatal(err)
			}
			if s.Site != "shop.example.com" || s.ClientIP != "203.0.113.7" || s.PageURL != "https://shop.example.com/p/1" ||
				s.UserAgent != "Mozilla/5.0 test" || s.Fingerprint == "" || string(s.Metadata) != `{"lang":"en"}` && string(s.Metadata) != `{"lang": "en"}` {
				t.Fatalf("stored session = %+v (metadata %s)", s, s.Metadata)
			}

			rec = serve(t, cp, req{method: "GET", path: "/api/v1/session/validate", headers: bearer(c.Token)})
			if rec.Code != http.StatusOK {
				t.Fatalf("validate: %d %s", rec.Code, rec.Body)
			}
			v := decode[map[string]any](t, rec)
			if v["valid"] != true || v["session_id"] != c.SessionID || v["expires_at"] != c.ExpiresAt || v["message_count"] != float64(0) {
				t.Fatalf("validate body = %v", v)
			}

			rec = serve(t, cp, req{method: "GET", path: "/api/v1/chat/history", headers: bearer(c.Token)})
			if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), `"messages":[]`) {
				t.Fatalf("history: %d %s", rec.Code, rec.Body)
			}

			rec = serve(t, cp, req{method: "DELETE", path: "/api/v1/session", headers: bearer(c.Token)})
			if rec.Code != http.StatusNoContent {
				t.Fatalf("destroy: %d %s", rec.Code, rec.Body)
			}
			if ck := rec.Result().Cookies(); len(ck) != 1 || ck[0].MaxAge >= 0 || ck[0].Value != "" {
				t.Fatalf("destroy did not clear the cookie: %v", ck)
			}
			for _, path := range []string{"/api/v1/session/validate", "/api/v1/chat/history"} {
				wantError(t, serve(t, cp, req{method: "GET", path: path, headers: bearer(c.Token)}), http.StatusUnauthorized, "session_expired")
			}
			wantError(t, serve(t, cp, req{method: "DELETE", path: "/api/v1/session/destroy", headers: bearer(c.Token)}), http.StatusUnauthorized, "session_expired")
		})
	}
}

func TestDestroyAliasAndSessionWithoutOrigin(t *testing.T) {
	cp := newTestProxy(t, "sqlite", nil)
	// No Origin (a server or curl): allowed, and the site is the request's host.
	rec := serve(t, cp, req{method: "POST", path: "/api/v1/session/create"})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	c := decode[created](t, rec)
	s, err := cp.handlerStore().GetSession(context.Background(), c.SessionID)
	if err != nil || s.Site != "api.example.net" {
		t.Fatalf("site = %+v, %v", s, err)
	}
	if rec := serve(t, cp, req{method: "DELETE", path: "/api/v1/session/destroy", headers: bearer(c.Token)}); rec.Code != http.StatusNoContent {
		t.Fatalf("destroy alias: %d %s", rec.Code, rec.Body)
	}
}

func TestCookieAuthAndCSRF(t *testing.T) {
	cp := newTestProxy(t, "sqlite", nil)
	c := createSession(t, cp)
	cookie := "chat_session=" + c.Token
	tests := []struct {
		name    string
		headers map[string]string
		status  int
		code    string
	}{
		{"allowed origin", map[string]string{"Cookie": cookie, "Origin": allowedOrigin}, 200, ""},
		{"another allowed origin than the session's", map[string]string{"Cookie": cookie, "Origin": "https://a.example.org"}, 403, "origin_mismatch"},
		{"same-origin fetch without Origin", map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "same-origin"}, 200, ""},
		{"no evidence at all", map[string]string{"Cookie": cookie}, 403, "csrf_refused"},
		{"cross-site fetch", map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}, 403, "csrf_refused"},
		{"same-site fetch", map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "same-site"}, 403, "csrf_refused"},
		{"disallowed origin", map[string]string{"Cookie": cookie, "Origin": "https://evil.example.com"}, 403, "origin_not_allowed"},
		{"null origin", map[string]string{"Cookie": cookie, "Origin": "null"}, 403, "origin_not_allowed"},
		{"disallowed origin with bearer", map[string]string{"Authorization": "Bearer " + c.Token, "Origin": "https://evil.example.com"}, 403, "origin_not_allowed"},
		{"bearer without browser headers", map[string]string{"Authorization": "Bearer " + c.Token}, 200, ""},
		{"malformed Authorization does not fall back to the cookie", map[string]string{"Authorization": "Basic Zm9v", "Cookie": cookie, "Origin": allowedOrigin}, 401, "invalid_token"},
		{"no credentials", map[string]string{"Origin": allowedOrigin}, 401, "unauthorized"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := serve(t, cp, req{method: "GET", path: "/api/v1/session/validate", headers: tt.headers})
			if tt.code == "" {
				if rec.Code != tt.status {
					t.Fatalf("status %d, body %s", rec.Code, rec.Body)
				}
				return
			}
			wantError(t, rec, tt.status, tt.code)
		})
	}
}

func TestCORS(t *testing.T) {
	cp := newTestProxy(t, "sqlite", nil)
	t.Run("allowed origin gets credentialed CORS naming it", func(t *testing.T) {
		rec := serve(t, cp, req{method: "POST", path: "/api/v1/session/create", headers: map[string]string{"Origin": "https://x.example.org"}})
		h := rec.Header()
		if rec.Code != 201 || h.Get("Access-Control-Allow-Origin") != "https://x.example.org" ||
			h.Get("Access-Control-Allow-Credentials") != "true" || !strings.Contains(h.Get("Vary"), "Origin") ||
			!strings.Contains(h.Get("Access-Control-Expose-Headers"), "X-Message-ID") {
			t.Fatalf("%d %v", rec.Code, h)
		}
	})
	t.Run("preflight", func(t *testing.T) {
		rec := serve(t, cp, req{method: "OPTIONS", path: "/api/v1/session/create", headers: map[string]string{
			"Origin": allowedOrigin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}})
		h := rec.Header()
		if rec.Code != 204 || h.Get("Access-Control-Allow-Origin") != allowedOrigin || h.Get("Access-Control-Allow-Methods") != "POST, OPTIONS" ||
			!strings.Contains(h.Get("Access-Control-Allow-Headers"), "Content-Type") || h.Get("Access-Control-Max-Age") == "" ||
			!strings.Contains(strings.Join(h.Values("Vary"), ","), "Origin") {
			t.Fatalf("%d %v", rec.Code, h)
		}
	})
	for _, origin := range []string{"https://evil.example.com", "null", "http://shop.example.com", "https://shop.example.com:8443",
		"https://shop.example.com.evil.net", "https://example.org", "https://evil-example.org"} {
		t.Run("refused "+origin, func(t *testing.T) {
			rec := serve(t, cp, req{method: "OPTIONS", path: "/api/v1/session/create", headers: map[string]string{
				"Origin": origin, "Access-Control-Request-Method": "POST"}})
			wantError(t, rec, http.StatusForbidden, "origin_not_allowed")
			if rec.Header().Get("Access-Control-Allow-Origin") != "" {
				t.Fatal("refused origin got an Allow-Origin header")
			}
			wantError(t, serve(t, cp, req{method: "POST", path: "/api/v1/session/create", headers: map[string]string{"Origin": origin}}),
				http.StatusForbidden, "origin_not_allowed")
		})
	}
}

func TestSecurityHeadersOnEveryResponse(t *testing.T) {
	cp := newTestProxy(t, "sqlite", nil)
	c := createSession(t, cp)
	for _, rq := range []req{
		{method: "POST", path: "/api/v1/session/create"},
		{method: "GET", path: "/api/v1/session/validate", headers: bearer(c.Token)},
		{method: "GET", path: "/api/v1/session/validate"},
		{method: "GET", path: "/api/v1/chat/history", headers: bearer(c.Token)},
		{method: "OPTIONS", path: "/api/v1/chat/history", headers: map[string]string{"Origin": allowedOrigin, "Access-Control-Request-Method": "GET"}},
		{method: "POST", path: "/api/v1/session/create", headers: map[string]string{"Origin": "https://evil.example"}},
		{method: "PUT", path: "/api/v1/session/create"},
		{method: "GET", path: "/health"},
		{method: "DELETE", path: "/api/v1/session", headers: bearer(c.Token)},
	} {
		rec := serve(t, cp, rq)
		h := rec.Header()
		for k, want := range map[string]string{
			"X-Content-Type-Options":  "nosniff",
			"Referrer-Policy":         "strict-origin-when-cross-origin",
			"X-Frame-Options":         "DENY",
			"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
			"Cache-Control":           "no-store",
		} {
			if got := h.Get(k); got != want {
				t.Errorf("%s %s (%d): %s = %q, want %q", rq.method, rq.path, rec.Code, k, got, want)
			}
		}
	}
}

func TestPassesUnmatchedRequestsOn(t *testing.T) {
	cp := newTestProxy(t, "sqlite", nil)
	for _, path := range []string{"/", "/index.html", "/api/v1", "/api/v1/", "/api/v1/unknown", "/api/v10/session/create",
		"/api/v1/session/create/extra", "/api/v1/chat/history/a/b", "/healthz"} {
		rec := serve(t, cp, req{method: "GET", path: path, headers: map[string]string{"Origin": "https://evil.example"}})
		if rec.Code != passedOn {
			t.Errorf("%s: status %d, want it passed to the next handler", path, rec.Code)
		}
		if rec.Header().Get("X-Frame-Options") != "" {
			t.Errorf("%s: the module set headers on a response it does not own", path)
		}
	}
}

func TestMethodNotAllowed(t *testing.T) {
	cp := newTestProxy(t, "sqlite", nil)
	for _, tt := range []struct{ method, path, allow string }{
		{"GET", "/api/v1/session/create", "POST, OPTIONS"},
		{"POST", "/api/v1/session/validate", "GET, OPTIONS"},
		{"GET", "/api/v1/session", "DELETE, OPTIONS"},
		{"PUT", "/api/v1/chat/history/abc", "GET, OPTIONS"},
		{"POST", "/health", "GET, HEAD"},
	} {
		rec := serve(t, cp, req{method: tt.method, path: tt.path})
		wantError(t, rec, http.StatusMethodNotAllowed, "method_not_allowed")
		if got := rec.Header().Get("Allow"); got != tt.allow {
			t.Errorf("%s %s: Allow = %q, want %q", tt.method, tt.path, got, tt.allow)
		}
	}
}

func TestBadBodies(t *testing.T) {
	cp := newTestProxy(t, "sqlite", func(c *envConfig) { c.MaxBodySize = 2048 })
	big := `{"page_url":"https://a.example/` + strings.Repeat("x", 3000) + `"}`
	tests := []struct {
		name, body, contentType string
		status                  int
		code                    string
	}{
		{"too large", big, "application/json", 413, "payload_too_large"},
		{"form post", "page_url=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"},
		{"text/plain", `{"page_url":"https://a.example"}`, "text/plain", 415, "unsupported_media_type"},
		{"no content type", `{"page_url":"https://a.example"}`, "", 415, "unsupported_media_type"},
		{"latin1 charset", `{}`, "application/json; charset=latin1", 415, "unsupported_media_type"},
		{"malformed", `{"page_url":`, "application/json", 400, "invalid_json"},
		{"array", `[1,2]`, "application/json", 400, "invalid_json"},
		{"null", `null`, "application/json", 400, "invalid_json"},
		{"trailing data", `{} {}`, "application/json", 400, "invalid_json"},
		{"wrong type", `{"page_url":5}`, "application/json", 400, "invalid_request"},
		{"invalid utf-8", "{\"page_url\":\"https://a.example/\xff\"}", "application/json", 400, "invalid_json"},
		{"javascript url", `{"page_url":"javascript:alert(1)"}`, "application/json", 400, "invalid_request"},
		{"relative url", `{"page_url":"/p/1"}`, "application/json", 400, "invalid_request"},
		{"metadata not an object", `{"metadata":[1]}`, "application/json", 400, "invalid_request"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := serve(t, cp, req{method: "POST", path: "/api/v1/session/create", body: tt.body,
				headers: map[string]string{"Content-Type": tt.contentType}})
			wantError(t, rec, tt.status, tt.code)
		})
	}
	t.Run("charset utf-8 and unknown fields are fine", func(t *testing.T) {
		rec := serve(t, cp, req{method: "POST", path: "/api/v1/session/create", body: `{"page_url":"https://a.example/","x":1}`,
			headers: map[string]string{"Content-Type": "application/json; charset=UTF-8"}})
		if rec.Code != 201 {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
	})
}

func TestHistory(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			cp := newTestProxy(t, kind, nil)
			store := cp.handlerStore()
			a, b := createSession(t, cp), createSession(t, cp)
			ctx := context.Background()
			for i := range 5 {
				role := sessions.RoleUser
				if i%2 == 1 {
					role = sessions.RoleAssistant
				}
				if err := store.AppendMessage(ctx, &sessions.Message{SessionID: a.SessionID, Role: role, Content: fmt.Sprintf("m%d <b>&", i), Status: sessions.StatusComplete}); err != nil {
					t.Fatal(err)
				}
			}
			get := func(path string, token string) *httptest.ResponseRecorder {
				return serve(t, cp, req{method: "GET", path: path, headers: bearer(token)})
			}

			rec := get("/api/v1/chat/history?limit=2", a.Token)
			h := decode[historyBody](t, rec)
			if rec.Code != 200 || h.SessionID != a.SessionID || len(h.Messages) != 2 || h.TotalCount != 5 || !h.HasMore ||
				h.Messages[0].Content != "m3 <b>&" || h.Messages[1].Content != "m4 <b>&" || h.Messages[1].Role != "assistant" && h.Messages[1].Role != "user" {
				t.Fatalf("page 1: %d %+v", rec.Code, h)
			}
			if !strings.Contains(rec.Body.String(), `\u003cb\u003e\u0026`) {
				t.Fatalf("JSON is not HTML-safe escaped: %s", rec.Body)
			}
			rec = get("/api/v1/chat/history/"+a.SessionID+"?limit=2&before="+h.Messages[0].ID, a.Token)
			h2 := decode[historyBody](t, rec)
			if len(h2.Messages) != 2 || h2.Messages[0].Content != "m1 <b>&" || !h2.HasMore {
				t.Fatalf("page 2: %+v", h2)
			}
			rec = get("/api/v1/chat/history?limit=2&before="+h2.Messages[0].ID, a.Token)
			h3 := decode[historyBody](t, rec)
			if len(h3.Messages) != 1 || h3.Messages[0].Content != "m0 <b>&" || h3.HasMore || h3.Messages[0].Status != "complete" {
				t.Fatalf("page 3: %+v", h3)
			}
			if _, err := time.Parse(time.RFC3339Nano, h3.Messages[0].CreatedAt); err != nil {
				t.Fatalf("created_at: %v", err)
			}
			if h := decode[historyBody](t, get("/api/v1/chat/history?limit=500", a.Token)); len(h.Messages) != 5 || h.HasMore {
				t.Fatalf("limit above the cap: %+v", h)
			}

			for _, q := range []string{"limit=0", "limit=-1", "limit=abc", "limit=1.5"} {
				wantError(t, get("/api/v1/chat/history?"+q, a.Token), 400, "invalid_request")
			}
			wantError(t, get("/api/v1/chat/history?before=nope", a.Token), 400, "invalid_request")

			// Another visitor's session is indistinguishable from a missing one.
			other := get("/api/v1/chat/history/"+a.SessionID, b.Token)
			missing := get("/api/v1/chat/history/NOSUCHSESSION", b.Token)
			wantError(t, other, 404, "not_found")
			wantError(t, missing, 404, "not_found")
			if other.Body.String() != missing.Body.String() {
				t.Fatalf("404 bodies differ: %s vs %s", other.Body, missing.Body)
			}
			if h := decode[historyBody](t, get("/api/v1/chat/history/"+b.SessionID, b.Token)); h.TotalCount != 0 {
				t.Fatalf("b sees messages: %+v", h)
			}
		})
	}
}

func TestTokensRefusedForSessionState(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			cp := newTestProxy(t, kind, nil)
			store := cp.handlerStore()
			tokens := sessions.NewTokensFor([]byte(testJWTSecret), cp.tokenAudience(), nil)
			ctx := context.Background()
			now := time.Now().UTC()

			revoked := createSession(t, cp)
			if err := store.RevokeSession(ctx, revoked.SessionID, now); err != nil {
				t.Fatal(err)
			}
			deleted := createSession(t, cp)
			// A session that expired in the store while its token claims
			// otherwise; purging it deletes it outright.
			expired := &sessions.Session{ID: "EXPIREDSESSION", Kind: sessions.KindVisitor, Site: "shop.example.com",
				CreatedAt: now.Add(-2 * time.Hour), LastSeenAt: now.Add(-2 * time.Hour), ExpiresAt: now.Add(-time.Hour)}
			if err := store.CreateSession(ctx, expired); err != nil {
				t.Fatal(err)
			}
			expiredToken, _ := tokens.Issue(&sessions.Session{ID: expired.ID, ExpiresAt: now.Add(time.Hour)})
			unknownToken, _ := tokens.Issue(&sessions.Session{ID: "NEVERSTORED", ExpiresAt: now.Add(time.Hour)})
			widget := &sessions.Session{ID: "WIDGETSESSION", Kind: sessions.KindWidget, Site: "shop.example.com",
				CreatedAt: now, LastSeenAt: now, ExpiresAt: now.Add(time.Hour)}
			if err := store.CreateSession(ctx, widget); err != nil {
				t.Fatal(err)
			}
			widgetToken, _ := tokens.Issue(widget)

			deletedToken := deleted.Token
			if _, _, err := store.Purge(ctx, now.Add(365*24*time.Hour), time.Time{}); err != nil {
				t.Fatal(err)
			}
			for name, token := range map[string]string{
				"revoked": revoked.Token, "deleted": deletedToken, "expired in the store": expiredToken,
				"never stored": unknownToken, "widget session": widgetToken,
			} {
				t.Run(name, func(t *testing.T) {
					wantError(t, serve(t, cp, req{method: "GET", path: "/api/v1/session/validate", headers: bearer(token)}), 401, "session_expired")
				})
			}
			otherKey, _ := sessions.NewTokens([]byte("another-key-0123456789abcdef-0123456789"), nil).Issue(&sessions.Session{ID: "X", ExpiresAt: now.Add(time.Hour)})
			wantError(t, serve(t, cp, req{method: "GET", path: "/api/v1/session/validate", headers: bearer(otherKey)}), 401, "invalid_token")
		})
	}
}

func TestConcurrentSessionCreation(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			cp := newTestProxy(t, kind, nil)
			const n = 200
			recs := make([]*httptest.ResponseRecorder, n)
			var wg sync.WaitGroup
			for i := range n {
				// serve may call t.Fatalf, which belongs to this goroutine
				// only; the goroutines just record, the checks come after.
				wg.Go(func() { recs[i] = serveRecorded(cp, req{method: "POST", path: "/api/v1/session/create"}) })
			}
			wg.Wait()
			ids := make([]string, n)
			for i, rec := range recs {
				if rec.Code != http.StatusCreated {
					t.Fatalf("create %d: %d %s", i, rec.Code, rec.Body)
				}
				ids[i] = decode[created](t, rec).SessionID
			}
			seen := make(map[string]bool)
			store := cp.handlerStore()
			for _, id := range ids {
				if id == "" || seen[id] {
					t.Fatalf("missing or repeated id %q", id)
				}
				seen[id] = true
				if _, err := store.GetSession(context.Background(), id); err != nil {
					t.Fatalf("session %s not stored: %v", id, err)
				}
			}
			st, err := store.Stats(context.Background())
			if err != nil || st.Sessions != n {
				t.Fatalf("stats = %+v, %v", st, err)
			}
		})
	}
}

func TestHealth(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind+" up", func(t *testing.T) {
			cp := newTestProxy(t, kind, nil)
			rec := serve(t, cp, req{method: "GET", path: "/health"})
			var h struct {
				Status string
				Checks map[string]struct {
					Status    string
					LatencyMS *float64 `json:"latency_ms"`
				}
			}
			if err := json.Unmarshal(rec.Body.Bytes(), &h); err != nil || rec.Code != 200 || h.Status != "ok" ||
				h.Checks["database"].Status != "ok" || h.Checks["database"].LatencyMS == nil || h.Checks["redis"].Status != "disabled" {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
		})
	}
	t.Run("database down", func(t *testing.T) {
		cp := newTestProxy(t, "sqlite", func(c *envConfig) {
			c.Database = "postgres://chat:hunter2-secret@127.0.0.1:1/chat?sslmode=disable&connect_timeout=1"
		})
		rec := serve(t, cp, req{method: "GET", path: "/health"})
		if rec.Code != 503 || !strings.Contains(rec.Body.String(), `"status":"down"`) {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		for _, leak := range []string{"127.0.0.1", "hunter2", "postgres", "chat:", "webhook"} {
			if strings.Contains(rec.Body.String(), leak) {
				t.Fatalf("health body leaks %q: %s", leak, rec.Body)
			}
		}
		// Session creation with the store down is a clear 503, not a 500.
		wantError(t, serve(t, cp, req{method: "POST", path: "/api/v1/session/create"}), 503, "store_unavailable")
	})
}
