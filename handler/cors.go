package handler

import (
	"net/http"

	"github.com/chatproxy/caddy-chatproxy/metrics"
)

// exposedHeaders are the response headers a widget's script may read.
const exposedHeaders = "X-Message-ID, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset"

// allowedRequestHeaders are the request headers a preflight may ask for.
const allowedRequestHeaders = "Authorization, Content-Type, Accept, Last-Event-ID"

// checkOrigin enforces allowed_origins: a request with an Origin that is not
// allowed is refused outright (403), not merely left without CORS headers,
// so a disallowed page cannot make the server act on its behalf. Allowed
// origins get credentialed CORS headers naming that origin, never "*".
func (h *Handler) checkOrigin(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if !h.cfg.Origins.Allowed(origin) {
		h.cfg.Metrics.GuardRefused(metrics.RefusalOrigin)
		_ = h.writeError(w, r, http.StatusForbidden, "origin_not_allowed", "this origin is not allowed to use the chat API")
		return false
	}
	hdr := w.Header()
	hdr.Set("Access-Control-Allow-Origin", origin)
	hdr.Set("Access-Control-Allow-Credentials", "true")
	hdr.Set("Access-Control-Expose-Headers", exposedHeaders)
	return true
}

// preflight answers OPTIONS for a known route; the origin was checked.
func (h *Handler) preflight(w http.ResponseWriter, r *http.Request, rt *route) error {
	hdr := w.Header()
	hdr.Set("Allow", rt.allow)
	if r.Header.Get("Origin") != "" && r.Header.Get("Access-Control-Request-Method") != "" {
		hdr.Add("Vary", "Access-Control-Request-Method")
		hdr.Add("Vary", "Access-Control-Request-Headers")
		hdr.Set("Access-Control-Allow-Methods", rt.allow)
		hdr.Set("Access-Control-Allow-Headers", allowedRequestHeaders)
		hdr.Set("Access-Control-Max-Age", "600")
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
