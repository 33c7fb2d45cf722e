package n8n

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// receivedPart is what the stand-in saw of one multipart part.
type receivedPart struct {
	name, filename, contentType string
	value                       string // text fields
	size                        int64
	sum                         [32]byte
}

// multipartStandIn reads multipart requests as n8n's Chat Trigger would
// (part by part, files streamed) and records them.
type multipartStandIn struct {
	mu            sync.Mutex
	header        http.Header
	contentLength int64
	chunked       bool
	parts         []receivedPart
	err           error
}

func (s *multipartStandIn) handle(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.header, s.contentLength, s.chunked = r.Header.Clone(), r.ContentLength, slices.Contains(r.TransferEncoding, "chunked")
	mt, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/form-data" {
		s.err = err
		http.Error(w, "not multipart", http.StatusBadRequest)
		return
	}
	mr := multipart.NewReader(r.Body, params["boundary"])
	s.parts = nil
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			s.err = err
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		rp := receivedPart{name: p.FormName(), filename: p.FileName(), contentType: p.Header.Get("Content-Type")}
		h := sha256.New()
		if rp.filename != "" {
			rp.size, _ = io.Copy(h, p)
			copy(rp.sum[:], h.Sum(nil))
		} else {
			b, _ := io.ReadAll(p)
			rp.value = string(b)
		}
		s.parts = append(s.parts, rp)
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(w, `{"output":"got your files"}`)
}

// newStandInClient starts s as n8n (the shared fake, handing s each body
// as it arrives) and returns a client for it.
func newStandInClient(t *testing.T, s *multipartStandIn, edit func(*Config)) *Client {
	t.Helper()
	f := newFake(t, s.handle)
	f.StreamBodies()
	cfg := testConfig(f)
	if edit != nil {
		edit(&cfg)
	}
	return newClient(t, cfg)
}

func memFile(name, ctype string, b []byte) Attachment {
	return Attachment{Name: name, Type: ctype, Size: int64(len(b)), Open: func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}}
}

