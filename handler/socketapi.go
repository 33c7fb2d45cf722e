package handler

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/streaming"
)

// n8n's "Using Response Nodes" mode on the chat API (/chat/message and
// /chat/stream as SSE). n8n answers the message with executionStarted and
// the workflow's Chat nodes talk over n8n's chat WebSocket, which the
// proxy opens itself (the visitor never sees it):
//
//   - each bot message goes into the visitor's SSE stream as a reply of
//     its own (begin with the stored message_id, item, end) and is stored;
//     the proxy answers n8n's heartbeats;
//   - an approval (Send and Wait with buttons) adds a buttons event to its
//     message; the stream stays open while the workflow waits for a
//     button, whose link (served through the proxy, see webhookWaiting)
//     resumes it, and what follows comes in the same stream;
//   - a message n8n does not follow with "continue" within continueGrace
//     waits for the visitor (Send and Wait for Response, free text): the
//     stream ends with {"type":"waiting"} and [DONE], and the session
//     records the execution (Store.SetWaiting). The visitor's next message,
//     on any instance, takes the record and resumes the execution over a
//     new socket: the message goes to n8n as the sendMessage frame the
//     widget would send, and n8n's answers come in that message's stream;
//   - meanwhile the socket that saw the wait holds the execution: it
//     answers n8n's heartbeats (n8n cancels an execution whose socket stops
//     answering for 60 s) for wait_timeout, then closes. It ends earlier
//     when n8n closes it, and when the execution goes on elsewhere: a
//     resumed execution makes n8n send "continue" to it too, and the record
//     it set is then no longer its own (Store.ClearWaiting).
//
// n8n keys its sockets by (sessionId, executionId, isPublic set or not),
// and a second socket under a key still open breaks both (n8n terminates
// the old one, whose close handler then removes the new one's entry), so
// the resuming socket uses the key the holder did not (Waiting.Integrated).

// continueGrace is how long after a bot message the proxy waits for n8n's
// "continue" before taking the workflow to wait for the visitor. n8n sends
// the two back to back, in the same poll.
const continueGrace = 1500 * time.Millisecond

// socketReadyTimeout bounds the wait for n8n's first heartbeat on a new
// socket: n8n listens for the visitor's frames only from then on (a frame
// sent earlier is lost), so a resumed execution's answer waits for it.
const socketReadyTimeout = 15 * time.Second

// sseWaiting is the event that ends a stream whose workflow waits for the
// visitor's answer.
var sseWaiting = map[string]string{"type": "waiting"}

// buttonsEvent is the SSE event of an approval message, inside its begin
// and end: the buttons as n8n sent them (text, link, type primary or
// secondary); block_user_input says the workflow takes no typed answer.
type buttonsEvent struct {
	Type           string           `json:"type"` // "buttons"
	MessageID      string           `json:"message_id"`
	Buttons        []n8n.ChatButton `json:"buttons"`
	BlockUserInput bool             `json:"block_user_input"`
}

// carriesResponseNodes: the SSE forms carry n8n's executionStarted
// answers; a client that accepts only JSON gets n8n's refusal as before.
func (a *apiChat) carriesResponseNodes() bool { return !a.asJSON }

// executionStarted relays a started execution's messages over n8n's chat
// socket into the SSE stream.
func (a *apiChat) executionStarted(w http.ResponseWriter, r *http.Request, ex *exchange, st *n8n.ExecutionStarted) error {
	return a.h.relayExecution(w, r, ex, n8n.ChatDial{
		SessionID: ex.session.ID, ExecutionID: st.ExecutionID, ResumeToken: st.ResumeToken,
	}, "")
}

// takeWaiting claims the execution the session waits on, if any: the
// message then resumes it (resumeWaiting) instead of starting another.
// A wait for buttons only is put back, and the message refused with 409
// before it is stored. On failure it has answered.
func (a *apiChat) takeWaiting(w http.ResponseWriter, r *http.Request, ex *exchange) bool {
	h := a.h
	wt, err := h.cfg.Store.TakeWaiting(r.Context(), ex.session.ID, h.now())
	switch {
	case errors.Is(err, sessions.ErrNotFound):
		return true
	case err != nil:
		_ = h.storeError(w, r, "take waiting execution", err)
		return false
	case wt.Blocked:
		h.putBackWaiting(r, ex.session.ID, wt)
		_ = h.writeError(w, r, http.StatusConflict, "awaiting_button",
			"the workflow waits for one of its buttons to be used, not for a message")
		return false
	}
	ex.waiting = wt
	return true
}

