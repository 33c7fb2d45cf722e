package streaming

import (
	"errors"
	"net/http"
	"strconv"
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
	// meta is the encoded metadata up to the timestamp, the same for every
	// line: ,"metadata":{"nodeId":…,"nodeName":…,"itemIndex":0,"runIndex":0,"timestamp":
	meta []byte
}

var _ Writer = (*NDJSONWriter)(nil)

var ndjsonKeepalive = []byte(`{"type":"keepalive"}` + "\n")

var errUnknownKind = errors.New("streaming: unknown chunk kind")

// NewNDJSONWriter returns a writer for w. Nothing is written before Start
// (or the first chunk). The Content-Type is application/x-ndjson;
// charset=utf-8 unless the caller has set one (the widget ignores it).
func NewNDJSONWriter(w http.ResponseWriter, opts Options) *NDJSONWriter {
	nodeID, nodeName := opts.NodeID, opts.NodeName
	if nodeID == "" {
		nodeID = "chat_proxy"
	}
	if nodeName == "" {
		nodeName = "Chat Proxy"
	}
	meta := append([]byte(nil), `,"metadata":{"nodeId":`...)
	meta = appendJSONString(meta, nodeID)
	meta = append(meta, `,"nodeName":`...)
	meta = appendJSONString(meta, nodeName)
	meta = append(meta, `,"itemIndex":0,"runIndex":0,"timestamp":`...)
	return &NDJSONWriter{stream: newStream(w, opts, ndjsonKeepalive), meta: meta}
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

// appendLine appends one "\n"-terminated chunk line, byte for byte what
// json.Marshal made of n8n's chunk struct (type, content only when
// hasContent, metadata), with the timestamp in milliseconds.
func (n *NDJSONWriter) appendLine(b []byte, kind Kind, content string, hasContent bool) []byte {
	b = append(b, `{"type":`...)
	b = appendJSONString(b, string(kind))
	if hasContent {
		b = append(b, `,"content":`...)
		b = appendJSONString(b, content)
	}
	b = append(b, n.meta...)
	b = strconv.AppendInt(b, time.Now().UnixMilli(), 10)
	return append(b, "}}\n"...)
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
	n.buf = n.appendLine(n.buf[:0], KindBegin, "", false)
	err := n.startLocked(setNDJSONHeaders, n.buf)
	n.recycleBufLocked()
	return err
}

func (n *NDJSONWriter) writeLine(kind Kind, content string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.done {
		return ErrDone
	}
	if err := n.ensureStartedLocked(); err != nil {
		return err
	}
	n.buf = n.appendLine(n.buf[:0], kind, content, true)
	if kind == KindItem {
		return n.emitBufLocked()
	}
	return n.writeBufLocked()
}

// Item writes {"type":"item","content":content,"metadata":{…}}.
func (n *NDJSONWriter) Item(content string) error { return n.writeLine(KindItem, content) }

// Error writes {"type":"error","content":message,"metadata":{…}}; the widget
// shows it as "Error: <message>". The code is not part of n8n's chunk shape
// and is not written.
func (n *NDJSONWriter) Error(_, message string) error {
	return n.writeLine(KindError, message)
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
		n.buf = n.appendLine(n.buf[:0], KindEnd, "", false)
		err = n.writeBufLocked()
	}
	stopped := n.finishLocked()
	n.mu.Unlock()
	if stopped != nil {
		<-stopped
	}
	return err
}

// WriteChunk writes c: KindBegin starts the stream, KindEnd ends it (Done).
func (n *NDJSONWriter) WriteChunk(c Chunk) error { return writeChunk(n, c) }
