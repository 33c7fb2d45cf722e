package upload

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// dataURL is what FileReader.readAsDataURL gives for a file of type mt.
func dataURL(mt string, b []byte) string {
	return "data:" + mt + ";base64," + base64.StdEncoding.EncodeToString(b)
}

func dataFile(name, mt string, b []byte) DataFile {
	return DataFile{Name: name, Type: mt, Data: dataURL(mt, b)}
}

func TestParseDataURL(t *testing.T) {
	for _, tc := range []struct {
		in, mt, data string
		ok           bool
	}{
		{"data:text/csv;base64,YSxiXG4xLDI=", "text/csv", "YSxiXG4xLDI=", true},
		{"DATA:Image/PNG;BASE64,iVBO", "image/png", "iVBO", true},
		{"data:text/plain;charset=utf-8;base64,aGk=", "text/plain", "aGk=", true},
		{"data:image/png;base64,", "image/png", "", true},
		{"data:text/plain,hello", "", "", false},                 // not base64
		{"data:;base64,aGk=", "", "", false},                     // no media type
		{"data:base64,aGk=", "", "", false},                      // no media type, no ;base64
		{"data:text/plain;base64aGk=", "", "", false},            // no comma
		{"http://example.com/a.png", "", "", false},              // not a data URL
		{"data:text/plain;x=\"a,b\";base64,aGk=", "", "", false}, // the comma ends the header
		{"", "", "", false},
		{"data:" + strings.Repeat("a", 300) + "/x;base64,aGk=", "", "", false},
	} {
		mt, data, err := ParseDataURL(tc.in)
		if (err == nil) != tc.ok || mt != tc.mt || data != tc.data {
			t.Errorf("%q: %q %q %v", tc.in, mt, data, err)
		}
	}
}

func TestCheckDataFilesAccepts(t *testing.T) {
	p := newTestParser(t, Config{AllowedTypes: []string{"image/*", "application/pdf", "text/plain", "text/csv"}})
	pdf := sized(pdfHead, 300<<10, 'x')
	csv := []byte("name,städte\nä,1\n")
	files := []DataFile{
		dataFile("pic.png", "image/png", sized(pngHead, 100, 0)),
		dataFile("../../etc/report.pdf", "application/pdf", pdf),
		{Name: "answer.csv", Type: "text/csv", Data: "data:text/csv;charset=utf-8;base64," + base64.StdEncoding.EncodeToString(csv)},
	}
	got, err := p.CheckDataFiles(files)
	if err != nil {
		t.Fatal(err)
	}
	sum := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }
	want := []Info{
		{Name: "pic.png", Type: "image/png", Size: 100, SHA256: sum(sized(pngHead, 100, 0))},
		{Name: "report.pdf", Type: "application/pdf", Size: int64(len(pdf)), SHA256: sum(pdf)},
		{Name: "answer.csv", Type: "text/csv", Size: int64(len(csv)), SHA256: sum(csv)},
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("file %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if got, err := p.CheckDataFiles(nil); err != nil || len(got) != 0 {
		t.Fatalf("no files: %v %v", got, err)
	}
}

// TestCheckDataFilesRefusals is the refusal table of files sent over the
// chat socket: the multipart route's limits, and the data URL's form.
func TestCheckDataFilesRefusals(t *testing.T) {
	cfg := Config{MaxFiles: 2, MaxFileSize: 1000, MaxTotal: 1500, AllowedTypes: []string{"image/png", "application/pdf", "text/plain"}}
	png := sized(pngHead, 200, 0)
	p := newTestParser(t, cfg)
	for _, tc := range []struct {
		name   string
		files  []DataFile
		status int
		reason Reason
	}{
		{"too many files", []DataFile{dataFile("a.png", "image/png", png), dataFile("b.png", "image/png", png), dataFile("c.png", "image/png", png)}, 413, ReasonTooMany},
		{"file too large", []DataFile{dataFile("big.png", "image/png", sized(pngHead, 1001, 0))}, 413, ReasonTooLarge},
		{"total too large", []DataFile{dataFile("a.png", "image/png", sized(pngHead, 900, 0)), dataFile("b.png", "image/png", sized(pngHead, 700, 0))}, 413, ReasonTotal},
		{"type not in the list", []DataFile{dataFile("a.jpg", "image/jpeg", sized(jpegHead, 100, 0))}, 415, ReasonType},
		{"no declared type", []DataFile{{Name: "a.png", Type: "", Data: dataURL("image/png", png)}}, 415, ReasonType},
		{"octet-stream", []DataFile{dataFile("a.png", "application/octet-stream", png)}, 415, ReasonType},
		{"png declared, pdf inside", []DataFile{dataFile("a.png", "image/png", sized(pdfHead, 100, ' '))}, 415, ReasonMismatch},
		{"text declared, binary inside", []DataFile{dataFile("a.txt", "text/plain", png)}, 415, ReasonMismatch},
		{"text with a NUL after the head", []DataFile{dataFile("a.txt", "text/plain", append(bytes.Repeat([]byte("a"), 600), 0))}, 415, ReasonMismatch},
		{"html declared as text", []DataFile{dataFile("a.txt", "text/plain", []byte("<!DOCTYPE html><html><script>alert(1)</script>"))}, 415, ReasonForbidden},
		{"svg declared", []DataFile{dataFile("a.svg", "image/svg+xml", []byte("<svg/>"))}, 415, ReasonForbidden},
		{"windows program as pdf", []DataFile{dataFile("a.pdf", "application/pdf", sized([]byte("MZ\x90\x00"), 300, 0))}, 415, ReasonForbidden},
		{"empty file", []DataFile{dataFile("a.png", "image/png", nil)}, 400, ReasonEmpty},
		{"data URL of another type", []DataFile{{Name: "a.png", Type: "image/png", Data: dataURL("application/pdf", png)}}, 400, ReasonDataURL},
		{"not a data URL", []DataFile{{Name: "a.png", Type: "image/png", Data: "https://example.com/a.png"}}, 400, ReasonDataURL},
		{"percent-encoded data", []DataFile{{Name: "a.txt", Type: "text/plain", Data: "data:text/plain,hello%20world"}}, 400, ReasonDataURL},
		{"broken base64 in the head", []DataFile{{Name: "a.png", Type: "image/png", Data: "data:image/png;base64,iVBO*w0K"}}, 400, ReasonDataURL},
		{"broken base64 after the head", []DataFile{{Name: "a.png", Type: "image/png", Data: dataURL("image/png", sized(pngHead, 900, 0)) + "%%"}}, 400, ReasonDataURL},
		{"base64 without padding", []DataFile{{Name: "a.txt", Type: "text/plain", Data: "data:text/plain;base64,aGk"}}, 400, ReasonDataURL},
		{"name too long", []DataFile{dataFile(strings.Repeat("n", 1025)+".png", "image/png", png)}, 400, ReasonDataURL},
		{"a good file, then a bad one", []DataFile{dataFile("a.png", "image/png", png), dataFile("b.png", "image/png", sized(pdfHead, 100, ' '))}, 415, ReasonMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := p.CheckDataFiles(tc.files)
			var ue *Error
			if !errors.As(err, &ue) {
				t.Fatalf("CheckDataFiles = %+v, %v; want a refusal", got, err)
			}
			if ue.Status != tc.status || ue.Reason != tc.reason || ue.Code == "" || ue.Message == "" {
				t.Errorf("got %d %s %q (%s), want %d %s", ue.Status, ue.Reason, ue.Code, ue.Message, tc.status, tc.reason)
			}
		})
	}
}

