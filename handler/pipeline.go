package handler

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

// DefaultReplyStoreTimeout bounds the attempts to store a reply; they run
// detached from the request so a visitor leaving cannot lose it.
const DefaultReplyStoreTimeout = 10 * time.Second

// Backoff between attempts to store a reply.
const (
	replyStoreFirstRetry = 50 * time.Millisecond
	replyStoreMaxRetry   = time.Second
)

// botRefusal is the message of the 403 a message refused by the spam and
// bot filter gets.
const botRefusal = "the message was refused by the spam and bot filter"

// chatRoute is what differs between the chat routes (the chat API and the
// @n8n/chat widget's route): how a request names its session and carries
// its message, and how the reply goes back. The stages themselves, and
// their order, are runExchange's.
type chatRoute interface {
	// name is the route's metrics label (metrics.RouteMessage, …).
	name() string
	// identify names the session the message is for without reading the
	// store, so that the rate limit comes before any database work. On
	// failure it has answered.
	identify(w http.ResponseWriter, r *http.Request) (identity, bool)
	// readMessage reads the message and what came with it.
	readMessage(w http.ResponseWriter, r *http.Request) (messageInput, *errBadBody)
	// loadSession returns the session the message is stored in: read,
	// taken from the token, or created. It runs after the rate limit and
	// may set the exchange's bot-filter facts (tokenFingerprint,
	// newConversation). On failure it has answered.
	loadSession(w http.ResponseWriter, r *http.Request, ex *exchange) (*sessions.Session, bool)
	// replyFormat chooses how n8n's reply is relayed to the client.
	replyFormat(r *http.Request) replyFormat
}

// identity is the session a message is for, as far as it is known before
// the store is read: what the rate limit and the exchange's log need.
type identity struct {
	sessionID string
	site      string
	userKey   string // the user tier's key (see userTierID); empty when anonymous
}

// rateLimitKeys are the keys a chat message counts against: ip, session
// and domain, and user for a verified visitor.
func (id identity) rateLimitKeys(r *http.Request) []guard.Key {
	keys := []guard.Key{ipKey(r), {Tier: guard.TierSession, ID: id.sessionID}, {Tier: guard.TierDomain, ID: id.site}}
	if id.userKey != "" {
		keys = append(keys, guard.Key{Tier: guard.TierUser, ID: id.userKey})
	}
	return keys
}

// messageInput is what a chat request carries besides its session, as the
// route read it; checkMessage validates it.
type messageInput struct {
	message      string
	messageField string // the field named in an error: message or chatInput
	extra        json.RawMessage
	extraField   string // context or metadata
	pageURL      string
	honeypot     string // the API's hidden website field
	// form holds the files of a multipart message (nil for JSON); its
	// spool is removed when the exchange ends.
	form *upload.Form
}

// exchange is one message of a visitor and n8n's reply to it, as it goes
// through runExchange.
type exchange struct {
	session     *sessions.Session
	message     string
	metadata    json.RawMessage // forwarded to n8n as metadata
	stored      json.RawMessage // stored with the user message
	pageURL     string
	ownPageURL  bool // pageURL came with the message, not from the session
	assistantID string
	honeypot    string
	files       []*upload.File // sent to n8n with the message
	// userMessage is the visitor's message as stored.
	userMessage *sessions.Message
	// user is the verified user the request itself proved (the widget's
	// metadata); nil: the session's, if any (see verifiedUser).
	user *sessions.User

	// For the bot filter, set by the route's loadSession.
	tokenFingerprint string // the visitor token's fingerprint claim
	newConversation  bool   // the session was created for this message

	// findSession, set by a loadSession that assumed the session exists
	// rather than read it, finds (or creates) it when the user message's
	// insert finds none; on failure it has answered.
	findSession func(w http.ResponseWriter, r *http.Request) (*sessions.Session, bool)
	// slide, set for a conversation whose expiry moves with its visitor's
	// activity, is written with the reply (one commit for both).
	slide bool

	xl *exchangeLog // its metrics and log line

	// responseNodes: the route carries on n8n's executionStarted answers
	// (see responseNodesRoute).
	responseNodes bool

	// live, for a route whose replies can be resumed and stopped, is the
	// reply's live record (live.go); its row is stored as streaming with
	// the user message and finished by storeReply.
	live *liveReply
	// waiting is the execution the session waited on, taken for this
	// message (see waitingRoute).
	waiting *sessions.Waiting
}

