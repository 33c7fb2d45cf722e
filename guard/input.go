package guard

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Reasons an input is refused. Validators return an *InputError that wraps
// one of them, so a route can tell them apart with errors.Is and answer 400
// with InputError's message, which names the field.
var (
	ErrEmpty          = errors.New("empty")
	ErrTooLong        = errors.New("too long")
	ErrInvalidUTF8    = errors.New("invalid utf-8")
	ErrControlChar    = errors.New("control character")
	ErrNotObject      = errors.New("not a json object")
	ErrTooDeep        = errors.New("nested too deeply")
	ErrTooManyKeys    = errors.New("too many keys")
	ErrKeyTooLong     = errors.New("key too long")
	ErrStringTooLong  = errors.New("string too long")
	ErrTooLarge       = errors.New("too large")
	ErrInvalidURL     = errors.New("invalid url")
	ErrInvalidSession = errors.New("invalid session id")
	ErrNumberRange    = errors.New("number out of range")
)

// InputError is a refused input: which field, why (one of the Err*
// values), and a human explanation.
type InputError struct {
	Field  string // JSON field name; empty until WithField sets it
	Err    error  // one of the Err* values
	Detail string // what is wrong, worded to follow the field name
}

func (e *InputError) Error() string {
	f := e.Field
	if f == "" {
		f = "input"
	}
	return f + " " + e.Detail
}

func (e *InputError) Unwrap() error { return e.Err }

// WithField names the field an *InputError is about; other errors (and
// nil) are returned unchanged.
func WithField(err error, field string) error {
	var ie *InputError
	if errors.As(err, &ie) {
		c := *ie
		c.Field = field
		return &c
	}
	return err
}

func inputErr(reason error, format string, args ...any) *InputError {
	return &InputError{Err: reason, Detail: fmt.Sprintf(format, args...)}
}

// NormalizeMessage checks and normalizes a chat message (SPEC §7, §9.4):
// the text must be valid UTF-8; "\r\n" and a lone "\r" become "\n"; C0
// controls other than "\n" and "\t", DEL and C1 controls are refused;
// surrounding white space is trimmed; 1..maxRunes runes must remain.
// Everything else is kept verbatim: no HTML escaping (output encoding is
// the renderer's job) and no keyword lists, which refuse ordinary text such
// as "select a size".
func NormalizeMessage(s string, maxRunes int) (string, error) {
	if !utf8.ValidString(s) {
		return "", inputErr(ErrInvalidUTF8, "is not valid UTF-8")
	}
	if strings.IndexByte(s, '\r') >= 0 {
		s = strings.ReplaceAll(s, "\r\n", "\n")
		s = strings.ReplaceAll(s, "\r", "\n")
	}
	for i, r := range s {
		if isForbiddenControl(r) {
			return "", inputErr(ErrControlChar, "contains a control character (U+%04X at byte %d)", r, i)
		}
	}
	s = strings.TrimSpace(s)
	if s == "" {
		return "", inputErr(ErrEmpty, "must not be empty")
	}
	if n := utf8.RuneCountInString(s); n > maxRunes {
		return "", inputErr(ErrTooLong, "must be at most %d characters (got %d)", maxRunes, n)
	}
	return s, nil
}

// isForbiddenControl reports C0 controls other than \n and \t, DEL and C1
// controls.
func isForbiddenControl(r rune) bool {
	return r < 0x20 && r != '\n' && r != '\t' || r >= 0x7f && r <= 0x9f
}

// ObjectLimits bound a free-form JSON object such as `context` or
// `metadata`, which is stored and forwarded to n8n: without bounds one
// request could store megabytes or nest deep enough to hurt whoever parses
// it next.
type ObjectLimits struct {
	// MaxBytes bounds the raw JSON. Default 8 KiB.
	MaxBytes int
	// MaxDepth bounds nesting; the object itself is depth 1. Default 4.
	MaxDepth int
	// MaxKeys bounds the keys of all nested objects together. Default 64.
	MaxKeys int
	// MaxKeyLen bounds each key, in characters. Default 64.
	MaxKeyLen int
	// MaxStringLen bounds each string value, in characters. Default 2000.
	MaxStringLen int
}

// DefaultObjectLimits returns the limits used for zero fields of
// ObjectLimits: 8 KiB, depth 4, 64 keys, keys of 64 and strings of 2000
// characters.
func DefaultObjectLimits() ObjectLimits {
	return ObjectLimits{MaxBytes: 8 << 10, MaxDepth: 4, MaxKeys: 64, MaxKeyLen: 64, MaxStringLen: 2000}
}

