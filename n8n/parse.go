package n8n

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"strings"
	"unicode/utf8"
)

// Format is the shape of n8n's reply, as detected.
type Format string

// The reply formats understood.
const (
	// FormatJSON is a whole JSON document: {"output"|"text"|"message"|
	// "response": …}, an array of those (first element), or a string.
	FormatJSON Format = "json"
	// FormatNDJSON is n8n's streaming: one {"type":"begin"|"item"|"end"|
	// "error"|"keepalive",…} object per line, whatever the Content-Type.
	FormatNDJSON Format = "ndjson"
	// FormatSSE is text/event-stream: the text is in the data lines.
	FormatSSE Format = "sse"
	// FormatText is a plain-text body, streamed as it arrives.
	FormatText Format = "text"
)

// decoder yields reply text: next returns a non-empty text, io.EOF at the
// clean end of the reply, or an error.
type decoder interface {
	next() (string, error)
}

// replyFields returns the keys of a JSON reply that hold the text, in the
// order the @n8n/chat widget reads them (plus "response").
func replyFields() []string { return []string{"output", "text", "message", "response"} }

// sniff detects the reply's format from its Content-Type and first bytes and
// returns the decoder for it. br reads the decompressed body.
func sniff(br *bufio.Reader, contentType string, maxLine int) (decoder, Format, error) {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		mt = ""
	}
	switch mt {
	case "text/html", "application/xhtml+xml":
		return nil, "", htmlError(br)
	case "text/event-stream":
		return &sseDecoder{br: br, max: maxLine}, FormatSSE, nil
	}
	if err := skipSpace(br); err != nil {
		if err == io.EOF {
			return nil, "", perr(ReasonEmpty, "reply body is empty")
		}
		return nil, "", err
	}
	isJSON := mt == "application/json" || strings.HasSuffix(mt, "+json") ||
		mt == "application/x-ndjson" || mt == "application/ndjson"
	head, _ := br.Peek(min(br.Buffered(), 64))
	if startsHTML(head) || (head[0] == '<' && (isJSON || mt == "")) {
		return nil, "", htmlError(br)
	}
	switch head[0] {
	case '{', '[', '"':
	default:
		if isJSON {
			return nil, "", perr(ReasonInvalid, "reply labelled json is not json")
		}
		return &textDecoder{br: br}, FormatText, nil
	}

	// JSON-looking: n8n streaming (one chunk object per line) or a whole
	// JSON document. Look at the first line.
	first, complete, err := readFirstLine(br, maxLine)
	if err != nil {
		return nil, "", err
	}
	if complete && isChunkLine(first) {
		return &ndjsonDecoder{lr: lineReader{br: br, max: maxLine}, pending: first}, FormatNDJSON, nil
	}
	rest, err := io.ReadAll(br)
	if err != nil {
		return nil, "", err
	}
	doc := append(first, rest...)
	text, err := parseDocument(doc)
	if err != nil {
		var p *protoError
		if errors.As(err, &p) && p.reason == ReasonInvalid && !isJSON {
			// Not JSON after all, and not labelled so: plain text.
			return &staticDecoder{text: string(doc)}, FormatText, nil
		}
		return nil, "", err
	}
	return &staticDecoder{text: text}, FormatJSON, nil
}

// readFirstLine reads up to and including the first '\n'. complete is false
// when the line is longer than maxLine (then it cannot be a chunk line and
// what was read so far is returned).
func readFirstLine(br *bufio.Reader, maxLine int) (line []byte, complete bool, err error) {
	for {
		frag, err := br.ReadSlice('\n')
		line = appendFrag(line, frag)
		switch {
		case err == nil:
			return line, len(line) <= maxLine+1, nil
		case err == io.EOF:
			return line, len(line) <= maxLine, nil
		case err != bufio.ErrBufferFull:
			return nil, false, err
		case len(line) > maxLine+1:
			return line, false, nil
		}
	}
}

// isChunkLine reports whether line is one n8n streaming chunk.
func isChunkLine(line []byte) bool {
	line = bytes.TrimSpace(line)
	if len(line) == 0 || line[0] != '{' {
		return false
	}
	var ch struct {
		Type *string `json:"type"`
	}
	if json.Unmarshal(line, &ch) != nil || ch.Type == nil {
		return false
	}
	switch *ch.Type {
	case "begin", "item", "end", "error", "keepalive":
		return true
	}
	return false
}

