package streaming

import (
	"encoding/json"
	"errors"
	"net/http"
	"time"
)

// NDJSONWriter writes the streaming reply the @n8n/chat widget parses
// (research/n8n-protocol.md §1.5 and §4): one JSON object per
// "\n"-terminated line, in n8n's own chunk shape:
//
//	{"type":"begin","metadata":{"nodeId":"chat_proxy","nodeName":"Chat Proxy","itemIndex":0,"runIndex":0,"timestamp":1730000000000}}
//	{"type":"item","content":"Hel","metadata":{…}}
//	{"type":"error","content":"…","metadata":{…}}
//	{"type":"end","metadata":{…}}
//
// Start writes the begin line, Done the end line; begin and end carry no
// "content" key, like n8n's. Keepalives are n8n's {"type":"keepalive"},
// which the widget ignores. The widget shows an error chunk as
// "Error: <content>", so the message (never the code) goes in content.
type NDJSONWriter struct {
	stream
	nodeID   string
	nodeName string
}

var _ Writer = (*NDJSONWriter)(nil)

var ndjsonKeepalive = []byte(`{"type":"keepalive"}` + "\n")

var errUnknownKind = errors.New("streaming: unknown chunk kind")

// NewNDJSONWriter returns a writer for w. Nothing is written before Start
// (or the first chunk). The Content-Type is application/x-ndjson;
// charset=utf-8 unless the caller has set one (the widget ignores it).
func NewNDJSONWriter(w http.ResponseWriter, opts Options) *NDJSONWriter {
	n := &NDJSONWriter{stream: newStream(w, opts.KeepaliveInterval), nodeID: opts.NodeID, nodeName: opts.NodeName}
	if n.nodeID == "" {
		n.nodeID = "chat_proxy"
	}
	if n.nodeName == "" {
		n.nodeName = "Chat Proxy"
	}
	return n
}

func setNDJSONHeaders(h http.Header) {
	if h.Get("Content-Type") == "" {
		h.Set("Content-Type", "application/x-ndjson; charset=utf-8")
	}
	// no-transform: encode neither compresses nor buffers the stream;
	// Incremental: encode writes the headers at once and flushes after
	// every write (RFC 10036), as do other intermediaries that know it.
	h.Set("Cache-Control", "no-cache, no-transform")
	h.Set("X-Accel-Buffering", "no")
	h.Set("Incremental", "?1")
}

type ndjsonMeta struct {
	NodeID    string `json:"nodeId"`
	NodeName  string `json:"nodeName"`
	ItemIndex int    `json:"itemIndex"`
	RunIndex  int    `json:"runIndex"`
	Timestamp int64  `json:"timestamp"`
}

type ndjsonChunk struct {
	Type     Kind       `json:"type"`
	Content  *string    `json:"content,omitempty"`
	Metadata ndjsonMeta `json:"metadata"`
}

// line encodes one chunk line, "\n"-terminated.
func (n *NDJSONWriter) line(kind Kind, content *string) ([]byte, error) {
	b, err := json.Marshal(ndjsonChunk{
		Type:    kind,
		Content: content,
		Metadata: ndjsonMeta{
			NodeID:    n.nodeID,
			NodeName:  n.nodeName,
			Timestamp: time.Now().UnixMilli(),
		},
	})
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// Start writes the status 200 and the headers (see NewNDJSONWriter;
// Cache-Control: no-cache, no-transform, X-Accel-Buffering: no,
// Incremental: ?1) and the begin line, and flushes.
func (n *NDJSONWriter) Start() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.done {
		return ErrDone
	}
	return n.ensureStartedLocked()
}

func (n *NDJSONWriter) ensureStartedLocked() error {
	if n.started {
		return n.err
	}
	begin, err := n.line(KindBegin, nil)
	if err != nil {
		return err
	}
	return n.startLocked(setNDJSONHeaders, begin, ndjsonKeepalive)
}

func (n *NDJSONWriter) writeLine(kind Kind, content *string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.done {
		return ErrDone
	}
	if err := n.ensureStartedLocked(); err != nil {
		return err
	}
	l, err := n.line(kind, content)
	if err != nil {
		return err
	}
	return n.writeLocked(l)
}

// Item writes {"type":"item","content":content,"metadata":{…}}.
func (n *NDJSONWriter) Item(content string) error { return n.writeLine(KindItem, &content) }

// Error writes {"type":"error","content":message,"metadata":{…}}; the widget
// shows it as "Error: <message>". The code is not part of n8n's chunk shape
// and is not written.
func (n *NDJSONWriter) Error(_, message string) error {
	return n.writeLine(KindError, &message)
}

// Keepalive writes {"type":"keepalive"}.
func (n *NDJSONWriter) Keepalive() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.done {
		return ErrDone
	}
	if err := n.ensureStartedLocked(); err != nil {
		return err
	}
	return n.writeLocked(ndjsonKeepalive)
}

// Done writes the end line once and stops the keepalive timer. It returns
// the write error, if any; later calls return nil.
func (n *NDJSONWriter) Done() error {
	n.mu.Lock()
	if n.done {
		n.mu.Unlock()
		return nil
	}
	err := n.ensureStartedLocked()
	if err == nil {
		var end []byte
		if end, err = n.line(KindEnd, nil); err == nil {
			err = n.writeLocked(end)
		}
	}
	wait := n.finishLocked()
	n.mu.Unlock()
	wait()
	return err
}

// WriteChunk writes c: KindBegin starts the stream, KindEnd ends it (Done).
func (n *NDJSONWriter) WriteChunk(c Chunk) error { return writeChunk(n, c) }
