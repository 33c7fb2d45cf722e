package metrics

import (
	"strings"
	"time"

	"github.com/chatproxy/caddy-chatproxy/guard"
)

// Recorder records one chat_proxy handler's events into the shared
// collectors, adding the handler's own label values: its upstream name
// and the sites its allowed_origins name. A nil *Recorder records nothing,
// so code and tests without metrics need no checks.
type Recorder struct {
	upstream string
	exact    map[string]bool // host[:port] of exact allowed origins
	wild     []string        // "*.example.com[:port]" patterns of wildcard ones
}

// NewRecorder builds a handler's recorder. upstream names its n8n
// upstream in labels: a short, stable name that is neither the webhook
// URL nor its path (which are secret). allowedOrigins are the handler's
// allowed_origins entries; their hosts are the only site label values
// besides OtherSite. Entries that are not origins are ignored.
func NewRecorder(upstream string, allowedOrigins []string) *Recorder {
	r := &Recorder{upstream: upstream, exact: make(map[string]bool)}
	for _, o := range allowedOrigins {
		host, ok := guard.OriginHost(o)
		if !ok {
			continue
		}
		if strings.HasPrefix(host, "*.") {
			r.wild = append(r.wild, host)
		} else {
			r.exact[host] = true
		}
	}
	r.SetCircuitState("closed")
	return r
}

// Site returns the site label of a session's site: the site itself when an
// exact allowed origin names it, the wildcard pattern (`*.example.com`)
// that covers it, or OtherSite. Requests without an Origin belong to their
// Host header, which anyone can set, so unnamed sites never become labels.
func (r *Recorder) Site(site string) string {
	if r == nil {
		return OtherSite
	}
	site = strings.ToLower(site)
	if r.exact[site] {
		return site
	}
	for _, w := range r.wild {
		suffix := w[1:] // ".example.com[:port]"
		if len(site) > len(suffix) && strings.HasSuffix(site, suffix) && !strings.Contains(site[:len(site)-len(suffix)], ":") {
			return w
		}
	}
	return OtherSite
}

// SessionCreated counts a new session of kind (KindVisitor, KindWidget)
// for a session's site (not yet a label: Site is applied).
func (r *Recorder) SessionCreated(kind, site string) {
	if r == nil {
		return
	}
	sessionsCreated.WithLabelValues(kind, r.Site(site)).Inc()
}

// Message counts a chat exchange's outcome on a route for a session's site.
func (r *Recorder) Message(route, outcome, site string) {
	if r == nil {
		return
	}
	messages.WithLabelValues(route, outcome, r.Site(site)).Inc()
}

// UpstreamTTFB observes the time to n8n's first reply text.
func (r *Recorder) UpstreamTTFB(d time.Duration) {
	if r == nil {
		return
	}
	upstreamTTFB.WithLabelValues(r.upstream).Observe(d.Seconds())
}

// UpstreamDuration observes a whole exchange with n8n.
func (r *Recorder) UpstreamDuration(d time.Duration) {
	if r == nil {
		return
	}
	upstreamDuration.WithLabelValues(r.upstream).Observe(d.Seconds())
}

// UpstreamError counts a failed exchange with n8n; reason is an n8n.Reason.
func (r *Recorder) UpstreamError(reason string) {
	if r == nil {
		return
	}
	upstreamErrors.WithLabelValues(r.upstream, reason).Inc()
}

// ChunkRelayed counts one reply chunk of n bytes written to a stream.
func (r *Recorder) ChunkRelayed(n int) {
	if r == nil {
		return
	}
	chunksRelayed.Inc()
	bytesRelayed.Add(float64(n))
}

// BytesRelayed counts reply text handed to a client in one piece.
func (r *Recorder) BytesRelayed(n int) {
	if r == nil {
		return
	}
	bytesRelayed.Add(float64(n))
}

// StreamStarted and StreamEnded bracket a reply being streamed.
func (r *Recorder) StreamStarted() {
	if r != nil {
		activeStreams.Inc()
	}
}

// StreamEnded ends what StreamStarted began.
func (r *Recorder) StreamEnded() {
	if r != nil {
		activeStreams.Dec()
	}
}

// RateLimited counts a 429 by the refusing tier.
func (r *Recorder) RateLimited(tier string) {
	if r == nil {
		return
	}
	if tier == "" {
		tier = "unknown"
	}
	rateLimited.WithLabelValues(tier).Inc()
}

// GuardRefused counts a refusal by reason: RefusalOrigin, RefusalCSRF,
// RefusalInput or a bot signal (guard.Reason).
func (r *Recorder) GuardRefused(reason string) {
	if r == nil {
		return
	}
	guardRefusals.WithLabelValues(reason).Inc()
}

// UploadsAccepted counts n files that passed the uploads checks.
func (r *Recorder) UploadsAccepted(n int) {
	if r == nil || n == 0 {
		return
	}
	uploadFiles.WithLabelValues(UploadAccepted).Add(float64(n))
}

// UploadRefused counts a refused upload by its reason (upload.Reason).
func (r *Recorder) UploadRefused(reason string) {
	if r == nil {
		return
	}
	uploadFiles.WithLabelValues(reason).Inc()
}

// SetCircuitState records the circuit breaker's state (closed, half-open,
// open) for the recorder's upstream.
func (r *Recorder) SetCircuitState(state string) {
	if r == nil {
		return
	}
	for _, s := range circuitStates {
		v := 0.0
		if s == state {
			v = 1
		}
		circuitState.WithLabelValues(r.upstream, s).Set(v)
	}
}

// SocketOpened and SocketClosed bracket a widget's chat socket; reason is
// one of the Socket* reasons.
func (r *Recorder) SocketOpened() {
	if r != nil {
		activeSockets.Inc()
	}
}

// SocketClosed ends what SocketOpened began, counting why.
func (r *Recorder) SocketClosed(reason string) {
	if r == nil {
		return
	}
	activeSockets.Dec()
	socketCloses.WithLabelValues(reason).Inc()
}

// SocketFrameRelayed counts a frame relayed over a chat socket in a
// direction (ToN8n, ToVisitor).
func (r *Recorder) SocketFrameRelayed(direction string) {
	if r != nil {
		socketFrames.WithLabelValues(direction).Inc()
	}
}

// SocketUpgradeRefused counts a refused chat socket upgrade by reason
// (UpgradeOrigin, UpgradeToken, UpgradeRateLimited).
func (r *Recorder) SocketUpgradeRefused(reason string) {
	if r != nil {
		socketUpgradesRefused.WithLabelValues(reason).Inc()
	}
}
