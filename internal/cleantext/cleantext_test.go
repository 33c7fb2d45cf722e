package cleantext

import (
	"testing"
	"unicode/utf8"
)

func TestString(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"hello", "hello"},
		{"héllo ✓", "héllo ✓"},
		{"a\x00b", "ab"},
		{"\x00\x00", ""},
		{"a\xffb", "a\uFFFDb"},
		{"a\xff\xfeb", "a\uFFFDb"}, // one replacement per run
		{"\xc3", "\uFFFD"},         // a sequence cut short
		{"a\x00\xffb", "a\uFFFDb"},
		{"line\r\nnext\t", "line\r\nnext\t"},
	} {
		if got := String(tc.in); got != tc.want {
			t.Errorf("String(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if Valid(tc.in) != (tc.in == tc.want) {
			t.Errorf("Valid(%q) = %v", tc.in, Valid(tc.in))
		}
	}
}

func TestStringDoesNotAllocateCleanText(t *testing.T) {
	s := "an ordinary reply of a chat workflow"
	if n := testing.AllocsPerRun(100, func() { _ = String(s) }); n != 0 {
		t.Fatalf("String allocated %v times for clean text", n)
	}
}

func FuzzString(f *testing.F) {
	for _, s := range []string{"", "ok", "a\x00b", "\xff", "\xe2\x82", "✓\x00\xc0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got := String(s)
		if !utf8.ValidString(got) || !Valid(got) {
			t.Fatalf("String(%q) = %q is not clean", s, got)
		}
		if String(got) != got {
			t.Fatalf("String is not idempotent on %q", s)
		}
		if Valid(s) && got != s {
			t.Fatalf("clean text %q changed to %q", s, got)
		}
	})
}
