package n8n

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// AuthMode is how the client proves itself to n8n.
type AuthMode string

// The upstream authentication modes (Caddyfile `upstream_auth`).
const (
	// AuthJWT sends "Authorization: Bearer <token>", an HS256 token signed
	// with Config.SessionSecret; n8n's Webhook node "JWT Auth" verifies it.
	AuthJWT AuthMode = "jwt"
	// AuthBasic sends HTTP Basic credentials (Chat Trigger or Webhook node
	// "Basic Auth").
	AuthBasic AuthMode = "basic"
	// AuthHeader sends one fixed header (Webhook node "Header Auth").
	AuthHeader AuthMode = "header"
	// AuthNone sends no credentials (the webhook path is the only secret).
	AuthNone AuthMode = "none"
)

// Auth configures how requests to n8n are authenticated.
type Auth struct {
	// Mode is jwt (the default when empty), basic, header or none.
	Mode AuthMode
	// Username is the Basic user name (mode basic). It must not contain ':'.
	Username string
	// Password is the Basic password (mode basic).
	Password string
	// HeaderName is the header sent in mode header, e.g. "X-N8N-Key".
	HeaderName string
	// HeaderValue is the value of HeaderName (mode header).
	HeaderValue string
}

// BreakerConfig configures the circuit breaker in front of n8n. Only
// outcomes that say n8n is unreachable or overloaded count as failures: no
// connection, the upstream or idle timeout, 502, 503 or 504 (from n8n or
// a proxy in front of it), a connection cut during the reply. A workflow
// error, n8n's 500 "Error in workflow", an unusable reply (HTML with a 2xx
// status included) or a 4xx means n8n is up, and counts as a success.
type BreakerConfig struct {
	// FailureThreshold is how many failures in a row open the circuit.
	// Default 5.
	FailureThreshold uint32
	// OpenTimeout is the longest the circuit stays open (every request
	// fails at once with 503) before a probe is let through. It opens for
	// 1 s first (or OpenTimeout, if shorter), and for twice as long after
	// each failed probe, up to OpenTimeout; a good probe closes it and
	// starts over at 1 s. Default 30 s.
	OpenTimeout time.Duration
	// HalfOpenProbes is how many requests may probe n8n while half-open;
	// when that many succeed the circuit closes, and any failure opens it
	// again. Default 1.
	HalfOpenProbes uint32
}

