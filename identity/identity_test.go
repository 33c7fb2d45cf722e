package identity

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

var (
	testSecret  = []byte("identity-secret-for-tests-0123456789abcdef")
	otherSecret = []byte("another-identity-secret-0123456789abcdefgh")
	testNow     = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
)

func testVerifier(t testing.TB) *Verifier {
	t.Helper()
	v, err := NewVerifier(testSecret, func() time.Time { return testNow })
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// sign makes an identity token with the given method and key.
func sign(t testing.TB, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func hs256(t testing.TB, claims jwt.MapClaims) string {
	return sign(t, jwt.SigningMethodHS256, testSecret, claims)
}

func exp(d time.Duration) int64 { return testNow.Add(d).Unix() }

// TestVerifyMatrix is the matrix of issue 16: each way a proof can be good
// or bad, with the user it yields or the reason it is refused, and never
// the secret, the hash or the token in the error.
func TestVerifyMatrix(t *testing.T) {
	v := testVerifier(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	goodHash := Hash(testSecret, "user-42")
	long := func(n int) string { return strings.Repeat("a", n) }

	cases := []struct {
		name     string
		verifier *Verifier
		proof    Proof
		want     *User  // when accepted
		reason   string // when refused
	}{
		{name: "good hash", proof: Proof{UserID: "user-42", UserHash: goodHash},
			want: &User{ID: "user-42"}},
		{name: "good hash with name and email", proof: Proof{UserID: "user-42", UserHash: goodHash, Name: "Ada Lovelace", Email: "ada@example.com"},
			want: &User{ID: "user-42", Name: "Ada Lovelace", Email: "ada@example.com"}},
		{name: "good hash in upper case", proof: Proof{UserID: "user-42", UserHash: strings.ToUpper(goodHash)},
			want: &User{ID: "user-42"}},
		{name: "good hash of a unicode id", proof: Proof{UserID: "ümlaut-ユーザー", UserHash: Hash(testSecret, "ümlaut-ユーザー")},
			want: &User{ID: "ümlaut-ユーザー"}},
		{name: "wrong hash (another user's)", proof: Proof{UserID: "user-42", UserHash: Hash(testSecret, "user-43")},
			reason: ReasonWrongHash},
		{name: "wrong secret", proof: Proof{UserID: "user-42", UserHash: Hash(otherSecret, "user-42")},
			reason: ReasonWrongHash},
		{name: "hash of the id with a trailing byte", proof: Proof{UserID: "user-42", UserHash: Hash(testSecret, "user-42\x00")},
			reason: ReasonWrongHash},
		{name: "malformed hex", proof: Proof{UserID: "user-42", UserHash: "zz" + goodHash[2:]},
			reason: ReasonMalformedHash},
		{name: "short hash", proof: Proof{UserID: "user-42", UserHash: goodHash[:62]},
			reason: ReasonMalformedHash},
		{name: "long hash", proof: Proof{UserID: "user-42", UserHash: goodHash + "00"},
			reason: ReasonMalformedHash},
		{name: "user_id without user_hash", proof: Proof{UserID: "user-42"},
			reason: ReasonIncomplete},
		{name: "user_hash without user_id", proof: Proof{UserHash: goodHash},
			reason: ReasonIncomplete},
		{name: "oversized user_id", proof: Proof{UserID: long(MaxUserIDLength + 1), UserHash: Hash(testSecret, long(MaxUserIDLength+1))},
			reason: ReasonBadField},
		{name: "user_id at its bound", proof: Proof{UserID: long(MaxUserIDLength), UserHash: Hash(testSecret, long(MaxUserIDLength))},
			want: &User{ID: long(MaxUserIDLength)}},
		{name: "user_id with a control character", proof: Proof{UserID: "a\nb", UserHash: Hash(testSecret, "a\nb")},
			reason: ReasonBadField},
		{name: "oversized name", proof: Proof{UserID: "user-42", UserHash: goodHash, Name: long(MaxNameLength + 1)},
			reason: ReasonBadField},
		{name: "oversized email", proof: Proof{UserID: "user-42", UserHash: goodHash, Email: long(MaxEmailLength + 1)},
			reason: ReasonBadField},
		{name: "name with a control character", proof: Proof{UserID: "user-42", UserHash: goodHash, Name: "Ada\x1b[31m"},
			reason: ReasonBadField},
		{name: "identity without identity_secret (hash)", verifier: (*Verifier)(nil), proof: Proof{UserID: "user-42", UserHash: goodHash},
			reason: ReasonNotConfigured},
		{name: "identity without identity_secret (token)", verifier: (*Verifier)(nil),
			proof:  Proof{Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour)})},
			reason: ReasonNotConfigured},
		{name: "both a hash and a token", proof: Proof{UserID: "user-42", UserHash: goodHash,
			Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour)})},
			reason: ReasonAmbiguous},

		{name: "good token", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour),
			"name": "Ada Lovelace", "email": "ada@example.com", "attributes": map[string]any{"plan": "pro", "seats": 3}})},
			want: &User{ID: "user-42", Name: "Ada Lovelace", Email: "ada@example.com", Attributes: json.RawMessage(`{"plan":"pro","seats":3}`)}},
		{name: "token at 24h", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(MaxTokenLifetime)})},
			want: &User{ID: "user-42"}},
		{name: "token ignores display fields beside it", proof: Proof{Name: "Mallory", Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour), "name": "Ada"})},
			want: &User{ID: "user-42", Name: "Ada"}},
		{name: "expired", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(-5 * time.Minute)})},
			reason: ReasonExpired},
		{name: "no exp", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "user-42"})},
			reason: ReasonNoExpiry},
		{name: "far-future exp", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(25 * time.Hour)})},
			reason: ReasonTooFar},
		{name: "exp a year ahead", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(365 * 24 * time.Hour)})},
			reason: ReasonTooFar},
		{name: "nbf in the future", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour), "nbf": exp(10 * time.Minute)})},
			reason: ReasonNotYetValid},
		{name: "token signed with another secret", proof: Proof{Token: sign(t, jwt.SigningMethodHS256, otherSecret, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour)})},
			reason: ReasonSignature},
		{name: "alg HS512 with the right secret", proof: Proof{Token: sign(t, jwt.SigningMethodHS512, testSecret, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour)})},
			reason: ReasonMethod},
		{name: "alg HS384 with the right secret", proof: Proof{Token: sign(t, jwt.SigningMethodHS384, testSecret, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour)})},
			reason: ReasonMethod},
		{name: "alg RS256", proof: Proof{Token: sign(t, jwt.SigningMethodRS256, rsaKey, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour)})},
			reason: ReasonMethod},
		{name: "alg none", proof: Proof{Token: sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, jwt.MapClaims{"sub": "user-42", "exp": exp(time.Hour)})},
			reason: ReasonMethod},
		{name: "token without sub", proof: Proof{Token: hs256(t, jwt.MapClaims{"exp": exp(time.Hour)})},
			reason: ReasonBadField},
		{name: "token with an oversized sub", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": long(MaxUserIDLength + 1), "exp": exp(time.Hour)})},
			reason: ReasonBadField},
		{name: "token with an oversized name", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "u", "exp": exp(time.Hour), "name": long(MaxNameLength + 1)})},
			reason: ReasonBadField},
		{name: "token with a name of the wrong type", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "u", "exp": exp(time.Hour), "name": 7})},
			reason: ReasonMalformed},
		{name: "attributes not an object", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "u", "exp": exp(time.Hour), "attributes": []any{1, 2}})},
			reason: ReasonBadField},
		{name: "oversized attributes", proof: Proof{Token: hs256(t, jwt.MapClaims{"sub": "u", "exp": exp(time.Hour), "attributes": map[string]any{"a": long(MaxAttributesSize)}})},
			reason: ReasonBadField},
		{name: "oversized token", proof: Proof{Token: long(MaxTokenLength + 1)},
			reason: ReasonBadField},
		{name: "not a JWT", proof: Proof{Token: "not.a.jwt"},
			reason: ReasonMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ver := v
			if tc.verifier != nil || tc.reason == ReasonNotConfigured {
				ver = tc.verifier
			}
			u, err := ver.Verify(tc.proof)
			if tc.want != nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if u.ID != tc.want.ID || u.Name != tc.want.Name || u.Email != tc.want.Email || string(u.Attributes) != string(tc.want.Attributes) {
					t.Fatalf("user = %+v (attributes %s), want %+v (attributes %s)", u, u.Attributes, tc.want, tc.want.Attributes)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted as %+v, want refused (%s)", u, tc.reason)
			}
			var ie *Error
			if !errors.As(err, &ie) || !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %T %v is not an identity error", err, err)
			}
			if ie.Reason != tc.reason {
				t.Fatalf("reason = %s (%q), want %s", ie.Reason, ie.Message, tc.reason)
			}
			for _, secret := range []string{string(testSecret), tc.proof.UserHash, tc.proof.Token} {
				if secret != "" && strings.Contains(err.Error(), secret) {
					t.Fatalf("error %q quotes a secret, hash or token", err)
				}
			}
		})
	}
}

