// Package identity verifies a site's proof that a visitor is one of its
// logged-in users, so that the workflow can trust who it talks to.
//
// The site's backend proves a user in one of two ways, both keyed with
// the chat_proxy block's identity_secret:
//
//   - user_id with user_hash, the hex HMAC-SHA256 of the user id (the
//     pattern of Chatwoot's identity validation). Only the id is proven:
//     name and email ride along as the page sent them.
//   - identity_token, an HS256 JWT with sub (the user id), exp (required,
//     at most MaxTokenLifetime ahead) and optional name, email and
//     attributes (an object), all of them proven.
//
// Every failure is an *Error that matches ErrInvalid; its message names
// what was wrong without quoting the secret, the hash or the token.
package identity

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"

	"github.com/chatproxy/caddy-chatproxy/guard"
)

// Bounds on what a proof may carry.
const (
	// MinSecretLength is the shortest identity_secret accepted.
	MinSecretLength = 32
	// MaxTokenLifetime is how far ahead an identity token's exp may be.
	MaxTokenLifetime = 24 * time.Hour
	// MaxUserIDLength, MaxNameLength and MaxEmailLength bound the fields
	// in bytes.
	MaxUserIDLength = 256
	MaxNameLength   = 256
	MaxEmailLength  = 320
	// MaxAttributesSize bounds the token's attributes object (its JSON).
	MaxAttributesSize = 4 << 10
	// MaxTokenLength bounds an identity token before it is parsed.
	MaxTokenLength = 8 << 10
	// hashLength is the length of user_hash: hex of 32 bytes.
	hashLength = 2 * sha256.Size
)

// clockSkew tolerates small clock differences between the site's backend
// and the proxy on exp, nbf and iat.
const clockSkew = 30 * time.Second

// attributeLimits bound the attributes object; it is stored and sent to
// n8n with every message.
var attributeLimits = guard.ObjectLimits{MaxBytes: MaxAttributesSize, MaxDepth: 4, MaxKeys: 64, MaxKeyLen: 64, MaxStringLen: 1000}

// ErrInvalid is matched (errors.Is) by every verification failure.
var ErrInvalid = errors.New("invalid identity")

// Reasons a proof is refused, for logs and metrics.
const (
	ReasonNotConfigured = "not_configured" // identity fields without identity_secret
	ReasonFormRefused   = "form_refused"   // a proof form identity_proofs leaves out
	ReasonIncomplete    = "incomplete"     // user_id without user_hash, or the reverse
	ReasonAmbiguous     = "ambiguous"      // both a hash and a token
	ReasonMalformedHash = "malformed_hash" // not 64 hex characters
	ReasonWrongHash     = "wrong_hash"
	ReasonBadField      = "bad_field"       // a field too long, empty or with control characters
	ReasonMalformed     = "malformed_token" // not a JWT, or claims of the wrong type
	ReasonMethod        = "bad_method"      // alg other than HS256
	ReasonSignature     = "bad_signature"
	ReasonExpired       = "expired"
	ReasonNoExpiry      = "no_exp"
	ReasonTooFar        = "exp_too_far"
	ReasonNotYetValid   = "not_yet_valid" // nbf or iat in the future
)

// Error is a refused proof.
type Error struct {
	Reason  string // one of the Reason constants
	Message string // what was wrong, safe to show and log
}

func (e *Error) Error() string        { return e.Message }
func (e *Error) Is(target error) bool { return target == ErrInvalid }