// Config configures a Client. Zero values mean the documented defaults.
type Config struct {
	// WebhookURL is the n8n webhook to POST messages to (http or https).
	// It must not hold credentials (use Auth). Its path is a secret: it
	// never appears in errors.
	WebhookURL string
	// SessionSecret signs the short-lived token sent to n8n (HS256). It is
	// required, at least 32 bytes, in jwt mode; in the other modes, when
	// set, the body's jwt_token still carries a token the workflow may
	// check.
	SessionSecret string
	// TokenTTL is the lifetime of the n8n token (exp = now + TokenTTL).
	// Default 30 s.
	TokenTTL time.Duration
	// Issuer is the token's "iss" claim. Default "caddy-chatproxy".
	Issuer string
	// Audience is the token's "aud" claim. Default "n8n".
	Audience string
	// Auth selects and configures upstream authentication (default jwt).
	Auth Auth
	// UpstreamTimeout bounds the wait for the first reply text (or the
	// whole non-streamed reply), retries included. n8n's keepalives and
	// begin chunks do not count as text. Default 120 s.
	UpstreamTimeout time.Duration
	// StreamIdleTimeout is the longest silence allowed between two reads
	// once the reply has started; any bytes from n8n, its keepalives
	// included, reset it. Default 60 s.
	StreamIdleTimeout time.Duration
	// MaxStreamDuration bounds a whole request, from Send to the end of the
	// reply. Default 10 min.
	MaxStreamDuration time.Duration
	// DialTimeout bounds connecting to n8n (TCP and TLS). Default 10 s.
	DialTimeout time.Duration
	// MaxRetries is how many times a request is re-sent when it provably
	// never reached n8n: the connection could not be made (refused, DNS,
	// connect timeout, TLS handshake) or broke before the request was
	// written. Once it may have reached n8n it is never re-sent, whatever
	// comes back (502, 503, 504 or a dropped connection included), so a
	// message never runs the workflow twice. Default 2; negative means
	// none.
	MaxRetries int
	// RetryBackoff is the base delay before a retry; it doubles each time,
	// with jitter (a random delay between half and all of it).
	// Default 250 ms.
	RetryBackoff time.Duration
	// RetryMaxBackoff caps the delay before one retry. Default 2 s.
	RetryMaxBackoff time.Duration
	// MaxLineBytes bounds one line of a streamed reply (NDJSON or SSE).
	// Default 1 MiB.
	MaxLineBytes int
	// MaxReplyBytes bounds a whole reply after decompression. Default 8 MiB.
	MaxReplyBytes int64
	// Breaker configures the circuit breaker.
	Breaker BreakerConfig
	// TLSConfig is used for https webhooks, e.g. to trust a private CA.
	// Nil means the system roots. It is cloned.
	TLSConfig *tls.Config
	// DisableCompression stops the client from asking for compressed
	// replies (Accept-Encoding: gzip, br). Compressed replies are decoded
	// either way.
	DisableCompression bool
	// UserAgent is the User-Agent sent to n8n. Default "caddy-chatproxy".
	UserAgent string
	// SocketURL is n8n's chat WebSocket (ws, wss, http or https; the path
	// defaults to /chat), where "Using Response Nodes" executions go on.
	// Default: /chat on the webhook URL's origin. Queue-mode deployments
	// set it to the main instance, the only one serving /chat.
	SocketURL string
	// OnStateChange, if set, is called when the circuit breaker changes
	// state (for logs and metrics). It runs synchronously under the
	// breaker's lock: keep it short and do not call the Client from it.
	OnStateChange func(from, to BreakerState)
}

// Defaults.
const (
	DefaultTokenTTL          = 30 * time.Second
	DefaultIssuer            = "caddy-chatproxy"
	DefaultAudience          = "n8n"
	DefaultUpstreamTimeout   = 120 * time.Second
	DefaultStreamIdleTimeout = 60 * time.Second
	DefaultMaxStreamDuration = 10 * time.Minute
	DefaultDialTimeout       = 10 * time.Second
	DefaultMaxRetries        = 2
	DefaultRetryBackoff      = 250 * time.Millisecond
	DefaultRetryMaxBackoff   = 2 * time.Second
	DefaultMaxLineBytes      = 1 << 20
	DefaultMaxReplyBytes     = 8 << 20
	DefaultFailureThreshold  = 5
	DefaultOpenTimeout       = 30 * time.Second
	DefaultUserAgent         = "caddy-chatproxy"

	// MinSecretBytes is the shortest SessionSecret accepted.
	MinSecretBytes = 32
)

// Validate checks c as New would, without building a client: it has no
// side effects. Errors name the setting but never echo a secret or the
// URL.
func (c Config) Validate() error {
	_, _, err := c.withDefaults()
	return err
}

