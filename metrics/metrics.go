// Package metrics holds the chat_proxy module's Prometheus collectors and
// the small API the routes record through.
//
// The collectors are created once, when the package is loaded, and are
// registered into every config's registry (Caddy builds a new one per
// config load), so values carry over a `caddy reload` and several
// chat_proxy handlers share one set of series. The same collectors also
// live in a registry of this package, which the module's own /metrics
// route serves.
//
// Every label takes values from a small, fixed or configured set: never a
// session id, an IP address, a URL or free text.
package metrics

import (
	"errors"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const (
	namespace = "caddy"
	subsystem = "chatproxy"
)

// Route labels: which chat route an exchange came through.
const (
	RouteMessage = "message" // POST {prefix}/chat/message
	RouteStream  = "stream"  // GET or POST {prefix}/chat/stream
	RouteWidget  = "widget"  // POST {prefix}/n8n/chat (sendMessage)
)

// Outcome labels of messages_total: how a chat exchange ended.
const (
	OutcomeOK            = "ok"             // the reply reached the client whole
	OutcomeUpstreamError = "upstream_error" // n8n failed, before or during the reply (circuit open included)
	OutcomeClientGone    = "client_gone"    // the client left before the reply was complete
	OutcomeRateLimited   = "rate_limited"   // refused with 429
	OutcomeRejected      = "rejected"       // refused by the bot and spam filter (403)
	OutcomeHoneypot      = "honeypot"       // a bot filled the honeypot field; answered without n8n
	OutcomeInvalid       = "invalid"        // refused for its input or body (400, 413, 415) or its session ended
	OutcomeError         = "error"          // a failure of this server (store unavailable, internal error)
	OutcomeShutdown      = "shutdown"       // Caddy shut down mid-reply; the stream ended with a server_shutdown event
)

// Session kind labels of sessions_created_total.
const (
	KindVisitor = "visitor" // POST {prefix}/session/create
	KindWidget  = "widget"  // a new @n8n/chat widget conversation
)

// Guard refusal reasons besides the bot filter's signals (guard.Reason).
const (
	RefusalOrigin = "origin" // a disallowed Origin (403)
	RefusalCSRF   = "csrf"   // a cookie request without browser evidence of an allowed origin (403)
	RefusalInput  = "input"  // an invalid body or input (400, 413, 415)
	// RefusalIdentity: an identity proof that failed (401 invalid_identity).
	RefusalIdentity = "identity"
)

// Directions of socket_frames_total: frames relayed over the chat socket.
const (
	ToN8n     = "to_n8n"     // the visitor's heartbeat acks and answers, relayed to n8n
	ToVisitor = "to_visitor" // n8n's heartbeats, messages and continues, relayed to the widget
)

// Reasons of socket_closes_total: why a widget's chat socket ended.
const (
	SocketN8nClosed      = "n8n_closed"      // n8n ended the conversation (the execution finished)
	SocketN8nError       = "n8n_error"       // n8n dropped its socket or closed it with an error code
	SocketN8nUnreachable = "n8n_unreachable" // n8n's socket could not be opened (1011)
	SocketVisitorLeft    = "visitor_left"    // the widget closed its socket or went away
	SocketShutdown       = "shutdown"        // Caddy exited (1001)
	SocketInvalidFrame   = "invalid_frame"   // a frame that is neither an ack nor a valid answer (1008)
	SocketUploadRefused  = "upload_refused"  // an answer's files refused by the uploads checks (1008, 1009)
	SocketFrameTooBig    = "frame_too_big"   // a frame over the size cap (1009)
	SocketBinaryFrame    = "binary_frame"    // a binary frame (1003)
	SocketRateLimited    = "rate_limited"    // an answer over the rate limits (1013)
	SocketStoreFailed    = "store_failed"    // an answer that could not be stored (1011)
)

// Reasons of socket_upgrades_refused_total.
const (
	UpgradeOrigin      = "origin"       // no Origin, or one not allowed (403)
	UpgradeToken       = "token"        // no token, or one forged, expired or for another conversation (403)
	UpgradeRateLimited = "rate_limited" // the ip tier's limit (429)
)

// UploadAccepted is the result label of upload_files_total for files that
// passed the uploads checks; refusals are labelled with their reason.
const UploadAccepted = "accepted"

// OtherSite is the site label of a site that allowed_origins does not name.
const OtherSite = "other"

// The circuit breaker states, as n8n.BreakerState spells them.
var circuitStates = []string{"closed", "half-open", "open"}

var (
	sessionsCreated = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "sessions_created_total",
		Help: "Sessions created, by kind (visitor, widget) and site.",
	}, []string{"kind", "site"})

	messages = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "messages_total",
		Help: "Chat messages handled, by route (message, stream, widget), outcome and site.",
	}, []string{"route", "outcome", "site"})

	upstreamTTFB = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name:    "upstream_ttfb_seconds",
		Help:    "Time from sending a message to n8n to the first reply text, by upstream.",
		Buckets: []float64{0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120},
	}, []string{"upstream"})

	upstreamDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name:    "upstream_duration_seconds",
		Help:    "Time from sending a message to n8n to the end of its reply (or failure), by upstream.",
		Buckets: []float64{0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600},
	}, []string{"upstream"})

	upstreamErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "upstream_errors_total",
		Help: "Failed exchanges with n8n, by upstream and reason (n8n.Reason: connect, status, first_byte_timeout, circuit_open, …).",
	}, []string{"upstream", "reason"})

	chunksRelayed = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "chunks_relayed_total",
		Help: "Reply chunks written to clients on streams (SSE events, NDJSON lines).",
	})

	bytesRelayed = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "relayed_bytes_total",
		Help: "Bytes of reply text handed to clients (streamed or whole).",
	})

	activeStreams = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "active_streams",
		Help: "Replies being streamed to clients right now.",
	})

	rateLimited = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "rate_limited_total",
		Help: "Requests refused with 429, by the refusing tier (ip, session, domain, create, user).",
	}, []string{"tier"})

	guardRefusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "guard_refusals_total",
		Help: "Requests refused (or, for honeypot, quietly answered) by the guard, by reason: origin, csrf, input, identity, or a bot signal; a bot refusal counts once per signal.",
	}, []string{"reason"})

	uploadFiles = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "upload_files_total",
		Help: "Files sent with chat messages (multipart or over the chat socket), by result: accepted, or the reason the upload was refused (too_many_files, file_too_large, upload_too_large, fields_too_large, type_not_allowed, type_mismatch, type_forbidden, empty_file, invalid_multipart, invalid_data_url, uploads_disabled), counted once per refused upload.",
	}, []string{"result"})

	activeSockets = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "active_sockets",
		Help: "Chat sockets of @n8n/chat widgets (chat_socket) open right now.",
	})

	socketFrames = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "socket_frames_total",
		Help: "Frames relayed over chat sockets, by direction: to_n8n (the visitor's acks and answers), to_visitor (n8n's frames).",
	}, []string{"direction"})

	socketCloses = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "socket_closes_total",
		Help: "Widget chat sockets ended, by reason: n8n_closed, n8n_error, n8n_unreachable, visitor_left, shutdown, or the refusal that closed them (invalid_frame, upload_refused, frame_too_big, binary_frame, rate_limited, store_failed).",
	}, []string{"reason"})

	socketUpgradesRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "socket_upgrades_refused_total",
		Help: "Chat socket upgrades refused before anything reached n8n, by reason: origin, token, rate_limited.",
	}, []string{"reason"})

	circuitState = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace, Subsystem: subsystem,
		Name: "circuit_state",
		Help: "The n8n circuit breaker's state, by upstream: 1 for the current state (closed, half-open, open), 0 for the others.",
	}, []string{"upstream", "state"})

	pools = &poolCollector{db: map[string]*poolEntry{}, redis: map[string]*poolEntry{}}

	// collectors is every collector above, in registration order.
	collectors = []prometheus.Collector{
		sessionsCreated, messages, upstreamTTFB, upstreamDuration, upstreamErrors,
		chunksRelayed, bytesRelayed, activeStreams, rateLimited, guardRefusals,
		uploadFiles, circuitState, pools,
		activeSockets, socketFrames, socketCloses, socketUpgradesRefused,
	}

	// own is the registry the module's /metrics route serves, and handler
	// serves it; both are set up by init, once every collector exists.
	own     *prometheus.Registry
	handler http.Handler
)

