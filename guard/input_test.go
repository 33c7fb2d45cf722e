package guard

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestNormalizeMessage(t *testing.T) {
	good := map[string]string{
		"hi":                            "hi",
		"  hello \n":                    "hello",
		"a\r\nb\rc\nd":                  "a\nb\nc\nd",
		"\r\n\tindented\r\n":            "indented",
		"line\twith\ttabs":              "line\twith\ttabs",
		"<script>alert(1)</script>":     "<script>alert(1)</script>",
		"SELECT * FROM t; DROP TABLE x": "SELECT * FROM t; DROP TABLE x",
		"Привет, мир":                   "Привет, мир",
		"你好世界":                          "你好世界",
		"مرحبا":                         "مرحبا",
		"👍🏽 ok":                         "👍🏽 ok",
		"&amp; \"quotes\" 'x'":          "&amp; \"quotes\" 'x'",
		"\u00a0nbsp trimmed\u3000":      "nbsp trimmed",
		"zero\u200bwidth":               "zero\u200bwidth",
	}
	for in, want := range good {
		got, err := NormalizeMessage(in, 100)
		if err != nil || got != want {
			t.Errorf("NormalizeMessage(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	bad := map[string]error{
		"":                       ErrEmpty,
		"   \n\t ":               ErrEmpty,
		"\r\n":                   ErrEmpty,
		"nul\x00":                ErrControlChar,
		"bell\a":                 ErrControlChar,
		"esc\x1b[31m":            ErrControlChar,
		"del\x7f":                ErrControlChar,
		"c1\u0085":               ErrControlChar,
		"c1\u009b":               ErrControlChar,
		"bad\xffutf8":            ErrInvalidUTF8,
		"\xed\xa0\x80":           ErrInvalidUTF8, // a surrogate
		strings.Repeat("é", 101): ErrTooLong,
	}
	for in, want := range bad {
		_, err := NormalizeMessage(in, 100)
		if !errors.Is(err, want) {
			t.Errorf("NormalizeMessage(%q) error %v; want %v", in, err, want)
		}
	}
	// The bound counts characters, not bytes, after trimming.
	if _, err := NormalizeMessage("  "+strings.Repeat("日", 100)+"  ", 100); err != nil {
		t.Errorf("100 characters refused: %v", err)
	}
}

func TestInputErrorNamesField(t *testing.T) {
	_, err := NormalizeMessage(strings.Repeat("a", 11), 10)
	err = WithField(err, "message")
	var ie *InputError
	if !errors.As(err, &ie) || ie.Field != "message" || !errors.Is(err, ErrTooLong) {
		t.Fatalf("error %#v", err)
	}
	if got := err.Error(); got != "message must be at most 10 characters (got 11)" {
		t.Fatalf("message %q", got)
	}
	if WithField(nil, "x") != nil {
		t.Fatal("WithField(nil) != nil")
	}
	if err := CheckPageURL("ftp://x"); WithField(err, "page_url").Error() != "page_url must be an http or https URL" {
		t.Fatalf("page_url message %q", WithField(err, "page_url"))
	}
}

func FuzzNormalizeMessage(f *testing.F) {
	for _, s := range []string{"hi", " a\r\nb ", "\x00", "\u0085x", "日本", "\xff", "\r", "a\rb", " \t\n", "\u2028x\u2029"} {
		f.Add(s, 10)
	}
	f.Fuzz(func(t *testing.T, s string, max int) {
		if max < 1 || max > 10000 {
			max = 100
		}
		out, err := NormalizeMessage(s, max)
		if err != nil {
			var ie *InputError
			if out != "" || !errors.As(err, &ie) || ie.Err == nil {
				t.Fatalf("error %v with output %q", err, out)
			}
			return
		}
		if !utf8.ValidString(out) {
			t.Fatalf("invalid UTF-8 out of %q", s)
		}
		if n := utf8.RuneCountInString(out); n < 1 || n > max {
			t.Fatalf("%d runes out of %q (max %d)", n, s, max)
		}
		if strings.ContainsRune(out, '\r') || out != strings.TrimSpace(out) {
			t.Fatalf("not normalized: %q", out)
		}
		for _, r := range out {
			if isForbiddenControl(r) {
				t.Fatalf("control U+%04X kept in %q", r, out)
			}
		}
		// Idempotent: normalized text normalizes to itself.
		if again, err := NormalizeMessage(out, max); err != nil || again != out {
			t.Fatalf("not idempotent: %q → %q, %v", out, again, err)
		}
		// Verbatim: only line ends and surrounding space change.
		want := strings.TrimSpace(strings.ReplaceAll(strings.ReplaceAll(s, "\r\n", "\n"), "\r", "\n"))
		if out != want {
			t.Fatalf("%q became %q; want %q", s, out, want)
		}
	})
}

func TestCheckObject(t *testing.T) {
	lim := ObjectLimits{}
	good := []string{
		``, `null`, `{}`, ` {"a":1} `, `{"page":"x","n":1.5,"ok":true,"none":null}`,
		`{"a":{"b":{"c":[1,2,"e"]}}}`, // depth 4
		`{"s":"<script>\u00e9\ud83d\ude00"}`, `{"esc":"\\u0000 is text"}`, `{"a":[],"b":{}}`,
		`{"big":1.7976931348623157e308,"small":5e-324,"neg":-1e300,"zero":0e-999999,"z":-0.0,"n":[0,1E2]}`,
	}
	for _, s := range good {
		if err := CheckObject(json.RawMessage(s), lim); err != nil {
			t.Errorf("CheckObject(%s): %v", s, err)
		}
	}
	many := `{` + strings.Repeat(`"k":1,`, 64) + `"last":1}`
	bad := map[string]error{
		`[]`:                                    ErrNotObject,
		`"x"`:                                   ErrNotObject,
		`1`:                                     ErrNotObject,
		`{"a":1}{"b":2}`:                        ErrNotObject,
		`{"a":1} 2`:                             ErrNotObject,
		`{"a":`:                                 ErrNotObject,
		`{"a":1,}`:                              ErrNotObject,
		`{"a":{"b":{"c":{"d":{}}}}}`:            ErrTooDeep,
		`{"a":[[[[1]]]]}`:                       ErrTooDeep,
		many:                                    ErrTooManyKeys,
		`{"` + strings.Repeat("k", 65) + `":1}`: ErrKeyTooLong,
		`{"a":"` + strings.Repeat("v", 2001) + `"}`: ErrStringTooLong,
		`{"a":"` + strings.Repeat("v", 9000) + `"}`: ErrTooLarge,
		`{"a":"nul\u0000"}`:                         ErrControlChar,
		`{"\u0000":1}`:                              ErrControlChar,
		`{"a":"\ud800"}`:                            ErrInvalidUTF8,
		`{"a":"\udc00\ud800"}`:                      ErrInvalidUTF8,
		"{\"a\":\"\xff\"}":                          ErrInvalidUTF8,
		`{"a":1e999999}`:                            ErrNumberRange,
		`{"a":-1e309}`:                              ErrNumberRange,
		`{"a":[1,{"b":1E400}]}`:                     ErrNumberRange,
		`{"a":1e-999999}`:                           ErrNumberRange,
		`{"a":0.1e-400}`:                            ErrNumberRange,
	}
	for s, want := range bad {
		if err := CheckObject(json.RawMessage(s), lim); !errors.Is(err, want) {
			t.Errorf("CheckObject(%.60s) = %v; want %v", s, err, want)
		}
	}
	// Custom limits apply.
	if err := CheckObject(json.RawMessage(`{"a":{"b":1}}`), ObjectLimits{MaxDepth: 1}); !errors.Is(err, ErrTooDeep) {
		t.Errorf("MaxDepth 1: %v", err)
	}
	// Keys are counted across nesting.
	if err := CheckObject(json.RawMessage(`{"a":{"b":1},"c":[{"d":1}]}`), ObjectLimits{MaxKeys: 3}); !errors.Is(err, ErrTooManyKeys) {
		t.Errorf("MaxKeys 3 with 4 keys: %v", err)
	}
}

func FuzzCheckObject(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":[1,{"b":"c"}]}`, `{"a":"\u0000"}`, `{"a":"\ud83d\ude00"}`, `[1]`, `{"a":1}{}`, `{"a":"\\\\u0000"}`, `null`, `{"a":1e999}`, `{"a":-2e-400}`} {
		f.Add([]byte(s))
	}
	lim := ObjectLimits{MaxBytes: 512, MaxDepth: 3, MaxKeys: 8, MaxKeyLen: 8, MaxStringLen: 16}
	f.Fuzz(func(t *testing.T, raw []byte) {
		err := CheckObject(raw, lim)
		if err != nil {
			var ie *InputError
			if !errors.As(err, &ie) || ie.Err == nil {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		trimmed := strings.TrimSpace(string(raw))
		if trimmed == "" || trimmed == "null" {
			return
		}
		// Accepted: one valid JSON object within the limits.
		if !utf8.Valid(raw) || len(trimmed) > lim.MaxBytes {
			t.Fatalf("accepted invalid or large input %q", raw)
		}
		var v map[string]any
		if err := json.Unmarshal(raw, &v); err != nil {
			t.Fatalf("accepted %q, which is not a JSON object: %v", raw, err)
		}
		keys, depth := walkJSON(t, v, 1, lim)
		if keys > lim.MaxKeys || depth > lim.MaxDepth {
			t.Fatalf("accepted %q with %d keys, depth %d", raw, keys, depth)
		}
	})
}

// walkJSON counts the keys and container depth of a decoded value and
// checks its strings against lim.
func walkJSON(t *testing.T, v any, depth int, lim ObjectLimits) (keys, maxDepth int) {
	check := func(s string, maxLen int) {
		if strings.ContainsRune(s, 0) || utf8.RuneCountInString(s) > maxLen {
			t.Fatalf("accepted the string %q", s)
		}
	}
	switch x := v.(type) {
	case map[string]any:
		maxDepth = depth
		for k, e := range x {
			check(k, lim.MaxKeyLen)
			k2, d := walkJSON(t, e, depth+1, lim)
			keys += 1 + k2
			maxDepth = max(maxDepth, d)
		}
	case []any:
		maxDepth = depth
		for _, e := range x {
			k2, d := walkJSON(t, e, depth+1, lim)
			keys += k2
			maxDepth = max(maxDepth, d)
		}
	case string:
		check(x, lim.MaxStringLen)
	}
	return keys, maxDepth
}

func TestCheckPageURL(t *testing.T) {
	for _, s := range []string{
		"https://shop.example/products/1?x=1#top", "http://localhost:8080/", "https://[2001:db8::1]/a",
		"HTTPS://Shop.Example/", "https://xn--mnchen-3ya.de/", "https://münchen.de/straße",
		"https://shop.example/" + strings.Repeat("a", 2048-len("https://shop.example/")),
	} {
		if err := CheckPageURL(s); err != nil {
			t.Errorf("CheckPageURL(%.80q): %v", s, err)
		}
	}
	for _, s := range []string{
		"", "/relative", "shop.example/x", "javascript:alert(1)", "data:text/html,x", "ftp://x/", "file:///etc/passwd",
		"https://user:pw@shop.example/", "https://user@shop.example/", "https:///nohost", "https://:80/",
		"https://shop.example/ space", "https://shop.example/\x00", "https://shop.example/\n", "https:shop.example",
		"https://shop.example/" + strings.Repeat("a", 2048), "https://shop.example/\xff", "//shop.example/",
	} {
		if err := CheckPageURL(s); err == nil {
			t.Errorf("CheckPageURL(%.80q) accepted", s)
		}
	}
}

func FuzzCheckPageURL(f *testing.F) {
	for _, s := range []string{"https://a.example/x", "http://u@h/", "javascript:x", "https://[::1]:80/", "http://%41/", "https://a.example/\u0085"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if CheckPageURL(s) != nil {
			return
		}
		if len(s) > MaxPageURLBytes || !utf8.ValidString(s) {
			t.Fatalf("accepted %q", s)
		}
		lower := strings.ToLower(s)
		if !strings.HasPrefix(lower, "http://") && !strings.HasPrefix(lower, "https://") {
			t.Fatalf("accepted a non-http URL %q", s)
		}
		for _, r := range s {
			if r <= ' ' || isForbiddenControl(r) {
				t.Fatalf("accepted %q with U+%04X", s, r)
			}
		}
		host := s[strings.Index(s, "//")+2:]
		if i := strings.IndexAny(host, "/?#"); i >= 0 {
			host = host[:i]
		}
		if strings.Contains(host, "@") || host == "" {
			t.Fatalf("accepted %q: host part %q", s, host)
		}
	})
}

func TestValidWidgetSessionID(t *testing.T) {
	for _, s := range []string{"abcdefgh", "3f1c2a9e-7b1d-4c5e-9f00-0123456789ab", "A_b-C_d-", strings.Repeat("x", 128)} {
		if !ValidWidgetSessionID(s) || CheckWidgetSessionID(s) != nil {
			t.Errorf("%q refused", s)
		}
	}
	for _, s := range []string{"", "short", "abcdefg", strings.Repeat("x", 129), "abcdefgh!", "abc defgh", "abcdéfgh", "abcdefgh\n", "../../etc"} {
		if ValidWidgetSessionID(s) || !errors.Is(CheckWidgetSessionID(s), ErrInvalidSession) {
			t.Errorf("%q accepted", s)
		}
	}
}

func FuzzValidWidgetSessionID(f *testing.F) {
	for _, s := range []string{"abcdefgh", "short", "x\x00yyyyyyy", strings.Repeat("a", 129)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if !ValidWidgetSessionID(s) {
			return
		}
		if len(s) < 8 || len(s) > 128 {
			t.Fatalf("accepted length %d", len(s))
		}
		for _, r := range s {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
				t.Fatalf("accepted %q with %q", s, r)
			}
		}
	})
}
