package handler

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/events"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/streaming"
)

// eventsReplayPage is how many missed messages one store read returns;
// eventsReplayMax and eventsReplayBytes (of content, as a history page)
// bound one catch-up: a longer one ends the stream after ready, and the
// page reconnects from there for the rest.
const (
	eventsReplayPage  = 100
	eventsReplayMax   = 1000
	eventsReplayBytes = historyPageBytes
)

// eventsRetry is the reconnection delay the stream suggests to
// EventSource, in milliseconds.
const eventsRetry = "3000"

// chatEvents streams what is pushed into the caller's conversation
// (GET {prefix}/chat/events, Server-Sent Events): pushed messages as
// `message` events whose id is the message's, changes of mode as `mode`
// events. After the Last-Event-ID header that EventSource sends when it
// reconnects, else ?after=<message id>, the messages stored after that
// one come first, from the store, so a page that was away misses nothing;
// a message that arrives both ways is sent once. A `ready` event, with
// the session's mode, says the stream is live; its id is the newest
// message then (or "start"), so a reconnect catches up from there. Keepalive comments keep
// proxies from closing an idle stream. When the server shuts down or
// reloads, the stream ends with an `end` event and EventSource
// reconnects (to the new configuration) by itself.
func (h *Handler) chatEvents(w http.ResponseWriter, r *http.Request, _ string) error {
	s, claims, ok := h.authenticate(w, r)
	if !ok {
		return nil
	}
	if h.cfg.Events == nil {
		return h.writeError(w, r, http.StatusNotFound, "not_found", "pushed events are not enabled (push_secret is not set)")
	}
	// Last-Event-ID first: EventSource reconnects to the URL it was made
	// with, whose ?after= is where the page stood when it loaded, and
	// sends the last id it got since.
	after := r.Header.Get("Last-Event-ID")
	if after == "" {
		after = r.URL.Query().Get("after")
	}
	// Subscribe first, then read the store: whatever is stored after the
	// read comes live, whatever before is in the read.
	sub, err := h.cfg.Events.Subscribe(r.Context(), s.ID)
	if err != nil {
		if r.Context().Err() != nil {
			return nil
		}
		if errors.Is(err, events.ErrClosed) {
			return h.writeError(w, r, http.StatusServiceUnavailable, CodeServerShutdown, "the server is restarting; reconnect")
		}
		h.cfg.Logger.Error("subscribing to pushed events", zap.Error(err))
		w.Header().Set("Retry-After", "1")
		return h.writeError(w, r, http.StatusServiceUnavailable, "unavailable", "live events are unavailable; try again")
	}
	defer sub.Close()
	missed, more, err := h.missedMessages(r.Context(), s.ID, after)
	if errors.Is(err, sessions.ErrNotFound) {
		return h.writeError(w, r, http.StatusBadRequest, "invalid_request", "after does not name a message of this session")
	}
	if err != nil {
		return h.storeError(w, r, "list missed messages", err)
	}
	// The mode as it is now that the subscription is live.
	current, err := h.cfg.Store.GetSession(r.Context(), s.ID)
	if err != nil {
		if errors.Is(err, sessions.ErrNotFound) {
			return h.sessionGone(w, r)
		}
		return h.storeError(w, r, "get session", err)
	}

	es := &eventStream{w: w, rc: http.NewResponseController(w)}
	hdr := w.Header()
	hdr.Set("Content-Type", "text/event-stream")
	hdr.Set("Cache-Control", "no-cache, no-transform")
	hdr.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	es.raw("retry: " + eventsRetry + "\n\n")
	sent := make(map[string]bool, len(missed))
	for _, m := range missed {
		data, _ := json.Marshal(toHistoryMessage(m))
		es.event(eventMessage, m.ID, data)
		sent[m.ID] = true
	}
	// ready's id is where the stream stands, so that EventSource, which
	// reconnects with the last id it got, catches up from here even when
	// no message came live (a reload, a dropped Redis connection).
	position := after
	if len(missed) > 0 {
		position = missed[len(missed)-1].ID
	}
	if position == "" {
		newest, err := h.cfg.Store.ListMessages(r.Context(), s.ID, "", 1)
		if err != nil {
			return h.storeError(w, r, "read the newest message", err)
		}
		position = eventsStart
		if len(newest.Messages) > 0 {
			position = newest.Messages[len(newest.Messages)-1].ID
		}
	}
	ready, _ := json.Marshal(map[string]string{"session_id": s.ID, "mode": current.Mode})
	es.event("ready", position, ready)
	if more {
		// The rest of the catch-up comes on the reconnection, after
		// ready's id; nothing live may come before it.
		es.event("end", "", []byte(`{"reason":"reconnect"}`))
		_ = es.flush()
		return nil
	}
	if es.flush() != nil {
		return nil
	}

	interval := h.cfg.KeepaliveInterval
	if interval <= 0 {
		interval = streaming.DefaultKeepaliveInterval
	}
	keepalive := time.NewTicker(interval)
	defer keepalive.Stop()
	for {
		select {
		case <-r.Context().Done():
			return nil
		case <-sub.Done():
			// The server is shutting down or reloading, or this stream fell
			// behind: the page reconnects and catches up.
			es.event("end", "", []byte(`{"reason":"reconnect"}`))
			_ = es.flush()
			return nil
		case <-keepalive.C:
			es.raw(": keepalive\n\n")
		case payload := <-sub.C():
			var ev pushedEvent
			if json.Unmarshal(payload, &ev) != nil || ev.Event == "" {
				continue
			}
			if ev.ID != "" && sent[ev.ID] {
				continue
			}
			if reason := h.eventsStillAllowed(r.Context(), claims); reason != "" {
				es.event("end", "", []byte(`{"reason":"`+reason+`"}`))
				_ = es.flush()
				return nil
			}
			if ev.ID != "" {
				sent[ev.ID] = true
			}
			es.event(ev.Event, ev.ID, ev.Data)
		}
		if es.flush() != nil {
			return nil // the client is gone
		}
	}
}