func init() {
	own = prometheus.NewPedanticRegistry()
	for _, c := range collectors {
		own.MustRegister(c)
	}
	handler = promhttp.HandlerFor(own, promhttp.HandlerOpts{
		ErrorHandling: promhttp.ContinueOnError,
		// Caddy's encode directive compresses, when the site wants it.
		DisableCompression: true,
	})
	// Series that exist from the start, so that rate() and absent-based
	// alerts work before the first refusal.
	for _, tier := range []string{"ip", "session", "domain", "create", "user"} {
		rateLimited.WithLabelValues(tier)
	}
	for _, reason := range []string{RefusalOrigin, RefusalCSRF, RefusalInput, RefusalIdentity} {
		guardRefusals.WithLabelValues(reason)
	}
	uploadFiles.WithLabelValues(UploadAccepted)
	for _, d := range []string{ToN8n, ToVisitor} {
		socketFrames.WithLabelValues(d)
	}
	for _, reason := range []string{UpgradeOrigin, UpgradeToken, UpgradeRateLimited} {
		socketUpgradesRefused.WithLabelValues(reason)
	}
}

// Register adds the module's collectors to reg, typically the config's
// registry from caddy.Context.GetMetricsRegistry, so that they appear on
// Caddy's admin /metrics. Registering again into the same registry (a
// second chat_proxy handler in one config) is not an error.
func Register(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				continue
			}
			return err
		}
	}
	return nil
}

// Handler serves the module's metrics in the Prometheus text format. The
// caller decides who may read them.
func Handler() http.Handler { return handler }

// Gatherer gathers the module's metrics, as Handler serves them.
func Gatherer() prometheus.Gatherer { return own }
