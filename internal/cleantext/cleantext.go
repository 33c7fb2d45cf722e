// Package cleantext makes text safe to store and relay: both stores (and
// PostgreSQL's text type in particular) refuse NUL and invalid UTF-8, so
// text that came from outside (n8n's replies) is cleaned the same way
// before it is written or shown, instead of failing its insert.
package cleantext

import (
	"strings"
	"unicode/utf8"
)

// String returns s with each run of invalid UTF-8 bytes replaced by U+FFFD
// and every NUL removed. Text that needs neither is returned as is, without
// an allocation.
func String(s string) string {
	if utf8.ValidString(s) && strings.IndexByte(s, 0) < 0 {
		return s
	}
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "")
}

// Valid reports whether s is already clean: String(s) == s.
func Valid(s string) bool {
	return utf8.ValidString(s) && strings.IndexByte(s, 0) < 0
}
