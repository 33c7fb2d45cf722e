package upload

import (
	"bytes"
	"mime"
	"net/http"
	"strings"
	"unicode/utf8"
)

// verifiable lists the media types whose bytes the proxy can check.
var verifiable = []string{
	"image/png", "image/jpeg", "image/webp", "image/gif", "application/pdf",
	"text/plain", "text/csv", "text/markdown", "application/json",
}

// textType reports whether files of type mt must be UTF-8 text.
func textType(mt string) bool {
	switch mt {
	case "text/plain", "text/csv", "text/markdown", "application/json":
		return true
	}
	return false
}

// forbiddenType reports whether mt is a type that is never accepted:
// markup a browser would run (HTML, SVG, XML with scripts) and programs.
func forbiddenType(mt string) bool {
	switch mt {
	case "text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml",
		"text/javascript", "application/javascript", "application/ecmascript", "text/ecmascript",
		"application/x-msdownload", "application/x-msdos-program", "application/vnd.microsoft.portable-executable",
		"application/x-executable", "application/x-elf", "application/x-mach-binary", "application/x-sharedlib",
		"application/x-sh", "application/x-shellscript", "text/x-shellscript", "application/wasm",
		"application/java-archive", "application/x-java-archive", "application/vnd.android.package-archive":
		return true
	}
	return false
}

// sniffLen is how many leading bytes decide a file's type (what
// http.DetectContentType reads).
const sniffLen = 512

// executable reports whether head starts like a program: a Windows PE
// ("MZ"), ELF, Mach-O (also universal), WebAssembly or a "#!" script.
func executable(head []byte) bool {
	for _, magic := range [][]byte{
		[]byte("MZ"), []byte("\x7fELF"), []byte("\x00asm"), []byte("#!"),
		{0xfe, 0xed, 0xfa, 0xce}, {0xfe, 0xed, 0xfa, 0xcf}, {0xce, 0xfa, 0xed, 0xfe}, {0xcf, 0xfa, 0xed, 0xfe},
		{0xca, 0xfe, 0xba, 0xbe},
	} {
		if bytes.HasPrefix(head, magic) {
			return true
		}
	}
	return false
}

// markup reports whether head looks like HTML, SVG or XML, which a browser
// shown the file could run scripts from.
func markup(head []byte) bool {
	switch sniffed(head) {
	case "text/html", "text/xml":
		return true
	}
	h := bytes.ToLower(head)
	for _, tag := range []string{"<svg", "<!doctype", "<html", "<script", "<?xml"} {
		if bytes.Contains(h, []byte(tag)) {
			return true
		}
	}
	return false
}

// sniffed is the media type http.DetectContentType sees in head, without
// parameters.
func sniffed(head []byte) string {
	mt, _, _ := mime.ParseMediaType(http.DetectContentType(head))
	return mt
}

// checkHead decides, from a file's first bytes (all of them when the file
// is shorter than sniffLen), whether they agree with the declared type
// mt. It returns nil or the refusal.
func checkHead(mt string, head []byte) *Error {
	if executable(head) {
		return refuse(ReasonForbidden, "it is a program, which is never accepted")
	}
	if markup(head) {
		return refuse(ReasonForbidden, "it holds HTML, SVG or XML markup, which is never accepted")
	}
	got := sniffed(head)
	if textType(mt) {
		// DetectContentType calls text what has no control bytes other
		// than \t \n \f \r ESC in its first bytes; the rest of the file is
		// checked as it streams (textChecker).
		if got != "text/plain" || !utf8.Valid(trimPartialRune(head)) {
			return refuse(ReasonMismatch, "it is declared as %s but is not UTF-8 text", mt)
		}
		return nil
	}
	if got != mt {
		return refuse(ReasonMismatch, "it is declared as %s but its content is %s", mt, describe(got))
	}
	return nil
}

func describe(mt string) string {
	if mt == "application/octet-stream" {
		return "not a known type"
	}
	return mt
}

// trimPartialRune drops an incomplete UTF-8 sequence at the end of b, cut
// by the sniff window rather than wrong.
func trimPartialRune(b []byte) []byte {
	for i := 1; i <= utf8.UTFMax-1 && i <= len(b); i++ {
		c := b[len(b)-i]
		if c < 0x80 {
			return b // ASCII: nothing cut
		}
		if utf8.RuneStart(c) {
			if !utf8.FullRune(b[len(b)-i:]) {
				return b[:len(b)-i]
			}
			return b
		}
	}
	return b
}

// textChecker checks, as a file streams through it, that the whole file
// is valid UTF-8 without NUL; a rune split between two writes is carried
// over.
type textChecker struct {
	carry [utf8.UTFMax]byte
	n     int
	bad   bool
}

func (t *textChecker) Write(p []byte) (int, error) {
	if t.bad {
		return len(p), nil
	}
	if bytes.IndexByte(p, 0) >= 0 {
		t.bad = true
		return len(p), nil
	}
	b := p
	if t.n > 0 {
		// Complete the carried rune with the first bytes of p.
		need := min(utf8.UTFMax-t.n, len(p))
		buf := append(t.carry[:t.n:t.n], p[:need]...)
		r, size := utf8.DecodeRune(buf)
		if r == utf8.RuneError && size <= 1 {
			if utf8.FullRune(buf) {
				t.bad = true
				return len(p), nil
			}
			t.n = copy(t.carry[:], buf) // still incomplete
			return len(p), nil
		}
		b = p[size-t.n:]
		t.n = 0
	}
	whole := trimPartialRune(b)
	if !utf8.Valid(whole) {
		t.bad = true
		return len(p), nil
	}
	t.n = copy(t.carry[:], b[len(whole):])
	return len(p), nil
}

// valid reports whether everything written was valid UTF-8 without NUL.
func (t *textChecker) valid() bool { return !t.bad && t.n == 0 }

// declaredType parses a part's Content-Type into a bare, lower-case media
// type ("" when missing or unreadable).
func declaredType(v string) string {
	mt, _, err := mime.ParseMediaType(v)
	if err != nil {
		return ""
	}
	return strings.ToLower(mt)
}
