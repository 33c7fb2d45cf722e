package handler

import (
	"errors"
	"io"
	"net/http"
	"strings"

	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/streaming"
)

// honeypotReply is what a form-filling bot is told: an ordinary-looking
// answer, so it learns nothing, while n8n is never called.
const honeypotReply = "Thanks for your message! We will get back to you soon."

// replyFormat is how a route hands n8n's reply to its client: as a stream
// (relaySSE, relayNDJSON) or as one JSON object (relayResponseJSON,
// relayOutputJSON).
type replyFormat interface {
	// relay passes the reply on and returns what arrived and how it ended;
	// runExchange stores that, then calls finish.
	relay(w http.ResponseWriter, r *http.Request, ex *exchange, reply *n8n.Reply) relayed
	// honeypot answers a caught bot like a person, in the same format.
	honeypot(w http.ResponseWriter, ex *exchange) error
	// stopped answers a reply stopped before n8n's first byte: an empty
	// reply (a stream's begin and end).
	stopped(w http.ResponseWriter, ex *exchange) error
}

// relayed is the outcome of a relay.
type relayed struct {
	text   string // the reply text that arrived
	status string // how it ended: sessions.StatusComplete, StatusPartial or StatusError
	// finish completes the answer once the reply is stored: a JSON body,
	// or the end of a stream's accounting.
	finish func() error
}

// streamRelay writes each reply chunk to the client as it arrives.
type streamRelay struct {
	h         *Handler
	newWriter func(http.ResponseWriter, streaming.Options) streaming.Writer
}

// relaySSE streams the reply as Server-Sent Events (the chat API).
func (h *Handler) relaySSE() replyFormat {
	return streamRelay{h, func(w http.ResponseWriter, o streaming.Options) streaming.Writer { return streaming.NewSSEWriter(w, o) }}
}

// relayNDJSON streams the reply as n8n's own NDJSON lines (the @n8n/chat
// widget's streaming mode).
func (h *Handler) relayNDJSON() replyFormat {
	return streamRelay{h, func(w http.ResponseWriter, o streaming.Options) streaming.Writer {
		return streaming.NewNDJSONWriter(w, o)
	}}
}

func (s streamRelay) honeypot(w http.ResponseWriter, ex *exchange) error {
	sw := s.newWriter(w, streaming.Options{KeepaliveInterval: -1})
	sw.Header().Set("X-Message-ID", ex.assistantID)
	_ = sw.Item(honeypotReply)
	return sw.Done()
}

func (s streamRelay) stopped(w http.ResponseWriter, ex *exchange) error {
	sw := s.newWriter(w, streaming.Options{KeepaliveInterval: -1})
	sw.Header().Set("X-Message-ID", ex.assistantID)
	return sw.Done()
}

// relay streams the reply. After the first byte a failure can only be
// reported in the stream: an error event, then the end marker. The stream
// counts as running (for the metrics, and for the drain, which Caddy's
// exit waits for) until finish, after its reply is stored.
func (s streamRelay) relay(w http.ResponseWriter, r *http.Request, ex *exchange, reply *n8n.Reply) (res relayed) {
	h := s.h
	h.cfg.Metrics.StreamStarted()
	// When Caddy exits, the drain closes the reply: the stream then ends
	// with a server_shutdown error event and its end marker, and the
	// partial reply is stored before the drain stops counting this stream.
	shutdown, stopWatch := h.cfg.Drain.watch(reply)
	finish := func() error {
		stopWatch()
		h.cfg.Metrics.StreamEnded()
		return nil
	}
	defer func() {
		if res.finish == nil { // a panic: let the drain and the gauge go
			_ = finish()
		}
	}()
	sw := s.newWriter(w, streaming.Options{KeepaliveInterval: h.cfg.KeepaliveInterval, Batch: true})
	if ex.xl != nil {
		ex.xl.streamed = true
		sw = countingWriter{Writer: sw, x: ex.xl, m: h.cfg.Metrics}
	}
	text, status := h.relayStream(sw, ex, reply, shutdown)
	return relayed{text: text, status: status, finish: finish}
}