// parseDocument extracts the reply text from a whole JSON document.
func parseDocument(doc []byte) (string, error) {
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return "", perr(ReasonInvalid, "reply is not valid json")
	}
	if _, err := dec.Token(); err != io.EOF {
		return "", perr(ReasonInvalid, "reply holds data after its json document")
	}
	return textOf(v, 0)
}

// textOf returns the reply text held by a decoded JSON value.
func textOf(v any, depth int) (string, error) {
	switch t := v.(type) {
	case string:
		if t == "" {
			return "", perr(ReasonEmpty, "reply text is empty")
		}
		return t, nil
	case []any:
		if len(t) == 0 {
			return "", perr(ReasonEmpty, "reply is an empty array")
		}
		if depth > 1 {
			return "", perr(ReasonInvalid, "reply arrays are nested too deep")
		}
		return textOf(t[0], depth+1)
	case map[string]any:
		return textOfObject(t)
	}
	return "", perr(ReasonInvalid, "reply is not a json object")
}

func textOfObject(obj map[string]any) (string, error) {
	if started, _ := obj["executionStarted"].(bool); started {
		st, err := parseStarted(obj)
		if err != nil {
			return "", err
		}
		e := perr(ReasonExecutionStarted, "n8n answered executionStarted: the workflow uses the websocket (using response nodes) mode; "+
			"set the chat trigger's response mode to streaming, when last node finishes, or respond to webhook node")
		e.started = st
		return "", e
	}
	for _, k := range replyFields() {
		v, ok := obj[k]
		if !ok || v == nil {
			continue
		}
		if k == "message" && len(obj) <= 2 {
			if s, ok := v.(string); ok {
				if err := n8nStatusMessage(s); err != nil {
					return "", err
				}
			}
		}
		switch x := v.(type) {
		case string:
			if x == "" {
				return "", perr(ReasonEmpty, "reply "+k+" is empty")
			}
			return x, nil
		case map[string]any:
			// {"type":"text","text":"…"}, which the widget unwraps too.
			if x["type"] == "text" {
				if s, ok := x["text"].(string); ok && s != "" {
					return s, nil
				}
			}
		}
		b, err := json.Marshal(v)
		if err != nil {
			return "", perr(ReasonInvalid, "reply "+k+" cannot be encoded")
		}
		return string(b), nil
	}
	return "", perr(ReasonInvalid, "reply has none of output, text, message or response")
}

// n8nStatusMessage recognises the {"message": …} answers n8n gives when a
// workflow produced no reply, which must not be shown as one.
func n8nStatusMessage(s string) error {
	var e *protoError
	switch s {
	case "Workflow was started":
		e = perr(ReasonWorkflowNoReply, "n8n answered before the workflow ran (respond immediately mode)")
	case "Workflow executed successfully but the last node did not return any data", "No item to return was found":
		e = perr(ReasonWorkflowNoReply, "the workflow's last node returned no data")
	case "Error in workflow":
		e = perr(ReasonWorkflowError, "n8n reported an error in the workflow")
	default:
		return nil
	}
	e.detail = s
	return e
}

// htmlError reads a little of an HTML body for the log detail.
func htmlError(br *bufio.Reader) error {
	e := perr(ReasonHTML, "n8n answered with an html page")
	head, _ := br.Peek(min(br.Buffered(), 200))
	e.detail = sanitize(string(head))
	return e
}

// startsHTML reports whether a body starts like an HTML page (a proxy's
// error page); b starts at the first non-space byte.
func startsHTML(b []byte) bool {
	l := bytes.ToLower(b)
	return bytes.HasPrefix(l, []byte("<!doctype html")) || bytes.HasPrefix(l, []byte("<html"))
}

// looksHTML reports whether a stream line holds HTML, as the @n8n/chat
// widget checks lines for proxy error pages.
func looksHTML(b []byte) bool {
	l := bytes.ToLower(b)
	for _, m := range [...]string{"<!doctype", "<html", "</html>", "<head>", "<body"} {
		if bytes.Contains(l, []byte(m)) {
			return true
		}
	}
	return false
}

