package testkit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"strings"
	"testing"
)

// The fake records a multipart body part by part: text fields with their
// values, files with their size and hash.
func TestN8nRecordsMultipartParts(t *testing.T) {
	f := NewN8n(t, Output("got it"))
	file := bytes.Repeat([]byte("%PDF-1.7\n"), 1000)
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("action", "sendMessage")
	_ = mw.WriteField("metadata", `{"page":"pricing"}`)
	h := textproto.MIMEHeader{}
	h.Set("Content-Disposition", `form-data; name="files"; filename="doc.pdf"`)
	h.Set("Content-Type", "application/pdf")
	w, _ := mw.CreatePart(h)
	_, _ = w.Write(file)
	_ = mw.Close()

	resp, err := f.Client().Post(f.URL(), mw.FormDataContentType(), &body)
	if err != nil {
		t.Fatal(err)
	}
	reply, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != 200 || string(reply) != `{"output":"got it"}` {
		t.Fatalf("reply %d %s", resp.StatusCode, reply)
	}
	c := f.Last(t)
	sum := sha256.Sum256(file)
	want := []Part{
		{Name: "action", Value: "sendMessage"},
		{Name: "metadata", Value: `{"page":"pricing"}`},
		{Name: "files", Filename: "doc.pdf", ContentType: "application/pdf", Size: int64(len(file)), SHA256: hex.EncodeToString(sum[:])},
	}
	if len(c.Parts) != len(want) {
		t.Fatalf("parts %+v, want %+v", c.Parts, want)
	}
	for i := range want {
		if c.Parts[i] != want[i] {
			t.Errorf("part %d = %+v, want %+v", i, c.Parts[i], want[i])
		}
	}
	if c.MultipartErr != nil || c.Raw != nil || c.Field("action") != "sendMessage" || c.Field("files") != "" {
		t.Errorf("err %v, raw %d bytes, action %q, files field %q", c.MultipartErr, len(c.Raw), c.Field("action"), c.Field("files"))
	}
}

// A multipart body cut short is answered 400 without running the script,
// so a test sees a body the proxy built wrong.
func TestN8nRefusesBrokenMultipart(t *testing.T) {
	f := NewN8n(t, Output("should not run"))
	body := "--b\r\nContent-Disposition: form-data; name=\"action\"\r\n\r\nsendMessage\r\n--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n\x89PNG"
	resp, err := f.Client().Post(f.URL(), "multipart/form-data; boundary=b", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	reply, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.HasPrefix(string(reply), "malformed multipart body: ") {
		t.Fatalf("reply %d %s, want 400", resp.StatusCode, reply)
	}
	if c := f.Last(t); c.MultipartErr == nil || len(c.Parts) != 2 || c.Field("action") != "sendMessage" {
		t.Fatalf("call: err %v, parts %+v", c.MultipartErr, c.Parts)
	}
}
