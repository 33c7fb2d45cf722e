package chatproxy

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/go-redis/redis_rate/v10"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// load resolves the placeholders of every string option and fills in the
// defaults. Values are checked by Validate.
func (cp *ChatProxy) load() error {
	repl := caddy.NewReplacer()
	replace := func(option, value string, required bool) (string, error) {
		if value == "" {
			if required {
				return "", fmt.Errorf("%s: required", option)
			}
			return "", nil
		}
		// An option that is set must not resolve to nothing: a typo in
		// {env.X} must neither become an empty secret nor quietly send
		// production data to the default embedded store.
		out, err := repl.ReplaceOrErr(value, true, true)
		if err != nil {
			return "", fmt.Errorf("%s: %w", option, err)
		}
		return out, nil
	}
	var err error
	var webhook, jwtSecret, sessionSecret, identitySecret, erasureSecret string
	if webhook, err = replace("n8n_webhook", cp.N8nWebhook, false); err != nil {
		return err
	}
	if jwtSecret, err = replace("jwt_secret", cp.JWTSecret, false); err != nil {
		return err
	}
	if sessionSecret, err = replace("session_secret", cp.SessionSecret, false); err != nil {
		return err
	}
	if identitySecret, err = replace("identity_secret", cp.IdentitySecret, false); err != nil {
		return err
	}
	if erasureSecret, err = replace("erasure_secret", cp.ErasureSecret, false); err != nil {
		return err
	}
	// Secrets and the database URL (which may hold a password) live only
	// in unexported fields once resolved.
	cp.jwtSecret, cp.sessionSecret = []byte(jwtSecret), []byte(sessionSecret)
	if err := cp.loadPush(replace); err != nil {
		return err
	}
	cp.identitySecret = []byte(identitySecret)
	cp.erasureSecret = []byte(erasureSecret)
	if webhook != "" {
		if cp.webhook, err = parseWebhook(webhook); err != nil {
			return err
		}
	}
	if cp.database, err = replace("database", cp.Database, false); err != nil {
		return err
	}
	for i, o := range cp.AllowedOrigins {
		if cp.AllowedOrigins[i], err = replace("allowed_origins", o, true); err != nil {
			return err
		}
	}
	if cp.PathPrefix, err = replace("path_prefix", cp.PathPrefix, false); err != nil {
		return err
	}
	if cp.PathPrefix == "" {
		cp.PathPrefix = DefaultPathPrefix
	}
	if cp.ChatSocket, err = replace("chat_socket", cp.ChatSocket, false); err != nil {
		return err
	}
	if cp.N8nSocketURL, err = replace("n8n_socket_url", cp.N8nSocketURL, false); err != nil {
		return err
	}
	cp.PathPrefix = strings.TrimSuffix(cp.PathPrefix, "/")
	if cp.SessionTTL == 0 {
		cp.SessionTTL = caddy.Duration(DefaultSessionTTL)
	}
	if cp.MaxBodySize == 0 {
		cp.MaxBodySize = DefaultMaxBodySize
	}
	if cp.Cookie == nil {
		cp.Cookie = new(CookieConfig)
	}
	if cp.Cookie.Name, err = replace("cookie name", cp.Cookie.Name, false); err != nil {
		return err
	}
	if cp.Cookie.Domain, err = replace("cookie domain", cp.Cookie.Domain, false); err != nil {
		return err
	}
	if cp.Cookie.Name == "" {
		cp.Cookie.Name = DefaultCookieName
	}
	if cp.Cookie.SameSite == "" {
		cp.Cookie.SameSite = "lax"
	}
	if cp.redisURL, err = replace("redis", cp.Redis, false); err != nil {
		return err
	}
	allow := make([]string, len(cp.MetricsAllow))
	for i, n := range cp.MetricsAllow {
		if allow[i], err = replace("metrics_allow", n, true); err != nil {
			return err
		}
	}
	if cp.metricsAllow, err = metrics.ParseAllow(allow); err != nil {
		return fmt.Errorf("metrics_allow: %w", err)
	}
	if cp.UpstreamAuth == nil {
		cp.UpstreamAuth = &UpstreamAuth{Mode: string(n8n.AuthJWT)}
	}
	ua := cp.UpstreamAuth
	for _, f := range []struct {
		option string
		value  *string
	}{
		{"upstream_auth username", &ua.Username},
		{"upstream_auth password", &ua.Password},
		{"upstream_auth header name", &ua.HeaderName},
		{"upstream_auth header value", &ua.HeaderValue},
	} {
		if *f.value, err = replace(f.option, *f.value, false); err != nil {
			return err
		}
	}
	if ua.Mode == "" {
		ua.Mode = string(n8n.AuthJWT)
	}
	if cp.N8nTokenTTL == 0 {
		cp.N8nTokenTTL = caddy.Duration(n8n.DefaultTokenTTL)
	}
	if cp.UpstreamTimeout == 0 {
		cp.UpstreamTimeout = caddy.Duration(n8n.DefaultUpstreamTimeout)
	}
	if cp.StreamIdleTimeout == 0 {
		cp.StreamIdleTimeout = caddy.Duration(n8n.DefaultStreamIdleTimeout)
	}
	if cp.MaxStreamDuration == 0 {
		cp.MaxStreamDuration = caddy.Duration(n8n.DefaultMaxStreamDuration)
	}
	if cp.ChatSocket == "" {
		cp.ChatSocket = DefaultChatSocket
	}
	if cp.WaitTimeout == 0 {
		cp.WaitTimeout = caddy.Duration(handler.DefaultWaitTimeout)
	}
	if cp.OnClientDisconnect == "" {
		cp.OnClientDisconnect = "cancel"
	}
	if cp.DetachedTimeout == 0 {
		cp.DetachedTimeout = caddy.Duration(DefaultDetachedTimeout)
	}
	if cp.MaxMessageLength == 0 {
		cp.MaxMessageLength = DefaultMaxMessageLength
	}
	if cp.BotDetection == "" {
		cp.BotDetection = strconv.Itoa(DefaultBotThreshold)
	}
	if cp.HistoryRetention == 0 {
		cp.HistoryRetention = caddy.Duration(sessions.DefaultHistoryRetention)
	}
	if cp.PurgeInterval == 0 {
		cp.PurgeInterval = caddy.Duration(sessions.DefaultPurgeInterval)
	}
	return nil
}

