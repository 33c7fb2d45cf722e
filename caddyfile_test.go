package chatproxy

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	on, off := true, false
	for _, tc := range []struct {
		name  string
		input string
		want  ChatProxy
	}{
		{
			name:  "no block",
			input: `chat_proxy`,
			want:  ChatProxy{},
		},
		{
			name:  "empty block",
			input: "chat_proxy {\n}",
			want:  ChatProxy{},
		},
		{
			name: "required options with placeholders kept verbatim",
			input: `chat_proxy {
				n8n_webhook    {env.N8N_URL}
				jwt_secret     {env.JWT}
				session_secret {file./run/secrets/session}
				identity_secret {env.IDENTITY}
			}`,
			want: ChatProxy{
				N8nWebhook:     "{env.N8N_URL}",
				JWTSecret:      "{env.JWT}",
				SessionSecret:  "{file./run/secrets/session}",
				IdentitySecret: "{env.IDENTITY}",
			},
		},
		{
			name: "push and handoff",
			input: `chat_proxy {
				push_secret     {env.PUSH_SECRET}
				handoff_webhook https://desk.example.com/hooks/chat
				handoff_timeout 20s
			}`,
			want: ChatProxy{
				PushSecret:     "{env.PUSH_SECRET}",
				HandoffWebhook: "https://desk.example.com/hooks/chat",
				HandoffTimeout: caddy.Duration(20 * time.Second),
			},
		},
		{
			name: "every option",
			input: `chat_proxy {
				n8n_webhook     https://n8n.internal:5678/webhook/abc/chat
				jwt_secret      "a secret with spaces that is long enough"
				session_secret  {env.SESSION_SECRET}
				database        postgres://chat:{env.PGPASS}@db:5432/chat?sslmode=disable
				allowed_origins https://shop.example.com https://*.example.org http://localhost:3000
				path_prefix     /chat/api
				session_ttl     7d
				max_body_size   64KiB
				cookie {
					name      chat_sid
					same_site strict
					domain    example.com
					secure    on
				}
			}`,
			want: ChatProxy{
				N8nWebhook:     "https://n8n.internal:5678/webhook/abc/chat",
				JWTSecret:      "a secret with spaces that is long enough",
				SessionSecret:  "{env.SESSION_SECRET}",
				Database:       "postgres://chat:{env.PGPASS}@db:5432/chat?sslmode=disable",
				AllowedOrigins: []string{"https://shop.example.com", "https://*.example.org", "http://localhost:3000"},
				PathPrefix:     "/chat/api",
				SessionTTL:     caddy.Duration(7 * 24 * time.Hour),
				MaxBodySize:    64 << 10,
				Cookie:         &CookieConfig{Name: "chat_sid", SameSite: "strict", Domain: "example.com", Secure: &on},
			},
		},
		{
			name:  "quoted braces are values",
			input: "chat_proxy {\n jwt_secret \"}0123456789abcdef0123456789abcdef\"\n session_secret \"{\"\n}",
			want:  ChatProxy{JWTSecret: "}0123456789abcdef0123456789abcdef", SessionSecret: "{"},
		},
		{
			name:  "one origin",
			input: "chat_proxy {\n allowed_origins https://a.example.com\n}",
			want:  ChatProxy{AllowedOrigins: []string{"https://a.example.com"}},
		},
		{
			name:  "sqlite database",
			input: "chat_proxy {\n database sqlite:/var/lib/caddy/chat.db\n}",
			want:  ChatProxy{Database: "sqlite:/var/lib/caddy/chat.db"},
		},
		{
			name:  "store_wait",
			input: "chat_proxy {\n database sqlite:/var/lib/caddy/chat.db\n store_wait 10s\n}",
			want:  ChatProxy{Database: "sqlite:/var/lib/caddy/chat.db", StoreWait: caddy.Duration(10 * time.Second)},
		},
		{
			name:  "duration in minutes",
			input: "chat_proxy {\n session_ttl 90m\n}",
			want:  ChatProxy{SessionTTL: caddy.Duration(90 * time.Minute)},
		},
		{
			name:  "duration in days and hours",
			input: "chat_proxy {\n session_ttl 1d12h\n}",
			want:  ChatProxy{SessionTTL: caddy.Duration(36 * time.Hour)},
		},
		{
			name:  "decimal size",
			input: "chat_proxy {\n max_body_size 1MB\n}",
			want:  ChatProxy{MaxBodySize: 1000000},
		},
		{
			name:  "binary size",
			input: "chat_proxy {\n max_body_size 1MiB\n}",
			want:  ChatProxy{MaxBodySize: 1 << 20},
		},
		{
			name:  "plain byte count",
			input: "chat_proxy {\n max_body_size 4096\n}",
			want:  ChatProxy{MaxBodySize: 4096},
		},
		{
			name:  "largest size",
			input: "chat_proxy {\n max_body_size 1GiB\n}",
			want:  ChatProxy{MaxBodySize: 1 << 30},
		},
		{
			name:  "cookie secure off, same_site in capitals",
			input: "chat_proxy {\n cookie {\n  same_site LAX\n  secure off\n }\n}",
			want:  ChatProxy{Cookie: &CookieConfig{SameSite: "lax", Secure: &off}},
		},
		{
			name:  "cookie same_site none",
			input: "chat_proxy {\n cookie {\n  same_site none\n }\n}",
			want:  ChatProxy{Cookie: &CookieConfig{SameSite: "none"}},
		},
		{
			name:  "cookie placeholders kept",
			input: "chat_proxy {\n cookie {\n  name {env.COOKIE}\n  domain {env.COOKIE_DOMAIN}\n }\n}",
			want:  ChatProxy{Cookie: &CookieConfig{Name: "{env.COOKIE}", Domain: "{env.COOKIE_DOMAIN}"}},
		},
		{
			name:  "response nodes options",
			input: "chat_proxy {\n chat_socket /chat\n n8n_socket_url ws://n8n-main:5678/chat\n wait_timeout 15m\n}",
			want:  ChatProxy{ChatSocket: "/chat", N8nSocketURL: "ws://n8n-main:5678/chat", WaitTimeout: caddy.Duration(15 * time.Minute)},
		},
		{
			name:  "detached_timeout",
			input: "chat_proxy {\n detached_timeout 2m\n}",
			want:  ChatProxy{DetachedTimeout: caddy.Duration(2 * time.Minute)},
		},
		{
			name:  "detached_timeout off",
			input: "chat_proxy {\n detached_timeout off\n}",
			want:  ChatProxy{DetachedTimeout: DetachedTimeoutOff},
		},
		{
			name:  "chat socket off",
			input: "chat_proxy {\n chat_socket off\n}",
			want:  ChatProxy{ChatSocket: "off"},
		},
		{
			name:  "options after the cookie block",
			input: "chat_proxy {\n cookie {\n  name a\n }\n path_prefix /x\n}",
			want:  ChatProxy{Cookie: &CookieConfig{Name: "a"}, PathPrefix: "/x"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got ChatProxy
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got  %s\nwant %s", cfDump(t, &got), cfDump(t, &tc.want))
			}
		})
	}
}

