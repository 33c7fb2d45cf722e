package handler

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/replies"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/streaming"
)

// How long the stop route waits for the stopped reply to be stored before
// it answers 202, and how often it looks.
const (
	stopWait      = 5 * time.Second
	stopPollFirst = 20 * time.Millisecond
	stopPollMax   = 250 * time.Millisecond
	stopResend    = time.Second
)

// notLivePoll is how long a resumed stream waits before it looks at the
// store again when the reply is neither live here nor in Redis (it runs on
// another instance without Redis, or its events were trimmed).
const notLivePoll = time.Second

// codeReplyLost is the error event of a reply whose instance went away
// before storing it (found still streaming long after it could run).
const codeReplyLost = "reply_lost"

// ParseEventID reads a resume point: a Last-Event-ID header or an after=
// query value, the decimal id of the last event the client has (0: none,
// from begin). Ids are what this proxy gave, so anything else is refused:
// a sign, spaces, other characters, more than 19 digits.
func ParseEventID(s string) (uint64, error) {
	if s == "" || len(s) > 19 {
		return 0, errors.New("an event id is 1 to 19 digits")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, errors.New("an event id is 1 to 19 digits")
		}
	}
	return strconv.ParseUint(s, 10, 64)
}

// resumePoint is the id the client resumes after: the Last-Event-ID header
// (what EventSource sends when it reconnects, so it wins over a stale
// after= in the URL it reconnects to), else ?after=, else 0.
func resumePoint(r *http.Request) (uint64, error) {
	if v := r.Header.Get("Last-Event-ID"); v != "" {
		id, err := ParseEventID(v)
		if err != nil {
			return 0, errors.New("Last-Event-ID: " + err.Error())
		}
		return id, nil
	}
	q := r.URL.Query()
	if !q.Has("after") {
		return 0, nil
	}
	id, err := ParseEventID(q.Get("after"))
	if err != nil {
		return 0, errors.New("after: " + err.Error())
	}
	return id, nil
}

// staleAfter is how long after its start a reply still streaming must
// have ended: its instance went away before storing it.
func (h *Handler) staleAfter() time.Duration {
	d := h.cfg.MaxStreamDuration
	if d <= 0 {
		d = n8n.DefaultMaxStreamDuration
	}
	store := h.cfg.ReplyStoreTimeout
	if store <= 0 {
		store = DefaultReplyStoreTimeout
	}
	return d + store + time.Minute
}

// ownReply loads the caller's reply named in the path; on failure it has
// answered (404 for an unknown id, another visitor's, or a user message).
func (h *Handler) ownReply(w http.ResponseWriter, r *http.Request, s *sessions.Session, id string) (*sessions.Message, bool) {
	m, err := h.cfg.Store.GetMessage(r.Context(), s.ID, id)
	if errors.Is(err, sessions.ErrNotFound) || err == nil && m.Role != sessions.RoleAssistant {
		_ = h.writeError(w, r, http.StatusNotFound, "not_found", "no such reply")
		return nil, false
	}
	if err != nil {
		_ = h.storeError(w, r, "get message", err)
		return nil, false
	}
	if m.Status == sessions.StatusStreaming && time.Since(m.CreatedAt) > h.staleAfter() {
		m = h.finishLost(r.Context(), m)
	}
	return m, true
}

// finishLost stores, as an error, a reply whose instance went away while
// producing it, and returns it as stored (or as it was, should that fail).
func (h *Handler) finishLost(ctx context.Context, m *sessions.Message) *sessions.Message {
	lost := &sessions.Message{ID: m.ID, SessionID: m.SessionID, Content: m.Content, Status: sessions.StatusError,
		Metadata: []byte(`{"stream":{"items":[],"error":{"code":"` + codeReplyLost + `","message":"The reply was interrupted. Please send your message again."}}}`)}
	if m.Content != "" {
		lost.Metadata = nil
	}
	err := h.cfg.Store.FinishReply(ctx, lost)
	if err != nil && !errors.Is(err, sessions.ErrNotFound) {
		h.cfg.Logger.Warn("storing a lost reply", zap.String("message_id", m.ID), zap.Error(err))
		return m
	}
	if got, err := h.cfg.Store.GetMessage(ctx, m.SessionID, m.ID); err == nil {
		return got
	}
	return m
}

