// Package n8n is the upstream client of the chat proxy: it builds the
// request n8n receives (SPEC §5), authenticates it (jwt, basic, header or
// none), sends it over one pooled transport per upstream with timeouts,
// retries (only while the request has provably not reached n8n) and a
// circuit breaker, and turns
// n8n's reply, whatever its shape, into a stream of text chunks.
//
// Use:
//
//	c, err := n8n.New(n8n.Config{WebhookURL: ..., SessionSecret: ...})
//	defer c.Close()
//	reply, err := c.Send(ctx, &n8n.Request{SessionID: id, Message: text, ...})
//	if err != nil {
//		// *n8n.Error: answer e.Status with e.Code / e.Message (+ Retry-After)
//	}
//	defer reply.Close()
//	for {
//		text, err := reply.Next()
//		if err == io.EOF { break }          // complete
//		if err != nil { /* *n8n.Error with MidStream: error event + [DONE] */ }
//		// write text to the client
//	}
//
// Send returns once the first text is available, so a failure before it
// is a plain HTTP error and a failure after it is a stream error. ctx
// governs the whole exchange: cancelling it cancels the upstream request
// at once (pass r.Context() for on_client_disconnect cancel, or
// context.WithoutCancel(r.Context()) for finish).
package n8n

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Client talks to one n8n webhook. It is safe for concurrent use.
type Client struct {
	cfg       Config
	url       string // never put into errors or logs
	transport *http.Transport
	http      *http.Client
	breaker   *breaker
	closed    atomic.Bool
	// socketHTTP dials the chat WebSocket: HTTP/1.1 only (an upgrade
	// cannot ride HTTP/2), redirects refused.
	socketHTTP *http.Client
	// waitingProxy forwards waiting-webhook requests (ForwardWaiting).
	waitingOnce  sync.Once
	waitingProxy *httputil.ReverseProxy
}

// New validates cfg and returns a Client. It does no network I/O.
func New(cfg Config) (*Client, error) {
	cfg, u, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	dialer := &net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		Proxy:                  http.ProxyFromEnvironment,
		DialContext:            dialer.DialContext,
		ForceAttemptHTTP2:      true, // HTTP/2 when the TLS server offers it
		MaxIdleConns:           64,
		MaxIdleConnsPerHost:    64,
		IdleConnTimeout:        90 * time.Second,
		TLSHandshakeTimeout:    cfg.DialTimeout,
		ExpectContinueTimeout:  time.Second,
		MaxResponseHeaderBytes: 64 << 10,
		// The client sets Accept-Encoding itself and decodes gzip and br
		// (the transport alone would only ask for, and decode, gzip).
		DisableCompression: true,
	}
	if cfg.TLSConfig != nil {
		tr.TLSClientConfig = cfg.TLSConfig.Clone()
	}
	c := &Client{
		cfg:       cfg,
		url:       u.String(),
		transport: tr,
		http: &http.Client{
			Transport: tr,
			// A redirect is an error: following it would re-send the message
			// (and the credentials) somewhere else.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
	str := tr.Clone()
	str.ForceAttemptHTTP2 = false
	str.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	c.socketHTTP = &http.Client{
		Transport:     str,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	c.breaker = newBreaker(cfg.Breaker, cfg.OnStateChange)
	return c, nil
}

// State returns the circuit breaker's state, for /health and metrics.
func (c *Client) State() BreakerState { return c.breaker.State() }

// Close closes the idle pooled connections and makes later Sends fail.
// Replies in progress are not interrupted.
func (c *Client) Close() error {
	c.closed.Store(true)
	c.transport.CloseIdleConnections()
	return nil
}

// Sentinel causes for the request context, to tell timeouts apart.
var (
	errFirstByteTimeout = errors.New("no reply text within the upstream timeout")
	errIdleTimeout      = errors.New("no data within the stream idle timeout")
	errMaxDuration      = errors.New("reply exceeded the max stream duration")
	errReplyClosed      = errors.New("reply closed by the caller")
	errReplyDone        = errors.New("reply finished")
)

// Send forwards req to n8n and returns once the first reply text (or the
// whole non-streamed reply) is available. Failures up to then end as an
// *Error (retried only while the request had not reached n8n, see
// Config.MaxRetries) whose Status is what the route should answer (502, 503 with
// Retry-After, 504; 499 when ctx ended). A malformed req (no SessionID,
// Metadata not a JSON object) is a plain error: a bug in the caller.
// The caller must Close the Reply.
func (c *Client) Send(ctx context.Context, req *Request) (*Reply, error) {
	if c.closed.Load() {
		return nil, newError(ReasonShutdown, errors.New("client closed"))
	}
	start := time.Now()
	body, token, err := c.buildBody(req, start)
	if err != nil {
		return nil, err
	}
	var form *multipartBody // nil: the JSON body
	if len(req.Files) > 0 {
		if form, err = newMultipartBody(body, req.Files); err != nil {
			return nil, err
		}
	}
	done, err := c.breaker.allow()
	if err != nil {
		e := newError(ReasonCircuitOpen, err)
		e.RetryAfter = c.breaker.retryAfter()
		return nil, e
	}

	sctx, cancel := context.WithCancelCause(ctx)
	r := &Reply{client: c, ctx: sctx, cancel: cancel, done: done}
	r.maxTimer = time.AfterFunc(c.cfg.MaxStreamDuration, func() { cancel(errMaxDuration) })
	firstTimer := time.AfterFunc(c.cfg.UpstreamTimeout, func() { cancel(errFirstByteTimeout) })
	fail := func(err error) (*Reply, error) {
		firstTimer.Stop()
		e := r.classify(err, false)
		r.finish(e) // counts the outcome: the circuit may open now
		if e.Status == http.StatusServiceUnavailable {
			if c.State() == StateOpen {
				e.RetryAfter = max(e.RetryAfter, c.breaker.retryAfter())
			} else if e.RetryAfter == 0 {
				e.RetryAfter = time.Second
			}
		}
		return nil, e
	}

	resp, err := c.roundTrip(sctx, body, form, token)
	if err != nil {
		return fail(err)
	}
	r.body, r.status = resp.Body, resp.StatusCode
	if err := checkStatus(resp); err != nil {
		return fail(err)
	}
	if err := r.open(resp); err != nil {
		var p *protoError
		if req.ResponseNodes && errors.As(err, &p) && p.started != nil {
			firstTimer.Stop()
			r.started, r.term = p.started, io.EOF
			r.finish(nil) // n8n answered as it should: a success
			return r, nil
		}
		return fail(err)
	}
	text, err := r.nextText()
	if err == io.EOF {
		err = perr(ReasonEmpty, "reply holds no text")
		if sctx.Err() != nil {
			err = context.Cause(sctx) // a body cut short by a cancellation
		}
	}
	if !firstTimer.Stop() && err == nil {
		// The first text arrived just as the timer fired: ctx is already
		// cancelled, so the reply cannot go on.
		err = context.Cause(sctx)
	}
	if err != nil {
		return fail(err)
	}
	r.pending = text
	r.idleTimer = time.AfterFunc(c.cfg.StreamIdleTimeout, func() { cancel(errIdleTimeout) })
	r.idleArmed.Store(true)
	return r, nil
}

// roundTrip sends the request. It is re-sent only when it provably never
// reached n8n (see retryable): once it may have, whatever comes back (a
// status, a dropped connection) is final, so a message never runs the
// workflow twice.
func (c *Client) roundTrip(ctx context.Context, body []byte, form *multipartBody, token string) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		// wrote is set as soon as the request's headers are handed to the
		// connection (perhaps still in its write buffer): from then on
		// n8n may have the request. For HTTP/2 the stream's writer runs
		// apart from RoundTrip, and headers always precede the body.
		var wrote atomic.Bool
		tctx := httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
			WroteHeaders: func() { wrote.Store(true) },
			WroteRequest: func(httptrace.WroteRequestInfo) { wrote.Store(true) },
		})
		hreq, err := http.NewRequestWithContext(tctx, http.MethodPost, c.url, bytes.NewReader(body))
		if err != nil {
			return nil, errors.New("building request failed") // the URL was checked in New
		}
		c.setHeaders(hreq.Header, token)
		if form != nil {
			form.attach(hreq)
		}
		resp, err := c.http.Do(hreq)
		if err == nil {
			return resp, nil // any status is n8n's answer: never re-sent
		}
		err = stripURL(err)
		if attempt >= c.cfg.MaxRetries || wrote.Load() || !retryable(ctx, err) {
			return nil, err
		}
		if err := sleepCtx(ctx, c.backoff(attempt)); err != nil {
			return nil, err
		}
	}
}