// loadPush resolves push_secret and handoff_webhook and defaults
// handoff_timeout.
func (cp *ChatProxy) loadPush(replace func(option, value string, required bool) (string, error)) error {
	secret, err := replace("push_secret", cp.PushSecret, false)
	if err != nil {
		return err
	}
	cp.pushSecret = []byte(secret)
	hook, err := replace("handoff_webhook", cp.HandoffWebhook, false)
	if err != nil {
		return err
	}
	if hook != "" {
		if cp.handoff, err = parseURLOption("handoff_webhook", hook); err != nil {
			return err
		}
	}
	if cp.HandoffTimeout == 0 {
		cp.HandoffTimeout = caddy.Duration(handler.DefaultHandoffTimeout)
	}
	return nil
}

// checkPush: push_secret, when set, is a secret of its own; a
// handoff_webhook needs it (its calls are signed with it).
func (cp *ChatProxy) checkPush() error {
	if len(cp.pushSecret) > 0 {
		if err := checkSecret("push_secret", cp.pushSecret); err != nil {
			return err
		}
		if string(cp.pushSecret) == string(cp.jwtSecret) || string(cp.pushSecret) == string(cp.sessionSecret) {
			return errors.New("push_secret: must differ from jwt_secret and session_secret")
		}
	}
	if cp.handoff != nil && len(cp.pushSecret) == 0 {
		return errors.New("handoff_webhook: needs push_secret, which signs its calls")
	}
	return checkMinDuration("handoff_timeout", cp.HandoffTimeout, time.Second)
}

