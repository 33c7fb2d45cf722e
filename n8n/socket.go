package n8n

import (
	"context"
	"errors"
	"net/http"
	"net/url"

	"github.com/coder/websocket"
)

// chatSocketPath is where n8n serves its chat WebSocket: the main instance
// accepts any path starting with /chat, on its own origin.
const chatSocketPath = "/chat"

// socketURL returns n8n's chat WebSocket URL: raw when set (checked), else
// /chat on the webhook's origin, with the ws or wss scheme.
func socketURL(raw string, webhook *url.URL) (string, error) {
	if raw == "" {
		u := &url.URL{Scheme: "ws", Host: webhook.Host, Path: chatSocketPath}
		if webhook.Scheme == "https" {
			u.Scheme = "wss"
		}
		return u.String(), nil
	}
	u, err := url.Parse(raw)
	switch {
	case err != nil:
		return "", errors.New("n8n: socket URL is not a valid URL")
	case u.Host == "":
		return "", errors.New("n8n: socket URL has no host")
	case u.User != nil:
		return "", errors.New("n8n: socket URL must not contain credentials")
	case u.RawQuery != "" || u.Fragment != "":
		return "", errors.New("n8n: socket URL must not have a query or fragment")
	}
	switch u.Scheme {
	case "ws", "http":
		u.Scheme = "ws"
	case "wss", "https":
		u.Scheme = "wss"
	default:
		return "", errors.New("n8n: socket URL must be ws, wss, http or https")
	}
	if u.Path == "" || u.Path == "/" {
		u.Path = chatSocketPath
	}
	return u.String(), nil
}

// DialChat opens n8n's chat WebSocket for an execution that answered
// executionStarted: sessionId, executionId and isPublic=true as the
// @n8n/chat widget sends them, and n8n's own resumeToken (newer n8n
// checks it) when it sent one. ctx bounds the handshake only; Config's
// DialTimeout applies too. The socket reads messages up to MaxReplyBytes.
// n8n's socket has no authentication of its own: callers must only dial
// for executions they started.
func (c *Client) DialChat(ctx context.Context, sessionID, executionID, resumeToken string) (*websocket.Conn, error) {
	return c.DialChatWith(ctx, ChatDial{SessionID: sessionID, ExecutionID: executionID, ResumeToken: resumeToken})
}

// ChatDial names the execution a chat socket is for.
type ChatDial struct {
	SessionID, ExecutionID string
	// ResumeToken is n8n's own token for the execution (newer n8n), or "".
	ResumeToken string
	// Integrated leaves isPublic out of the URL. n8n keys its sockets by
	// sessionId, executionId and whether isPublic is set, and a second
	// socket under a key still open breaks both (n8n terminates the old
	// one, whose close handler then removes the new one's entry): a
	// socket opened while another may still be open for the execution
	// must use the other key.
	Integrated bool
}

// DialChatWith is DialChat with the socket key chosen (see ChatDial).
func (c *Client) DialChatWith(ctx context.Context, d ChatDial) (*websocket.Conn, error) {
	sessionID, executionID, resumeToken := d.SessionID, d.ExecutionID, d.ResumeToken
	if c.closed.Load() {
		return nil, newError(ReasonShutdown, errors.New("client closed"))
	}
	u, err := url.Parse(c.cfg.SocketURL)
	if err != nil {
		return nil, errors.New("n8n: socket URL is not a valid URL") // checked in New
	}
	q := url.Values{"sessionId": {sessionID}, "executionId": {executionID}}
	if !d.Integrated {
		q.Set("isPublic", "true")
	}
	if resumeToken != "" {
		q.Set("token", resumeToken)
	}
	u.RawQuery = q.Encode()
	ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	hdr := http.Header{"User-Agent": {c.cfg.UserAgent}}
	conn, resp, err := websocket.Dial(ctx, u.String(), &websocket.DialOptions{
		HTTPClient: c.socketHTTP,
		HTTPHeader: hdr,
	})
	if err != nil {
		e := newError(ReasonConnect, stripURL(err))
		if resp != nil {
			e.UpstreamStatus = resp.StatusCode
		}
		return nil, e
	}
	conn.SetReadLimit(c.cfg.MaxReplyBytes)
	return conn, nil
}
