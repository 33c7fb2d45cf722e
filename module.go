// Package chatproxy is a Caddy HTTP handler that sits between website chat
// widgets and n8n workflows: it creates and checks visitor sessions, stores
// the conversation and (with the chat routes) streams n8n's replies back.
package chatproxy

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/n8n"
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
	// DefaultMaxMessageLength is in runes, as the original design's limit.
	DefaultMaxMessageLength = 4000
	// DefaultBotThreshold refuses a message only on strong evidence: no
	// single ordinary signal reaches it.
	DefaultBotThreshold = 50
	minSecretLength     = 32
	maxMessageLengthCap = 100000
)

// ChatProxy is the `chat_proxy` HTTP handler: the secure backend between
// website chat widgets and an n8n workflow.
//
// It answers its own routes under `path_prefix` (sessions, chat, history,
// the @n8n/chat widget), plus `/health` and `/metrics`, and passes every
// other request to the next handler, so a site can serve its own pages
// beside the API.
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

	// Lifetime of the signed token sent to n8n with each message.
	// Default: 30s.
	N8nTokenTTL caddy.Duration `json:"n8n_token_ttl,omitempty"`

	// How requests to n8n are authenticated. Default: `jwt`, a bearer
	// token signed with session_secret that n8n's Webhook node "JWT Auth"
	// verifies.
	UpstreamAuth *UpstreamAuth `json:"upstream_auth,omitempty"`

	// How long to wait for the first byte of n8n's reply (retries
	// included). Default: 120s.
	UpstreamTimeout caddy.Duration `json:"upstream_timeout,omitempty"`

	// The longest silence allowed between two chunks of a streamed reply.
	// Default: 60s.
	StreamIdleTimeout caddy.Duration `json:"stream_idle_timeout,omitempty"`

	// The longest a whole exchange with n8n may take. Default: 10m.
	MaxStreamDuration caddy.Duration `json:"max_stream_duration,omitempty"`

	// How many n8n failures in a row (connection errors, 5xx, timeouts,
	// broken streams) open the circuit breaker, which then answers 503 at
	// once instead of calling n8n. Default: 5.
	CircuitBreakerFailures int `json:"circuit_breaker_failures,omitempty"`

	// How long the circuit stays open before one probe request is let
	// through; a good probe closes it. Default: 30s.
	CircuitBreakerOpen caddy.Duration `json:"circuit_breaker_open,omitempty"`

	// What happens when the visitor leaves mid-reply: `cancel` (default)
	// stops the n8n request at once and stores the partial reply; `finish`
	// reads the reply to its end and stores it whole.
	OnClientDisconnect string `json:"on_client_disconnect,omitempty"`

	// The longest message accepted, in characters (Unicode code points)
	// after trimming. Default: 4000.
	MaxMessageLength int `json:"max_message_length,omitempty"`

	// A Redis URL (`redis://`, `rediss://`) for rate-limit state shared by
	// every Caddy instance. Default: state kept in this process. Handlers
	// with the same value share one client, which survives reloads.
	Redis string `json:"redis,omitempty"`

	// Rate limits per tier (`ip`, `session`, `domain`, `create`), each a
	// list of `N/window` rates such as `60/1m`; N requests may come in a
	// burst and the budget refills over the window. Tiers not given keep
	// their defaults: ip 60/1m and 1000/1h, session 30/1m, domain 1000/1m,
	// create 10/1m. A tier set to an empty list is not limited.
	RateLimits map[string][]string `json:"rate_limits,omitempty"`

	// Repeat offenders: a client (IP, session) refused this many times
	// within a minute is refused outright for block_for. Default: 10
	// refusals, 5m. A negative count turns blocking off.
	BlockAfter int `json:"block_after,omitempty"`

	// How long a repeat offender stays blocked. Default: 5m.
	BlockFor caddy.Duration `json:"block_for,omitempty"`

	// Bot and spam defence: `off`, or a score threshold from 1 to 99 above
	// which a message is refused. Default: 50.
	BotDetection string `json:"bot_detection,omitempty"`

	// How long conversation history is kept. A background purge deletes
	// messages older than this, and sessions that have expired together
	// with their messages. With several Caddy instances on one database
	// only one purges at a time (a PostgreSQL advisory lock). Handlers that
	// share a store share its purge, whose shortest retention applies to
	// the whole store. Default: 30d.
	HistoryRetention caddy.Duration `json:"history_retention,omitempty"`

	// How often the purge runs, with 10% jitter; the first run comes a
	// minute or so after the config is loaded. Default: 1h.
	PurgeInterval caddy.Duration `json:"purge_interval,omitempty"`

	// Client networks that may read the module's `GET /metrics`: CIDRs
	// such as `10.0.0.0/8`, or single addresses. The client is Caddy's
	// client_ip, which honours the server's trusted_proxies: behind a load
	// balancer, set trusted_proxies, or every visitor has the balancer's
	// (private) address. Others get 404. Default: loopback and private
	// ranges (127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12,
	// 192.168.0.0/16, fc00::/7). Placeholders are resolved.
	MetricsAllow []string `json:"metrics_allow,omitempty"`

	// Whether each chat exchange's log line carries the message and the
	// reply text. Default: off, since chat text is the visitors' personal
	// data; turn it on only to debug a workflow.
	LogContent bool `json:"log_content,omitempty"`

	jwtSecret     []byte
	sessionSecret []byte
	database      string
	redisURL      string
	// redisTimeout overrides the limiter's per-call Redis timeout. Tests
	// that count exact budgets set it, so that a starved CI machine does
	// not push the limiter into its in-process fallback mid-count.
	redisTimeout time.Duration
	// replyStoreTimeout overrides how long a reply's store is retried,
	// for tests of a database that stays down.
	replyStoreTimeout time.Duration
	webhook           *url.URL
	storeKey          string
	redisKey          string
	upstream          *n8n.Client
	handler           *handler.Handler
	logger            *zap.Logger
	drain             *handler.Drain
	purger            *purger
	metricsAllow      []netip.Prefix
	untrackPools      []func()
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

