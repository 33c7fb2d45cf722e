package sessions

import (
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Fixed token identity. The audience keeps a visitor token from being
// accepted anywhere a token signed with the same key means something else
// (the n8n tokens use another key and audience).
const (
	TokenIssuer   = "caddy-chatproxy"
	TokenAudience = "chatproxy-visitor"
)

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
}

// Tokens issues and verifies visitor session tokens (HS256 only).
type Tokens struct {
	key    []byte
	parser *jwt.Parser
	now    func() time.Time
}

// NewTokens returns a token issuer/verifier for the given HMAC key.
func NewTokens(key []byte, now func() time.Time) *Tokens {
	if now == nil {
		now = time.Now
	}
	return &Tokens{
		key: key,
		now: now,
		parser: jwt.NewParser(
			// Pinning the method refuses "none" and RS/HS confusion outright.
			jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
			jwt.WithIssuer(TokenIssuer),
			jwt.WithAudience(TokenAudience),
			jwt.WithExpirationRequired(),
			jwt.WithIssuedAt(),
			jwt.WithLeeway(clockSkew),
			jwt.WithTimeFunc(now),
		),
	}
}

// Issue signs a token for the session.
func (t *Tokens) Issue(s *Session) (string, error) {
	claims := Claims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    TokenIssuer,
			Subject:   s.ID,
			Audience:  jwt.ClaimStrings{TokenAudience},
			IssuedAt:  jwt.NewNumericDate(t.now()),
			ExpiresAt: jwt.NewNumericDate(s.ExpiresAt),
			ID:        rand.Text(),
		},
		Fingerprint: s.Fingerprint,
		Site:        s.Site,
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
