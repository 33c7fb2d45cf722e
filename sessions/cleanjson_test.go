package sessions

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
	"unicode/utf8"
)

func TestCleanJSON(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{``, ``},
		{` { "a" : 1 } `, `{"a":1}`},
		{`{"a":"\u0000"}`, `{"a":""}`},
		{`{"\u0000":"\\u0000"}`, `{"":"\\u0000"}`}, // an escaped backslash is not an escape
		{`{"a":"x\U0000"}`, ``},                    // not JSON: \U
		{`{"a":"\ud800"}`, `{"a":"` + "\uFFFD" + `"}`},
		{`{"a":"\ud83d\ude00 <&>"}`, `{"a":"😀 <&>"}`},
		{`{"a":"` + "\xff" + `"}`, `{"a":"` + "\uFFFD" + `"}`},
		{`[1e308,-1e308,5e-324,0e999999,-0.0,1E2]`, `[1e308,-1e308,5e-324,0e999999,-0.0,1E2]`},
	} {
		got, err := cleanJSON(json.RawMessage(tc.in))
		if tc.want == "" && tc.in != "" {
			if !errors.Is(err, ErrInvalidData) {
				t.Errorf("cleanJSON(%q) = %q, %v; want ErrInvalidData", tc.in, got, err)
			}
			continue
		}
		if err != nil || string(got) != tc.want {
			t.Errorf("cleanJSON(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{`1e309`, `-1e309`, `1e-400`, `[0.00001e-400]`} {
		if got, err := cleanJSON(json.RawMessage(in)); !errors.Is(err, ErrInvalidData) {
			t.Errorf("cleanJSON(%q) = %q, %v; want ErrInvalidData", in, got, err)
		}
	}
}

func TestCleanJSONDoesNotCopyCleanDocuments(t *testing.T) {
	in := json.RawMessage(`{"page":"https://example.com/?q=1","n":[1,2.5,-3e10],"ok":true,"x":null}`)
	got, err := cleanJSON(in)
	if err != nil || !bytes.Equal(got, in) {
		t.Fatalf("cleanJSON = %s, %v", got, err)
	}
}

func FuzzCleanJSON(f *testing.F) {
	for _, s := range []string{`{"a":1}`, `{"a":"\u0000"}`, `["\ud800","\udc00\ud800"]`, `{"a":1e999999}`, "[\"\xff\"]", `"\\u0000"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		out, err := cleanJSON(in)
		if err != nil {
			if !errors.Is(err, ErrInvalidData) {
				t.Fatalf("cleanJSON(%q): error %v is not ErrInvalidData", in, err)
			}
			return
		}
		if len(in) > 0 && (!json.Valid(out) || !utf8.Valid(out)) {
			t.Fatalf("cleanJSON(%q) = %q: not valid JSON and UTF-8", in, out)
		}
		if bytes.Contains(out, []byte(`\u0000`)) && !bytes.Contains(out, []byte(`\\u0000`)) {
			t.Fatalf("cleanJSON(%q) = %q keeps a NUL escape", in, out)
		}
		again, err := cleanJSON(out)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("cleanJSON is not idempotent on %q: %q then %q, %v", in, out, again, err)
		}
	})
}
