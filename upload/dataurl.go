package upload

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"strings"
)

// ReasonDataURL is the refusal of a file sent over the chat socket whose
// data is not a base64 data URL of its declared type (400).
const ReasonDataURL Reason = "invalid_data_url"

// DataFile is a file as @n8n/chat sends it over n8n's chat WebSocket
// (Input.vue respondToChatNode): its name and type (the browser's File)
// and its bytes as FileReader.readAsDataURL gives them,
// "data:<type>;base64,<bytes>".
type DataFile struct {
	Name string
	Type string
	Data string
}

// Info is what the checks learned of an accepted file: the history keeps
// it, never the bytes.
type Info struct {
	Name   string // SanitizeName of the file's name
	Type   string // the declared media type, confirmed by the bytes
	Size   int64
	SHA256 string // hex
}

// Bounds of the text around a file's bytes in a socket frame.
const (
	maxDataNameBytes = 1024 // a file's name, as sent
	maxDataTypeBytes = 255  // its type (RFC 6838: 127 + "/" + 127)
	// dataFileOverhead bounds, per file, the frame bytes besides the
	// base64 bytes: the JSON keys, the name and the type (twice, in the
	// type and the data URL), each JSON-escaped at most 6 bytes a byte.
	dataFileOverhead = 6*(maxDataNameBytes+2*maxDataTypeBytes) + 256
)

// MaxDataFilesSize is the most bytes the files of one socket frame may
// take: every allowed byte in base64 (4 for 3, padded per file) and the
// text around each file. The chat socket adds it to its frame size cap.
func (p *Parser) MaxDataFilesSize() int64 {
	n := int64(p.cfg.MaxFiles)
	return 4*(p.cfg.MaxTotal/3+n) + n*dataFileOverhead
}

// ParseDataURL splits a base64 data URL ("data:<media type>[;<param>];base64,<data>",
// RFC 2397, as FileReader.readAsDataURL writes it) into its bare,
// lower-case media type and its base64 text. Anything else (no media
// type, not base64, percent-encoded data) is not a data URL the widget
// sends, and is refused.
func ParseDataURL(s string) (mediaType, base64Data string, err error) {
	const scheme, marker = "data:", ";base64"
	if len(s) < len(scheme) || !strings.EqualFold(s[:len(scheme)], scheme) {
		return "", "", errors.New(`it does not start with "data:"`)
	}
	header, data, ok := strings.Cut(s[len(scheme):], ",")
	if !ok {
		return "", "", errors.New("it has no comma before its data")
	}
	if len(header) < len(marker) || !strings.EqualFold(header[len(header)-len(marker):], marker) {
		return "", "", errors.New("its data is not base64")
	}
	header = header[:len(header)-len(marker)]
	if len(header) > maxDataTypeBytes {
		return "", "", errors.New("its media type is too long")
	}
	mt, _, err := mime.ParseMediaType(header)
	if err != nil || !strings.Contains(mt, "/") {
		return "", "", errors.New("it has no valid media type")
	}
	return strings.ToLower(mt), data, nil
}

// CheckDataFiles checks the files of one socket frame against the same
// limits as a multipart upload, in the same order, file by file: the
// count, the declared type (allowed, never forbidden), the data URL
// (base64, of that same type), the first bytes against the type, the
// size of each and of all, and, for text types, the whole file as UTF-8
// without NUL. The bytes are decoded as they are checked and not kept.
// A refusal is an *Error; files are accepted all or none.
func (p *Parser) CheckDataFiles(files []DataFile) ([]Info, error) {
	cfg := p.cfg
	var total int64
	out := make([]Info, 0, len(files))
	buf := make([]byte, copyBufSize)
	for i, df := range files {
		mt := ""
		if len(df.Type) <= maxDataTypeBytes {
			mt = declaredType(df.Type)
		}
		name := SanitizeName(df.Name, mt)
		if i >= cfg.MaxFiles {
			return nil, fileRefused(ReasonTooMany, name, "a message may carry at most %d files (max_files)", cfg.MaxFiles)
		}
		switch {
		case len(df.Name) > maxDataNameBytes:
			return nil, fileRefused(ReasonDataURL, name, "its name is longer than %d bytes", maxDataNameBytes)
		case mt == "" || mt == "application/octet-stream":
			return nil, fileRefused(ReasonType, name, "its type is not declared; accepted types: %s", strings.Join(cfg.AllowedTypes, ", "))
		case forbiddenType(mt):
			return nil, fileRefused(ReasonForbidden, name, "%s is never accepted", mt)
		case !p.allowed[mt]:
			return nil, fileRefused(ReasonType, name, "%s is not accepted; accepted types: %s", mt, strings.Join(cfg.AllowedTypes, ", "))
		}
		urlType, data, err := ParseDataURL(df.Data)
		if err != nil {
			return nil, fileRefused(ReasonDataURL, name, "its data is not a base64 data URL: %v", err)
		}
		if urlType != mt {
			return nil, fileRefused(ReasonDataURL, name, "its data URL is of type %s, not %s", urlType, mt)
		}
		// Base64 (strict: FileReader writes it canonically) is decoded as
		// it is read; a long one is cut at the first byte over a limit.
		dec := base64.NewDecoder(base64.StdEncoding.Strict(), strings.NewReader(data))
		// (Not io.ReadFull: it would turn the decoder's ErrUnexpectedEOF,
		// base64 cut short, into a file shorter than the head.)
		n := 0
		for err == nil && n < sniffLen {
			var m int
			m, err = dec.Read(buf[n:sniffLen])
			n += m
		}
		if err != nil && err != io.EOF {
			return nil, fileRefused(ReasonDataURL, name, "its data is not valid base64")
		}
		head := buf[:n]
		if n == 0 {
			return nil, fileRefused(ReasonEmpty, name, "it is empty")
		}
		if e := checkHead(mt, head); e != nil {
			e.Message = fmt.Sprintf("file %q refused: %s", name, e.Message)
			return nil, e
		}
		info := Info{Name: name, Type: mt}
		h := sha256.New()
		var text *textChecker
		if textType(mt) {
			text = &textChecker{}
		}
		write := func(b []byte) *Error {
			info.Size += int64(len(b))
			total += int64(len(b))
			if info.Size > cfg.MaxFileSize {
				return fileRefused(ReasonTooLarge, name, "it is larger than %s (max_file_size)", formatSize(cfg.MaxFileSize))
			}
			if total > cfg.MaxTotal {
				return fileRefused(ReasonTotal, name, "the files together are larger than %s (max_total)", formatSize(cfg.MaxTotal))
			}
			h.Write(b)
			if text != nil {
				_, _ = text.Write(b)
			}
			return nil
		}
		if e := write(head); e != nil {
			return nil, e
		}
		for err == nil {
			var m int
			m, err = dec.Read(buf)
			if m > 0 {
				if e := write(buf[:m]); e != nil {
					return nil, e
				}
			}
		}
		if err != io.EOF {
			return nil, fileRefused(ReasonDataURL, name, "its data is not valid base64")
		}
		if text != nil && !text.valid() {
			return nil, fileRefused(ReasonMismatch, name, "it is declared as %s but is not UTF-8 text without NUL bytes", mt)
		}
		info.SHA256 = hex.EncodeToString(h.Sum(nil))
		out = append(out, info)
	}
	return out, nil
}
