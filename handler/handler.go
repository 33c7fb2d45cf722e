// Package handler implements the chat_proxy HTTP routes: sessions, chat,
// history, health and metrics, with CORS, CSRF checks, security headers
// and JSON errors.
package handler

import (
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/events"
	"github.com/chatproxy/caddy-chatproxy/guard"
	ident "github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/replies"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/signed"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

// Config is what the module hands the routes once provisioned.
type Config struct {
	Prefix      string // path prefix without a trailing slash, e.g. /api/v1
	Origins     *guard.Origins
	Sessions    *sessions.Manager
	Store       sessions.Store
	Cookie      Cookie
	MaxBodySize int64
	Logger      *zap.Logger

	// Limiter applies the rate-limit tiers; it is never nil (without Redis
	// it keeps its state in process).
	Limiter *guard.Limiter
	// Bots scores chat messages; nil when bot_detection is off.
	Bots *guard.BotScorer
	// Redis is the limiter's shared client, for /health; nil without Redis.
	Redis redis.UniversalClient
	// Identity verifies the site's proofs of its logged-in visitors
	// (identity_secret); nil when not configured, and identity fields are
	// then refused.
	Identity *ident.Verifier
	// Upstream forwards messages to n8n.
	Upstream *n8n.Client
	// MaxMessageLength is the longest message in runes.
	MaxMessageLength int
	// Uploads checks and spools the files of multipart chat messages;
	// nil when the uploads block is absent: multipart bodies are then
	// refused with 415.
	Uploads *upload.Parser
	// FinishOnDisconnect keeps reading n8n's reply to its end (and stores
	// it whole) when the visitor leaves; otherwise the upstream request is
	// cancelled at once.
	FinishOnDisconnect bool
	// KeepaliveInterval is the longest silence on a stream. Zero means
	// the streaming package's default (15s).
	KeepaliveInterval time.Duration
	// Drain ends running streams cleanly when Caddy exits; nil: never.
	Drain *Drain
	// ReplyStoreTimeout bounds the attempts to store a reply; zero means
	// DefaultReplyStoreTimeout.
	ReplyStoreTimeout time.Duration

	// Metrics records the handler's events; nil records nothing.
	Metrics *metrics.Recorder
	// MetricsAllow lists the client networks that may read /metrics;
	// everyone else gets 404. Empty: nobody.
	MetricsAllow []netip.Prefix
	// ChatSocket is the path (at the site root) of the @n8n/chat widget's
	// WebSocket for n8n's "Using Response Nodes" mode; empty: not served,
	// and the widget route refuses executionStarted replies (the chat
	// API's SSE forms carry them either way: socketapi.go).
	ChatSocket string
	// SocketKey signs the resume tokens that open the chat socket;
	// required with ChatSocket.
	SocketKey []byte
	// WaitTimeout is how long a waiting execution is kept alive after the
	// visitor's socket went away; zero means DefaultWaitTimeout.
	WaitTimeout time.Duration
	// Erasure checks the signature of DELETE {prefix}/user/data with
	// erasure_secret; nil (no erasure_secret): the route answers 404.
	Erasure *signed.Verifier
	// Replies carries live replies to resumed streams and stops to the
	// instance producing a reply (through Redis when it has a client);
	// nil: New makes one for this process.
	Replies *replies.Hub
	// DetachedTimeout is how long a chat API reply goes on without a
	// client following it (with on_client_disconnect cancel) before it is
	// stopped and stored partial; zero or less: stopped when its last
	// client leaves. With FinishOnDisconnect a reply is read to its end.
	DetachedTimeout time.Duration
	// MaxStreamDuration is the n8n client's max_stream_duration: a reply
	// still streaming long after it is found lost. Zero: the default.
	MaxStreamDuration time.Duration
	// LogContent adds the message and reply text to each exchange's log
	// line. Off by default: chat text is the visitor's personal data.
	LogContent bool

	// Push checks the signature of messages pushed into a conversation
	// (push_secret); nil: the push route answers 404 and there is no
	// events stream.
	Push *signed.Verifier
	// Events carries pushed messages and modes to open events streams;
	// required with Push.
	Events *events.Hub
	// HandoffURL receives a human-mode conversation's visitor messages
	// (signed with Push's secret); empty: no conversation can be put in
	// human mode.
	HandoffURL string
	// HandoffTimeout bounds a call to HandoffURL; zero means
	// DefaultHandoffTimeout.
	HandoffTimeout time.Duration
	// HandoffClient makes the calls to HandoffURL; nil: one of its own.
	HandoffClient *http.Client
}

// Cookie describes the session cookie.
type Cookie struct {
	Name     string
	Domain   string
	SameSite http.SameSite
	Secure   *bool // nil: secure when the request came over TLS
}

// Handler serves the module's routes and passes other requests on.
type Handler struct {
	cfg         Config
	routes      []route
	healthState healthState
	// noOriginsWarned is set once the refusal of a cross-origin request
	// without allowed_origins has been logged.
	noOriginsWarned atomic.Bool
	// sockets are the chat API's n8n sockets (socketapi.go).
	sockets socketSet
}

// route is one API path and what each allowed method does there.
type route struct {
	path    string // below the prefix; a trailing "/" or a "/*/" takes one path segment
	methods map[string]routeFunc
	allow   string // the Allow header value
	// serverToServer: called by servers with a signed request, never by
	// a browser, so no origin, CORS or CSRF rule applies (the signature
	// is checked by the route itself).
	serverToServer bool
}

type routeFunc func(w http.ResponseWriter, r *http.Request, param string) error

// New builds a handler from a provisioned configuration.
func New(cfg Config) *Handler {
	if cfg.Replies == nil {
		cfg.Replies = replies.NewHub(replies.Config{Logger: cfg.Logger})
	}
	h := &Handler{cfg: cfg}
	h.routes = []route{
		newRoute("/session/create", map[string]routeFunc{http.MethodPost: h.createSession}),
		newRoute("/session/validate", map[string]routeFunc{http.MethodGet: h.validateSession}),
		newRoute("/session", map[string]routeFunc{http.MethodDelete: h.destroySession}),
		newRoute("/session/destroy", map[string]routeFunc{http.MethodDelete: h.destroySession}),
		newRoute("/chat/history", map[string]routeFunc{http.MethodGet: h.history}),
		newRoute("/chat/history/", map[string]routeFunc{http.MethodGet: h.history}),
		newRoute("/chat/conversations", map[string]routeFunc{http.MethodGet: h.conversations}),
		newRoute("/user/data", map[string]routeFunc{http.MethodDelete: h.eraseUser}),
		newRoute("/chat/message", map[string]routeFunc{http.MethodPost: h.chatMessage}),
		newRoute("/chat/stream", map[string]routeFunc{http.MethodGet: h.chatStreamGet, http.MethodPost: h.chatStreamPost}),
		newRoute("/chat/stream/", map[string]routeFunc{http.MethodGet: h.resumeStream}),
		newRoute("/chat/stop/", map[string]routeFunc{http.MethodPost: h.stopReply}),
		newRoute("/n8n/chat", map[string]routeFunc{http.MethodPost: h.widgetChat}),
		newRoute("/chat/events", map[string]routeFunc{http.MethodGet: h.chatEvents}),
		serverToServer(newRoute("/sessions/*/messages", map[string]routeFunc{http.MethodPost: h.pushMessage})),
	}
	return h
}

func newRoute(path string, methods map[string]routeFunc) route {
	allow := make([]string, 0, len(methods)+1)
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodDelete} {
		if methods[m] != nil {
			allow = append(allow, m)
		}
	}
	allow = append(allow, http.MethodOptions)
	return route{path: path, methods: methods, allow: strings.Join(allow, ", ")}
}

