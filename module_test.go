package chatproxy

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

const (
	mtJWT     = "module-test-jwt-secret-0123456789abcdef"  // 38 bytes
	mtSession = "module-test-n8n-secret-0123456789abcdef"  // 38 bytes
	mtShort   = "0123456789abcdef0123456789abcde"          // 31 bytes
	mtMin     = "0123456789abcdef0123456789abcdef"         // 32 bytes
	mtPush    = "module-test-push-secret-0123456789abcdef" // 40 bytes
	mtLeak    = "hunter2-must-never-appear-in-an-error-xx" // a password
)

// mtConfig is a valid configuration on an embedded store in a temporary
// directory, changed by mutate.
func mtConfig(t *testing.T, mutate func(*ChatProxy)) *ChatProxy {
	t.Helper()
	cp := &ChatProxy{
		N8nWebhook:     "http://127.0.0.1:9/webhook/chat",
		JWTSecret:      mtJWT,
		SessionSecret:  mtSession,
		Database:       "sqlite:" + filepath.Join(t.TempDir(), "chat.db"),
		AllowedOrigins: []string{"https://shop.example.com", "https://*.example.org"},
	}
	if mutate != nil {
		mutate(cp)
	}
	return cp
}

// mtProvision provisions and validates cp as Caddy does, and cleans it up
// at the end of the test.
func mtProvision(t *testing.T, cp *ChatProxy) error {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	t.Cleanup(cancel)
	t.Cleanup(func() {
		if err := cp.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
	})
	if err := cp.Provision(ctx); err != nil {
		return err
	}
	return cp.Validate()
}

