package chatproxy

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/chatproxy/caddy-chatproxy/guard"
)

// The Caddyfile options of the guard and the upstream (issue 4), parsed.
func TestUnmarshalCaddyfileGuardOptions(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  ChatProxy
		json  string // the saved JSON config, when it matters
	}{
		{
			name:  "ip tier with two windows",
			input: "chat_proxy {\n\trate_limit ip 60/1m 1000/1h\n}",
			want:  ChatProxy{RateLimits: testRates(map[string][]string{"ip": {"60/1m", "1000/1h"}})},
			json:  `{"rate_limits":{"ip":[{"events":60,"window":"1m"},{"events":1000,"window":"1h"}]}}`,
		},
		{
			name:  "circuit breaker",
			input: "chat_proxy {\n\tcircuit_breaker 3 45s\n}",
			want:  ChatProxy{CircuitBreakerFailures: 3, CircuitBreakerOpen: caddy.Duration(45 * time.Second)},
			json:  `{"circuit_breaker_failures":3,"circuit_breaker_open":45000000000}`,
		},
		{
			name:  "repeat offenders blocked",
			input: "chat_proxy {\n\trate_limit_block 5 10m\n}",
			want:  ChatProxy{BlockAfter: 5, BlockFor: caddy.Duration(10 * time.Minute)},
			json:  `{"block_after":5,"block_for":600000000000}`,
		},
		{
			name:  "no blocking",
			input: "chat_proxy {\n\trate_limit_block off\n}",
			want:  ChatProxy{BlockAfter: -1},
			json:  `{"block_after":-1}`,
		},
		{
			name:  "a tier turned off",
			input: "chat_proxy {\n\trate_limit create off\n}",
			want:  ChatProxy{RateLimits: map[string][]guard.Rate{"create": {}}},
			json:  `{"rate_limits":{"create":[]}}`,
		},
		{
			name: "every tier",
			input: `chat_proxy {
				rate_limit ip      120/1m 5000/1d
				rate_limit session 5/30s
				rate_limit domain  1000/1m
				rate_limit create  10/1m 100/1h
				rate_limit user    20/1m 300/1h
			}`,
			want: ChatProxy{RateLimits: testRates(map[string][]string{
				"ip": {"120/1m", "5000/1d"}, "session": {"5/30s"}, "domain": {"1000/1m"}, "create": {"10/1m", "100/1h"},
				"user": {"20/1m", "300/1h"},
			})},
		},
		{
			name:  "the user tier turned off",
			input: "chat_proxy {\n\trate_limit user off\n}",
			want:  ChatProxy{RateLimits: map[string][]guard.Rate{"user": {}}},
			json:  `{"rate_limits":{"user":[]}}`,
		},
		{
			name:  "bot_detection off",
			input: "chat_proxy {\n\tbot_detection off\n}",
			want:  ChatProxy{BotDetection: "off"},
		},
		{
			name:  "bot_detection threshold",
			input: "chat_proxy {\n\tbot_detection 30\n}",
			want:  ChatProxy{BotDetection: "30"},
			json:  `{"bot_detection":"30"}`,
		},
		{
			name:  "bot_detection bounds",
			input: "chat_proxy {\n\tbot_detection 99\n}",
			want:  ChatProxy{BotDetection: "99"},
		},
		{
			name:  "redis URL with a placeholder kept verbatim",
			input: "chat_proxy {\n\tredis redis://:{env.REDIS_PASSWORD}@redis.internal:6379/2\n}",
			want:  ChatProxy{Redis: "redis://:{env.REDIS_PASSWORD}@redis.internal:6379/2"},
			json:  `{"redis":"redis://:{env.REDIS_PASSWORD}@redis.internal:6379/2"}`,
		},
		{
			name:  "max_message_length",
			input: "chat_proxy {\n\tmax_message_length 2000\n}",
			want:  ChatProxy{MaxMessageLength: 2000},
		},
		{
			name:  "max_message_length bounds",
			input: "chat_proxy {\n\tmax_message_length 100000\n}",
			want:  ChatProxy{MaxMessageLength: 100000},
		},
		{
			name:  "on_client_disconnect finish",
			input: "chat_proxy {\n\ton_client_disconnect finish\n}",
			want:  ChatProxy{OnClientDisconnect: "finish"},
		},
		{
			name:  "on_client_disconnect cancel",
			input: "chat_proxy {\n\ton_client_disconnect cancel\n}",
			want:  ChatProxy{OnClientDisconnect: "cancel"},
		},
		{
			name:  "upstream_auth basic",
			input: "chat_proxy {\n\tupstream_auth basic chat {env.N8N_PASSWORD}\n}",
			want:  ChatProxy{UpstreamAuth: &UpstreamAuth{Mode: "basic", Username: "chat", Password: "{env.N8N_PASSWORD}"}},
			json:  `{"upstream_auth":{"mode":"basic","username":"chat","password":"{env.N8N_PASSWORD}"}}`,
		},
		{
			name:  "upstream_auth header",
			input: "chat_proxy {\n\tupstream_auth header X-N8N-Key {file./run/secrets/n8n}\n}",
			want:  ChatProxy{UpstreamAuth: &UpstreamAuth{Mode: "header", HeaderName: "X-N8N-Key", HeaderValue: "{file./run/secrets/n8n}"}},
		},
		{
			name:  "upstream_auth jwt",
			input: "chat_proxy {\n\tupstream_auth jwt\n}",
			want:  ChatProxy{UpstreamAuth: &UpstreamAuth{Mode: "jwt"}},
		},
		{
			name:  "upstream_auth none",
			input: "chat_proxy {\n\tupstream_auth none\n}",
			want:  ChatProxy{UpstreamAuth: &UpstreamAuth{Mode: "none"}},
		},
		{
			name: "timeouts",
			input: `chat_proxy {
				n8n_token_ttl       30s
				upstream_timeout    2m
				stream_idle_timeout 45s
				max_stream_duration 1h
			}`,
			want: ChatProxy{
				N8nTokenTTL:       caddy.Duration(30 * time.Second),
				UpstreamTimeout:   caddy.Duration(2 * time.Minute),
				StreamIdleTimeout: caddy.Duration(45 * time.Second),
				MaxStreamDuration: caddy.Duration(time.Hour),
			},
			json: `{"n8n_token_ttl":30000000000,"upstream_timeout":120000000000,"stream_idle_timeout":45000000000,"max_stream_duration":3600000000000}`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got ChatProxy
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got  %s\nwant %s", cfDump(t, &got), cfDump(t, &tc.want))
			}
			if tc.json == "" {
				return
			}
			if s := cfDump(t, &got); s != tc.json {
				t.Fatalf("JSON %s, want %s", s, tc.json)
			}
			// The saved JSON loads back to the same configuration.
			var back ChatProxy
			if err := json.Unmarshal([]byte(tc.json), &back); err != nil || !reflect.DeepEqual(back, tc.want) {
				t.Fatalf("JSON round trip: %s, %v", cfDump(t, &back), err)
			}
		})
	}
}

func TestUnmarshalCaddyfileGuardErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  string // the whole error
	}{
		{"circuit breaker without open time", "chat_proxy {\n\tcircuit_breaker 3\n}",
			"chat_proxy: option 'circuit_breaker' takes <failures> <open duration>, as in: circuit_breaker 5 30s, at Testfile:2"},
		{"circuit breaker zero failures", "chat_proxy {\n\tcircuit_breaker 0 30s\n}",
			`chat_proxy: option 'circuit_breaker': failures must be a whole number from 1 to 1000, got "0", at Testfile:2`},
		{"circuit breaker bad duration", "chat_proxy {\n\tcircuit_breaker 5 soon\n}",
			`chat_proxy: option 'circuit_breaker': invalid duration "soon" (use e.g. 30s, 10m, 7d), at Testfile:2`},
		{"rate_limit_block one value", "chat_proxy {\n\trate_limit_block 5\n}",
			"chat_proxy: option 'rate_limit_block' takes <refusals> <duration>, or off, at Testfile:2"},
		{"rate_limit_block bad count", "chat_proxy {\n\trate_limit_block many 5m\n}",
			`chat_proxy: option 'rate_limit_block': refusals must be a whole number of at least 1, got "many", at Testfile:2`},
		{"duplicate tier", "chat_proxy {\n\trate_limit ip 60/1m\n\trate_limit session 5/1m\n\trate_limit ip 100/1m\n}",
			"chat_proxy: duplicate option 'rate_limit ip', at Testfile:4"},
		{"duplicate tier, the second off", "chat_proxy {\n\trate_limit create 10/1m\n\trate_limit create off\n}",
			"chat_proxy: duplicate option 'rate_limit create', at Testfile:3"},
		{"unknown tier", "chat_proxy {\n\trate_limit ipv6 60/1m\n}",
			`chat_proxy: option 'rate_limit': unknown rate limit tier "ipv6" (want ip, session, domain, create or user), at Testfile:2`},
		{"tier without rates", "chat_proxy {\n\trate_limit ip\n}",
			"chat_proxy: option 'rate_limit' needs a tier and at least one rate, as in: rate_limit ip 60/1m 1000/1h, at Testfile:2"},
		{"bare rate_limit", "chat_proxy {\n\trate_limit\n}",
			"chat_proxy: option 'rate_limit' needs a tier and at least one rate, as in: rate_limit ip 60/1m 1000/1h, at Testfile:2"},
		{"rate without window", "chat_proxy {\n\trate_limit ip 60\n}",
			`chat_proxy: rate_limit ip: rate "60": want <N>/<window>, such as 60/1m, at Testfile:2`},
		{"rate of zero", "chat_proxy {\n\trate_limit ip 0/1m\n}",
			`chat_proxy: rate_limit ip: rate "0/1m": the count must be a whole number from 1 to 1000000, at Testfile:2`},
		{"negative rate", "chat_proxy {\n\trate_limit ip -5/1m\n}",
			`chat_proxy: rate_limit ip: rate "-5/1m": the count must be a whole number from 1 to 1000000, at Testfile:2`},
		{"zero window", "chat_proxy {\n\trate_limit session 60/0s\n}",
			`chat_proxy: rate_limit session: rate "60/0s": the window must be at least 1s, at Testfile:2`},
		{"unknown window unit", "chat_proxy {\n\trate_limit domain 60/fortnight\n}",
			`chat_proxy: rate_limit domain: rate "60/fortnight": invalid window "fortnight" (use a duration such as 30s, 1m, 1h or 1d), at Testfile:2`},
		{"window too long", "chat_proxy {\n\trate_limit ip 60/31d\n}",
			`chat_proxy: rate_limit ip: rate "60/31d": the window must be at most 30d, at Testfile:2`},
		{"off with a rate", "chat_proxy {\n\trate_limit create off 10/1m\n}",
			`chat_proxy: rate_limit create: rate "off": want <N>/<window>, such as 60/1m, at Testfile:2`},
		{"rate_limit with a block", "chat_proxy {\n\trate_limit ip 60/1m {\n\t\tburst 5\n\t}\n}",
			"chat_proxy: option 'rate_limit' does not take a block, at Testfile:2"},
		{"bot_detection 0", "chat_proxy {\n\tbot_detection 0\n}",
			`chat_proxy: bot_detection: got "0", want off or a threshold from 1 to 99, at Testfile:2`},
		{"bot_detection 100", "chat_proxy {\n\tbot_detection 100\n}",
			`chat_proxy: bot_detection: got "100", want off or a threshold from 1 to 99, at Testfile:2`},
		{"bot_detection x", "chat_proxy {\n\tbot_detection x\n}",
			`chat_proxy: bot_detection: got "x", want off or a threshold from 1 to 99, at Testfile:2`},
		{"bot_detection on", "chat_proxy {\n\tbot_detection on\n}",
			`chat_proxy: bot_detection: got "on", want off or a threshold from 1 to 99, at Testfile:2`},
		{"bot_detection without value", "chat_proxy {\n\tbot_detection\n}",
			"chat_proxy: option 'bot_detection' needs a value, at Testfile:2"},
		{"duplicate bot_detection", "chat_proxy {\n\tbot_detection 30\n\tbot_detection off\n}",
			"chat_proxy: duplicate option 'bot_detection', at Testfile:3"},
		{"redis without value", "chat_proxy {\n\tredis\n}",
			"chat_proxy: option 'redis' needs a value, at Testfile:2"},
		{"redis with two values", "chat_proxy {\n\tredis redis://a:6379 redis://b:6379\n}",
			"chat_proxy: option 'redis' takes one value, at Testfile:2"},
		{"duplicate redis", "chat_proxy {\n\tredis redis://a:6379\n\tredis redis://b:6379\n}",
			"chat_proxy: duplicate option 'redis', at Testfile:3"},
		{"max_message_length 0", "chat_proxy {\n\tmax_message_length 0\n}",
			`chat_proxy: option 'max_message_length': must be a whole number from 1 to 100000, got "0", at Testfile:2`},
		{"max_message_length too large", "chat_proxy {\n\tmax_message_length 100001\n}",
			`chat_proxy: option 'max_message_length': must be a whole number from 1 to 100000, got "100001", at Testfile:2`},
		{"max_message_length with a unit", "chat_proxy {\n\tmax_message_length 4k\n}",
			`chat_proxy: option 'max_message_length': must be a whole number from 1 to 100000, got "4k", at Testfile:2`},
		{"on_client_disconnect unknown", "chat_proxy {\n\ton_client_disconnect later\n}",
			`chat_proxy: on_client_disconnect: must be cancel or finish, got "later", at Testfile:2`},
		{"on_client_disconnect without value", "chat_proxy {\n\ton_client_disconnect\n}",
			"chat_proxy: option 'on_client_disconnect' needs a value, at Testfile:2"},
		{"upstream_auth unknown mode", "chat_proxy {\n\tupstream_auth bad\n}",
			`chat_proxy: option 'upstream_auth': unknown mode "bad" (use jwt, none, basic or header), at Testfile:2`},
		{"upstream_auth without mode", "chat_proxy {\n\tupstream_auth\n}",
			"chat_proxy: option 'upstream_auth' needs a mode: jwt, none, basic <user> <pass> or header <name> <value>, at Testfile:2"},
		{"upstream_auth basic without password", "chat_proxy {\n\tupstream_auth basic user\n}",
			"chat_proxy: option 'upstream_auth basic' takes 2 value(s), got 1, at Testfile:2"},
		{"upstream_auth header with three values", "chat_proxy {\n\tupstream_auth header X-Key a b\n}",
			"chat_proxy: option 'upstream_auth header' takes 2 value(s), got 3, at Testfile:2"},
		{"upstream_auth jwt with a value", "chat_proxy {\n\tupstream_auth jwt {env.SECRET}\n}",
			"chat_proxy: option 'upstream_auth jwt' takes 0 value(s), got 1, at Testfile:2"},
		{"upstream_auth with a block", "chat_proxy {\n\tupstream_auth none {\n\t}\n}",
			"chat_proxy: option 'upstream_auth' does not take a block, at Testfile:2"},
		{"bad upstream_timeout", "chat_proxy {\n\tupstream_timeout soon\n}",
			`chat_proxy: option 'upstream_timeout': invalid duration "soon" (use e.g. 30s, 10m, 7d), at Testfile:2`},
		{"zero stream_idle_timeout", "chat_proxy {\n\tstream_idle_timeout 0s\n}",
			`chat_proxy: option 'stream_idle_timeout': invalid duration "0s" (use e.g. 30s, 10m, 7d), at Testfile:2`},
		{"negative max_stream_duration", "chat_proxy {\n\tmax_stream_duration -10m\n}",
			`chat_proxy: option 'max_stream_duration': invalid duration "-10m" (use e.g. 30s, 10m, 7d), at Testfile:2`},
		{"n8n_token_ttl without unit", "chat_proxy {\n\tn8n_token_ttl 30\n}",
			`chat_proxy: option 'n8n_token_ttl': invalid duration "30" (use e.g. 30s, 10m, 7d), at Testfile:2`},
		{"duplicate timeout", "chat_proxy {\n\tupstream_timeout 1m\n\tupstream_timeout 2m\n}",
			"chat_proxy: duplicate option 'upstream_timeout', at Testfile:3"},
	} {
		t.Run(tc.name, func(t *testing.T) { wantCaddyfileError(t, tc.input, tc.want) })
	}
}