// resumeStream answers GET {prefix}/chat/stream/{message_id}: the events
// of the caller's reply after the resume point, live while it is being
// produced, then end and [DONE].
func (h *Handler) resumeStream(w http.ResponseWriter, r *http.Request, id string) error {
	s, _, ok := h.authenticate(w, r)
	if !ok {
		return nil
	}
	after, err := resumePoint(r)
	if err != nil {
		return h.writeError(w, r, http.StatusBadRequest, "invalid_request", err.Error())
	}
	m, ok := h.ownReply(w, r, s, id)
	if !ok {
		return nil
	}
	if m.Status != sessions.StatusStreaming {
		evs := storedEvents(m)
		if last := evs[len(evs)-1].ID; after > last {
			return h.writeError(w, r, http.StatusBadRequest, "invalid_request",
				"the reply's last event is "+strconv.FormatUint(last, 10)+"; there is nothing after "+strconv.FormatUint(after, 10))
		}
	}
	sw := streaming.NewSSEWriter(w, streaming.Options{KeepaliveInterval: h.cfg.KeepaliveInterval, ResumeAfter: after})
	sw.Header().Set(streaming.MessageIDHeader, id)
	rs := &resumed{sw: sw}
	defer func() { _ = sw.Done() }() // stops the keepalive timer even on a panic
	if sw.Start() != nil {
		return nil
	}
	ctx := r.Context()
	for {
		if m.Status != sessions.StatusStreaming {
			rs.write(storedEvents(m))
			rs.end()
			return nil
		}
		// Live here or in Redis, until the end or until the events must
		// come from the store (replies.ErrNotLive).
		if f, err := h.cfg.Replies.Follow(id, sw.LastID()); err == nil {
			_ = rs.follow(ctx, f)
			f.Close()
			if rs.done {
				return nil
			}
		}
		if ctx.Err() != nil {
			return nil
		}
		if m, err = h.cfg.Store.GetMessage(ctx, s.ID, id); err != nil {
			if ctx.Err() == nil {
				// The session was deleted meanwhile, or the store failed.
				_ = sw.Error("not_found", "the reply is no longer available")
			}
			return nil
		}
		if m.Status == sessions.StatusStreaming && time.Since(m.CreatedAt) > h.staleAfter() {
			m = h.finishLost(ctx, m)
		}
		if m.Status == sessions.StatusStreaming && !h.cfg.Replies.Shared() {
			// Neither here nor in Redis (a Redis follower waits by
			// itself): look at the store again in a while.
			t := time.NewTimer(notLivePoll)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
		}
	}
}

// resumed writes a resumed stream's events, each once, in order.
type resumed struct {
	sw   *streaming.SSEWriter
	done bool
}

// follow writes what f yields until the reply's end.
func (rs *resumed) follow(ctx context.Context, f replies.Follower) error {
	for {
		evs, err := f.Next(ctx)
		if errors.Is(err, io.EOF) {
			rs.end()
			return nil
		}
		if err != nil {
			return err
		}
		if !rs.write(evs) {
			return replies.ErrNotLive
		}
		if rs.done {
			return nil
		}
	}
}

// write writes the events the client does not have yet; it reports false
// when one is missing (the caller then reads them again).
func (rs *resumed) write(evs []replies.Event) bool {
	for _, ev := range evs {
		last := rs.sw.LastID()
		if ev.ID <= last {
			continue // the client has it (begin, written by Start)
		}
		if ev.ID != last+1 {
			return false
		}
		var err error
		switch ev.Type {
		case replies.TypeItem:
			err = rs.sw.Item(ev.Content)
		case replies.TypeError:
			err = rs.sw.Error(ev.Code, ev.Message)
		case replies.TypeEnd:
			err = rs.sw.Done()
			rs.done = true
		}
		if err != nil {
			rs.done = true // the client is gone
		}
		if rs.done {
			return true
		}
	}
	return true
}

// end finishes a stream whose end event the client has (or just got).
func (rs *resumed) end() {
	if !rs.done {
		_ = rs.sw.DoneWithoutEnd()
		rs.done = true
	}
}

// stopResponse answers a stop.
type stopResponse struct {
	MessageID string `json:"message_id"`
	Status    string `json:"status"`
}

// stopReply answers POST {prefix}/chat/stop/{message_id}: the reply is
// stopped on whichever instance produces it, and the answer (200) gives
// the status it was stored with; 202 when it was not stored within a few
// seconds (it will be), 409 when it had already ended.
func (h *Handler) stopReply(w http.ResponseWriter, r *http.Request, id string) error {
	s, _, ok := h.authenticate(w, r)
	if !ok {
		return nil
	}
	m, ok := h.ownReply(w, r, s, id)
	if !ok {
		return nil
	}
	if m.Status != sessions.StatusStreaming {
		return writeJSON(w, http.StatusConflict, map[string]string{
			"error": "not_streaming", "message": "the reply has already ended", "message_id": id, "status": m.Status,
		})
	}
	if _, err := h.cfg.Replies.Stop(r.Context(), id); err != nil {
		h.cfg.Logger.Error("sending a stop", zap.String("message_id", id), zap.Error(err))
		w.Header().Set("Retry-After", "1")
		return h.writeError(w, r, http.StatusServiceUnavailable, "unavailable", "the stop could not be sent; try again")
	}
	// Wait for the reply to be stored. Pub/sub delivers at most once (an
	// instance reconnecting to Redis, or just started, misses what is
	// published meanwhile), so the stop is sent again every second; the
	// instance holding the reply stops it once.
	deadline := time.Now().Add(stopWait)
	resend := time.Now().Add(stopResend)
	wait := stopPollFirst
	for m.Status == sessions.StatusStreaming && time.Now().Before(deadline) {
		t := time.NewTimer(wait)
		select {
		case <-r.Context().Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		wait = min(2*wait, stopPollMax)
		got, err := h.cfg.Store.GetMessage(r.Context(), s.ID, id)
		if err != nil {
			break
		}
		m = got
		if m.Status == sessions.StatusStreaming && time.Now().After(resend) {
			_, _ = h.cfg.Replies.Stop(r.Context(), id)
			resend = time.Now().Add(stopResend)
		}
	}
	status := http.StatusOK
	if m.Status == sessions.StatusStreaming {
		status = http.StatusAccepted
	}
	return writeJSON(w, status, stopResponse{MessageID: id, Status: m.Status})
}