func (o ObjectLimits) withDefaults() ObjectLimits {
	d := DefaultObjectLimits()
	if o.MaxBytes > 0 {
		d.MaxBytes = o.MaxBytes
	}
	if o.MaxDepth > 0 {
		d.MaxDepth = o.MaxDepth
	}
	if o.MaxKeys > 0 {
		d.MaxKeys = o.MaxKeys
	}
	if o.MaxKeyLen > 0 {
		d.MaxKeyLen = o.MaxKeyLen
	}
	if o.MaxStringLen > 0 {
		d.MaxStringLen = o.MaxStringLen
	}
	return d
}

// CheckObject checks a free-form JSON value that must be an object within
// limits (zero fields take DefaultObjectLimits). An absent value (empty
// raw) and JSON null pass, as an optional field left out. Strings and keys
// must not contain NUL (written \u0000) or unpaired surrogate escapes:
// PostgreSQL's jsonb refuses both, and the value is stored.
func CheckObject(raw json.RawMessage, limits ObjectLimits) error {
	lim := limits.withDefaults()
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	if len(raw) > lim.MaxBytes {
		return inputErr(ErrTooLarge, "must be at most %d bytes of JSON (got %d)", lim.MaxBytes, len(raw))
	}
	if !utf8.Valid(raw) {
		return inputErr(ErrInvalidUTF8, "is not valid UTF-8")
	}
	if raw[0] != '{' {
		return inputErr(ErrNotObject, "must be a JSON object")
	}
	if err := checkEscapes(raw); err != nil {
		return err
	}

	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	// stack holds, per open container, whether it is an object and
	// whether the next token in it is a key.
	type frame struct{ object, wantKey bool }
	var stack []frame
	keys := 0
	started := false
	for {
		tok, err := dec.Token()
		if err == io.EOF && len(stack) == 0 {
			break
		}
		if err == io.EOF {
			return inputErr(ErrNotObject, "must be a JSON object (truncated JSON)")
		}
		if err != nil {
			return inputErr(ErrNotObject, "must be a JSON object (%s)", jsonSyntaxDetail(err))
		}
		var top *frame
		if len(stack) > 0 {
			top = &stack[len(stack)-1]
		} else if started || tok != json.Delim('{') {
			return inputErr(ErrNotObject, "must be a single JSON object")
		}
		started = true
		if top != nil && top.object && top.wantKey {
			if d, ok := tok.(json.Delim); ok && d == '}' {
				stack = stack[:len(stack)-1]
				continue
			}
			key := tok.(string) // the decoder only yields a string or '}' here
			keys++
			if keys > lim.MaxKeys {
				return inputErr(ErrTooManyKeys, "must have at most %d keys in all", lim.MaxKeys)
			}
			if n := utf8.RuneCountInString(key); n > lim.MaxKeyLen {
				return inputErr(ErrKeyTooLong, "has a key longer than %d characters", lim.MaxKeyLen)
			}
			top.wantKey = false
			continue
		}
		if top != nil && top.object {
			top.wantKey = true // this token is the value
		}
		switch v := tok.(type) {
		case json.Delim:
			switch v {
			case '{', '[':
				if len(stack)+1 > lim.MaxDepth {
					return inputErr(ErrTooDeep, "must not nest deeper than %d levels", lim.MaxDepth)
				}
				stack = append(stack, frame{object: v == '{', wantKey: v == '{'})
			case ']':
				stack = stack[:len(stack)-1]
				if len(stack) > 0 && stack[len(stack)-1].object {
					// The array was a value; the object now wants a key.
					stack[len(stack)-1].wantKey = true
				}
				continue
			}
		case string:
			if n := utf8.RuneCountInString(v); n > lim.MaxStringLen {
				return inputErr(ErrStringTooLong, "has a string longer than %d characters", lim.MaxStringLen)
			}
		case json.Number:
			if err := checkNumber(v); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkNumber refuses a JSON number outside the range of a 64-bit float:
// PostgreSQL's jsonb refuses some of them (1e999999), and n8n, like any
// JavaScript, reads numbers as 64-bit floats. A number that is not zero
// but would read as zero (1e-400) is refused too.
func checkNumber(n json.Number) error {
	f, err := strconv.ParseFloat(string(n), 64)
	if err != nil || f == 0 && strings.ContainsAny(mantissa(string(n)), "123456789") {
		return inputErr(ErrNumberRange, "has a number outside the range of a 64-bit float (about 1e-308 to 1.8e308)")
	}
	return nil
}

// mantissa is a JSON number's digits before its exponent.
func mantissa(n string) string {
	if i := strings.IndexAny(n, "eE"); i >= 0 {
		return n[:i]
	}
	return n
}

// jsonSyntaxDetail keeps a decoder error short and free of input echoes.
func jsonSyntaxDetail(err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("invalid JSON at byte %d", se.Offset)
	}
	return "invalid JSON"
}

// checkEscapes refuses \u0000 and unpaired surrogate escapes in JSON text.
// Outside strings JSON has no backslashes, so a linear scan of escapes is
// exact.
func checkEscapes(raw []byte) error {
	for i := 0; i < len(raw); i++ {
		if raw[i] != '\\' {
			continue
		}
		if i+1 >= len(raw) {
			return nil // a syntax error the decoder reports
		}
		if raw[i+1] != 'u' {
			i++ // skip the escaped character (it may be a backslash)
			continue
		}
		cp, ok := hex4(raw[i+2:])
		if !ok {
			return nil
		}
		switch {
		case cp == 0:
			return inputErr(ErrControlChar, "contains a NUL character (\\u0000)")
		case cp >= 0xD800 && cp <= 0xDBFF:
			if i+7 < len(raw) && raw[i+6] == '\\' && raw[i+7] == 'u' {
				if lo, ok := hex4(raw[i+8:]); ok && lo >= 0xDC00 && lo <= 0xDFFF {
					i += 11
					continue
				}
			}
			return inputErr(ErrInvalidUTF8, "contains an unpaired UTF-16 surrogate escape")
		case cp >= 0xDC00 && cp <= 0xDFFF:
			return inputErr(ErrInvalidUTF8, "contains an unpaired UTF-16 surrogate escape")
		}
		i += 5
	}
	return nil
}

func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[:4] {
		r <<= 4
		switch {
		case c >= '0' && c <= '9':
			r |= rune(c - '0')
		case c >= 'a' && c <= 'f':
			r |= rune(c - 'a' + 10)
		case c >= 'A' && c <= 'F':
			r |= rune(c - 'A' + 10)
		default:
			return 0, false
		}
	}
	return r, true
}

// MaxPageURLBytes bounds page_url.
const MaxPageURLBytes = 2048

// CheckPageURL checks a page_url: an absolute http or https URL with a
// host, at most 2048 bytes, without user info (which could carry
// credentials into storage and logs), white space or control characters.
func CheckPageURL(s string) error {
	if s == "" {
		return inputErr(ErrEmpty, "must not be empty")
	}
	if len(s) > MaxPageURLBytes {
		return inputErr(ErrTooLong, "must be at most %d bytes (got %d)", MaxPageURLBytes, len(s))
	}
	if !utf8.ValidString(s) {
		return inputErr(ErrInvalidUTF8, "is not valid UTF-8")
	}
	for _, r := range s {
		if r <= ' ' || r >= 0x7f && r <= 0x9f {
			return inputErr(ErrInvalidURL, "must not contain white space or control characters")
		}
	}
	u, err := url.Parse(s)
	if err != nil {
		return inputErr(ErrInvalidURL, "is not a valid URL")
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return inputErr(ErrInvalidURL, "must be an http or https URL")
	}
	if u.Opaque != "" || u.Host == "" || u.Hostname() == "" {
		return inputErr(ErrInvalidURL, "must be an absolute URL with a host")
	}
	if u.User != nil {
		return inputErr(ErrInvalidURL, "must not contain user info")
	}
	return nil
}

// ValidWidgetSessionID reports whether s is an acceptable @n8n/chat
// sessionId: 8 to 128 characters of [A-Za-z0-9_-]. The widget makes a
// UUID; the bounds keep the id usable as a key and in logs.
func ValidWidgetSessionID(s string) bool {
	if len(s) < 8 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// CheckWidgetSessionID is ValidWidgetSessionID as an *InputError.
func CheckWidgetSessionID(s string) error {
	if !ValidWidgetSessionID(s) {
		return inputErr(ErrInvalidSession, "must be 8 to 128 characters of A-Z, a-z, 0-9, _ and -")
	}
	return nil
}