// Provision refuses bad guard and upstream settings (as given in the JSON
// config) with a message naming the option, never quoting a password of
// the Redis URL, and holding no store or Redis client afterwards.
func TestProvisionGuardErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*ChatProxy)
		want   string // the whole error
	}{
		{"redis other scheme", func(c *ChatProxy) { c.Redis = "http://u:" + mtLeak + "@redis.internal:6379/0" },
			`redis: "http://****@redis.internal:6379/0" is not a redis:// or rediss:// URL`},
		{"redis bad port", func(c *ChatProxy) { c.Redis = "redis://u:" + mtLeak + "@redis.internal:port/0" },
			`redis: invalid port ":port" after host`},
		{"redis bad database number", func(c *ChatProxy) { c.Redis = "redis://:" + mtLeak + "@redis.internal:6379/zero" },
			`redis: invalid database number: "zero"`},
		{"redis bad escape", func(c *ChatProxy) { c.Redis = "redis://:" + mtLeak + "%zz@redis.internal:6379/0" },
			`redis: invalid URL escape "%zz"`},
		{"redis control character", func(c *ChatProxy) { c.Redis = "redis://:" + mtLeak + "@redis.internal:6379/0\n" },
			"redis: net/url: invalid control character in URL"},
		{"redis from an unset env", func(c *ChatProxy) { c.Redis = "{env.CHATPROXY_MT_UNSET_VAR}" },
			"redis: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
		{"unknown tier", func(c *ChatProxy) { c.RateLimits = testRates(map[string][]string{"ipv6": {"60/1m"}}) },
			`rate_limit: unknown rate limit tier "ipv6" (want ip, session, domain, create or user)`},
		{"rate out of bounds", func(c *ChatProxy) {
			c.RateLimits = map[string][]guard.Rate{"ip": {{Events: 0, Window: caddy.Duration(time.Minute)}}}
		},
			`rate_limit ip: rate 0/1m: the count must be from 1 to 1000000`},
		{"rate window too short", func(c *ChatProxy) {
			c.RateLimits = map[string][]guard.Rate{"ip": {{Events: 5, Window: caddy.Duration(time.Millisecond)}}}
		}, `rate_limit ip: rate 5/1ms: the window must be at least 1s`},
		{"two rates with one window", func(c *ChatProxy) { c.RateLimits = testRates(map[string][]string{"session": {"30/1m", "100/60s"}}) },
			"rate_limit session: two rates with the window 1m"},
		{"bot_detection 100", func(c *ChatProxy) { c.BotDetection = "100" },
			`bot_detection: got "100", want off or a threshold from 1 to 99`},
		{"bot_detection on", func(c *ChatProxy) { c.BotDetection = "on" },
			`bot_detection: got "on", want off or a threshold from 1 to 99`},
		{"max_message_length negative", func(c *ChatProxy) { c.MaxMessageLength = -1 },
			"max_message_length: must be between 1 and 100000, got -1"},
		{"max_message_length too large", func(c *ChatProxy) { c.MaxMessageLength = 100001 },
			"max_message_length: must be between 1 and 100000, got 100001"},
		{"on_client_disconnect unknown", func(c *ChatProxy) { c.OnClientDisconnect = "later" },
			`on_client_disconnect: must be cancel or finish, got "later"`},
		{"upstream_timeout under a second", func(c *ChatProxy) { c.UpstreamTimeout = caddy.Duration(500 * time.Millisecond) },
			"upstream_timeout: must be at least 1s, got 500ms"},
		{"stream_idle_timeout negative", func(c *ChatProxy) { c.StreamIdleTimeout = caddy.Duration(-time.Second) },
			"stream_idle_timeout: must be at least 1s, got -1s"},
		{"upstream_auth unknown mode", func(c *ChatProxy) { c.UpstreamAuth = &UpstreamAuth{Mode: "bad"} },
			`upstream: n8n: unknown upstream auth mode "bad" (want jwt, basic, header or none)`},
		{"upstream_auth basic without a user", func(c *ChatProxy) { c.UpstreamAuth = &UpstreamAuth{Mode: "basic", Password: mtLeak} },
			"upstream: n8n: basic upstream auth needs a user name without ':'"},
		{"upstream_auth header without a value", func(c *ChatProxy) { c.UpstreamAuth = &UpstreamAuth{Mode: "header", HeaderName: "X-Key"} },
			"upstream: n8n: header upstream auth needs a value without control characters"},
		{"upstream_auth password from an unset env", func(c *ChatProxy) {
			c.UpstreamAuth = &UpstreamAuth{Mode: "basic", Username: "u", Password: "{env.CHATPROXY_MT_UNSET_VAR}"}
		}, "upstream_auth password: evaluated placeholder {env.CHATPROXY_MT_UNSET_VAR} is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp := mtConfig(t, tc.mutate)
			err := mtProvision(t, cp)
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("error\n got  %q\n want %q", err, tc.want)
			}
			for _, secret := range []string{mtLeak, mtJWT, mtSession} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error %q leaks %q", err, secret)
				}
			}
			if storeKeyOf(cp) != "" || redisKeyOf(cp) != "" {
				t.Errorf("a failed provision still holds store %q / redis %q", storeKeyOf(cp), redisKeyOf(cp))
			}
		})
	}
}