// responseNodesRoute is a chat route that can carry on n8n's "Using
// Response Nodes" mode: n8n answers {"executionStarted":true,…} and the
// conversation goes on over a WebSocket.
type responseNodesRoute interface {
	// carriesResponseNodes reports whether the route does so under this
	// configuration.
	carriesResponseNodes() bool
	// executionStarted answers the client for a started execution.
	executionStarted(w http.ResponseWriter, r *http.Request, ex *exchange, st *n8n.ExecutionStarted) error
}

// waitingRoute is a responseNodesRoute whose sessions can wait on an
// execution for the visitor's next message (socketapi.go).
type waitingRoute interface {
	// takeWaiting claims the execution the session waits on, if any, into
	// ex.waiting; on failure it has answered.
	takeWaiting(w http.ResponseWriter, r *http.Request, ex *exchange) bool
	// resumeWaiting sends the stored message to that execution and
	// answers with what follows.
	resumeWaiting(w http.ResponseWriter, r *http.Request, ex *exchange) error
}

// runExchange carries one visitor message to n8n and n8n's reply back. The
// chat API (chat.go) and the @n8n/chat route (widget.go) both run it; rt
// supplies what differs (see chatRoute), the relay formats are in
// relay.go. The stages, in order:
//
//  1. identify (rt): the session the message is for, from the visitor
//     token or the widget's sessionId, without the store.
//  2. readMessage (rt), then checkMessage: the message and its extras,
//     refused with 400 when invalid; a multipart message's files are
//     checked and spooled here (readForm), so a refused upload reaches
//     neither the store nor n8n, and an accepted one counts against the
//     rate limit like any message.
//  3. rateLimit: the ip, session and domain tiers, before any store
//     access, so a flood costs no database work.
//  4. loadSession (rt): the session row (a new widget conversation is
//     created here, charging the create tier first).
//  5. screenBot: the spam and bot filter (403, or the honeypot's answer).
//  6. storeUserMessage: the message is stored before n8n is called, so
//     nothing accepted is lost (503 when the store is down). A
//     conversation a person has taken over (human mode) stops here: the
//     message goes to the handoff webhook instead (handOff, handoff.go).
//     A route whose replies can be resumed (resumableRoute) registers the
//     reply as live first and stores its row, as streaming, in the same
//     statement (live.go).
//  7. send: to n8n; upstreamFailed answers a failure before any text.
//  8. relay: the reply in the route's format (relaySSE, relayNDJSON,
//     relayResponseJSON, relayOutputJSON).
//  9. storeReply: what arrived, with its status; then the answer is
//     finished (a JSON body is written only after the reply is stored).
func (h *Handler) runExchange(w http.ResponseWriter, r *http.Request, rt chatRoute) error {
	id, ok := rt.identify(w, r)
	if !ok {
		return nil
	}
	xl, w := h.beginExchange(w, rt.name(), id.sessionID, id.site)
	defer h.endExchange(r, xl)
	in, bad := rt.readMessage(w, r)
	if bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	defer func() { _ = in.form.RemoveAll() }()
	ex, bad := h.checkMessage(in)
	if bad != nil {
		return h.writeBadBody(w, r, bad)
	}
	h.track(ex, xl)
	if !h.rateLimit(w, r, id.rateLimitKeys(r)...) {
		return nil
	}
	s, ok := rt.loadSession(w, r, ex)
	if !ok {
		return nil
	}
	ex.attach(s)
	format := rt.replyFormat(r)
	switch h.screenBot(r, ex).Action {
	case guard.ActionReject:
		return h.writeError(w, r, http.StatusForbidden, "rejected", botRefusal)
	case guard.ActionHoneypot:
		return format.honeypot(w, ex)
	}
	srt, responseNodes := rt.(responseNodesRoute)
	ex.responseNodes = responseNodes && srt.carriesResponseNodes()
	wrt, resumes := rt.(waitingRoute)
	if ex.responseNodes && resumes && !wrt.takeWaiting(w, r, ex) {
		return nil
	}
	if rr, ok := rt.(resumableRoute); ok && rr.resumable() {
		ex.live = h.beginLive(r, ex)
		defer ex.live.close()
	}
	if !h.storeUserMessage(w, r, ex) {
		if ex.waiting != nil {
			h.putBackWaiting(r, ex.session.ID, ex.waiting)
		}
		return nil
	}
	if ex.session.Mode == sessions.ModeHuman {
		if ex.waiting != nil {
			// A person answers now; the workflow goes on waiting.
			h.putBackWaiting(r, ex.session.ID, ex.waiting)
		}
		return h.handOff(w, r, ex, format)
	}
	if ex.waiting != nil {
		// The workflow waits for this answer: it resumes, nothing new
		// starts.
		return wrt.resumeWaiting(w, r, ex)
	}
	reply, err := h.send(r, ex)
	if err != nil && ex.live != nil && ex.live.stopped.Load() {
		// Stopped before n8n's first byte.
		h.storeReply(r, ex, "", sessions.StatusPartial)
		return format.stopped(w, ex)
	}
	if err != nil {
		return h.upstreamFailed(w, r, ex, err)
	}
	defer reply.Close()
	if st := reply.Started(); st != nil {
		// The workflow's messages come over the chat socket, where they
		// are stored; the POST's answer holds none.
		h.noteReplyEnded(ex, "", sessions.StatusComplete)
		return srt.executionStarted(w, r, ex, st)
	}
	res := format.relay(w, r, ex, reply)
	h.storeReply(r, ex, res.text, res.status)
	return res.finish()
}

