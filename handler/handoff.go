package handler

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/signed"
	"github.com/chatproxy/caddy-chatproxy/streaming"
)

// DefaultHandoffTimeout bounds a call to the handoff webhook.
const DefaultHandoffTimeout = 10 * time.Second

// ModeHeader names the session's mode on a chat answer that was handed to
// a person instead of n8n.
const ModeHeader = "X-Chatproxy-Mode"

// handoffFailed is what the visitor is told when the handoff webhook
// could not be reached; their message is stored.
const handoffFailed = "Your message was saved, but it could not be passed on to the person answering. Please try again in a moment."

// handoffPayload is the body of a call to the handoff webhook: the
// visitor's stored message and where it came from.
type handoffPayload struct {
	Event     string         `json:"event"` // always "message"
	SessionID string         `json:"session_id"`
	Site      string         `json:"site"`
	PageURL   string         `json:"page_url,omitempty"`
	Message   historyMessage `json:"message"`
}

// handOff answers a visitor's message in a conversation that a person
// has taken over (human mode): the message, already stored, is sent to
// the handoff webhook instead of n8n, and the visitor gets an empty
// answer in the route's format (the person's reply comes later, pushed;
// see push.go and events.go), marked with X-Chatproxy-Mode: human. When
// the webhook fails the visitor gets 502 handoff_failed; the message
// stays stored.
func (h *Handler) handOff(w http.ResponseWriter, r *http.Request, ex *exchange, format replyFormat) error {
	if ex.xl != nil {
		ex.xl.messageID = "" // no reply is stored
	}
	if err := h.callHandoff(r.Context(), ex); err != nil {
		h.cfg.Logger.Warn("handing a message to handoff_webhook", zap.String("session_id", ex.session.ID), zap.Error(err))
		if ex.xl != nil {
			ex.xl.outcome = metrics.OutcomeError
		}
		return h.writeError(w, r, http.StatusBadGateway, "handoff_failed", handoffFailed)
	}
	w.Header().Set(ModeHeader, sessions.ModeHuman)
	switch f := format.(type) {
	case streamRelay:
		sw := f.newWriter(w, streaming.Options{KeepaliveInterval: -1})
		_ = sw.Start()
		return sw.Done()
	case jsonRelay:
		ex.assistantID = ""
		return writeJSON(w, http.StatusOK, f.body(ex, ""))
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// callHandoff POSTs the exchange's stored message to the handoff webhook,
// signed with push_secret. It outlives the visitor's request (the message
// is stored and should reach the person even if the visitor left), up to
// HandoffTimeout; only a 2xx answer is success, redirects are not
// followed.
func (h *Handler) callHandoff(ctx context.Context, ex *exchange) error {
	if h.cfg.HandoffURL == "" || h.cfg.Push == nil || ex.userMessage == nil {
		return errors.New("no handoff_webhook is configured")
	}
	timeout := h.cfg.HandoffTimeout
	if timeout <= 0 {
		timeout = DefaultHandoffTimeout
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	body, err := json.Marshal(handoffPayload{
		Event:     eventMessage,
		SessionID: ex.session.ID,
		Site:      ex.session.Site,
		PageURL:   ex.pageURL,
		Message:   toHistoryMessage(*ex.userMessage),
	})
	if err != nil {
		return fmt.Errorf("encoding the handoff: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.cfg.HandoffURL, bytes.NewReader(body))
	if err != nil {
		return errors.New("handoff_webhook is not a valid URL")
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "caddy-chatproxy")
	signed.SignRequest(req, h.cfg.Push.Secret, body, time.Now())
	resp, err := h.handoffClient().Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // without the URL, which may hold a token
		}
		return fmt.Errorf("calling handoff_webhook: %w", err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("handoff_webhook answered %d", resp.StatusCode)
	}
	return nil
}

// handoffClient is the configured client, or one that does not follow
// redirects (a redirected POST would arrive as a GET, unsigned).
func (h *Handler) handoffClient() *http.Client {
	if h.cfg.HandoffClient != nil {
		return h.cfg.HandoffClient
	}
	return &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}
