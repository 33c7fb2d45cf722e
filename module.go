// Package chatproxy is a Caddy HTTP handler that sits between website chat
// widgets and n8n workflows: it creates and checks visitor sessions, stores
// the conversation and (with the chat routes) streams n8n's replies back.
package chatproxy

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

func init() {
	caddy.RegisterModule(ChatProxy{})
}

// Defaults, from the original chat-proxy design where it had one.
const (
	DefaultPathPrefix  = "/api/v1"
	DefaultSessionTTL  = 7 * 24 * time.Hour
	DefaultMaxBodySize = 64 << 10
	DefaultCookieName  = "chat_session"
	minSecretLength    = 32
)

// ChatProxy is the `chat_proxy` HTTP handler: the secure backend between
// website chat widgets and an n8n workflow.
//
// It answers its own routes under `path_prefix` (sessions, history, and
// with later features chat), plus `/health`, and passes every other request
// to the next handler, so a site can serve its own pages beside the API.
//
// Secrets should be given as `{env.NAME}` or `{file./path}` placeholders;
// they are resolved when the config is provisioned, so they never appear in
// the saved JSON config.
type ChatProxy struct {
	// The private n8n webhook URL that chat messages are forwarded to
	// (http or https). Required. Placeholders are resolved.
	N8nWebhook string `json:"n8n_webhook,omitempty"`

	// The HMAC key (at least 32 bytes) that signs visitor session tokens.
	// Required; must differ from session_secret.
	JWTSecret string `json:"jwt_secret,omitempty"`

	// The HMAC key (at least 32 bytes) that signs the short-lived tokens
	// sent to n8n. Required; must differ from jwt_secret.
	SessionSecret string `json:"session_secret,omitempty"`

	// Where sessions and messages are stored. A `postgres://` or
	// `postgresql://` URL uses PostgreSQL; `sqlite:<path>` uses the embedded
	// store at that file. Default: the embedded store in Caddy's data
	// directory (`chatproxy/chatproxy.db`). Several handlers with the same
	// value share one connection pool, which survives config reloads.
	Database string `json:"database,omitempty"`

	// Origins allowed to use the API: exact origins such as
	// `https://shop.example.com` and wildcards such as
	// `https://*.example.com` (subdomains only). A request carrying any
	// other Origin, including `null`, is refused with 403. Requests without
	// an Origin (servers, curl) are allowed and belong to the request's host.
	AllowedOrigins []string `json:"allowed_origins,omitempty"`

	// The path under which the API routes live. Default: `/api/v1`.
	PathPrefix string `json:"path_prefix,omitempty"`

	// How long a visitor session lasts. Default: 7 days.
	SessionTTL caddy.Duration `json:"session_ttl,omitempty"`

	// The largest request body accepted, in bytes; larger bodies get 413.
	// Default: 64 KiB.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	// The session cookie set by session creation.
	Cookie *CookieConfig `json:"cookie,omitempty"`

	jwtSecret     []byte
	sessionSecret []byte
	database      string
	webhook       *url.URL
	storeKey      string
	handler       *handler.Handler
	logger        *zap.Logger
}

