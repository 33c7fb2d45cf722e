package n8n

import (
	"bufio"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/andybalholm/brotli"
	"github.com/chatproxy/caddy-chatproxy/internal/cleantext"
)

// Reply is n8n's answer, read as a sequence of text chunks. Next must be
// called from one goroutine at a time; Close may be called from any
// goroutine, also while Next is blocked (Next then returns an Error with
// ReasonClosed).
type Reply struct {
	client *Client
	ctx    context.Context // the request's: the caller's plus timeouts and Close
	cancel context.CancelCauseFunc
	done   func(error) // reports the outcome to the circuit breaker

	maxTimer  *time.Timer
	idleTimer *time.Timer
	idleArmed atomic.Bool

	body   io.ReadCloser // nil until n8n answered
	status int           // n8n's HTTP status, once it answered
	raw    *activityReader
	dec    decoder
	format Format

	pending string            // the first text, read by Send
	started *ExecutionStarted // n8n's executionStarted answer, see Started
	carry   []byte            // a UTF-8 sequence cut at the end of the last text
	term    error             // io.EOF or the *Error that ended the reply
	onWait  func()            // see OnWait

	finishOnce sync.Once
}

// Format returns the detected shape of n8n's reply.
func (r *Reply) Format() Format { return r.format }

// StatusCode returns the HTTP status n8n answered with (a 2xx, since Send
// returns a Reply only for those), for logs.
func (r *Reply) StatusCode() int { return r.status }

// OnWait sets a function that Next calls each time it is about to read
// more of the body from n8n, that is when every byte received so far has
// been handed out or is part of a chunk still incomplete. A relay flushes
// its output there: chunks that arrived together leave in one write, and
// none waits in a buffer while n8n is silent. It must be set before the
// first Next and runs on Next's goroutine.
func (r *Reply) OnWait(f func()) { r.onWait = f }

// Next returns the next piece of reply text: never empty, valid UTF-8
// without NUL (see cleantext.String), so it can be relayed and stored as
// it is; a UTF-8 sequence n8n split between two chunks is joined. It returns
// io.EOF at the clean end of the reply, or an *Error with MidStream set
// when the reply broke off (connection lost, timeout, error chunk, limits,
// the caller's context ended); the text handed out before stays valid.
// After the end, Next keeps returning the same error.
func (r *Reply) Next() (string, error) {
	if r.pending != "" {
		t := r.pending
		r.pending = ""
		return t, nil
	}
	if r.term != nil {
		return "", r.term
	}
	text, err := r.nextText()
	switch {
	case err == nil:
		return text, nil
	case err == io.EOF && r.ctx.Err() == nil:
		r.term = io.EOF
		r.finish(nil)
		return "", io.EOF
	case err == io.EOF:
		err = context.Cause(r.ctx) // a body cut short by a cancellation
	}
	e := r.classify(err, true)
	r.term = e
	r.finish(e)
	return "", e
}

// nextText returns the decoder's next text made clean to relay and store:
// invalid UTF-8 becomes U+FFFD and NUL is removed (PostgreSQL's text
// refuses both). Incomplete UTF-8 at the end of a text is carried over to
// the next one, so a character n8n split between two chunks survives;
// left incomplete at the end of the reply, it becomes U+FFFD. Texts that
// are empty once cleaned are skipped.
func (r *Reply) nextText() (string, error) {
	for {
		text, err := r.dec.next()
		final := false
		if err == io.EOF && len(r.carry) > 0 {
			text, err, final = "", nil, true
		}
		if err != nil {
			return "", err
		}
		if len(r.carry) > 0 {
			text = string(r.carry) + text
			r.carry = r.carry[:0]
		}
		if !final {
			if cut := completeUTF8String(text); cut < len(text) {
				r.carry = append(r.carry, text[cut:]...)
				text = text[:cut]
			}
		}
		if text = cleantext.String(text); text != "" {
			return text, nil
		}
	}
}

// ReadAll reads the rest of the reply and returns its text. On error it
// returns the text read so far with the error.
func (r *Reply) ReadAll() (string, error) {
	var b strings.Builder
	for {
		t, err := r.Next()
		b.WriteString(t)
		if err == io.EOF {
			return b.String(), nil
		}
		if err != nil {
			return b.String(), err
		}
	}
}

// Close stops the request to n8n (if still running) and frees its
// resources. It is safe to call more than once and concurrently with Next.
// A reply closed before its end counts neither as a success nor as a
// failure for the circuit breaker.
func (r *Reply) Close() error {
	r.cancel(errReplyClosed)
	r.finish(newError(ReasonClosed, errReplyClosed))
	return nil
}

