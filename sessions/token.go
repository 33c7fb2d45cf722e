package sessions

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Token identity. The audience keeps a visitor token from being accepted
// anywhere a token signed with the same key means something else (the n8n
// tokens use another key and audience). TokenAudience is the audience of
// tokens from NewTokens; a chat_proxy block issues and accepts only its
// own BlockAudience.
const (
	TokenIssuer   = "caddy-chatproxy"
	TokenAudience = "chatproxy-visitor"
)

// BlockAudience is the audience of the visitor tokens of the chat_proxy
// blocks that drive one n8n workflow: a token is accepted only where it
// drives the workflow it was issued for, even where blocks share
// jwt_secret. It is derived from the block's n8n webhook alone, so every
// instance of a site behind a load balancer, configured alike, accepts the
// others' tokens, and a reload that moves the API to another path_prefix
// keeps its visitors' sessions. The webhook is hashed: it often holds a
// secret id, and a token is readable by its holder.
func BlockAudience(webhook string) string {
	sum := sha256.Sum256([]byte("chatproxy visitor token audience\x00" + webhook))
	return TokenAudience + ":" + hex.EncodeToString(sum[:12])
}

// clockSkew tolerates small clock differences between Caddy instances that
// share one database.
const clockSkew = 30 * time.Second

// ErrInvalidToken is wrapped by every token verification failure.
var ErrInvalidToken = errors.New("invalid session token")

// Claims are the claims of a visitor session token.
type Claims struct {
	jwt.RegisteredClaims
	// Fingerprint is a hash of stable request traits at creation time.
	Fingerprint string `json:"fp,omitempty"`
	// Site is the session's site (the host of the Origin it was created
	// from), which never changes: a chat message can be rate-limited per
	// site before the session row is read. Tokens issued before this
	// claim existed lack it.
	Site string `json:"site,omitempty"`
	// Origin is the exact Origin the session was created from: requests
	// that carry another Origin are refused. Empty for sessions created
	// without one (server-side API clients), which are not bound.
	Origin string `json:"origin,omitempty"`
	// Shared marks a token of a verified user's session, which several
	// devices share: each device's token can be given up alone (see
	// Store.RevokeToken), so such a token is always checked against the
	// store, never taken on trust.
	Shared bool `json:"shr,omitempty"`
	// User is the id of the verified user the session belongs to
	// (identity_secret), so that a chat message is rate-limited per user
	// before the session row is read. Empty for an anonymous session. The
	// token's holder can read it; the page sent it.
	User string `json:"uid,omitempty"`
}

// OriginAllowed reports whether a request with the given Origin header
// may use the token: an unbound token, or a request without an Origin
// (not a browser's cross-origin request), or the very origin it was
// created from.
func (c *Claims) OriginAllowed(origin string) bool {
	return c.Origin == "" || origin == "" || origin == c.Origin
}

// Tokens issues and verifies visitor session tokens (HS256 only).
type Tokens struct {
	key      []byte
	audience string
	parser   *jwt.Parser
	now      func() time.Time
}

// NewTokens returns a token issuer/verifier for the given HMAC key and the
// generic TokenAudience.
func NewTokens(key []byte, now func() time.Time) *Tokens {
	return NewTokensFor(key, TokenAudience, now)
}

// NewTokensFor returns a token issuer/verifier for the given HMAC key that
// issues tokens for audience and accepts no others (see BlockAudience).
func NewTokensFor(key []byte, audience string, now func() time.Time) *Tokens {
	if now == nil {
		now = time.Now
	}
	return &Tokens{
		key:      key,
		audience: audience,
		now:      now,
		parser: jwt.NewParser(
			// Pinning the method refuses "none" and RS/HS confusion outright.
			jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
			jwt.WithIssuer(TokenIssuer),
			jwt.WithAudience(audience),
			jwt.WithExpirationRequired(),
			jwt.WithIssuedAt(),
			jwt.WithLeeway(clockSkew),
			jwt.WithTimeFunc(now),
		),
	}
}

// Audience is the audience of the tokens t issues and accepts.
func (t *Tokens) Audience() string { return t.audience }

// Issue signs a token for the session, not bound to an origin.
func (t *Tokens) Issue(s *Session) (string, error) {
	return t.IssueFor(s, "")
}

// IssueFor signs a token for the session bound to origin, the exact Origin
// header it was created with; empty leaves it unbound.
func (t *Tokens) IssueFor(s *Session, origin string) (string, error) {
	claims := Claims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    TokenIssuer,
			Subject:   s.ID,
			Audience:  jwt.ClaimStrings{t.audience},
			IssuedAt:  jwt.NewNumericDate(t.now()),
			ExpiresAt: jwt.NewNumericDate(s.ExpiresAt),
			ID:        rand.Text(),
		},
		Fingerprint: s.Fingerprint,
		Site:        s.Site,
		Origin:      origin,
		Shared:      s.User != nil,
	}
	if s.User != nil {
		claims.User = s.User.ID
	}
	signed, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(t.key)
	if err != nil {
		return "", fmt.Errorf("signing session token: %w", err)
	}
	return signed, nil
}

// Verify checks the token's signature, method, issuer, audience and times,
// and that it names a session. It does not consult the store.
func (t *Tokens) Verify(token string) (*Claims, error) {
	claims := new(Claims)
	_, err := t.parser.ParseWithClaims(token, claims, func(*jwt.Token) (any, error) {
		return t.key, nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidToken, err)
	}
	if claims.Subject == "" || claims.ID == "" || claims.IssuedAt == nil {
		return nil, fmt.Errorf("%w: missing sub, jti or iat", ErrInvalidToken)
	}
	return claims, nil
}