// upstreamConfig is the n8n client configuration.
func (cp *ChatProxy) upstreamConfig() n8n.Config {
	ua := cp.UpstreamAuth
	webhook := ""
	if cp.webhook != nil {
		webhook = cp.webhook.String()
	}
	return n8n.Config{
		WebhookURL:    webhook,
		SessionSecret: string(cp.sessionSecret),
		TokenTTL:      time.Duration(cp.N8nTokenTTL),
		Auth: n8n.Auth{
			Mode:        n8n.AuthMode(ua.Mode),
			Username:    ua.Username,
			Password:    ua.Password,
			HeaderName:  ua.HeaderName,
			HeaderValue: ua.HeaderValue,
		},
		Breaker: n8n.BreakerConfig{
			FailureThreshold: uint32(cp.CircuitBreakerFailures),
			OpenTimeout:      time.Duration(cp.CircuitBreakerOpen),
		},
		UpstreamTimeout:   time.Duration(cp.UpstreamTimeout),
		StreamIdleTimeout: time.Duration(cp.StreamIdleTimeout),
		MaxStreamDuration: time.Duration(cp.MaxStreamDuration),
		SocketURL:         cp.N8nSocketURL,
	}
}

// rateLimits merges the configured tiers over the defaults; Validate has
// checked them.
func (cp *ChatProxy) rateLimits() map[guard.Tier][]redis_rate.Limit {
	limits := guard.DefaultLimits()
	for name, rates := range cp.RateLimits {
		parsed := make([]redis_rate.Limit, 0, len(rates))
		for _, r := range rates {
			parsed = append(parsed, r.Limit())
		}
		limits[guard.Tier(name)] = parsed
	}
	return limits
}

func parseWebhook(raw string) (*url.URL, error) { return parseURLOption("n8n_webhook", raw) }

// parseURLOption parses an option that must be an absolute http or https
// URL.
func parseURLOption(option, raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		// url.Parse errors quote the input, which may hold credentials.
		return nil, fmt.Errorf("%s: not a valid URL", option)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("%s: must be an absolute http or https URL", option)
	}
	return u, nil
}