// skipSpace consumes leading white space and a UTF-8 byte order mark.
func skipSpace(br *bufio.Reader) error {
	for {
		p, err := br.Peek(1)
		if err != nil {
			return err
		}
		switch p[0] {
		case ' ', '\t', '\r', '\n':
			_, _ = br.Discard(1)
			continue
		case 0xEF:
			if bom, _ := br.Peek(3); bytes.Equal(bom, []byte{0xEF, 0xBB, 0xBF}) {
				_, _ = br.Discard(3)
				continue
			}
		}
		return nil
	}
}

// lineReader reads '\n'-terminated lines of at most max bytes.
type lineReader struct {
	br  *bufio.Reader
	max int
	buf []byte
}

// readLine returns the next line without its '\n' (the slice is reused by
// the next call), io.EOF after the last one.
func (l *lineReader) readLine() ([]byte, error) {
	l.buf = shrink(l.buf)
	for {
		frag, err := l.br.ReadSlice('\n')
		if len(l.buf)+len(frag) > l.max+1 {
			return nil, perr(ReasonLineTooLong, fmt.Sprintf("reply line exceeds %d bytes", l.max))
		}
		l.buf = appendFrag(l.buf, frag)
		switch {
		case err == nil:
			return l.buf[:len(l.buf)-1], nil
		case err == bufio.ErrBufferFull:
		case err == io.EOF:
			if len(l.buf) > 0 {
				return l.buf, nil
			}
			return nil, io.EOF
		default:
			return nil, err
		}
	}
}

// appendFrag appends a fragment of a line to it, doubling its capacity
// when full: a long line comes in fragments of the reader's buffer size,
// and append alone grows large slices by only a quarter each time.
func appendFrag(line, frag []byte) []byte {
	if n := len(line) + len(frag); n > cap(line) {
		grown := make([]byte, len(line), max(2*cap(line), n))
		copy(grown, line)
		line = grown
	}
	return append(line, frag...)
}

// keepBufBytes is the largest line buffer kept for the next line; a
// longer one (after a long line) is dropped, so that a stream waiting for
// its next line does not hold it.
const keepBufBytes = 64 << 10

// shrink empties b for reuse, or drops it when it is large.
func shrink(b []byte) []byte {
	if cap(b) > keepBufBytes {
		return nil
	}
	return b[:0]
}

// ndjsonDecoder reads n8n's streaming chunks.
type ndjsonDecoder struct {
	lr      lineReader
	pending []byte
}

func (d *ndjsonDecoder) next() (string, error) {
	for {
		line := d.pending
		d.pending = nil
		if line == nil {
			var err error
			if line, err = d.lr.readLine(); err != nil {
				return "", err
			}
		}
		text, err := chunkText(bytes.TrimSpace(line))
		if err != nil || text != "" {
			return text, err
		}
	}
}

// chunkText handles one NDJSON line: the text of an item, "" for lines
// without text (begin, end, keepalive, unknown types, blank lines), or an
// error for an error chunk and for lines that are not chunk objects.
func chunkText(line []byte) (string, error) {
	if len(line) == 0 {
		return "", nil
	}
	// The common line, whose content is a string (or null, or absent), is
	// decoded in one pass; other content (a number, an object) is taken
	// as written, by the general path below.
	var fast struct {
		Type    string  `json:"type"`
		Content *string `json:"content"`
	}
	if line[0] == '{' && json.Unmarshal(line, &fast) == nil {
		var text string
		if fast.Content != nil {
			text = *fast.Content
		}
		return chunkOf(fast.Type, text), chunkError(fast.Type, text)
	}
	var ch struct {
		Type    string          `json:"type"`
		Content json.RawMessage `json:"content"`
	}
	if line[0] != '{' || json.Unmarshal(line, &ch) != nil {
		if looksHTML(line) {
			e := perr(ReasonHTML, "n8n's stream holds an html page")
			e.detail = sanitize(string(line))
			return "", e
		}
		return "", perr(ReasonInvalid, "n8n's stream holds a line that is not a json object")
	}
	text := rawText(ch.Content)
	return chunkOf(ch.Type, text), chunkError(ch.Type, text)
}

