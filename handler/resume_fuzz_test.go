package handler_test

import (
	"strconv"
	"testing"

	"github.com/chatproxy/caddy-chatproxy/handler"
)

// ParseEventID takes exactly the decimal ids the proxy writes (what
// strconv.FormatUint gives for an id up to 19 digits) and refuses
// everything else.
func FuzzParseEventID(f *testing.F) {
	for _, s := range []string{"0", "1", "42", "007", "", "-1", "+1", " 1", "1 ", "1e3", "0x10", "18446744073709551615",
		"9999999999999999999", "99999999999999999999", "１", "1\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := handler.ParseEventID(s)
		digits := s != "" && len(s) <= 19
		for i := 0; i < len(s); i++ {
			if s[i] < '0' || s[i] > '9' {
				digits = false
			}
		}
		if digits != (err == nil) {
			t.Fatalf("ParseEventID(%q) = %d, %v; all digits (1 to 19): %v", s, id, err, digits)
		}
		if err == nil {
			want, perr := strconv.ParseUint(s, 10, 64)
			if perr != nil || want != id {
				t.Fatalf("ParseEventID(%q) = %d, want %d", s, id, want)
			}
		}
	})
}
