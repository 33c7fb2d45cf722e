package handler

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/chatproxy/caddy-chatproxy/guard"
	ident "github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/internal/cleantext"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

type createSessionRequest struct {
	// OriginDomain is accepted for compatibility with the original widget
	// and ignored: a session's site comes from the Origin header only.
	OriginDomain string          `json:"origin_domain"`
	PageURL      string          `json:"page_url"`
	Metadata     json.RawMessage `json:"metadata"`
	// NewConversation starts a new conversation for a verified user
	// instead of continuing their latest (see openSession).
	NewConversation bool `json:"new_conversation"`
	// The site's proof of a logged-in visitor: user_id with user_hash
	// (and the display fields name, email), or identity_token.
	ident.Proof
}

type createSessionResponse struct {
	SessionID string `json:"session_id"`
	Token     string `json:"token"`
	ExpiresAt string `json:"expires_at"`
}

func (h *Handler) createSession(w http.ResponseWriter, r *http.Request, _ string) error {
	var req createSessionRequest
	if bad := h.readJSON(w, r, &req, true); bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	if bad := checkPageURL(req.PageURL); bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	metadata, bad := checkMetadata(req.Metadata)
	if bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	if !h.rateLimit(w, r, ipKey(r), guard.Key{Tier: guard.TierCreate, ID: guard.IPKeyID(clientIP(r))}) {
		return nil
	}
	user, err := h.verifyIdentity(r, routeSessionCreate, req.Proof)
	if err != nil {
		return h.refuseIdentity(w, r, err) // nothing is created
	}
	s, token, fresh, err := h.openSession(r, sessions.NewSession{
		Site:        requestSite(r),
		PageURL:     req.PageURL,
		UserAgent:   truncate(r.Header.Get("User-Agent"), 512),
		ClientIP:    clientIP(r),
		Fingerprint: guard.Fingerprint(r),
		Metadata:    metadata,
		User:        user,
		Origin:      r.Header.Get("Origin"), // checked against allowed_origins
	}, req.NewConversation)
	if err != nil {
		return h.storeError(w, r, "create session", err)
	}
	if fresh {
		h.cfg.Metrics.SessionCreated(metrics.KindVisitor, s.Site)
	}
	h.setSessionCookie(w, r, token, s.ExpiresAt)
	return writeJSON(w, http.StatusCreated, createSessionResponse{
		SessionID: s.ID,
		Token:     token,
		ExpiresAt: s.ExpiresAt.UTC().Format(time.RFC3339),
	})
}

type validateResponse struct {
	Valid        bool   `json:"valid"`
	SessionID    string `json:"session_id"`
	ExpiresAt    string `json:"expires_at"`
	MessageCount int    `json:"message_count"`
	// Mode is bot, or human while a person answers (see push.go).
	Mode string `json:"mode"`
}

func (h *Handler) validateSession(w http.ResponseWriter, r *http.Request, _ string) error {
	s, _, ok := h.authenticate(w, r)
	if !ok {
		return nil
	}
	return writeJSON(w, http.StatusOK, validateResponse{
		Valid:        true,
		SessionID:    s.ID,
		ExpiresAt:    s.ExpiresAt.UTC().Format(time.RFC3339),
		MessageCount: s.MessageCount,
		Mode:         s.Mode,
	})
}

