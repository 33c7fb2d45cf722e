package n8n

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode"
)

// Stable error codes, for the "error" field of the route's JSON error or
// SSE error event.
const (
	// CodeUnavailable: n8n cannot be reached, the circuit is open, or n8n
	// (or a proxy in front of it) said 503/429. HTTP 503 with Retry-After.
	CodeUnavailable = "upstream_unavailable"
	// CodeTimeout: n8n did not answer in time (first byte, idle gap or
	// overall duration), or said 504. HTTP 504.
	CodeTimeout = "upstream_timeout"
	// CodeError: n8n answered, but not with a usable reply (status, HTML,
	// empty body, error chunk, broken stream, oversized reply, ...). HTTP 502.
	CodeError = "upstream_error"
	// CodeCanceled: the caller's context ended (the client went away) or the
	// caller closed the reply. Status 499 (nginx's "client closed request");
	// there is nobody left to answer.
	CodeCanceled = "canceled"
)

// Reason says in more detail why a request failed; it suits log fields and
// metric labels. It is not meant for clients.
type Reason string

// The reasons an Error can carry.
const (
	ReasonCircuitOpen       Reason = "circuit_open"       // the breaker rejected the request without calling n8n
	ReasonConnect           Reason = "connect"            // no connection, or it broke before a response (after any retries)
	ReasonStatus            Reason = "status"             // n8n answered with a non-2xx status (see UpstreamStatus)
	ReasonRedirect          Reason = "redirect"           // n8n answered with a redirect, which is not followed
	ReasonHTML              Reason = "html"               // an HTML page (typically a proxy's error page)
	ReasonEmpty             Reason = "empty"              // no reply text at all
	ReasonWorkflowError     Reason = "workflow_error"     // n8n streamed an error chunk or said "Error in workflow"
	ReasonExecutionStarted  Reason = "execution_started"  // n8n's WebSocket ("response nodes") mode
	ReasonInvalid           Reason = "invalid_reply"      // a reply that cannot be parsed
	ReasonLineTooLong       Reason = "line_too_long"      // a line over Config.MaxLineBytes
	ReasonTooLarge          Reason = "too_large"          // a reply over Config.MaxReplyBytes
	ReasonRead              Reason = "read"               // the connection broke while reading the reply
	ReasonFirstByteTimeout  Reason = "first_byte_timeout" // Config.UpstreamTimeout passed before the first text
	ReasonIdleTimeout       Reason = "idle_timeout"       // Config.StreamIdleTimeout passed between chunks
	ReasonMaxDuration       Reason = "max_duration"       // Config.MaxStreamDuration passed
	ReasonCanceled          Reason = "canceled"           // the caller's context ended
	ReasonClosed            Reason = "closed"             // the caller closed the Reply before its end
	ReasonShutdown          Reason = "shutdown"           // Send after Client.Close
	ReasonWorkflowNoReply   Reason = "workflow_no_reply"  // n8n said the workflow started or ended without a reply
	ReasonUnsupportedFormat Reason = "unsupported_format" // a Content-Encoding the client cannot decode
)

// Error is the error Send and Reply.Next return for everything that goes
// wrong with n8n. Use errors.As to get it.
//
// Before the first chunk (Send fails), Status is the HTTP status the route
// should answer with, and RetryAfter (503 only) the Retry-After to send.
// After the first chunk (Next fails), MidStream is true: the route has
// already started its stream and ends it with an error event.
type Error struct {
	// Status is the HTTP status for the route's answer: 502, 503, 504, or
	// 499 for CodeCanceled.
	Status int
	// Code is one of the Code constants; stable, safe to show to clients.
	Code string
	// Reason is the detailed cause, for logs and metrics.
	Reason Reason
	// Message is a human-readable sentence, safe to show to clients: it
	// never holds the webhook URL, secrets or n8n's own error text.
	Message string
	// RetryAfter is set on 503 answers: how long the client should wait.
	RetryAfter time.Duration
	// MidStream is true when reply text had already been handed to the
	// caller (the error came from Reply.Next).
	MidStream bool
	// UpstreamStatus is n8n's HTTP status, when it answered.
	UpstreamStatus int
	// Detail is a short, sanitized excerpt of what n8n said (its error
	// chunk or error body), for logs only: never show it to clients.
	Detail string
	// Err is the underlying cause, if any; it never holds the webhook URL.
	Err error
}

