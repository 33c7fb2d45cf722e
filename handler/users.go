package handler

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/signed"
)

// A verified user's conversations (issue 16): one conversation across
// devices, the list of them, and erasure. Verifying the user is not done
// here: the create route hands openSession a user already proven.

// openSession decides the session a create request gets and signs its
// token. n describes the request; n.User is the verified user, nil for
// an anonymous visitor, who always gets a new session.
//
// A verified user gets, in this order:
//   - with newConversation, a new conversation;
//   - when the request holds an active anonymous session (its bearer
//     token or cookie) that has messages, that conversation, now the
//     user's: it moves to a new session id (the anonymous one is deleted
//     and its tokens stop working), keeping every message;
//   - their latest active conversation (the one used last), with a new
//     token for this device: conversations are shared by the user's
//     devices, each with a token of its own;
//   - else a new conversation.
//
// fresh reports a new conversation (counted as a created session): not
// one continued or adopted.
func (h *Handler) openSession(r *http.Request, n sessions.NewSession, newConversation bool) (s *sessions.Session, token string, fresh bool, err error) {
	m := h.cfg.Sessions
	if n.User == nil || newConversation {
		s, token, err = m.Create(r.Context(), n)
		return s, token, true, err
	}
	if anon := h.heldAnonymousSession(r); anon != nil && anon.MessageCount > 0 {
		s, token, err = m.Adopt(r.Context(), anon, n)
		if !errors.Is(err, sessions.ErrNotFound) {
			return s, token, false, err
		}
		// Adopted or ended meanwhile (another tab): go on as without it.
	}
	s, token, err = m.Resume(r.Context(), n)
	if !errors.Is(err, sessions.ErrNotFound) {
		return s, token, false, err
	}
	s, token, err = m.Create(r.Context(), n)
	return s, token, true, err
}

// heldAnonymousSession is the active anonymous session the request's
// token names (bearer, else cookie under the cookie CSRF rule), or nil:
// a missing, bad or foreign token is no reason to refuse a create.
func (h *Handler) heldAnonymousSession(r *http.Request) *sessions.Session {
	token, fromCookie, present := h.sessionToken(r)
	if !present || token == "" || fromCookie && !h.cookieRequestAllowed(r) {
		return nil
	}
	claims, err := h.cfg.Sessions.Tokens.Verify(token)
	if err != nil || !claims.OriginAllowed(r.Header.Get("Origin")) {
		return nil
	}
	s, err := h.cfg.Sessions.Load(r.Context(), claims)
	if err != nil || s.User != nil {
		return nil
	}
	return s
}

// Conversation list paging bounds.
const (
	defaultConversationLimit = 20
	maxConversationLimit     = 100
)

type conversationItem struct {
	ID            string  `json:"id"`
	CreatedAt     string  `json:"created_at"`
	LastMessageAt *string `json:"last_message_at"` // null: no messages
	MessageCount  int     `json:"message_count"`
	Preview       string  `json:"preview"`
	ExpiresAt     string  `json:"expires_at"`
	// Current marks the conversation the request's token is for.
	Current bool `json:"current"`
}

type conversationsResponse struct {
	Conversations []conversationItem `json:"conversations"`
	HasMore       bool               `json:"has_more"`
}

// conversations answers GET {prefix}/chat/conversations: the verified
// user's active conversations, newest first. An anonymous session has
// none to list: 403 not_verified.
func (h *Handler) conversations(w http.ResponseWriter, r *http.Request, _ string) error {
	s, _, ok := h.authenticate(w, r)
	if !ok {
		return nil
	}
	if s.User == nil {
		return h.writeError(w, r, http.StatusForbidden, "not_verified", "conversations are listed for visitors the site verified (identity_secret); this session is anonymous")
	}
	q := r.URL.Query()
	limit := defaultConversationLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return h.writeError(w, r, http.StatusBadRequest, "invalid_request", "limit must be a whole number of at least 1")
		}
		limit = min(n, maxConversationLimit)
	}
	page, err := h.cfg.Store.ListUserSessions(r.Context(), s.User.Realm, s.User.ID, q.Get("before"), limit, h.now())
	if errors.Is(err, sessions.ErrNotFound) {
		return h.writeError(w, r, http.StatusBadRequest, "invalid_request", "before does not name one of your conversations")
	}
	if err != nil {
		return h.storeError(w, r, "list conversations", err)
	}
	resp := conversationsResponse{Conversations: make([]conversationItem, len(page.Conversations)), HasMore: page.HasMore}
	for i, c := range page.Conversations {
		item := conversationItem{
			ID:           c.ID,
			CreatedAt:    c.CreatedAt.UTC().Format(time.RFC3339Nano),
			MessageCount: c.MessageCount,
			Preview:      c.Preview,
			ExpiresAt:    c.ExpiresAt.UTC().Format(time.RFC3339),
			Current:      c.ID == s.ID,
		}
		if !c.LastMessageAt.IsZero() {
			at := c.LastMessageAt.UTC().Format(time.RFC3339Nano)
			item.LastMessageAt = &at
		}
		resp.Conversations[i] = item
	}
	return writeJSON(w, http.StatusOK, resp)
}

