package upload

import (
	"path"
	"strings"
	"unicode"
	"unicode/utf8"
)

// maxNameBytes caps a sanitised file name; the extension is kept.
const maxNameBytes = 128

// maxExtBytes is the longest extension kept when a name is shortened.
const maxExtBytes = 16

// extensions gives a name to a file that arrives without a usable one.
var extensions = map[string]string{
	"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
	"application/pdf": ".pdf", "text/plain": ".txt", "text/csv": ".csv", "text/markdown": ".md",
	"application/json": ".json",
}

// SanitizeName turns a client's file name into one that is safe to store,
// log and forward: the last element of any path (either slash), invalid
// UTF-8, control and format characters (bidi overrides, zero-width)
// removed, quotes replaced, surrounding spaces and dots trimmed, at most
// maxNameBytes bytes with the extension kept. A name left empty becomes
// "file" plus the extension of mediaType.
func SanitizeName(name, mediaType string) string {
	if i := strings.LastIndexAny(name, `/\`); i >= 0 {
		name = name[i+1:]
	}
	var b strings.Builder
	for _, r := range strings.ToValidUTF8(name, "") {
		switch {
		case r == utf8.RuneError, unicode.IsControl(r), unicode.Is(unicode.Cf, r),
			r == '\u2028', r == '\u2029':
			continue
		case r == '"' || r == '`':
			b.WriteRune('\'')
		case unicode.IsSpace(r):
			b.WriteRune(' ')
		default:
			b.WriteRune(r)
		}
	}
	name = strings.Trim(b.String(), " .")
	if name == "" {
		ext := extensions[mediaType]
		if ext == "" {
			ext = ".bin"
		}
		return "file" + ext
	}
	if len(name) <= maxNameBytes {
		return name
	}
	ext := path.Ext(name)
	if len(ext) > maxExtBytes {
		ext = ""
	}
	stem := name[:len(name)-len(ext)]
	stem = truncateUTF8(stem, maxNameBytes-len(ext))
	return strings.TrimRight(stem, " .") + ext
}

// truncateUTF8 cuts s to at most n bytes without splitting a rune.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
