package handler

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"
	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

// DefaultWaitTimeout is how long the proxy keeps a waiting execution alive
// (acking n8n's heartbeats) after the visitor's socket went away.
const DefaultWaitTimeout = 10 * time.Minute

// socketWriteTimeout bounds one frame written to either side: a peer that
// stops reading must not stall the other direction.
const socketWriteTimeout = 15 * time.Second

// closeReasonMax is the longest close reason a frame can carry.
const closeReasonMax = 123

// isWebSocketUpgrade reports whether r asks for a WebSocket (RFC 6455
// handshake over HTTP/1.1).
func isWebSocketUpgrade(r *http.Request) bool {
	return r.Method == http.MethodGet &&
		httpguts.HeaderValuesContainsToken(r.Header["Connection"], "upgrade") &&
		httpguts.HeaderValuesContainsToken(r.Header["Upgrade"], "websocket")
}

// chatSocket serves the @n8n/chat widget's WebSocket (chat_socket, /chat
// by default), the one n8n's "Using Response Nodes" mode talks over. n8n's
// own socket checks nothing, and execution ids are sequential, so the
// proxy lets through only an upgrade that carries the resume token it gave
// this widget for this (sessionId, executionId), from an allowed Origin,
// while the token is fresh. Nothing of a refused request reaches n8n:
//
//   - not a WebSocket upgrade: not the socket's (ServeHTTP passes it to
//     the next handler, never to n8n, which would answer 500 and leave the
//     execution waiting forever);
//   - no Origin, or one that is neither allowed nor the site's own: 403;
//   - no token, a forged, altered or expired one, or one for another
//     session, execution or site: 403.
func (h *Handler) chatSocket(w http.ResponseWriter, r *http.Request) error {
	setSecurityHeaders(w.Header())
	if origin := r.Header.Get("Origin"); origin == "" || !h.originAllowed(r, origin) {
		h.cfg.Metrics.GuardRefused(metrics.RefusalOrigin)
		h.cfg.Metrics.SocketUpgradeRefused(metrics.UpgradeOrigin)
		return h.writeError(w, r, http.StatusForbidden, "origin_not_allowed", "this origin may not open the chat socket")
	}
	q := r.URL.Query()
	c, err := parseSocketToken(h.cfg.SocketKey, q.Get("token"), h.now())
	if err == nil && (c.Site != requestSite(r) || c.SessionID != q.Get("sessionId") || c.ExecutionID != q.Get("executionId")) {
		err = errSocketTokenInvalid
	}
	if err != nil {
		h.cfg.Metrics.GuardRefused(metrics.RefusalInput)
		h.cfg.Metrics.SocketUpgradeRefused(metrics.UpgradeToken)
		return h.writeError(w, r, http.StatusForbidden, "forbidden", err.Error())
	}
	storeID := c.storeID()
	keys := []guard.Key{ipKey(r), {Tier: guard.TierSession, ID: storeID}, {Tier: guard.TierDomain, ID: c.Site}}
	if c.User != "" {
		keys = append(keys, guard.Key{Tier: guard.TierUser, ID: h.userTierID(c.User)})
	}
	if !h.rateLimit(w, r, keys[0]) {
		if w.Header().Get("Retry-After") != "" { // a 429, not a limiter failure
			h.cfg.Metrics.SocketUpgradeRefused(metrics.UpgradeRateLimited)
		}
		return nil
	}
	// The Origin was checked above, against allowed_origins.
	visitor, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		h.cfg.Logger.Debug("chat socket handshake failed", zap.Error(err))
		return nil
	}
	maxRunes := h.cfg.MaxMessageLength
	if maxRunes <= 0 {
		maxRunes = 4000 // the module's default
	}
	// readVisitor refuses a frame over the cap itself (1009, counted); the
	// library's limit, one byte more, only keeps it from reading further.
	limit := socketFrameLimit(maxRunes, h.cfg.Uploads)
	visitor.SetReadLimit(limit + 1)
	h.cfg.Metrics.SocketOpened()
	rl := &socketRelay{
		h: h, claims: c, storeID: storeID, keys: keys, maxRunes: maxRunes, frameLimit: limit,
		visitor: visitor, attached: true,
		log: h.cfg.Logger.With(zap.String("session_id", storeID), zap.String("execution_id", c.ExecutionID)),
	}
	rl.run(context.WithoutCancel(r.Context()))
	return nil
}