// Error implements error. It holds the code, reason, upstream status and
// cause, never the webhook URL or secrets.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("n8n: ")
	b.WriteString(e.Code)
	if e.Reason != "" {
		b.WriteString(" (" + string(e.Reason) + ")")
	}
	if e.MidStream {
		b.WriteString(" mid-stream")
	}
	if e.UpstreamStatus != 0 {
		fmt.Fprintf(&b, ", n8n answered %d", e.UpstreamStatus)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the cause, so errors.Is(err, context.Canceled) works for
// cancelled requests.
func (e *Error) Unwrap() error { return e.Err }

// RetryAfterSeconds returns RetryAfter rounded up to whole seconds (at
// least 1) for the Retry-After header, or 0 when RetryAfter is not set.
func (e *Error) RetryAfterSeconds() int {
	if e.RetryAfter <= 0 {
		return 0
	}
	s := int((e.RetryAfter + time.Second - 1) / time.Second)
	return max(s, 1)
}

// clientMessage returns the text for Error.Message.
func clientMessage(r Reason) string {
	switch r {
	case ReasonCircuitOpen:
		return "The chat service is temporarily unavailable. Please try again shortly."
	case ReasonConnect:
		return "The chat service cannot be reached right now. Please try again shortly."
	case ReasonStatus:
		return "The chat service returned an error."
	case ReasonRedirect:
		return "The chat service returned an unexpected redirect."
	case ReasonHTML:
		return "The chat service returned an error page instead of a reply."
	case ReasonEmpty:
		return "The chat service returned an empty reply."
	case ReasonWorkflowError:
		return "The chat workflow failed."
	case ReasonExecutionStarted:
		return "The chat workflow is set to n8n's WebSocket mode (\"Using Response Nodes\"), which only the @n8n/chat route with its chat socket carries on; here use the Streaming, When Last Node Finishes or Respond to Webhook response mode."
	case ReasonInvalid:
		return "The chat service returned a reply that could not be read."
	case ReasonLineTooLong:
		return "The chat service returned a reply line that is too long."
	case ReasonTooLarge:
		return "The chat service returned a reply that is too large."
	case ReasonRead:
		return "The connection to the chat service broke."
	case ReasonFirstByteTimeout:
		return "The chat service did not answer in time."
	case ReasonIdleTimeout:
		return "The chat service stopped answering."
	case ReasonMaxDuration:
		return "The reply took too long and was cut off."
	case ReasonCanceled:
		return "The request was canceled."
	case ReasonClosed:
		return "The reply was closed."
	case ReasonShutdown:
		return "The chat service is shutting down."
	case ReasonWorkflowNoReply:
		return "The chat workflow finished without producing a reply."
	case ReasonUnsupportedFormat:
		return "The chat service returned a reply in an unsupported encoding."
	}
	return "The chat service failed."
}

// newError builds an Error with the status and code that go with reason.
func newError(reason Reason, cause error) *Error {
	e := &Error{Reason: reason, Err: cause, Message: clientMessage(reason)}
	switch reason {
	case ReasonCircuitOpen, ReasonConnect, ReasonShutdown:
		e.Status, e.Code = http.StatusServiceUnavailable, CodeUnavailable
	case ReasonFirstByteTimeout, ReasonIdleTimeout, ReasonMaxDuration:
		e.Status, e.Code = http.StatusGatewayTimeout, CodeTimeout
	case ReasonCanceled, ReasonClosed:
		e.Status, e.Code = 499, CodeCanceled
	default:
		e.Status, e.Code = http.StatusBadGateway, CodeError
	}
	return e
}

// statusError maps a non-2xx answer from n8n.
func statusError(status int, retryAfter time.Duration, detail string) *Error {
	e := newError(ReasonStatus, fmt.Errorf("unexpected status %d", status))
	e.UpstreamStatus = status
	e.Detail = detail
	switch status {
	case http.StatusServiceUnavailable, http.StatusTooManyRequests:
		e.Status, e.Code = http.StatusServiceUnavailable, CodeUnavailable
		e.Message = clientMessage(ReasonCircuitOpen)
		e.RetryAfter = max(retryAfter, time.Second)
	case http.StatusGatewayTimeout:
		e.Status, e.Code = http.StatusGatewayTimeout, CodeTimeout
		e.Message = clientMessage(ReasonFirstByteTimeout)
	}
	return e
}

// protoError is what the reply parsers return for a reply that is not
// usable; the Reply turns it into an *Error.
type protoError struct {
	reason Reason
	msg    string // lowercase, for Error.Err
	detail string // what n8n said, for Error.Detail
	// started is n8n's executionStarted answer (ReasonExecutionStarted),
	// which Send hands out as a Reply when the caller can carry it on.
	started *ExecutionStarted
}

func (p *protoError) Error() string { return p.msg }

func perr(reason Reason, msg string) *protoError { return &protoError{reason: reason, msg: msg} }

// sanitize makes upstream text safe for a log line: printable characters
// only, at most 200 runes.
func sanitize(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	var b strings.Builder
	n := 0
	for _, r := range s {
		if n == 200 {
			b.WriteString("…")
			break
		}
		if !unicode.IsPrint(r) {
			r = ' '
		}
		b.WriteRune(r)
		n++
	}
	return strings.TrimSpace(b.String())
}

// Errors for misuse of the API (not upstream trouble).
var (
	errNoSession = errors.New("n8n: request has no session id")
	errMetadata  = errors.New("n8n: metadata must be a JSON object")
)
