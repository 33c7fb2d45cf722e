package handler

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// What a client sends is its own mistake, never a store outage: numbers
// PostgreSQL's jsonb cannot hold are refused with a 400 that names the
// field, and a User-Agent that is not text is cleaned and stored. On
// PostgreSQL every route that stores metadata, context or headers answers
// so, with no error log and no "error" outcome (which operators page on).
func TestClientInputIsNotAStoreOutage(t *testing.T) {
	e := newHDEnv(t, hdPostgres(t), nil)
	token := e.session(t, hdHeaders("Origin", hdOrigin))
	bearer := func(kv ...string) map[string]string {
		return hdHeaders(append([]string{"Authorization", "Bearer " + token, "Origin", hdOrigin}, kv...)...)
	}
	badUA := "Mozilla/5.0 \xff\xfe (X11) \x00 Gecko"
	longUA := "Mozilla/5.0 " + strings.Repeat("é", 3000)
	widget := func(sessionID, metadata string) string {
		body := `{"action":"sendMessage","sessionId":"` + sessionID + `","chatInput":"hello"`
		if metadata != "" {
			body += `,"metadata":` + metadata
		}
		return body + "}"
	}
	for _, tc := range []struct {
		name, method, path, body string
		headers                  map[string]string
		status                   int
		code, mentions           string // the error code and the field its message names
	}{
		{"session create, metadata 1e999999", "POST", "/api/v1/session/create", `{"metadata":{"a":1e999999}}`, hdHeaders("Origin", hdOrigin), 400, "invalid_request", "metadata"},
		{"session create, metadata -1e999999", "POST", "/api/v1/session/create", `{"metadata":{"a":[-1e999999]}}`, hdHeaders("Origin", hdOrigin), 400, "invalid_request", "metadata"},
		{"session create, metadata 1e-999999", "POST", "/api/v1/session/create", `{"metadata":{"a":1e-999999}}`, hdHeaders("Origin", hdOrigin), 400, "invalid_request", "metadata"},
		{"session create, User-Agent not UTF-8", "POST", "/api/v1/session/create", `{}`, hdHeaders("Origin", hdOrigin, "User-Agent", badUA), 201, "", ""},
		{"session create, User-Agent 6 KB", "POST", "/api/v1/session/create", `{}`, hdHeaders("Origin", hdOrigin, "User-Agent", longUA), 201, "", ""},
		{"chat message JSON, context 1e999999", "POST", "/api/v1/chat/message", `{"message":"hello","context":{"a":1e999999}}`, bearer("Accept", "application/json"), 400, "invalid_request", "context"},
		{"chat message SSE, context 1e-999999", "POST", "/api/v1/chat/message", `{"message":"hello","context":{"a":1e-999999}}`, bearer(), 400, "invalid_request", "context"},
		{"chat stream POST, context 1e999999", "POST", "/api/v1/chat/stream", `{"message":"hello","context":{"n":{"a":1e999999}}}`, bearer(), 400, "invalid_request", "context"},
		{"chat stream GET, message not UTF-8", "GET", "/api/v1/chat/stream?message=%FF%FE", "", bearer(), 400, "invalid_request", "message"},
		{"chat stream GET, User-Agent not UTF-8", "GET", "/api/v1/chat/stream?message=hello", "", bearer("User-Agent", badUA), 200, "", ""},
		{"widget, metadata 1e999999", "POST", "/api/v1/n8n/chat", widget("widget-input-0001", `{"a":1e999999}`), hdHeaders("Origin", hdOrigin, "Accept", "application/json"), 400, "invalid_request", "metadata"},
		{"widget, User-Agent not UTF-8 (new conversation)", "POST", "/api/v1/n8n/chat", widget("widget-input-0002", ""), hdHeaders("Origin", hdOrigin, "Accept", "application/json", "User-Agent", badUA), 200, "", ""},
		{"widget, User-Agent 6 KB (new conversation)", "POST", "/api/v1/n8n/chat", widget("widget-input-0003", ""), hdHeaders("Origin", hdOrigin, "Accept", "application/json", "User-Agent", longUA), 200, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.logs.TakeAll()
			rec := e.do(t, tc.method, tc.path, tc.body, tc.headers)
			if tc.code != "" {
				hdWantError(t, rec, tc.status, tc.code)
				if !strings.Contains(rec.Body.String(), tc.mentions) {
					t.Errorf("the error does not name %s: %s", tc.mentions, rec.Body)
				}
			} else if rec.Code != tc.status {
				t.Fatalf("got %d %s, want %d", rec.Code, rec.Body, tc.status)
			}
			e.hdNoErrorLogs(t)
			for _, l := range e.logs.FilterMessage("chat exchange").AllUntimed() {
				if out := l.ContextMap()["outcome"]; out == metrics.OutcomeError {
					t.Errorf("exchange outcome %v", out)
				}
			}
		})
	}

	// What was stored of the headers is text, cut to 512 bytes.
	for _, id := range []string{widgetSessionID("shop.example.com", "widget-input-0002", ""), widgetSessionID("shop.example.com", "widget-input-0003", "")} {
		s, err := e.store.GetSession(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if !utf8.ValidString(s.UserAgent) || strings.ContainsRune(s.UserAgent, 0) || len(s.UserAgent) > 512 || !strings.HasPrefix(s.UserAgent, "Mozilla/5.0 ") {
			t.Errorf("stored User-Agent %q", s.UserAgent)
		}
	}
	rec := e.do(t, "POST", "/api/v1/session/create", `{}`, hdHeaders("Origin", hdOrigin, "User-Agent", badUA))
	var created struct {
		SessionID string `json:"session_id"`
	}
	_ = json.Unmarshal(rec.Body.Bytes(), &created)
	s, err := e.store.GetSession(context.Background(), created.SessionID)
	if err != nil {
		t.Fatal(err)
	}
	if want := "Mozilla/5.0 \uFFFD (X11)  Gecko"; s.UserAgent != want {
		t.Errorf("stored User-Agent %q, want %q", s.UserAgent, want)
	}
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d", rec.Code)
	}
}

