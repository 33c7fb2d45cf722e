package upload

import (
	"fmt"
	"net/http"
)

// Reason says why an upload was refused; it is the metric label of the
// refusal.
type Reason string

// The reasons an upload is refused.
const (
	ReasonTooMany   Reason = "too_many_files"   // 413: more than max_files
	ReasonTooLarge  Reason = "file_too_large"   // 413: a file above max_file_size
	ReasonTotal     Reason = "upload_too_large" // 413: files together above max_total
	ReasonFields    Reason = "fields_too_large" // 413: the text fields above their bound
	ReasonType      Reason = "type_not_allowed" // 415: declared type not in allowed_types
	ReasonMismatch  Reason = "type_mismatch"    // 415: the bytes are not what the type says
	ReasonForbidden Reason = "type_forbidden"   // 415: HTML, SVG or a program
	ReasonEmpty     Reason = "empty_file"       // 400: a file of 0 bytes
	ReasonMalformed Reason = "invalid_multipart"
	ReasonDisabled  Reason = "uploads_disabled" // 415: no uploads block
)

// Error is an upload refused: Status is what the route answers, Code and
// Message go into its JSON error, Reason is the metric label.
type Error struct {
	Status  int
	Code    string
	Message string
	Reason  Reason
}

func (e *Error) Error() string { return "upload refused: " + e.Message }

// statusOf maps a reason to its HTTP status.
func statusOf(r Reason) int {
	switch r {
	case ReasonTooMany, ReasonTooLarge, ReasonTotal, ReasonFields:
		return http.StatusRequestEntityTooLarge
	case ReasonType, ReasonMismatch, ReasonForbidden, ReasonDisabled:
		return http.StatusUnsupportedMediaType
	}
	return http.StatusBadRequest
}

// refuse builds the refusal; Code is the reason, except that a forbidden
// type answers like any other type the list does not allow.
func refuse(r Reason, format string, args ...any) *Error {
	code := string(r)
	if r == ReasonForbidden {
		code = string(ReasonType)
	}
	return &Error{Status: statusOf(r), Code: code, Message: fmt.Sprintf(format, args...), Reason: r}
}

// fileRefused names the file in a refusal about it.
func fileRefused(r Reason, name, format string, args ...any) *Error {
	e := refuse(r, format, args...)
	e.Message = fmt.Sprintf("file %q refused: %s", name, e.Message)
	return e
}

// Disabled is the refusal of a multipart body when uploads are off.
func Disabled() *Error {
	e := refuse(ReasonDisabled, "file uploads are not supported here; send the message as JSON")
	e.Code = "unsupported_media_type"
	return e
}
