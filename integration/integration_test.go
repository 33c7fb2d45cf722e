// Package integration boots a real Caddy (in process, through caddytest)
// with chat_proxy configured from a Caddyfile and talks to it over HTTP.
// It is the only package that uses caddytest, whose admin port is fixed.
package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/chatproxy/caddy-chatproxy"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
)

const caddyfileTemplate = `
{
	admin localhost:2999
	skip_install_trust
	http_port 9080
	https_port 9443
	grace_period 1ns
}

http://localhost:9080 {
	chat_proxy {
		n8n_webhook http://127.0.0.1:9/webhook/chat
		jwt_secret {env.CHATPROXY_IT_JWT}
		session_secret {file.%s}
		database %s
		allowed_origins http://localhost:9080 https://*.example.com
		session_ttl 2h
		cookie {
			name it_session
			same_site strict
		}
	}
	respond /hello "site page" 200
}
`

type client struct {
	t    *testing.T
	http *http.Client
}

func (c client) do(method, url, body string, headers map[string]string) (int, http.Header, string) {
	c.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		c.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}

func TestCaddyfileEndToEnd(t *testing.T) {
	t.Setenv("CHATPROXY_IT_JWT", "integration-visitor-jwt-secret-0123456789")
	secretFile := t.TempDir() + "/n8n-secret"
	if err := writeFile(secretFile, "integration-n8n-session-secret-0123456789\n"); err != nil {
		t.Fatal(err)
	}
	stores := []struct{ name, database string }{
		{"embedded", "sqlite:" + t.TempDir() + "/chat.db"},
		{"postgres", testenv.PostgresURL(t)},
	}
	tester := caddytest.NewTester(t)
	for _, st := range stores {
		t.Run(st.name, func(t *testing.T) {
			// The second run is a config reload of the running server.
			tester.InitServer(fmt.Sprintf(caddyfileTemplate, secretFile, st.database), "caddyfile")
			if t.Failed() {
				t.FailNow()
			}
			jar, _ := cookiejar.New(nil)
			c := client{t: t, http: &http.Client{Jar: jar}}
			browser := map[string]string{"Origin": "http://localhost:9080"}

			status, hdr, body := c.do("POST", "http://localhost:9080/api/v1/session/create", `{"page_url":"http://localhost:9080/hello"}`, browser)
			if status != 201 {
				t.Fatalf("create: %d %s", status, body)
			}
			var created struct {
				SessionID string `json:"session_id"`
				Token     string `json:"token"`
			}
			mustJSON(t, body, &created)
			if created.SessionID == "" || created.Token == "" {
				t.Fatalf("create body: %s", body)
			}
			if !strings.Contains(hdr.Get("Set-Cookie"), "it_session=") || !strings.Contains(hdr.Get("Set-Cookie"), "SameSite=Strict") ||
				!strings.Contains(hdr.Get("Set-Cookie"), "HttpOnly") || hdr.Get("Access-Control-Allow-Origin") != "http://localhost:9080" {
				t.Fatalf("create headers: %v", hdr)
			}

			// Cookie auth from the allowed origin (the jar sends the cookie).
			status, _, body = c.do("GET", "http://localhost:9080/api/v1/session/validate", "", browser)
			if status != 200 || !strings.Contains(body, created.SessionID) {
				t.Fatalf("validate by cookie: %d %s", status, body)
			}
			// The same cookie without browser evidence is refused (CSRF rule).
			status, _, _ = c.do("GET", "http://localhost:9080/api/v1/session/validate", "", nil)
			if status != 403 {
				t.Fatalf("cookie without Origin: %d", status)
			}
			status, _, body = c.do("GET", "http://localhost:9080/api/v1/chat/history/"+created.SessionID, "", map[string]string{"Authorization": "Bearer " + created.Token})
			if status != 200 || !strings.Contains(body, `"total_count":0`) {
				t.Fatalf("history: %d %s", status, body)
			}
			status, _, body = c.do("GET", "http://localhost:9080/health", "", nil)
			if status != 200 || !strings.Contains(body, `"database":{"status":"ok"`) {
				t.Fatalf("health: %d %s", status, body)
			}
			status, _, body = c.do("GET", "http://localhost:9080/hello", "", nil)
			if status != 200 || body != "site page" {
				t.Fatalf("site page not passed through: %d %q", status, body)
			}
			status, _, _ = c.do("POST", "http://localhost:9080/api/v1/session/create", "", map[string]string{"Origin": "https://evil.example.net"})
			if status != 403 {
				t.Fatalf("disallowed origin: %d", status)
			}
			status, _, _ = c.do("DELETE", "http://localhost:9080/api/v1/session", "", browser)
			if status != 204 {
				t.Fatalf("destroy: %d", status)
			}
			status, _, _ = c.do("GET", "http://localhost:9080/api/v1/session/validate", "", map[string]string{"Authorization": "Bearer " + created.Token})
			if status != 401 {
				t.Fatalf("validate after destroy: %d", status)
			}
		})
	}
}

func TestInvalidConfigIsRefused(t *testing.T) {
	for name, block := range map[string]string{
		"short secret":   "n8n_webhook http://127.0.0.1:9/w\n\t\tjwt_secret short\n\t\tsession_secret integration-n8n-session-secret-0123456789",
		"equal secrets":  "n8n_webhook http://127.0.0.1:9/w\n\t\tjwt_secret integration-n8n-session-secret-0123456789\n\t\tsession_secret integration-n8n-session-secret-0123456789",
		"unknown option": "n8n_webhok http://127.0.0.1:9/w",
	} {
		t.Run(name, func(t *testing.T) {
			cfg := "{\n\tadmin localhost:2999\n\tskip_install_trust\n\thttp_port 9080\n}\nhttp://localhost:9080 {\n\tchat_proxy {\n\t\t" + block + "\n\t}\n}\n"
			caddytest.AssertLoadError(t, cfg, "caddyfile", map[string]string{
				"short secret": "jwt_secret: must be at least 32 bytes", "equal secrets": "session_secret: must differ from jwt_secret",
				"unknown option": "unrecognized option 'n8n_webhok'"}[name])
		})
	}
}

func mustJSON(t *testing.T, body string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(body), v); err != nil {
		t.Fatalf("decoding %q: %v", body, err)
	}
}
