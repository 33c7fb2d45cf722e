package handler

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

// attachment is what the history keeps of an uploaded file: never its
// bytes.
type attachment struct {
	Name   string `json:"name"`
	Type   string `json:"type"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// readForm reads a multipart chat body: its text fields and its files,
// checked against the uploads block and spooled. Without an uploads
// block, a multipart body is refused with 415. A refused upload has
// forwarded and stored nothing; its reason is counted. The caller removes
// the form's files (Form.RemoveAll) when the request is done.
func (h *Handler) readForm(w http.ResponseWriter, r *http.Request) (*upload.Form, *errBadBody) {
	p := h.cfg.Uploads
	if p == nil {
		e := upload.Disabled()
		return nil, &errBadBody{e.Status, e.Code, e.Message}
	}
	refused := func(e *upload.Error) (*upload.Form, *errBadBody) {
		h.cfg.Metrics.UploadRefused(string(e.Reason))
		// Read what is left of the body (bounded below) so the client,
		// still sending, gets the answer rather than a reset connection.
		_, _ = io.Copy(io.Discard, r.Body)
		return nil, &errBadBody{e.Status, e.Code, e.Message}
	}
	var ue *upload.Error
	boundary, err := upload.Boundary(r.Header.Get("Content-Type"))
	if errors.As(err, &ue) {
		return refused(ue)
	}
	lim := upload.Limits{MaxFieldsSize: h.cfg.MaxBodySize}
	maxBody := p.MaxBodySize(lim)
	r.Body = http.MaxBytesReader(w, r.Body, maxBody)
	if r.ContentLength > maxBody {
		h.cfg.Metrics.UploadRefused(string(upload.ReasonTotal))
		return nil, &errBadBody{http.StatusRequestEntityTooLarge, string(upload.ReasonTotal), "the request body is larger than this server accepts for uploads"}
	}
	form, err := p.Parse(r.Body, boundary, lim)
	switch {
	case errors.As(err, &ue):
		return refused(ue)
	case err != nil:
		h.cfg.Logger.Error("spooling an upload", zap.Error(err))
		return nil, &errBadBody{http.StatusInternalServerError, "internal_error", "the upload could not be stored for forwarding; try again"}
	}
	h.cfg.Metrics.UploadsAccepted(len(form.Files))
	return form, nil
}

// formJSON returns a form field that carries JSON text (the widget's
// metadata, the API's context) as raw JSON; empty means absent. Whether it
// is a JSON object is checkMessage's to say.
func formJSON(form *upload.Form, name string) json.RawMessage {
	v, _ := form.Value(name)
	if v == "" {
		return nil
	}
	return json.RawMessage(v)
}

// attachments lists the files for the stored user message.
func attachments(files []*upload.File) []attachment {
	out := make([]attachment, len(files))
	for i, f := range files {
		out[i] = attachment{Name: f.Name, Type: f.Type, Size: f.Size, SHA256: f.SHA256}
	}
	return out
}

// upstreamFiles hands the files to the n8n client, which streams them from
// their spool (again, should it send the request twice).
func upstreamFiles(files []*upload.File) []n8n.Attachment {
	if len(files) == 0 {
		return nil
	}
	out := make([]n8n.Attachment, len(files))
	for i, f := range files {
		out[i] = n8n.Attachment{Name: f.Name, Type: f.Type, Size: f.Size, Open: f.Open}
	}
	return out
}

// storedAttachments reads the attachments a stored message's metadata
// records (nil when none).
func storedAttachments(meta json.RawMessage) []attachment {
	if len(meta) == 0 {
		return nil
	}
	var m struct {
		Attachments []attachment `json:"attachments"`
	}
	if json.Unmarshal(meta, &m) != nil {
		return nil
	}
	return m.Attachments
}
