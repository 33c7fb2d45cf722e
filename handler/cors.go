package handler

import (
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/metrics"
)

// exposedHeaders are the response headers a widget's script may read.
const exposedHeaders = "X-Message-ID, X-Chatproxy-Mode, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset"

// allowedRequestHeaders are the request headers a preflight may ask for.
const allowedRequestHeaders = "Authorization, Content-Type, Accept, Last-Event-ID"

// checkOrigin enforces the origin rule: a request whose Origin is neither
// the site's own origin nor in allowed_origins is refused outright (403),
// not merely left without CORS headers, so a disallowed page cannot make
// the server act on its behalf. Allowed origins get credentialed CORS
// headers naming that origin, never "*".
func (h *Handler) checkOrigin(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if !h.originAllowed(r, origin) {
		h.cfg.Metrics.GuardRefused(metrics.RefusalOrigin)
		if h.cfg.Origins.Empty() && h.noOriginsWarned.CompareAndSwap(false, true) {
			h.cfg.Logger.Warn("refused a cross-origin request: allowed_origins is not set, so only the site's own origin may use the chat API; "+
				"add the page's origin to allowed_origins (this is logged once)",
				zap.String("origin", origin), zap.String("site_origin", requestScheme(r)+"://"+r.Host))
		}
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

// originAllowed reports whether a request's Origin may use the API: the
// site's own origin always may (a page served by the same site needs no
// allowed_origins), others only when allowed_origins names them.
func (h *Handler) originAllowed(r *http.Request, origin string) bool {
	return guard.SameOrigin(origin, requestScheme(r), r.Host) || h.cfg.Origins.Allowed(origin)
}

// cookieRequestAllowed is the CSRF rule for cookie-authenticated requests
// (guard.Origins.CookieRequestAllowed), with the site's own origin
// allowed as checkOrigin allows it.
func (h *Handler) cookieRequestAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin != "" && guard.SameOrigin(origin, requestScheme(r), r.Host) {
		return true
	}
	return h.cfg.Origins.CookieRequestAllowed(origin, r.Header.Get("Sec-Fetch-Site"))
}

// requestScheme is the scheme the client used, as Caddy sees it
// ({http.request.scheme}: https over TLS), or as a trusted proxy that
// terminated TLS reports it in X-Forwarded-Proto.
func requestScheme(r *http.Request) string {
	if r.TLS != nil {
		return "https"
	}
	if trusted, _ := caddyhttp.GetVar(r.Context(), caddyhttp.TrustedProxyVarKey).(bool); trusted {
		switch p := strings.ToLower(r.Header.Get("X-Forwarded-Proto")); p {
		case "http", "https":
			return p
		}
	}
	return "http"
}