// cfDump shows a config the way Caddy saves it.
func cfDump(t *testing.T, cp *ChatProxy) string {
	t.Helper()
	b, err := json.Marshal(cp)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  string // the whole error
	}{
		{
			name:  "empty cookie block",
			input: "chat_proxy {\n cookie {\n }\n}",
			want:  "chat_proxy: option 'cookie' needs a block with name, same_site, domain or secure, at Testfile:3",
		},
		{
			name:  "bare cookie",
			input: "chat_proxy {\n cookie\n}",
			want:  "chat_proxy: option 'cookie' needs a block with name, same_site, domain or secure, at Testfile:2",
		},
		{
			name:  "arguments after chat_proxy",
			input: "chat_proxy https://n8n/webhook {\n}",
			want:  "wrong argument count or unexpected line ending after 'https://n8n/webhook', at Testfile:1",
		},
		{
			name:  "unknown option",
			input: "chat_proxy {\n\tn8n_webhook http://n8n/x\n\twebhook http://n8n/x\n}",
			want:  "chat_proxy: unrecognized option 'webhook' (did you mean 'n8n_webhook' or 'handoff_webhook'?), at Testfile:3",
		},
		{
			name:  "unknown option with a block",
			input: "chat_proxy {\n\trate_limiter {\n\t\tip 1/1m\n\t}\n}",
			want:  "chat_proxy: unrecognized option 'rate_limiter' (did you mean 'rate_limit'?), at Testfile:2",
		},
		{
			name:  "duplicate option",
			input: "chat_proxy {\n\tjwt_secret {env.A}\n\tsession_secret {env.B}\n\tjwt_secret {env.C}\n}",
			want:  "chat_proxy: duplicate option 'jwt_secret', at Testfile:4",
		},
		{
			name:  "duplicate allowed_origins",
			input: "chat_proxy {\n\tallowed_origins https://a.com\n\tallowed_origins https://b.com\n}",
			want:  "chat_proxy: duplicate option 'allowed_origins', at Testfile:3",
		},
		{
			name:  "duplicate cookie block",
			input: "chat_proxy {\n\tcookie {\n\t\tname a\n\t}\n\tcookie {\n\t\tname b\n\t}\n}",
			want:  "chat_proxy: duplicate option 'cookie', at Testfile:5",
		},
		{
			name:  "missing value",
			input: "chat_proxy {\n\tn8n_webhook\n}",
			want:  "chat_proxy: option 'n8n_webhook' needs a value, at Testfile:2",
		},
		{
			name:  "missing value at end of input",
			input: "chat_proxy {\n\tdatabase",
			want:  "chat_proxy: option 'database' needs a value, at Testfile:2",
		},
		{
			name:  "missing secret",
			input: "chat_proxy {\n\tjwt_secret\n\tsession_secret {env.S}\n}",
			want:  "chat_proxy: option 'jwt_secret' needs a value, at Testfile:2",
		},
		{
			name:  "extra value",
			input: "chat_proxy {\n\tn8n_webhook http://a/x http://b/x\n}",
			want:  "chat_proxy: option 'n8n_webhook' takes one value, at Testfile:2",
		},
		{
			name:  "extra value for a secret",
			input: "chat_proxy {\n\tsession_secret two words\n}",
			want:  "chat_proxy: option 'session_secret' takes one value, at Testfile:2",
		},
		{
			name:  "block after a single-value option",
			input: "chat_proxy {\n\tn8n_webhook http://n8n/x {\n\t\tfoo bar\n\t}\n}",
			want:  "chat_proxy: option 'n8n_webhook' does not take a block, at Testfile:2",
		},
		{
			name:  "empty block after a single-value option",
			input: "chat_proxy {\n\tn8n_webhook http://n8n/x {\n\t}\n}",
			want:  "chat_proxy: option 'n8n_webhook' does not take a block, at Testfile:2",
		},
		{
			name:  "unclosed block after a single-value option",
			input: "chat_proxy {\n\tn8n_webhook http://n8n/x {\n}",
			want:  "chat_proxy: option 'n8n_webhook' does not take a block, at Testfile:2",
		},
		{
			name:  "braces on the option's line",
			input: "chat_proxy {\n\tjwt_secret {env.JWT} { }\n}",
			want:  "chat_proxy: option 'jwt_secret' does not take a block, at Testfile:2",
		},
		{
			name:  "block instead of a value",
			input: "chat_proxy {\n\tpath_prefix {\n\t\t/x\n\t}\n}",
			want:  "chat_proxy: option 'path_prefix' needs a value, at Testfile:2",
		},
		{
			name:  "block after allowed_origins",
			input: "chat_proxy {\n\tallowed_origins https://a.com {\n\t\thttps://b.com\n\t}\n}",
			want:  "chat_proxy: option 'allowed_origins' does not take a block, at Testfile:2",
		},
		{
			name:  "allowed_origins without origins",
			input: "chat_proxy {\n\tallowed_origins\n}",
			want:  "chat_proxy: option 'allowed_origins' needs at least one origin, at Testfile:2",
		},
		{
			name:  "bad duration",
			input: "chat_proxy {\n\tsession_ttl forever\n}",
			want:  `chat_proxy: option 'session_ttl': invalid duration "forever" (use e.g. 30s, 10m, 7d), at Testfile:2`,
		},
		{
			name:  "duration without unit",
			input: "chat_proxy {\n\tsession_ttl 3600\n}",
			want:  `chat_proxy: option 'session_ttl': invalid duration "3600" (use e.g. 30s, 10m, 7d), at Testfile:2`,
		},
		{
			name:  "zero duration",
			input: "chat_proxy {\n\tsession_ttl 0s\n}",
			want:  `chat_proxy: option 'session_ttl': invalid duration "0s" (use e.g. 30s, 10m, 7d), at Testfile:2`,
		},
		{
			name:  "negative duration",
			input: "chat_proxy {\n\tsession_ttl -1h\n}",
			want:  `chat_proxy: option 'session_ttl': invalid duration "-1h" (use e.g. 30s, 10m, 7d), at Testfile:2`,
		},
		{
			name:  "duration extra value",
			input: "chat_proxy {\n\tsession_ttl 1h 2h\n}",
			want:  "chat_proxy: option 'session_ttl' takes one value, at Testfile:2",
		},
		{
			name:  "bad size",
			input: "chat_proxy {\n\tmax_body_size lots\n}",
			want:  `chat_proxy: option 'max_body_size': invalid size "lots" (use e.g. 64KiB, at most 1GiB), at Testfile:2`,
		},
		{
			name:  "zero size",
			input: "chat_proxy {\n\tmax_body_size 0\n}",
			want:  `chat_proxy: max_body_size: must be at least 1KiB, got 0 bytes, at Testfile:2`,
		},
		{
			name:  "negative size",
			input: "chat_proxy {\n\tmax_body_size -1KiB\n}",
			want:  `chat_proxy: option 'max_body_size': invalid size "-1KiB" (use e.g. 64KiB, at most 1GiB), at Testfile:2`,
		},
		{
			name:  "size too large",
			input: "chat_proxy {\n\tmax_body_size 2GiB\n}",
			want:  `chat_proxy: max_body_size: must be at most 1GiB, got 2147483648 bytes, at Testfile:2`,
		},
		{
			name:  "size missing value",
			input: "chat_proxy {\n\tmax_body_size\n}",
			want:  "chat_proxy: option 'max_body_size' needs a value, at Testfile:2",
		},
		{
			name:  "cookie with arguments",
			input: "chat_proxy {\n\tcookie chat_session {\n\t\tsecure on\n\t}\n}",
			want:  "chat_proxy: option 'cookie' takes a block, not arguments, at Testfile:2",
		},
		{
			name:  "unknown cookie option",
			input: "chat_proxy {\n\tcookie {\n\t\tname a\n\t\thttp_only on\n\t}\n}",
			want:  "chat_proxy: unrecognized cookie option 'http_only', at Testfile:4",
		},
		{
			name:  "duplicate cookie option",
			input: "chat_proxy {\n\tcookie {\n\t\tname a\n\t\tsecure on\n\t\tname b\n\t}\n}",
			want:  "chat_proxy: duplicate cookie option 'name', at Testfile:5",
		},
		{
			name:  "cookie option missing value",
			input: "chat_proxy {\n\tcookie {\n\t\tdomain\n\t}\n}",
			want:  "chat_proxy: option 'cookie domain' needs a value, at Testfile:3",
		},
		{
			name:  "cookie option extra value",
			input: "chat_proxy {\n\tcookie {\n\t\tname a b\n\t}\n}",
			want:  "chat_proxy: option 'cookie name' takes one value, at Testfile:3",
		},
		{
			name:  "cookie option with a block",
			input: "chat_proxy {\n\tcookie {\n\t\tname a {\n\t\t\tb\n\t\t}\n\t}\n}",
			want:  "chat_proxy: option 'cookie name' does not take a block, at Testfile:3",
		},
		{
			name:  "bad same_site",
			input: "chat_proxy {\n\tcookie {\n\t\tsame_site sometimes\n\t}\n}",
			want:  `chat_proxy: cookie option 'same_site' must be lax, strict or none, got "sometimes", at Testfile:3`,
		},
		{
			name:  "bad secure",
			input: "chat_proxy {\n\tcookie {\n\t\tsecure true\n\t}\n}",
			want:  `chat_proxy: cookie option 'secure' must be on or off, got "true", at Testfile:3`,
		},
		{
			name:  "error after a good cookie block",
			input: "chat_proxy {\n\tcookie {\n\t\tsecure on\n\t}\n\tbogus 1\n}",
			want:  "chat_proxy: unrecognized option 'bogus', at Testfile:5",
		},
	} {
		t.Run(tc.name, func(t *testing.T) { wantCaddyfileError(t, tc.input, tc.want) })
	}
}

