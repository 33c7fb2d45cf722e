package n8n

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
)

func okHandler(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte(`{"output":"ok"}`))
}

func sendOK(t *testing.T, c *Client, req *Request) {
	t.Helper()
	r, err := c.Send(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	readAll(t, r)
}

// TestRequestBody checks the body n8n gets: the Chat Trigger fields plus
// the original design's, exactly.
func TestRequestBody(t *testing.T) {
	f := newFake(t, okHandler)
	c := newClient(t, testConfig(f))
	before := time.Now().Add(-time.Second)
	sendOK(t, c, testRequest())
	got := f.lastRequest(t)

	var body map[string]json.RawMessage
	if err := json.Unmarshal(got.body, &body); err != nil {
		t.Fatal(err)
	}
	wantKeys := []string{"action", "chatInput", "jwt_token", "message", "metadata", "session", "sessionId", "timestamp"}
	if keys := slices.Sorted(maps.Keys(body)); !slices.Equal(keys, wantKeys) {
		t.Errorf("body keys %v, want %v", keys, wantKeys)
	}
	var b struct {
		Action    string
		SessionID string `json:"sessionId"`
		ChatInput string `json:"chatInput"`
		Message   string
		Metadata  map[string]any
		Session   map[string]any
		JWTToken  string `json:"jwt_token"`
		Timestamp string
	}
	if err := json.Unmarshal(got.body, &b); err != nil {
		t.Fatal(err)
	}
	if b.Action != "sendMessage" || b.SessionID != "sess-123" || b.ChatInput != "Hello, bot" || b.Message != "Hello, bot" {
		t.Errorf("body %+v", b)
	}
	if b.Metadata["page_title"] != "Pricing" {
		t.Errorf("metadata %v", b.Metadata)
	}
	wantSession := map[string]any{
		"session_id": "sess-123", "origin_domain": "shop.example.com", "page_url": "https://shop.example.com/pricing",
		"client_ip": "203.0.113.7", "user_agent": "Mozilla/5.0 test", "message_count": float64(4),
	}
	if !maps.Equal(b.Session, wantSession) {
		t.Errorf("session %v, want %v", b.Session, wantSession)
	}
	ts, err := time.Parse(time.RFC3339, b.Timestamp)
	if err != nil || ts.Before(before) || ts.After(time.Now().Add(time.Second)) {
		t.Errorf("timestamp %q: %v", b.Timestamp, err)
	}
	if b.JWTToken == "" || got.header.Get("Authorization") != "Bearer "+b.JWTToken {
		t.Errorf("jwt_token %q does not match the bearer token %q", b.JWTToken, got.header.Get("Authorization"))
	}

	for k, want := range map[string]string{
		"Content-Type":    "application/json",
		"Accept":          "application/json, application/x-ndjson, text/plain",
		"Accept-Encoding": "gzip, br",
		"User-Agent":      "caddy-chatproxy",
	} {
		if v := got.header.Get(k); v != want {
			t.Errorf("header %s = %q, want %q", k, v, want)
		}
	}
}

func TestRequestDefaultsAndMetadata(t *testing.T) {
	f := newFake(t, okHandler)
	c := newClient(t, testConfig(f))
	req := &Request{SessionID: "s", Message: "m", Action: "loadPreviousSession"}
	sendOK(t, c, req)
	var b struct {
		Action   string
		Metadata json.RawMessage
	}
	if err := json.Unmarshal(f.lastRequest(t).body, &b); err != nil {
		t.Fatal(err)
	}
	if b.Action != "loadPreviousSession" || string(b.Metadata) != "{}" {
		t.Errorf("action %q metadata %s", b.Action, b.Metadata)
	}

	for _, bad := range []string{`[1]`, `"x"`, `null`, `{broken`, `1`} {
		_, err := c.Send(t.Context(), &Request{SessionID: "s", Metadata: json.RawMessage(bad)})
		if err != errMetadata {
			t.Errorf("metadata %s: %v", bad, err)
		}
	}
	if _, err := c.Send(t.Context(), &Request{Message: "m"}); err != errNoSession {
		t.Errorf("no session: %v", err)
	}
}

// TestUpstreamJWT verifies the token independently, twice: with a fresh
// golang-jwt parser pinned to HS256, and by hand with HMAC-SHA256.
func TestUpstreamJWT(t *testing.T) {
	f := newFake(t, okHandler)
	cfg := testConfig(f)
	cfg.TokenTTL = 45 * time.Second
	c := newClient(t, cfg)
	sendOK(t, c, testRequest())
	auth := f.lastRequest(t).header.Get("Authorization")
	token, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok {
		t.Fatalf("Authorization %q", auth)
	}

	parser := jwt.NewParser(
		jwt.WithValidMethods([]string{"HS256"}),
		jwt.WithIssuer("caddy-chatproxy"),
		jwt.WithAudience("n8n"),
		jwt.WithSubject("sess-123"),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
	)
	claims := jwt.MapClaims{}
	parsed, err := parser.ParseWithClaims(token, claims, func(tok *jwt.Token) (any, error) {
		return []byte(testSecret), nil
	})
	if err != nil || !parsed.Valid {
		t.Fatalf("token does not verify: %v", err)
	}
	if parsed.Header["alg"] != "HS256" || parsed.Header["typ"] != "JWT" {
		t.Errorf("header %v", parsed.Header)
	}
	for k, want := range map[string]any{
		"session_id": "sess-123", "origin_domain": "shop.example.com", "page_url": "https://shop.example.com/pricing",
		"client_ip": "203.0.113.7", "user_agent": "Mozilla/5.0 test", "type": "n8n_chat",
		"iss": "caddy-chatproxy", "aud": "n8n", "sub": "sess-123",
	} {
		if claims[k] != want {
			t.Errorf("claim %s = %v, want %v", k, claims[k], want)
		}
	}
	iat, _ := claims["iat"].(float64)
	nbf, _ := claims["nbf"].(float64)
	exp, _ := claims["exp"].(float64)
	if exp-iat != 45 {
		t.Errorf("exp - iat = %v, want the token TTL (45 s)", exp-iat)
	}
	if nbf > iat || iat-nbf > 10 {
		t.Errorf("nbf %v, iat %v", nbf, iat)
	}
	if d := time.Since(time.Unix(int64(iat), 0)); d < -time.Second || d > 5*time.Second {
		t.Errorf("iat is %v ago", d)
	}
	jti, _ := claims["jti"].(string)
	if _, err := uuid.Parse(jti); err != nil {
		t.Errorf("jti %q: %v", jti, err)
	}

	// By hand: HMAC-SHA256(header.payload) with the session secret.
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts", len(parts))
	}
	mac := hmac.New(sha256.New, []byte(testSecret))
	mac.Write([]byte(parts[0] + "." + parts[1]))
	if want := base64.RawURLEncoding.EncodeToString(mac.Sum(nil)); !hmac.Equal([]byte(parts[2]), []byte(want)) {
		t.Error("signature is not HMAC-SHA256 with the session secret")
	}

	// The wrong secret and another algorithm are refused.
	if _, err := parser.Parse(token, func(*jwt.Token) (any, error) { return []byte(strings.Repeat("x", 32)), nil }); err == nil {
		t.Error("token verifies with another secret")
	}
	if _, err := jwt.NewParser(jwt.WithValidMethods([]string{"HS512"})).Parse(token, func(*jwt.Token) (any, error) { return []byte(testSecret), nil }); err == nil {
		t.Error("token accepted as HS512")
	}

	// Each request gets a fresh token (new jti).
	sendOK(t, c, testRequest())
	if auth2 := f.lastRequest(t).header.Get("Authorization"); auth2 == auth {
		t.Error("token reused across requests")
	}
}

