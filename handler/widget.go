package handler

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/json"
	"errors"
	"mime"
	"net/http"
	"strings"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/upload"
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
	var req widgetRequest
	var form *upload.Form
	if upload.IsMultipart(r.Header.Get("Content-Type")) {
		// allowFileUploads: the same fields as form fields (metadata as
		// JSON text) and one "files" part per file; refused with 415
		// when the uploads block is absent.
		var bad *errBadBody
		if form, bad = h.readForm(w, r); bad != nil {
			return h.writeBadBody(w, r, bad)
		}
		defer func() { _ = form.RemoveAll() }()
		req = widgetFormRequest(form)
	} else if bad := h.readJSON(w, r, &req, false); bad != nil {
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
	user, err := h.widgetUser(r, &req)
	if err != nil {
		return h.refuseIdentity(w, r, err)
	}
	site := requestSite(r)
	id := widgetSessionID(site, req.SessionID, userID(user))
	if req.Action == "loadPreviousSession" {
		return h.widgetHistory(w, r, site, req.SessionID, id, user)
	}
	if req.ChatInput == nil {
		return h.refuseInput(w, r, http.StatusBadRequest, "invalid_request", "chatInput is required")
	}
	return h.runExchange(w, r, &widgetExchange{h: h, site: site, id: id, req: req, form: form, user: user})
}

// widgetFormRequest reads the widget's multipart fields: action, sessionId,
// chatInput and metadata (JSON text, as the widget sends it).
func widgetFormRequest(form *upload.Form) widgetRequest {
	var req widgetRequest
	req.Action, _ = form.Value("action")
	req.SessionID, _ = form.Value("sessionId")
	if v, ok := form.Value("chatInput"); ok {
		req.ChatInput = &v
	}
	req.Metadata = formJSON(form, "metadata")
	return req
}

// widgetSessionID names a widget conversation: the same sessionId from two
// sites is two conversations, and no widget id can equal a visitor
// session's id (those are 26 base32 characters without a prefix). A
// verified user's conversation (userID set) is apart from the anonymous
// one of the same sessionId and from any other user's: holding a
// sessionId is not enough to read or write a verified conversation, and
// a visitor who logs out (the page stops sending the proof) no longer
// sees it. (A verified user's conversation is found by the user, not by
// this name: see widgetUserSession. The name is only the id of one that
// starts on this device.)
func widgetSessionID(site, sessionID, userID string) string {
	key := site + "\x00" + sessionID
	if userID != "" {
		key += "\x00user\x00" + userID
	}
	sum := sha256.Sum256([]byte(key))
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
	extra := map[string]any{}
	if files := storedAttachments(m.Metadata); len(files) > 0 {
		// The widget shows only content; the files (never their bytes)
		// are here for widgets and tools that look.
		extra["attachments"] = files
	}
	kwargs := map[string]any{"content": m.Content, "additional_kwargs": extra, "response_metadata": map[string]any{}}
	kind := "HumanMessage"
	if m.Role == sessions.RoleAssistant || m.Role == sessions.RoleAgent {
		// A person's message (agent) is the bot's side of the chat too.
		kind = "AIMessage"
		kwargs["tool_calls"] = []any{}
		kwargs["invalid_tool_calls"] = []any{}
	}
	return langchainMessage{LC: 1, Type: "constructor", ID: []string{"langchain_core", "messages", kind}, Kwargs: kwargs}
}