// wantCaddyfileError checks that the Caddyfile input is refused with
// exactly the error want.
func wantCaddyfileError(t *testing.T, input, want string) {
	t.Helper()
	var cp ChatProxy
	err := cp.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
	if err == nil {
		t.Fatalf("no error, want %q; got config %s", want, cfDump(t, &cp))
	}
	if err.Error() != want {
		t.Fatalf("error\n got  %q\n want %q", err, want)
	}
}

// The parser checks each literal value as it reads it, with the checks
// Validate runs, so a bad value is reported with its file and line rather
// than at provision time without one. Placeholders are checked once
// resolved.
func TestCaddyfileChecksValuesWithTheLine(t *testing.T) {
	for _, tc := range []struct {
		name, option, want string
	}{
		{"webhook without scheme", "n8n_webhook n8n.internal:5678/webhook/chat", "n8n_webhook: must be an absolute http or https URL"},
		{"webhook with a bad port, password hidden", "n8n_webhook http://u:hunter2@n8n:port/x", "n8n_webhook: not a valid URL"},
		{"short literal secret", "jwt_secret too-short", "jwt_secret: must be at least 32 bytes, got 9"},
		{"short literal session secret", "session_secret 0123456789abcdef0123456789abcde", "session_secret: must be at least 32 bytes, got 31"},
		{"short literal push secret", "push_secret 0123456789abcdef0123456789abcde", "push_secret: must be at least 32 bytes, got 31"},
		{"handoff_webhook without scheme", "handoff_webhook desk.example.com/hook", "handoff_webhook: must be an absolute http or https URL"},
		{"handoff_timeout too short", "handoff_timeout 10ms", "handoff_timeout: must be at least 1s, got 10ms"},
		{"short literal identity secret", "identity_secret 0123456789abcdef0123456789abcde", "identity_secret: must be at least 32 bytes, got 31"},
		{"rate_limit of an unknown tier", "rate_limit users 5/1m", `option 'rate_limit': unknown rate limit tier "users" (want ip, session, domain, create or user)`},
		{"database mysql", "database mysql://chat:hunter2@db/chat", "database: must be a postgres:// or postgresql:// URL, or sqlite:<path>"},
		{"database sqlite without a path", "database sqlite:", "database: sqlite: needs a file path, as in sqlite:/var/lib/caddy/chat.db"},
		{"path_prefix without a slash", "path_prefix api/v1", `path_prefix: must be a path such as /api/v1 (letters, digits, - . _ ~ and /), got "api/v1"`},
		{"origin with a path", "allowed_origins https://a.example.com https://shop.example.com/chat",
			`allowed_origins: allowed origin "https://shop.example.com/chat": an origin has no user, path, query or fragment`},
		{"origin star", "allowed_origins *", `allowed_origins: allowed origin "*": not an origin`},
		{"session_ttl too short", "session_ttl 30s", "session_ttl: must be at least 1m, got 30s"},
		{"upstream_timeout under a second", "upstream_timeout 500ms", "upstream_timeout: must be at least 1s, got 500ms"},
		{"history_retention too short", "history_retention 30m", "history_retention: must be at least 1h, got 30m0s"},
		{"purge_interval too short", "purge_interval 10s", "purge_interval: must be at least 1m, got 10s"},
		{"store_wait too long", "store_wait 2m", "store_wait: must be between 0 (the default, 3s) and 1m, got 2m0s"},
		{"max_body_size too small", "max_body_size 100", "max_body_size: must be at least 1KiB, got 100 bytes"},
		{"redis without a scheme", "redis localhost:6379", `redis: "localhost:6379" is not a redis:// or rediss:// URL; write redis://localhost:6379`},
		{"redis without a scheme, password hidden", "redis :hunter2@cache:6379",
			`redis: "****@cache:6379" is not a redis:// or rediss:// URL; write redis://****@cache:6379`},
		{"redis other scheme", "redis http://cache:6379", `redis: "http://cache:6379" is not a redis:// or rediss:// URL`},
		{"redis bad database", "redis redis://cache:6379/zero", `redis: invalid database number: "zero"`},
		{"detached_timeout too short", "detached_timeout 500ms", "detached_timeout: must be off or from 1s to 1h, got 500ms"},
		{"detached_timeout too long", "detached_timeout 2h", "detached_timeout: must be off or from 1s to 1h, got 2h0m0s"},
		{"on_client_disconnect", "on_client_disconnect later", `on_client_disconnect: must be cancel or finish, got "later"`},
		{"bot_detection", "bot_detection on", `bot_detection: got "on", want off or a threshold from 1 to 99`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantCaddyfileError(t, "chat_proxy {\n\tlog_content off\n\t"+tc.option+"\n}", "chat_proxy: "+tc.want+", at Testfile:3")
		})
	}
	// Cookie values are checked at the end of the block, at its last line.
	wantCaddyfileError(t, "chat_proxy {\n\tcookie {\n\t\tname \"chat session\"\n\t}\n}", `chat_proxy: cookie: invalid name "chat session", at Testfile:4`)
	wantCaddyfileError(t, "chat_proxy {\n\tcookie {\n\t\tsame_site none\n\t\tsecure off\n\t}\n}", "chat_proxy: cookie: same_site none needs a secure cookie, at Testfile:5")
	// Two literal secrets must differ.
	same := "0123456789abcdef0123456789abcdef"
	wantCaddyfileError(t, "chat_proxy {\n\tjwt_secret "+same+"\n\tsession_secret "+same+"\n}", "chat_proxy: session_secret: must differ from jwt_secret, at Testfile:4")
	wantCaddyfileError(t, "chat_proxy {\n\tjwt_secret "+same+"\n\tpush_secret "+same+"\n}", "chat_proxy: push_secret: must differ from jwt_secret and session_secret, at Testfile:4")
	wantCaddyfileError(t, "chat_proxy {\n\tsession_secret "+same+"\n\tidentity_secret "+same+"\n}", "chat_proxy: identity_secret: must differ from jwt_secret, session_secret and push_secret, at Testfile:4")
	wantCaddyfileError(t, "chat_proxy {\n\tidentity_secret "+same+"\n\terasure_secret "+same+"\n}", "chat_proxy: erasure_secret: must differ from identity_secret, jwt_secret, session_secret and push_secret, at Testfile:4")
	wantCaddyfileError(t, "chat_proxy {\n\tidentity_proofs user_hash password\n}", `chat_proxy: identity_proofs: unknown proof form "password": use user_hash or identity_token, at Testfile:2`)
	wantCaddyfileError(t, "chat_proxy {\n\terasure_secret short\n}", "chat_proxy: erasure_secret: must be at least 32 bytes, got 5, at Testfile:2")

	// Placeholders are left for provision time.
	var cp ChatProxy
	in := "chat_proxy {\n\tjwt_secret {env.JWT}\n\tsession_secret {file./run/s}\n\tn8n_webhook {env.N8N}\n\tdatabase {env.DB}\n" +
		"\tredis {env.REDIS}\n\tallowed_origins {env.ORIGIN} https://ok.example.com\n\tpath_prefix {env.PREFIX}\n\tcookie {\n\t\tname {env.C}\n\t}\n}"
	if err := cp.UnmarshalCaddyfile(caddyfile.NewTestDispenser(in)); err != nil {
		t.Fatalf("placeholders: %v", err)
	}
}