// CookieConfig configures the session cookie.
type CookieConfig struct {
	// The cookie name. Default: `chat_session`.
	Name string `json:"name,omitempty"`

	// The SameSite attribute: `lax` (default), `strict` or `none`. `none`
	// needs a secure cookie; use it only when the widget's page and the API
	// are on different sites.
	SameSite string `json:"same_site,omitempty"`

	// The Domain attribute. Default: none (the cookie is host-only).
	Domain string `json:"domain,omitempty"`

	// Whether the cookie is marked Secure. Default: when the request came
	// over TLS.
	Secure *bool `json:"secure,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (ChatProxy) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.chat_proxy",
		New: func() caddy.Module { return new(ChatProxy) },
	}
}

// Provision resolves placeholders, fills in defaults and sets up the
// handler. It does no blocking network I/O: database connections are made
// on first use, so `caddy validate` works without a reachable database.
func (cp *ChatProxy) Provision(ctx caddy.Context) error {
	cp.logger = ctx.Logger()
	if err := cp.resolve(); err != nil {
		return err
	}
	if err := cp.validateResolved(); err != nil {
		return err
	}

	store, key, err := acquireStore(cp.database)
	if err != nil {
		return err
	}
	cp.storeKey = key

	origins, err := guard.ParseOrigins(cp.AllowedOrigins)
	if err != nil {
		return fmt.Errorf("allowed_origins: %w", err)
	}
	cookie, err := cp.cookie()
	if err != nil {
		return err
	}
	cp.handler = handler.New(handler.Config{
		Prefix:  cp.PathPrefix,
		Origins: origins,
		Sessions: &sessions.Manager{
			Store:  store,
			Tokens: sessions.NewTokens(cp.jwtSecret, nil),
			TTL:    time.Duration(cp.SessionTTL),
		},
		Store:       store,
		Cookie:      cookie,
		MaxBodySize: cp.MaxBodySize,
		Logger:      cp.logger,
	})
	return nil
}

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
	return nil
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

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (cp *ChatProxy) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	return cp.handler.ServeHTTP(w, r, next)
}

// Cleanup releases the store reference taken in Provision. It is safe after
// a partial Provision and when called more than once.
func (cp *ChatProxy) Cleanup() error {
	if cp.storeKey == "" {
		return nil
	}
	key := cp.storeKey
	cp.storeKey = ""
	if _, err := storePool.Delete(key); err != nil {
		return fmt.Errorf("releasing store: %w", err)
	}
	return nil
}

// storePool shares one store (and its connection pool) between every
// handler configured with the same database, across config reloads: Caddy
// provisions the new config before cleaning up the old one, so the count
// never drops to zero on a reload.
var storePool = caddy.NewUsagePool()

type pooledStore struct{ sessions.Store }

func (p pooledStore) Destruct() error { return p.Close() }

// storeKind tells which store a database option selects, and its location.
func storeKind(database string) (string, error) {
	switch {
	case database == "":
		return "sqlite", nil
	case strings.HasPrefix(database, "postgres://"), strings.HasPrefix(database, "postgresql://"):
		return "postgres", nil
	case strings.HasPrefix(database, "sqlite:"):
		if sqlitePath(database) == "" {
			return "", errors.New("database: sqlite: needs a file path, as in sqlite:/var/lib/caddy/chat.db")
		}
		return "sqlite", nil
	}
	return "", errors.New("database: must be a postgres:// or postgresql:// URL, or sqlite:<path>")
}

func sqlitePath(database string) string {
	if database == "" {
		return sessions.DefaultSQLitePath()
	}
	p := strings.TrimPrefix(strings.TrimPrefix(database, "sqlite:"), "//")
	if p == "" {
		return ""
	}
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	return p
}

// acquireStore takes a reference to the shared store for the database
// option. The key is a hash, so a password in the URL never appears in
// pool keys or logs.
func acquireStore(database string) (sessions.Store, string, error) {
	kind, err := storeKind(database)
	if err != nil {
		return nil, "", err
	}
	var target string
	if kind == "postgres" {
		target = database
	} else {
		target = sqlitePath(database)
	}
	sum := sha256.Sum256([]byte(target))
	key := kind + ":" + hex.EncodeToString(sum[:])
	val, _, err := storePool.LoadOrNew(key, func() (caddy.Destructor, error) {
		var s sessions.Store
		var err error
		if kind == "postgres" {
			s, err = sessions.OpenPostgres(target)
		} else {
			s, err = sessions.OpenSQLite(target)
		}
		if err != nil {
			return nil, fmt.Errorf("database: %w", err)
		}
		return pooledStore{s}, nil
	})
	if err != nil {
		return nil, "", err
	}
	return val.(pooledStore).Store, key, nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*ChatProxy)(nil)
	_ caddy.Validator             = (*ChatProxy)(nil)
	_ caddy.CleanerUpper          = (*ChatProxy)(nil)
	_ caddyhttp.MiddlewareHandler = (*ChatProxy)(nil)
	_ caddyfile.Unmarshaler       = (*ChatProxy)(nil)
)

// parseURLQuiet parses a URL without an error that quotes it, since it may
// hold a password.
func parseURLQuiet(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, errors.New("not a valid URL")
	}
	return u, nil
}