// UpstreamAuth configures how requests to n8n are authenticated.
type UpstreamAuth struct {
	// `jwt` (default), `basic`, `header` or `none`.
	Mode string `json:"mode,omitempty"`
	// The user name for `basic`.
	Username string `json:"username,omitempty"`
	// The password for `basic`. Use a placeholder.
	Password string `json:"password,omitempty"`
	// The header name for `header`, e.g. `X-N8N-Key`.
	HeaderName string `json:"header_name,omitempty"`
	// The header value for `header`. Use a placeholder.
	HeaderValue string `json:"header_value,omitempty"`
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

	pooled, key, err := acquirePooledStore(cp.database)
	if err != nil {
		return err
	}
	cp.storeKey = key
	store := pooled.Store
	cp.startPurger(ctx, pooled)
	cp.setupDrain(ctx)

	var rdb *redis.Client
	if cp.redisURL != "" {
		if rdb, cp.redisKey, err = acquireRedis(cp.redisURL); err != nil {
			return err
		}
	}
	limits, err := cp.rateLimits()
	if err != nil {
		return err
	}
	limiterCfg := guard.LimiterConfig{
		Limits: limits,
		// Every instance of a site shares jwt_secret, so all of them name
		// a client's keys alike, while the names reveal no IP.
		HashKey:      deriveKey(cp.jwtSecret, "chatproxy rate-limit keys"),
		BlockAfter:   cp.BlockAfter,
		RedisTimeout: cp.redisTimeout,
		BlockFor:     time.Duration(cp.BlockFor),
		Logger:       cp.logger.Named("ratelimit"),
	}
	if rdb != nil {
		limiterCfg.Redis = rdb
	}
	limiter, err := guard.NewLimiter(limiterCfg)
	if err != nil {
		return fmt.Errorf("rate_limit: %w", err)
	}
	var bots *guard.BotScorer
	if enabled, threshold, _ := guard.ParseBotDetection(cp.BotDetection); enabled {
		if bots, err = guard.NewBotScorer(guard.BotConfig{Threshold: threshold, Repeats: limiter}); err != nil {
			return fmt.Errorf("bot_detection: %w", err)
		}
	}

	rec, err := cp.provisionMetrics(ctx, store, rdb)
	if err != nil {
		return err
	}
	upstreamCfg := cp.upstreamConfig()
	upstreamLog := cp.logger.Named("n8n")
	upstreamCfg.OnStateChange = func(from, to n8n.BreakerState) {
		rec.SetCircuitState(string(to))
		upstreamLog.Warn("n8n circuit breaker changed state", zap.String("from", string(from)), zap.String("to", string(to)))
	}
	if cp.upstream, err = n8n.New(upstreamCfg); err != nil {
		return fmt.Errorf("n8n_webhook: %w", err)
	}

	origins, err := guard.ParseOrigins(cp.AllowedOrigins)
	if err != nil {
		return fmt.Errorf("allowed_origins: %w", err)
	}
	cookie, err := cp.cookie()
	if err != nil {
		return err
	}
	hc := handler.Config{
		Prefix:  cp.PathPrefix,
		Origins: origins,
		Sessions: &sessions.Manager{
			Store:  store,
			Tokens: sessions.NewTokensFor(cp.jwtSecret, cp.tokenAudience(), nil),
			TTL:    time.Duration(cp.SessionTTL),
		},
		Store:              store,
		Cookie:             cookie,
		MaxBodySize:        cp.MaxBodySize,
		Logger:             cp.logger,
		Limiter:            limiter,
		Bots:               bots,
		Upstream:           cp.upstream,
		MaxMessageLength:   cp.MaxMessageLength,
		FinishOnDisconnect: cp.OnClientDisconnect == "finish",
		Drain:              cp.drain,
		ReplyStoreTimeout:  cp.replyStoreTimeout,
		Metrics:            rec,
		MetricsAllow:       cp.metricsAllow,
		LogContent:         cp.LogContent,
	}
	if rdb != nil {
		hc.Redis = rdb
	}
	cp.handler = handler.New(hc)
	return nil
}