// One source of truth: a bad value written in the Caddyfile and the same
// value given in JSON are refused with the same message, the Caddyfile's
// with its line.
func TestCaddyfileAndValidateAgree(t *testing.T) {
	for _, tc := range []struct {
		option string
		mutate func(*ChatProxy)
		want   string
	}{
		{"session_ttl 30s", func(c *ChatProxy) { c.SessionTTL = caddy.Duration(30 * time.Second) }, "session_ttl: must be at least 1m, got 30s"},
		{"max_body_size 2GiB", func(c *ChatProxy) { c.MaxBodySize = 2 << 30 }, "max_body_size: must be at most 1GiB, got 2147483648 bytes"},
		{"redis localhost:6379", func(c *ChatProxy) { c.Redis = "localhost:6379" },
			`redis: "localhost:6379" is not a redis:// or rediss:// URL; write redis://localhost:6379`},
		{"rate_limit ip 60/1m 30/60s", func(c *ChatProxy) { c.RateLimits = testRates(map[string][]string{"ip": {"60/1m", "30/60s"}}) },
			"rate_limit ip: two rates with the window 1m"},
		{"n8n_webhook /webhook/chat", func(c *ChatProxy) { c.N8nWebhook = "/webhook/chat" }, "n8n_webhook: must be an absolute http or https URL"},
		{"path_prefix /api/*", func(c *ChatProxy) { c.PathPrefix = "/api/*" },
			`path_prefix: must be a path such as /api/v1 (letters, digits, - . _ ~ and /), got "/api/*"`},
	} {
		t.Run(tc.option, func(t *testing.T) {
			var cp ChatProxy
			err := cp.UnmarshalCaddyfile(caddyfile.NewTestDispenser("chat_proxy {\n\t" + tc.option + "\n}"))
			if err == nil || !strings.HasPrefix(err.Error(), "chat_proxy: "+tc.want+", at Testfile:2") {
				t.Errorf("Caddyfile: %v\n want chat_proxy: %s, at Testfile:2", err, tc.want)
			}
			err = mtProvision(t, mtConfig(t, tc.mutate))
			if err == nil || err.Error() != tc.want {
				t.Errorf("JSON: %v\n want %s", err, tc.want)
			}
		})
	}
}