// The frame cap holds a frame with the most and largest files the limits
// allow, with long escaped names: the cap never refuses what the checks
// would accept.
func TestMaxDataFilesSize(t *testing.T) {
	p := newTestParser(t, Config{MaxFiles: 3, MaxFileSize: 1000, MaxTotal: 2000, AllowedTypes: []string{"text/plain"}})
	name := strings.Repeat("\x01", maxDataNameBytes) // JSON-escaped as \u0001: 6 bytes each
	mt := "text/plain"
	files := []DataFile{
		{Name: name, Type: mt, Data: dataURL(mt, bytes.Repeat([]byte("a"), 1000))},
		{Name: name, Type: mt, Data: dataURL(mt, bytes.Repeat([]byte("b"), 999))},
		{Name: name, Type: mt, Data: dataURL(mt, []byte("c"))},
	}
	if _, err := p.CheckDataFiles(files); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(map[string]any{"files": files})
	if int64(len(b)) > p.MaxDataFilesSize() {
		t.Fatalf("the largest acceptable files take %d bytes, the cap is %d", len(b), p.MaxDataFilesSize())
	}
}

// FuzzCheckDataFiles: whatever a socket frame's file holds, the check
// returns infos or a refusal (never a panic or another error), and what it
// accepts is what the data URL decodes to, within the limits.
func FuzzCheckDataFiles(f *testing.F) {
	f.Add("pic.png", "image/png", dataURL("image/png", sized(pngHead, 80, 0)))
	f.Add("a.txt", "text/plain", dataURL("text/plain", []byte("hello\n")))
	f.Add("a.txt", "text/plain", "data:text/plain;charset=utf-8;base64,aGk=")
	f.Add("x.svg", "image/svg+xml", dataURL("image/svg+xml", []byte("<svg/>")))
	f.Add("a.pdf", "application/pdf", "data:application/pdf;base64,JVBERi0=\n")
	f.Add("", "", "data:,")
	p, err := NewParser(Config{MaxFiles: 2, MaxFileSize: 4 << 10, MaxTotal: 6 << 10, TempDir: f.TempDir(),
		AllowedTypes: []string{"image/*", "application/pdf", "text/plain"}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, name, typ, data string) {
		files := []DataFile{{Name: name, Type: typ, Data: data}}
		got, err := p.CheckDataFiles(files)
		if err != nil {
			var ue *Error
			if !errors.As(err, &ue) || ue.Status < 400 || ue.Code == "" || ue.Message == "" {
				t.Fatalf("error %v is not a refusal", err)
			}
			return
		}
		if len(got) != 1 {
			t.Fatalf("accepted %d infos for one file", len(got))
		}
		mt, b64, err := ParseDataURL(data)
		if err != nil {
			t.Fatalf("accepted %q, which ParseDataURL refuses: %v", data, err)
		}
		raw, err := base64.StdEncoding.Strict().DecodeString(b64)
		if err != nil {
			t.Fatalf("accepted data that does not decode: %v", err)
		}
		sum := sha256.Sum256(raw)
		in := got[0]
		if in.Type != mt || !p.allowed[in.Type] || in.Size != int64(len(raw)) || in.Size == 0 || in.Size > 4<<10 ||
			in.SHA256 != hex.EncodeToString(sum[:]) || in.Name == "" || in.Name != SanitizeName(name, mt) {
			t.Fatalf("accepted %+v for %d bytes of %s", in, len(raw), mt)
		}
	})
}