func TestNewVerifierRefusesShortSecret(t *testing.T) {
	if _, err := NewVerifier([]byte(strings.Repeat("x", MinSecretLength-1)), nil); err == nil {
		t.Fatal("a 31-byte secret was accepted")
	}
	if _, err := NewVerifier([]byte(strings.Repeat("x", MinSecretLength)), nil); err != nil {
		t.Fatalf("a 32-byte secret was refused: %v", err)
	}
}

// TestHashIsHMACSHA256 pins the scheme the docs' backend snippets compute
// (RFC 4231 test case 2: key "Jefe").
func TestHashIsHMACSHA256(t *testing.T) {
	got := Hash([]byte("Jefe"), "what do ya want for nothing?")
	want := "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
	if got != want {
		t.Fatalf("Hash = %s, want %s", got, want)
	}
}

func TestProofPresent(t *testing.T) {
	for _, tc := range []struct {
		p    Proof
		want bool
	}{
		{Proof{}, false},
		{Proof{Name: "Ada", Email: "ada@example.com"}, false},
		{Proof{UserID: "u"}, true},
		{Proof{UserHash: "00"}, true},
		{Proof{Token: "t"}, true},
	} {
		if got := tc.p.Present(); got != tc.want {
			t.Errorf("%+v.Present() = %v, want %v", tc.p, got, tc.want)
		}
	}
}

