// Package chatproxy is a Caddy HTTP handler that sits between website chat
// widgets and n8n workflows: it creates and checks visitor sessions, stores
// the conversation and (with the chat routes) streams n8n's replies back.
package chatproxy

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/events"
	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/replies"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/signed"
	"github.com/chatproxy/caddy-chatproxy/upload"
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
	// DefaultChatSocket is where the @n8n/chat widget opens its socket.
	DefaultChatSocket = "/chat"
	// DefaultMaxMessageLength is in runes, as the original design's limit.
	DefaultMaxMessageLength = 4000
	// DefaultDetachedTimeout covers a page reload or a network change.
	DefaultDetachedTimeout = 30 * time.Second
	// DetachedTimeoutOff is detached_timeout off (JSON: any negative value).
	DetachedTimeoutOff = caddy.Duration(-1)
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

	// The HMAC key (at least 32 bytes) with which the site's backend
	// proves its logged-in visitors: a user_hash (hex HMAC-SHA256 of the
	// user id) or an HS256 identity_token, sent at session creation or in
	// the @n8n/chat widget's metadata. Their user then reaches n8n as
	// `user` with verified true. Must differ from jwt_secret,
	// session_secret and push_secret. Default: none, and identity fields
	// are refused with 401 invalid_identity.
	IdentitySecret string `json:"identity_secret,omitempty"`

	// The HMAC key (at least 32 bytes) that signs the site's erasure call,
	// DELETE {prefix}/user/data, which is 404 without it. Needs
	// identity_secret (only verified users have data to erase by id) and
	// must differ from every other secret: above all from identity_secret,
	// since a site hands visitors user_hash values, HMACs of user ids under
	// identity_secret, and a user id chosen as "<timestamp>.<body>" would
	// make that hash a valid erasure signature.
	ErasureSecret string `json:"erasure_secret,omitempty"`

	// The proof forms identity_secret accepts: "user_hash",
	// "identity_token", or both (the default). Both are HMAC-SHA256 under
	// identity_secret, so a site that computes user_hash over ids its
	// visitors choose (usernames) hands out what signs an identity_token
	// for anyone: such a site sets ["identity_token"], and one that never
	// issues tokens ["user_hash"]. A refused form is 401 invalid_identity.
	IdentityProofs []string `json:"identity_proofs,omitempty"`

	// Where sessions and messages are stored. A `postgres://` or
	// `postgresql://` URL uses PostgreSQL; `sqlite:<path>` uses the embedded
	// store at that file. Default: the embedded store in Caddy's data
	// directory (`chatproxy/chatproxy.db`). Several handlers with the same
	// value share one connection pool, which survives config reloads.
	Database string `json:"database,omitempty"`

	// How long a write (a new session, a message, a reply) waits for an
	// unreachable database to come back before the request fails with 503:
	// a short outage or restart is ridden out, the writes committed when
	// it is back. Handlers on the same database share one write queue and
	// the value of the config loaded last. Default: 3s; at most 1m.
	StoreWait caddy.Duration `json:"store_wait,omitempty"`

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

	// How many failures in a row saying n8n is unreachable or overloaded
	// (connection errors, timeouts, 502/503/504, a connection cut during
	// the reply; never a workflow error or n8n's 500) open the circuit
	// breaker, which then answers 503 at once instead of calling n8n.
	// Default: 5.
	CircuitBreakerFailures int `json:"circuit_breaker_failures,omitempty"`

	// The longest the circuit stays open before one probe request is let
	// through: 1s the first time, doubled after each failed probe up to
	// this; a good probe closes it. Default: 30s.
	CircuitBreakerOpen caddy.Duration `json:"circuit_breaker_open,omitempty"`

	// What happens when the visitor leaves mid-reply: `cancel` (default)
	// stops the n8n request at once and stores the partial reply; `finish`
	// reads the reply to its end and stores it whole.
	OnClientDisconnect string `json:"on_client_disconnect,omitempty"`

	// How long a chat API reply goes on without any client following it
	// (its own request gone, no resumed stream open on any instance)
	// before it is stopped and stored partial, so that a page reloaded
	// mid-answer can resume it (`GET {prefix}/chat/stream/{message_id}`).
	// It applies with on_client_disconnect `cancel`; with `finish` a reply
	// is read to its end whether followed or not. `off` (JSON: a negative
	// value) stops a reply as soon as its last client leaves. From 1s to
	// 1h. Default: 30s.
	DetachedTimeout caddy.Duration `json:"detached_timeout,omitempty"`

	// The longest message accepted, in characters (Unicode code points)
	// after trimming. Default: 4000.
	MaxMessageLength int `json:"max_message_length,omitempty"`

	// A Redis URL (`redis://`, `rediss://`) for rate-limit state shared by
	// every Caddy instance. Default: state kept in this process. Handlers
	// with the same value share one client, which survives reloads.
	Redis string `json:"redis,omitempty"`

	// Rate limits per tier (`ip`, `session`, `domain`, `create`), each a
	// list of rates such as `{"events": 60, "window": "1m"}` (the string
	// `"60/1m"` is read too); the events may come in a burst and the budget
	// refills over the window. Tiers not given keep
	// their defaults: ip 60/1m and 1000/1h, session 30/1m, domain 1000/1m,
	// create 10/1m. A tier set to an empty list is not limited.
	RateLimits map[string][]guard.Rate `json:"rate_limits,omitempty"`

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

	// The path, at the site root, of the WebSocket that the @n8n/chat
	// widget opens when the workflow uses n8n's "Using Response Nodes"
	// mode (the widget derives it from its webhookUrl's origin: always
	// `/chat`). Only upgrades carrying the resume token the proxy gave
	// that widget for that execution, from an allowed origin, reach n8n.
	// `off` serves no socket; n8n's executionStarted answers to the widget
	// route are then refused with 502 as an unsupported mode (the chat
	// API's SSE forms carry the mode either way). Default: `/chat`.
	ChatSocket string `json:"chat_socket,omitempty"`

	// n8n's chat WebSocket (ws, wss, http or https; path default `/chat`).
	// Default: `/chat` on n8n_webhook's origin. In queue mode only the main
	// instance serves it: point this there.
	N8nSocketURL string `json:"n8n_socket_url,omitempty"`

	// How long the proxy keeps a waiting execution alive after the
	// visitor's socket closed (or, on the chat API, after the workflow
	// began waiting for the visitor), answering n8n's heartbeats so that
	// n8n does not cancel it; then n8n's socket is closed, and on the chat
	// API the visitor's next message starts a new execution. Default: 10m.
	WaitTimeout caddy.Duration `json:"wait_timeout,omitempty"`

	// Uploads lets chat messages carry files: the @n8n/chat widget's
	// allowFileUploads and multipart messages to the chat API, checked
	// (count, sizes, media type against the bytes) and forwarded to n8n
	// as the Chat Trigger parses them. `{}` turns them on with the
	// defaults (see upload.Config). Absent: off, and multipart bodies are
	// refused with 415.
	Uploads *upload.Config `json:"uploads,omitempty"`

	// The HMAC key (at least 32 bytes) of messages pushed into a
	// conversation: `POST {path_prefix}/sessions/{id}/messages` must carry
	// X-Chatproxy-Timestamp and X-Chatproxy-Signature (HMAC-SHA256 of
	// "<timestamp>.<body>"; see docs/http-api.md), and the proxy signs its
	// calls to handoff_webhook with it. Must differ from jwt_secret and
	// session_secret. Absent: that route answers 404.
	PushSecret string `json:"push_secret,omitempty"`

	// Where the visitor's messages go while a conversation is in human
	// mode (set by a push with {"mode":"human"}) instead of n8n: an http
	// or https URL, called with a signed JSON POST. Needs push_secret.
	// Absent: conversations cannot be handed to a person.
	HandoffWebhook string `json:"handoff_webhook,omitempty"`

	// How long a call to handoff_webhook may take. Default: 10s.
	HandoffTimeout caddy.Duration `json:"handoff_timeout,omitempty"`

	jwtSecret      []byte
	sessionSecret  []byte
	pushSecret     []byte
	identitySecret []byte
	erasureSecret  []byte
	handoff        *url.URL
	database       string
	redisURL       string
	// redisTimeout overrides the limiter's per-call Redis timeout. Tests
	// that count exact budgets set it, so that a starved CI machine does
	// not push the limiter into its in-process fallback mid-count.
	redisTimeout time.Duration
	// replyStoreTimeout overrides how long a reply's store is retried,
	// for tests of a database that stays down.
	replyStoreTimeout time.Duration
	webhook           *url.URL
	metricsAllow      []netip.Prefix
	logger            *zap.Logger

	// What Provision took, for Cleanup to give back.
	store        *sessions.Shared
	redis        *guard.SharedRedis
	purger       *sessions.Purger
	upstream     *n8n.Client
	drain        *handler.Drain
	events       *events.Hub
	releaseHub   func()
	untrackPools []func()
	handler      *handler.Handler
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

