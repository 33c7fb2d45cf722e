package handler

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"time"
)

// SocketTokenTTL is how long a resume token lets the widget open its chat
// socket: the widget connects right after n8n's executionStarted answer.
const SocketTokenTTL = 5 * time.Minute

// maxSocketToken bounds a token before it is decoded.
const maxSocketToken = 2048

// socketClaims is what a resume token binds the chat socket to. The token
// is stateless, so any instance that shares jwt_secret accepts it.
type socketClaims struct {
	Site        string `json:"s"` // the site the widget posted from
	SessionID   string `json:"i"` // the widget's own sessionId, as sent
	ExecutionID string `json:"e"` // n8n's execution id
	Expires     int64  `json:"x"` // unix seconds
	// N8nToken is n8n's own resumeToken (newer n8n checks it on the
	// socket); the widget never sees it apart from inside this token.
	N8nToken string `json:"t,omitempty"`
	// User is the verified user's id when the widget proved one: the
	// conversation is that user's (see Conversation), and the user
	// rate-limit tier applies.
	User string `json:"u,omitempty"`
	// Conversation is the store id of the verified user's conversation
	// (found by the user, not named by the sessionId: see
	// widgetUserSession); empty in tokens for anonymous widgets.
	Conversation string `json:"c,omitempty"`
}

// storeID is the conversation the socket's messages go to.
func (c socketClaims) storeID() string {
	if c.User != "" && c.Conversation != "" {
		return c.Conversation
	}
	return widgetSessionID(c.Site, c.SessionID, c.User)
}

var (
	errSocketTokenInvalid = errors.New("the chat socket token is invalid")
	errSocketTokenExpired = errors.New("the chat socket token has expired")
)

// signSocketToken returns base64url(claims JSON) "." base64url(HMAC-SHA256).
// The claims are readable, not secret: they hold nothing the widget does
// not already know, besides n8n's token for the same execution.
func signSocketToken(key []byte, c socketClaims) string {
	payload, _ := json.Marshal(c) // plain strings and an int
	p := base64.RawURLEncoding.EncodeToString(payload)
	return p + "." + base64.RawURLEncoding.EncodeToString(socketMAC(key, p))
}

func socketMAC(key []byte, payload string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("chat-socket.v1."))
	m.Write([]byte(payload))
	return m.Sum(nil)
}

// parseSocketToken checks a token's signature and freshness and returns
// its claims.
func parseSocketToken(key []byte, token string, now time.Time) (socketClaims, error) {
	var c socketClaims
	if len(key) == 0 || token == "" || len(token) > maxSocketToken {
		return c, errSocketTokenInvalid
	}
	p, sig, ok := strings.Cut(token, ".")
	if !ok {
		return c, errSocketTokenInvalid
	}
	mac, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil || !hmac.Equal(mac, socketMAC(key, p)) {
		return c, errSocketTokenInvalid
	}
	payload, err := base64.RawURLEncoding.DecodeString(p)
	if err != nil || json.Unmarshal(payload, &c) != nil || c.SessionID == "" || c.ExecutionID == "" {
		return socketClaims{}, errSocketTokenInvalid
	}
	if now.Unix() >= c.Expires {
		return socketClaims{}, errSocketTokenExpired
	}
	return c, nil
}