func (h *Handler) destroySession(w http.ResponseWriter, r *http.Request, _ string) error {
	s, claims, ok := h.authenticate(w, r)
	if !ok {
		return nil
	}
	// A verified user's conversation is shared by their devices: only
	// this device's token is given up (Manager.SignOut).
	if err := h.cfg.Sessions.SignOut(r.Context(), s, claims); err != nil && !errors.Is(err, sessions.ErrNotFound) {
		return h.storeError(w, r, "revoke session", err)
	}
	h.clearSessionCookie(w, r)
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// authenticate spends the caller's ip rate limit, then finds their session
// from the bearer token or, failing that, the session cookie.
// Cookie-authenticated requests must also pass the CSRF rule. On failure
// it has written the response.
func (h *Handler) authenticate(w http.ResponseWriter, r *http.Request) (*sessions.Session, *sessions.Claims, bool) {
	if !h.rateLimit(w, r, ipKey(r)) {
		return nil, nil, false
	}
	_, claims, ok := h.authenticateWith(w, r, h.verifyToken)
	if !ok {
		return nil, nil, false
	}
	s, err := h.cfg.Sessions.Load(r.Context(), claims)
	if err != nil {
		_ = h.refuseSession(w, r, err)
		return nil, nil, false
	}
	return s, claims, true
}

// verifyToken is an auth for authenticateWith that only checks the token,
// without the store: its session is nil.
func (h *Handler) verifyToken(_ context.Context, token string) (*sessions.Session, *sessions.Claims, error) {
	c, err := h.cfg.Sessions.Tokens.Verify(token)
	return nil, c, err
}

// authenticateWith finds the token, applies the CSRF rule to a cookie,
// runs auth (which verifies the token's signature, times and this block's
// audience, and may load its session), and refuses a token whose session
// was created from another Origin than the request's.
func (h *Handler) authenticateWith(w http.ResponseWriter, r *http.Request,
	auth func(context.Context, string) (*sessions.Session, *sessions.Claims, error)) (*sessions.Session, *sessions.Claims, bool) {
	token, fromCookie, present := h.sessionToken(r)
	if !present {
		_ = h.writeError(w, r, http.StatusUnauthorized, "unauthorized", "a session token is required (Authorization: Bearer, or the session cookie)")
		return nil, nil, false
	}
	if fromCookie && !h.cookieRequestAllowed(r) {
		h.cfg.Metrics.GuardRefused(metrics.RefusalCSRF)
		_ = h.writeError(w, r, http.StatusForbidden, "csrf_refused", "cookie-authenticated requests must come from an allowed origin; other clients use the bearer token")
		return nil, nil, false
	}
	s, claims, err := auth(r.Context(), token)
	if err != nil {
		_ = h.refuseSession(w, r, err)
		return nil, nil, false
	}
	if !claims.OriginAllowed(r.Header.Get("Origin")) {
		h.cfg.Metrics.GuardRefused(metrics.RefusalOrigin)
		_ = h.writeError(w, r, http.StatusForbidden, "origin_mismatch", "this session was created from another origin; create a session from this page")
		return nil, nil, false
	}
	return s, claims, true
}

// refuseSession answers a failed authentication: a bad token, a session
// that ended, or the store's failure.
func (h *Handler) refuseSession(w http.ResponseWriter, r *http.Request, err error) error {
	switch {
	case errors.Is(err, sessions.ErrInvalidToken):
		return h.writeError(w, r, http.StatusUnauthorized, "invalid_token", "the session token is invalid or expired")
	case errors.Is(err, sessions.ErrSessionGone):
		return h.sessionGone(w, r)
	}
	return h.storeError(w, r, "authenticate", err)
}

func (h *Handler) sessionGone(w http.ResponseWriter, r *http.Request) error {
	return h.writeError(w, r, http.StatusUnauthorized, "session_expired", "the session has ended; create a new one")
}

// sessionToken returns the bearer token, else the cookie's. A malformed
// Authorization header counts as present, so it fails instead of silently
// falling back to the cookie.
func (h *Handler) sessionToken(r *http.Request) (token string, fromCookie, present bool) {
	if auth := r.Header.Get("Authorization"); auth != "" {
		scheme, tok, _ := strings.Cut(auth, " ")
		if !strings.EqualFold(scheme, "Bearer") {
			return "", false, true
		}
		return strings.TrimSpace(tok), false, true
	}
	if c, err := r.Cookie(h.cfg.Cookie.Name); err == nil && c.Value != "" {
		return c.Value, true, true
	}
	return "", false, false
}

func (h *Handler) cookieSecure(r *http.Request) bool {
	if h.cfg.Cookie.Secure != nil {
		return *h.cfg.Cookie.Secure
	}
	return r.TLS != nil
}

func (h *Handler) setSessionCookie(w http.ResponseWriter, r *http.Request, token string, expires time.Time) {
	maxAge := int(time.Until(expires).Seconds())
	if maxAge < 1 {
		maxAge = 1
	}
	http.SetCookie(w, &http.Cookie{
		Name:     h.cfg.Cookie.Name,
		Value:    token,
		Path:     "/",
		Domain:   h.cfg.Cookie.Domain,
		MaxAge:   maxAge,
		Secure:   h.cookieSecure(r),
		HttpOnly: true,
		SameSite: h.cfg.Cookie.SameSite,
	})
}

func (h *Handler) clearSessionCookie(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{
		Name:     h.cfg.Cookie.Name,
		Value:    "",
		Path:     "/",
		Domain:   h.cfg.Cookie.Domain,
		MaxAge:   -1,
		Secure:   h.cookieSecure(r),
		HttpOnly: true,
		SameSite: h.cfg.Cookie.SameSite,
	})
}

// requestSite is the site a session belongs to: the Origin's host (already
// checked against allowed_origins), else the request's own host. A body
// field never decides it.
func requestSite(r *http.Request) string {
	if host, ok := guard.OriginHost(r.Header.Get("Origin")); ok {
		return host
	}
	return strings.ToLower(r.Host)
}

func checkPageURL(raw string) *errBadBody {
	if raw == "" {
		return nil
	}
	if err := guard.CheckPageURL(raw); err != nil {
		return inputError(guard.WithField(err, "page_url"))
	}
	return nil
}

func checkMetadata(raw json.RawMessage) (json.RawMessage, *errBadBody) {
	if err := guard.CheckObject(raw, guard.ObjectLimits{}); err != nil {
		return nil, inputError(guard.WithField(err, "metadata"))
	}
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	return raw, nil
}

// truncate returns s as text both stores can hold (cleantext: invalid
// UTF-8 becomes U+FFFD, NUL is dropped), cut to at most n bytes on a
// character boundary. Headers that are stored (User-Agent) come from
// anyone: they are cleaned, never a reason for a store error.
func truncate(s string, n int) string {
	s = cleantext.String(s)
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "")
}