// Provision does no network I/O: a Redis that does not answer costs
// nothing until the first request, and /health then reports it.
func TestProvisionWithUnreachableRedis(t *testing.T) {
	cp := mtConfig(t, func(c *ChatProxy) { c.Redis = "redis://:" + mtLeak + "@127.0.0.1:1/0" })
	start := time.Now()
	if err := mtProvision(t, cp); err != nil {
		t.Fatalf("provision: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("provision took %v", d)
	}
	rec := grServe(t, cp, grReq{method: "GET", path: "/health"})
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"status":"degraded"`) || !strings.Contains(rec.Body.String(), `"redis":{"status":"down"`) {
		t.Fatalf("health: %d %s", rec.Code, rec.Body)
	}
	for _, leak := range []string{mtLeak, "127.0.0.1", "redis://"} {
		if strings.Contains(rec.Body.String(), leak) {
			t.Fatalf("health leaks %q: %s", leak, rec.Body)
		}
	}
	// Requests are still limited, in process.
	rec = grServe(t, cp, grReq{method: "POST", path: "/api/v1/session/create"})
	if rec.Code != 201 || rec.Header().Get("RateLimit-Limit") != "10" {
		t.Fatalf("create with Redis unreachable: %d limit %q %s", rec.Code, rec.Header().Get("RateLimit-Limit"), rec.Body)
	}
}