// Whatever data error PostgreSQL still finds in a request (SQLSTATE class
// 22, sessions.ErrInvalidData) is the request's fault: 400, not a 503
// store_unavailable with an error log. A trigger stands in for such data.
func TestStoreDataErrorIsABadRequest(t *testing.T) {
	store := hdPostgres(t)
	e := newHDEnv(t, store, nil)
	token := e.session(t, hdHeaders("Origin", hdOrigin)) // migrates the schema
	pg := store.(*sessions.PostgresStore)
	for _, stmt := range []string{
		`CREATE FUNCTION hd_data_error() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'value out of range' USING ERRCODE = '22003'; END $$`,
		`CREATE TRIGGER hd_data_error BEFORE INSERT ON chatproxy_messages FOR EACH ROW EXECUTE FUNCTION hd_data_error()`,
		`CREATE TRIGGER hd_data_error BEFORE INSERT ON chatproxy_sessions FOR EACH ROW EXECUTE FUNCTION hd_data_error()`,
	} {
		if _, err := pg.Pool().Exec(context.Background(), stmt); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name, path, body string
		headers          map[string]string
	}{
		{"session create", "/api/v1/session/create", `{}`, hdHeaders("Origin", hdOrigin)},
		{"chat message", "/api/v1/chat/message", `{"message":"hello"}`, hdHeaders("Authorization", "Bearer "+token, "Accept", "application/json")},
		{"widget", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"widget-data-0001","chatInput":"hello"}`, hdHeaders("Origin", hdOrigin, "Accept", "application/json")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.logs.TakeAll()
			hdWantError(t, e.do(t, "POST", tc.path, tc.body, tc.headers), http.StatusBadRequest, "invalid_request")
			e.hdNoErrorLogs(t)
			for _, l := range e.logs.FilterMessage("chat exchange").AllUntimed() {
				if out := l.ContextMap()["outcome"]; out == metrics.OutcomeError {
					t.Errorf("exchange outcome %v", out)
				}
			}
		})
	}
}
