package handler

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// apiError is the JSON error body: {"error": code, "message": text}.
type apiError struct {
	Error   string `json:"error"`
	Message string `json:"message"`
}

// writeJSON writes v with Go's HTML-safe escaping.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding response: %w", err)
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, err = w.Write(append(body, '\n'))
	return err
}

// writeError answers with a JSON error. The API's error bodies are part of
// its contract, so the module writes them itself rather than returning a
// caddyhttp.Error that Caddy would answer with an empty body. Server-side
// failures are logged; client errors are not.
func (h *Handler) writeError(w http.ResponseWriter, r *http.Request, status int, code, message string) error {
	return writeJSON(w, status, apiError{Error: code, Message: message})
}

// storeError answers a failed store call. Data the store cannot hold
// (sessions.ErrInvalidData) is the request's fault: 400. Anything else is
// logged and answered 503: the request can be retried, and nothing it
// asked for was half done.
func (h *Handler) storeError(w http.ResponseWriter, r *http.Request, what string, err error) error {
	if errors.Is(err, sessions.ErrInvalidData) {
		// The store refused what this request carried (PostgreSQL's class
		// 22): the client's mistake, not an outage to page anyone about.
		h.cfg.Logger.Info("store refused the request's data", zap.String("operation", what), zap.Error(err))
		return h.refuseInput(w, r, http.StatusBadRequest, "invalid_request", "the request holds a value the session store cannot keep")
	}
	if errors.Is(err, sessions.ErrOverloaded) {
		// The write queue is full: a burst, not an outage, so a warning
		// and a quick retry.
		h.cfg.Logger.Warn("store overloaded", zap.String("operation", what))
		w.Header().Set("Retry-After", "1")
		return h.writeError(w, r, http.StatusServiceUnavailable, "store_unavailable", "the session store is busy; try again shortly")
	}
	h.cfg.Logger.Error("store unavailable", zap.String("operation", what), zap.Error(err))
	h.healthState.invalidate() // /health checks again rather than answer a cached "ok"
	w.Header().Set("Retry-After", "5")
	return h.writeError(w, r, http.StatusServiceUnavailable, "store_unavailable", "the session store is unavailable; try again shortly")
}

// errBadBody carries the status and code for a request body we refuse.
type errBadBody struct {
	status  int
	code    string
	message string
}

func (e *errBadBody) Error() string { return e.message }

// readJSON reads a bounded request body that must be one JSON object and
// decodes it into v. An empty body decodes as {} when allowEmpty. Unknown
// fields are ignored; wrong types, trailing data and invalid UTF-8 are not.
func (h *Handler) readJSON(w http.ResponseWriter, r *http.Request, v any, allowEmpty bool) *errBadBody {
	if r.ContentLength > h.cfg.MaxBodySize {
		return tooLarge(h.cfg.MaxBodySize)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.cfg.MaxBodySize))
	if err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			return tooLarge(h.cfg.MaxBodySize)
		}
		return &errBadBody{http.StatusBadRequest, "invalid_request", "could not read the request body"}
	}
	body = bytes.TrimSpace(body)
	if len(body) == 0 && allowEmpty {
		return nil
	}
	// A JSON content type is required for any body, so that a plain HTML
	// form (which cannot send one cross-site without a preflight) cannot
	// drive the API.
	mediaType, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mediaType != "application/json" {
		return &errBadBody{http.StatusUnsupportedMediaType, "unsupported_media_type", "the request body must be JSON (Content-Type: application/json)"}
	}
	if cs, ok := params["charset"]; ok && !equalFoldASCII(cs, "utf-8") {
		return &errBadBody{http.StatusUnsupportedMediaType, "unsupported_media_type", "the request body must be UTF-8"}
	}
	if len(body) == 0 || body[0] != '{' {
		return &errBadBody{http.StatusBadRequest, "invalid_json", "the request body must be a JSON object"}
	}
	if !utf8.Valid(body) {
		return &errBadBody{http.StatusBadRequest, "invalid_json", "the request body is not valid UTF-8"}
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return &errBadBody{http.StatusBadRequest, "invalid_request", fmt.Sprintf("field %q has the wrong type", typeErr.Field)}
		}
		return &errBadBody{http.StatusBadRequest, "invalid_json", "the request body is not valid JSON"}
	}
	if _, err := dec.Token(); err != io.EOF {
		return &errBadBody{http.StatusBadRequest, "invalid_json", "the request body has data after the JSON object"}
	}
	return nil
}

func tooLarge(limit int64) *errBadBody {
	return &errBadBody{http.StatusRequestEntityTooLarge, "payload_too_large", fmt.Sprintf("the request body is larger than %d bytes", limit)}
}

func equalFoldASCII(a, b string) bool {
	return len(a) == len(b) && bytes.EqualFold([]byte(a), []byte(b))
}

func (h *Handler) writeBadBody(w http.ResponseWriter, r *http.Request, e *errBadBody) error {
	return h.refuseInput(w, r, e.status, e.code, e.message)
}

// refuseInput answers a request refused for its body or input, and counts
// the refusal.
func (h *Handler) refuseInput(w http.ResponseWriter, r *http.Request, status int, code, message string) error {
	h.cfg.Metrics.GuardRefused(metrics.RefusalInput)
	return h.writeError(w, r, status, code, message)
}