func serverToServer(rt route) route {
	rt.serverToServer = true
	rt.allow = strings.TrimSuffix(rt.allow, ", "+http.MethodOptions)
	return rt
}

// match finds the route for an API path and the parameter (the trailing
// segment, or the one in place of a "*"), if any.
func (h *Handler) match(apiPath string) (*route, string) {
	for i := range h.routes {
		rt := &h.routes[i]
		if prefix, suffix, ok := strings.Cut(rt.path, "/*/"); ok {
			rest, found := strings.CutPrefix(apiPath, prefix+"/")
			param, found2 := strings.CutSuffix(rest, "/"+suffix)
			if found && found2 && param != "" && !strings.Contains(param, "/") {
				return rt, param
			}
			continue
		}
		if prefix, ok := strings.CutSuffix(rt.path, "/"); ok {
			param, found := strings.CutPrefix(apiPath, prefix+"/")
			if found && param != "" && !strings.Contains(param, "/") {
				return rt, param
			}
			continue
		}
		if apiPath == rt.path {
			return rt, ""
		}
	}
	return nil, ""
}

// UploadsEnabled reports whether chat messages may carry files (the
// uploads block is configured).
func (h *Handler) UploadsEnabled() bool { return h.cfg.Uploads != nil }

// ServeHTTP answers the module's own routes and hands anything else to next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if r.URL.Path == "/health" {
		setSecurityHeaders(w.Header())
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			return h.writeError(w, r, http.StatusMethodNotAllowed, "method_not_allowed", "use GET")
		}
		return h.health(w, r)
	}
	if r.URL.Path == "/metrics" {
		return h.serveMetrics(w, r)
	}
	// Only WebSocket upgrades are the chat socket's: a page the site
	// serves at the same path (a /chat page) keeps working.
	if h.cfg.ChatSocket != "" && r.URL.Path == h.cfg.ChatSocket && isWebSocketUpgrade(r) {
		return h.chatSocket(w, r)
	}
	if isWaitingPath(r.URL.Path) && h.cfg.Upstream != nil {
		return h.webhookWaiting(w, r)
	}
	apiPath, ok := strings.CutPrefix(r.URL.Path, h.cfg.Prefix)
	if !ok || !strings.HasPrefix(apiPath, "/") {
		return next.ServeHTTP(w, r)
	}
	rt, param := h.match(apiPath)
	if rt == nil {
		return next.ServeHTTP(w, r)
	}

	hdr := w.Header()
	setSecurityHeaders(hdr)
	if rt.serverToServer {
		serve := rt.methods[r.Method]
		if serve == nil {
			hdr.Set("Allow", rt.allow)
			return h.writeError(w, r, http.StatusMethodNotAllowed, "method_not_allowed", "method "+r.Method+" is not allowed here; allowed: "+rt.allow)
		}
		return serve(w, r, param)
	}
	hdr.Add("Vary", "Origin")
	if !h.checkOrigin(w, r) {
		return nil
	}
	if r.Method == http.MethodOptions {
		return h.preflight(w, r, rt)
	}
	serve := rt.methods[r.Method]
	if serve == nil {
		hdr.Set("Allow", rt.allow)
		return h.writeError(w, r, http.StatusMethodNotAllowed, "method_not_allowed", "method "+r.Method+" is not allowed here; allowed: "+rt.allow)
	}
	return serve(w, r, param)
}