// putBackWaiting restores a record taken for a message that then did not
// go to n8n.
func (h *Handler) putBackWaiting(r *http.Request, sessionID string, wt *sessions.Waiting) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 5*time.Second)
	defer cancel()
	if err := h.cfg.Store.SetWaiting(ctx, sessionID, *wt); err != nil && !errors.Is(err, sessions.ErrNotFound) {
		h.cfg.Logger.Error("putting back a waiting execution", zap.String("session_id", sessionID), zap.Error(err))
	}
}

// resumeWaiting sends the visitor's message to the execution it waits on
// and relays what follows.
func (a *apiChat) resumeWaiting(w http.ResponseWriter, r *http.Request, ex *exchange) error {
	wt := ex.waiting
	frame, err := answerFrame(ex)
	if err != nil {
		a.h.cfg.Logger.Error("reading the files of an answer", zap.Error(err))
		a.h.putBackWaiting(r, ex.session.ID, wt)
		a.h.storeReply(r, ex, "", sessions.StatusError)
		return a.h.writeError(w, r, http.StatusInternalServerError, "internal_error", "the message could not be forwarded")
	}
	return a.h.relayExecution(w, r, ex, n8n.ChatDial{
		SessionID: ex.session.ID, ExecutionID: wt.ExecutionID, ResumeToken: wt.ResumeToken,
		Integrated: !wt.Integrated,
	}, frame)
}

// socketFile is a file of an answer over n8n's socket, as the @n8n/chat
// widget sends it (Input.vue reads each file as a data URL).
type socketFile struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Data string `json:"data"`
}

// answerFrame is the visitor's message as the sendMessage frame the
// widget sends over n8n's socket: the files of a multipart message (already
// checked by the uploads block) as base64 data URLs.
func answerFrame(ex *exchange) (string, error) {
	files := make([]socketFile, 0, len(ex.files))
	for _, f := range ex.files {
		rc, err := f.Open()
		if err != nil {
			return "", err
		}
		var b strings.Builder
		b.WriteString("data:" + f.Type + ";base64,")
		enc := base64.NewEncoder(base64.StdEncoding, &b)
		_, err = io.Copy(enc, rc)
		_ = rc.Close()
		if err == nil {
			err = enc.Close()
		}
		if err != nil {
			return "", err
		}
		files = append(files, socketFile{Name: f.Name, Type: f.Type, Data: b.String()})
	}
	frame, err := json.Marshal(struct {
		SessionID string       `json:"sessionId"`
		Action    string       `json:"action"`
		ChatInput string       `json:"chatInput"`
		Files     []socketFile `json:"files"`
	}{ex.session.ID, "sendMessage", ex.message, files})
	return string(frame), err
}