// socketFrameLimit is the largest frame the widget may send: a
// sendMessage answer with the message JSON-escaped (at most 6 bytes a
// rune) and the other fields, and, when uploads are on, the most files
// the uploads block allows as base64 data URLs. A larger frame closes the
// socket with 1009 before it is read whole.
func socketFrameLimit(maxRunes int, uploads *upload.Parser) int64 {
	n := int64(6*maxRunes + 4096)
	if uploads != nil {
		n += uploads.MaxDataFilesSize()
	}
	return n
}

// uploadCloseCode is the close code of files refused over the socket:
// 1009 (message too big) for a file or files over the size limits, 1008
// (policy violation) for the rest.
func uploadCloseCode(e *upload.Error) websocket.StatusCode {
	if e.Reason == upload.ReasonTooLarge || e.Reason == upload.ReasonTotal {
		return websocket.StatusMessageTooBig
	}
	return websocket.StatusPolicyViolation
}

// socketAttachments is the stored answer's metadata: the files'
// names, types, sizes and hashes, as the multipart route keeps them (nil
// when there are none).
func socketAttachments(files []upload.Info) json.RawMessage {
	if len(files) == 0 {
		return nil
	}
	out := make([]attachment, len(files))
	for i, f := range files {
		out[i] = attachment{Name: f.Name, Type: f.Type, Size: f.Size, SHA256: f.SHA256}
	}
	b, _ := json.Marshal(map[string][]attachment{"attachments": out})
	return b
}

// socketRelay joins one widget socket to n8n's socket for the same
// execution. Frames pass unchanged both ways; the proxy speaks only when
// the visitor has gone (it acks n8n's heartbeats until wait_timeout, so
// that n8n does not cancel the execution) and when it closes a side.
type socketRelay struct {
	h          *Handler
	log        *zap.Logger
	claims     socketClaims
	storeID    string      // the widget conversation's session id
	keys       []guard.Key // the visitor's rate-limit keys: ip, session, domain (and user)
	maxRunes   int
	frameLimit int64 // the largest frame the visitor may send
	visitor    *websocket.Conn
	up         *websocket.Conn
	closed     sync.Once // the visitor's socket has ended and is counted

	mu        sync.Mutex
	endReason string // why the visitor's socket ends (metrics.Socket*), first cause only
	attached  bool   // the visitor's socket is open
	ended     bool   // n8n's side ended: nothing starts the wait any more
	shutdown  bool   // the server is exiting
	waitTimer *time.Timer

	n8nDone chan struct{} // closed when readN8n has ended n8n's side
}

// run dials n8n and relays until n8n's side ends: n8n closed it (the
// execution finished or failed), the wait for a visitor who left ran out,
// or the server is exiting. It returns once both sides are closed.
func (rl *socketRelay) run(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	up, err := rl.h.cfg.Upstream.DialChat(ctx, rl.claims.SessionID, rl.claims.ExecutionID, rl.claims.N8nToken)
	if err != nil {
		rl.log.Warn("n8n chat socket unreachable", zap.Error(err))
		rl.setEnd(metrics.SocketN8nUnreachable)
		_ = rl.visitor.Close(websocket.StatusInternalError, "the chat service cannot be reached")
		rl.visitorClosed()
		return
	}
	rl.up = up
	_, stopWatch := rl.h.cfg.Drain.watchFunc(rl.serverExiting)
	defer stopWatch()
	visitorDone := make(chan struct{})
	rl.n8nDone = make(chan struct{})
	go func() {
		defer close(visitorDone)
		rl.readVisitor(ctx)
	}()
	rl.readN8n(ctx)
	close(rl.n8nDone)
	rl.mu.Lock()
	if rl.waitTimer != nil {
		rl.waitTimer.Stop()
	}
	rl.mu.Unlock()
	<-visitorDone
}

// readN8n relays n8n's frames to the visitor and stores its messages.
func (rl *socketRelay) readN8n(ctx context.Context) {
	for {
		typ, data, err := rl.up.Read(ctx)
		if err != nil {
			rl.n8nEnded(err)
			return
		}
		kind, text := n8nMessage, ""
		if typ == websocket.MessageText {
			kind, text = classifyN8nFrame(data)
		}
		if !rl.isAttached() {
			switch kind {
			case n8nHeartbeat:
				rl.writeN8n(ctx, []byte(frameHeartbeatAck))
			case n8nHeartbeatJSON:
				rl.writeN8n(ctx, []byte(jsonHeartbeatAck))
			}
		}
		if kind == n8nMessage && text != "" {
			rl.store(sessions.RoleAssistant, text, nil)
		}
		if rl.isAttached() {
			wctx, cancel := context.WithTimeout(ctx, socketWriteTimeout)
			err := rl.visitor.Write(wctx, typ, data)
			cancel()
			if err != nil {
				rl.detach()
			} else {
				rl.h.cfg.Metrics.SocketFrameRelayed(metrics.ToVisitor)
			}
		}
	}
}