func refuse(reason, format string, args ...any) *Error {
	return &Error{Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// User is a verified user.
type User struct {
	ID    string
	Name  string
	Email string
	// Attributes is the token's attributes object, compact; nil when none
	// (always nil for the user_hash form).
	Attributes json.RawMessage
}

// Proof is what a page sends to prove its visitor: the fields of the
// session create body, or of the @n8n/chat widget's metadata.
type Proof struct {
	UserID   string `json:"user_id"`
	UserHash string `json:"user_hash"`
	Name     string `json:"name"`
	Email    string `json:"email"`
	Token    string `json:"identity_token"`
}

// Present reports whether the proof claims an identity at all: any of
// user_id, user_hash or identity_token is set. Name and email alone are
// not a claim.
func (p Proof) Present() bool {
	return p.UserID != "" || p.UserHash != "" || p.Token != ""
}

// Proof forms, as the identity_proofs option names them.
const (
	FormHash  = "user_hash"
	FormToken = "identity_token"
)

// Verifier checks proofs made with one identity_secret. A nil *Verifier
// (identity_secret not configured) refuses every proof.
type Verifier struct {
	// refuseHash and refuseToken leave a proof form out (Restrict); the
	// zero value accepts both.
	refuseHash, refuseToken bool

	secret []byte
	now    func() time.Time
	parser *jwt.Parser
}

// NewVerifier returns a verifier for secret, which must be at least
// MinSecretLength bytes (the configuration checks it). now is the clock;
// nil means time.Now.
func NewVerifier(secret []byte, now func() time.Time) (*Verifier, error) {
	if len(secret) < MinSecretLength {
		return nil, fmt.Errorf("identity secret must be at least %d bytes, got %d", MinSecretLength, len(secret))
	}
	if now == nil {
		now = time.Now
	}
	return &Verifier{
		secret: bytes.Clone(secret),
		now:    now,
		parser: jwt.NewParser(
			// Pinning the method refuses "none", HS384/512 and the RS/HS
			// confusion outright.
			jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
			jwt.WithExpirationRequired(),
			jwt.WithIssuedAt(),
			jwt.WithLeeway(clockSkew),
			jwt.WithTimeFunc(now),
		),
	}, nil
}

// Restrict makes v accept only the given proof forms (FormHash,
// FormToken); none given keeps both. Both forms are HMAC-SHA256 under the
// same secret, so a site that computes user_hash over ids its visitors
// choose hands out what signs an identity_token for anyone (an id shaped
// like a token's header.payload); such a site restricts to FormToken, and
// one that never issues tokens to FormHash.
func (v *Verifier) Restrict(forms ...string) error {
	if len(forms) == 0 {
		return nil
	}
	v.refuseHash, v.refuseToken = true, true
	for _, f := range forms {
		switch f {
		case FormHash:
			v.refuseHash = false
		case FormToken:
			v.refuseToken = false
		default:
			return fmt.Errorf("unknown proof form %q: use %s or %s", f, FormHash, FormToken)
		}
	}
	return nil
}

// Hash returns the user_hash of a user id: the hex HMAC-SHA256 of id keyed
// with secret, as the site's backend computes it.
func Hash(secret []byte, id string) string {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(id))
	return hex.EncodeToString(mac.Sum(nil))
}

// Verify checks a proof that is Present and returns its user. Failures
// are *Error (errors.Is(err, ErrInvalid)).
func (v *Verifier) Verify(p Proof) (*User, error) {
	if v == nil {
		return nil, refuse(ReasonNotConfigured, "identity fields were sent but this server has no identity_secret configured")
	}
	switch {
	case p.Token != "" && (p.UserID != "" || p.UserHash != ""):
		return nil, refuse(ReasonAmbiguous, "send either user_id with user_hash or identity_token, not both")
	case p.Token != "" && v.refuseToken:
		return nil, refuse(ReasonFormRefused, "this site does not accept identity_token proofs; send user_id with user_hash")
	case p.Token != "":
		return v.verifyToken(p.Token)
	case v.refuseHash:
		return nil, refuse(ReasonFormRefused, "this site does not accept user_hash proofs; send identity_token")
	}
	return v.verifyHash(p)
}

func (v *Verifier) verifyHash(p Proof) (*User, error) {
	switch {
	case p.UserID == "":
		return nil, refuse(ReasonIncomplete, "user_hash needs the user_id it proves")
	case p.UserHash == "":
		return nil, refuse(ReasonIncomplete, "user_id needs user_hash (hex HMAC-SHA256 of user_id with identity_secret) or identity_token")
	}
	if err := checkText("user_id", p.UserID, MaxUserIDLength, true); err != nil {
		return nil, err
	}
	if len(p.UserHash) != hashLength {
		return nil, refuse(ReasonMalformedHash, "user_hash must be %d hexadecimal characters (HMAC-SHA256)", hashLength)
	}
	got, err := hex.DecodeString(p.UserHash)
	if err != nil {
		return nil, refuse(ReasonMalformedHash, "user_hash must be %d hexadecimal characters (HMAC-SHA256)", hashLength)
	}
	mac := hmac.New(sha256.New, v.secret)
	mac.Write([]byte(p.UserID))
	if !hmac.Equal(mac.Sum(nil), got) {
		return nil, refuse(ReasonWrongHash, "user_hash does not match user_id")
	}
	u := &User{ID: p.UserID, Name: p.Name, Email: p.Email}
	if err := checkDisplay(u); err != nil {
		return nil, err
	}
	return u, nil
}

// tokenClaims are the claims an identity token may carry besides the
// registered ones.
type tokenClaims struct {
	jwt.RegisteredClaims
	Name       string          `json:"name"`
	Email      string          `json:"email"`
	Attributes json.RawMessage `json:"attributes"`
}

func (v *Verifier) verifyToken(token string) (*User, error) {
	if len(token) > MaxTokenLength {
		return nil, refuse(ReasonBadField, "identity_token must be at most %d bytes", MaxTokenLength)
	}
	var c tokenClaims
	_, err := v.parser.ParseWithClaims(token, &c, func(*jwt.Token) (any, error) { return v.secret, nil })
	if err != nil {
		return nil, tokenError(err)
	}
	// The library checked exp is present and not past; it must also not be
	// far ahead, so that a leaked token is good for a day at most.
	if c.ExpiresAt.Sub(v.now()) > MaxTokenLifetime+clockSkew {
		return nil, refuse(ReasonTooFar, "identity_token: exp must be at most %s ahead", "24h")
	}
	if c.Subject == "" {
		return nil, refuse(ReasonBadField, "identity_token: sub (the user id) is required")
	}
	if err := checkText("identity_token: sub", c.Subject, MaxUserIDLength, true); err != nil {
		return nil, err
	}
	u := &User{ID: c.Subject, Name: c.Name, Email: c.Email}
	if err := checkDisplay(u); err != nil {
		return nil, err
	}
	attrs := bytes.TrimSpace(c.Attributes)
	if len(attrs) > 0 && string(attrs) != "null" {
		if err := guard.CheckObject(attrs, attributeLimits); err != nil {
			return nil, refuse(ReasonBadField, "identity_token: %s", guard.WithField(err, "attributes").Error())
		}
		var b bytes.Buffer
		if err := json.Compact(&b, attrs); err != nil {
			return nil, refuse(ReasonMalformed, "identity_token: attributes must be a JSON object")
		}
		u.Attributes = b.Bytes()
	}
	return u, nil
}

// tokenError turns the JWT library's error into a refusal. The library's
// messages never quote the token, but they are replaced anyway, by ones
// that say what to fix.
func tokenError(err error) *Error {
	switch {
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		// Also what a token whose alg is not HS256 gets: the method is
		// checked first, and refused as ErrTokenSignatureInvalid.
		if isMethodError(err) {
			return refuse(ReasonMethod, "identity_token: must be signed with HS256")
		}
		return refuse(ReasonSignature, "identity_token: the signature does not verify with identity_secret")
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return refuse(ReasonMethod, "identity_token: must be signed with HS256")
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return refuse(ReasonNoExpiry, "identity_token: exp is required")
	case errors.Is(err, jwt.ErrTokenExpired):
		return refuse(ReasonExpired, "identity_token: expired")
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return refuse(ReasonNotYetValid, "identity_token: not valid yet (nbf or iat in the future)")
	}
	return refuse(ReasonMalformed, "identity_token: not a valid JWT with the claims sub, exp and optional name, email, attributes (an object)")
}

// isMethodError reports whether the parser refused the token's alg: v5
// reports it as ErrTokenSignatureInvalid with this text.
func isMethodError(err error) bool {
	return strings.Contains(err.Error(), "signing method")
}

// checkDisplay checks the display fields.
func checkDisplay(u *User) error {
	if err := checkText("name", u.Name, MaxNameLength, false); err != nil {
		return err
	}
	return checkText("email", u.Email, MaxEmailLength, false)
}

// checkText refuses a field that is too long, not UTF-8 or holds control
// characters (an id may hold no white space at its ends either: the hash
// covers it byte for byte, and a padded id is a mistake).
func checkText(field, s string, maxLen int, id bool) error {
	switch {
	case len(s) > maxLen:
		return refuse(ReasonBadField, "%s must be at most %d bytes", field, maxLen)
	case !utf8.ValidString(s):
		return refuse(ReasonBadField, "%s is not valid UTF-8", field)
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 {
			return refuse(ReasonBadField, "%s must not contain control characters", field)
		}
	}
	if id && (s[0] == ' ' || s[len(s)-1] == ' ') {
		return refuse(ReasonBadField, "%s must not start or end with a space", field)
	}
	return nil
}