// checkMessage validates a message and its extras and prepares the
// exchange. Text is kept verbatim apart from newline normalisation.
func (h *Handler) checkMessage(in messageInput) (*exchange, *errBadBody) {
	text, err := guard.NormalizeMessage(in.message, h.cfg.MaxMessageLength)
	if err != nil {
		return nil, inputError(guard.WithField(err, in.messageField))
	}
	extra := in.extra
	if err := guard.CheckObject(extra, guard.ObjectLimits{}); err != nil {
		return nil, inputError(guard.WithField(err, in.extraField))
	}
	if in.pageURL != "" {
		if err := guard.CheckPageURL(in.pageURL); err != nil {
			return nil, inputError(guard.WithField(err, "page_url"))
		}
	}
	if string(extra) == "null" {
		extra = nil
	}
	ex := &exchange{message: text, metadata: extra, pageURL: in.pageURL, ownPageURL: in.pageURL != "", honeypot: in.honeypot}
	// The user message keeps what came with it, for the operator's record:
	// of files, their names, types, sizes and hashes, never their bytes.
	stored := map[string]json.RawMessage{}
	if in.form != nil && len(in.form.Files) > 0 {
		ex.files = in.form.Files
		stored["attachments"], _ = json.Marshal(attachments(ex.files))
	}
	if len(extra) > 0 {
		stored[in.extraField] = extra
	}
	if in.pageURL != "" {
		b, _ := json.Marshal(in.pageURL)
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

// verifiedUser is the user n8n is told about: the one the request proved,
// else the session's (a visitor session created with a proof), else nil.
func (ex *exchange) verifiedUser() *sessions.User {
	if ex.user != nil {
		return ex.user
	}
	if ex.session != nil {
		return ex.session.User
	}
	return nil
}

func inputError(err error) *errBadBody {
	return &errBadBody{http.StatusBadRequest, "invalid_request", err.Error()}
}

// screenBot asks the bot filter about the exchange's message.
func (h *Handler) screenBot(r *http.Request, ex *exchange) guard.Verdict {
	s := ex.session
	signals := guard.BotSignals{
		Honeypot:           ex.honeypot,
		UserAgent:          r.Header.Get("User-Agent"),
		Message:            ex.message,
		SessionID:          s.ID,
		FirstMessage:       s.MessageCount == 0,
		TokenFingerprint:   ex.tokenFingerprint,
		RequestFingerprint: guard.Fingerprint(r),
	}
	if !ex.newConversation {
		// A session this request created is as young as can be: the
		// fast-first-message signal would always fire.
		signals.SessionCreated = s.CreatedAt
	}
	return h.scoreBot(r, ex.xl, signals)
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

// storeUserMessage records the visitor's message before n8n is called: a
// message that cannot be stored is refused (503), so nothing is accepted
// that is then lost. The same statement confirms the session is active and
// returns it as stored, which the exchange then uses.
func (h *Handler) storeUserMessage(w http.ResponseWriter, r *http.Request, ex *exchange) bool {
	m := &sessions.Message{
		SessionID: ex.session.ID,
		Content:   ex.message,
		Status:    sessions.StatusComplete,
		Metadata:  ex.stored,
	}
	var (
		s   *sessions.Session
		err error
	)
	if ex.live != nil {
		s, err = h.cfg.Store.AppendExchange(r.Context(), m, &sessions.Message{ID: ex.assistantID}, ex.session.Kind)
	} else {
		s, err = h.cfg.Store.AppendUserMessage(r.Context(), m, ex.session.Kind)
	}
	if errors.Is(err, sessions.ErrNotFound) && ex.findSession != nil {
		// The session was assumed, not read: find or create it, then
		// store the message in it.
		found, ok := ex.findSession(w, r)
		if !ok {
			return false
		}
		ex.findSession = nil
		ex.attach(found)
		return h.storeUserMessage(w, r, ex)
	}
	switch {
	case err == nil:
		ex.attach(s)
		ex.userMessage = m
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

// send forwards the message to n8n under the session's id. With
// on_client_disconnect finish the upstream request outlives the client's;
// it is still bounded by the client's own timeouts (max_stream_duration).
func (h *Handler) send(r *http.Request, ex *exchange) (*n8n.Reply, error) {
	ctx := r.Context()
	switch {
	case ex.live != nil:
		ctx = ex.live.ctx // cancelled by a stop or the detached timeout
	case h.cfg.FinishOnDisconnect:
		ctx = context.WithoutCancel(ctx)
	}
	start := time.Now()
	reply, err := h.cfg.Upstream.Send(ctx, &n8n.Request{
		SessionID:     ex.session.ID,
		Message:       ex.message,
		Metadata:      ex.metadata,
		OriginDomain:  ex.session.Site,
		PageURL:       ex.pageURL,
		ClientIP:      clientIP(r),
		UserAgent:     r.Header.Get("User-Agent"),
		MessageCount:  ex.session.MessageCount, // counts the message just stored
		Files:         upstreamFiles(ex.files),
		ResponseNodes: ex.responseNodes,
		User:          upstreamUser(ex.verifiedUser()),
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
	if ue.Code != n8n.CodeCanceled {
		ex.live.error(ue.Code, ue.Message) // for a resumed stream
	}
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

// storeReply records n8n's reply. It runs detached from the request's
// cancellation: a visitor who left still finds the reply (or what arrived
// of it) in the history. A failed write (the database restarting, a
// connection cut) is tried again until ReplyStoreTimeout, so a short
// outage loses no reply; the reply keeps its id, so an attempt whose
// commit went through unacknowledged makes the next one find it stored.
//
// A live reply (ex.live) gets its end event, then its streaming row is
// finished with the text, the status and the events' boundaries.
func (h *Handler) storeReply(r *http.Request, ex *exchange, text, status string) {
	var metadata json.RawMessage
	if ex.live != nil {
		text, metadata = ex.live.finish(text)
	}
	h.noteReplyEnded(ex, text, status)
	timeout := h.cfg.ReplyStoreTimeout
	if timeout <= 0 {
		timeout = DefaultReplyStoreTimeout
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), timeout)
	defer cancel()
	if ex.slide {
		// Sent beside the reply, so that both go in one commit.
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() { h.slideSession(ctx, ex.session.ID) })
	}
	wait := replyStoreFirstRetry
	for attempt := 1; ; attempt++ {
		m := &sessions.Message{
			ID:        ex.assistantID,
			SessionID: ex.session.ID,
			Role:      sessions.RoleAssistant,
			Content:   text,
			Status:    status,
			Metadata:  metadata,
		}
		var err error
		if ex.live != nil {
			err = h.cfg.Store.FinishReply(ctx, m)
		} else {
			err = h.cfg.Store.AppendMessage(ctx, m)
		}
		switch {
		case err == nil, errors.Is(err, sessions.ErrNotFound):
			return // stored, or the visitor deleted the session meanwhile
		case errors.Is(err, sessions.ErrExists) && attempt > 1:
			return // an earlier attempt was committed
		}
		// A fresh id taken, or data the store refuses (ErrInvalidData):
		// the same attempt would fail the same way, so it is not retried.
		giveUp := errors.Is(err, sessions.ErrExists) || errors.Is(err, sessions.ErrInvalidData)
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
