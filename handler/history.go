package handler

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// History paging bounds (SPEC §4, §9.5). A page also stops at
// historyPageBytes of message content (but holds at least one message):
// 200 messages of up to 8 MiB would otherwise make one request hold
// hundreds of MB. has_more and before reach what a page left out.
const (
	defaultHistoryLimit = 50
	maxHistoryLimit     = 200
	historyPageBytes    = 1 << 20
)

type historyMessage struct {
	ID        string `json:"id"`
	Role      string `json:"role"`
	Content   string `json:"content"`
	CreatedAt string `json:"created_at"`
	Status    string `json:"status"`
	// Attachments are the files a user message carried (name, type,
	// size, sha256); the bytes went to n8n and are not kept.
	Attachments []attachment `json:"attachments,omitempty"`
	// Buttons are an approval message's buttons (n8n's response-nodes
	// mode on the chat API), as its stream's buttons event gave them.
	Buttons []n8n.ChatButton `json:"buttons,omitempty"`
}

type historyResponse struct {
	SessionID  string           `json:"session_id"`
	Messages   []historyMessage `json:"messages"`
	TotalCount int              `json:"total_count"`
	HasMore    bool             `json:"has_more"`
	// Mode is bot, or human while a person answers (see push.go).
	Mode string `json:"mode"`
}

// history answers the caller's own conversation, or for a verified user
// another of their active conversations, named in the path or by the
// session_id parameter. Any other session id is 404, exactly like one
// that does not exist, so the route cannot be used to probe for other
// visitors' sessions.
func (h *Handler) history(w http.ResponseWriter, r *http.Request, sessionID string) error {
	s, _, ok := h.authenticate(w, r)
	if !ok {
		return nil
	}
	q := r.URL.Query()
	if sessionID == "" {
		sessionID = q.Get("session_id")
	}
	s, err := h.userConversation(r, s, sessionID)
	if errors.Is(err, sessions.ErrNotFound) {
		return h.writeError(w, r, http.StatusNotFound, "not_found", "no such session")
	}
	if err != nil {
		return h.storeError(w, r, "load conversation", err)
	}
	limit := defaultHistoryLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return h.writeError(w, r, http.StatusBadRequest, "invalid_request", "limit must be a whole number of at least 1")
		}
		limit = min(n, maxHistoryLimit)
	}
	page, err := h.cfg.Store.ListMessagesWithin(r.Context(), s.ID, q.Get("before"), limit, historyPageBytes)
	if errors.Is(err, sessions.ErrNotFound) {
		return h.writeError(w, r, http.StatusBadRequest, "invalid_request", "before does not name a message of this session")
	}
	if err != nil {
		return h.storeError(w, r, "list messages", err)
	}
	resp := historyResponse{
		SessionID:  s.ID,
		Messages:   make([]historyMessage, len(page.Messages)),
		TotalCount: page.TotalCount,
		HasMore:    page.HasMore,
		Mode:       s.Mode,
	}
	for i, m := range page.Messages {
		if m.Status == sessions.StatusStreaming && time.Since(m.CreatedAt) > h.staleAfter() {
			// Its instance went away before storing it (see finishLost).
			m = *h.finishLost(r.Context(), &m)
		}
		resp.Messages[i] = toHistoryMessage(m)
		if m.Role == sessions.RoleAssistant {
			resp.Messages[i].Buttons = storedButtons(m.Metadata)
		}
	}
	return writeJSON(w, http.StatusOK, resp)
}