func TestProvisionErrors(t *testing.T) {
	f := false
	for _, tc := range []struct {
		name   string
		mutate func(*ChatProxy)
		want   string // the whole error, or a prefix ending in "…"
	}{
		{"missing n8n_webhook", func(c *ChatProxy) { c.N8nWebhook = "" }, "n8n_webhook: required"},
		{"chat_socket under the API prefix", func(c *ChatProxy) { c.ChatSocket = "/api/v1/chat" },
			`chat_socket: must be off or a path such as /chat, not below path_prefix, got "/api/v1/chat"`},
		{"chat_socket not a path", func(c *ChatProxy) { c.ChatSocket = "chat" },
			`chat_socket: must be off or a path such as /chat, not below path_prefix, got "chat"`},
		{"short wait_timeout", func(c *ChatProxy) { c.WaitTimeout = caddy.Duration(time.Millisecond) }, "wait_timeout: must be at least 1s, got 1ms"},
		{"short detached_timeout", func(c *ChatProxy) { c.DetachedTimeout = caddy.Duration(time.Millisecond) }, "detached_timeout: must be off or from 1s to 1h, got 1ms"},
		{"n8n_socket_url not ws", func(c *ChatProxy) { c.N8nSocketURL = "ftp://n8n/chat" }, "upstream: n8n: socket URL must be ws, wss, http or https"},
		{"missing jwt_secret", func(c *ChatProxy) { c.JWTSecret = "" }, "jwt_secret: required"},
		{"missing session_secret", func(c *ChatProxy) { c.SessionSecret = "" }, "session_secret: required"},
		{"short jwt_secret", func(c *ChatProxy) { c.JWTSecret = mtShort }, "jwt_secret: must be at least 32 bytes, got 31"},
		{"short session_secret", func(c *ChatProxy) { c.SessionSecret = mtShort }, "session_secret: must be at least 32 bytes, got 31"},
		{"equal secrets", func(c *ChatProxy) { c.SessionSecret = c.JWTSecret }, "session_secret: must differ from jwt_secret"},
		{"short push_secret", func(c *ChatProxy) { c.PushSecret = mtShort }, "push_secret: must be at least 32 bytes, got 31"},
		{"push_secret equal to jwt_secret", func(c *ChatProxy) { c.PushSecret = c.JWTSecret },
			"push_secret: must differ from jwt_secret and session_secret"},
		{"push_secret equal to jwt_secret via a placeholder", func(c *ChatProxy) {
			c.PushSecret = "{env.CHATPROXY_MT_SAME}"
		}, "push_secret: must differ from jwt_secret and session_secret"},
		{"unset env push_secret", func(c *ChatProxy) { c.PushSecret = "{env.CHATPROXY_MT_UNSET_VAR}" },
			"push_secret: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"handoff_webhook without push_secret", func(c *ChatProxy) { c.HandoffWebhook = "https://desk.example.com/hook" },
			"handoff_webhook: needs push_secret, which signs its calls"},
		{"handoff_webhook relative", func(c *ChatProxy) { c.PushSecret = mtPush; c.HandoffWebhook = "/hook" },
			"handoff_webhook: must be an absolute http or https URL"},
		{"short handoff_timeout", func(c *ChatProxy) { c.PushSecret = mtPush; c.HandoffTimeout = caddy.Duration(time.Millisecond) },
			"handoff_timeout: must be at least 1s, got 1ms"},
		{"short identity_secret", func(c *ChatProxy) { c.IdentitySecret = mtShort }, "identity_secret: must be at least 32 bytes, got 31"},
		{"identity_secret equal to jwt_secret", func(c *ChatProxy) { c.IdentitySecret = c.JWTSecret },
			"identity_secret: must differ from jwt_secret, session_secret and push_secret"},
		{"identity_secret equal to session_secret", func(c *ChatProxy) { c.IdentitySecret = c.SessionSecret },
			"identity_secret: must differ from jwt_secret, session_secret and push_secret"},
		{"identity_secret from unset env", func(c *ChatProxy) { c.IdentitySecret = "{env.CHATPROXY_MT_UNSET_VAR}" },
			"identity_secret: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"identity_proofs without identity_secret", func(c *ChatProxy) { c.IdentityProofs = []string{"user_hash"} },
			"identity_proofs: needs identity_secret, whose proofs it restricts"},
		{"identity_proofs unknown", func(c *ChatProxy) { c.IdentitySecret = mtPush; c.IdentityProofs = []string{"password"} },
			`identity_proofs: unknown proof form "password": use user_hash or identity_token`},
		{"identity_proofs twice", func(c *ChatProxy) { c.IdentitySecret = mtPush; c.IdentityProofs = []string{"user_hash", "user_hash"} },
			"identity_proofs: user_hash named twice"},
		{"erasure_secret without identity_secret", func(c *ChatProxy) { c.ErasureSecret = mtPush },
			"erasure_secret: needs identity_secret (users are erased by the id the site proved)"},
		{"short erasure_secret", func(c *ChatProxy) { c.IdentitySecret = mtPush; c.ErasureSecret = mtShort },
			"erasure_secret: must be at least 32 bytes, got 31"},
		// The one that matters: user_hash values are HMACs under
		// identity_secret of ids the visitor chose (TestErasureNotForgeableFromUserHash).
		{"erasure_secret equal to identity_secret", func(c *ChatProxy) { c.IdentitySecret = mtPush; c.ErasureSecret = mtPush },
			"erasure_secret: must differ from identity_secret, jwt_secret, session_secret and push_secret"},
		{"erasure_secret equal to jwt_secret", func(c *ChatProxy) { c.IdentitySecret = mtPush; c.ErasureSecret = c.JWTSecret },
			"erasure_secret: must differ from identity_secret, jwt_secret, session_secret and push_secret"},
		{"equal secrets via placeholders", func(c *ChatProxy) {
			c.JWTSecret, c.SessionSecret = "{env.CHATPROXY_MT_SAME}", mtJWT
		}, "session_secret: must differ from jwt_secret"},
		{"unset env secret", func(c *ChatProxy) { c.JWTSecret = "{env.CHATPROXY_MT_UNSET_VAR}" },
			"jwt_secret: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"unset env secret with a prefix", func(c *ChatProxy) { c.SessionSecret = "x{env.CHATPROXY_MT_UNSET_VAR}" },
			"session_secret: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"missing secret file", func(c *ChatProxy) { c.SessionSecret = "{file./nonexistent/chatproxy-secret}" },
			"session_secret: evaluated placeholder {file./nonexistent/chatproxy-secret} is empty"},
		{"unknown placeholder", func(c *ChatProxy) { c.JWTSecret = "{vault.jwt}" },
			"jwt_secret: unrecognized placeholder {vault.jwt}"},
		{"short secret from env", func(c *ChatProxy) { c.JWTSecret = "{env.CHATPROXY_MT_SHORT}" },
			"jwt_secret: must be at least 32 bytes, got 31"},
		{"unset env webhook", func(c *ChatProxy) { c.N8nWebhook = "{env.CHATPROXY_MT_UNSET_VAR}" },
			"n8n_webhook: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"webhook other scheme", func(c *ChatProxy) { c.N8nWebhook = "ftp://n8n:" + mtLeak + "@n8n.internal/webhook" },
			"n8n_webhook: must be an absolute http or https URL"},
		{"webhook relative", func(c *ChatProxy) { c.N8nWebhook = "/webhook/chat" },
			"n8n_webhook: must be an absolute http or https URL"},
		{"webhook without scheme", func(c *ChatProxy) { c.N8nWebhook = "n8n.internal:5678/webhook/chat" },
			"n8n_webhook: must be an absolute http or https URL"},
		{"webhook without host", func(c *ChatProxy) { c.N8nWebhook = "http:///webhook/chat" },
			"n8n_webhook: must be an absolute http or https URL"},
		{"webhook javascript", func(c *ChatProxy) { c.N8nWebhook = "javascript:alert(1)" },
			"n8n_webhook: must be an absolute http or https URL"},
		{"webhook garbage with password", func(c *ChatProxy) { c.N8nWebhook = "http://u:" + mtLeak + "@n8n.internal:port/x" },
			"n8n_webhook: not a valid URL"},
		{"webhook bad escape with password", func(c *ChatProxy) { c.N8nWebhook = "https://u:" + mtLeak + "@%zz/x" },
			"n8n_webhook: not a valid URL"},
		{"webhook control character", func(c *ChatProxy) { c.N8nWebhook = "http://n8n/x\n" + mtLeak },
			"n8n_webhook: not a valid URL"},
		{"path_prefix without slash", func(c *ChatProxy) { c.PathPrefix = "api/v1" },
			`path_prefix: must be a path such as /api/v1 (letters, digits, - . _ ~ and /), got "api/v1"`},
		{"path_prefix with a space", func(c *ChatProxy) { c.PathPrefix = "/api v1" },
			`path_prefix: must be a path such as /api/v1 (letters, digits, - . _ ~ and /), got "/api v1"`},
		{"path_prefix with a wildcard", func(c *ChatProxy) { c.PathPrefix = "/api/*" },
			`path_prefix: must be a path such as /api/v1 (letters, digits, - . _ ~ and /), got "/api/*"`},
		{"path_prefix with dot segments", func(c *ChatProxy) { c.PathPrefix = "/api/../x" },
			`path_prefix: must be a path such as /api/v1 (letters, digits, - . _ ~ and /), got "/api/../x"`},
		{"database from unset env", func(c *ChatProxy) { c.Database = "{env.CHATPROXY_MT_UNSET_VAR}" },
			"database: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"cookie domain from unset env", func(c *ChatProxy) { c.Cookie = &CookieConfig{Domain: "{env.CHATPROXY_MT_UNSET_VAR}"} },
			"cookie domain: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"cookie domain with a semicolon", func(c *ChatProxy) { c.Cookie = &CookieConfig{Domain: "a;b"} },
			`cookie: invalid domain "a;b"`},
		{"session_ttl too short", func(c *ChatProxy) { c.SessionTTL = caddy.Duration(30 * time.Second) },
			"session_ttl: must be at least 1m, got 30s"},
		{"session_ttl negative", func(c *ChatProxy) { c.SessionTTL = caddy.Duration(-time.Hour) },
			"session_ttl: must be at least 1m, got -1h0m0s"},
		{"max_body_size too small", func(c *ChatProxy) { c.MaxBodySize = 100 },
			"max_body_size: must be at least 1KiB, got 100 bytes"},
		{"database mysql", func(c *ChatProxy) { c.Database = "mysql://chat:" + mtLeak + "@db/chat" },
			"database: must be a postgres:// or postgresql:// URL, or sqlite:<path>"},
		{"database bare path", func(c *ChatProxy) { c.Database = "/var/lib/chat.db" },
			"database: must be a postgres:// or postgresql:// URL, or sqlite:<path>"},
		{"database sqlite without path", func(c *ChatProxy) { c.Database = "sqlite:" },
			"database: sqlite: needs a file path, as in sqlite:/var/lib/caddy/chat.db"},
		{"database postgres bad port", func(c *ChatProxy) { c.Database = "postgres://chat:" + mtLeak + "@db:port/chat" },
			"database: parsing database url: …"},
		{"origin star", func(c *ChatProxy) { c.AllowedOrigins = []string{"*"} },
			`allowed_origins: allowed origin "*": not an origin`},
		{"origin null", func(c *ChatProxy) { c.AllowedOrigins = []string{"https://shop.example.com", "null"} },
			`allowed_origins: allowed origin "null": not an origin`},
		{"origin bare wildcard", func(c *ChatProxy) { c.AllowedOrigins = []string{"https://*"} },
			`allowed_origins: allowed origin "https://*": a wildcard must be the leftmost label, as in https://*.example.com`},
		{"origin with path", func(c *ChatProxy) { c.AllowedOrigins = []string{"https://shop.example.com/chat"} },
			`allowed_origins: allowed origin "https://shop.example.com/chat": an origin has no user, path, query or fragment`},
		{"origin ftp", func(c *ChatProxy) { c.AllowedOrigins = []string{"ftp://x"} },
			`allowed_origins: allowed origin "ftp://x": scheme must be http or https`},
		{"origin empty", func(c *ChatProxy) { c.AllowedOrigins = []string{""} },
			"allowed_origins: required"},
		{"origin from unset env", func(c *ChatProxy) { c.AllowedOrigins = []string{"{env.CHATPROXY_MT_UNSET_VAR}"} },
			"allowed_origins: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"same_site none with secure off", func(c *ChatProxy) { c.Cookie = &CookieConfig{SameSite: "none", Secure: &f} },
			"cookie: same_site none needs a secure cookie"},
		{"bad same_site in JSON", func(c *ChatProxy) { c.Cookie = &CookieConfig{SameSite: "sometimes"} },
			`cookie: same_site must be lax, strict or none, got "sometimes"`},
		{"bad cookie name", func(c *ChatProxy) { c.Cookie = &CookieConfig{Name: "chat session"} },
			`cookie: invalid name "chat session"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CHATPROXY_MT_SAME", mtJWT)
			t.Setenv("CHATPROXY_MT_SHORT", mtShort)
			cp := mtConfig(t, tc.mutate)
			err := mtProvision(t, cp)
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			if prefix, ok := strings.CutSuffix(tc.want, "…"); ok {
				if !strings.HasPrefix(err.Error(), prefix) {
					t.Errorf("error %q, want it to start with %q", err, prefix)
				}
			} else if err.Error() != tc.want {
				t.Errorf("error\n got  %q\n want %q", err, tc.want)
			}
			for _, secret := range []string{mtLeak, mtJWT, mtSession, mtShort} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error %q leaks %q", err, secret)
				}
			}
			if storeKeyOf(cp) != "" {
				t.Errorf("a failed provision still holds store %s", storeKeyOf(cp))
			}
		})
	}
}

// A 32-byte secret is long enough, and Validate alone (as after a JSON
// load) agrees with Provision.
func TestProvisionGood(t *testing.T) {
	cp := mtConfig(t, func(c *ChatProxy) {
		c.JWTSecret = mtMin
		c.Cookie = &CookieConfig{SameSite: "none"}
	})
	if err := mtProvision(t, cp); err != nil {
		t.Fatal(err)
	}
	if string(cp.jwtSecret) != mtMin || string(cp.sessionSecret) != mtSession {
		t.Errorf("secrets %q, %q", cp.jwtSecret, cp.sessionSecret)
	}
	if cp.webhook == nil || cp.webhook.String() != "http://127.0.0.1:9/webhook/chat" {
		t.Errorf("webhook %v", cp.webhook)
	}
	// Defaults.
	if cp.PathPrefix != DefaultPathPrefix || time.Duration(cp.SessionTTL) != 7*24*time.Hour ||
		cp.MaxBodySize != 64<<10 || cp.Cookie.Name != "chat_session" {
		t.Errorf("defaults: prefix %q, ttl %v, body %d, cookie %q",
			cp.PathPrefix, time.Duration(cp.SessionTTL), cp.MaxBodySize, cp.Cookie.Name)
	}
	c, err := cp.cookie()
	if err != nil || c.Secure == nil || !*c.Secure {
		t.Errorf("same_site none cookie: %+v, %v; want Secure", c, err)
	}
	if cp.handler == nil {
		t.Error("no handler")
	}
	if n, ok := sessions.SharedReferences(storeKeyOf(cp)); !ok || n != 1 {
		t.Errorf("store references = %d, %v; want 1", n, ok)
	}
	if err := cp.Validate(); err != nil {
		t.Errorf("Validate after Provision: %v", err)
	}

	key := storeKeyOf(cp)
	if err := cp.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if err := cp.Cleanup(); err != nil {
		t.Fatalf("second Cleanup: %v", err)
	}
	if n, ok := sessions.SharedReferences(key); ok || n != 0 {
		t.Errorf("after Cleanup the store has %d references", n)
	}
}

// TestProvisionPush: with push_secret (and a handoff_webhook) the handler
// serves the push route and the events stream; Cleanup closes the events
// hub.
func TestProvisionPush(t *testing.T) {
	cp := mtConfig(t, func(c *ChatProxy) {
		c.PushSecret = mtPush
		c.HandoffWebhook = "https://desk.example.com/hook?token=x"
	})
	if err := mtProvision(t, cp); err != nil {
		t.Fatal(err)
	}
	if string(cp.pushSecret) != mtPush || cp.handoff.String() != "https://desk.example.com/hook?token=x" ||
		time.Duration(cp.HandoffTimeout) != handler.DefaultHandoffTimeout || cp.events == nil {
		t.Fatalf("push_secret %q, handoff %v, timeout %v, events %v", cp.pushSecret, cp.handoff, time.Duration(cp.HandoffTimeout), cp.events)
	}
	hub := cp.events
	if err := cp.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := hub.Subscribe(context.Background(), "x"); err == nil {
		t.Fatal("the events hub still takes subscribers after Cleanup")
	}
}

func TestProvisionResolvesPlaceholders(t *testing.T) {
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "session_secret")
	if err := os.WriteFile(secretFile, []byte(mtSession+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CHATPROXY_MT_JWT", mtJWT)
	t.Setenv("CHATPROXY_MT_N8N_HOST", "n8n.internal:5678")
	t.Setenv("CHATPROXY_MT_DB", filepath.Join(dir, "chat.db"))
	t.Setenv("CHATPROXY_MT_ORIGIN", "https://shop.example.com")
	t.Setenv("CHATPROXY_MT_PREFIX", "/chat")
	t.Setenv("CHATPROXY_MT_COOKIE", "sid")

	cp := &ChatProxy{
		N8nWebhook:     "https://{env.CHATPROXY_MT_N8N_HOST}/webhook/chat",
		JWTSecret:      "{env.CHATPROXY_MT_JWT}",
		SessionSecret:  "{file." + secretFile + "}",
		Database:       "sqlite:{env.CHATPROXY_MT_DB}",
		AllowedOrigins: []string{"{env.CHATPROXY_MT_ORIGIN}"},
		PathPrefix:     "{env.CHATPROXY_MT_PREFIX}/",
		Cookie:         &CookieConfig{Name: "{env.CHATPROXY_MT_COOKIE}"},
	}
	if err := mtProvision(t, cp); err != nil {
		t.Fatal(err)
	}
	if string(cp.jwtSecret) != mtJWT {
		t.Errorf("jwt secret %q, want %q", cp.jwtSecret, mtJWT)
	}
	if string(cp.sessionSecret) != mtSession {
		t.Errorf("session secret %q, want the file's contents without the newline", cp.sessionSecret)
	}
	if got := cp.webhook.String(); got != "https://n8n.internal:5678/webhook/chat" {
		t.Errorf("webhook %q", got)
	}
	if want := "sqlite:" + filepath.Join(dir, "chat.db"); cp.database != want {
		t.Errorf("database %q, want %q", cp.database, want)
	}
	if cp.PathPrefix != "/chat" || cp.Cookie.Name != "sid" ||
		len(cp.AllowedOrigins) != 1 || cp.AllowedOrigins[0] != "https://shop.example.com" {
		t.Errorf("prefix %q, cookie %q, origins %q", cp.PathPrefix, cp.Cookie.Name, cp.AllowedOrigins)
	}

	// The config Caddy keeps (and serves on /config/) still holds the
	// placeholders, never the secrets.
	saved, err := json.Marshal(cp)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{mtJWT, mtSession} {
		if strings.Contains(string(saved), secret) {
			t.Errorf("saved config holds a secret: %s", saved)
		}
	}
	for _, ph := range []string{`"jwt_secret":"{env.CHATPROXY_MT_JWT}"`, `"session_secret":"{file.` + secretFile + `}"`, `"database":"sqlite:{env.CHATPROXY_MT_DB}"`} {
		if !strings.Contains(string(saved), ph) {
			t.Errorf("saved config lacks %s: %s", ph, saved)
		}
	}
}

func TestProvisionSharesStore(t *testing.T) {
	db := "sqlite:" + filepath.Join(t.TempDir(), "x.db")
	a := mtConfig(t, func(c *ChatProxy) { c.Database = db })
	b := mtConfig(t, func(c *ChatProxy) {
		c.Database = db
		c.N8nWebhook = "http://127.0.0.1:9/webhook/other"
		c.AllowedOrigins = []string{"https://blog.example.net"}
	})
	other := mtConfig(t, nil) // its own temporary database
	for _, cp := range []*ChatProxy{a, b, other} {
		if err := mtProvision(t, cp); err != nil {
			t.Fatal(err)
		}
	}
	if storeKeyOf(a) == "" || storeKeyOf(a) != storeKeyOf(b) {
		t.Fatalf("store keys %q and %q, want one shared key", storeKeyOf(a), storeKeyOf(b))
	}
	if storeKeyOf(other) == storeKeyOf(a) {
		t.Fatalf("another database shares key %q", storeKeyOf(a))
	}
	if !strings.HasPrefix(storeKeyOf(a), "sqlite:") || strings.Contains(storeKeyOf(a), "x.db") {
		t.Errorf("store key %q, want sqlite:<hash>", storeKeyOf(a))
	}
	key := storeKeyOf(a)
	if n, ok := sessions.SharedReferences(key); !ok || n != 2 {
		t.Fatalf("references = %d, %v; want 2", n, ok)
	}
	if err := a.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if n, ok := sessions.SharedReferences(key); !ok || n != 1 {
		t.Fatalf("after one Cleanup: references = %d, %v; want 1", n, ok)
	}
	// The remaining handler's store is still open…
	store := mtPooledStore(t, b)
	if err := store.Ping(t.Context()); err != nil {
		t.Fatalf("shared store after one Cleanup: %v", err)
	}
	if err := b.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if n, ok := sessions.SharedReferences(key); ok || n != 0 {
		t.Fatalf("after both Cleanups: references = %d, %v; want none", n, ok)
	}
	// …and closed with the last reference.
	if err := store.Ping(t.Context()); err == nil {
		t.Error("store still usable after the last Cleanup")
	}
	if n, ok := sessions.SharedReferences(storeKeyOf(other)); !ok || n != 1 {
		t.Errorf("the other store: references = %d, %v; want 1", n, ok)
	}
}

// mtPooledStore is the shared store cp holds.
func mtPooledStore(t *testing.T, cp *ChatProxy) sessions.Store {
	t.Helper()
	if cp.store == nil {
		t.Fatal("no store held")
	}
	return cp.store.Store
}

// storeKeyOf and redisKeyOf are the pool keys cp holds, or "".
func storeKeyOf(cp *ChatProxy) string {
	if cp.store == nil {
		return ""
	}
	return cp.store.Key
}

func redisKeyOf(cp *ChatProxy) string {
	if cp.redis == nil {
		return ""
	}
	return cp.redis.Key
}

// The same database spelled differently (relative path, sqlite://) is
// one store; two Postgres URLs share by their exact text, and the key
// does not hold the password.
func TestProvisionStoreKeys(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	a := mtConfig(t, func(c *ChatProxy) { c.Database = "sqlite:" + filepath.Join(dir, "y.db") })
	b := mtConfig(t, func(c *ChatProxy) { c.Database = "sqlite:y.db" })
	c := mtConfig(t, func(c *ChatProxy) { c.Database = "sqlite://" + filepath.Join(dir, "y.db") })
	// Nothing listens on port 9; Provision must not try to connect.
	pgURL := "postgres://chat:" + mtLeak + "@127.0.0.1:9/chat?sslmode=disable&connect_timeout=30"
	p1 := mtConfig(t, func(c *ChatProxy) { c.Database = pgURL })
	p2 := mtConfig(t, func(c *ChatProxy) { c.Database = pgURL })
	start := time.Now()
	for _, cp := range []*ChatProxy{a, b, c, p1, p2} {
		if err := mtProvision(t, cp); err != nil {
			t.Fatalf("%s: %v", cp.Database, err)
		}
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("provisioning took %v: blocking I/O?", d)
	}
	if storeKeyOf(a) != storeKeyOf(b) || storeKeyOf(a) != storeKeyOf(c) {
		t.Errorf("keys %q, %q, %q; want one", storeKeyOf(a), storeKeyOf(b), storeKeyOf(c))
	}
	if n, _ := sessions.SharedReferences(storeKeyOf(a)); n != 3 {
		t.Errorf("sqlite references %d, want 3", n)
	}
	if storeKeyOf(p1) != storeKeyOf(p2) || !strings.HasPrefix(storeKeyOf(p1), "postgres:") {
		t.Errorf("postgres keys %q, %q", storeKeyOf(p1), storeKeyOf(p2))
	}
	if strings.Contains(storeKeyOf(p1), mtLeak) || strings.Contains(storeKeyOf(p1), "127.0.0.1") {
		t.Errorf("postgres key %q shows the URL", storeKeyOf(p1))
	}
	if n, _ := sessions.SharedReferences(storeKeyOf(p1)); n != 2 {
		t.Errorf("postgres references %d, want 2", n)
	}
}

// Loading through Caddy's module machinery, from JSON: Provision and
// Validate run, and cancelling the context cleans up.
func TestLoadModuleFromJSON(t *testing.T) {
	t.Setenv("CHATPROXY_MT_JWT", mtJWT)
	db := "sqlite:" + filepath.Join(t.TempDir(), "z.db")
	raw, err := json.Marshal(map[string]any{
		"n8n_webhook":     "http://127.0.0.1:9/webhook/chat",
		"jwt_secret":      "{env.CHATPROXY_MT_JWT}",
		"session_secret":  mtSession,
		"database":        db,
		"allowed_origins": []string{"https://shop.example.com"},
		"session_ttl":     "90m",
		"max_body_size":   4096,
		"cookie":          map[string]any{"same_site": "strict", "secure": false},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	mod, err := ctx.LoadModuleByID("http.handlers.chat_proxy", raw)
	if err != nil {
		t.Fatal(err)
	}
	cp := mod.(*ChatProxy)
	if time.Duration(cp.SessionTTL) != 90*time.Minute || cp.MaxBodySize != 4096 ||
		cp.Cookie.SameSite != "strict" || cp.Cookie.Secure == nil || *cp.Cookie.Secure {
		t.Errorf("loaded ttl %v, body %d, cookie %+v", time.Duration(cp.SessionTTL), cp.MaxBodySize, cp.Cookie)
	}
	if string(cp.jwtSecret) != mtJWT {
		t.Errorf("jwt secret %q", cp.jwtSecret)
	}
	key := storeKeyOf(cp)
	if n, _ := sessions.SharedReferences(key); n != 1 {
		t.Fatalf("references %d, want 1", n)
	}
	cancel()
	if n, ok := sessions.SharedReferences(key); ok || n != 0 {
		t.Errorf("after cancel: references %d, want none", n)
	}

	// A bad config fails the load, naming the option, and leaves no
	// reference behind.
	bad, _ := json.Marshal(map[string]any{
		"n8n_webhook": "http://127.0.0.1:9/webhook/chat", "jwt_secret": mtJWT, "session_secret": mtSession,
		"database": db, "allowed_origins": []string{"null"},
	})
	ctx2, cancel2 := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel2()
	if _, err := ctx2.LoadModuleByID("http.handlers.chat_proxy", bad); err == nil ||
		!strings.Contains(err.Error(), `allowed_origins: allowed origin "null": not an origin`) {
		t.Errorf("load of a bad config: %v", err)
	}
	if n, ok := sessions.SharedReferences(key); ok || n != 0 {
		t.Errorf("after a failed load: references %d, want none", n)
	}
}

// testRates turns rates written as in the Caddyfile into the typed form,
// as the Caddyfile parser does; a bad rate fails the test binary.
func testRates(tiers map[string][]string) map[string][]guard.Rate {
	out := make(map[string][]guard.Rate, len(tiers))
	for tier, rates := range tiers {
		out[tier] = []guard.Rate{}
		for _, r := range rates {
			l, err := guard.ParseRate(r)
			if err != nil {
				panic(err)
			}
			out[tier] = append(out[tier], guard.RateOf(l))
		}
	}
	return out
}

// mtServe sends one request through a provisioned module, addressed to
// http://host, with a browser's User-Agent.
func mtServe(t *testing.T, cp *ChatProxy, method, host, path string, headers map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, "http://"+host+path, nil)
	r.Header.Set("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36")
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), rec, nil)
	caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, "203.0.113.9")
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(http.StatusTeapot)
		return nil
	})
	if err := cp.ServeHTTP(rec, r, next); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	return rec
}

// A site that serves its own page and leaves out allowed_origins works:
// the page's requests (Origin: the site's own origin) create a session
// and pass the cookie CSRF check; a look-alike origin is refused.
func TestSiteOwnPageWorksWithoutAllowedOrigins(t *testing.T) {
	cp := mtConfig(t, func(c *ChatProxy) { c.AllowedOrigins = nil })
	if err := mtProvision(t, cp); err != nil {
		t.Fatal(err)
	}
	const host = "localhost:8080"
	own := map[string]string{"Origin": "http://" + host}
	rec := mtServe(t, cp, "POST", host, "/api/v1/session/create", own)
	if rec.Code != http.StatusCreated {
		t.Fatalf("create from the site's own page: %d %s", rec.Code, rec.Body)
	}
	cookie := rec.Result().Cookies()
	if len(cookie) != 1 {
		t.Fatalf("cookies %v", cookie)
	}
	withCookie := func(origin string) map[string]string {
		return map[string]string{"Origin": origin, "Cookie": cookie[0].Name + "=" + cookie[0].Value}
	}
	if rec := mtServe(t, cp, "GET", host, "/api/v1/session/validate", withCookie("http://"+host)); rec.Code != http.StatusOK {
		t.Fatalf("cookie validate from the site's own page: %d %s", rec.Code, rec.Body)
	}
	for _, lookalike := range []string{"http://localhost:8081", "https://" + host, "http://localhost"} {
		if rec := mtServe(t, cp, "GET", host, "/api/v1/session/validate", withCookie(lookalike)); rec.Code != http.StatusForbidden ||
			!strings.Contains(rec.Body.String(), `"origin_not_allowed"`) {
			t.Errorf("%s: %d %s, want 403 origin_not_allowed", lookalike, rec.Code, rec.Body)
		}
	}
}

// The uploads block in the JSON config: absent is off, {} is on with the
// defaults, and a value Validate refuses names the option.
func TestUploadsConfig(t *testing.T) {
	for _, tc := range []struct {
		name    string
		uploads *upload.Config
		on      bool
		wantErr string
	}{
		{"absent", nil, false, ""},
		{"defaults", &upload.Config{}, true, ""},
		{"a type the bytes cannot confirm", &upload.Config{AllowedTypes: []string{"application/zip"}}, false,
			"uploads: allowed_types: application/zip cannot be checked against the file's bytes"},
		{"file above the total", &upload.Config{MaxFileSize: 30 << 20}, false, "uploads: max_file_size (31457280 bytes) is larger than max_total"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp := mtConfig(t, func(c *ChatProxy) { c.Uploads = tc.uploads })
			err := mtProvision(t, cp)
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tc.wantErr) {
					t.Fatalf("Provision: %v, want %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if on := cp.handler.UploadsEnabled(); on != tc.on {
				t.Fatalf("uploads on = %v, want %v", on, tc.on)
			}
		})
	}
}
