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
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/signed"
)

// pushRequest is the body of POST {prefix}/sessions/{id}/messages: a
// message, a change of mode, or both (the mode is set first).
type pushRequest struct {
	Content *string `json:"content"`
	// Role is assistant (the default: the bot speaking, e.g. a later
	// branch of a long workflow) or agent (a person).
	Role string `json:"role"`
	Mode string `json:"mode"`
	// SessionID, when present, must be the path's: it binds the signature
	// to the session (the path is not signed), and makes the same push to
	// two sessions in one second two signatures rather than a replay.
	SessionID string `json:"session_id"`
}

// pushResponse answers a push: the stored message (201), or only the
// session's mode (200) when the push set only that.
type pushResponse struct {
	SessionID string          `json:"session_id"`
	Mode      string          `json:"mode"`
	Message   *historyMessage `json:"message,omitempty"`
}

// The events a push publishes to the session's events streams (see
// events.go): a stored message, or the session's new mode.
const (
	eventMessage = "message"
	eventMode    = "mode"
)

// pushedEvent is what travels through the events hub.
type pushedEvent struct {
	Event string          `json:"event"`
	ID    string          `json:"id,omitempty"` // a message's id
	Data  json.RawMessage `json:"data"`
}

// pushMessage adds a message to a visitor's conversation, or hands the
// conversation to a person and back, for a caller that proves it holds
// push_secret (a signed request, see package signed). It is a
// server-to-server route: no origin or CSRF rule applies, the signature
// is the only key. The order of checks keeps anything unsigned from
// costing more than the headers' check, and nothing is stored before
// every check passed.
func (h *Handler) pushMessage(w http.ResponseWriter, r *http.Request, sessionID string) error {
	v := h.cfg.Push
	if v == nil {
		return h.writeError(w, r, http.StatusNotFound, "not_found", "pushing messages is not enabled (push_secret is not set)")
	}
	if r.Header.Get(signed.HeaderTimestamp) == "" || r.Header.Get(signed.HeaderSignature) == "" {
		return h.writeError(w, r, http.StatusUnauthorized, "unauthorized",
			"the request must be signed with push_secret (X-Chatproxy-Timestamp and X-Chatproxy-Signature headers)")
	}
	if r.ContentLength > h.cfg.MaxBodySize {
		return h.writeBadBody(w, r, tooLarge(h.cfg.MaxBodySize))
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.cfg.MaxBodySize))
	if err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			return h.writeBadBody(w, r, tooLarge(h.cfg.MaxBodySize))
		}
		return h.writeError(w, r, http.StatusBadRequest, "invalid_request", "could not read the request body")
	}
	if err := v.Verify(r.Context(), r.Header, body); err != nil {
		if errors.Is(err, signed.ErrUnavailable) {
			h.cfg.Logger.Error("checking a push signature for replay", zap.Error(err))
			w.Header().Set("Retry-After", "1")
			return h.writeError(w, r, http.StatusServiceUnavailable, "unavailable", "the signature could not be checked; try again")
		}
		// The path is anyone's to make, as long as a URL: a bounded prefix.
		h.cfg.Logger.Info("push refused", zap.String("session_id", truncate(sessionID, 64)), zap.String("reason", err.Error()))
		return h.writeError(w, r, http.StatusUnauthorized, "invalid_signature", err.Error())
	}
	req, bad := h.readPush(body)
	if bad == nil && req.SessionID != "" && req.SessionID != sessionID {
		bad = inputError(errors.New("session_id does not match the session in the path"))
	}
	if bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	s, err := h.cfg.Store.GetSession(r.Context(), sessionID)
	if errors.Is(err, sessions.ErrNotFound) || err == nil && !s.Active(h.now()) {
		return h.writeError(w, r, http.StatusNotFound, "not_found", "no such session")
	}
	if err != nil {
		return h.pushStoreError(w, r, req, "get session", err)
	}
	resp := pushResponse{SessionID: s.ID, Mode: s.Mode}
	if req.Mode != "" {
		if err := h.cfg.Store.SetSessionMode(r.Context(), s.ID, req.Mode); err != nil {
			if errors.Is(err, sessions.ErrNotFound) {
				return h.writeError(w, r, http.StatusNotFound, "not_found", "no such session")
			}
			return h.pushStoreError(w, r, req, "set session mode", err)
		}
		resp.Mode = req.Mode
		data, _ := json.Marshal(map[string]string{"mode": req.Mode})
		h.publish(r, s.ID, pushedEvent{Event: eventMode, Data: data})
	}
	if req.Content == nil {
		return writeJSON(w, http.StatusOK, resp)
	}
	m := &sessions.Message{SessionID: s.ID, Role: req.Role, Content: *req.Content, Status: sessions.StatusComplete}
	if err := h.cfg.Store.AppendMessage(r.Context(), m); err != nil {
		if errors.Is(err, sessions.ErrNotFound) {
			return h.writeError(w, r, http.StatusNotFound, "not_found", "no such session")
		}
		return h.pushStoreError(w, r, req, "store pushed message", err)
	}
	hm := toHistoryMessage(*m)
	resp.Message = &hm
	data, _ := json.Marshal(hm)
	h.publish(r, s.ID, pushedEvent{Event: eventMessage, ID: m.ID, Data: data})
	return writeJSON(w, http.StatusCreated, resp)
}

