package handler

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/go-redis/redis_rate/v10"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

const (
	upOrigin    = "https://upload.example.com"
	upJWTSecret = "upload-test-jwt-secret-0123456789abcdef"
	upN8nSecret = "upload-test-n8n-secret-0123456789abcdef"
	upUA        = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)

// Sample file heads: what each type's signature looks like.
var (
	upPNG = sizedFile("\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00", 300)
	upPDF = sizedFile("%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", 500)
)

func sizedFile(head string, n int) []byte {
	b := bytes.Repeat([]byte{'x'}, n)
	copy(b, head)
	return b
}

type uploadEnv struct {
	h       *Handler
	n8n     *testkit.N8n
	store   *countingStore
	tempDir string
}

// newUploadEnv builds a handler with the uploads block cfg (nil: absent).
func newUploadEnv(t *testing.T, cfg *upload.Config, limits map[guard.Tier][]redis_rate.Limit) *uploadEnv {
	t.Helper()
	// n8n in streaming mode; the fake records each multipart body's parts
	// (files hashed as they arrive, never held).
	e := &uploadEnv{n8n: testkit.NewN8n(t, testkit.Stream("got ", "your ", "files")), tempDir: t.TempDir()}
	e.store = &countingStore{Store: openStore(t, "sqlite"), calls: map[string]int{}}
	if limits == nil {
		limits = map[guard.Tier][]redis_rate.Limit{guard.TierIP: {redis_rate.PerMinute(1000)}, guard.TierCreate: {redis_rate.PerMinute(1000)}}
	}
	limiter, err := guard.NewLimiter(guard.LimiterConfig{Limits: limits})
	if err != nil {
		t.Fatal(err)
	}
	client, err := n8n.New(n8n.Config{WebhookURL: e.n8n.URL(), SessionSecret: upN8nSecret})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	origins, err := guard.ParseOrigins([]string{upOrigin})
	if err != nil {
		t.Fatal(err)
	}
	var parser *upload.Parser
	if cfg != nil {
		c := *cfg
		c.TempDir = e.tempDir
		if parser, err = upload.NewParser(c); err != nil {
			t.Fatal(err)
		}
	}
	e.h = New(Config{
		Prefix:           "/api/v1",
		Origins:          origins,
		Sessions:         &sessions.Manager{Store: e.store, Tokens: sessions.NewTokens([]byte(upJWTSecret), nil), TTL: time.Hour},
		Store:            e.store,
		Cookie:           Cookie{Name: "chat_session", SameSite: http.SameSiteLaxMode},
		MaxBodySize:      64 << 10,
		Logger:           zap.NewNop(),
		Limiter:          limiter,
		Upstream:         client,
		MaxMessageLength: 4000,
		Uploads:          parser,
	})
	return e
}

func (e *uploadEnv) serve(t *testing.T, method, path string, body io.Reader, headers map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, "http://api.example.net"+path, body)
	r.Header.Set("User-Agent", upUA)
	r.Header.Set("Origin", upOrigin)
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), rec, nil)
	caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, "198.51.100.9")
	if err := e.h.ServeHTTP(rec, r, caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	return rec
}

// token creates a visitor session and returns its token.
func (e *uploadEnv) token(t *testing.T) string {
	t.Helper()
	rec := e.serve(t, "POST", "/api/v1/session/create", strings.NewReader(`{}`), map[string]string{"Content-Type": "application/json"})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	return decodeJSON[createSessionResponse](t, rec).Token
}

func (e *uploadEnv) spooled(t *testing.T) []string {
	t.Helper()
	left, _ := filepath.Glob(filepath.Join(e.tempDir, "*"))
	return left
}

// formPart is one part of a test form: a field, or a file when filename
// is set.
type formPart struct {
	name, filename, ctype string
	body                  []byte
}

func fieldPart(name, value string) formPart { return formPart{name: name, body: []byte(value)} }

func filePart(filename, ctype string, body []byte) formPart {
	return formPart{name: "files", filename: filename, ctype: ctype, body: body}
}