// Provision loads the configuration (placeholders resolved, defaults
// filled in), checks it with Validate before taking anything, and then
// sets the handler up in the order a request meets its parts: sessions,
// guard, upstream, streaming, store. It does no blocking network I/O:
// database and Redis connections are made on first use, so `caddy
// validate` works without them.
func (cp *ChatProxy) Provision(ctx caddy.Context) error {
	cp.logger = ctx.Logger()
	if err := cp.load(); err != nil {
		return err
	}
	if err := cp.Validate(); err != nil {
		return err
	}
	if err := metrics.Register(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	upstreamLabel := metrics.UpstreamLabel(cp.jwtSecret, cp.webhook.String())
	cp.logger.Debug("metrics labels", zap.String("upstream", upstreamLabel), zap.Strings("sites", cp.AllowedOrigins))
	hc := &handler.Config{
		Prefix:      cp.PathPrefix,
		MaxBodySize: cp.MaxBodySize,
		Logger:      cp.logger,
		Metrics:     metrics.NewRecorder(upstreamLabel, cp.AllowedOrigins),
		LogContent:  cp.LogContent,
	}
	for _, step := range []func(caddy.Context, *handler.Config) error{
		cp.provisionSessions,
		cp.provisionIdentity,
		cp.provisionGuard,
		cp.provisionErasure,
		cp.provisionUpstream,
		cp.provisionStreaming,
		cp.provisionUploads,
		cp.provisionPush,
		cp.provisionStore,
	} {
		if err := step(ctx, hc); err != nil {
			return err
		}
	}
	cp.handler = handler.New(*hc)
	return nil
}

// provisionIdentity sets up the verification of the site's proofs of its
// visitors when identity_secret is set.
func (cp *ChatProxy) provisionIdentity(_ caddy.Context, hc *handler.Config) error {
	if len(cp.identitySecret) == 0 {
		return nil
	}
	v, err := identity.NewVerifier(cp.identitySecret, nil)
	if err != nil {
		return fmt.Errorf("identity_secret: %w", err)
	}
	if err := v.Restrict(cp.IdentityProofs...); err != nil {
		return fmt.Errorf("identity_proofs: %w", err)
	}
	hc.Identity = v
	return nil
}

// provisionErasure sets up the signature check of the site's erasure call
// (DELETE {prefix}/user/data) when erasure_secret is set: the same scheme
// as pushes, keyed with erasure_secret, replays refused through Redis when
// configured (so across instances), else in process.
func (cp *ChatProxy) provisionErasure(_ caddy.Context, hc *handler.Config) error {
	if len(cp.erasureSecret) == 0 {
		return nil
	}
	var rdb redis.UniversalClient
	if cp.redis != nil {
		rdb = cp.redis.Client
	}
	hc.Erasure = &signed.Verifier{Secret: cp.erasureSecret, Replay: signed.NewReplay(rdb, signed.DefaultReplayPrefix)}
	return nil
}

// provisionSessions sets up visitor sessions: their tokens, lifetime and
// cookie. The store is added by provisionStore.
func (cp *ChatProxy) provisionSessions(_ caddy.Context, hc *handler.Config) error {
	cookie, err := cp.cookie()
	if err != nil {
		return err
	}
	hc.Cookie = cookie
	hc.Sessions = &sessions.Manager{
		Tokens: sessions.NewTokensFor(cp.jwtSecret, cp.tokenAudience(), nil),
		TTL:    time.Duration(cp.SessionTTL),
	}
	return nil
}

// tokenAudience is the audience of this block's visitor tokens: a block
// for another n8n workflow refuses them, even with the same jwt_secret
// (see sessions.BlockAudience).
func (cp *ChatProxy) tokenAudience() string {
	return sessions.BlockAudience(cp.webhook.String())
}

// provisionGuard sets up what decides whether a request may go on:
// allowed origins, rate limits (with the shared Redis client, if any), bot
// scoring, message length and who may read /metrics.
func (cp *ChatProxy) provisionGuard(_ caddy.Context, hc *handler.Config) error {
	origins, err := guard.ParseOrigins(cp.AllowedOrigins)
	if err != nil {
		return fmt.Errorf("allowed_origins: %w", err)
	}
	hc.Origins = origins
	hc.MaxMessageLength = cp.MaxMessageLength
	hc.MetricsAllow = cp.metricsAllow
	limiterCfg := guard.LimiterConfig{
		Limits: cp.rateLimits(),
		// Every instance of a site shares jwt_secret, so all of them name
		// a client's keys alike, while the names reveal no IP.
		HashKey:      deriveKey(cp.jwtSecret, "chatproxy rate-limit keys"),
		BlockAfter:   cp.BlockAfter,
		RedisTimeout: cp.redisTimeout,
		BlockFor:     time.Duration(cp.BlockFor),
		Logger:       cp.logger.Named("ratelimit"),
	}
	if cp.redisURL != "" {
		if cp.redis, err = guard.AcquireRedis(cp.redisURL); err != nil {
			return err
		}
		limiterCfg.Redis = cp.redis.Client
		hc.Redis = cp.redis.Client
		cp.untrackPools = append(cp.untrackPools, metrics.TrackRedisPool(metrics.PoolLabel(cp.redis.Key), cp.redis.Client))
	}
	if hc.Limiter, err = guard.NewLimiter(limiterCfg); err != nil {
		return fmt.Errorf("rate_limit: %w", err)
	}
	if enabled, threshold, _ := guard.ParseBotDetection(cp.BotDetection); enabled {
		if hc.Bots, err = guard.NewBotScorer(guard.BotConfig{Threshold: threshold, Repeats: hc.Limiter}); err != nil {
			return fmt.Errorf("bot_detection: %w", err)
		}
	}
	return nil
}

// provisionUpstream sets up the n8n client, whose circuit breaker reports
// its state to the metrics and the log.
func (cp *ChatProxy) provisionUpstream(_ caddy.Context, hc *handler.Config) error {
	cfg := cp.upstreamConfig()
	log := cp.logger.Named("n8n")
	rec := hc.Metrics
	cfg.OnStateChange = func(from, to n8n.BreakerState) {
		rec.SetCircuitState(string(to))
		log.Warn("n8n circuit breaker changed state", zap.String("from", string(from)), zap.String("to", string(to)))
	}
	var err error
	if cp.upstream, err = n8n.New(cfg); err != nil {
		return fmt.Errorf("n8n_webhook: %w", err)
	}
	hc.Upstream = cp.upstream
	return nil
}

// provisionStreaming sets up how replies are relayed and how they end:
// when the visitor leaves, and when Caddy exits (see handler.Drain).
func (cp *ChatProxy) provisionStreaming(ctx caddy.Context, hc *handler.Config) error {
	hc.FinishOnDisconnect = cp.OnClientDisconnect == "finish"
	hc.DetachedTimeout = time.Duration(cp.DetachedTimeout)
	hc.MaxStreamDuration = time.Duration(cp.MaxStreamDuration)
	// Live replies: shared by every handler of the process on the same
	// Redis (or without one), across reloads, so a resume reaches a reply
	// that a handler of the previous config is producing.
	hubKey, hubCfg := "local", replies.Config{Logger: cp.logger.Named("replies")}
	if cp.redis != nil {
		hubKey, hubCfg.Redis = cp.redis.Key, cp.redis.Client
	}
	hub, release, err := replies.AcquireHub(hubKey, hubCfg)
	if err != nil {
		return err
	}
	hc.Replies, cp.releaseHub = hub, release
	cp.drain = handler.NewDrain()
	cp.drain.HookServer(ctx, cp.logger)
	hc.Drain = cp.drain
	// n8n's "Using Response Nodes" mode: the widget's chat socket.
	hc.WaitTimeout = time.Duration(cp.WaitTimeout)
	if cp.ChatSocket != "off" {
		hc.ChatSocket = cp.ChatSocket
		hc.SocketKey = deriveKey(cp.jwtSecret, "chatproxy chat socket tokens")
	}
	return nil
}

// provisionUploads sets up the checks and spooling of files sent with
// messages, when the uploads block is there.
func (cp *ChatProxy) provisionUploads(_ caddy.Context, hc *handler.Config) error {
	if cp.Uploads == nil {
		return nil
	}
	p, err := upload.NewParser(*cp.Uploads)
	if err != nil {
		return err
	}
	hc.Uploads = p
	return nil
}

// provisionPush sets up messages pushed into conversations, when
// push_secret is set: the signature check (replays refused through Redis
// when configured, so across instances), the events hub that carries
// pushed messages to open pages (through Redis pub/sub when configured)
// and the handoff webhook. The hub's streams end when the server shuts
// down, on a reload too, so that an old configuration's server is not
// held open by pages that would reconnect anyway.
func (cp *ChatProxy) provisionPush(ctx caddy.Context, hc *handler.Config) error {
	if len(cp.pushSecret) == 0 {
		return nil
	}
	var rdb redis.UniversalClient
	if cp.redis != nil {
		rdb = cp.redis.Client
	}
	hc.Push = &signed.Verifier{Secret: cp.pushSecret, Replay: signed.NewReplay(rdb, signed.DefaultReplayPrefix)}
	// Instances of one site share jwt_secret, hence the channel; another
	// site on the same Redis has its own.
	channel := events.DefaultChannel + ":" + hex.EncodeToString(deriveKey(cp.jwtSecret, "chatproxy events channel")[:8])
	cp.events = events.New(rdb, channel, cp.logger.Named("events"))
	hc.Events = cp.events
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv != nil {
		srv.RegisterOnShutdown(cp.events.Close)
	}
	if cp.handoff != nil {
		hc.HandoffURL = cp.handoff.String()
	}
	hc.HandoffTimeout = time.Duration(cp.HandoffTimeout)
	return nil
}

// provisionStore takes a reference to the shared store and starts this
// handler's history purge, which ends with ctx.
func (cp *ChatProxy) provisionStore(ctx caddy.Context, hc *handler.Config) error {
	var err error
	if cp.store, err = sessions.AcquireShared(cp.database); err != nil {
		return err
	}
	if sw, ok := cp.store.Store.(interface{ SetStoreWait(time.Duration) }); ok {
		sw.SetStoreWait(time.Duration(cp.StoreWait))
	}
	hc.Store = cp.store.Store
	hc.Sessions.Store = cp.store.Store
	hc.ReplyStoreTimeout = cp.replyStoreTimeout
	if pg, ok := cp.store.Store.(interface{ Pool() *pgxpool.Pool }); ok {
		cp.untrackPools = append(cp.untrackPools, metrics.TrackDBPool(metrics.PoolLabel(cp.store.Key), pg.Pool()))
	}
	cp.purger = &sessions.Purger{
		Store:      cp.store.Store,
		State:      cp.store.Purge,
		Retention:  time.Duration(cp.HistoryRetention),
		Interval:   time.Duration(cp.PurgeInterval),
		FirstDelay: sessions.PurgeFirstDelay,
		Logger:     cp.logger.Named("purge"),
		Now:        time.Now,
	}
	go cp.purger.Run(ctx)
	return nil
}

// ServeHTTP answers the module's routes and passes every other request to
// next. A chat message goes through these stages, in this order; from the
// second on they are (*handler.Handler).runExchange in handler/pipeline.go,
// whose doc comment is the authority on them. The chat API
// (handler/chat.go) and the @n8n/chat route (handler/widget.go) supply
// only how a request is read and how the reply goes back.
//
//  1. Route, security headers and the origin check; the site's own origin
//     is always allowed (handler/handler.go, handler/cors.go).
//  2. Identify the session from the token or sessionId, without the store
//     (handler/sessions.go).
//  3. Read and check the message, and spool its files (guard/input.go,
//     handler/upload.go).
//  4. Rate-limit, before any store access (guard/ratelimit.go).
//  5. Load or create the session (sessions/).
//  6. Score for bots and spam (guard/bot.go).
//  7. Store the user message (sessions/).
//  8. Send it to n8n (n8n/).
//  9. Relay the reply as SSE, NDJSON or JSON (handler/relay.go,
//     streaming/).
//  10. Store the reply (handler/exchange.go, sessions/).
//
// Session, history, /health and /metrics routes are in handler/sessions.go,
// handler/history.go, handler/health.go and handler/metrics.go; how streams
// end when Caddy exits is in handler/shutdown.go.
func (cp *ChatProxy) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	return cp.handler.ServeHTTP(w, r, next)
}

