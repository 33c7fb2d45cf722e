package chatproxy

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("chat_proxy", parseCaddyfile)
	// The module answers its own routes and passes the rest on, so it must
	// run before a site's catch-all reverse_proxy.
	httpcaddyfile.RegisterDirectiveOrder("chat_proxy", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	cp := new(ChatProxy)
	err := cp.UnmarshalCaddyfile(h.Dispenser)
	return cp, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	chat_proxy [<matcher>] {
//	    n8n_webhook     <url>
//	    jwt_secret      <secret>
//	    session_secret  <secret>
//	    identity_secret <secret>
//	    erasure_secret  <secret>
//	    identity_proofs user_hash|identity_token...
//	    database        <postgres-url>|sqlite:<path>
//	    allowed_origins <origin...>
//	    path_prefix     <path>
//	    session_ttl     <duration>
//	    max_body_size   <size>
//	    n8n_token_ttl   <duration>
//	    upstream_auth   jwt | none | basic <user> <pass> | header <name> <value>
//	    upstream_timeout    <duration>
//	    stream_idle_timeout <duration>
//	    max_stream_duration <duration>
//	    max_message_length  <runes>
//	    on_client_disconnect cancel | finish
//	    detached_timeout <duration> | off
//	    circuit_breaker <failures> <open duration>
//	    redis           <redis-url>
//	    rate_limit      <ip|session|domain|create|user> <N>/<window>... | off
//	    rate_limit_block <refusals> <duration> | off
//	    bot_detection   off | <threshold>
//	    metrics_allow   <cidr...>
//	    log_content     on | off
//	    uploads {
//	        max_files      <n>
//	        max_file_size  <size>
//	        max_total      <size>
//	        allowed_types  <media type...>
//	        temp_dir       <dir>
//	    }
//	    history_retention <duration>
//	    purge_interval  <duration>
//	    chat_socket     <path> | off
//	    n8n_socket_url  <url>
//	    wait_timeout    <duration>
//	    push_secret     <secret>
//	    handoff_webhook <url>
//	    handoff_timeout <duration>
//	    cookie {
//	        name      <name>
//	        same_site lax|strict|none
//	        domain    <domain>
//	        secure    on|off
//	    }
//	}
//
// Write secrets as {env.NAME} or {file./path} placeholders: they are
// resolved at provision time and never copied into the JSON config.
func (cp *ChatProxy) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] && option != "rate_limit" {
			return d.Errf("chat_proxy: duplicate option '%s'", option)
		}
		seen[option] = true

		var err error
		switch option {
		case "n8n_webhook":
			if cp.N8nWebhook, err = singleArg(d, option); err == nil && literal(cp.N8nWebhook) {
				_, perr := parseWebhook(cp.N8nWebhook)
				err = checked(perr)
			}
		case "jwt_secret":
			if cp.JWTSecret, err = singleArg(d, option); err == nil && literal(cp.JWTSecret) {
				err = checked(checkSecret(option, []byte(cp.JWTSecret)))
			}
		case "session_secret":
			if cp.SessionSecret, err = singleArg(d, option); err == nil && literal(cp.SessionSecret) {
				err = checked(checkSecret(option, []byte(cp.SessionSecret)))
			}
		case "push_secret":
			if cp.PushSecret, err = singleArg(d, option); err == nil && literal(cp.PushSecret) {
				err = checked(checkSecret(option, []byte(cp.PushSecret)))
			}
		case "handoff_webhook":
			if cp.HandoffWebhook, err = singleArg(d, option); err == nil && literal(cp.HandoffWebhook) {
				_, perr := parseURLOption(option, cp.HandoffWebhook)
				err = checked(perr)
			}
		case "identity_proofs":
			cp.IdentityProofs = d.RemainingArgs()
			if len(cp.IdentityProofs) == 0 {
				return d.ArgErr()
			}
			err = checked(checkProofForms(cp.IdentityProofs))
		case "erasure_secret":
			if cp.ErasureSecret, err = singleArg(d, option); err == nil && literal(cp.ErasureSecret) {
				err = checked(checkSecret(option, []byte(cp.ErasureSecret)))
			}
		case "identity_secret":
			if cp.IdentitySecret, err = singleArg(d, option); err == nil && literal(cp.IdentitySecret) {
				err = checked(checkSecret(option, []byte(cp.IdentitySecret)))
			}
		case "database":
			if cp.Database, err = singleArg(d, option); err == nil && literal(cp.Database) {
				err = checked(checkDatabase(cp.Database))
			}
		case "path_prefix":
			if cp.PathPrefix, err = singleArg(d, option); err == nil && literal(cp.PathPrefix) {
				err = checked(checkPathPrefix(strings.TrimSuffix(cp.PathPrefix, "/")))
			}
		case "allowed_origins":
			cp.AllowedOrigins = d.RemainingArgs()
			if len(cp.AllowedOrigins) == 0 {
				return d.Errf("chat_proxy: option '%s' needs at least one origin", option)
			}
			for _, o := range cp.AllowedOrigins {
				if literal(o) {
					if err := checkOrigins([]string{o}); err != nil {
						return d.Errf("chat_proxy: %v", err)
					}
				}
			}
			err = noBlock(d, option)
		case "chat_socket":
			if cp.ChatSocket, err = singleArg(d, option); err == nil && literal(cp.ChatSocket) {
				err = checked(checkChatSocket(cp.ChatSocket, ""))
			}
		case "n8n_socket_url":
			cp.N8nSocketURL, err = singleArg(d, option)
		case "session_ttl", "n8n_token_ttl", "upstream_timeout", "stream_idle_timeout", "max_stream_duration",
			"history_retention", "purge_interval", "wait_timeout", "handoff_timeout":
			var v string
			if v, err = singleArg(d, option); err == nil {
				var dur caddy.Duration
				if dur, err = parseDuration(d, option, v); err == nil {
					*map[string]*caddy.Duration{
						"session_ttl":         &cp.SessionTTL,
						"n8n_token_ttl":       &cp.N8nTokenTTL,
						"upstream_timeout":    &cp.UpstreamTimeout,
						"stream_idle_timeout": &cp.StreamIdleTimeout,
						"max_stream_duration": &cp.MaxStreamDuration,
						"history_retention":   &cp.HistoryRetention,
						"purge_interval":      &cp.PurgeInterval,
						"wait_timeout":        &cp.WaitTimeout,
						"handoff_timeout":     &cp.HandoffTimeout,
					}[option] = dur
					err = checked(checkMinDuration(option, dur, minDurations[option]))
				}
			}
		case "detached_timeout":
			var v string
			if v, err = singleArg(d, option); err == nil {
				if v == "off" {
					cp.DetachedTimeout = DetachedTimeoutOff
				} else if cp.DetachedTimeout, err = parseDuration(d, option, v); err == nil {
					err = checked(checkDetachedTimeout(cp.DetachedTimeout))
				}
			}
		case "store_wait":
			var v string
			if v, err = singleArg(d, option); err == nil {
				if cp.StoreWait, err = parseDuration(d, option, v); err == nil {
					err = checked(checkStoreWait(cp.StoreWait))
				}
			}
		case "max_body_size":
			var v string
			if v, err = singleArg(d, option); err == nil {
				size, perr := humanize.ParseBytes(v)
				if perr != nil || size > math.MaxInt64 {
					return d.Errf("chat_proxy: option '%s': invalid size %q (use e.g. 64KiB, at most 1GiB)", option, v)
				}
				cp.MaxBodySize = int64(size)
				err = checked(checkBodySize(cp.MaxBodySize))
			}
		case "cookie":
			err = cp.unmarshalCookie(d)
		case "redis":
			if cp.Redis, err = singleArg(d, option); err == nil && literal(cp.Redis) {
				err = checked(checkRedis(cp.Redis))
			}
		case "upstream_auth":
			err = cp.unmarshalUpstreamAuth(d)
		case "max_message_length":
			var v string
			if v, err = singleArg(d, option); err == nil {
				n, perr := strconv.Atoi(v)
				if perr != nil || n < 1 || n > maxMessageLengthCap {
					return d.Errf("chat_proxy: option '%s': must be a whole number from 1 to %d, got %q", option, maxMessageLengthCap, v)
				}
				cp.MaxMessageLength = n
			}
		case "on_client_disconnect":
			if cp.OnClientDisconnect, err = singleArg(d, option); err == nil {
				err = checked(checkOnClientDisconnect(cp.OnClientDisconnect))
			}
		case "bot_detection":
			if cp.BotDetection, err = singleArg(d, option); err == nil {
				err = checked(checkBotDetection(cp.BotDetection))
			}
		case "rate_limit":
			err = cp.unmarshalRateLimit(d)
		case "circuit_breaker":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Errf("chat_proxy: option 'circuit_breaker' takes <failures> <open duration>, as in: circuit_breaker 5 30s")
			}
			n, perr := strconv.Atoi(args[0])
			if perr != nil || n < 1 || n > 1000 {
				return d.Errf("chat_proxy: option 'circuit_breaker': failures must be a whole number from 1 to 1000, got %q", args[0])
			}
			var dur caddy.Duration
			if dur, err = parseDuration(d, option, args[1]); err == nil {
				cp.CircuitBreakerFailures, cp.CircuitBreakerOpen = n, dur
				err = noBlock(d, option)
			}
		case "rate_limit_block":
			err = cp.unmarshalRateLimitBlock(d)
		case "metrics_allow":
			err = cp.unmarshalMetricsAllow(d)
		case "log_content":
			var v string
			if v, err = singleArg(d, option); err == nil {
				switch v {
				case "on":
					cp.LogContent = true
				case "off":
					cp.LogContent = false
				default:
					return d.Errf("chat_proxy: option 'log_content' must be on or off, got %q", v)
				}
			}
		case "uploads":
			cp.Uploads = new(upload.Config)
			if err = cp.Uploads.UnmarshalCaddyfile(d); err != nil {
				return fmt.Errorf("chat_proxy: %w", err) // it names the option, file and line
			}
		default:
			return d.Errf("chat_proxy: unrecognized option '%s'%s", option, didYouMean(option, caddyfileOptions))
		}
		var bad badValue
		if errors.As(err, &bad) {
			return d.Errf("chat_proxy: %v", bad.error)
		}
		if err != nil {
			return err
		}
	}
	if literal(cp.JWTSecret) && cp.JWTSecret != "" && cp.JWTSecret == cp.SessionSecret {
		return d.Errf("chat_proxy: session_secret: must differ from jwt_secret")
	}
	if literal(cp.PushSecret) && cp.PushSecret != "" && (cp.PushSecret == cp.JWTSecret || cp.PushSecret == cp.SessionSecret) {
		return d.Errf("chat_proxy: push_secret: must differ from jwt_secret and session_secret")
	}
	if literal(cp.IdentitySecret) && cp.IdentitySecret != "" &&
		(cp.IdentitySecret == cp.JWTSecret || cp.IdentitySecret == cp.SessionSecret || cp.IdentitySecret == cp.PushSecret) {
		return d.Errf("chat_proxy: identity_secret: must differ from jwt_secret, session_secret and push_secret")
	}
	if literal(cp.ErasureSecret) && cp.ErasureSecret != "" &&
		(cp.ErasureSecret == cp.IdentitySecret || cp.ErasureSecret == cp.JWTSecret || cp.ErasureSecret == cp.SessionSecret || cp.ErasureSecret == cp.PushSecret) {
		return d.Errf("chat_proxy: erasure_secret: must differ from identity_secret, jwt_secret, session_secret and push_secret")
	}
	return nil
}