// chunkOf is the reply text a chunk of type typ with content text carries:
// an item's, "" for begin, end, keepalive and unknown types (ignored, as
// the widget does) and for error chunks (see chunkError).
func chunkOf(typ, text string) string {
	if typ == "item" {
		return unwrapItem(text)
	}
	return ""
}

// chunkError is the error an error chunk stands for, nil for other types.
func chunkError(typ, text string) error {
	if typ != "error" {
		return nil
	}
	e := perr(ReasonWorkflowError, "n8n streamed an error chunk")
	e.detail = sanitize(text)
	return e
}

// rawText returns a JSON string's value, "" for null or absent, and other
// JSON values as their text.
func rawText(raw json.RawMessage) string {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return ""
	}
	if raw[0] == '"' {
		var s string
		if json.Unmarshal(raw, &s) == nil {
			return s
		}
	}
	return string(raw)
}

// unwrapItem returns the text inside an item whose content is a whole JSON
// reply object, as Respond to Webhook streams its body ("{\"output\":…}");
// any other content is returned unchanged.
func unwrapItem(s string) string {
	t := strings.TrimSpace(s)
	if len(t) < 2 || t[0] != '{' || t[len(t)-1] != '}' {
		return s
	}
	var obj map[string]json.RawMessage
	if json.Unmarshal([]byte(t), &obj) != nil {
		return s
	}
	for _, k := range replyFields() {
		var v string
		if raw, ok := obj[k]; ok && json.Unmarshal(raw, &v) == nil && v != "" {
			return v
		}
	}
	return s
}

// sseDecoder reads text/event-stream replies.
type sseDecoder struct {
	br      *bufio.Reader
	max     int
	line    []byte // a line longer than what br holds, joined
	skipLF  bool   // the last line ended with '\r': a '\n' next belongs to it
	data    []byte
	hasData bool
	event   string
	done    bool
}