// relayExecution opens the SSE stream, then n8n's chat socket for the
// execution (sending answer, the visitor's sendMessage frame, once n8n
// listens), and relays until the stream ends; the socket may go on
// holding the execution after that (see apiSocket).
func (h *Handler) relayExecution(w http.ResponseWriter, r *http.Request, ex *exchange, dial n8n.ChatDial, answer string) error {
	h.cfg.Metrics.StreamStarted()
	defer h.cfg.Metrics.StreamEnded()
	sw := streaming.NewSSEWriter(w, streaming.Options{KeepaliveInterval: h.cfg.KeepaliveInterval})
	sw.Header().Set(streaming.MessageIDHeader, ex.assistantID)
	if ex.xl != nil {
		ex.xl.streamed = true
	}
	s := &apiSocket{
		h: h, sessionID: ex.session.ID, dial: dial,
		log:    h.cfg.Logger.With(zap.String("session_id", ex.session.ID), zap.String("execution_id", dial.ExecutionID)),
		frames: make(chan socketEvent, 16),
		ready:  make(chan struct{}),
		done:   make(chan struct{}),
		stop:   make(chan struct{}),
		reload: make(chan struct{}),
	}
	sk := &sseSink{sw: sw, ctx: r.Context(), done: make(chan struct{}), openID: ex.assistantID}
	s.sink = sk
	s.firstRow, s.firstStreaming = ex.assistantID, ex.live != nil
	s.live = ex.live
	_, stopWatch := h.cfg.Drain.watchFunc(func() { s.stopOnce.Do(func() { close(s.stop) }) })
	if !h.sockets.add(s) {
		// The handler is being cleaned up (a reload): nothing new starts.
		stopWatch()
		_ = sw.Error(CodeServerShutdown, shutdownMessage)
		_ = sw.Done()
		h.storeBotMessage(s.log, ex.session.ID, ex.assistantID, "", nil, sessions.StatusError, ex.live != nil)
		return nil
	}
	clientGone := sw.Start() != nil
	conn, err := h.cfg.Upstream.DialChatWith(context.WithoutCancel(r.Context()), dial)
	if err != nil {
		stopWatch()
		h.sockets.remove(s)
		var ue *n8n.Error
		if errors.As(err, &ue) {
			h.logUpstreamError(ex, ue)
		}
		s.log.Warn("n8n chat socket unreachable", zap.Error(err))
		h.noteReplyEnded(ex, "", sessions.StatusError)
		h.storeBotMessage(s.log, ex.session.ID, ex.assistantID, "", nil, sessions.StatusError, ex.live != nil)
		if ex.waiting != nil {
			// The execution still waits: the visitor may try again.
			h.putBackWaiting(r, ex.session.ID, ex.waiting)
		}
		if !clientGone {
			_ = sw.Error(n8n.CodeUnavailable, "The chat service cannot be reached right now. Please try again in a moment.")
		}
		_ = sw.Done()
		return nil
	}
	s.conn = conn
	go s.read()
	go func() {
		defer stopWatch()
		defer h.sockets.remove(s)
		s.run(answer)
	}()
	<-sk.done
	if sk.firstStatus == "" {
		sk.firstStatus = sessions.StatusPartial // the visitor left before it
	}
	h.noteReplyEnded(ex, sk.firstText, sk.firstStatus)
	return nil
}

// sseSink is the visitor's stream while it is attached to an apiSocket.
type sseSink struct {
	sw   *streaming.SSEWriter
	ctx  context.Context // the visitor's request
	done chan struct{}   // closed when the socket lets the stream go

	openID string // the message whose begin is out and whose end is not ("": none)

	// The first reply (X-Message-ID), for the exchange's log line.
	firstText, firstStatus string
}

// socketEvent is a frame (or the end) of n8n's socket, from apiSocket.read.
type socketEvent struct {
	frame n8n.ChatFrame
	err   error // the socket ended
}

// apiSocket is the proxy's own socket to n8n for one execution of a chat
// API conversation: while a visitor's stream is attached (sink) it relays
// into it; then, while the execution waits for the visitor, it holds it.
type apiSocket struct {
	h         *Handler
	log       *zap.Logger
	sessionID string
	dial      n8n.ChatDial
	conn      *websocket.Conn
	holder    string // the holder id of the waiting record it set, if any

	frames   chan socketEvent // from read
	ready    chan struct{}    // closed at n8n's first heartbeat
	done     chan struct{}    // closed when run returns
	stop     chan struct{}    // closed when Caddy exits (the drain)
	reload   chan struct{}    // closed when the handler is cleaned up
	stopOnce sync.Once

	// live is the first reply's live record (resumable routes): a stop
	// of that reply (POST {prefix}/chat/stop/{id}) ends the stream; nil:
	// none can come.
	live *liveReply

	// Only run's goroutine uses what follows.
	sink     *sseSink
	firstID  string // the reply the visitor's stream opened with, until it is stored
	firstRow string // that reply's id
	// firstStreaming: its row was stored as streaming with the visitor's
	// message, and is finished rather than appended.
	firstStreaming bool
	waiting        bool // the session's waiting record is this socket's
	closeHold      bool // the handler was cleaned up: hold nothing
}

