package n8n

import (
	"context"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"time"
)

// WaitingPathPrefix is where n8n serves the webhooks that resume waiting
// executions: the approval buttons' links of a Send and Wait node are
// <WEBHOOK_URL>webhook-waiting/<executionId>/<nodeId>?approved=…&signature=….
const WaitingPathPrefix = "/webhook-waiting/"

// waitingTimeout bounds one forwarded waiting-webhook request: n8n answers
// it once the execution has been resumed.
const waitingTimeout = 60 * time.Second

// IsWaitingLink reports whether r is a request the proxy forwards to n8n's
// waiting webhooks: a path below WaitingPathPrefix naming an execution and
// a node, with a signature in the query (n8n signs the links of its
// approval buttons; unsigned resume URLs, such as a Wait node's, are not
// forwarded, since execution ids are sequential).
func IsWaitingLink(r *http.Request) bool {
	rest, ok := strings.CutPrefix(r.URL.Path, WaitingPathPrefix)
	if !ok {
		return false
	}
	exec, node, ok := strings.Cut(rest, "/")
	if !ok || exec == "" || node == "" || strings.Contains(node, "/") || strings.Contains(rest, "..") {
		return false
	}
	return r.URL.Query().Get("signature") != ""
}

// ForwardWaiting passes a waiting-webhook request (GET or POST; see
// IsWaitingLink) to n8n on the webhook URL's origin, with the visitor's
// Host kept: n8n checks the link's signature against the host it was
// made for, its WEBHOOK_URL, which is then the proxy's public origin. The
// visitor's cookies and credentials are not sent. onError answers when
// n8n cannot be reached.
func (c *Client) ForwardWaiting(w http.ResponseWriter, r *http.Request, onError func(http.ResponseWriter, *http.Request, error)) {
	c.waitingOnce.Do(func() {
		target, _ := url.Parse(c.url) // checked in New
		c.waitingProxy = &httputil.ReverseProxy{
			Transport: c.transport,
			Rewrite: func(pr *httputil.ProxyRequest) {
				out := pr.Out
				out.URL.Scheme, out.URL.Host = target.Scheme, target.Host
				out.URL.Path, out.URL.RawPath = pr.In.URL.Path, pr.In.URL.RawPath
				out.URL.RawQuery = pr.In.URL.RawQuery
				out.Host = pr.In.Host
				out.Header.Del("Cookie")
				out.Header.Del("Authorization")
				out.Header.Set("User-Agent", c.cfg.UserAgent)
				pr.SetXForwarded()
			},
		}
	})
	if c.closed.Load() {
		onError(w, r, newError(ReasonShutdown, nil))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), waitingTimeout)
	defer cancel()
	p := *c.waitingProxy
	p.ErrorHandler = func(w http.ResponseWriter, r *http.Request, err error) {
		onError(w, r, newError(ReasonConnect, stripURL(err)))
	}
	p.ServeHTTP(w, r.WithContext(ctx))
}