// userConversation is the session whose history a request for id may
// read: the caller's own, or, for a verified user, another active visitor
// session of the same user. Anything else is not found.
func (h *Handler) userConversation(r *http.Request, own *sessions.Session, id string) (*sessions.Session, error) {
	if id == "" || id == own.ID {
		return own, nil
	}
	if own.User == nil {
		return nil, sessions.ErrNotFound
	}
	s, err := h.cfg.Store.GetSession(r.Context(), id)
	if err != nil {
		return nil, err
	}
	if s.User == nil || s.User.Realm != own.User.Realm || s.User.ID != own.User.ID ||
		s.Kind != sessions.KindVisitor || !s.Active(h.now()) {
		return nil, sessions.ErrNotFound
	}
	return s, nil
}

// maxErasureBody bounds DELETE {prefix}/user/data's body: {"user_id": ...}.
const maxErasureBody = 4 << 10

type erasureRequest struct {
	UserID string `json:"user_id"`
}

// eraseUser answers DELETE {prefix}/user/data, the site's right-to-erasure
// call: signed with erasure_secret (package signed: timestamp, HMAC of
// "<timestamp>.<body>", each signature accepted once), it deletes every
// conversation of the user with its messages, and answers 204, also when
// nothing was stored. Their tokens stop working with their sessions. An
// unsigned or badly signed request is 401 and deletes nothing; without
// erasure_secret the route is 404. When the store fails (503), the
// signature is given up again, so the same request can be retried.
func (h *Handler) eraseUser(w http.ResponseWriter, r *http.Request, _ string) error {
	if h.cfg.Erasure == nil {
		return h.writeError(w, r, http.StatusNotFound, "not_found", "user data erasure needs erasure_secret")
	}
	if !h.rateLimit(w, r, ipKey(r)) {
		return nil
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxErasureBody))
	if err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			return h.writeBadBody(w, r, tooLarge(maxErasureBody))
		}
		return h.writeError(w, r, http.StatusBadRequest, "invalid_request", "could not read the request body")
	}
	// The signature first: nothing else is said to an unsigned caller.
	if err := h.cfg.Erasure.Verify(r.Context(), r.Header, body); err != nil {
		if errors.Is(err, signed.ErrUnavailable) {
			h.cfg.Logger.Error("user data erasure: replay check failed", zap.Error(err))
			w.Header().Set("Retry-After", "1")
			return h.writeError(w, r, http.StatusServiceUnavailable, "unavailable", "the request could not be checked; try again with a new signature")
		}
		h.cfg.Logger.Info("user data erasure refused", zap.String("reason", err.Error()))
		return h.writeError(w, r, http.StatusUnauthorized, "invalid_signature", "the request must be signed with erasure_secret (X-Chatproxy-Timestamp, X-Chatproxy-Signature), once")
	}
	var req erasureRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&req); err != nil || dec.More() {
		return h.writeError(w, r, http.StatusBadRequest, "invalid_json", `the body must be {"user_id": "..."}`)
	}
	if req.UserID == "" {
		return h.writeError(w, r, http.StatusBadRequest, "invalid_request", "user_id is required")
	}
	ns, nm, err := h.cfg.Store.DeleteUser(r.Context(), h.cfg.Sessions.Tokens.Audience(), req.UserID)
	if err != nil {
		// Nothing more was deleted (the store works in batches, each a
		// transaction of its own): give the signature up, so the site's
		// retry of this very request is not a replay and erases the rest.
		if ferr := h.cfg.Erasure.Forget(context.WithoutCancel(r.Context()), r.Header); ferr != nil {
			h.cfg.Logger.Warn("user data erasure: could not give up the signature of a failed erasure", zap.Error(ferr))
		}
		return h.storeError(w, r, "erase user data", err)
	}
	// Counts only: the user id is the person's identifier.
	h.cfg.Logger.Info("erased user data", zap.Int64("sessions", ns), zap.Int64("messages", nm))
	w.WriteHeader(http.StatusNoContent)
	return nil
}