// read reads n8n's frames: heartbeats are answered at once, whatever the
// relay is doing; the rest go to run. It ends when the socket does.
func (s *apiSocket) read() {
	ctx := context.Background()
	first := true
	for {
		typ, data, err := s.conn.Read(ctx)
		if err != nil {
			select {
			case s.frames <- socketEvent{err: err}:
			case <-s.done:
			}
			return
		}
		var f n8n.ChatFrame
		if typ == websocket.MessageText {
			f = n8n.ParseChatFrame(data)
		} else {
			f = n8n.ChatFrame{Kind: n8n.FrameMessage, Text: string(data)}
		}
		switch f.Kind {
		case n8n.FrameHeartbeat, n8n.FrameHeartbeatJSON:
			ack := n8n.FrameHeartbeatAck
			if f.Kind == n8n.FrameHeartbeatJSON {
				ack = n8n.FrameHeartbeatAckRaw
			}
			wctx, cancel := context.WithTimeout(ctx, socketWriteTimeout)
			_ = s.conn.Write(wctx, websocket.MessageText, []byte(ack))
			cancel()
			if first {
				first = false
				close(s.ready)
				continue
			}
		}
		select {
		case s.frames <- socketEvent{frame: f}:
		case <-s.done:
			return
		}
	}
}

