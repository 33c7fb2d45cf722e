// Package signed signs and verifies server-to-server HTTP requests with a
// shared secret, so that a caller without a browser (n8n, an agent's tool,
// the site's backend) can be trusted without a session.
//
// A signed request carries two headers:
//
//	X-Chatproxy-Timestamp: <unix seconds>
//	X-Chatproxy-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>
//
// The verifier refuses a request whose timestamp is more than Window
// (default 5 minutes) away from its clock, in either direction, whose MAC
// differs (compared in constant time), or whose signature it has already
// accepted once (a replay). Replays are remembered until the timestamp
// leaves the window: in Redis (SET NX with a TTL) when a client is given,
// so that it holds across instances, else in a bounded in-process cache.
//
// The same scheme signs the proxy's own outgoing calls (the handoff
// webhook), so one recipe computes and checks both directions:
//
//	ts=$(date +%s)
//	sig=$(printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$secret" -hex | sed 's/^.* //')
//	curl -H "X-Chatproxy-Timestamp: $ts" -H "X-Chatproxy-Signature: sha256=$sig" -d "$body" ...
package signed

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// The header names.
const (
	HeaderTimestamp = "X-Chatproxy-Timestamp"
	HeaderSignature = "X-Chatproxy-Signature"
)

// DefaultWindow is how far a request's timestamp may be from the
// verifier's clock, either way.
const DefaultWindow = 5 * time.Minute

// signaturePrefix names the MAC in the signature header.
const signaturePrefix = "sha256="

// Why a request was refused. Every one of them is the caller's fault and
// answers 401, except ErrUnavailable (the replay store could not be
// asked: 503). Callers log the reason; the response need not tell it.
var (
	ErrMissing      = errors.New("signature headers missing")
	ErrMalformed    = errors.New("signature headers malformed")
	ErrStale        = errors.New("timestamp outside the allowed window")
	ErrBadSignature = errors.New("signature does not match")
	ErrReplayed     = errors.New("signature already used")
	ErrUnavailable  = errors.New("replay check unavailable")
)

// MAC is HMAC-SHA256(secret, "<timestamp>.<body>").
func MAC(secret []byte, timestamp int64, body []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write(strconv.AppendInt(nil, timestamp, 10))
	m.Write([]byte{'.'})
	m.Write(body)
	return m.Sum(nil)
}

// Sign returns the two header values that sign body at time now.
func Sign(secret, body []byte, now time.Time) (timestamp, signature string) {
	ts := now.Unix()
	return strconv.FormatInt(ts, 10), signaturePrefix + hex.EncodeToString(MAC(secret, ts, body))
}

// SignRequest sets req's signature headers for body, which must be the
// request's exact body.
func SignRequest(req *http.Request, secret, body []byte, now time.Time) {
	ts, sig := Sign(secret, body, now)
	req.Header.Set(HeaderTimestamp, ts)
	req.Header.Set(HeaderSignature, sig)
}

// maxTimestampDigits bounds the timestamp header: unix seconds have 10
// digits until the year 2286.
const maxTimestampDigits = 12

// ParseHeaders reads the two header values: a timestamp of decimal digits
// only, and "sha256=" followed by 64 hex digits. Surrounding spaces are
// ignored; anything else is ErrMalformed (ErrMissing when either is
// empty).
func ParseHeaders(timestamp, signature string) (ts int64, mac []byte, err error) {
	timestamp, signature = strings.TrimSpace(timestamp), strings.TrimSpace(signature)
	if timestamp == "" || signature == "" {
		return 0, nil, ErrMissing
	}
	if len(timestamp) > maxTimestampDigits {
		return 0, nil, fmt.Errorf("%w: timestamp too long", ErrMalformed)
	}
	for i := 0; i < len(timestamp); i++ {
		if c := timestamp[i]; c < '0' || c > '9' {
			return 0, nil, fmt.Errorf("%w: timestamp must be unix seconds", ErrMalformed)
		}
	}
	ts, err = strconv.ParseInt(timestamp, 10, 64)
	if err != nil {
		return 0, nil, fmt.Errorf("%w: timestamp must be unix seconds", ErrMalformed)
	}
	hexMAC, ok := strings.CutPrefix(signature, signaturePrefix)
	if !ok || len(hexMAC) != 2*sha256.Size {
		return 0, nil, fmt.Errorf("%w: signature must be sha256= and 64 hex digits", ErrMalformed)
	}
	if mac, err = hex.DecodeString(hexMAC); err != nil {
		return 0, nil, fmt.Errorf("%w: signature must be sha256= and 64 hex digits", ErrMalformed)
	}
	return ts, mac, nil
}

// ReplayGuard remembers accepted signatures. First reports whether key is
// new, remembering it for ttl; an error means it could not tell.
type ReplayGuard interface {
	First(ctx context.Context, key string, ttl time.Duration) (bool, error)
}

// Forgetter is a ReplayGuard that can give a remembered key up again.
type Forgetter interface {
	Forget(ctx context.Context, key string) error
}

// Verifier checks signed requests made with one secret. Its zero Window
// is DefaultWindow and its nil Now is time.Now. Replay must be set (see
// NewRedisReplay and NewMemoryReplay); it may be shared by verifiers of
// different secrets, since keys are the MACs themselves.
type Verifier struct {
	Secret []byte
	Window time.Duration
	Replay ReplayGuard
	Now    func() time.Time
}

// Verify checks the signature headers of h against body, the request's
// raw body, and then remembers the signature so that it is accepted only
// once. The checks run in this order, so that nothing unauthenticated
// reaches the replay store: headers, window, MAC, replay.
func (v *Verifier) Verify(ctx context.Context, h http.Header, body []byte) error {
	ts, mac, err := ParseHeaders(h.Get(HeaderTimestamp), h.Get(HeaderSignature))
	if err != nil {
		return err
	}
	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	window := v.Window
	if window <= 0 {
		window = DefaultWindow
	}
	t := now()
	// Compare in seconds, so a huge timestamp cannot overflow a Duration.
	skew := t.Unix() - ts
	if skew > int64(window/time.Second) || -skew > int64(window/time.Second) {
		return ErrStale
	}
	if !hmac.Equal(mac, MAC(v.Secret, ts, body)) {
		return ErrBadSignature
	}
	if v.Replay == nil {
		return fmt.Errorf("%w: no replay guard", ErrUnavailable)
	}
	// Remembered until the timestamp leaves the window, and a second more.
	ttl := time.Unix(ts, 0).Add(window + time.Second).Sub(t)
	first, err := v.Replay.First(ctx, hex.EncodeToString(mac), ttl)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	if !first {
		return ErrReplayed
	}
	return nil
}

// Forget gives up the signature of h, which Verify accepted, so that the
// same request may be sent again: for a request that had no effect
// because the server failed (a retry must not be refused as a replay).
// A guard that cannot forget keeps it.
func (v *Verifier) Forget(ctx context.Context, h http.Header) error {
	_, mac, err := ParseHeaders(h.Get(HeaderTimestamp), h.Get(HeaderSignature))
	if err != nil {
		return err
	}
	f, ok := v.Replay.(Forgetter)
	if !ok {
		return nil
	}
	return f.Forget(ctx, hex.EncodeToString(mac))
}
