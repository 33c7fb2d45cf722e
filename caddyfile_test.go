package chatproxy

import (
	"encoding/json"
	"reflect"
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
			}`,
			want: ChatProxy{
				N8nWebhook:    "{env.N8N_URL}",
				JWTSecret:     "{env.JWT}",
				SessionSecret: "{file./run/secrets/session}",
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
			input: "chat_proxy {\n jwt_secret \"}\"\n session_secret \"{\"\n}",
			want:  ChatProxy{JWTSecret: "}", SessionSecret: "{"},
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
			want:  "chat_proxy: unrecognized option 'webhook', at Testfile:3",
		},
		{
			name:  "unknown option with a block",
			input: "chat_proxy {\n\trate_limiter {\n\t\tip 1/1m\n\t}\n}",
			want:  "chat_proxy: unrecognized option 'rate_limiter', at Testfile:2",
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
			want:  `chat_proxy: option 'max_body_size': invalid size "0" (use e.g. 64KiB, at most 1GiB), at Testfile:2`,
		},
		{
			name:  "negative size",
			input: "chat_proxy {\n\tmax_body_size -1KiB\n}",
			want:  `chat_proxy: option 'max_body_size': invalid size "-1KiB" (use e.g. 64KiB, at most 1GiB), at Testfile:2`,
		},
		{
			name:  "size too large",
			input: "chat_proxy {\n\tmax_body_size 2GiB\n}",
			want:  `chat_proxy: option 'max_body_size': invalid size "2GiB" (use e.g. 64KiB, at most 1GiB), at Testfile:2`,
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
