package n8n

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/golang-jwt/jwt/v5"
)

// tokenClaims verifies the bearer token of n8n's last request and returns
// its claims.
func tokenClaims(t *testing.T, f *fakeN8N) jwt.MapClaims {
	t.Helper()
	token, _ := strings.CutPrefix(f.lastRequest(t).header.Get("Authorization"), "Bearer ")
	claims := jwt.MapClaims{}
	if _, err := jwt.NewParser(jwt.WithValidMethods([]string{"HS256"})).ParseWithClaims(token, claims,
		func(*jwt.Token) (any, error) { return []byte(testSecret), nil }); err != nil {
		t.Fatalf("token does not verify: %v", err)
	}
	return claims
}

// TestRequestCarriesVerifiedUser: a verified visitor's request has "user"
// with every field and verified true, in the body and in the signed token
// alike; an anonymous visitor's has no "user" in either.
func TestRequestCarriesVerifiedUser(t *testing.T) {
	cases := []struct {
		name string
		user *User
		want string // the user object, or "" for none
	}{
		{"anonymous", nil, ""},
		{"hash form (no attributes)", &User{ID: "user-42", Name: "Ada Lovelace", Email: "ada@example.com"},
			`{"id":"user-42","name":"Ada Lovelace","email":"ada@example.com","verified":true,"attributes":{}}`},
		{"token form with attributes", &User{ID: "u7", Name: "Grace", Attributes: json.RawMessage(`{"plan":"pro","seats":3}`)},
			`{"id":"u7","name":"Grace","email":"","verified":true,"attributes":{"plan":"pro","seats":3}}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, okHandler)
			c := newClient(t, testConfig(f))
			req := testRequest()
			req.Metadata = json.RawMessage(`{"unverified_user":{"id":"admin","verified":true}}`)
			req.User = tc.user
			sendOK(t, c, req)

			var body map[string]json.RawMessage
			if err := json.Unmarshal(f.lastRequest(t).body, &body); err != nil {
				t.Fatal(err)
			}
			got, present := body["user"]
			switch {
			case tc.want == "" && present:
				t.Fatalf("anonymous request has user %s", got)
			case tc.want != "" && !jsonEqual(t, got, tc.want):
				t.Fatalf("body user %s, want %s", got, tc.want)
			}
			claims := tokenClaims(t, f)
			claim, present := claims["user"]
			switch {
			case tc.want == "" && present:
				t.Fatalf("anonymous token has user %v", claim)
			case tc.want != "":
				b, _ := json.Marshal(claim)
				if !jsonEqual(t, b, tc.want) {
					t.Fatalf("token user %s, want %s", b, tc.want)
				}
			}
		})
	}
}

// TestMultipartCarriesVerifiedUser: a message with files sends "user" as
// a form field of JSON text, as it does metadata and session.
func TestMultipartCarriesVerifiedUser(t *testing.T) {
	var s multipartStandIn
	c := newStandInClient(t, &s, nil)
	req := testRequest()
	req.User = &User{ID: "user-42", Name: "Ada"}
	req.Files = []Attachment{memFile("a.txt", "text/plain", []byte("hello"))}
	reply, err := c.Send(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = reply.ReadAll()
	reply.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.parts {
		if p.name == "user" {
			if want := `{"id":"user-42","name":"Ada","email":"","verified":true,"attributes":{}}`; !jsonEqual(t, []byte(p.value), want) {
				t.Fatalf("user field %s, want %s", p.value, want)
			}
			return
		}
	}
	t.Fatalf("no user field among %d parts", len(s.parts))
}

func jsonEqual(t *testing.T, got []byte, want string) bool {
	t.Helper()
	var a, b any
	if err := json.Unmarshal(got, &a); err != nil {
		t.Fatalf("%s: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &b); err != nil {
		t.Fatal(err)
	}
	ab, _ := json.Marshal(a)
	bb, _ := json.Marshal(b)
	return string(ab) == string(bb)
}