// Validate checks the configuration, for Caddyfile and JSON users alike
// (the Caddyfile parser also runs the same checks on each literal value,
// so that its errors carry the file and line). It has no side effects.
// Caddy calls it after Provision, which resolved placeholders and filled
// in defaults; Provision calls it too, before it takes any resource.
func (cp *ChatProxy) Validate() error {
	checks := []func() error{
		func() error { return checkSecret("jwt_secret", cp.jwtSecret) },
		func() error { return checkSecret("session_secret", cp.sessionSecret) },
		func() error {
			if string(cp.jwtSecret) == string(cp.sessionSecret) {
				return errors.New("session_secret: must differ from jwt_secret")
			}
			return nil
		},
		cp.checkPush,
		func() error {
			return checkIdentitySecret(cp.identitySecret, cp.jwtSecret, cp.sessionSecret, cp.pushSecret)
		},
		func() error { return checkIdentityProofs(cp.IdentityProofs, cp.identitySecret) },
		func() error {
			return checkErasureSecret(cp.erasureSecret, cp.identitySecret, cp.jwtSecret, cp.sessionSecret, cp.pushSecret)
		},
		func() error {
			if cp.webhook == nil {
				return errors.New("n8n_webhook: required")
			}
			return nil
		},
		func() error { return checkPathPrefix(cp.PathPrefix) },
		func() error { return checkMinDuration("session_ttl", cp.SessionTTL, time.Minute) },
		func() error { return checkBodySize(cp.MaxBodySize) },
		func() error { return checkDatabase(cp.database) },
		func() error { return checkOrigins(cp.AllowedOrigins) },
		func() error { return checkOnClientDisconnect(cp.OnClientDisconnect) },
		func() error { return checkDetachedTimeout(cp.DetachedTimeout) },
		func() error { return checkMessageLength(cp.MaxMessageLength) },
		func() error { return checkMinDuration("n8n_token_ttl", cp.N8nTokenTTL, time.Second) },
		func() error { return checkMinDuration("upstream_timeout", cp.UpstreamTimeout, time.Second) },
		func() error { return checkMinDuration("stream_idle_timeout", cp.StreamIdleTimeout, time.Second) },
		func() error { return checkMinDuration("max_stream_duration", cp.MaxStreamDuration, time.Second) },
		func() error { return checkCircuitBreaker(cp.CircuitBreakerFailures, cp.CircuitBreakerOpen) },
		func() error { return checkMinDuration("history_retention", cp.HistoryRetention, time.Hour) },
		func() error { return checkMinDuration("purge_interval", cp.PurgeInterval, time.Minute) },
		func() error { return checkChatSocket(cp.ChatSocket, cp.PathPrefix) },
		func() error { return checkMinDuration("wait_timeout", cp.WaitTimeout, time.Second) },
		func() error { return checkStoreWait(cp.StoreWait) },
		func() error { return checkBlockFor(cp.BlockFor) },
		func() error { return checkBotDetection(cp.BotDetection) },
		func() error { return checkRateLimits(cp.RateLimits) },
		func() error { return checkRedis(cp.redisURL) },
		func() error {
			// The n8n client's own checks (auth mode and fields, token
			// secret), without building one.
			if err := cp.upstreamConfig().Validate(); err != nil {
				return fmt.Errorf("upstream: %w", err)
			}
			return nil
		},
		func() error { _, err := cp.cookie(); return err },
		func() error {
			if cp.Uploads == nil {
				return nil
			}
			return cp.Uploads.WithDefaults().Validate()
		},
	}
	for _, check := range checks {
		if err := check(); err != nil {
			return err
		}
	}
	return nil
}

// The checks of single values. Validate runs them on the loaded
// configuration; the Caddyfile parser runs them on each literal value.

func checkSecret(option string, secret []byte) error {
	switch {
	case len(secret) == 0:
		return fmt.Errorf("%s: required", option)
	case len(secret) < minSecretLength:
		return fmt.Errorf("%s: must be at least %d bytes, got %d", option, minSecretLength, len(secret))
	}
	return nil
}

// checkIdentitySecret: identity_secret is optional; when set, it is as
// long as the other secrets and differs from each, so that no token or
// hash made with one key is ever good for another's purpose (a site's
// user_hash must not sign a push, nor a visitor token prove a user).
func checkIdentitySecret(secret, jwtSecret, sessionSecret, pushSecret []byte) error {
	if len(secret) == 0 {
		return nil
	}
	if err := checkSecret("identity_secret", secret); err != nil {
		return err
	}
	for _, other := range [][]byte{jwtSecret, sessionSecret, pushSecret} {
		if string(secret) == string(other) {
			return errors.New("identity_secret: must differ from jwt_secret, session_secret and push_secret")
		}
	}
	return nil
}

// checkErasureSecret: erasure_secret is optional; when set it needs
// identity_secret and differs from every other secret. Sharing
// identity_secret would be a hole, not a convenience: user_hash is the
// HMAC of any user id the site accepts, so a user who registered the id
// `<timestamp>.{"user_id":"victim"}` would be handed a valid signature for
// erasing someone else.
func checkErasureSecret(secret, identitySecret, jwtSecret, sessionSecret, pushSecret []byte) error {
	if len(secret) == 0 {
		return nil
	}
	if err := checkSecret("erasure_secret", secret); err != nil {
		return err
	}
	if len(identitySecret) == 0 {
		return errors.New("erasure_secret: needs identity_secret (users are erased by the id the site proved)")
	}
	for _, other := range [][]byte{identitySecret, jwtSecret, sessionSecret, pushSecret} {
		if string(secret) == string(other) {
			return errors.New("erasure_secret: must differ from identity_secret, jwt_secret, session_secret and push_secret")
		}
	}
	return nil
}