// multipartForm builds a body as a browser does; it returns the body and
// its Content-Type.
func multipartForm(t *testing.T, parts ...formPart) (*bytes.Buffer, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range parts {
		h := textproto.MIMEHeader{}
		cd := fmt.Sprintf(`form-data; name=%q`, p.name)
		if p.filename != "" {
			cd += fmt.Sprintf(`; filename=%q`, p.filename)
		}
		h.Set("Content-Disposition", cd)
		if p.ctype != "" {
			h.Set("Content-Type", p.ctype)
		}
		w, err := mw.CreatePart(h)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = w.Write(p.body)
	}
	_ = mw.Close()
	return &buf, mw.FormDataContentType()
}

// uploadRoute is one of the routes that take files, with how a test
// sends a message with files to it.
type uploadRoute struct {
	name    string
	path    string
	fields  func(text string) []formPart
	headers func(e *uploadEnv, t *testing.T) map[string]string
}

var uploadRoutes = []uploadRoute{
	{
		name: "widget", path: "/api/v1/n8n/chat",
		fields: func(text string) []formPart {
			return []formPart{fieldPart("action", "sendMessage"), fieldPart("sessionId", "upload-widget-session-1"),
				fieldPart("chatInput", text), fieldPart("metadata", `{"page":"pricing"}`)}
		},
		headers: func(*uploadEnv, *testing.T) map[string]string { return map[string]string{"Accept": "text/plain"} },
	},
	{
		name: "chat/message", path: "/api/v1/chat/message",
		fields: func(text string) []formPart {
			return []formPart{fieldPart("message", text), fieldPart("context", `{"page":"pricing"}`)}
		},
		headers: func(e *uploadEnv, t *testing.T) map[string]string {
			return map[string]string{"Authorization": "Bearer " + e.token(t), "Accept": "text/event-stream"}
		},
	},
	{
		name: "chat/stream", path: "/api/v1/chat/stream",
		fields: func(text string) []formPart { return []formPart{fieldPart("message", text)} },
		headers: func(e *uploadEnv, t *testing.T) map[string]string {
			return map[string]string{"Authorization": "Bearer " + e.token(t)}
		},
	},
}

var upConfig = &upload.Config{MaxFiles: 2, MaxFileSize: 1000, MaxTotal: 1500, AllowedTypes: []string{"image/png", "application/pdf", "text/plain"}}

// TestUploadRefusals is the refusal table: every refused upload answers
// its status and code, and nothing reaches n8n or the store.
func TestUploadRefusals(t *testing.T) {
	cases := []struct {
		name   string
		cfg    *upload.Config
		files  []formPart
		raw    string // a raw body instead of a form
		status int
		code   string
	}{
		{"too many files", upConfig, []formPart{filePart("a.png", "image/png", upPNG), filePart("b.png", "image/png", upPNG), filePart("c.png", "image/png", upPNG)}, "", 413, "too_many_files"},
		{"file too big", upConfig, []formPart{filePart("big.pdf", "application/pdf", sizedFile("%PDF-1.4\n", 1001))}, "", 413, "file_too_large"},
		{"total too big", upConfig, []formPart{filePart("a.pdf", "application/pdf", sizedFile("%PDF-1.4\n", 900)), filePart("b.pdf", "application/pdf", sizedFile("%PDF-1.4\n", 700))}, "", 413, "upload_too_large"},
		{"type not allowed", upConfig, []formPart{filePart("a.jpg", "image/jpeg", sizedFile("\xff\xd8\xff\xe0", 100))}, "", 415, "type_not_allowed"},
		{"type and signature disagree", upConfig, []formPart{filePart("a.png", "image/png", upPDF[:400])}, "", 415, "type_mismatch"},
		{"html as text", upConfig, []formPart{filePart("a.txt", "text/plain", []byte("<html><script>alert(1)</script>"))}, "", 415, "type_not_allowed"},
		{"empty file", upConfig, []formPart{filePart("a.png", "image/png", nil)}, "", 400, "empty_file"},
		{"bad multipart", upConfig, nil, "--b\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\nhello", 400, "invalid_multipart"},
		{"no uploads block", nil, []formPart{filePart("a.png", "image/png", upPNG)}, "", 415, "unsupported_media_type"},
	}
	for _, rt := range uploadRoutes {
		for _, tc := range cases {
			t.Run(rt.name+"/"+tc.name, func(t *testing.T) {
				e := newUploadEnv(t, tc.cfg, nil)
				headers := rt.headers(e, t)
				var body io.Reader
				if tc.raw != "" {
					body = strings.NewReader(tc.raw)
					headers["Content-Type"] = "multipart/form-data; boundary=b"
				} else {
					b, ct := multipartForm(t, append(rt.fields("see the files"), tc.files...)...)
					body, headers["Content-Type"] = b, ct
				}
				e.store.reset()
				rec := e.serve(t, "POST", rt.path, body, headers)
				if rec.Code != tc.status {
					t.Fatalf("status %d %s, want %d", rec.Code, rec.Body, tc.status)
				}
				got := decodeJSON[struct{ Error, Message string }](t, rec)
				if got.Error != tc.code || got.Message == "" {
					t.Errorf("error %q (%q), want %q", got.Error, got.Message, tc.code)
				}
				if n := e.n8n.Hits(); n != 0 {
					t.Errorf("n8n got %d requests for a refused upload, want none", n)
				}
				if calls := e.store.snapshot(); calls["AppendUserMessage"]+calls["AppendMessage"]+calls["CreateSession"] != 0 {
					t.Errorf("a refused upload reached the store: %v", calls)
				}
				if left := e.spooled(t); len(left) != 0 {
					t.Errorf("spool files left: %v", left)
				}
			})
		}
	}
}