// run relays and holds until the socket ends. answer, when set, is sent
// once n8n listens (a resumed execution's message).
func (s *apiSocket) run(answer string) {
	h := s.h
	s.firstID = s.sink.openID
	defer close(s.done)
	defer func() { _ = s.conn.CloseNow() }()
	if answer != "" {
		select {
		case <-s.ready:
			wctx, cancel := context.WithTimeout(context.Background(), socketWriteTimeout)
			err := s.conn.Write(wctx, websocket.MessageText, []byte(answer))
			cancel()
			if err != nil {
				s.fail(n8n.CodeUnavailable, "The chat service cannot be reached right now. Please try again in a moment.")
				return
			}
		case ev := <-s.frames:
			if ev.err != nil || ev.frame.Kind == n8n.FrameError {
				s.ended(ev)
				return
			}
			// n8n spoke before its heartbeat: not n8n's protocol.
			s.fail(n8n.CodeError, "the chat service answered unexpectedly")
			return
		case <-time.After(socketReadyTimeout):
			s.fail(n8n.CodeTimeout, "the chat service did not answer in time")
			return
		case <-s.stop:
			s.shutdown()
			return
		}
	}
	var (
		grace    *time.Timer
		graceC   <-chan time.Time
		holdEnd  *time.Timer
		holdEndC <-chan time.Time
	)
	stopGrace := func() {
		if grace != nil {
			grace.Stop()
			grace, graceC = nil, nil
		}
	}
	holdFor := func(d time.Duration) {
		if holdEnd != nil {
			holdEnd.Stop()
		}
		holdEnd = time.NewTimer(d)
		holdEndC = holdEnd.C
	}
	// wentOn: the execution waited on this socket and goes on (a button
	// was used): a visitor still watching waits for it without a limit
	// again; without one, the socket holds on for wait_timeout at most.
	wentOn := func() {
		if s.sink == nil {
			holdFor(h.waitTimeout())
		} else if holdEnd != nil {
			holdEnd.Stop()
			holdEnd, holdEndC = nil, nil
		}
	}
	defer stopGrace()
	defer func() {
		if holdEnd != nil {
			holdEnd.Stop()
		}
	}()
	var stopC <-chan struct{}
	if s.live != nil {
		// Done on a stop, and also when the exchange's live record is
		// closed or left idle: only a stop counts.
		stopC = s.live.ctx.Done()
	}
	for {
		var clientGone, stopped <-chan struct{}
		if s.sink != nil {
			clientGone = s.sink.ctx.Done()
		}
		if s.firstID != "" {
			stopped = stopC
		}
		select {
		case ev := <-s.frames:
			if ev.err != nil || ev.frame.Kind == n8n.FrameError {
				s.ended(ev)
				return
			}
			f := ev.frame
			switch f.Kind {
			case n8n.FrameHeartbeat, n8n.FrameHeartbeatJSON:
				// Answered already (read); a waiting execution's
				// holder checks it still is one (n8n 2.8.4 sends it
				// nothing when the execution, resumed elsewhere, ends).
				if s.waiting && !s.stillHolding() {
					return
				}
			case n8n.FrameContinue:
				stopGrace()
				if s.waiting {
					if !s.goOn() {
						return
					}
					wentOn()
				}
			case n8n.FrameMessage, n8n.FrameButtons:
				stopGrace()
				if s.waiting {
					if !s.goOn() {
						return
					}
					wentOn()
				}
				s.message(f)
				if f.Kind == n8n.FrameButtons {
					// An approval waits for a button (or, unless
					// blocked, a typed answer): the stream stays open.
					s.setWaiting(f.BlockUserInput)
					holdFor(h.waitTimeout())
				} else {
					grace = time.NewTimer(continueGrace)
					graceC = grace.C
				}
			}
		case <-graceC:
			grace, graceC = nil, nil
			s.setWaiting(false)
			holdFor(h.waitTimeout())
			if s.sink != nil {
				_ = s.sink.sw.Event(sseWaiting)
				s.release(nil)
			}
			if s.closeHold {
				s.closeSocket(websocket.StatusGoingAway, "the proxy is reloading")
				return
			}
		case <-stopped:
			stopC = nil
			if !s.live.stopped.Load() {
				continue
			}
			// The visitor stopped the reply before the workflow's first
			// message: it is stored partial and the stream ends; the
			// workflow goes on (its messages are stored, and published
			// to the events stream) for wait_timeout at most.
			s.store(s.firstID, "", nil, sessions.StatusPartial)
			s.firstID = ""
			if s.sink != nil && s.sink.firstStatus == "" {
				s.sink.firstStatus = sessions.StatusPartial
			}
			s.release(nil)
			if s.closeHold {
				s.closeSocket(websocket.StatusGoingAway, "the proxy is reloading")
				return
			}
			holdFor(h.waitTimeout())
		case <-clientGone:
			s.release(nil)
			if s.closeHold {
				s.closeSocket(websocket.StatusGoingAway, "the proxy is reloading")
				return
			}
			holdFor(h.waitTimeout())
		case <-holdEndC:
			s.log.Debug("waited for the visitor for wait_timeout; closing n8n's chat socket")
			s.clearWaiting()
			if s.sink != nil {
				_ = s.sink.sw.Error("wait_timeout", "The workflow waited too long for an answer.")
				s.release(nil)
			}
			s.closeSocket(websocket.StatusNormalClosure, "wait_timeout")
			return
		case <-s.reload:
			s.closeHold = true
			if s.sink == nil {
				s.closeSocket(websocket.StatusGoingAway, "the proxy is reloading")
				return
			}
		case <-s.stop:
			s.shutdown()
			return
		}
	}
}

// goOn is called when the execution moves on while this socket's waiting
// record is set: a button was used (the record is still this socket's,
// and is cleared), or the visitor's answer resumed it over another socket
// (the record was taken): this one then closes, and goOn returns false.
func (s *apiSocket) goOn() bool {
	ctx, cancel := context.WithTimeout(context.Background(), s.h.storeTimeout())
	defer cancel()
	s.waiting = false
	ours, err := s.h.cfg.Store.ClearWaiting(ctx, s.sessionID, s.holder)
	if err != nil {
		// The store cannot say; n8n's next frames would go to both
		// sockets. Carrying on keeps this conversation's messages.
		s.log.Error("checking the waiting execution", zap.Error(err))
		return true
	}
	if !ours {
		s.log.Debug("execution resumed elsewhere; closing this socket")
		s.release(nil)
		s.closeSocket(websocket.StatusNormalClosure, "")
		return false
	}
	return true
}

