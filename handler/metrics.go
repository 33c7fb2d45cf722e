package handler

import (
	"net/http"
	"net/netip"

	"github.com/chatproxy/caddy-chatproxy/metrics"
)

// serveMetrics answers GET /metrics with the module's Prometheus metrics
// for clients whose client_ip is in metrics_allow. Everyone else gets the
// same 404 whatever the method, as if the route did not exist. It is not
// rate limited: scrapers come from the operator's own networks.
func (h *Handler) serveMetrics(w http.ResponseWriter, r *http.Request) error {
	setSecurityHeaders(w.Header())
	if !h.metricsAllowed(r) {
		return h.writeError(w, r, http.StatusNotFound, "not_found", "no such route")
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return h.writeError(w, r, http.StatusMethodNotAllowed, "method_not_allowed", "use GET")
	}
	metrics.Handler().ServeHTTP(w, r)
	return nil
}

// metricsAllowed reports whether the request's client_ip (which honours
// the server's trusted_proxies) is in metrics_allow.
func (h *Handler) metricsAllowed(r *http.Request) bool {
	ip, err := netip.ParseAddr(clientIP(r))
	if err != nil {
		return false
	}
	ip = ip.Unmap().WithZone("")
	for _, p := range h.cfg.MetricsAllow {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}
