package handler

import (
	"crypto/sha256"
	"encoding/base32"
	"encoding/json"
	"errors"
	"mime"
	"net/http"
	"strings"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/streaming"
)

// widgetHistoryLimit is how much of a conversation loadPreviousSession
// restores.
const widgetHistoryLimit = 200

// widgetRequest is what the official @n8n/chat widget posts.
type widgetRequest struct {
	Action    string          `json:"action"`
	SessionID string          `json:"sessionId"`
	ChatInput *string         `json:"chatInput"`
	Metadata  json.RawMessage `json:"metadata"`
}

// widgetChat answers POST {prefix}/n8n/chat for the @n8n/chat widget:
// loadPreviousSession from the store (n8n is not called), sendMessage
// through n8n as NDJSON (streaming mode, Accept: text/plain) or as
// {"output": …}.
//
// The widget chooses its own sessionId, so it is untrusted input: it must
// look like one, and it names a conversation only within the request's
// site, in a namespace apart from visitor sessions.
func (h *Handler) widgetChat(w http.ResponseWriter, r *http.Request, _ string) error {
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt == "multipart/form-data" {
		return h.refuseInput(w, r, http.StatusUnsupportedMediaType, "unsupported_media_type", "file uploads are not supported; send the message as JSON")
	}
	var req widgetRequest
	if bad := h.readJSON(w, r, &req, false); bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	switch req.Action {
	case "loadPreviousSession", "sendMessage":
	case "":
		return h.refuseInput(w, r, http.StatusBadRequest, "invalid_request", "action is required: sendMessage or loadPreviousSession")
	default:
		return h.refuseInput(w, r, http.StatusBadRequest, "invalid_request", "unknown action; use sendMessage or loadPreviousSession")
	}
	if req.SessionID == "" {
		return h.refuseInput(w, r, http.StatusBadRequest, "invalid_request", "sessionId is required")
	}
	if err := guard.CheckWidgetSessionID(req.SessionID); err != nil {
		return h.refuseInput(w, r, http.StatusBadRequest, "invalid_request", guard.WithField(err, "sessionId").Error())
	}
	site := requestSite(r)
	id := widgetSessionID(site, req.SessionID)
	if req.Action == "loadPreviousSession" {
		return h.widgetHistory(w, r, id)
	}
	if req.ChatInput == nil {
		return h.refuseInput(w, r, http.StatusBadRequest, "invalid_request", "chatInput is required")
	}
	return h.widgetSend(w, r, site, id, req)
}

// widgetSessionID names a widget conversation: the same sessionId from two
// sites is two conversations, and no widget id can equal a visitor
// session's id (those are 26 base32 characters without a prefix).
func widgetSessionID(site, sessionID string) string {
	sum := sha256.Sum256([]byte(site + "\x00" + sessionID))
	return "w_" + base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:20])
}

// langchainMessage is the serialisation @n8n/chat reads back: it looks at
// whether id contains "HumanMessage", and at kwargs.content.
type langchainMessage struct {
	LC     int            `json:"lc"`
	Type   string         `json:"type"`
	ID     []string       `json:"id"`
	Kwargs map[string]any `json:"kwargs"`
}

func toLangchain(m sessions.Message) langchainMessage {
	kwargs := map[string]any{"content": m.Content, "additional_kwargs": map[string]any{}, "response_metadata": map[string]any{}}
	kind := "HumanMessage"
	if m.Role == sessions.RoleAssistant {
		kind = "AIMessage"
		kwargs["tool_calls"] = []any{}
		kwargs["invalid_tool_calls"] = []any{}
	}
	return langchainMessage{LC: 1, Type: "constructor", ID: []string{"langchain_core", "messages", kind}, Kwargs: kwargs}
}

// widgetHistory answers loadPreviousSession from the store; unknown or
// ended conversations are simply empty.
func (h *Handler) widgetHistory(w http.ResponseWriter, r *http.Request, id string) error {
	if !h.rateLimit(w, r, ipKey(r)) {
		return nil
	}
	data := []langchainMessage{}
	s, err := h.cfg.Store.GetSession(r.Context(), id)
	switch {
	case errors.Is(err, sessions.ErrNotFound):
	case err != nil:
		return h.storeError(w, r, "load widget session", err)
	case s.Kind == sessions.KindWidget && s.Active(h.now()):
		page, err := h.cfg.Store.ListMessages(r.Context(), id, "", widgetHistoryLimit)
		if err != nil {
			return h.storeError(w, r, "list widget messages", err)
		}
		for _, m := range page.Messages {
			// A reply that failed before any text has nothing to show.
			if m.Content != "" {
				data = append(data, toLangchain(m))
			}
		}
	}
	return writeJSON(w, http.StatusOK, map[string]any{"data": data})
}