// TestAuthModes checks what each upstream_auth mode sends.
func TestAuthModes(t *testing.T) {
	tests := []struct {
		name       string
		auth       Auth
		secret     string
		check      func(t *testing.T, h http.Header)
		wantBodyJT bool
	}{
		{"jwt", Auth{Mode: AuthJWT}, testSecret, func(t *testing.T, h http.Header) {
			if !strings.HasPrefix(h.Get("Authorization"), "Bearer ey") {
				t.Errorf("Authorization %q", h.Get("Authorization"))
			}
		}, true},
		{"default is jwt", Auth{}, testSecret, func(t *testing.T, h http.Header) {
			if !strings.HasPrefix(h.Get("Authorization"), "Bearer ey") {
				t.Errorf("Authorization %q", h.Get("Authorization"))
			}
		}, true},
		{"basic", Auth{Mode: AuthBasic, Username: "chat", Password: "p@ss:word"}, testSecret, func(t *testing.T, h http.Header) {
			r := http.Request{Header: h}
			u, p, ok := r.BasicAuth()
			if !ok || u != "chat" || p != "p@ss:word" {
				t.Errorf("basic auth %q %q %v", u, p, ok)
			}
		}, true},
		{"header", Auth{Mode: AuthHeader, HeaderName: "x-n8n-key", HeaderValue: "k3y"}, "", func(t *testing.T, h http.Header) {
			if h.Get("X-N8n-Key") != "k3y" || h.Get("Authorization") != "" {
				t.Errorf("headers %v", h)
			}
		}, false},
		{"none", Auth{Mode: AuthNone}, "", func(t *testing.T, h http.Header) {
			if h.Get("Authorization") != "" {
				t.Errorf("Authorization %q", h.Get("Authorization"))
			}
		}, false},
		{"none with secret keeps body token", Auth{Mode: AuthNone}, testSecret, func(t *testing.T, h http.Header) {
			if h.Get("Authorization") != "" {
				t.Errorf("Authorization %q", h.Get("Authorization"))
			}
		}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, okHandler)
			cfg := testConfig(f)
			cfg.Auth, cfg.SessionSecret = tc.auth, tc.secret
			c := newClient(t, cfg)
			sendOK(t, c, testRequest())
			got := f.lastRequest(t)
			tc.check(t, got.header)
			var b map[string]any
			_ = json.Unmarshal(got.body, &b)
			if _, has := b["jwt_token"]; has != tc.wantBodyJT {
				t.Errorf("body has jwt_token: %v, want %v", has, tc.wantBodyJT)
			}
		})
	}
}