// backoff returns the delay before retry number attempt+1: the base
// doubled per attempt, capped, then a random point in its upper half.
func (c *Client) backoff(attempt int) time.Duration {
	d := c.cfg.RetryBackoff << min(attempt, 16)
	if d <= 0 || d > c.cfg.RetryMaxBackoff {
		d = c.cfg.RetryMaxBackoff
	}
	return d/2 + rand.N(d/2+1)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// retryable reports whether a request that failed before it was written
// is worth sending again: the connection could not be made (refused, DNS,
// timeout, TLS handshake) or broke before the request went out. Not when
// ctx ended, nor when n8n's certificate was refused (a retry fails alike).
// roundTrip asks only about requests whose headers were never written
// (the HTTP/1 transport waits for its writer before it returns an error).
func retryable(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	var certErr *tls.CertificateVerificationError
	var unknownAuth x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var invalidErr x509.CertificateInvalidError
	switch {
	case errors.As(err, &certErr), errors.As(err, &unknownAuth), errors.As(err, &hostErr), errors.As(err, &invalidErr):
		return false
	}
	return true
}

// stripURL removes the *url.Error wrapper, whose message holds the URL.
func stripURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func drain(body io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(body, 64<<10))
	_ = body.Close()
}

// checkStatus turns a non-2xx response into an error (and closes its body).
func checkStatus(resp *http.Response) error {
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	defer drain(resp.Body)
	if resp.StatusCode >= 300 && resp.StatusCode < 400 {
		e := newError(ReasonRedirect, errors.New("unexpected redirect "+strconv.Itoa(resp.StatusCode)))
		e.UpstreamStatus = resp.StatusCode
		return e
	}
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	return statusError(resp.StatusCode, parseRetryAfter(resp.Header.Get("Retry-After")), sanitize(string(snippet)))
}

// parseRetryAfter reads a Retry-After in seconds or as an HTTP date,
// capped at an hour.
func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	var d time.Duration
	if s, err := strconv.Atoi(v); err == nil && s > 0 {
		d = time.Duration(s) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = time.Until(t)
	}
	return min(max(d, 0), time.Hour)
}