// n8nEnded passes n8n's close on to the visitor: a normal close (1005
// after a successful execution, or 1000) as 1000; a dropped connection
// (n8n terminates the socket of a failed or cancelled execution) as 1011;
// n8n's other codes (1008 for an unknown execution) as they are.
func (rl *socketRelay) n8nEnded(err error) {
	code, reason := websocket.StatusInternalError, "the chat service ended the conversation"
	why := metrics.SocketN8nError
	var ce websocket.CloseError
	switch {
	case errors.As(err, &ce) && (ce.Code == websocket.StatusNoStatusRcvd || ce.Code == websocket.StatusNormalClosure):
		code, reason, why = websocket.StatusNormalClosure, "", metrics.SocketN8nClosed
	case errors.As(err, &ce) && ce.Code != websocket.StatusAbnormalClosure && ce.Code != websocket.StatusTLSHandshake:
		code, reason = ce.Code, ce.Reason
	}
	rl.mu.Lock()
	if rl.attached && !rl.shutdown && rl.endReason == "" {
		rl.endReason = why
	}
	rl.ended = true
	attached, shutdown := rl.attached, rl.shutdown
	rl.attached = false
	rl.mu.Unlock()
	_ = rl.up.CloseNow()
	rl.log.Debug("n8n chat socket ended", zap.Int("n8n_close", int(websocket.CloseStatus(err))), zap.Bool("visitor_attached", attached))
	switch {
	case shutdown:
		// serverExiting closes the visitor's side.
	case attached:
		_ = rl.visitor.Close(code, truncate(reason, closeReasonMax))
	default:
		_ = rl.visitor.CloseNow()
	}
}

// readVisitor checks the visitor's frames and relays the valid ones; the
// first invalid one closes the visitor's socket (1008) and is not sent.
// When the visitor's socket ends, the proxy waits for it no more than
// wait_timeout.
func (rl *socketRelay) readVisitor(ctx context.Context) {
	defer rl.visitorClosed()
	defer rl.detach()
	for {
		typ, data, err := rl.readFrame(ctx)
		if errors.Is(err, errFrameTooBig) {
			rl.refuse(metrics.SocketFrameTooBig, websocket.StatusMessageTooBig, err.Error())
			return
		}
		if err != nil {
			return
		}
		if typ != websocket.MessageText {
			rl.refuse(metrics.SocketBinaryFrame, websocket.StatusUnsupportedData, "only text frames are accepted")
			return
		}
		f, err := checkVisitorFrame(data, rl.claims.SessionID, rl.maxRunes, rl.h.cfg.Uploads)
		var ue *upload.Error
		switch {
		case errors.As(err, &ue):
			rl.h.cfg.Metrics.UploadRefused(string(ue.Reason))
			rl.refuse(metrics.SocketUploadRefused, uploadCloseCode(ue), ue.Message)
			return
		case err != nil:
			rl.h.cfg.Metrics.GuardRefused(metrics.RefusalInput)
			rl.refuse(metrics.SocketInvalidFrame, websocket.StatusPolicyViolation, err.Error())
			return
		}
		if !f.ack {
			d, err := rl.h.cfg.Limiter.Allow(ctx, rl.keys...)
			if err == nil && !d.Allowed {
				rl.h.cfg.Metrics.RateLimited(string(d.Tier))
				rl.refuse(metrics.SocketRateLimited, websocket.StatusTryAgainLater, "rate limit exceeded; try again later")
				return
			}
			if err != nil {
				rl.log.Error("rate limiter failed", zap.Error(err))
			}
			rl.h.cfg.Metrics.UploadsAccepted(len(f.files))
			// Stored before n8n sees it, as every visitor message is; of
			// the files, what the multipart route keeps.
			if !rl.store(sessions.RoleUser, f.chatInput, socketAttachments(f.files)) {
				rl.refuse(metrics.SocketStoreFailed, websocket.StatusInternalError, "the message could not be stored; try again")
				return
			}
		}
		if !rl.writeN8n(ctx, data) {
			// n8n's side is ending, not the visitor's: readN8n learns why
			// and closes the visitor's socket with n8n's code. Returning at
			// once would detach the visitor as if they had left, and that
			// close would become a dropped connection.
			<-rl.n8nDone
			return
		}
		rl.h.cfg.Metrics.SocketFrameRelayed(metrics.ToN8n)
	}
}

