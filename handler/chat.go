package handler

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/streaming"
)

// DefaultReplyStoreTimeout bounds the attempts to store a reply; they run
// detached from the request so a visitor leaving cannot lose it.
const DefaultReplyStoreTimeout = 10 * time.Second

// Backoff between attempts to store a reply.
const (
	replyStoreFirstRetry = 50 * time.Millisecond
	replyStoreMaxRetry   = time.Second
)

// honeypotReply is what a form-filling bot is told: an ordinary-looking
// answer, so it learns nothing, while n8n is never called.
const honeypotReply = "Thanks for your message! We will get back to you soon."

type chatRequest struct {
	Message string          `json:"message"`
	Context json.RawMessage `json:"context"`
	PageURL string          `json:"page_url"`
	// Website is the honeypot: the widget keeps this field hidden and
	// empty, so anything in it was typed by a bot.
	Website string `json:"website"`
}

// exchange is one message of a visitor and n8n's reply to it.
type exchange struct {
	session     *sessions.Session
	message     string
	metadata    json.RawMessage // forwarded to n8n as metadata
	stored      json.RawMessage // stored with the user message
	pageURL     string
	ownPageURL  bool // pageURL came with the message, not from the session
	assistantID string
	xl          *exchangeLog // its metrics and log line; nil when not followed
}

// chatMessage answers POST {prefix}/chat/message: SSE, or one JSON object
// when the client asks for application/json and not for an event stream.
func (h *Handler) chatMessage(w http.ResponseWriter, r *http.Request, _ string) error {
	return h.chat(w, r, wantsJSON(r.Header.Get("Accept")), metrics.RouteMessage)
}

func (h *Handler) chatStreamPost(w http.ResponseWriter, r *http.Request, _ string) error {
	return h.chat(w, r, false, metrics.RouteStream)
}

// chatStreamGet serves EventSource clients, which can only GET and only
// send the cookie; the cookie CSRF rule applies as for any cookie request.
func (h *Handler) chatStreamGet(w http.ResponseWriter, r *http.Request, _ string) error {
	return h.chat(w, r, false, metrics.RouteStream)
}

// wantsJSON reports whether Accept asks for JSON and not for SSE.
func wantsJSON(accept string) bool {
	json, sse := false, false
	for part := range strings.SplitSeq(accept, ",") {
		mt, params, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err != nil || params["q"] == "0" {
			continue
		}
		switch mt {
		case "application/json":
			json = true
		case "text/event-stream":
			sse = true
		}
	}
	return json && !sse
}

func (h *Handler) chat(w http.ResponseWriter, r *http.Request, asJSON bool, route string) error {
	s, claims, ok := h.authenticateMessage(w, r)
	if !ok {
		return nil
	}
	xl, w := h.beginExchange(w, route, s.ID, s.Site)
	defer h.endExchange(r, xl)
	var req chatRequest
	if r.Method == http.MethodGet {
		q := r.URL.Query()
		req.Message, req.PageURL, req.Website = q.Get("message"), q.Get("page_url"), q.Get("website")
	} else if bad := h.readJSON(w, r, &req, false); bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	ex, bad := h.checkChatInput(req.Message, req.Context, req.PageURL, "message", "context")
	if bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	ex.attach(s)
	h.track(ex, xl)
	if !h.rateLimit(w, r, ipKey(r), guard.Key{Tier: guard.TierSession, ID: s.ID}, guard.Key{Tier: guard.TierDomain, ID: s.Site}) {
		return nil
	}
	verdict := h.scoreBot(r, xl, guard.BotSignals{
		Honeypot:           req.Website,
		UserAgent:          r.Header.Get("User-Agent"),
		Message:            ex.message,
		SessionID:          s.ID,
		SessionCreated:     s.CreatedAt,
		FirstMessage:       s.MessageCount == 0,
		TokenFingerprint:   claims.Fingerprint,
		RequestFingerprint: guard.Fingerprint(r),
	})
	switch verdict.Action {
	case guard.ActionReject:
		return h.writeError(w, r, http.StatusForbidden, "rejected", "the message was refused by the spam and bot filter")
	case guard.ActionHoneypot:
		return h.answerHoneypot(w, r, s.ID, asJSON)
	}
	if !h.storeUserMessage(w, r, ex) {
		return nil
	}
	reply, err := h.send(r, ex, s.ID)
	if err != nil {
		return h.upstreamFailed(w, r, ex, err)
	}
	defer reply.Close()
	if asJSON {
		return h.relayJSON(w, r, ex, reply)
	}
	sw := streaming.NewSSEWriter(w, streaming.Options{KeepaliveInterval: h.cfg.KeepaliveInterval, Batch: true})
	return h.streamReply(sw, r, ex, reply)
}

