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
	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/go-redis/redis_rate/v10"
)

// resolve replaces placeholders in every string option and applies defaults.
func (cp *ChatProxy) resolve() error {
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
	var webhook, jwtSecret, sessionSecret string
	if webhook, err = replace("n8n_webhook", cp.N8nWebhook, true); err != nil {
		return err
	}
	if jwtSecret, err = replace("jwt_secret", cp.JWTSecret, true); err != nil {
		return err
	}
	if sessionSecret, err = replace("session_secret", cp.SessionSecret, true); err != nil {
		return err
	}
	// Secrets and the database URL (which may hold a password) live only
	// in unexported fields once resolved.
	cp.jwtSecret, cp.sessionSecret = []byte(jwtSecret), []byte(sessionSecret)
	if cp.webhook, err = parseWebhook(webhook); err != nil {
		return err
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
	if cp.metricsAllow, err = parseMetricsAllow(allow); err != nil {
		return err
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
	if cp.OnClientDisconnect == "" {
		cp.OnClientDisconnect = "cancel"
	}
	if cp.MaxMessageLength == 0 {
		cp.MaxMessageLength = DefaultMaxMessageLength
	}
	if cp.BotDetection == "" {
		cp.BotDetection = strconv.Itoa(DefaultBotThreshold)
	}
	if cp.HistoryRetention == 0 {
		cp.HistoryRetention = caddy.Duration(DefaultHistoryRetention)
	}
	if cp.PurgeInterval == 0 {
		cp.PurgeInterval = caddy.Duration(DefaultPurgeInterval)
	}
	return nil
}

// upstreamConfig is the n8n client configuration.
func (cp *ChatProxy) upstreamConfig() n8n.Config {
	ua := cp.UpstreamAuth
	return n8n.Config{
		WebhookURL:    cp.webhook.String(),
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
	}
}

// rateLimits merges the configured tiers over the defaults.
func (cp *ChatProxy) rateLimits() (map[guard.Tier][]redis_rate.Limit, error) {
	limits := guard.DefaultLimits()
	for name, rates := range cp.RateLimits {
		tier, err := guard.ParseTier(name)
		if err != nil {
			return nil, fmt.Errorf("rate_limit: %w", err)
		}
		parsed := make([]redis_rate.Limit, 0, len(rates))
		for _, r := range rates {
			l, err := guard.ParseRate(r)
			if err != nil {
				return nil, fmt.Errorf("rate_limit %s: %w", name, err)
			}
			for _, prev := range parsed {
				if prev.Period == l.Period {
					return nil, fmt.Errorf("rate_limit %s: two rates with the window %s", name, guard.FormatWindow(l.Period))
				}
			}
			parsed = append(parsed, l)
		}
		limits[tier] = parsed
	}
	return limits, nil
}

func parseWebhook(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		// url.Parse errors quote the input, which may hold credentials.
		return nil, errors.New("n8n_webhook: not a valid URL")
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return nil, errors.New("n8n_webhook: must be an absolute http or https URL")
	}
	return u, nil
}

// Validate checks the provisioned configuration.
func (cp *ChatProxy) Validate() error {
	return cp.validateResolved()
}

func (cp *ChatProxy) validateResolved() error {
	switch {
	case len(cp.jwtSecret) < minSecretLength:
		return fmt.Errorf("jwt_secret: must be at least %d bytes, got %d", minSecretLength, len(cp.jwtSecret))
	case len(cp.sessionSecret) < minSecretLength:
		return fmt.Errorf("session_secret: must be at least %d bytes, got %d", minSecretLength, len(cp.sessionSecret))
	case string(cp.jwtSecret) == string(cp.sessionSecret):
		return errors.New("session_secret: must differ from jwt_secret")
	case cp.webhook == nil:
		return errors.New("n8n_webhook: required")
	case !validPathPrefix(cp.PathPrefix):
		return fmt.Errorf("path_prefix: must be a path such as /api/v1 (letters, digits, - . _ ~ and /), got %q", cp.PathPrefix)
	case cp.SessionTTL < caddy.Duration(time.Minute):
		return fmt.Errorf("session_ttl: must be at least 1m, got %s", time.Duration(cp.SessionTTL))
	case cp.MaxBodySize < 1024:
		return fmt.Errorf("max_body_size: must be at least 1KiB, got %d bytes", cp.MaxBodySize)
	}
	if _, err := storeKind(cp.database); err != nil {
		return err
	}
	if _, err := guard.ParseOrigins(cp.AllowedOrigins); err != nil {
		return fmt.Errorf("allowed_origins: %w", err)
	}
	switch cp.OnClientDisconnect {
	case "cancel", "finish":
	default:
		return fmt.Errorf("on_client_disconnect: must be cancel or finish, got %q", cp.OnClientDisconnect)
	}
	if cp.MaxMessageLength < 1 || cp.MaxMessageLength > maxMessageLengthCap {
		return fmt.Errorf("max_message_length: must be between 1 and %d, got %d", maxMessageLengthCap, cp.MaxMessageLength)
	}
	for option, d := range map[string]caddy.Duration{
		"n8n_token_ttl": cp.N8nTokenTTL, "upstream_timeout": cp.UpstreamTimeout,
		"stream_idle_timeout": cp.StreamIdleTimeout, "max_stream_duration": cp.MaxStreamDuration,
	} {
		if d < caddy.Duration(time.Second) {
			return fmt.Errorf("%s: must be at least 1s, got %s", option, time.Duration(d))
		}
	}
	if cp.CircuitBreakerFailures < 0 || cp.CircuitBreakerFailures > 1000 {
		return fmt.Errorf("circuit_breaker: failures must be between 1 and 1000, got %d", cp.CircuitBreakerFailures)
	}
	if cp.CircuitBreakerOpen < 0 {
		return fmt.Errorf("circuit_breaker: open time must not be negative, got %s", time.Duration(cp.CircuitBreakerOpen))
	}
	if cp.HistoryRetention < caddy.Duration(time.Hour) {
		return fmt.Errorf("history_retention: must be at least 1h, got %s", time.Duration(cp.HistoryRetention))
	}
	if cp.PurgeInterval < caddy.Duration(time.Minute) {
		return fmt.Errorf("purge_interval: must be at least 1m, got %s", time.Duration(cp.PurgeInterval))
	}
	if cp.BlockFor < 0 {
		return fmt.Errorf("block_for: must not be negative, got %s", time.Duration(cp.BlockFor))
	}
	if _, _, err := guard.ParseBotDetection(cp.BotDetection); err != nil {
		return fmt.Errorf("bot_detection: %w", err)
	}
	if _, err := cp.rateLimits(); err != nil {
		return err
	}
	if cp.redisURL != "" {
		if _, err := guard.RedisOptions(cp.redisURL); err != nil {
			return fmt.Errorf("redis: %w", err)
		}
	}
	// The n8n client checks the upstream settings it owns (auth mode and
	// fields, token secret); New does no I/O.
	if cp.webhook != nil {
		c, err := n8n.New(cp.upstreamConfig())
		if err != nil {
			return fmt.Errorf("upstream: %w", err)
		}
		_ = c.Close()
	}
	_, err := cp.cookie()
	return err
}

func (cp *ChatProxy) cookie() (handler.Cookie, error) {
	c := handler.Cookie{Name: cp.Cookie.Name, Domain: cp.Cookie.Domain, Secure: cp.Cookie.Secure}
	switch strings.ToLower(cp.Cookie.SameSite) {
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
		return c, fmt.Errorf("cookie: same_site must be lax, strict or none, got %q", cp.Cookie.SameSite)
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