// TestUploadForwardedAsChatTriggerMultipart: files reach n8n as the Chat
// Trigger parses them (the widget's fields, the proxy's, then one "files"
// part per file with its name and type), the stored message lists them
// (name, type, size, sha256) and history shows them; nothing stays
// spooled.
func TestUploadForwardedAsChatTriggerMultipart(t *testing.T) {
	sum := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }
	for _, rt := range uploadRoutes {
		t.Run(rt.name, func(t *testing.T) {
			e := newUploadEnv(t, &upload.Config{}, nil)
			headers := rt.headers(e, t)
			b, ct := multipartForm(t, append(rt.fields("see the files"),
				filePart(`C:\Users\me\pic.png`, "image/png", upPNG), filePart("doc.pdf", "application/pdf", upPDF))...)
			headers["Content-Type"] = ct
			rec := e.serve(t, "POST", rt.path, b, headers)
			if rec.Code != http.StatusOK {
				t.Fatalf("status %d %s", rec.Code, rec.Body)
			}
			if !strings.Contains(rec.Body.String(), "got ") {
				t.Errorf("reply %q", rec.Body)
			}
			call := e.n8n.Last(t)
			var names []string
			fields := map[string]string{}
			for _, p := range call.Parts {
				names = append(names, p.Name)
				if p.Filename == "" {
					fields[p.Name] = p.Value
				}
			}
			want := []string{"action", "sessionId", "chatInput", "message", "metadata", "session", "jwt_token", "timestamp", "files", "files"}
			if !slices.Equal(names, want) {
				t.Fatalf("n8n got parts %v, want %v", names, want)
			}
			if fields["action"] != "sendMessage" || fields["chatInput"] != "see the files" || fields["message"] != "see the files" {
				t.Errorf("fields %v", fields)
			}
			if !strings.HasPrefix(call.Header.Get("Authorization"), "Bearer ") || call.Header.Get("Authorization") != "Bearer "+fields["jwt_token"] {
				t.Errorf("Authorization %q: want the n8n token, as for JSON", call.Header.Get("Authorization"))
			}
			if rt.name != "chat/stream" && fields["metadata"] != `{"page":"pricing"}` {
				t.Errorf("metadata %q: want the JSON text", fields["metadata"])
			}
			files := call.Parts[len(call.Parts)-2:]
			if files[0].Filename != "pic.png" || files[0].ContentType != "image/png" || files[0].Size != int64(len(upPNG)) || files[0].SHA256 != sum(upPNG) ||
				files[1].Filename != "doc.pdf" || files[1].ContentType != "application/pdf" || files[1].Size != int64(len(upPDF)) || files[1].SHA256 != sum(upPDF) {
				t.Errorf("file parts %+v", files)
			}
			t.Logf("n8n received: Content-Type %s; parts %v; files %s (%s, %d B), %s (%s, %d B)", call.Header.Get("Content-Type"),
				names, files[0].Filename, files[0].ContentType, files[0].Size, files[1].Filename, files[1].ContentType, files[1].Size)

			wantAtt := []attachment{{"pic.png", "image/png", int64(len(upPNG)), sum(upPNG)}, {"doc.pdf", "application/pdf", int64(len(upPDF)), sum(upPDF)}}
			if rt.name == "widget" {
				load := e.serve(t, "POST", rt.path, strings.NewReader(`{"action":"loadPreviousSession","sessionId":"upload-widget-session-1"}`),
					map[string]string{"Content-Type": "application/json"})
				data := decodeJSON[struct {
					Data []struct {
						Kwargs struct {
							Content          string
							AdditionalKwargs struct{ Attachments []attachment } `json:"additional_kwargs"`
						}
					}
				}](t, load).Data
				if len(data) != 2 || !slices.Equal(data[0].Kwargs.AdditionalKwargs.Attachments, wantAtt) {
					t.Errorf("loadPreviousSession: %s", load.Body)
				}
			} else {
				hist := e.serve(t, "GET", "/api/v1/chat/history", nil, map[string]string{"Authorization": headers["Authorization"]})
				msgs := decodeJSON[historyResponse](t, hist).Messages
				if len(msgs) != 2 || !slices.Equal(msgs[0].Attachments, wantAtt) || msgs[1].Attachments != nil {
					t.Errorf("history: %s", hist.Body)
				}
			}
			if left := e.spooled(t); len(left) != 0 {
				t.Errorf("spool files left after the request: %v", left)
			}
		})
	}
}

