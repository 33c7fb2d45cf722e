package handler

import (
	"errors"
	"net/http"
	"strings"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/n8n"
)

// webhookWaiting serves the links of n8n's approval buttons (Send and
// Wait with buttons) through the proxy: n8n makes them on its WEBHOOK_URL,
// which operators set to the proxy's public origin (the @n8n/chat widget
// shows only buttons on its webhook's origin), and such a link resumes
// the waiting execution. Only signed links (n8n.IsWaitingLink), only GET
// and POST, within the body limit and the ip rate-limit tier, go to n8n;
// n8n checks the signature.
func (h *Handler) webhookWaiting(w http.ResponseWriter, r *http.Request) error {
	if !n8n.IsWaitingLink(r) {
		setSecurityHeaders(w.Header())
		return h.writeError(w, r, http.StatusNotFound, "not_found", "not a link of the chat workflow")
	}
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		setSecurityHeaders(w.Header())
		w.Header().Set("Allow", "GET, POST")
		return h.writeError(w, r, http.StatusMethodNotAllowed, "method_not_allowed", "use GET or POST")
	}
	if !h.rateLimit(w, r, ipKey(r)) {
		return nil
	}
	if r.Body != nil && h.cfg.MaxBodySize > 0 {
		r.Body = http.MaxBytesReader(w, r.Body, h.cfg.MaxBodySize)
	}
	h.cfg.Upstream.ForwardWaiting(w, r, func(w http.ResponseWriter, r *http.Request, err error) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			_ = h.writeError(w, r, http.StatusRequestEntityTooLarge, "payload_too_large", "the request body is too large")
			return
		}
		var ue *n8n.Error
		if !errors.As(err, &ue) || r.Context().Err() != nil {
			return
		}
		h.cfg.Logger.Warn("forwarding a waiting-webhook link to n8n", zap.Error(err))
		setSecurityHeaders(w.Header())
		_ = h.writeError(w, r, ue.Status, ue.Code, ue.Message)
	})
	return nil
}

// isWaitingPath reports whether the path is below n8n's waiting webhooks.
func isWaitingPath(p string) bool { return strings.HasPrefix(p, n8n.WaitingPathPrefix) }