// checkIdentityProofs: identity_proofs names known forms, each once, and
// only with identity_secret, whose proofs it restricts.
func checkIdentityProofs(forms []string, identitySecret []byte) error {
	if len(forms) == 0 {
		return nil
	}
	if len(identitySecret) == 0 {
		return errors.New("identity_proofs: needs identity_secret, whose proofs it restricts")
	}
	return checkProofForms(forms)
}

// checkProofForms: each of identity_proofs' forms is known and named once.
func checkProofForms(forms []string) error {
	seen := map[string]bool{}
	for _, f := range forms {
		if f != identity.FormHash && f != identity.FormToken {
			return fmt.Errorf("identity_proofs: unknown proof form %q: use %s or %s", f, identity.FormHash, identity.FormToken)
		}
		if seen[f] {
			return fmt.Errorf("identity_proofs: %s named twice", f)
		}
		seen[f] = true
	}
	return nil
}

// checkChatSocket: off, or a path of its own at the site root (the API's
// routes are below path_prefix; /health and /metrics are taken).
func checkChatSocket(p, prefix string) error {
	if p == "off" {
		return nil
	}
	if !validPathPrefix(p) || p == "" || p == "/" || p == "/health" || p == "/metrics" ||
		(prefix != "" && strings.HasPrefix(p, prefix+"/")) {
		return fmt.Errorf("chat_socket: must be off or a path such as /chat, not below path_prefix, got %q", p)
	}
	return nil
}

func checkPathPrefix(p string) error {
	if !validPathPrefix(p) {
		return fmt.Errorf("path_prefix: must be a path such as /api/v1 (letters, digits, - . _ ~ and /), got %q", p)
	}
	return nil
}

func checkMinDuration(option string, d caddy.Duration, least time.Duration) error {
	if d < caddy.Duration(least) {
		return fmt.Errorf("%s: must be at least %s, got %s", option, guard.FormatWindow(least), time.Duration(d))
	}
	return nil
}

// checkStoreWait bounds store_wait: zero is the default (3s); a write
// holding its request for minutes helps nobody.
func checkStoreWait(d caddy.Duration) error {
	if d < 0 || d > caddy.Duration(time.Minute) {
		return fmt.Errorf("store_wait: must be between 0 (the default, 3s) and 1m, got %s", time.Duration(d))
	}
	return nil
}

// maxBodySizeCap is the largest max_body_size accepted.
const maxBodySizeCap = 1 << 30

func checkBodySize(n int64) error {
	switch {
	case n < 1024:
		return fmt.Errorf("max_body_size: must be at least 1KiB, got %d bytes", n)
	case n > maxBodySizeCap:
		return fmt.Errorf("max_body_size: must be at most 1GiB, got %d bytes", n)
	}
	return nil
}

func checkDatabase(database string) error {
	_, err := sessions.StoreKind(database)
	return err
}

func checkOrigins(origins []string) error {
	if _, err := guard.ParseOrigins(origins); err != nil {
		return fmt.Errorf("allowed_origins: %w", err)
	}
	return nil
}

func checkOnClientDisconnect(v string) error {
	if v != "cancel" && v != "finish" {
		return fmt.Errorf("on_client_disconnect: must be cancel or finish, got %q", v)
	}
	return nil
}

// checkDetachedTimeout: off (negative), or from 1s to 1h: a reply nobody
// follows should not hold n8n for longer.
func checkDetachedTimeout(d caddy.Duration) error {
	if d < 0 {
		return nil
	}
	if d < caddy.Duration(time.Second) || d > caddy.Duration(time.Hour) {
		return fmt.Errorf("detached_timeout: must be off or from 1s to 1h, got %s", time.Duration(d))
	}
	return nil
}

func checkMessageLength(n int) error {
	if n < 1 || n > maxMessageLengthCap {
		return fmt.Errorf("max_message_length: must be between 1 and %d, got %d", maxMessageLengthCap, n)
	}
	return nil
}