func TestDidYouMean(t *testing.T) {
	for unknown, want := range map[string]string{
		"rate_limiter":    " (did you mean 'rate_limit'?)",
		"allowed_origin":  " (did you mean 'allowed_origins'?)",
		"jwt-secret":      " (did you mean 'jwt_secret'?)",
		"sesion_secret":   " (did you mean 'session_secret'?)",
		"webhook":         " (did you mean 'n8n_webhook' or 'handoff_webhook'?)",
		"history":         " (did you mean 'history_retention'?)",
		"reddis":          " (did you mean 'redis'?)",
		"secret":          "", // two options end in _secret: no guess
		"listen":          "",
		"reverse_proxy":   "",
		"x":               "",
		"timeout":         "",
		"metrics":         " (did you mean 'metrics_allow'?)",
		"purge_intervall": " (did you mean 'purge_interval'?)",
	} {
		if got := didYouMean(unknown, caddyfileOptions); got != want {
			t.Errorf("didYouMean(%q) = %q, want %q", unknown, got, want)
		}
	}
	if got := didYouMean("samesite", cookieOptions); got != " (did you mean 'same_site'?)" {
		t.Errorf("cookie samesite: %q", got)
	}
	wantCaddyfileError(t, "chat_proxy {\n\tcookie {\n\t\tsamesite lax\n\t}\n}", "chat_proxy: unrecognized cookie option 'samesite' (did you mean 'same_site'?), at Testfile:3")
}

