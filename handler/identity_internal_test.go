package handler

import (
	"bytes"
	"encoding/json"
	"testing"
)

// FuzzWidgetIdentity: any widget metadata. Nothing panics; what is left is
// the metadata as sent, or a JSON object without the proof's fields (when
// a proof was present) and, with identity_secret configured, without a
// "user" key, whose value is then unverified_user.
func FuzzWidgetIdentity(f *testing.F) {
	for _, seed := range []string{
		`{"user_id":"42","user_hash":"ab","name":"Ada","email":"a@b","source":"x"}`,
		`{"identity_token":"t.t.t","user":{"verified":true}}`,
		`{"user":{"id":"admin"},"user_id":"42"}`,
		`{"user_hash":7}`, `{"user_hash":""}`, `[1]`, `null`, ``, `{"a":{"user_hash":"x"}}`,
	} {
		f.Add(seed, true)
		f.Add(seed, false)
	}
	f.Fuzz(func(t *testing.T, raw string, configured bool) {
		p, rest, bad := widgetIdentity(json.RawMessage(raw), configured)
		if bad != nil {
			if bad.Reason == "" || bad.Message == "" {
				t.Fatalf("refusal without a reason: %+v", bad)
			}
			return
		}
		var in map[string]json.RawMessage
		if json.Unmarshal([]byte(raw), &in) != nil || in == nil {
			if !bytes.Equal(rest, []byte(raw)) || p.Present() {
				t.Fatalf("metadata that is not an object changed: %q -> %q (%+v)", raw, rest, p)
			}
			return
		}
		var out map[string]json.RawMessage
		if err := json.Unmarshal(rest, &out); err != nil {
			t.Fatalf("left %q, not an object: %v", rest, err)
		}
		_, hasHash := in["user_hash"]
		_, hasToken := in["identity_token"]
		if (hasHash || hasToken) != p.Present() && !(hasHash || hasToken) {
			t.Fatalf("a proof from %q without user_hash or identity_token: %+v", raw, p)
		}
		if hasHash || hasToken {
			for _, k := range []string{"user_id", "user_hash", "identity_token", "name", "email"} {
				if _, ok := out[k]; ok {
					t.Fatalf("proof field %s left in %q", k, rest)
				}
			}
		}
		if u, ok := in["user"]; ok && configured {
			if _, still := out["user"]; still {
				t.Fatalf("user left in %q", rest)
			}
			var a, b any
			_ = json.Unmarshal(u, &a)
			_ = json.Unmarshal(out["unverified_user"], &b)
			ja, _ := json.Marshal(a)
			jb, _ := json.Marshal(b)
			if !bytes.Equal(ja, jb) {
				t.Fatalf("unverified_user %s, want the page's user %s", out["unverified_user"], u)
			}
		}
	})
}