// TestClientCredentialsNeverForwarded builds the n8n request the way a
// route does, from an incoming request that carries the visitor's own
// token and cookies, and checks none of them reaches n8n.
func TestClientCredentialsNeverForwarded(t *testing.T) {
	f := newFake(t, okHandler)
	c := newClient(t, testConfig(f))
	in := httptest.NewRequest(http.MethodPost, "https://shop.example.com/api/v1/chat/message", nil)
	in.Header.Set("Authorization", "Bearer visitor-session-token")
	in.Header.Set("Cookie", "chat_session=visitor-cookie; other=x")
	in.Header.Set("X-Instance-Id", "instance")
	in.Header.Set("User-Agent", "Visitor UA")
	sendOK(t, c, &Request{SessionID: "s1", Message: "hi", UserAgent: in.UserAgent(), ClientIP: "198.51.100.1"})

	got := f.lastRequest(t)
	everything := string(got.body)
	for k, vs := range got.header {
		everything += "\n" + k + ": " + strings.Join(vs, ",")
	}
	for _, leak := range []string{"visitor-session-token", "visitor-cookie", "Cookie", "X-Instance-Id"} {
		if strings.Contains(everything, leak) {
			t.Errorf("n8n received %q:\n%s", leak, everything)
		}
	}
	allowed := []string{"Accept", "Accept-Encoding", "Authorization", "Content-Length", "Content-Type", "User-Agent"}
	for k := range got.header {
		if !slices.Contains(allowed, k) {
			t.Errorf("unexpected header %s", k)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	const pw = "hunter2-super-secret"
	tests := []struct {
		name string
		cfg  Config
		want string // substring of the error
	}{
		{"no url", Config{SessionSecret: testSecret}, "webhook URL is required"},
		{"bad url", Config{WebhookURL: "http://[::1", SessionSecret: testSecret}, "not a valid URL"},
		{"bad scheme", Config{WebhookURL: "ftp://n8n/x", SessionSecret: testSecret}, "http or https"},
		{"no host", Config{WebhookURL: "http:///x", SessionSecret: testSecret}, "no host"},
		{"credentials in url", Config{WebhookURL: "https://user:" + pw + "@n8n/x", SessionSecret: testSecret}, "must not contain credentials"},
		{"jwt without secret", Config{WebhookURL: "https://n8n/x"}, "needs a session secret"},
		{"short secret", Config{WebhookURL: "https://n8n/x", SessionSecret: pw}, "at least 32 bytes"},
		{"basic without user", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: AuthBasic, Password: pw}}, "user name"},
		{"basic user with colon", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: AuthBasic, Username: "a:b", Password: pw}}, "user name"},
		{"basic control chars", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: AuthBasic, Username: "a", Password: pw + "\n"}}, "control characters"},
		{"header bad name", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: AuthHeader, HeaderName: "bad name", HeaderValue: pw}}, "valid header name"},
		{"header reserved", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: AuthHeader, HeaderName: "content-type", HeaderValue: pw}}, "cannot set Content-Type"},
		{"header no value", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: AuthHeader, HeaderName: "X-Key"}}, "needs a value"},
		{"unknown mode", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: "oauth"}}, "unknown upstream auth mode"},
		{"negative timeout", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: AuthNone}, UpstreamTimeout: -1}, "upstream timeout must not be negative"},
		{"negative size", Config{WebhookURL: "https://n8n/x", Auth: Auth{Mode: AuthNone}, MaxReplyBytes: -1}, "size limits"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			if strings.Contains(err.Error(), pw) {
				t.Errorf("error leaks the secret: %v", err)
			}
			if strings.ToLower(err.Error()[:1]) != err.Error()[:1] {
				t.Errorf("error not lowercase: %v", err)
			}
		})
	}

	c, err := New(Config{WebhookURL: "https://n8n.internal/webhook/x#frag", SessionSecret: testSecret})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.cfg.UpstreamTimeout != DefaultUpstreamTimeout || c.cfg.StreamIdleTimeout != DefaultStreamIdleTimeout ||
		c.cfg.MaxStreamDuration != DefaultMaxStreamDuration || c.cfg.TokenTTL != DefaultTokenTTL ||
		c.cfg.MaxRetries != DefaultMaxRetries || c.cfg.MaxLineBytes != DefaultMaxLineBytes ||
		c.cfg.MaxReplyBytes != DefaultMaxReplyBytes || c.cfg.Breaker.FailureThreshold != DefaultFailureThreshold ||
		c.cfg.Auth.Mode != AuthJWT || c.url != "https://n8n.internal/webhook/x" {
		t.Errorf("defaults not applied: %+v %s", c.cfg, c.url)
	}
	if c.State() != StateClosed {
		t.Errorf("new client breaker %s", c.State())
	}
}