// badValue marks an error of the checks that Validate shares, which the
// parser reports with the option's line.
type badValue struct{ error }

func checked(err error) error {
	if err == nil {
		return nil
	}
	return badValue{err}
}

// caddyfileOptions are the options of the chat_proxy block, for "did you
// mean" suggestions.
var caddyfileOptions = []string{
	"n8n_webhook", "jwt_secret", "session_secret", "identity_secret", "erasure_secret", "identity_proofs", "database", "allowed_origins", "path_prefix",
	"session_ttl", "max_body_size", "cookie", "n8n_token_ttl", "upstream_auth", "upstream_timeout",
	"stream_idle_timeout", "max_stream_duration", "max_message_length", "on_client_disconnect",
	"circuit_breaker", "redis", "rate_limit", "rate_limit_block", "bot_detection", "metrics_allow",
	"log_content", "history_retention", "purge_interval", "chat_socket", "n8n_socket_url", "wait_timeout",
	"store_wait", "uploads", "push_secret", "handoff_webhook", "handoff_timeout",
	"detached_timeout",
}

// cookieOptions are the options of the cookie block.
var cookieOptions = []string{"name", "same_site", "domain", "secure"}

// minDurations are the least values of the duration options.
var minDurations = map[string]time.Duration{
	"session_ttl": time.Minute, "n8n_token_ttl": time.Second, "upstream_timeout": time.Second,
	"stream_idle_timeout": time.Second, "max_stream_duration": time.Second,
	"history_retention": time.Hour, "purge_interval": time.Minute, "wait_timeout": time.Second,
	"handoff_timeout": time.Second,
}

