package upload

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Sample file heads: each is what its type's signature looks like.
var (
	pngHead  = []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00")
	jpegHead = []byte("\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
	pdfHead  = []byte("%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n")
	webpHead = []byte("RIFF\x24\x00\x00\x00WEBPVP8 \x18\x00\x00\x00")
	gifHead  = []byte("GIF89a\x01\x00\x01\x00\x80\x00\x00")
)

// sized returns head padded with filler bytes to n bytes.
func sized(head []byte, n int, filler byte) []byte {
	b := make([]byte, n)
	copy(b, head)
	for i := len(head); i < n; i++ {
		b[i] = filler
	}
	return b
}

type part struct {
	field    string // form name
	filename string // file part when set (or when file is true)
	file     bool
	ctype    string
	body     []byte
}

// multipartBody builds a body the way a browser does.
func multipartBody(t testing.TB, parts ...part) (*bytes.Buffer, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range parts {
		h := textproto.MIMEHeader{}
		if p.file || p.filename != "" {
			h.Set("Content-Disposition", `form-data; name="`+p.field+`"; filename="`+p.filename+`"`)
		} else {
			h.Set("Content-Disposition", `form-data; name="`+p.field+`"`)
		}
		if p.ctype != "" {
			h.Set("Content-Type", p.ctype)
		}
		w, err := mw.CreatePart(h)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w.Write(p.body)
	}
	if err := mw.Close(); err != nil {
		t.Fatal(err)
	}
	return &buf, mw.Boundary()
}

func file(name, ctype string, body []byte) part {
	return part{field: FilesField, filename: name, file: true, ctype: ctype, body: body}
}

func field(name, value string) part { return part{field: name, body: []byte(value)} }

func newTestParser(t testing.TB, cfg Config) *Parser {
	t.Helper()
	if cfg.TempDir == "" {
		cfg.TempDir = t.TempDir()
	}
	p, err := NewParser(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func tempFiles(t testing.TB, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "chatproxy-upload-*"))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

func TestParseAcceptsFilesAndFields(t *testing.T) {
	p := newTestParser(t, Config{AllowedTypes: []string{"image/*", "application/pdf", "text/plain", "text/csv"}})
	bigPDF := sized(pdfHead, 300<<10, 'x') // beyond the memory buffer: spooled
	text := []byte("héllo wörld — ünïcode\nline two\n")
	body, boundary := multipartBody(t,
		field("action", "sendMessage"),
		field("sessionId", "abc-123-def"),
		field("chatInput", "see attached"),
		field("metadata", `{"page":"pricing"}`),
		file("pic.png", "image/png", sized(pngHead, 100, 0)),
		file("photo.jpg", "image/jpeg", sized(jpegHead, 2000, 7)),
		file("doc.pdf", "application/pdf", bigPDF),
		file("anim.gif", "image/gif", sized(gifHead, 50, 0)),
		file("w.webp", "image/webp; charset=binary", sized(webpHead, 64, 0)),
		field("extra", "ignored but kept"),
	)
	// five files is the default max
	form, err := p.Parse(body, boundary, Limits{})
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	defer form.RemoveAll()
	for k, want := range map[string]string{"action": "sendMessage", "sessionId": "abc-123-def", "chatInput": "see attached", "metadata": `{"page":"pricing"}`} {
		if got, ok := form.Value(k); !ok || got != want {
			t.Errorf("field %s = %q, %v; want %q", k, got, ok, want)
		}
	}
	wantTypes := []string{"image/png", "image/jpeg", "application/pdf", "image/gif", "image/webp"}
	if len(form.Files) != len(wantTypes) {
		t.Fatalf("got %d files, want %d", len(form.Files), len(wantTypes))
	}
	for i, f := range form.Files {
		if f.Type != wantTypes[i] {
			t.Errorf("file %d type %q, want %q", i, f.Type, wantTypes[i])
		}
	}
	pdf := form.Files[2]
	if pdf.Size != int64(len(bigPDF)) {
		t.Errorf("pdf size %d, want %d", pdf.Size, len(bigPDF))
	}
	sum := sha256.Sum256(bigPDF)
	if pdf.SHA256 != hex.EncodeToString(sum[:]) {
		t.Errorf("pdf sha256 %s, want %x", pdf.SHA256, sum)
	}
	if pdf.path == "" {
		t.Error("a 300 KiB file stayed in memory; want it spooled to a temporary file")
	}
	if form.Files[0].path != "" {
		t.Error("a 100-byte file was spooled; want it in memory")
	}
	// Open twice: the bytes can be sent again (a retried upstream request).
	for range 2 {
		rc, err := pdf.Open()
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(rc)
		rc.Close()
		if !bytes.Equal(got, bigPDF) {
			t.Fatal("Open returned other bytes than were sent")
		}
	}
	if n := len(tempFiles(t, p.cfg.TempDir)); n != 1 {
		t.Errorf("%d temporary files while the request lasts, want 1", n)
	}
	if err := form.RemoveAll(); err != nil {
		t.Fatal(err)
	}
	if left := tempFiles(t, p.cfg.TempDir); len(left) != 0 {
		t.Errorf("temporary files left after RemoveAll: %v", left)
	}

	// Text: valid UTF-8 of any length is accepted, as text/plain or csv.
	body, boundary = multipartBody(t, field("message", "hi"), file("notes.txt", "text/plain", text), file("t.csv", "text/csv", []byte("a,b\n1,2\n")))
	form, err = p.Parse(body, boundary, Limits{})
	if err != nil {
		t.Fatalf("text: %v", err)
	}
	form.RemoveAll()
}

// TestParseRefusals is the refusal table: each case → status, code.
func TestParseRefusals(t *testing.T) {
	cfg := Config{MaxFiles: 2, MaxFileSize: 1000, MaxTotal: 1500, AllowedTypes: []string{"image/png", "application/pdf", "text/plain"}}
	png := sized(pngHead, 200, 0)
	cases := []struct {
		name   string
		parts  []part
		raw    string // a raw body instead of parts
		status int
		reason Reason
	}{
		{"too many files", []part{file("a.png", "image/png", png), file("b.png", "image/png", png), file("c.png", "image/png", png)}, "", 413, ReasonTooMany},
		{"file too large", []part{file("big.png", "image/png", sized(pngHead, 1001, 0))}, "", 413, ReasonTooLarge},
		{"total too large", []part{file("a.png", "image/png", sized(pngHead, 900, 0)), file("b.png", "image/png", sized(pngHead, 700, 0))}, "", 413, ReasonTotal},
		{"type not in the list", []part{file("a.jpg", "image/jpeg", sized(jpegHead, 100, 0))}, "", 415, ReasonType},
		{"no declared type", []part{file("a.png", "", png)}, "", 415, ReasonType},
		{"octet-stream", []part{file("a.png", "application/octet-stream", png)}, "", 415, ReasonType},
		{"png declared, pdf inside", []part{file("a.png", "image/png", sized(pdfHead, 100, ' '))}, "", 415, ReasonMismatch},
		{"pdf declared, png inside", []part{file("a.pdf", "application/pdf", png)}, "", 415, ReasonMismatch},
		{"text declared, binary inside", []part{file("a.txt", "text/plain", png)}, "", 415, ReasonMismatch},
		{"text with a NUL after the head", []part{file("a.txt", "text/plain", append(bytes.Repeat([]byte("a"), 600), 0))}, "", 415, ReasonMismatch},
		{"text with invalid UTF-8 after the head", []part{file("a.txt", "text/plain", append(bytes.Repeat([]byte("a"), 600), 0xff, 'b'))}, "", 415, ReasonMismatch},
		{"html declared as text", []part{file("a.txt", "text/plain", []byte("<!DOCTYPE html><html><script>alert(1)</script>"))}, "", 415, ReasonForbidden},
		{"svg declared as text", []part{file("a.txt", "text/plain", []byte(`<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>`))}, "", 415, ReasonForbidden},
		{"html declared", []part{file("a.html", "text/html", []byte("<p>hi</p>"))}, "", 415, ReasonForbidden},
		{"svg declared", []part{file("a.svg", "image/svg+xml", []byte("<svg/>"))}, "", 415, ReasonForbidden},
		{"windows program as pdf", []part{file("a.pdf", "application/pdf", sized([]byte("MZ\x90\x00"), 300, 0))}, "", 415, ReasonForbidden},
		{"elf program as text", []part{file("a.txt", "text/plain", []byte("\x7fELF\x02\x01\x01"))}, "", 415, ReasonForbidden},
		{"shell script as text", []part{file("run.txt", "text/plain", []byte("#!/bin/sh\nrm -rf /\n"))}, "", 415, ReasonForbidden},
		{"empty file", []part{file("a.png", "image/png", nil)}, "", 400, ReasonEmpty},
		{"file in another field", []part{{field: "upload", filename: "a.png", ctype: "image/png", body: png}}, "", 400, ReasonMalformed},
		{"field sent twice", []part{field("message", "a"), field("message", "b")}, "", 400, ReasonMalformed},
		{"fields too large", []part{field("message", strings.Repeat("x", 70<<10))}, "", 413, ReasonFields},
		{"truncated body", nil, "--XYZ\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\nhello", 400, ReasonMalformed},
		{"garbage", nil, "this is not multipart at all", 400, ReasonMalformed},
		{"part without a name", nil, "--XYZ\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XYZ--\r\n", 400, ReasonMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newTestParser(t, cfg)
			var body io.Reader
			boundary := "XYZ"
			if tc.raw != "" {
				body = strings.NewReader(tc.raw)
			} else {
				var b *bytes.Buffer
				b, boundary = multipartBody(t, tc.parts...)
				body = b
			}
			form, err := p.Parse(body, boundary, Limits{})
			var ue *Error
			if !errors.As(err, &ue) {
				form.RemoveAll()
				t.Fatalf("Parse = %v, want a refusal", err)
			}
			if ue.Status != tc.status || ue.Reason != tc.reason {
				t.Errorf("got %d %s (%s), want %d %s", ue.Status, ue.Reason, ue.Message, tc.status, tc.reason)
			}
			if ue.Code == "" || ue.Message == "" {
				t.Errorf("refusal without code or message: %+v", ue)
			}
			if left := tempFiles(t, p.cfg.TempDir); len(left) != 0 {
				t.Errorf("a refused upload left temporary files: %v", left)
			}
		})
	}
}

func TestParseRefusalNamesTheLimit(t *testing.T) {
	p := newTestParser(t, Config{MaxFileSize: 1 << 10, MaxTotal: 2 << 10})
	body, boundary := multipartBody(t, file("../../etc/big.png", "image/png", sized(pngHead, 2000, 0)))
	_, err := p.Parse(body, boundary, Limits{})
	var ue *Error
	if !errors.As(err, &ue) || !strings.Contains(ue.Message, "max_file_size") || !strings.Contains(ue.Message, "1 KiB") ||
		!strings.Contains(ue.Message, `"big.png"`) || ue.Code != "file_too_large" {
		t.Fatalf("refusal %v: want it to name max_file_size, 1 KiB and the sanitised file name", err)
	}
}

func TestParseBodyLimitIs413(t *testing.T) {
	p := newTestParser(t, Config{})
	body, boundary := multipartBody(t, file("a.png", "image/png", sized(pngHead, 10000, 0)))
	limited := http.MaxBytesReader(httptest.NewRecorder(), io.NopCloser(body), 5000)
	_, err := p.Parse(limited, boundary, Limits{})
	var ue *Error
	if !errors.As(err, &ue) || ue.Status != 413 {
		t.Fatalf("Parse over a MaxBytesReader = %v, want 413", err)
	}
}

func TestBoundary(t *testing.T) {
	if b, err := Boundary("multipart/form-data; boundary=----WebKitFormBoundaryaEXUVtTjB1uvtAOo"); err != nil || b != "----WebKitFormBoundaryaEXUVtTjB1uvtAOo" {
		t.Errorf("Boundary = %q, %v", b, err)
	}
	for _, ct := range []string{"multipart/form-data", "application/json", "multipart/form-data; boundary=" + strings.Repeat("a", 71), "multipart/form-data; boundary"} {
		if _, err := Boundary(ct); err == nil {
			t.Errorf("Boundary(%q) accepted", ct)
		}
	}
}

// TestParseMemoryBounded: a 20 MiB upload is spooled, not held: the heap
// grows by well under the file's size.
func TestParseMemoryBounded(t *testing.T) {
	p := newTestParser(t, Config{MaxFileSize: 20 << 20, MaxTotal: 20 << 20, AllowedTypes: []string{"application/pdf"}})
	const size = 20 << 20
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		h := textproto.MIMEHeader{}
		h.Set("Content-Disposition", `form-data; name="files"; filename="big.pdf"`)
		h.Set("Content-Type", "application/pdf")
		w, _ := mw.CreatePart(h)
		chunk := sized(pdfHead, 64<<10, 'x')
		for written := 0; written < size; written += len(chunk) {
			_, _ = w.Write(chunk)
		}
		_ = mw.Close()
		_ = pw.Close()
	}()
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	form, err := p.Parse(pr, mw.Boundary(), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	defer form.RemoveAll()
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("heap grew %d KiB while parsing a %d MiB upload (total allocated %d KiB)", grew>>10, size>>20, (after.TotalAlloc-before.TotalAlloc)>>10)
	if grew > 4<<20 {
		t.Errorf("heap grew %d bytes for a %d byte upload; want under 4 MiB", grew, size)
	}
	if form.Files[0].Size != size {
		t.Errorf("size %d, want %d", form.Files[0].Size, size)
	}
	fi, err := os.Stat(form.Files[0].path)
	if err != nil || fi.Size() != size {
		t.Errorf("spool file: %v, size %v", err, fi)
	}
}