func (d *sseDecoder) next() (string, error) {
	for {
		if d.done {
			return "", io.EOF
		}
		line, err := d.nextLine()
		if err == io.EOF {
			d.done = true
			// An event not closed by a blank line is still delivered.
			if text, err := d.dispatch(); err != nil || text != "" {
				return text, err
			}
			return "", io.EOF
		}
		if err != nil {
			return "", err
		}
		if len(line) == 0 {
			if text, err := d.dispatch(); err != nil || text != "" {
				return text, err
			}
			continue
		}
		if line[0] == ':' {
			continue // comment (keepalive)
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		value = bytes.TrimPrefix(value, []byte(" "))
		switch string(field) {
		case "data":
			if d.hasData {
				d.data = append(d.data, '\n')
			}
			d.data = append(d.data, value...)
			d.hasData = true
			if len(d.data) > d.max {
				return "", perr(ReasonLineTooLong, fmt.Sprintf("reply event exceeds %d bytes", d.max))
			}
		case "event":
			d.event = string(value)
		}
	}
}

// nextLine returns the next line without its end: "\r\n", "\n" or a lone
// "\r", as the event stream format says. The slice is valid until the next
// call: most lines are returned straight from br's buffer, and only one
// longer than the buffer is copied (into d.line), so a body of lone "\r"
// costs no memory per line. Every line, whatever ends it, is bounded by
// max.
func (d *sseDecoder) nextLine() ([]byte, error) {
	d.line = shrink(d.line)
	if d.skipLF {
		p, err := d.br.Peek(1)
		if len(p) == 0 {
			return nil, err
		}
		d.skipLF = false
		if p[0] == '\n' {
			_, _ = d.br.Discard(1)
		}
	}
	for {
		n := d.br.Buffered()
		if n == 0 {
			if _, err := d.br.Peek(1); err != nil {
				if err == io.EOF && len(d.line) > 0 {
					return d.line, nil // the last line, without an end
				}
				return nil, err
			}
			n = d.br.Buffered()
		}
		buf, _ := d.br.Peek(n)
		i := bytes.IndexAny(buf, "\r\n")
		if i < 0 {
			if len(d.line)+n > d.max {
				return nil, perr(ReasonLineTooLong, fmt.Sprintf("reply line exceeds %d bytes", d.max))
			}
			d.line = appendFrag(d.line, buf)
			_, _ = d.br.Discard(n)
			continue
		}
		if len(d.line)+i > d.max {
			return nil, perr(ReasonLineTooLong, fmt.Sprintf("reply line exceeds %d bytes", d.max))
		}
		line := buf[:i]
		if len(d.line) > 0 {
			d.line = appendFrag(d.line, line)
			line = d.line
		}
		d.skipLF = buf[i] == '\r'
		_, _ = d.br.Discard(i + 1)
		return line, nil
	}
}

// dispatch ends the current event and returns its text ("" for none).
func (d *sseDecoder) dispatch() (string, error) {
	data, hasData, event := string(d.data), d.hasData, d.event
	d.data, d.hasData, d.event = shrink(d.data), false, ""
	if !hasData {
		return "", nil
	}
	if data == "[DONE]" {
		d.done = true
		return "", nil
	}
	if event == "error" {
		e := perr(ReasonWorkflowError, "n8n's event stream sent an error event")
		e.detail = sanitize(data)
		return "", e
	}
	t := strings.TrimSpace(data)
	if strings.HasPrefix(t, "{") {
		if isChunkLine([]byte(t)) {
			return chunkText([]byte(t))
		}
		var obj map[string]json.RawMessage
		if json.Unmarshal([]byte(t), &obj) == nil {
			for _, k := range append(replyFields(), "content", "delta") {
				var s string
				if raw, ok := obj[k]; ok && json.Unmarshal(raw, &s) == nil {
					return s, nil
				}
			}
		}
	} else if strings.HasPrefix(t, `"`) {
		var s string
		if json.Unmarshal([]byte(t), &s) == nil {
			return s, nil
		}
	}
	return data, nil
}

// textDecoder streams a plain-text body as it arrives, never splitting a
// UTF-8 sequence between two chunks.
type textDecoder struct {
	br    *bufio.Reader
	buf   []byte
	carry []byte
	eof   bool
}

func (d *textDecoder) next() (string, error) {
	if d.buf == nil {
		// Held while the stream waits, so as small as the reader's
		// buffer: chunks are at most this long, their joined text is the
		// same.
		d.buf = make([]byte, replyBufSize)
	}
	for !d.eof {
		n := copy(d.buf, d.carry)
		m, err := d.br.Read(d.buf[n:])
		data := d.buf[:n+m]
		d.carry = d.carry[:0]
		switch {
		case err == io.EOF:
			d.eof = true
			if len(data) > 0 {
				return string(data), nil
			}
			return "", io.EOF
		case err != nil:
			return "", err
		}
		cut := completeUTF8(data)
		d.carry = append(d.carry, data[cut:]...)
		if cut > 0 {
			return string(data[:cut]), nil
		}
	}
	return "", io.EOF
}

// completeUTF8 returns the length of b without a trailing incomplete UTF-8
// sequence (invalid bytes count as complete).
func completeUTF8(b []byte) int {
	for i := 1; i <= utf8.UTFMax-1 && i <= len(b); i++ {
		if utf8.RuneStart(b[len(b)-i]) {
			if !utf8.FullRune(b[len(b)-i:]) {
				return len(b) - i
			}
			break
		}
	}
	return len(b)
}

// completeUTF8String is completeUTF8 for a string.
func completeUTF8String(s string) int {
	for i := 1; i <= utf8.UTFMax-1 && i <= len(s); i++ {
		if utf8.RuneStart(s[len(s)-i]) {
			if !utf8.FullRuneInString(s[len(s)-i:]) {
				return len(s) - i
			}
			break
		}
	}
	return len(s)
}

// staticDecoder yields one text, then io.EOF.
type staticDecoder struct {
	text string
	done bool
}

func (d *staticDecoder) next() (string, error) {
	if d.done || d.text == "" {
		return "", io.EOF
	}
	d.done = true
	return d.text, nil
}

// limitReader fails with a too_large error once more than n bytes are read.
type limitReader struct {
	r   io.Reader
	n   int64
	max int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		var one [1]byte
		n, err := l.r.Read(one[:])
		if n > 0 {
			return 0, perr(ReasonTooLarge, fmt.Sprintf("reply exceeds %d bytes", l.max))
		}
		return 0, err
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}