// TestUploadCountsAgainstRateLimit: a message with files is a message for
// the rate limit.
func TestUploadCountsAgainstRateLimit(t *testing.T) {
	e := newUploadEnv(t, &upload.Config{}, map[guard.Tier][]redis_rate.Limit{
		guard.TierIP: {redis_rate.PerMinute(1000)}, guard.TierSession: {redis_rate.PerMinute(1)}, guard.TierCreate: {redis_rate.PerMinute(1000)},
	})
	rt := uploadRoutes[0]
	for i, want := range []int{http.StatusOK, http.StatusTooManyRequests} {
		b, ct := multipartForm(t, append(rt.fields("hello"), filePart("pic.png", "image/png", upPNG))...)
		rec := e.serve(t, "POST", rt.path, b, map[string]string{"Content-Type": ct})
		if rec.Code != want {
			t.Fatalf("upload %d: %d %s, want %d", i, rec.Code, rec.Body, want)
		}
	}
	if n := e.n8n.Hits(); n != 1 {
		t.Errorf("n8n got %d requests, want 1", n)
	}
}

// TestUploadMemoryBounded sends a 20 MiB upload through the widget route
// to n8n: the file is spooled and streamed, so the heap grows by a small
// fraction of it.
func TestUploadMemoryBounded(t *testing.T) {
	const size = 20 << 20
	e := newUploadEnv(t, &upload.Config{MaxFileSize: size, MaxTotal: size, AllowedTypes: []string{"application/pdf"}}, nil)
	rt := uploadRoutes[0]
	// The body is produced as it is read, so the test holds no copy.
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		for _, f := range rt.fields("a big file") {
			_ = mw.WriteField(f.name, string(f.body))
		}
		h := textproto.MIMEHeader{}
		h.Set("Content-Disposition", `form-data; name="files"; filename="big.pdf"`)
		h.Set("Content-Type", "application/pdf")
		w, _ := mw.CreatePart(h)
		chunk := sizedFile("%PDF-1.7\n", 64<<10)
		for written := 0; written < size; written += len(chunk) {
			_, _ = w.Write(chunk)
		}
		_ = pw.CloseWithError(mw.Close())
	}()
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	rec := e.serve(t, "POST", rt.path, pr, map[string]string{"Content-Type": mw.FormDataContentType()})
	runtime.ReadMemStats(&after)
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d %s", rec.Code, rec.Body)
	}
	grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("heap grew %d KiB for a %d MiB upload through the proxy to n8n (allocated in all %d KiB)", grew>>10, size>>20, (after.TotalAlloc-before.TotalAlloc)>>10)
	if grew > 4<<20 {
		t.Errorf("heap grew %d bytes for a %d byte upload; want under 4 MiB", grew, size)
	}
	if f := e.n8n.Last(t).Parts; len(f) == 0 || f[len(f)-1].Size != size {
		t.Errorf("n8n got %+v", f)
	}
	if left := e.spooled(t); len(left) != 0 {
		t.Errorf("spool files left: %v", left)
	}
	if _, err := os.Stat(e.tempDir); err != nil {
		t.Fatal(err)
	}
}
