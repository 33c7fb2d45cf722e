package n8n

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"
)

// Request is one chat message to forward to n8n. It holds explicit values
// only (never the incoming *http.Request), so nothing of the client's own
// request, such as its Authorization header or cookies, can reach n8n.
type Request struct {
	// Action is the n8n Chat Trigger action. Empty means "sendMessage".
	Action string
	// SessionID names the conversation: the body's sessionId (what n8n's
	// memory nodes key on) and session.session_id, and the token's sub and
	// session_id. Required.
	SessionID string
	// Message is the visitor's text, sent as chatInput and message.
	Message string
	// Metadata is forwarded as the body's metadata; it must be a JSON
	// object. Nil means {}.
	Metadata json.RawMessage
	// OriginDomain is the site the session belongs to.
	OriginDomain string
	// PageURL is the page the visitor is on.
	PageURL string
	// ClientIP is the visitor's IP address (Caddy's client_ip).
	ClientIP string
	// UserAgent is the visitor's User-Agent.
	UserAgent string
	// MessageCount is the session's message count.
	MessageCount int
	// ResponseNodes says the caller carries on n8n's "Using Response
	// Nodes" executions over the chat WebSocket: an executionStarted answer
	// is then a Reply whose Started is set, not an error.
	ResponseNodes bool
	// Files are sent with the message; with any, the request is
	// multipart/form-data (see Attachment) instead of JSON.
	Files []Attachment
	// User is the visitor the site proved with identity_secret, sent as
	// the body's and the token's "user" with verified true; nil for an
	// anonymous visitor, whose request has no "user" at all.
	User *User
}

// User is a verified visitor as the proxy proved it.
type User struct {
	ID    string
	Name  string
	Email string
	// Attributes is a JSON object (the identity token's attributes), or
	// nil: sent as {}.
	Attributes json.RawMessage
}

// userInfo is the body's and the token's "user". Every field is always
// present, so a workflow can read user.name without checking for it;
// verified is always true (an anonymous visitor has no "user").
type userInfo struct {
	ID         string          `json:"id"`
	Name       string          `json:"name"`
	Email      string          `json:"email"`
	Verified   bool            `json:"verified"`
	Attributes json.RawMessage `json:"attributes"`
}

func (u *User) info() *userInfo {
	if u == nil {
		return nil
	}
	attrs := u.Attributes
	if len(bytes.TrimSpace(attrs)) == 0 || string(attrs) == "null" {
		attrs = json.RawMessage("{}")
	}
	return &userInfo{ID: u.ID, Name: u.Name, Email: u.Email, Verified: true, Attributes: attrs}
}

// sessionInfo is the body's "session" object.
type sessionInfo struct {
	SessionID    string `json:"session_id"`
	OriginDomain string `json:"origin_domain"`
	PageURL      string `json:"page_url"`
	ClientIP     string `json:"client_ip"`
	UserAgent    string `json:"user_agent"`
	MessageCount int    `json:"message_count"`
}

// requestBody is what n8n receives (SPEC §5): the Chat Trigger's fields
// (action, sessionId, chatInput, metadata) plus the original design's.
type requestBody struct {
	Action    string          `json:"action"`
	SessionID string          `json:"sessionId"`
	ChatInput string          `json:"chatInput"`
	Message   string          `json:"message"`
	Metadata  json.RawMessage `json:"metadata"`
	Session   sessionInfo     `json:"session"`
	User      *userInfo       `json:"user,omitempty"`
	JWTToken  string          `json:"jwt_token,omitempty"`
	Timestamp string          `json:"timestamp"`
}

// tokenClockSkew backdates nbf a little: n8n's jsonwebtoken checks nbf
// without clock tolerance, so a host whose clock runs slightly behind ours
// would otherwise refuse a fresh token as "jwt not active".
const tokenClockSkew = 5 * time.Second

// buildBody returns the JSON body and the token (empty when there is no
// session secret).
func (c *Client) buildBody(req *Request, now time.Time) ([]byte, string, error) {
	if req.SessionID == "" {
		return nil, "", errNoSession
	}
	meta := req.Metadata
	if len(bytes.TrimSpace(meta)) == 0 {
		meta = json.RawMessage("{}")
	} else {
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(meta, &obj); err != nil || obj == nil {
			return nil, "", errMetadata
		}
	}
	var token string
	if c.cfg.SessionSecret != "" {
		var err error
		if token, err = c.signToken(req, now); err != nil {
			return nil, "", err
		}
	}
	action := req.Action
	if action == "" {
		action = "sendMessage"
	}
	body, err := json.Marshal(requestBody{
		Action:    action,
		SessionID: req.SessionID,
		ChatInput: req.Message,
		Message:   req.Message,
		Metadata:  meta,
		Session: sessionInfo{
			SessionID:    req.SessionID,
			OriginDomain: req.OriginDomain,
			PageURL:      req.PageURL,
			ClientIP:     req.ClientIP,
			UserAgent:    req.UserAgent,
			MessageCount: req.MessageCount,
		},
		User:      req.User.info(),
		JWTToken:  token,
		Timestamp: now.UTC().Format(time.RFC3339Nano),
	})
	if err != nil {
		return nil, "", fmt.Errorf("n8n: encoding request: %w", err)
	}
	return body, token, nil
}

// signToken returns the HS256 token for n8n: exp = now + TokenTTL, iat,
// nbf, jti, iss, aud, sub plus the session claims and type "n8n_chat",
// and user for a verified visitor.
func (c *Client) signToken(req *Request, now time.Time) (string, error) {
	claims := jwt.MapClaims{
		"iss":           c.cfg.Issuer,
		"aud":           c.cfg.Audience,
		"sub":           req.SessionID,
		"iat":           now.Unix(),
		"nbf":           now.Add(-tokenClockSkew).Unix(),
		"exp":           now.Add(c.cfg.TokenTTL).Unix(),
		"jti":           uuid.NewString(),
		"session_id":    req.SessionID,
		"origin_domain": req.OriginDomain,
		"page_url":      req.PageURL,
		"client_ip":     req.ClientIP,
		"user_agent":    req.UserAgent,
		"type":          "n8n_chat",
	}
	if u := req.User.info(); u != nil {
		claims["user"] = u
	}
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(c.cfg.SessionSecret))
	if err != nil {
		return "", fmt.Errorf("n8n: signing token: %w", err)
	}
	return s, nil
}

// setHeaders sets everything n8n gets besides the body. The header set is
// built from scratch: nothing is copied from any incoming request.
func (c *Client) setHeaders(h http.Header, token string) {
	h.Set("Content-Type", "application/json")
	h.Set("Accept", "application/json, application/x-ndjson, text/plain")
	if !c.cfg.DisableCompression {
		h.Set("Accept-Encoding", "gzip, br")
	}
	h.Set("User-Agent", c.cfg.UserAgent)
	switch c.cfg.Auth.Mode {
	case AuthJWT:
		h.Set("Authorization", "Bearer "+token)
	case AuthBasic:
		r := http.Request{Header: h}
		r.SetBasicAuth(c.cfg.Auth.Username, c.cfg.Auth.Password)
	case AuthHeader:
		h.Set(c.cfg.Auth.HeaderName, c.cfg.Auth.HeaderValue)
	}
}