// checkChatInput validates a message and its extras and prepares the
// exchange. Text is kept verbatim apart from newline normalisation.
func (h *Handler) checkChatInput(message string, extra json.RawMessage, pageURL, messageField, extraField string) (*exchange, *errBadBody) {
	text, err := guard.NormalizeMessage(message, h.cfg.MaxMessageLength)
	if err != nil {
		return nil, inputError(guard.WithField(err, messageField))
	}
	if err := guard.CheckObject(extra, guard.ObjectLimits{}); err != nil {
		return nil, inputError(guard.WithField(err, extraField))
	}
	if pageURL != "" {
		if err := guard.CheckPageURL(pageURL); err != nil {
			return nil, inputError(guard.WithField(err, "page_url"))
		}
	}
	if string(extra) == "null" {
		extra = nil
	}
	ex := &exchange{message: text, metadata: extra, pageURL: pageURL, ownPageURL: pageURL != ""}
	// The user message keeps what came with it, for the operator's record.
	stored := map[string]json.RawMessage{}
	if len(extra) > 0 {
		stored[extraField] = extra
	}
	if pageURL != "" {
		b, _ := json.Marshal(pageURL)
		stored["page_url"] = b
	}
	if len(stored) > 0 {
		ex.stored, _ = json.Marshal(stored)
	}
	id, err := uuid.NewV7()
	if err != nil {
		return nil, &errBadBody{http.StatusInternalServerError, "internal_error", "could not allocate a message id"}
	}
	ex.assistantID = id.String()
	return ex, nil
}

// attach binds the exchange to its session; without a page_url of its own
// the message is taken to come from the session's page. It is called again
// with the stored session once the user message is in.
func (ex *exchange) attach(s *sessions.Session) {
	ex.session = s
	if !ex.ownPageURL {
		ex.pageURL = s.PageURL
	}
}

func inputError(err error) *errBadBody {
	return &errBadBody{http.StatusBadRequest, "invalid_request", err.Error()}
}

// scoreBot asks the bot filter about a message. A refusal or a honeypot
// catch is counted per signal and settles the exchange's outcome; its log
// line then carries the score and signals.
func (h *Handler) scoreBot(r *http.Request, xl *exchangeLog, signals guard.BotSignals) guard.Verdict {
	if h.cfg.Bots == nil {
		return guard.Verdict{Action: guard.ActionAllow}
	}
	v := h.cfg.Bots.Score(r.Context(), signals)
	if v.Action == guard.ActionAllow {
		return v
	}
	for _, reason := range v.Reasons {
		h.cfg.Metrics.GuardRefused(string(reason))
	}
	xl.bot = &v
	xl.outcome = metrics.OutcomeRejected
	if v.Action == guard.ActionHoneypot {
		xl.outcome = metrics.OutcomeHoneypot
	}
	return v
}

// answerHoneypot answers a bot like a person, without n8n and without
// storing anything.
func (h *Handler) answerHoneypot(w http.ResponseWriter, r *http.Request, sessionID string, asJSON bool) error {
	id, _ := uuid.NewV7()
	if asJSON {
		return writeJSON(w, http.StatusOK, chatResponse{Response: honeypotReply, SessionID: sessionID, MessageID: id.String()})
	}
	sw := streaming.NewSSEWriter(w, streaming.Options{KeepaliveInterval: -1})
	sw.Header().Set("X-Message-ID", id.String())
	_ = sw.Item(honeypotReply)
	return sw.Done()
}

// storeUserMessage records the visitor's message before n8n is called: a
// message that cannot be stored is refused (503), so nothing is accepted
// that is then lost. The same statement confirms the session is active and
// returns it as stored, which the exchange then uses.
func (h *Handler) storeUserMessage(w http.ResponseWriter, r *http.Request, ex *exchange) bool {
	s, err := h.cfg.Store.AppendUserMessage(r.Context(), &sessions.Message{
		SessionID: ex.session.ID,
		Content:   ex.message,
		Status:    sessions.StatusComplete,
		Metadata:  ex.stored,
	}, ex.session.Kind)
	switch {
	case err == nil:
		ex.attach(s)
		return true
	case errors.Is(err, sessions.ErrNotFound):
		// Revoked, expired or deleted, found by the insert or while this
		// request was under way.
		_ = h.sessionGone(w, r)
	case r.Context().Err() != nil:
		// The client left before the message was stored.
	default:
		_ = h.storeError(w, r, "store user message", err)
	}
	return false
}