// withDefaults validates c and fills in the defaults. Errors name the
// setting but never echo a secret or the URL.
func (c Config) withDefaults() (Config, *url.URL, error) {
	u, err := url.Parse(c.WebhookURL)
	switch {
	case c.WebhookURL == "":
		return c, nil, errors.New("n8n: webhook URL is required")
	case err != nil:
		return c, nil, errors.New("n8n: webhook URL is not a valid URL")
	case u.Scheme != "http" && u.Scheme != "https":
		return c, nil, errors.New("n8n: webhook URL must be http or https")
	case u.Host == "":
		return c, nil, errors.New("n8n: webhook URL has no host")
	case u.User != nil:
		return c, nil, errors.New("n8n: webhook URL must not contain credentials; use basic upstream auth")
	}
	u.Fragment, u.RawFragment = "", ""
	if c.SocketURL, err = socketURL(c.SocketURL, u); err != nil {
		return c, nil, err
	}

	if c.Auth.Mode == "" {
		c.Auth.Mode = AuthJWT
	}
	if c.SessionSecret != "" && len(c.SessionSecret) < MinSecretBytes {
		return c, nil, fmt.Errorf("n8n: session secret must be at least %d bytes", MinSecretBytes)
	}
	switch c.Auth.Mode {
	case AuthJWT:
		if c.SessionSecret == "" {
			return c, nil, errors.New("n8n: jwt upstream auth needs a session secret")
		}
	case AuthBasic:
		if c.Auth.Username == "" || strings.Contains(c.Auth.Username, ":") {
			return c, nil, errors.New("n8n: basic upstream auth needs a user name without ':'")
		}
		if !httpguts.ValidHeaderFieldValue(c.Auth.Username) || !httpguts.ValidHeaderFieldValue(c.Auth.Password) {
			return c, nil, errors.New("n8n: basic upstream auth user name or password holds control characters")
		}
	case AuthHeader:
		name := http.CanonicalHeaderKey(c.Auth.HeaderName)
		if !httpguts.ValidHeaderFieldName(name) {
			return c, nil, errors.New("n8n: header upstream auth needs a valid header name")
		}
		if reservedHeader(name) {
			return c, nil, fmt.Errorf("n8n: header upstream auth cannot set %s", name)
		}
		if c.Auth.HeaderValue == "" || !httpguts.ValidHeaderFieldValue(c.Auth.HeaderValue) {
			return c, nil, errors.New("n8n: header upstream auth needs a value without control characters")
		}
		c.Auth.HeaderName = name
	case AuthNone:
	default:
		return c, nil, fmt.Errorf("n8n: unknown upstream auth mode %q (want jwt, basic, header or none)", c.Auth.Mode)
	}

	for _, d := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"token TTL", &c.TokenTTL, DefaultTokenTTL},
		{"upstream timeout", &c.UpstreamTimeout, DefaultUpstreamTimeout},
		{"stream idle timeout", &c.StreamIdleTimeout, DefaultStreamIdleTimeout},
		{"max stream duration", &c.MaxStreamDuration, DefaultMaxStreamDuration},
		{"dial timeout", &c.DialTimeout, DefaultDialTimeout},
		{"retry backoff", &c.RetryBackoff, DefaultRetryBackoff},
		{"retry max backoff", &c.RetryMaxBackoff, DefaultRetryMaxBackoff},
		{"breaker open timeout", &c.Breaker.OpenTimeout, DefaultOpenTimeout},
	} {
		if *d.v < 0 {
			return c, nil, fmt.Errorf("n8n: %s must not be negative", d.name)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if c.MaxLineBytes < 0 || c.MaxReplyBytes < 0 {
		return c, nil, errors.New("n8n: size limits must not be negative")
	}
	if c.MaxLineBytes == 0 {
		c.MaxLineBytes = DefaultMaxLineBytes
	}
	if c.MaxReplyBytes == 0 {
		c.MaxReplyBytes = DefaultMaxReplyBytes
	}
	switch {
	case c.MaxRetries == 0:
		c.MaxRetries = DefaultMaxRetries
	case c.MaxRetries < 0:
		c.MaxRetries = 0
	}
	if c.Breaker.FailureThreshold == 0 {
		c.Breaker.FailureThreshold = DefaultFailureThreshold
	}
	if c.Breaker.HalfOpenProbes == 0 {
		c.Breaker.HalfOpenProbes = 1
	}
	if c.Issuer == "" {
		c.Issuer = DefaultIssuer
	}
	if c.Audience == "" {
		c.Audience = DefaultAudience
	}
	if c.UserAgent == "" {
		c.UserAgent = DefaultUserAgent
	}
	return c, u, nil
}

// reservedHeader reports whether header-mode auth may not set name (a
// canonical header name): the client sets those itself.
func reservedHeader(name string) bool {
	switch name {
	case "Host", "Content-Type", "Content-Length", "Accept", "Accept-Encoding",
		"Transfer-Encoding", "Connection", "Te", "Trailer", "Upgrade",
		"Keep-Alive", "Proxy-Connection", "Cookie":
		return true
	}
	return false
}
