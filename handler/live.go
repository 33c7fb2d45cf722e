package handler

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"sync/atomic"

	"github.com/chatproxy/caddy-chatproxy/internal/cleantext"
	"github.com/chatproxy/caddy-chatproxy/replies"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// Resumable replies (issue 15). A chat API exchange stores its reply's row
// with the visitor's message, as streaming (sessions.AppendExchange), and
// publishes every event of the reply's SSE stream to a replies.Live, with
// the ids the client's stream gives them: begin 1, each item and error the
// next, end the last. A client that lost the stream resumes it from the
// last id it saw (resume.go): live while the reply runs, from the store
// once it is stored. The stored reply keeps its events' boundaries in its
// metadata ({"stream":{"items":[byte length, …],"error":{…}}}), so the
// events rebuilt from the store have the ids the live ones had: never a
// duplicate, never a gap.
//
// The request to n8n is cancelled by the live reply, not by the client's
// request: by a stop (POST {prefix}/chat/stop/{id}, on any instance), or
// once no client has followed it for detached_timeout (with
// on_client_disconnect cancel; with finish it is read to its end).

// liveReply is an exchange's live reply.
type liveReply struct {
	*replies.Live
	ctx    context.Context // the request to n8n
	cancel context.CancelFunc
	// stopped: by a stop request; idled: no client for detached_timeout.
	stopped, idled atomic.Bool
	leave          sync.Once
	unwatch        func() bool

	items     []int // byte lengths of the items published
	published int   // bytes of reply text published
	errEvent  *streamError
}

// streamError is a stored reply's error event.
type streamError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// streamMeta is what a stored reply's metadata keeps of its events.
type streamMeta struct {
	Stream struct {
		Items []int        `json:"items"`
		Error *streamError `json:"error,omitempty"`
	} `json:"stream"`
}

// resumableRoute is a chat route whose replies can be resumed and stopped
// (the chat API; the @n8n/chat widget's sessions cannot name a reply).
type resumableRoute interface {
	resumable() bool
}

// beginLive registers the exchange's reply as live, before its row is
// stored, so that whoever finds the row finds the reply.
func (h *Handler) beginLive(r *http.Request, ex *exchange) *liveReply {
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	lr := &liveReply{ctx: ctx, cancel: cancel}
	lr.Live = h.cfg.Replies.Begin(ex.assistantID, func() {
		lr.stopped.Store(true)
		cancel()
	})
	if !h.cfg.FinishOnDisconnect {
		lr.DetachAfter(h.cfg.DetachedTimeout, func() {
			lr.idled.Store(true)
			cancel()
		})
	}
	lr.unwatch = context.AfterFunc(r.Context(), lr.clientLeft)
	return lr
}

// clientLeft detaches the exchange's own client (once).
func (lr *liveReply) clientLeft() {
	if lr == nil {
		return
	}
	lr.leave.Do(lr.Detach)
}

// halted reports whether the reply was stopped or left without a client
// for too long: its request to n8n was cancelled on purpose.
func (lr *liveReply) halted() bool {
	return lr != nil && (lr.stopped.Load() || lr.idled.Load())
}

// item publishes a piece of reply text, cleaned as the store cleans it,
// so that the stored text is exactly the items' concatenation; it
// returns the text to relay and store.
func (lr *liveReply) item(chunk string) string {
	if lr == nil {
		return chunk
	}
	chunk = cleantext.String(chunk)
	if chunk == "" {
		return chunk
	}
	lr.Item(chunk)
	lr.items = append(lr.items, len(chunk))
	lr.published += len(chunk)
	return chunk
}

// error publishes an error event.
func (lr *liveReply) error(code, message string) {
	if lr == nil || lr.errEvent != nil {
		return
	}
	lr.Error(code, message)
	lr.errEvent = &streamError{Code: code, Message: message}
}

// finish publishes what of text was not published yet (a reply read
// whole) and the end event, and returns the reply as it is to be stored.
func (lr *liveReply) finish(text string) (string, json.RawMessage) {
	if len(text) > lr.published {
		text = text[:lr.published] + lr.item(text[lr.published:])
	}
	lr.End()
	var md streamMeta
	md.Stream.Items = lr.items
	if md.Stream.Items == nil {
		md.Stream.Items = []int{}
	}
	md.Stream.Error = lr.errEvent
	b, _ := json.Marshal(md)
	return text, b
}

// close ends the live reply once it is stored (or could not be).
func (lr *liveReply) close() {
	lr.unwatch()
	lr.cancel()
	lr.Close()
}

// storedEvents rebuilds a stored reply's events, with the ids they had
// live. A reply stored without event boundaries (before they were kept)
// has its text as one item.
func storedEvents(m *sessions.Message) []replies.Event {
	var md streamMeta
	_ = json.Unmarshal(m.Metadata, &md)
	items := md.Stream.Items
	if sum(items) != len(m.Content) {
		items = nil
		if m.Content != "" {
			items = []int{len(m.Content)}
		}
	}
	evs := make([]replies.Event, 0, len(items)+3)
	evs = append(evs, replies.Event{ID: 1, Type: replies.TypeBegin})
	off := 0
	for _, n := range items {
		evs = append(evs, replies.Event{ID: uint64(len(evs) + 1), Type: replies.TypeItem, Content: m.Content[off : off+n]})
		off += n
	}
	if e := md.Stream.Error; e != nil {
		evs = append(evs, replies.Event{ID: uint64(len(evs) + 1), Type: replies.TypeError, Code: e.Code, Message: e.Message})
	}
	return append(evs, replies.Event{ID: uint64(len(evs) + 1), Type: replies.TypeEnd})
}

func sum(ns []int) int {
	t := 0
	for _, n := range ns {
		if n < 0 {
			return -1
		}
		t += n
	}
	return t
}