func TestEditDistance(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"", "", 0}, {"a", "", 1}, {"", "abc", 3}, {"kitten", "sitting", 3}, {"rate_limit", "rate_limiter", 2}, {"same", "same", 0},
	} {
		if got := editDistance(tc.a, tc.b); got != tc.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// A JSON config may give rates in the typed form or as the older strings;
// a bad one fails the load naming the field.
func TestRateLimitsJSONForms(t *testing.T) {
	for _, tc := range []struct {
		raw, want string
	}{
		{`{"ip":[{"events":60,"window":"1m"},{"events":1000,"window":"1h"}],"create":[]}`, ""},
		{`{"ip":["60/1m","1000/1h"],"create":[]}`, ""},
		{`{"ip":["sixty"]}`, `rate "sixty": want <N>/<window>, such as 60/1m`},
		{`{"ip":[{"events":60}]}`, `rate: needs both "events" and "window"`},
	} {
		var cp ChatProxy
		err := json.Unmarshal([]byte(`{"rate_limits":`+tc.raw+`}`), &cp)
		if tc.want != "" {
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: %v, want %q", tc.raw, err, tc.want)
			}
			continue
		}
		want := testRates(map[string][]string{"ip": {"60/1m", "1000/1h"}, "create": {}})
		if err != nil || !reflect.DeepEqual(cp.RateLimits, want) {
			t.Errorf("%s: %+v, %v", tc.raw, cp.RateLimits, err)
		}
	}
}