// stillHolding reports whether the session's waiting record is still
// this socket's; when it is not (the visitor's answer took it, or the
// session is gone), the socket closes.
func (s *apiSocket) stillHolding() bool {
	ctx, cancel := context.WithTimeout(context.Background(), s.h.storeTimeout())
	defer cancel()
	wt, err := s.h.cfg.Store.GetWaiting(ctx, s.sessionID)
	switch {
	case err == nil && wt.Holder == s.holder:
		return true
	case err != nil && !errors.Is(err, sessions.ErrNotFound):
		s.log.Warn("checking the waiting execution", zap.Error(err))
		return true
	}
	s.waiting = false
	s.log.Debug("the waiting execution went on elsewhere; closing this socket")
	s.release(nil)
	s.closeSocket(websocket.StatusNormalClosure, "")
	return false
}

// message relays a bot message into the stream (if one is attached) and
// stores it.
func (s *apiSocket) message(f n8n.ChatFrame) {
	// The first message is the reply the visitor's stream announced (its
	// begin is out, or the visitor left after it); the others get ids of
	// their own.
	id := s.firstID
	s.firstID = ""
	if id == "" {
		v7, err := uuid.NewV7()
		if err != nil {
			s.log.Error("allocating a message id", zap.Error(err))
			return
		}
		id = v7.String()
	}
	var md json.RawMessage
	if f.Kind == n8n.FrameButtons {
		md, _ = json.Marshal(map[string]any{"buttons": nonNil(f.Buttons), "block_user_input": f.BlockUserInput})
	}
	if sk := s.sink; sk != nil {
		var err error
		if sk.openID != id {
			err = sk.sw.Begin(id)
		}
		sk.openID = id
		if err == nil {
			err = sk.sw.Item(f.Text)
		}
		if err == nil && f.Kind == n8n.FrameButtons {
			err = sk.sw.Event(buttonsEvent{Type: "buttons", MessageID: id, Buttons: nonNil(f.Buttons), BlockUserInput: f.BlockUserInput})
		}
		if err == nil {
			err = sk.sw.End()
		}
		sk.openID = ""
		if sk.firstStatus == "" {
			sk.firstText, sk.firstStatus = f.Text, sessions.StatusComplete
		}
		if err != nil {
			s.release(nil) // the visitor left: hold
		}
	}
	m := s.store(id, f.Text, md, sessions.StatusComplete)
	if s.sink == nil && m != nil {
		// Nobody's stream carries it (the visitor left, or the workflow
		// went on after the wait): a page following the conversation's
		// events stream (push_secret) gets it live.
		s.h.publishBotMessage(s.log, m)
	}
}

// publishBotMessage hands a stored message of the workflow's to the
// conversation's events streams, as a pushed message.
func (h *Handler) publishBotMessage(log *zap.Logger, m *sessions.Message) {
	if h.cfg.Events == nil {
		return
	}
	if m.CreatedAt.IsZero() {
		m.CreatedAt = h.now() // a finished row does not report its time
	}
	hm := toHistoryMessage(*m)
	hm.Buttons = storedButtons(m.Metadata)
	data, _ := json.Marshal(hm)
	payload, _ := json.Marshal(pushedEvent{Event: eventMessage, ID: m.ID, Data: data})
	ctx, cancel := context.WithTimeout(context.Background(), h.storeTimeout())
	defer cancel()
	if err := h.cfg.Events.Publish(ctx, m.SessionID, payload); err != nil {
		log.Warn("publishing a workflow message; open pages get it when they reconnect", zap.Error(err))
	}
}

func nonNil(b []n8n.ChatButton) []n8n.ChatButton {
	if b == nil {
		return []n8n.ChatButton{}
	}
	return b
}

// setWaiting records that the conversation waits on this execution, held
// by this socket.
func (s *apiSocket) setWaiting(blocked bool) {
	h := s.h
	if s.holder == "" {
		id, err := uuid.NewRandom()
		if err != nil {
			s.log.Error("allocating a holder id", zap.Error(err))
			return
		}
		s.holder = id.String()
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.storeTimeout())
	defer cancel()
	err := h.cfg.Store.SetWaiting(ctx, s.sessionID, sessions.Waiting{
		ExecutionID: s.dial.ExecutionID, ResumeToken: s.dial.ResumeToken, Holder: s.holder,
		Integrated: s.dial.Integrated, Blocked: blocked, Until: h.now().Add(h.waitTimeout()),
	})
	if err != nil {
		// The visitor's answer will start a new execution instead.
		s.log.Error("recording the waiting execution", zap.Error(err))
		return
	}
	s.waiting = true
}