// setSecurityHeaders sets the headers every module response carries.
func setSecurityHeaders(h http.Header) {
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "strict-origin-when-cross-origin")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
	h.Set("Cache-Control", "no-store")
}

// clientIP is Caddy's client_ip, which honours the server's trusted_proxies;
// the raw X-Forwarded-For is never trusted. The socket peer stands in when
// the var is missing (a handler used outside Caddy's server).
func clientIP(r *http.Request) string {
	if ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ip != "" {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func (h *Handler) now() time.Time {
	if h.cfg.Sessions.Now != nil {
		return h.cfg.Sessions.Now().UTC()
	}
	return time.Now().UTC()
}

func ipKey(r *http.Request) guard.Key {
	return guard.Key{Tier: guard.TierIP, ID: guard.IPKeyID(clientIP(r))}
}

// rateLimit counts the request against keys and answers 429 when a tier
// refuses. It reports whether the request may go on; when not, the
// response has been written (or the client is gone). A request counted
// twice (a new widget conversation: its create tier once the store said
// so) shows the window with the least room left.
func (h *Handler) rateLimit(w http.ResponseWriter, r *http.Request, keys ...guard.Key) bool {
	d, err := h.cfg.Limiter.Allow(r.Context(), keys...)
	if err != nil {
		if r.Context().Err() != nil {
			return false // the client left; there is nobody to answer
		}
		h.cfg.Logger.Error("rate limiter failed", zap.Error(err))
		_ = h.writeError(w, r, http.StatusInternalServerError, "internal_error", "the request could not be checked; try again")
		return false
	}
	if prev, err := strconv.Atoi(w.Header().Get("RateLimit-Remaining")); err != nil || !d.Allowed || d.Remaining < prev {
		d.SetHeaders(w.Header())
	}
	if !d.Allowed {
		h.cfg.Metrics.RateLimited(string(d.Tier))
		_ = writeJSON(w, http.StatusTooManyRequests, d.Body())
		return false
	}
	return true
}