// literal reports whether a value holds no placeholder, so it can be
// checked now rather than when it is resolved at provision time.
func literal(v string) bool { return !strings.Contains(v, "{") }

// didYouMean suggests the known option nearest to an unknown one, as
// ` (did you mean 'x'?)`, or nothing when none is close: at most two edits
// away (a third of the name for long names), or the one or two options
// that have the unknown name as one of their _-separated parts.
func didYouMean(unknown string, known []string) string {
	best, bestDist := "", len(unknown)
	for _, k := range known {
		if dist := editDistance(unknown, k); dist < bestDist {
			best, bestDist = k, dist
		}
	}
	if best != "" && bestDist <= max(2, len(unknown)/3) {
		return " (did you mean '" + best + "'?)"
	}
	var parts []string
	for _, k := range known {
		if len(unknown) >= 4 && slices.Contains(strings.Split(k, "_"), unknown) {
			parts = append(parts, k)
		}
	}
	if len(parts) == 1 || len(parts) == 2 {
		return " (did you mean '" + strings.Join(parts, "' or '") + "'?)"
	}
	return ""
}

// editDistance is the Levenshtein distance between a and b, in bytes (the
// option names are ASCII).
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func (cp *ChatProxy) unmarshalCookie(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.Errf("chat_proxy: option 'cookie' takes a block, not arguments")
	}
	cp.Cookie = new(CookieConfig)
	seen := make(map[string]bool)
	nesting := d.Nesting()
	if !d.NextBlock(nesting) {
		return d.Errf("chat_proxy: option 'cookie' needs a block with name, same_site, domain or secure")
	}
	for first := true; first || d.NextBlock(nesting); first = false {
		option := d.Val()
		if seen[option] {
			return d.Errf("chat_proxy: duplicate cookie option '%s'", option)
		}
		seen[option] = true
		v, err := singleArg(d, "cookie "+option)
		if err != nil {
			return err
		}
		switch option {
		case "name":
			cp.Cookie.Name = v
		case "domain":
			cp.Cookie.Domain = v
		case "same_site":
			v = strings.ToLower(v)
			if v != "lax" && v != "strict" && v != "none" {
				return d.Errf("chat_proxy: cookie option 'same_site' must be lax, strict or none, got %q", v)
			}
			cp.Cookie.SameSite = v
		case "secure":
			var on bool
			switch v {
			case "on":
				on = true
			case "off":
			default:
				return d.Errf("chat_proxy: cookie option 'secure' must be on or off, got %q", v)
			}
			cp.Cookie.Secure = &on
		default:
			return d.Errf("chat_proxy: unrecognized cookie option '%s'%s", option, didYouMean(option, cookieOptions))
		}
	}
	c := *cp.Cookie
	if literal(c.Name) && literal(c.Domain) {
		if c.Name == "" {
			c.Name = DefaultCookieName
		}
		if c.SameSite == "" {
			c.SameSite = "lax"
		}
		if _, err := buildCookie(c); err != nil {
			return d.Errf("chat_proxy: %v", err)
		}
	}
	return nil
}