// send forwards the message to n8n. With on_client_disconnect finish the
// upstream request outlives the client's; it is still bounded by the
// client's own timeouts (max_stream_duration).
func (h *Handler) send(r *http.Request, ex *exchange, upstreamSessionID string) (*n8n.Reply, error) {
	ctx := r.Context()
	if h.cfg.FinishOnDisconnect {
		ctx = context.WithoutCancel(ctx)
	}
	start := time.Now()
	reply, err := h.cfg.Upstream.Send(ctx, &n8n.Request{
		SessionID:    upstreamSessionID,
		Message:      ex.message,
		Metadata:     ex.metadata,
		OriginDomain: ex.session.Site,
		PageURL:      ex.pageURL,
		ClientIP:     clientIP(r),
		UserAgent:    r.Header.Get("User-Agent"),
		MessageCount: ex.session.MessageCount, // counts the message just stored
	})
	h.noteSent(ex, start, reply, err)
	return reply, err
}

// upstreamFailed answers a failure before any reply text: a plain JSON
// error with n8n's mapped status, and an assistant message with status
// error so the history shows the message went unanswered.
func (h *Handler) upstreamFailed(w http.ResponseWriter, r *http.Request, ex *exchange, err error) error {
	var ue *n8n.Error
	if !errors.As(err, &ue) {
		h.cfg.Logger.Error("sending to n8n", zap.Error(err))
		if ex.xl != nil {
			ex.xl.outcome = metrics.OutcomeError
		}
		h.storeReply(r, ex, "", sessions.StatusError)
		return h.writeError(w, r, http.StatusInternalServerError, "internal_error", "the message could not be forwarded")
	}
	h.logUpstreamError(ex, ue)
	h.storeReply(r, ex, "", sessions.StatusError)
	if ue.Code == n8n.CodeCanceled {
		return nil // the client is gone
	}
	if s := ue.RetryAfterSeconds(); s > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(s))
	}
	return h.writeError(w, r, ue.Status, ue.Code, ue.Message)
}

// logUpstreamError adds n8n's failure to the exchange: its log line then
// carries the code, reason, n8n's status and detail, and the failure is
// counted (see endExchange).
func (h *Handler) logUpstreamError(ex *exchange, ue *n8n.Error) {
	x := ex.xl
	if x == nil {
		return
	}
	x.upstreamErr = ue
	if ue.UpstreamStatus != 0 {
		x.upstreamStatus = ue.UpstreamStatus
	}
}

type chatResponse struct {
	Response  string `json:"response"`
	SessionID string `json:"session_id"`
	MessageID string `json:"message_id"`
}

// relayJSON reads the whole reply and answers it as one JSON object.
// Nothing has been written yet, so a failure is still a plain error.
func (h *Handler) relayJSON(w http.ResponseWriter, r *http.Request, ex *exchange, reply *n8n.Reply) error {
	text, err := reply.ReadAll()
	if err != nil {
		return h.relayJSONFailed(w, r, ex, text, err)
	}
	h.storeReply(r, ex, text, sessions.StatusComplete)
	return writeJSON(w, http.StatusOK, chatResponse{Response: text, SessionID: ex.session.ID, MessageID: ex.assistantID})
}

// relayJSONFailed stores what arrived of a reply that broke off and, since
// nothing was written yet, answers with a plain error.
func (h *Handler) relayJSONFailed(w http.ResponseWriter, r *http.Request, ex *exchange, text string, err error) error {
	status := sessions.StatusError
	if text != "" {
		status = sessions.StatusPartial
	}
	h.storeReply(r, ex, text, status)
	var ue *n8n.Error
	if !errors.As(err, &ue) {
		return h.writeError(w, r, http.StatusBadGateway, n8n.CodeError, "the reply from the chat workflow broke off")
	}
	h.logUpstreamError(ex, ue)
	if ue.Code == n8n.CodeCanceled {
		return nil
	}
	code := ue.Status
	if code < 500 {
		code = http.StatusBadGateway
	}
	return h.writeError(w, r, code, ue.Code, ue.Message)
}