// tokenAudience is the audience of this block's visitor tokens: a block
// for another n8n workflow refuses them, even with the same jwt_secret
// (see sessions.BlockAudience).
func (cp *ChatProxy) tokenAudience() string {
	return sessions.BlockAudience(cp.webhook.String())
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (cp *ChatProxy) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	return cp.handler.ServeHTTP(w, r, next)
}

// Cleanup releases what Provision took: the store and Redis references and
// the n8n client. It is safe after a partial Provision and when called more
// than once.
func (cp *ChatProxy) Cleanup() error {
	var errs []error
	cp.cleanupMetrics()
	// Before the store is released: streams cut short by an exiting Caddy
	// store their partial replies.
	cp.finishDrain()
	if cp.upstream != nil {
		// Streams still running finish on their own connections.
		errs = append(errs, cp.upstream.Close())
		cp.upstream = nil
	}
	if cp.redisKey != "" {
		if _, err := redisPool.Delete(cp.redisKey); err != nil {
			errs = append(errs, fmt.Errorf("releasing redis client: %w", err))
		}
		cp.redisKey = ""
	}
	if cp.storeKey != "" {
		if _, err := storePool.Delete(cp.storeKey); err != nil {
			errs = append(errs, fmt.Errorf("releasing store: %w", err))
		}
		cp.storeKey = ""
	}
	return errors.Join(errs...)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*ChatProxy)(nil)
	_ caddy.Validator             = (*ChatProxy)(nil)
	_ caddy.CleanerUpper          = (*ChatProxy)(nil)
	_ caddyhttp.MiddlewareHandler = (*ChatProxy)(nil)
	_ caddyfile.Unmarshaler       = (*ChatProxy)(nil)
)