// unmarshalUpstreamAuth parses
//
//	upstream_auth jwt | none | basic <user> <pass> | header <name> <value>
func (cp *ChatProxy) unmarshalUpstreamAuth(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) == 0 {
		return d.Errf("chat_proxy: option 'upstream_auth' needs a mode: jwt, none, basic <user> <pass> or header <name> <value>")
	}
	ua := &UpstreamAuth{Mode: args[0]}
	want := 1
	switch args[0] {
	case "jwt", "none":
	case "basic":
		want = 3
		if len(args) == want {
			ua.Username, ua.Password = args[1], args[2]
		}
	case "header":
		want = 3
		if len(args) == want {
			ua.HeaderName, ua.HeaderValue = args[1], args[2]
		}
	default:
		return d.Errf("chat_proxy: option 'upstream_auth': unknown mode %q (use jwt, none, basic or header)", args[0])
	}
	if len(args) != want {
		return d.Errf("chat_proxy: option 'upstream_auth %s' takes %d value(s), got %d", args[0], want-1, len(args)-1)
	}
	cp.UpstreamAuth = ua
	return noBlock(d, "upstream_auth")
}

// unmarshalRateLimit parses one tier's rates; each tier may appear once:
//
//	rate_limit <ip|session|domain|create> <N>/<window> [<N>/<window>...]
//	rate_limit <tier> off
func (cp *ChatProxy) unmarshalRateLimit(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) < 2 {
		return d.Errf("chat_proxy: option 'rate_limit' needs a tier and at least one rate, as in: rate_limit ip 60/1m 1000/1h")
	}
	tier, err := guard.ParseTier(args[0])
	if err != nil {
		return d.Errf("chat_proxy: option 'rate_limit': %v", err)
	}
	if _, dup := cp.RateLimits[string(tier)]; dup {
		return d.Errf("chat_proxy: duplicate option 'rate_limit %s'", tier)
	}
	rates := []guard.Rate{}
	if len(args) != 2 || args[1] != "off" {
		for _, r := range args[1:] {
			l, err := guard.ParseRate(r)
			if err != nil {
				return d.Errf("chat_proxy: rate_limit %s: %v", tier, err)
			}
			rates = append(rates, guard.RateOf(l))
		}
		if err := guard.CheckRates(rates); err != nil {
			return d.Errf("chat_proxy: rate_limit %s: %v", tier, err)
		}
	}
	if cp.RateLimits == nil {
		cp.RateLimits = make(map[string][]guard.Rate)
	}
	cp.RateLimits[string(tier)] = rates
	return noBlock(d, "rate_limit")
}

