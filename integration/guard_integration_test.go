package integration

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
)

// guardCaddyfile serves chat_proxy on 127.0.0.1:9080 with session creation
// limited to 3 per minute per client IP. The first %s is the global
// servers block (trusted proxies), the others the secrets and database.
const guardCaddyfile = `
{
	admin localhost:2999
	skip_install_trust
	http_port 9080
	https_port 9443
	grace_period 1ns
%s
}

http://127.0.0.1:9080 {
	chat_proxy {
		n8n_webhook http://127.0.0.1:9/webhook/chat
		jwt_secret %s
		session_secret %s
		database sqlite:%s
		rate_limit create 3/1m
		rate_limit ip 1000/1m
	}
}
`

func randomSecret(prefix string) string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// The ip and create tiers count Caddy's client_ip: a spoofed
// X-Forwarded-For from a peer that is not a trusted proxy changes nothing,
// and with `trusted_proxies` (+ `client_ip_headers`) the header names the
// client. Each configuration is a reload of the one shared test server,
// which starts every chat_proxy budget afresh.
func TestGuardClientIPAndTrustedProxies(t *testing.T) {
	tester := caddytest.NewTester(t)
	// Requests go to 127.0.0.1 itself, so the peer is 127.0.0.1 whatever
	// localhost resolves to.
	c := client{t: t, http: &http.Client{}}
	create := func(xff string) (int, string) {
		t.Helper()
		h := map[string]string{}
		if xff != "" {
			h["X-Forwarded-For"] = xff
		}
		status, hdr, body := c.do("POST", "http://127.0.0.1:9080/api/v1/session/create", "", h)
		if status == 429 && (!strings.Contains(body, `"tier":"create"`) || hdr.Get("Retry-After") == "") {
			t.Fatalf("429 without the create tier or Retry-After: %v %s", hdr, body)
		}
		return status, body
	}
	statuses := func(xffs ...string) []int {
		t.Helper()
		var got []int
		for _, x := range xffs {
			s, body := create(x)
			if s != 201 && s != 429 {
				t.Fatalf("create with X-Forwarded-For %q: %d %s", x, s, body)
			}
			got = append(got, s)
		}
		return got
	}
	load := func(servers string) {
		t.Helper()
		tester.InitServer(fmt.Sprintf(guardCaddyfile, servers, randomSecret("it-guard-jwt-"), randomSecret("it-guard-n8n-"), t.TempDir()+"/chat.db"), "caddyfile")
		if t.Failed() {
			t.FailNow()
		}
	}
	distinct := func(prefix string, n int) []string {
		xs := make([]string, n)
		for i := range xs {
			xs[i] = fmt.Sprintf(prefix, i+1)
		}
		return xs
	}

	t.Run("untrusted peer", func(t *testing.T) {
		load("")
		// Five different spoofed addresses all count against 127.0.0.1.
		got := statuses(distinct("203.0.113.%d", 5)...)
		if fmt.Sprint(got) != "[201 201 201 429 429]" {
			t.Fatalf("spoofed X-Forwarded-For from an untrusted peer: %v, want 3 × 201 then 429", got)
		}
		if s, _ := create(""); s != 429 {
			t.Fatalf("without the header: %d, want 429 (same client)", s)
		}
	})

	t.Run("trusted proxies", func(t *testing.T) {
		load("\tservers {\n\t\ttrusted_proxies static 127.0.0.1/8\n\t\tclient_ip_headers X-Forwarded-For\n\t}")
		// Distinct clients behind the trusted proxy: distinct budgets.
		if got := statuses(distinct("203.0.113.%d", 5)...); fmt.Sprint(got) != "[201 201 201 201 201]" {
			t.Fatalf("distinct X-Forwarded-For through a trusted proxy: %v, want all 201", got)
		}
		// One client behind it: its own budget of 3.
		if got := statuses("198.51.100.9", "198.51.100.9", "198.51.100.9", "198.51.100.9"); fmt.Sprint(got) != "[201 201 201 429]" {
			t.Fatalf("one client through a trusted proxy: %v, want 3 × 201 then 429", got)
		}
		// The proxy itself (no header) is a client of its own.
		if s, _ := create(""); s != 201 {
			t.Fatalf("the proxy's own request: %d, want 201", s)
		}
		// Without trusted_proxies_strict Caddy takes the leftmost address,
		// which a client can choose when the proxy appends to the header.
		if got := statuses(distinct("10.66.0.%d, 198.51.100.10", 4)...); fmt.Sprint(got) != "[201 201 201 201]" {
			t.Fatalf("leftmost addresses chosen by the client: %v, want all 201 (Caddy's non-strict mode)", got)
		}
	})

	t.Run("trusted proxies strict", func(t *testing.T) {
		load("\tservers {\n\t\ttrusted_proxies static 127.0.0.1/8\n\t\ttrusted_proxies_strict\n\t\tclient_ip_headers X-Forwarded-For\n\t}")
		// Right to left, the first untrusted address is the client; what
		// the client prepended is ignored.
		if got := statuses(distinct("10.66.0.%d, 198.51.100.11", 5)...); fmt.Sprint(got) != "[201 201 201 429 429]" {
			t.Fatalf("prepended addresses with trusted_proxies_strict: %v, want 3 × 201 then 429", got)
		}
		// Trusted hops on the right are skipped: this is the same client,
		// already at its limit, not 127.0.0.5.
		if got := statuses("198.51.100.11, 127.0.0.5"); fmt.Sprint(got) != "[429]" {
			t.Fatalf("the same client behind two trusted hops: %v, want 429", got)
		}
		if got := statuses("198.51.100.12, 127.0.0.5"); fmt.Sprint(got) != "[201]" {
			t.Fatalf("another client behind two trusted hops: %v, want 201", got)
		}
	})
}

// A Caddyfile with `redis` (the URL from a placeholder) runs with the
// limits in Redis: /health reports it, and the limit holds.
func TestGuardCaddyfileWithRedis(t *testing.T) {
	t.Setenv("CHATPROXY_IT_REDIS", testenv.RedisURL(t))
	tester := caddytest.NewTester(t)
	cfg := strings.Replace(guardCaddyfile, "rate_limit ip 1000/1m", "rate_limit ip 1000/1m\n\t\tredis {env.CHATPROXY_IT_REDIS}", 1)
	tester.InitServer(fmt.Sprintf(cfg, "", randomSecret("it-guard-jwt-"), randomSecret("it-guard-n8n-"), t.TempDir()+"/chat.db"), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	c := client{t: t, http: &http.Client{}}
	status, _, body := c.do("GET", "http://127.0.0.1:9080/health", "", nil)
	if status != 200 || !strings.Contains(body, `"status":"ok"`) || !strings.Contains(body, `"redis":{"status":"ok"`) {
		t.Fatalf("health: %d %s", status, body)
	}
	var got []int
	for range 4 {
		status, hdr, body := c.do("POST", "http://127.0.0.1:9080/api/v1/session/create", "", nil)
		if status == 429 && (hdr.Get("RateLimit-Limit") != "3" || !strings.Contains(body, `"tier":"create"`)) {
			t.Fatalf("429: %v %s", hdr, body)
		}
		got = append(got, status)
	}
	if fmt.Sprint(got) != "[201 201 201 429]" {
		t.Fatalf("creations through Redis: %v, want 3 × 201 then 429", got)
	}
}