// finish ends the exchange once: timers stopped, request cancelled, body
// closed, outcome reported to the circuit breaker.
func (r *Reply) finish(outcome error) {
	r.finishOnce.Do(func() {
		r.idleArmed.Store(false)
		r.maxTimer.Stop()
		if r.idleTimer != nil {
			r.idleTimer.Stop()
		}
		r.cancel(errReplyDone)
		if r.body != nil {
			_ = r.body.Close()
		}
		r.done(outcome)
	})
}

// touch re-arms the idle timer: bytes arrived from n8n.
func (r *Reply) touch() {
	if r.idleArmed.Load() {
		r.idleTimer.Reset(r.client.cfg.StreamIdleTimeout)
	}
}

// open sets up decompression, the size limit and the format decoder, and
// reads the body up to the point where its format is known.
func (r *Reply) open(resp *http.Response) error {
	r.raw = &activityReader{r: resp.Body, reply: r}
	var src io.Reader = r.raw
	switch ce := strings.ToLower(strings.TrimSpace(resp.Header.Get("Content-Encoding"))); ce {
	case "", "identity":
	case "gzip", "x-gzip":
		zr, err := gzip.NewReader(src)
		if err != nil {
			if err == io.EOF {
				return perr(ReasonEmpty, "reply body is empty")
			}
			return r.decodeErr(err)
		}
		src = &decodeReader{r: zr, reply: r}
	case "br":
		src = &decodeReader{r: brotli.NewReader(src), reply: r}
	default:
		return perr(ReasonUnsupportedFormat, fmt.Sprintf("unsupported content encoding %q", sanitize(ce)))
	}
	cfg := &r.client.cfg
	dec, format, err := sniff(newReplyReader(src, cfg.MaxReplyBytes), resp.Header.Get("Content-Type"), cfg.MaxLineBytes)
	if err != nil {
		return err
	}
	r.dec, r.format = dec, format
	return nil
}

// replyBufSize is the read buffer of a reply, net/http's default size: it
// is held for the whole life of a stream, idle ones included. It does not
// bound lines: the parsers join the fragments of longer ones (lineReader,
// readFirstLine) up to MaxLineBytes.
const replyBufSize = 4 << 10

// newReplyReader is what the parsers read: the (decompressed) body, cut
// off after maxReply bytes, buffered.
func newReplyReader(src io.Reader, maxReply int64) *bufio.Reader {
	return bufio.NewReaderSize(&limitReader{r: src, n: maxReply, max: maxReply}, replyBufSize)
}

// decodeErr tells a broken compressed stream (an invalid reply) from a
// broken connection (which the raw reader saw).
func (r *Reply) decodeErr(err error) error {
	if raw := r.raw.err; raw != nil && raw != io.EOF {
		return raw
	}
	var p *protoError
	if errors.As(err, &p) {
		return err
	}
	return perr(ReasonInvalid, "compressed reply is corrupt: "+err.Error())
}

// classify turns any error met while talking to n8n into an *Error.
func (r *Reply) classify(err error, mid bool) *Error {
	var e *Error
	if !errors.As(err, &e) {
		e = r.classifyOther(err)
	}
	e.MidStream = mid
	return e
}

func (r *Reply) classifyOther(err error) *Error {
	if r.ctx.Err() != nil {
		cause := context.Cause(r.ctx)
		switch {
		case errors.Is(cause, errFirstByteTimeout):
			return newError(ReasonFirstByteTimeout, cause)
		case errors.Is(cause, errIdleTimeout):
			return newError(ReasonIdleTimeout, cause)
		case errors.Is(cause, errMaxDuration):
			return newError(ReasonMaxDuration, cause)
		case errors.Is(cause, errReplyClosed), errors.Is(cause, errReplyDone):
			return newError(ReasonClosed, errReplyClosed)
		default: // the caller's context ended
			return newError(ReasonCanceled, cause)
		}
	}
	var p *protoError
	switch {
	case errors.As(err, &p):
		e := newError(p.reason, p)
		e.Detail = p.detail
		return e
	case r.body == nil:
		return newError(ReasonConnect, err)
	default:
		return newError(ReasonRead, err)
	}
}

// activityReader reads the raw body, re-arms the idle timer on every byte
// and remembers the body's last error.
type activityReader struct {
	r     io.Reader
	reply *Reply
	err   error
}

func (a *activityReader) Read(p []byte) (int, error) {
	if a.reply.onWait != nil {
		a.reply.onWait()
	}
	n, err := a.r.Read(p)
	if n > 0 {
		a.reply.touch()
	}
	if err != nil {
		a.err = err
	}
	return n, err
}

// decodeReader reads a decompressor and reports its format errors as
// invalid replies (connection errors pass through).
type decodeReader struct {
	r     io.Reader
	reply *Reply
}

func (d *decodeReader) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	if err != nil && err != io.EOF {
		err = d.reply.decodeErr(err)
	}
	return n, err
}