// errFrameTooBig is the refusal of a visitor frame over the size cap.
var errFrameTooBig = errors.New("the frame is larger than this server accepts")

// readFrame reads the visitor's next frame whole, up to frameLimit bytes;
// a larger one is errFrameTooBig (and is not read further).
func (rl *socketRelay) readFrame(ctx context.Context) (websocket.MessageType, []byte, error) {
	typ, r, err := rl.visitor.Reader(ctx)
	if err != nil {
		return 0, nil, err
	}
	data, err := io.ReadAll(io.LimitReader(r, rl.frameLimit+1))
	if err != nil {
		return 0, nil, err
	}
	if int64(len(data)) > rl.frameLimit {
		return 0, nil, errFrameTooBig
	}
	return typ, data, nil
}

// setEnd records why the visitor's socket ends, unless a cause is known.
func (rl *socketRelay) setEnd(reason string) {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.endReason == "" {
		rl.endReason = reason
	}
}

// visitorClosed counts the end of the visitor's socket, once: by the
// first cause recorded, else as the visitor leaving.
func (rl *socketRelay) visitorClosed() {
	rl.closed.Do(func() {
		rl.mu.Lock()
		reason := rl.endReason
		rl.mu.Unlock()
		if reason == "" {
			reason = metrics.SocketVisitorLeft
		}
		rl.h.cfg.Metrics.SocketClosed(reason)
	})
}

func (rl *socketRelay) writeN8n(ctx context.Context, data []byte) bool {
	wctx, cancel := context.WithTimeout(ctx, socketWriteTimeout)
	defer cancel()
	return rl.up.Write(wctx, websocket.MessageText, data) == nil
}

// refuse closes the visitor's socket with code, counted as why; n8n's
// side then waits as for a visitor who left.
func (rl *socketRelay) refuse(why string, code websocket.StatusCode, reason string) {
	rl.setEnd(why)
	rl.detach()
	_ = rl.visitor.Close(code, truncate(reason, closeReasonMax))
}

func (rl *socketRelay) isAttached() bool {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	return rl.attached
}

// detach marks the visitor gone and gives the execution wait_timeout
// before n8n's side is closed.
func (rl *socketRelay) detach() {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if !rl.attached || rl.ended {
		rl.attached = false
		return
	}
	rl.attached = false
	wait := rl.h.cfg.WaitTimeout
	if wait <= 0 {
		wait = DefaultWaitTimeout
	}
	rl.log.Debug("visitor left the chat socket; keeping the execution alive", zap.Duration("wait_timeout", wait))
	rl.waitTimer = time.AfterFunc(wait, func() {
		_ = rl.up.Close(websocket.StatusNormalClosure, "the visitor left")
	})
}

// serverExiting ends both sides with a closing frame (1001) when Caddy
// exits.
func (rl *socketRelay) serverExiting() {
	rl.mu.Lock()
	rl.shutdown = true
	if rl.attached && rl.endReason == "" {
		rl.endReason = metrics.SocketShutdown
	}
	attached := rl.attached
	rl.attached = false
	rl.mu.Unlock()
	var wg sync.WaitGroup
	if attached {
		wg.Go(func() { _ = rl.visitor.Close(websocket.StatusGoingAway, "the server is shutting down") })
	}
	_ = rl.up.Close(websocket.StatusGoingAway, "the proxy is shutting down")
	wg.Wait()
}

// store records a message of the conversation, detached from the
// request, with its metadata (nil: none); it reports whether the message
// was stored.
func (rl *socketRelay) store(role, text string, meta json.RawMessage) bool {
	h := rl.h
	timeout := h.cfg.ReplyStoreTimeout
	if timeout <= 0 {
		timeout = DefaultReplyStoreTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var err error
	if role == sessions.RoleUser {
		_, err = h.cfg.Store.AppendUserMessage(ctx, &sessions.Message{
			SessionID: rl.storeID, Content: text, Status: sessions.StatusComplete, Metadata: meta,
		}, sessions.KindWidget)
	} else {
		id, idErr := uuid.NewV7()
		if idErr != nil {
			return false
		}
		err = h.cfg.Store.AppendMessage(ctx, &sessions.Message{
			ID: id.String(), SessionID: rl.storeID, Role: sessions.RoleAssistant,
			Content: text, Status: sessions.StatusComplete,
		})
	}
	if err != nil {
		rl.log.Error("storing a chat socket message", zap.String("role", role), zap.Error(err))
		return false
	}
	return true
}