// pushStoreError answers a push the store failed, which stored no
// message. When the body names its session_id, the signature (accepted
// and remembered) is given up again, so that the caller's retry of the
// same request is not refused as a replay (a mode already set is set once
// more, which changes nothing). Without session_id the signature is not
// bound to the path's session, and one given up could be sent to another
// session by whoever saw it: it stays used, and the retry is signed anew.
func (h *Handler) pushStoreError(w http.ResponseWriter, r *http.Request, req *pushRequest, what string, err error) error {
	if req.SessionID != "" {
		if ferr := h.cfg.Push.Forget(context.WithoutCancel(r.Context()), r.Header); ferr != nil {
			h.cfg.Logger.Warn("giving up the signature of a failed push; its retry must be signed again", zap.Error(ferr))
		}
	}
	return h.storeError(w, r, what, err)
}

// readPush decodes and checks a push's body.
func (h *Handler) readPush(body []byte) (*pushRequest, *errBadBody) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 || body[0] != '{' {
		return nil, &errBadBody{http.StatusBadRequest, "invalid_json", "the request body must be a JSON object"}
	}
	if !utf8.Valid(body) {
		return nil, &errBadBody{http.StatusBadRequest, "invalid_json", "the request body is not valid UTF-8"}
	}
	var req pushRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return nil, inputError(errors.New("field " + typeErr.Field + " has the wrong type"))
		}
		return nil, &errBadBody{http.StatusBadRequest, "invalid_json", "the request body is not valid JSON with the fields content, role, mode and session_id"}
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, &errBadBody{http.StatusBadRequest, "invalid_json", "the request body has data after the JSON object"}
	}
	switch req.Mode {
	case "", sessions.ModeBot:
	case sessions.ModeHuman:
		if h.cfg.HandoffURL == "" {
			return nil, inputError(errors.New("mode human needs handoff_webhook, which is not configured"))
		}
	default:
		return nil, inputError(errors.New(`mode must be "bot" or "human"`))
	}
	if req.Content == nil {
		if req.Mode == "" {
			return nil, inputError(errors.New("content or mode is required"))
		}
		if req.Role != "" {
			return nil, inputError(errors.New("role needs content"))
		}
		return &req, nil
	}
	switch req.Role {
	case "":
		req.Role = sessions.RoleAssistant
	case sessions.RoleAssistant, sessions.RoleAgent:
	default:
		return nil, inputError(errors.New(`role must be "assistant" or "agent"`))
	}
	if len(bytes.TrimSpace([]byte(*req.Content))) == 0 {
		return nil, inputError(errors.New("content must not be empty"))
	}
	if n := utf8.RuneCountInString(*req.Content); n > h.cfg.MaxMessageLength {
		return nil, &errBadBody{http.StatusRequestEntityTooLarge, "message_too_long",
			"content is longer than max_message_length (" + strconv.Itoa(h.cfg.MaxMessageLength) + " characters)"}
	}
	return &req, nil
}

// publish hands an event to the session's open events streams. The event
// is stored already: a page that misses it live gets it from history.
func (h *Handler) publish(r *http.Request, sessionID string, ev pushedEvent) {
	if h.cfg.Events == nil {
		return
	}
	payload, _ := json.Marshal(ev)
	if err := h.cfg.Events.Publish(r.Context(), sessionID, payload); err != nil {
		h.cfg.Logger.Warn("publishing a pushed event; open pages get it when they reconnect",
			zap.String("session_id", sessionID), zap.String("event", ev.Event), zap.Error(err))
	}
}

// toHistoryMessage is a stored message as the history and the events
// stream show it.
func toHistoryMessage(m sessions.Message) historyMessage {
	return historyMessage{
		ID:          m.ID,
		Role:        m.Role,
		Content:     m.Content,
		CreatedAt:   m.CreatedAt.UTC().Format(time.RFC3339Nano),
		Status:      m.Status,
		Attachments: storedAttachments(m.Metadata),
	}
}