func checkCircuitBreaker(failures int, open caddy.Duration) error {
	if failures < 0 || failures > 1000 {
		return fmt.Errorf("circuit_breaker: failures must be between 1 and 1000, got %d", failures)
	}
	if open < 0 {
		return fmt.Errorf("circuit_breaker: open time must not be negative, got %s", time.Duration(open))
	}
	return nil
}

func checkBlockFor(d caddy.Duration) error {
	if d < 0 {
		return fmt.Errorf("block_for: must not be negative, got %s", time.Duration(d))
	}
	return nil
}

func checkBotDetection(v string) error {
	if _, _, err := guard.ParseBotDetection(v); err != nil {
		return fmt.Errorf("bot_detection: %w", err)
	}
	return nil
}

func checkRateLimits(tiers map[string][]guard.Rate) error {
	for name, rates := range tiers {
		if _, err := guard.ParseTier(name); err != nil {
			return fmt.Errorf("rate_limit: %w", err)
		}
		if err := guard.CheckRates(rates); err != nil {
			return fmt.Errorf("rate_limit %s: %w", name, err)
		}
	}
	return nil
}

func checkRedis(rawURL string) error {
	if rawURL == "" {
		return nil
	}
	if _, err := guard.RedisOptions(rawURL); err != nil {
		return fmt.Errorf("redis: %w", err)
	}
	return nil
}

func (cp *ChatProxy) cookie() (handler.Cookie, error) { return buildCookie(*cp.Cookie) }

// buildCookie checks a cookie configuration whose defaults are filled in
// and turns it into the handler's form.
func buildCookie(cc CookieConfig) (handler.Cookie, error) {
	c := handler.Cookie{Name: cc.Name, Domain: cc.Domain, Secure: cc.Secure}
	switch strings.ToLower(cc.SameSite) {
	case "lax":
		c.SameSite = http.SameSiteLaxMode
	case "strict":
		c.SameSite = http.SameSiteStrictMode
	case "none":
		if c.Secure != nil && !*c.Secure {
			return c, errors.New("cookie: same_site none needs a secure cookie")
		}
		t := true
		c.Secure = &t
		c.SameSite = http.SameSiteNoneMode
	default:
		return c, fmt.Errorf("cookie: same_site must be lax, strict or none, got %q", cc.SameSite)
	}
	if c.Name == "" || strings.ContainsAny(c.Name, " \t;,=\"") {
		return c, fmt.Errorf("cookie: invalid name %q", c.Name)
	}
	if c.Domain != "" && !validCookieDomain(c.Domain) {
		return c, fmt.Errorf("cookie: invalid domain %q", c.Domain)
	}
	return c, nil
}

// validPathPrefix accepts "" (the root) or a clean absolute path of
// unreserved characters, so route matching is exact and unsurprising.
func validPathPrefix(p string) bool {
	if p == "" {
		return true
	}
	if !strings.HasPrefix(p, "/") || strings.Contains(p, "//") || strings.Contains(p, "/./") || strings.Contains(p, "/../") ||
		strings.HasSuffix(p, "/.") || strings.HasSuffix(p, "/..") {
		return false
	}
	for _, r := range p {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/-._~", r)) {
			return false
		}
	}
	return true
}

// validCookieDomain accepts a host name (optionally with a leading dot),
// which is all a Domain attribute may hold.
func validCookieDomain(d string) bool {
	d = strings.TrimPrefix(d, ".")
	if d == "" || len(d) > 253 || strings.HasPrefix(d, "-") || strings.Contains(d, "..") || strings.HasSuffix(d, ".") {
		return false
	}
	for _, r := range d {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '.') {
			return false
		}
	}
	return true
}

// parseURLQuiet parses a URL without an error that quotes it, since it may
// hold a password.
func parseURLQuiet(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, errors.New("not a valid URL")
	}
	return u, nil
}