func (h *Handler) widgetSend(w http.ResponseWriter, r *http.Request, site, id string, req widgetRequest) error {
	xl, w := h.beginExchange(w, metrics.RouteWidget, id, site)
	defer h.endExchange(r, xl)
	s, err := h.cfg.Store.GetSession(r.Context(), id)
	isNew := errors.Is(err, sessions.ErrNotFound)
	if err != nil && !isNew {
		return h.storeError(w, r, "load widget session", err)
	}
	keys := []guard.Key{ipKey(r), {Tier: guard.TierSession, ID: id}, {Tier: guard.TierDomain, ID: site}}
	if isNew {
		// A new conversation costs what creating a session costs.
		keys = append(keys, guard.Key{Tier: guard.TierCreate, ID: guard.IPKeyID(clientIP(r))})
	}
	// Refuse bad input before a conversation is created for it.
	ex, bad := h.checkChatInput(*req.ChatInput, req.Metadata, "", "chatInput", "metadata")
	if bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	if !h.rateLimit(w, r, keys...) {
		return nil
	}
	if s, err = h.ensureWidgetSession(r, s, site, id); err != nil {
		return h.storeError(w, r, "create widget session", err)
	}
	ex.attach(s)
	h.track(ex, xl)
	signals := guard.BotSignals{
		UserAgent:    r.Header.Get("User-Agent"),
		Message:      ex.message,
		SessionID:    id,
		FirstMessage: s.MessageCount == 0,
	}
	if !isNew {
		signals.SessionCreated = s.CreatedAt
	}
	verdict := h.scoreBot(r, xl, signals)
	if verdict.Action == guard.ActionReject {
		return h.writeError(w, r, http.StatusForbidden, "rejected", "the message was refused by the spam and bot filter")
	}
	if !h.storeUserMessage(w, r, ex) {
		return nil
	}
	reply, err := h.send(r, ex, id)
	if err != nil {
		return h.upstreamFailed(w, r, ex, err)
	}
	defer reply.Close()
	if !widgetStreaming(r.Header.Get("Accept")) {
		return h.relayWidgetJSON(w, r, ex, reply)
	}
	nw := streaming.NewNDJSONWriter(w, streaming.Options{KeepaliveInterval: h.cfg.KeepaliveInterval, Batch: true})
	return h.streamReply(nw, r, ex, reply)
}

// widgetStreaming reports whether the widget runs in streaming mode, where
// it sends Accept: text/plain and reads NDJSON lines.
func widgetStreaming(accept string) bool {
	for part := range strings.SplitSeq(accept, ",") {
		if mt, _, err := mime.ParseMediaType(strings.TrimSpace(part)); err == nil && mt == "text/plain" {
			return true
		}
	}
	return false
}

// ensureWidgetSession returns the conversation for a widget sessionId,
// creating it on first use and restarting it when it ended; an active one
// slides its expiry forward.
func (h *Handler) ensureWidgetSession(r *http.Request, s *sessions.Session, site, id string) (*sessions.Session, error) {
	ctx := r.Context()
	now := h.now()
	ttl := h.cfg.Sessions.TTL
	if s != nil && s.Kind == sessions.KindWidget && s.Active(now) {
		if err := h.cfg.Store.TouchSession(ctx, id, now, now.Add(ttl)); err != nil && !errors.Is(err, sessions.ErrNotFound) {
			return nil, err
		}
		return s, nil
	}
	if s != nil {
		// Ended: its history is gone for the visitor; start afresh under
		// the same sessionId.
		if err := h.cfg.Store.DeleteSession(ctx, id); err != nil && !errors.Is(err, sessions.ErrNotFound) {
			return nil, err
		}
	}
	created, _, err := h.cfg.Sessions.Create(ctx, sessions.NewSession{
		Kind:        sessions.KindWidget,
		ID:          id,
		Site:        site,
		UserAgent:   truncate(r.Header.Get("User-Agent"), 512),
		ClientIP:    clientIP(r),
		Fingerprint: guard.Fingerprint(r),
	})
	if errors.Is(err, sessions.ErrExists) {
		// Two first messages raced; use the one that won.
		return h.cfg.Store.GetSession(ctx, id)
	}
	if err == nil {
		h.cfg.Metrics.SessionCreated(metrics.KindWidget, site)
	}
	return created, err
}

// relayWidgetJSON answers the widget's non-streaming mode: {"output": …}.
func (h *Handler) relayWidgetJSON(w http.ResponseWriter, r *http.Request, ex *exchange, reply interface {
	ReadAll() (string, error)
}) error {
	text, err := reply.ReadAll()
	if err != nil {
		return h.relayJSONFailed(w, r, ex, text, err)
	}
	h.storeReply(r, ex, text, sessions.StatusComplete)
	return writeJSON(w, http.StatusOK, map[string]string{"output": text})
}