func TestMultipartRequestShape(t *testing.T) {
	var s multipartStandIn
	c := newStandInClient(t, &s, nil)
	png := append([]byte("\x89PNG\r\n\x1a\n"), bytes.Repeat([]byte{1}, 1000)...)
	pdf := []byte("%PDF-1.4\nhello\n")
	req := testRequest()
	req.Files = []Attachment{memFile("pic.png", "image/png", png), memFile(`odd "name".pdf`, "application/pdf", pdf)}
	reply, err := c.Send(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	text, err := reply.ReadAll()
	reply.Close()
	if err != nil || text != "got your files" {
		t.Fatalf("reply %q, %v", text, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		t.Fatal(s.err)
	}
	var names []string
	fields := map[string]string{}
	for _, p := range s.parts {
		names = append(names, p.name)
		if p.filename == "" {
			fields[p.name] = p.value
		}
	}
	want := []string{"action", "sessionId", "chatInput", "message", "metadata", "session", "jwt_token", "timestamp", "files", "files"}
	if !slices.Equal(names, want) {
		t.Errorf("part names %v, want %v", names, want)
	}
	if fields["action"] != "sendMessage" || fields["sessionId"] != "sess-123" || fields["chatInput"] != "Hello, bot" || fields["message"] != "Hello, bot" {
		t.Errorf("fields %v", fields)
	}
	if fields["metadata"] != `{"page_title":"Pricing"}` {
		t.Errorf("metadata %q: want the JSON text, as the widget sends it", fields["metadata"])
	}
	var session map[string]any
	if err := json.Unmarshal([]byte(fields["session"]), &session); err != nil || session["message_count"] != float64(4) || session["client_ip"] != "203.0.113.7" {
		t.Errorf("session %q: %v", fields["session"], err)
	}
	if fields["jwt_token"] == "" || s.header.Get("Authorization") != "Bearer "+fields["jwt_token"] {
		t.Errorf("Authorization %q, jwt_token %q: want the same token", s.header.Get("Authorization"), fields["jwt_token"])
	}
	files := s.parts[len(s.parts)-2:]
	for i, w := range []struct {
		name, ctype string
		body        []byte
	}{{"pic.png", "image/png", png}, {`odd "name".pdf`, "application/pdf", pdf}} {
		if files[i].filename != w.name || files[i].contentType != w.ctype || files[i].size != int64(len(w.body)) || files[i].sum != sha256.Sum256(w.body) {
			t.Errorf("file part %d: %+v, want %s %s %d bytes", i, files[i], w.name, w.ctype, len(w.body))
		}
	}
	if s.chunked || s.contentLength <= int64(len(png)+len(pdf)) {
		t.Errorf("Content-Length %d, chunked %v: want the exact length", s.contentLength, s.chunked)
	}
	if ct := s.header.Get("Content-Type"); !strings.HasPrefix(ct, "multipart/form-data; boundary=") {
		t.Errorf("Content-Type %q", ct)
	}
	if a := s.header.Get("Accept"); a != "application/json, application/x-ndjson, text/plain" {
		t.Errorf("Accept %q", a)
	}
}

func TestMultipartAuthModes(t *testing.T) {
	var s multipartStandIn
	c := newStandInClient(t, &s, func(cfg *Config) {
		cfg.Auth = Auth{Mode: AuthHeader, HeaderName: "X-N8N-Key", HeaderValue: "k3y"}
	})
	req := testRequest()
	req.Files = []Attachment{memFile("a.txt", "text/plain", []byte("hello"))}
	reply, err := c.Send(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	reply.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.header.Get("X-N8N-Key") != "k3y" || s.header.Get("Authorization") != "" {
		t.Errorf("headers %v: want the header auth and no bearer", s.header)
	}
}

// TestMultipartBodyReplayable: every reader gives the same bytes, as many
// as Content-Length says, so a request can be sent again.
func TestMultipartBodyReplayable(t *testing.T) {
	body, _ := json.Marshal(map[string]any{"action": "sendMessage", "metadata": map[string]any{"a": 1}})
	m, err := newMultipartBody(body, []Attachment{memFile("a.txt", "text/plain", []byte("one")), memFile("b.txt", "text/plain", bytes.Repeat([]byte("b"), 100000))})
	if err != nil {
		t.Fatal(err)
	}
	var first []byte
	for i := range 3 {
		rc := m.reader()
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || int64(len(got)) != m.length {
			t.Fatalf("read %d: %d bytes (%v), Content-Length %d", i, len(got), err, m.length)
		}
		if i == 0 {
			first = got
		} else if !bytes.Equal(got, first) {
			t.Fatal("a second reader gave other bytes")
		}
	}
	// A reader closed early ends its writer (no goroutine left behind).
	before := runtime.NumGoroutine()
	for range 20 {
		rc := m.reader()
		_, _ = rc.Read(make([]byte, 10))
		rc.Close()
	}
	// The writers end soon after their readers close; on a loaded machine
	// that can take longer than a few scheduler turns.
	for deadline := time.Now().Add(5 * time.Second); runtime.NumGoroutine() > before && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before+2 {
		t.Errorf("%d goroutines after closing readers early, %d before", n, before)
	}
}

// TestMultipartMemoryBounded: a 20 MiB file is streamed from its file to
// n8n, not loaded: the heap grows by a small fraction of it.
func TestMultipartMemoryBounded(t *testing.T) {
	var s multipartStandIn
	c := newStandInClient(t, &s, nil)
	const size = 20 << 20
	path := filepath.Join(t.TempDir(), "big.pdf")
	fh, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("x"), 1<<20)
	for range size >> 20 {
		_, _ = fh.Write(chunk)
	}
	fh.Close()
	chunk = nil
	req := testRequest()
	req.Files = []Attachment{{Name: "big.pdf", Type: "application/pdf", Size: size, Open: func() (io.ReadCloser, error) { return os.Open(path) }}}
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	reply, err := c.Send(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	reply.Close()
	runtime.ReadMemStats(&after)
	_ = chunk
	grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("heap grew %d KiB sending a %d MiB file (the stand-in, in this process, reads it too)", grew>>10, size>>20)
	if grew > 4<<20 {
		t.Errorf("heap grew %d bytes sending a %d byte file; want under 4 MiB", grew, size)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.parts) == 0 || s.parts[len(s.parts)-1].size != size {
		t.Fatalf("stand-in got %+v", s.parts)
	}
}