// clearWaiting removes this socket's waiting record, if it still is.
func (s *apiSocket) clearWaiting() {
	if !s.waiting {
		return
	}
	s.waiting = false
	ctx, cancel := context.WithTimeout(context.Background(), s.h.storeTimeout())
	defer cancel()
	if _, err := s.h.cfg.Store.ClearWaiting(ctx, s.sessionID, s.holder); err != nil {
		s.log.Warn("clearing the waiting execution", zap.Error(err))
	}
}

// ended handles the end of n8n's socket, or n8n's error frame: a normal
// close (1005 after a successful execution, or 1000) completes the
// stream; anything else is an error event.
func (s *apiSocket) ended(ev socketEvent) {
	s.clearWaiting()
	var ce websocket.CloseError
	normal := ev.err != nil && errors.As(ev.err, &ce) &&
		(ce.Code == websocket.StatusNoStatusRcvd || ce.Code == websocket.StatusNormalClosure)
	if normal {
		if s.firstID != "" {
			// Finished without a message.
			s.store(s.firstID, "", nil, sessions.StatusComplete)
			if s.sink != nil && s.sink.firstStatus == "" {
				s.sink.firstStatus = sessions.StatusComplete
			}
			s.firstID = ""
		}
		s.release(nil)
		return
	}
	msg := "The chat workflow ended the conversation with an error."
	if ev.err == nil && ev.frame.Text != "" {
		s.log.Warn("n8n refused the chat socket", zap.String("n8n_message", truncate(ev.frame.Text, 200)))
	} else {
		s.log.Warn("n8n chat socket ended", zap.Int("n8n_close", int(websocket.CloseStatus(ev.err))), zap.Error(ev.err))
	}
	s.fail(n8n.CodeError, msg)
}

// fail ends the stream with an error event; a first reply still without
// a message is stored with status error.
func (s *apiSocket) fail(code, message string) {
	s.clearWaiting()
	if s.firstID != "" {
		s.store(s.firstID, "", nil, sessions.StatusError)
		s.firstID = ""
	}
	if s.sink != nil && s.sink.firstStatus == "" {
		s.sink.firstStatus = sessions.StatusError
	}
	e := errorEvent{code, message}
	s.release(&e)
	s.closeSocket(websocket.StatusNormalClosure, "")
}

// shutdown ends everything when Caddy exits: the stream with a
// server_shutdown event, n8n's socket with a closing frame (1001). A
// waiting record stays: another instance resumes the execution.
func (s *apiSocket) shutdown() {
	if s.firstID != "" {
		s.store(s.firstID, "", nil, sessions.StatusError)
		s.firstID = ""
		if s.sink != nil && s.sink.firstStatus == "" {
			s.sink.firstStatus = sessions.StatusError
		}
	}
	e := errorEvent{CodeServerShutdown, shutdownMessage}
	s.release(&e)
	s.closeSocket(websocket.StatusGoingAway, "the proxy is shutting down")
}

type errorEvent struct{ code, message string }

// release lets the visitor's stream go: an error event if given, the end
// of an open reply, then [DONE]. The request's goroutine then returns.
func (s *apiSocket) release(e *errorEvent) {
	sk := s.sink
	if sk == nil {
		return
	}
	s.sink = nil
	if e != nil {
		_ = sk.sw.Error(e.code, e.message)
	}
	if sk.openID != "" {
		_ = sk.sw.End()
		sk.openID = ""
	}
	_ = sk.sw.DoneWithoutEnd()
	close(sk.done)
}

func (s *apiSocket) closeSocket(code websocket.StatusCode, reason string) {
	_ = s.conn.Close(code, truncate(reason, closeReasonMax))
}