// widgetHistory answers loadPreviousSession from the store; unknown or
// ended conversations are simply empty. A verified user's is their
// conversation on the site (widgetUserSession), whichever device it
// started on.
func (h *Handler) widgetHistory(w http.ResponseWriter, r *http.Request, site, sessionID, id string, user *sessions.User) error {
	if !h.rateLimit(w, r, ipKey(r)) {
		return nil
	}
	data := []langchainMessage{}
	var (
		s   *sessions.Session
		err error
	)
	if user != nil {
		if s, err = h.widgetUserSession(r, site, sessionID, user); err != nil {
			return h.storeError(w, r, "find user widget session", err)
		}
	}
	if s != nil {
		id = s.ID
	} else {
		s, err = h.cfg.Store.GetSession(r.Context(), id)
	}
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

// widgetUserSession finds the verified user's @n8n/chat conversation on
// site, as session/create does for the chat API (openSession): the
// anonymous conversation of this browser's sessionId, when it has
// messages, is adopted (it becomes the user's, under a new id, and the
// sessionId alone no longer reaches it); else the user's latest active
// widget conversation on the site is continued, whichever device and
// sessionId it started with. nil: the user has none; one named
// widgetSessionID(site, sessionID, user) starts with the first message.
func (h *Handler) widgetUserSession(r *http.Request, site, sessionID string, user *sessions.User) (*sessions.Session, error) {
	ctx := r.Context()
	anonID := widgetSessionID(site, sessionID, "")
	anon, err := h.cfg.Store.GetSession(ctx, anonID)
	switch {
	case err == nil && anon.Kind == sessions.KindWidget && anon.User == nil && anon.Active(h.now()) && anon.MessageCount > 0:
		s, err := h.cfg.Sessions.AdoptWidget(ctx, anon, sessions.NewSession{
			// Not derived from the sessionId: adopted, the conversation is
			// reached through the user only.
			ID:          "w_" + rand.Text(),
			Site:        site,
			UserAgent:   truncate(r.Header.Get("User-Agent"), 512),
			ClientIP:    clientIP(r),
			Fingerprint: guard.Fingerprint(r),
			User:        user,
		})
		if err == nil {
			return s, nil
		}
		if !errors.Is(err, sessions.ErrNotFound) {
			return nil, err
		}
		// Adopted or ended meanwhile (another tab): go on as without it.
	case err != nil && !errors.Is(err, sessions.ErrNotFound):
		return nil, err
	}
	s, err := h.cfg.Sessions.ResumeWidget(ctx, user, site)
	if errors.Is(err, sessions.ErrNotFound) {
		return nil, nil
	}
	return s, err
}

// widgetExchange is the @n8n/chat route's side of runExchange: the
// widget's sessionId (already checked) names the conversation, the message
// is its chatInput with metadata, and the reply goes back as NDJSON
// (streaming mode) or as {"output": …}.
type widgetExchange struct {
	h        *Handler
	site, id string
	req      widgetRequest
	form     *upload.Form   // the files of a multipart message, or nil
	user     *sessions.User // the user the metadata proved, or nil
}

func (wx *widgetExchange) name() string { return metrics.RouteWidget }

func (wx *widgetExchange) identify(http.ResponseWriter, *http.Request) (identity, bool) {
	return identity{sessionID: wx.id, site: wx.site, userKey: wx.h.userTierID(userID(wx.user))}, true
}

func (wx *widgetExchange) readMessage(http.ResponseWriter, *http.Request) (messageInput, *errBadBody) {
	return messageInput{
		message: *wx.req.ChatInput, messageField: "chatInput",
		extra: wx.req.Metadata, extraField: "metadata",
		form: wx.form,
	}, nil
}

// loadSession returns the conversation. The user message's insert
// confirms that it exists and is active, so unless the bot filter needs
// its facts (age, message count) it is not read: findSession then runs
// only when the insert finds none.
func (wx *widgetExchange) loadSession(w http.ResponseWriter, r *http.Request, ex *exchange) (*sessions.Session, bool) {
	ex.slide = true
	ex.user = wx.user
	if wx.user != nil {
		// The user's conversation, wherever it started (found after the
		// rate limits, like any store work).
		s, err := wx.h.widgetUserSession(r, wx.site, wx.req.SessionID, wx.user)
		if err != nil {
			_ = wx.h.storeError(w, r, "find user widget session", err)
			return nil, false
		}
		if s != nil {
			wx.id = s.ID
		}
	}
	if wx.h.cfg.Bots == nil {
		ex.findSession = func(w http.ResponseWriter, r *http.Request) (*sessions.Session, bool) {
			return wx.findSession(w, r, ex)
		}
		return &sessions.Session{ID: wx.id, Kind: sessions.KindWidget, Site: wx.site, MessageCount: -1, User: wx.user}, true
	}
	return wx.findSession(w, r, ex)
}

// findSession reads the conversation, creating it on first use. A new
// conversation costs what creating a session costs: the create tier is
// charged before the insert, the read having come after the ip, session
// and domain tiers, so a flood of new sessionIds is refused before any
// database work.
func (wx *widgetExchange) findSession(w http.ResponseWriter, r *http.Request, ex *exchange) (*sessions.Session, bool) {
	h := wx.h
	s, err := h.cfg.Store.GetSession(r.Context(), wx.id)
	isNew := errors.Is(err, sessions.ErrNotFound)
	if err != nil && !isNew {
		_ = h.storeError(w, r, "load widget session", err)
		return nil, false
	}
	if isNew && !h.rateLimit(w, r, guard.Key{Tier: guard.TierCreate, ID: guard.IPKeyID(clientIP(r))}) {
		return nil, false
	}
	if s, err = h.ensureWidgetSession(r, s, wx.site, wx.id, wx.user); err != nil {
		_ = h.storeError(w, r, "create widget session", err)
		return nil, false
	}
	ex.newConversation = isNew
	return s, true
}

func (wx *widgetExchange) replyFormat(r *http.Request) replyFormat {
	if widgetStreaming(r.Header.Get("Accept")) {
		return wx.h.relayNDJSON()
	}
	return wx.h.relayOutputJSON()
}

// slideSession records a widget visitor's activity: the conversation's
// expiry moves to a full TTL from now. It goes with the reply's store, in
// the same commit; a failure only costs the conversation that slide.
func (h *Handler) slideSession(ctx context.Context, id string) {
	now := h.now()
	if err := h.cfg.Store.TouchSession(ctx, id, now, now.Add(h.cfg.Sessions.TTL)); err != nil && !errors.Is(err, sessions.ErrNotFound) {
		h.cfg.Logger.Warn("sliding widget session expiry", zap.String("session_id", id), zap.Error(err))
	}
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
// creating it on first use and restarting it when it ended. (An active
// one slides its expiry forward with the reply: see slideSession.)
func (h *Handler) ensureWidgetSession(r *http.Request, s *sessions.Session, site, id string, user *sessions.User) (*sessions.Session, error) {
	ctx := r.Context()
	now := h.now()
	if s != nil && s.Kind == sessions.KindWidget && s.Active(now) {
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
		User:        user,
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

func (wx *widgetExchange) carriesResponseNodes() bool { return wx.h.cfg.ChatSocket != "" }

// executionStarted answers n8n's executionStarted reply as n8n does (JSON,
// in streaming mode too, where the widget then shows nothing), with the
// proxy's resumeToken added: the widget appends it to its socket URL as
// token=, and chatSocket opens the socket only with it. n8n's own
// resumeToken travels inside it.
func (wx *widgetExchange) executionStarted(w http.ResponseWriter, _ *http.Request, _ *exchange, st *n8n.ExecutionStarted) error {
	h := wx.h
	token := signSocketToken(h.cfg.SocketKey, socketClaims{
		Site:        wx.site,
		SessionID:   wx.req.SessionID,
		ExecutionID: st.ExecutionID,
		Expires:     h.now().Add(SocketTokenTTL).Unix(),
		N8nToken:    st.ResumeToken,
		User:        userID(wx.user),
		// A verified user's conversation is not named by the sessionId.
		Conversation: conversationClaim(wx.user, wx.id),
	})
	return writeJSON(w, http.StatusOK, map[string]any{
		"executionStarted": true,
		"executionId":      st.ExecutionID,
		"resumeToken":      token,
	})
}

// conversationClaim is the conversation a verified user's socket token
// names (their conversation's store id); "" for an anonymous widget,
// whose conversation the sessionId names.
func conversationClaim(user *sessions.User, id string) string {
	if user == nil {
		return ""
	}
	return id
}