// eventsStillAllowed checks, before a live event is written, that the
// stream's token still stands: it has not expired, its session has not
// ended and, for a verified user's conversation, this device has not
// signed out (the conversation goes on for their other devices, and a
// page left open on a shared computer must not keep receiving it). It
// returns why the stream ends: session_ended, or reconnect when the store
// cannot tell (the page reconnects and catches up from the store).
func (h *Handler) eventsStillAllowed(ctx context.Context, claims *sessions.Claims) string {
	if claims.ExpiresAt != nil && !h.now().Before(claims.ExpiresAt.Time) {
		return "session_ended"
	}
	if _, err := h.cfg.Sessions.Load(ctx, claims); err != nil {
		if errors.Is(err, sessions.ErrSessionGone) {
			return "session_ended"
		}
		return "reconnect"
	}
	return ""
}

// eventsStart is the position of a stream opened on a conversation with
// no message yet: after=start is every message (up to eventsReplayMax).
const eventsStart = "start"

// missedMessages reads the messages stored after the one named after;
// none when after is empty; the newest ones when it is eventsStart. It
// stops at eventsReplayMax messages or eventsReplayBytes of content (at
// least one message) and then reports that there may be more.
func (h *Handler) missedMessages(ctx context.Context, sessionID, after string) (out []sessions.Message, more bool, err error) {
	size := 0
	// take adds page's messages within the bounds and reports whether
	// they all fitted.
	take := func(page []sessions.Message) bool {
		for _, m := range page {
			size += len(m.Content) + len(m.Metadata)
			if len(out) == eventsReplayMax || len(out) > 0 && size > eventsReplayBytes {
				return false
			}
			out = append(out, m)
		}
		return true
	}
	switch after {
	case "":
		return nil, false, nil
	case eventsStart:
		page, err := h.cfg.Store.ListMessages(ctx, sessionID, "", eventsReplayMax)
		if err != nil {
			return nil, false, err
		}
		return out, !take(page.Messages), nil
	}
	for {
		page, err := h.cfg.Store.ListMessagesAfter(ctx, sessionID, after, eventsReplayPage)
		if err != nil {
			return nil, false, err
		}
		if !take(page) {
			return out, true, nil
		}
		if len(page) < eventsReplayPage {
			return out, false, nil
		}
		after = page[len(page)-1].ID
	}
}

// eventStream writes Server-Sent Events; the first write error sticks.
type eventStream struct {
	w   http.ResponseWriter
	rc  *http.ResponseController
	err error
}

func (e *eventStream) raw(s string) {
	if e.err == nil {
		_, e.err = e.w.Write([]byte(s))
	}
}

// event writes one event. data is one line of JSON (json.Marshal escapes
// every newline), so it needs one data line.
func (e *eventStream) event(name, id string, data []byte) {
	b := make([]byte, 0, len(data)+64)
	b = append(append(append(b, "event: "...), name...), '\n')
	if id != "" {
		b = append(append(append(b, "id: "...), id...), '\n')
	}
	b = append(append(append(b, "data: "...), data...), "\n\n"...)
	if e.err == nil {
		_, e.err = e.w.Write(b)
	}
}

func (e *eventStream) flush() error {
	if e.err == nil {
		e.err = e.rc.Flush()
	}
	return e.err
}
