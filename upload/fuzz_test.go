package upload

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzParse: whatever the body, Parse returns a form or a refusal (never
// another error, never a panic), accepted files agree with the limits and
// their bytes, and nothing is left in the temporary directory.
func FuzzParse(f *testing.F) {
	seed := func(parts ...part) {
		b, boundary := multipartBody(f, parts...)
		f.Add(b.Bytes(), boundary)
	}
	seed(field("message", "hi"), file("a.png", "image/png", sized(pngHead, 80, 0)))
	seed(file("a.txt", "text/plain", []byte("hello\n")), file("b.pdf", "application/pdf", pdfHead))
	seed(file("x.svg", "image/svg+xml", []byte("<svg/>")))
	f.Add([]byte("--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\nContent-Type: text/plain\r\n\r\nabc\r\n--B--\r\n"), "B")
	f.Add([]byte("--B\r\n\r\n--B--"), "B")
	dir := f.TempDir()
	p, err := NewParser(Config{MaxFiles: 3, MaxFileSize: 100 << 10, MaxTotal: 150 << 10, TempDir: dir,
		AllowedTypes: []string{"image/*", "application/pdf", "text/plain"}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body []byte, boundary string) {
		if boundary == "" {
			return
		}
		form, err := p.Parse(bytes.NewReader(body), boundary, Limits{MaxFieldsSize: 1 << 10})
		if err != nil {
			var ue *Error
			if !errors.As(err, &ue) || ue.Status < 400 || ue.Code == "" {
				t.Fatalf("Parse error %v is not a refusal", err)
			}
		} else {
			if len(form.Files) > 3 || form.TotalSize() > 150<<10 {
				t.Fatalf("accepted %d files, %d bytes", len(form.Files), form.TotalSize())
			}
			for _, fl := range form.Files {
				rc, err := fl.Open()
				if err != nil {
					t.Fatal(err)
				}
				n, _ := io.Copy(io.Discard, rc)
				rc.Close()
				if n != fl.Size || n == 0 || !p.allowed[fl.Type] || fl.Name == "" || len(fl.SHA256) != 64 {
					t.Fatalf("accepted file %+v holds %d bytes", fl, n)
				}
			}
			form.RemoveAll()
		}
		if left := tempFiles(t, dir); len(left) != 0 {
			t.Fatalf("temporary files left: %v", left)
		}
	})
}