// store stores a message of the workflow's. The first reply's row may be
// stored already, as streaming, with the visitor's message (a resumable
// route: see live.go): it is then finished.
func (s *apiSocket) store(id, text string, md json.RawMessage, status string) *sessions.Message {
	return s.h.storeBotMessage(s.log, s.sessionID, id, text, md, status, s.firstStreaming && id == s.firstRow)
}

// storeBotMessage stores a message of the workflow's, detached from any
// request, trying again (with the same id) until the store timeout. It
// returns the message as stored, or nil when it was not.
func (h *Handler) storeBotMessage(log *zap.Logger, sessionID, id, text string, md json.RawMessage, status string, finish bool) *sessions.Message {
	ctx, cancel := context.WithTimeout(context.Background(), h.storeTimeout())
	defer cancel()
	wait := replyStoreFirstRetry
	for attempt := 1; ; attempt++ {
		m := &sessions.Message{
			ID: id, SessionID: sessionID, Role: sessions.RoleAssistant, Content: text, Status: status, Metadata: md,
		}
		var err error
		if finish {
			err = h.cfg.Store.FinishReply(ctx, m)
		} else {
			err = h.cfg.Store.AppendMessage(ctx, m)
		}
		switch {
		case err == nil:
			return m
		case errors.Is(err, sessions.ErrNotFound):
			return nil // the visitor deleted the conversation meanwhile
		case errors.Is(err, sessions.ErrExists) && attempt > 1:
			return m // an earlier attempt was committed
		case errors.Is(err, sessions.ErrExists), errors.Is(err, sessions.ErrInvalidData):
			log.Error("storing a workflow message", zap.String("message_id", id), zap.Error(err))
			return nil
		}
		select {
		case <-ctx.Done():
			log.Error("storing a workflow message", zap.String("message_id", id), zap.Int("attempts", attempt), zap.Error(err))
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, replyStoreMaxRetry)
	}
}

func (h *Handler) storeTimeout() time.Duration {
	if h.cfg.ReplyStoreTimeout > 0 {
		return h.cfg.ReplyStoreTimeout
	}
	return DefaultReplyStoreTimeout
}

func (h *Handler) waitTimeout() time.Duration {
	if h.cfg.WaitTimeout > 0 {
		return h.cfg.WaitTimeout
	}
	return DefaultWaitTimeout
}

// socketSet is the handler's apiSockets, so that a cleanup (a reload, or
// Caddy exiting) can end the ones holding executions.
type socketSet struct {
	mu     sync.Mutex
	m      map[*apiSocket]struct{}
	closed bool
	wg     sync.WaitGroup
}

func (ss *socketSet) add(s *apiSocket) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.closed {
		return false
	}
	if ss.m == nil {
		ss.m = map[*apiSocket]struct{}{}
	}
	ss.m[s] = struct{}{}
	ss.wg.Add(1)
	return true
}

func (ss *socketSet) remove(s *apiSocket) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if _, ok := ss.m[s]; ok {
		delete(ss.m, s)
		ss.wg.Done()
	}
}

// CloseSockets is the module's Cleanup part for the chat API's n8n
// sockets: those holding a waiting execution close now with a closing
// frame (1001), their records staying for another instance (or the new
// config) to resume; those relaying into a visitor's stream finish it,
// like streams on a reload, and then hold nothing. It waits up to timeout
// for the holding ones to be gone.
func (h *Handler) CloseSockets(timeout time.Duration) {
	ss := &h.sockets
	ss.mu.Lock()
	if !ss.closed {
		ss.closed = true
		for s := range ss.m {
			close(s.reload)
		}
	}
	ss.mu.Unlock()
	done := make(chan struct{})
	go func() {
		ss.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
	}
}

// storedButtons reads the buttons an approval message was stored with.
func storedButtons(meta json.RawMessage) []n8n.ChatButton {
	if len(meta) == 0 {
		return nil
	}
	var m struct {
		Buttons []n8n.ChatButton `json:"buttons"`
	}
	if json.Unmarshal(meta, &m) != nil {
		return nil
	}
	return m.Buttons
}
