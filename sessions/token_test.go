package sessions

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

var (
	testKey  = []byte("0123456789abcdef0123456789abcdef-visitor")
	otherKey = []byte("0123456789abcdef0123456789abcdef-another")
)

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

func validClaims(now time.Time) jwt.MapClaims {
	return jwt.MapClaims{
		"iss": TokenIssuer,
		"aud": []string{TokenAudience},
		"sub": "SESSIONA",
		"iat": now.Unix(),
		"exp": now.Add(time.Hour).Unix(),
		"jti": "J1",
		"fp":  "abc",
	}
}

func sign(t *testing.T, method jwt.SigningMethod, claims jwt.MapClaims, key any) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatalf("signing: %v", err)
	}
	return s
}

func TestIssueVerifyRoundTrip(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tok := NewTokens(testKey, fixedClock(now))
	s := &Session{ID: "SESSIONA", Site: "shop.example", Fingerprint: "fp1", ExpiresAt: now.Add(7 * 24 * time.Hour)}
	raw, err := tok.Issue(s)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tok.Verify(raw)
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if c.Subject != "SESSIONA" || c.Site != "shop.example" || c.Fingerprint != "fp1" || c.Issuer != TokenIssuer || c.ID == "" ||
		!c.ExpiresAt.Equal(s.ExpiresAt) || !c.IssuedAt.Equal(now) {
		t.Fatalf("claims = %+v", c)
	}
	raw2, _ := tok.Issue(s)
	c2, _ := tok.Verify(raw2)
	if c2.ID == c.ID {
		t.Fatal("jti repeated across tokens")
	}
}

func TestVerifyRefusesAttacks(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tok := NewTokens(testKey, fixedClock(now))
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	with := func(mut func(jwt.MapClaims)) jwt.MapClaims {
		c := validClaims(now)
		mut(c)
		return c
	}
	good := sign(t, jwt.SigningMethodHS256, validClaims(now), testKey)

	tests := []struct {
		name  string
		token string
	}{
		{"alg none", func() string {
			s, err := jwt.NewWithClaims(jwt.SigningMethodNone, validClaims(now)).SignedString(jwt.UnsafeAllowNoneSignatureType)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}()},
		{"alg none with stripped signature of a good token", func() string {
			parts := strings.Split(good, ".")
			hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`))
			return hdr + "." + parts[1] + "."
		}()},
		{"RS256 token", sign(t, jwt.SigningMethodRS256, validClaims(now), rsaKey)},
		{"RS256 header over an HMAC signature (key confusion)", func() string {
			hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"RS256","typ":"JWT"}`))
			payload := strings.Split(good, ".")[1]
			sig, err := jwt.SigningMethodHS256.Sign(hdr+"."+payload, testKey)
			if err != nil {
				t.Fatal(err)
			}
			return hdr + "." + payload + "." + base64.RawURLEncoding.EncodeToString(sig)
		}()},
		{"HS512 with the right key", sign(t, jwt.SigningMethodHS512, validClaims(now), testKey)},
		{"tampered payload", func() string {
			parts := strings.Split(good, ".")
			other := sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { c["sub"] = "SESSIONB" }), otherKey)
			return parts[0] + "." + strings.Split(other, ".")[1] + "." + parts[2]
		}()},
		{"wrong key", sign(t, jwt.SigningMethodHS256, validClaims(now), otherKey)},
		{"expired", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { c["exp"] = now.Add(-time.Hour).Unix() }), testKey)},
		{"no exp", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { delete(c, "exp") }), testKey)},
		{"issued in the future", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { c["iat"] = now.Add(time.Hour).Unix() }), testKey)},
		{"wrong aud", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { c["aud"] = []string{"n8n"} }), testKey)},
		{"no aud", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { delete(c, "aud") }), testKey)},
		{"wrong iss", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { c["iss"] = "someone-else" }), testKey)},
		{"no sub", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { delete(c, "sub") }), testKey)},
		{"no jti", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { delete(c, "jti") }), testKey)},
		{"no iat", sign(t, jwt.SigningMethodHS256, with(func(c jwt.MapClaims) { delete(c, "iat") }), testKey)},
		{"garbage", "not.a.token"},
		{"empty", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := tok.Verify(tt.token)
			if err == nil {
				t.Fatalf("accepted: %+v", c)
			}
			if !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("error %v does not wrap ErrInvalidToken", err)
			}
		})
	}
	if _, err := tok.Verify(good); err != nil {
		t.Fatalf("control token refused: %v", err)
	}
}

