package n8n

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"strings"
)

// Attachment is a file sent with a message. A request with attachments
// goes to n8n as multipart/form-data in the shape the Chat Trigger parses
// (and @n8n/chat sends): every top-level field of the JSON body as a form
// field (objects such as metadata and session as JSON text), then one
// "files" part per attachment, which the workflow sees as binary data0,
// data1, … and json.files.
type Attachment struct {
	// Name is the file name sent in the part's Content-Disposition; the
	// caller has made it safe (no path, no control characters).
	Name string
	// Type is the part's Content-Type.
	Type string
	// Size is the exact number of bytes Open returns.
	Size int64
	// Open returns the file's bytes from the start. It may be called more
	// than once: a request that is sent again reads the file again.
	Open func() (io.ReadCloser, error)
}

// formField is one text field of the multipart body.
type formField struct{ name, value string }

// multipartBody is the multipart form of a request: its fields (from the
// JSON body) and files, with one boundary for every time it is written.
type multipartBody struct {
	fields   []formField
	files    []Attachment
	boundary string
	length   int64
}

// newMultipartBody turns the JSON body into form fields, in the JSON
// body's order: strings as they are, anything else as its JSON text (what
// the widget does: typeof v === 'object' ? JSON.stringify(v) : v).
func newMultipartBody(jsonBody []byte, files []Attachment) (*multipartBody, error) {
	dec := json.NewDecoder(bytes.NewReader(jsonBody))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, errors.New("n8n: request body is not a JSON object")
	}
	m := &multipartBody{files: files}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("n8n: reading request body: %w", err)
		}
		key, _ := t.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, fmt.Errorf("n8n: reading request body: %w", err)
		}
		value := string(raw)
		if len(raw) > 0 && raw[0] == '"' {
			if err := json.Unmarshal(raw, &value); err != nil {
				return nil, fmt.Errorf("n8n: reading request body: %w", err)
			}
		}
		m.fields = append(m.fields, formField{key, value})
	}
	for _, f := range files {
		if f.Open == nil || f.Size < 0 {
			return nil, errors.New("n8n: attachment without content")
		}
	}
	m.boundary = multipart.NewWriter(io.Discard).Boundary()
	// The framing does not depend on the files' bytes: its length plus
	// the files' sizes is the body's, so n8n gets a Content-Length rather
	// than a chunked body.
	var cw countingWriter
	if err := m.write(&cw, false); err != nil {
		return nil, err
	}
	m.length = cw.n
	for _, f := range files {
		m.length += f.Size
	}
	return m, nil
}

func (m *multipartBody) contentType() string {
	return "multipart/form-data; boundary=" + m.boundary
}

// write writes the form to w, with the files' bytes when withFiles.
func (m *multipartBody) write(w io.Writer, withFiles bool) error {
	mw := multipart.NewWriter(w)
	if err := mw.SetBoundary(m.boundary); err != nil {
		return err
	}
	for _, f := range m.fields {
		if err := mw.WriteField(f.name, f.value); err != nil {
			return err
		}
	}
	for _, f := range m.files {
		h := make(textproto.MIMEHeader, 2)
		h.Set("Content-Disposition", `form-data; name="files"; filename="`+quoteEscaper.Replace(f.Name)+`"`)
		h.Set("Content-Type", f.Type)
		pw, err := mw.CreatePart(h)
		if err != nil {
			return err
		}
		if withFiles {
			if err := copyFile(pw, f); err != nil {
				return err
			}
		}
	}
	return mw.Close()
}

var quoteEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\r", "", "\n", "")

func copyFile(w io.Writer, f Attachment) error {
	rc, err := f.Open()
	if err != nil {
		return fmt.Errorf("n8n: opening attachment: %w", err)
	}
	defer rc.Close()
	n, err := io.Copy(w, rc)
	if err == nil && n != f.Size {
		err = fmt.Errorf("n8n: attachment holds %d bytes, not %d", n, f.Size)
	}
	return err
}

// reader returns a fresh body: the form is written into a pipe as the
// transport reads it, so no file is held in memory. The writing goroutine
// ends when the body is read to its end or closed (the transport always
// closes a request body).
func (m *multipartBody) reader() io.ReadCloser {
	pr, pw := io.Pipe()
	go func() {
		pw.CloseWithError(m.write(pw, true))
	}()
	return pr
}

// attach makes hreq carry the multipart form instead of its JSON body;
// GetBody lets the request be sent again.
func (m *multipartBody) attach(hreq *http.Request) {
	if hreq.Body != nil {
		_ = hreq.Body.Close()
	}
	hreq.Body = m.reader()
	hreq.GetBody = func() (io.ReadCloser, error) { return m.reader(), nil }
	hreq.ContentLength = m.length
	hreq.Header.Set("Content-Type", m.contentType())
}

type countingWriter struct{ n int64 }

func (c *countingWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return len(p), nil
}