// relayStream writes each reply chunk to sw as it arrives and returns the
// text relayed (with finish mode, read) and how the reply ended.
func (h *Handler) relayStream(sw streaming.Writer, ex *exchange, reply *n8n.Reply, shutdown func() bool) (string, string) {
	sw.Header().Set("X-Message-ID", ex.assistantID)
	defer func() { _ = sw.Done() }() // stops the keepalive timer even on a panic
	// The writer holds items (Options.Batch) until the reply is about to
	// wait for n8n: chunks that arrived together leave in one write, and
	// none is held while n8n is silent.
	reply.OnWait(func() { _ = sw.Flush() })
	var text strings.Builder
	status := sessions.StatusComplete
	clientGone := sw.Start() != nil
	if clientGone {
		ex.live.clientLeft()
	}
	// A live reply (resumable) is not cancelled here when its client
	// leaves: it may be resumed; its detached timeout or a stop cancels it.
	for {
		if clientGone && !h.cfg.FinishOnDisconnect && ex.live == nil {
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
			code, message := "", ""
			switch {
			case ex.live.halted():
				// Stopped, or no client for detached_timeout: the stream
				// just ends. A stopped reply is partial even when empty.
				if ex.live.stopped.Load() {
					status = sessions.StatusPartial
				}
				if errors.As(err, &ue) {
					h.logUpstreamError(ex, ue) // counted as the client's leaving
				}
			case shutdown():
				code, message = CodeServerShutdown, shutdownMessage
			case errors.As(err, &ue):
				h.logUpstreamError(ex, ue)
				if ue.Code != n8n.CodeCanceled {
					code, message = ue.Code, ue.Message
				}
			default:
				code, message = n8n.CodeError, "the reply from the chat workflow broke off"
			}
			if code != "" {
				ex.live.error(code, message)
				if !clientGone {
					_ = sw.Error(code, message)
				}
			}
			break
		}
		if chunk = ex.live.item(chunk); chunk == "" && ex.live != nil {
			continue // nothing left once cleaned: no event, here or live
		}
		text.WriteString(chunk)
		if clientGone {
			continue // read to the end (finish, or a live reply), then store it whole
		}
		if err := sw.Item(chunk); err != nil {
			clientGone = true
			ex.live.clientLeft()
		}
	}
	_ = sw.Done()
	return text.String(), status
}

// jsonRelay reads the whole reply and answers it as one JSON object.
// Nothing is written before the reply is stored, so a failure is still a
// plain error.
type jsonRelay struct {
	h    *Handler
	body func(ex *exchange, text string) any
}

// chatResponse is the chat API's JSON answer.
type chatResponse struct {
	Response  string `json:"response"`
	SessionID string `json:"session_id"`
	MessageID string `json:"message_id"`
}

// relayResponseJSON answers {"response", "session_id", "message_id"} (the
// chat API when the client accepts only JSON).
func (h *Handler) relayResponseJSON() replyFormat {
	return jsonRelay{h, func(ex *exchange, text string) any {
		return chatResponse{Response: text, SessionID: ex.session.ID, MessageID: ex.assistantID}
	}}
}

// relayOutputJSON answers {"output": …} (the @n8n/chat widget without
// streaming).
func (h *Handler) relayOutputJSON() replyFormat {
	return jsonRelay{h, func(_ *exchange, text string) any { return map[string]string{"output": text} }}
}

func (j jsonRelay) honeypot(w http.ResponseWriter, ex *exchange) error {
	return writeJSON(w, http.StatusOK, j.body(ex, honeypotReply))
}

func (j jsonRelay) stopped(w http.ResponseWriter, ex *exchange) error {
	return writeJSON(w, http.StatusOK, j.body(ex, ""))
}

func (j jsonRelay) relay(w http.ResponseWriter, r *http.Request, ex *exchange, reply *n8n.Reply) relayed {
	text, err := reply.ReadAll()
	if err != nil && ex.live.halted() {
		// Stopped: the answer is what arrived.
		return relayed{text: text, status: sessions.StatusPartial, finish: func() error {
			return writeJSON(w, http.StatusOK, j.body(ex, text))
		}}
	}
	if err == nil {
		return relayed{text: text, status: sessions.StatusComplete, finish: func() error {
			return writeJSON(w, http.StatusOK, j.body(ex, text))
		}}
	}
	status := sessions.StatusError
	if text != "" {
		status = sessions.StatusPartial
	}
	return relayed{text: text, status: status, finish: func() error { return j.h.replyBrokeOff(w, r, ex, err) }}
}

// replyBrokeOff answers, with a plain error, a reply that failed before it
// was read whole.
func (h *Handler) replyBrokeOff(w http.ResponseWriter, r *http.Request, ex *exchange, err error) error {
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