func FuzzVerify(f *testing.F) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tok := NewTokens(testKey, fixedClock(now))
	good, _ := tok.Issue(&Session{ID: "S", ExpiresAt: now.Add(time.Hour)})
	f.Add(good)
	f.Add("eyJhbGciOiJub25lIn0.e30.")
	f.Add("a.b.c")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := tok.Verify(s)
		if err == nil && s != good {
			// Only a token we signed can verify; anything else the fuzzer
			// finds would be a forgery.
			if _, err2 := jwt.NewParser(jwt.WithValidMethods([]string{"HS256"})).Parse(s, func(*jwt.Token) (any, error) { return testKey, nil }); err2 != nil {
				t.Fatalf("accepted a token the reference parser refuses: %q (%+v)", s, c)
			}
		}
	})
}

// A block's tokens carry its own audience: a block for another workflow
// sharing the key refuses them, as does one using the generic audience,
// while another instance of the same block (same webhook) accepts them.
func TestBlockAudience(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	audA := BlockAudience("https://n8n.example.com/webhook/a/chat")
	if again := BlockAudience("https://n8n.example.com/webhook/a/chat"); again != audA {
		t.Fatalf("audience not deterministic: %q, %q", audA, again)
	}
	if strings.Contains(audA, "webhook") {
		t.Fatalf("audience %q shows the webhook", audA)
	}
	for _, other := range []string{
		BlockAudience("https://n8n.example.com/webhook/b/chat"),
		BlockAudience("https://n8n.example.com/webhook/a/chat2"),
		BlockAudience("https://n8n-2.example.com/webhook/a/chat"),
		TokenAudience,
	} {
		if other == audA {
			t.Fatalf("audience %q shared by different blocks", other)
		}
		s := &Session{ID: "SESSIONA", ExpiresAt: now.Add(time.Hour)}
		raw, err := NewTokensFor(testKey, audA, fixedClock(now)).Issue(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := NewTokensFor(testKey, audA, fixedClock(now)).Verify(raw); err != nil {
			t.Fatalf("same block refused its token: %v", err)
		}
		if _, err := NewTokensFor(testKey, other, fixedClock(now)).Verify(raw); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("audience %q accepted a token of %q: %v", other, audA, err)
		}
		back, _ := NewTokensFor(testKey, other, fixedClock(now)).Issue(s)
		if _, err := NewTokensFor(testKey, audA, fixedClock(now)).Verify(back); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("audience %q accepted a token of %q: %v", audA, other, err)
		}
	}
}

func TestTokenOriginBinding(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tok := NewTokens(testKey, fixedClock(now))
	s := &Session{ID: "SESSIONA", ExpiresAt: now.Add(time.Hour)}
	bound, _ := tok.IssueFor(s, "https://shop.example.com")
	unbound, _ := tok.Issue(s)
	for _, tc := range []struct {
		token, origin string
		want          bool
	}{
		{bound, "https://shop.example.com", true},
		{bound, "", true},
		{bound, "https://blog.example.com", false},
		{bound, "https://shop.example.com:8443", false},
		{bound, "http://shop.example.com", false},
		{unbound, "https://blog.example.com", true},
		{unbound, "", true},
	} {
		c, err := tok.Verify(tc.token)
		if err != nil {
			t.Fatal(err)
		}
		if got := c.OriginAllowed(tc.origin); got != tc.want {
			t.Errorf("token bound to %q, request from %q: allowed %v, want %v", c.Origin, tc.origin, got, tc.want)
		}
	}
}