// A site that hands out the user_hash of an id its visitor chose hands out
// an HS256 signature: an id shaped like a token's header.payload hashes to
// exactly that token's signature. With both forms accepted the forged
// token is good for any sub; restricted to one form, the other is refused.
func TestRestrictClosesHashTokenForgery(t *testing.T) {
	now := testNow
	enc := base64.RawURLEncoding
	signingInput := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." +
		enc.EncodeToString([]byte(fmt.Sprintf(`{"sub":"victim","exp":%d}`, now.Add(time.Hour).Unix())))
	// What the site computes for the visitor who registered that id.
	handedOut, err := hex.DecodeString(Hash(testSecret, signingInput))
	if err != nil {
		t.Fatal(err)
	}
	forged := Proof{Token: signingInput + "." + enc.EncodeToString(handedOut)}

	both := testVerifier(t)
	if u, err := both.Verify(forged); err != nil || u.ID != "victim" {
		t.Fatalf("with both forms the forged token gave %+v, %v: the hole Restrict exists for is not shown", u, err)
	}

	tokensOnly := testVerifier(t)
	if err := tokensOnly.Restrict(FormToken); err != nil {
		t.Fatal(err)
	}
	hashesOnly := testVerifier(t)
	if err := hashesOnly.Restrict(FormHash); err != nil {
		t.Fatal(err)
	}
	good := Proof{UserID: "user-42", UserHash: Hash(testSecret, "user-42")}
	for _, tc := range []struct {
		name   string
		v      *Verifier
		proof  Proof
		refuse bool
	}{
		{"hashes only: the forged token", hashesOnly, forged, true},
		{"hashes only: a hash", hashesOnly, good, false},
		{"tokens only: a hash", tokensOnly, good, true},
		{"tokens only: a token", tokensOnly, forged, false}, // a site issuing tokens never hands out hashes
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.v.Verify(tc.proof)
			var ie *Error
			switch {
			case tc.refuse && (!errors.As(err, &ie) || ie.Reason != ReasonFormRefused):
				t.Fatalf("got %v, want a %s refusal", err, ReasonFormRefused)
			case !tc.refuse && err != nil:
				t.Fatalf("refused: %v", err)
			}
		})
	}
	if err := testVerifier(t).Restrict("password"); err == nil {
		t.Error("an unknown proof form was accepted")
	}
}
