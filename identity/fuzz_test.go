package identity

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/golang-jwt/jwt/v5"
)

// checkUser holds a verified user to the bounds Verify promises.
func checkUser(t *testing.T, u *User) {
	t.Helper()
	switch {
	case u.ID == "" || len(u.ID) > MaxUserIDLength || !utf8.ValidString(u.ID):
		t.Fatalf("accepted user id %q", u.ID)
	case len(u.Name) > MaxNameLength || !utf8.ValidString(u.Name):
		t.Fatalf("accepted name %q", u.Name)
	case len(u.Email) > MaxEmailLength || !utf8.ValidString(u.Email):
		t.Fatalf("accepted email %q", u.Email)
	case u.Attributes != nil && (len(u.Attributes) > MaxAttributesSize || !json.Valid(u.Attributes) || u.Attributes[0] != '{'):
		t.Fatalf("accepted attributes %q", u.Attributes)
	}
}

// checkRefusal holds a refusal to its promises: an identity error with a
// reason, quoting none of the secret, hash or token.
func checkRefusal(t *testing.T, err error, p Proof) {
	t.Helper()
	var ie *Error
	if !errors.As(err, &ie) || !errors.Is(err, ErrInvalid) || ie.Reason == "" {
		t.Fatalf("refusal %T %v is not an identity error with a reason", err, err)
	}
	for _, s := range []string{string(testSecret), p.UserHash, p.Token} {
		if len(s) >= 8 && strings.Contains(err.Error(), s) {
			t.Fatalf("refusal %q quotes a secret, hash or token", err)
		}
	}
}

// FuzzVerifyHash: any user_id, user_hash, name and email. A refusal is an
// identity error; an acceptance has a hash that is the HMAC of its id and
// fields within bounds. The hash the server computes for an id is accepted
// exactly when the id and display fields are valid.
func FuzzVerifyHash(f *testing.F) {
	f.Add("user-42", Hash(testSecret, "user-42"), "Ada", "ada@example.com")
	f.Add("user-42", "zz", "", "")
	f.Add("", "", "", "")
	f.Add(" x", Hash(testSecret, " x"), "\x00", "")
	v := testVerifier(f)
	f.Fuzz(func(t *testing.T, id, hash, name, email string) {
		p := Proof{UserID: id, UserHash: hash, Name: name, Email: email}
		u, err := v.Verify(p)
		if err != nil {
			checkRefusal(t, err, p)
		} else {
			checkUser(t, u)
			if !strings.EqualFold(hash, Hash(testSecret, id)) {
				t.Fatalf("accepted hash %q for %q", hash, id)
			}
		}
		good := Proof{UserID: id, UserHash: Hash(testSecret, id), Name: name, Email: email}
		u, err = v.Verify(good)
		valid := id != "" && checkText("", id, MaxUserIDLength, true) == nil &&
			checkText("", name, MaxNameLength, false) == nil && checkText("", email, MaxEmailLength, false) == nil
		if (err == nil) != valid {
			t.Fatalf("the right hash for %q (name %q, email %q): err %v, want accepted %v", id, name, email, err, valid)
		}
		if err == nil && (u.ID != id || u.Name != name || u.Email != email) {
			t.Fatalf("user %+v is not the proof's", u)
		}
	})
}

// FuzzVerifyToken: any identity_token text, and tokens signed with the
// secret around fuzzed claims. Nothing panics; an acceptance is within
// bounds, names its sub and has an exp no further than a day ahead.
func FuzzVerifyToken(f *testing.F) {
	f.Add("not.a.jwt", `{"sub":"u","exp":1772370000}`)
	f.Add("", `{"sub":"u","exp":1772370000,"attributes":{"a":[1,{"b":null}]}}`)
	f.Add("eyJhbGciOiJub25lIn0.e30.", `{"exp":"soon"}`)
	f.Add("", `{"sub":"u","exp":1772370000,"name":"Ada","email":"a@b"}`)
	v := testVerifier(f)
	f.Fuzz(func(t *testing.T, raw, claimsJSON string) {
		if raw != "" {
			p := Proof{Token: raw}
			if u, err := v.Verify(p); err != nil {
				checkRefusal(t, err, p)
			} else {
				checkUser(t, u)
			}
		}
		var claims jwt.MapClaims
		dec := json.NewDecoder(bytes.NewReader([]byte(claimsJSON)))
		dec.UseNumber()
		if dec.Decode(&claims) != nil || claims == nil {
			return
		}
		tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(testSecret)
		if err != nil {
			return
		}
		p := Proof{Token: tok}
		u, err := v.Verify(p)
		if err != nil {
			checkRefusal(t, err, p)
			return
		}
		checkUser(t, u)
		// encoding/json matches claim names without regard to case, as
		// the verifier reads them: exp and sub may be spelled eXp, SUB.
		expOK, subOK := false, false
		for k, val := range claims {
			switch {
			case strings.EqualFold(k, "exp"):
				n, ok := val.(json.Number)
				secs, err := n.Float64()
				e := time.Unix(int64(secs), 0)
				expOK = expOK || ok && err == nil &&
					e.Sub(testNow) <= MaxTokenLifetime+clockSkew+time.Second && !e.Before(testNow.Add(-clockSkew-time.Second))
			case strings.EqualFold(k, "sub"):
				subOK = subOK || val == u.ID
			}
		}
		if !expOK || !subOK {
			t.Fatalf("accepted %s as user %q", claimsJSON, u.ID)
		}
	})
}
