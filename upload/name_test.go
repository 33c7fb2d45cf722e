package upload

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestSanitizeName(t *testing.T) {
	long := strings.Repeat("é", 200) + ".pdf"
	cases := []struct{ in, mt, want string }{
		{"report.pdf", "application/pdf", "report.pdf"},
		{"../../etc/passwd.txt", "text/plain", "passwd.txt"},
		{`C:\Users\me\Desktop\photo.png`, "image/png", "photo.png"},
		{"evil\x00name\r\n.png", "image/png", "evilname.png"},
		{"invoice\u202Efdp.exe.png", "image/png", "invoicefdp.exe.png"}, // bidi override removed
		{"zero\u200Bwidth.txt", "text/plain", "zerowidth.txt"},
		{`quote"d.txt`, "text/plain", "quote'd.txt"},
		{"  .hidden.txt. ", "text/plain", "hidden.txt"},
		{"tab\tsep.txt", "text/plain", "tabsep.txt"},
		{"", "image/png", "file.png"},
		{"../..", "application/pdf", "file.pdf"},
		{"\xff\xfe.txt", "text/plain", "txt"},
		{"///", "image/x-unknown", "file.bin"},
	}
	for _, tc := range cases {
		if got := SanitizeName(tc.in, tc.mt); got != tc.want {
			t.Errorf("SanitizeName(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	got := SanitizeName(long, "application/pdf")
	if len(got) > maxNameBytes || !strings.HasSuffix(got, ".pdf") || !utf8.ValidString(got) {
		t.Errorf("long name → %q (%d bytes): want ≤ %d bytes, valid UTF-8, .pdf kept", got, len(got), maxNameBytes)
	}
}

func TestTextCheckerAcrossWrites(t *testing.T) {
	text := []byte("ab€ü𝄞 end") // 1-, 2-, 3- and 4-byte runes
	for split := 0; split <= len(text); split++ {
		for split2 := split; split2 <= len(text); split2++ {
			var tc textChecker
			tc.Write(text[:split])
			tc.Write(text[split:split2])
			tc.Write(text[split2:])
			if !tc.valid() {
				t.Fatalf("valid text split at %d,%d reported invalid", split, split2)
			}
		}
	}
	for _, bad := range [][]byte{[]byte("a\xffb"), []byte("a\x00b"), []byte("ends in half a rune \xe2\x82"), []byte("\xed\xa0\x80 surrogate")} {
		for split := 0; split <= len(bad); split++ {
			var tc textChecker
			tc.Write(bad[:split])
			tc.Write(bad[split:])
			if tc.valid() {
				t.Errorf("%q split at %d reported valid", bad, split)
			}
		}
	}
}