// unmarshalRateLimitBlock parses
//
//	rate_limit_block <refusals> <duration> | off
func (cp *ChatProxy) unmarshalRateLimitBlock(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	switch {
	case len(args) == 1 && args[0] == "off":
		cp.BlockAfter = -1
	case len(args) == 2:
		n, err := strconv.Atoi(args[0])
		if err != nil || n < 1 {
			return d.Errf("chat_proxy: option 'rate_limit_block': refusals must be a whole number of at least 1, got %q", args[0])
		}
		dur, err := parseDuration(d, "rate_limit_block", args[1])
		if err != nil {
			return err
		}
		cp.BlockAfter, cp.BlockFor = n, dur
	default:
		return d.Errf("chat_proxy: option 'rate_limit_block' takes <refusals> <duration>, or off")
	}
	return noBlock(d, "rate_limit_block")
}

// unmarshalMetricsAllow parses
//
//	metrics_allow <cidr|ip> [<cidr|ip>...]
//
// Placeholders are checked when they are resolved, at provision time.
func (cp *ChatProxy) unmarshalMetricsAllow(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) == 0 {
		return d.Errf("chat_proxy: option 'metrics_allow' needs at least one network, as in: metrics_allow 127.0.0.1/32 10.0.0.0/8")
	}
	for _, a := range args {
		if strings.Contains(a, "{") {
			continue
		}
		if _, err := metrics.ParseNetwork(a); err != nil {
			return d.Errf("chat_proxy: option 'metrics_allow': %v", err)
		}
	}
	cp.MetricsAllow = args
	return noBlock(d, "metrics_allow")
}

// singleArg reads the one argument an option takes and refuses extra
// arguments or a block.
func singleArg(d *caddyfile.Dispenser, option string) (string, error) {
	if !d.NextArg() {
		return "", d.Errf("chat_proxy: option '%s' needs a value", option)
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.Errf("chat_proxy: option '%s' takes one value", option)
	}
	return v, noBlock(d, option)
}

// noBlock refuses a block after an option's values, an empty one too. The
// error is made first so that it points at the option's line rather than
// at a line inside the block.
func noBlock(d *caddyfile.Dispenser, option string) error {
	err := d.Errf("chat_proxy: option '%s' does not take a block", option)
	last := d.Token()
	if d.NextBlock(d.Nesting()) {
		return err
	}
	// On "{ }", NextBlock consumes both braces and returns false; without
	// a block it leaves the cursor on the option's last token.
	if cur := d.Token(); cur.Text != last.Text || cur.Line != last.Line || cur.File != last.File || cur.Quoted() != last.Quoted() {
		return err
	}
	return nil
}

func parseDuration(d *caddyfile.Dispenser, option, v string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(v)
	if err != nil || dur <= 0 {
		return 0, d.Errf("chat_proxy: option '%s': invalid duration %q (use e.g. 30s, 10m, 7d)", option, v)
	}
	return caddy.Duration(dur), nil
}