// relayStream writes each reply chunk to the client as it arrives. After
// the first byte a failure can only be reported in the stream: an error
// event, then the end marker. What was relayed is stored with its status.
func (h *Handler) relayStream(sw streaming.Writer, r *http.Request, ex *exchange, reply *n8n.Reply) error {
	sw.Header().Set("X-Message-ID", ex.assistantID)
	// When Caddy exits, the drain closes the reply: the stream then ends
	// with a server_shutdown error event and [DONE], and the partial reply
	// is stored before the drain stops counting this stream.
	shutdown, stopWatch := h.cfg.Drain.watch(reply)
	defer stopWatch()
	defer func() { _ = sw.Done() }() // stops the keepalive timer even on a panic
	// The writer holds items (Options.Batch) until the reply is about to
	// wait for n8n: chunks that arrived together leave in one write, and
	// none is held while n8n is silent.
	reply.OnWait(func() { _ = sw.Flush() })
	var text strings.Builder
	status := sessions.StatusComplete
	clientGone := sw.Start() != nil
	for {
		if clientGone && !h.cfg.FinishOnDisconnect {
			// cancel mode: stop n8n at once, keep what was relayed.
			_ = reply.Close()
			status = sessions.StatusPartial
			if text.Len() == 0 {
				status = sessions.StatusError
			}
			break
		}
		chunk, err := reply.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			status = sessions.StatusPartial
			if text.Len() == 0 {
				status = sessions.StatusError
			}
			var ue *n8n.Error
			if shutdown() {
				if !clientGone {
					_ = sw.Error(CodeServerShutdown, shutdownMessage)
				}
			} else if errors.As(err, &ue) {
				h.logUpstreamError(ex, ue)
				if !clientGone && ue.Code != n8n.CodeCanceled {
					_ = sw.Error(ue.Code, ue.Message)
				}
			} else if !clientGone {
				_ = sw.Error(n8n.CodeError, "the reply from the chat workflow broke off")
			}
			break
		}
		text.WriteString(chunk)
		if clientGone {
			continue // finish mode: read to the end, then store it whole
		}
		if err := sw.Item(chunk); err != nil {
			clientGone = true
		}
	}
	_ = sw.Done()
	h.storeReply(r, ex, text.String(), status)
	return nil
}

// storeReply records n8n's reply. It runs detached from the request's
// cancellation: a visitor who left still finds the reply (or what arrived
// of it) in the history. A failed write (the database restarting, a
// connection cut) is tried again until ReplyStoreTimeout, so a short
// outage loses no reply; the reply keeps its id, so an attempt whose
// commit went through unacknowledged makes the next one find it stored.
func (h *Handler) storeReply(r *http.Request, ex *exchange, text, status string) {
	h.noteReplyEnded(ex, text, status)
	timeout := h.cfg.ReplyStoreTimeout
	if timeout <= 0 {
		timeout = DefaultReplyStoreTimeout
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), timeout)
	defer cancel()
	wait := replyStoreFirstRetry
	for attempt := 1; ; attempt++ {
		err := h.cfg.Store.AppendMessage(ctx, &sessions.Message{
			ID:        ex.assistantID,
			SessionID: ex.session.ID,
			Role:      sessions.RoleAssistant,
			Content:   text,
			Status:    status,
		})
		switch {
		case err == nil, errors.Is(err, sessions.ErrNotFound):
			return // stored, or the visitor deleted the session meanwhile
		case errors.Is(err, sessions.ErrExists) && attempt > 1:
			return // an earlier attempt was committed
		}
		giveUp := errors.Is(err, sessions.ErrExists) // a fresh id taken: not a passing fault
		t := time.NewTimer(wait)
		if !giveUp {
			select {
			case <-ctx.Done():
				giveUp = true
			case <-t.C:
			}
		}
		if giveUp {
			t.Stop()
			h.cfg.Logger.Error("storing assistant reply", zap.String("session_id", ex.session.ID),
				zap.String("message_id", ex.assistantID), zap.String("status", status),
				zap.Int("attempts", attempt), zap.Error(err))
			return
		}
		wait = min(2*wait, replyStoreMaxRetry)
	}
}