// Cleanup releases what Provision took: the metrics of its pools, the
// streams still running when Caddy exits, the n8n client and the Redis
// and store references. It is safe after a partial Provision and when
// called more than once. The purge goroutine ends with the config's
// context, which Caddy cancels before calling Cleanup.
func (cp *ChatProxy) Cleanup() error {
	var errs []error
	for _, untrack := range cp.untrackPools {
		untrack()
	}
	cp.untrackPools = nil
	// Before the store is released: streams cut short by an exiting Caddy
	// store their partial replies.
	cp.drain.Finish()
	if cp.handler != nil {
		// The n8n sockets holding waiting executions close (their
		// records stay, for the next config or another instance).
		cp.handler.CloseSockets(socketCloseWait)
	}
	if cp.events != nil {
		cp.events.Close() // before the Redis client it subscribes with
		cp.events = nil
	}
	if cp.upstream != nil {
		// Streams still running finish on their own connections.
		errs = append(errs, cp.upstream.Close())
		cp.upstream = nil
	}
	if cp.releaseHub != nil {
		// Before the Redis client it may use.
		cp.releaseHub()
		cp.releaseHub = nil
	}
	if cp.redis != nil {
		errs = append(errs, cp.redis.Release())
		cp.redis = nil
	}
	if cp.store != nil {
		errs = append(errs, cp.store.Release())
		cp.store = nil
	}
	return errors.Join(errs...)
}

// socketCloseWait bounds how long Cleanup waits for the chat API's n8n
// sockets to close.
const socketCloseWait = 2 * time.Second

// deriveKey derives a purpose-bound key from a configured secret, so one
// secret never serves two purposes directly.
func deriveKey(secret []byte, purpose string) []byte {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(purpose))
	return mac.Sum(nil)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*ChatProxy)(nil)
	_ caddy.Validator             = (*ChatProxy)(nil)
	_ caddy.CleanerUpper          = (*ChatProxy)(nil)
	_ caddyhttp.MiddlewareHandler = (*ChatProxy)(nil)
	_ caddyfile.Unmarshaler       = (*ChatProxy)(nil)
)
