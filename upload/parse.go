package upload

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"strings"
)

// FilesField is the name of the parts that carry files, as @n8n/chat
// sends them and n8n's Chat Trigger reads them.
const FilesField = "files"

// memLimit is how much of one file stays in memory; the rest is spooled
// to a temporary file.
const memLimit = 64 << 10

// copyBufSize is the read buffer of a parse.
const copyBufSize = 32 << 10

// Limits bound the text fields of a form (the files are bound by Config).
type Limits struct {
	// MaxFieldsSize is the most bytes all text fields may hold together.
	// Default: 64 KiB.
	MaxFieldsSize int64
	// MaxFields is the most text fields a form may have. Default: 32.
	MaxFields int
}

// Parser checks and spools uploads; build it once with NewParser.
type Parser struct {
	cfg     Config
	allowed map[string]bool
}

// NewParser returns a parser for cfg, with defaults applied and checked.
func NewParser(cfg Config) (*Parser, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Parser{cfg: cfg, allowed: cfg.allowed()}, nil
}

// Config returns the parser's configuration, defaults applied.
func (p *Parser) Config() Config { return p.cfg }

// MaxBodySize is the most bytes a multipart body may hold: the files, the
// text fields and room for the part headers and boundaries.
func (p *Parser) MaxBodySize(lim Limits) int64 {
	lim = lim.withDefaults()
	return p.cfg.MaxTotal + lim.MaxFieldsSize + int64(p.cfg.MaxFiles+lim.MaxFields+1)*4096
}

func (l Limits) withDefaults() Limits {
	if l.MaxFieldsSize <= 0 {
		l.MaxFieldsSize = 64 << 10
	}
	if l.MaxFields <= 0 {
		l.MaxFields = 32
	}
	return l
}

// Form is a parsed multipart body: its text fields and its files, in the
// order they came. RemoveAll must be called when the request is done.
type Form struct {
	Fields map[string]string
	Files  []*File
}

// Value returns the text field name ("" when absent) and whether it was
// sent.
func (f *Form) Value(name string) (string, bool) {
	v, ok := f.Fields[name]
	return v, ok
}

// TotalSize is the bytes of all files together.
func (f *Form) TotalSize() int64 {
	var n int64
	for _, file := range f.Files {
		n += file.Size
	}
	return n
}

// RemoveAll removes the form's temporary files. It is safe to call more
// than once and on a nil form.
func (f *Form) RemoveAll() error {
	if f == nil {
		return nil
	}
	var errs []error
	for _, file := range f.Files {
		errs = append(errs, file.remove())
	}
	return errors.Join(errs...)
}

// File is one accepted file.
type File struct {
	// Name is the sanitised file name (SanitizeName).
	Name string
	// Type is the media type, declared by the client and confirmed by
	// the file's first bytes.
	Type string
	// Size is the file's length in bytes.
	Size int64
	// SHA256 is the hex SHA-256 of the file's bytes.
	SHA256 string

	mem  []byte // the whole file when it fitted in memLimit
	path string // the temporary file otherwise
}

// Open returns the file's bytes from the start; it may be called again,
// so a request that carries the file can be sent more than once.
func (f *File) Open() (io.ReadCloser, error) {
	if f.path == "" {
		return io.NopCloser(bytes.NewReader(f.mem)), nil
	}
	return os.Open(f.path)
}

func (f *File) remove() error {
	if f.path == "" {
		return nil
	}
	err := os.Remove(f.path)
	if err == nil || errors.Is(err, os.ErrNotExist) {
		f.path = ""
		return nil
	}
	return fmt.Errorf("removing upload spool: %w", err)
}

// Boundary returns the boundary of a multipart/form-data Content-Type,
// or a refusal (400) when the value is not one.
func Boundary(contentType string) (string, error) {
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil || mt != "multipart/form-data" {
		return "", refuse(ReasonMalformed, "the body is not multipart/form-data")
	}
	b := params["boundary"]
	if b == "" || len(b) > 70 {
		return "", refuse(ReasonMalformed, "the multipart Content-Type has no valid boundary")
	}
	return b, nil
}

// IsMultipart reports whether a Content-Type is multipart/form-data.
func IsMultipart(contentType string) bool {
	mt, _, _ := mime.ParseMediaType(contentType)
	return mt == "multipart/form-data"
}

// Parse reads a multipart/form-data body. Files must come in parts named
// "files"; each is checked (count, size, total, type) as it streams, so a
// refused upload is refused at the first file at fault. The error is an
// *Error when the upload is refused; any other error (a temporary file
// that cannot be written) is this server's fault. A refused or failed
// parse leaves no temporary file behind. body should be bounded by the
// caller (http.MaxBytesReader at MaxBodySize): a *http.MaxBytesError from
// it is a 413.
func (p *Parser) Parse(body io.Reader, boundary string, lim Limits) (*Form, error) {
	lim = lim.withDefaults()
	form := &Form{Fields: make(map[string]string)}
	st := parseState{p: p, lim: lim, form: form, buf: make([]byte, copyBufSize)}
	if err := st.run(multipart.NewReader(body, boundary)); err != nil {
		_ = form.RemoveAll()
		return nil, err
	}
	return form, nil
}

type parseState struct {
	p          *Parser
	lim        Limits
	form       *Form
	buf        []byte
	total      int64 // bytes of all files so far
	fieldBytes int64
	fields     int
}

func (st *parseState) run(mr *multipart.Reader) error {
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return readError(err, "the multipart body is malformed: %v", err)
		}
		err = st.part(part)
		_ = part.Close()
		if err != nil {
			return err
		}
	}
}

func (st *parseState) part(part *multipart.Part) error {
	_, params, err := mime.ParseMediaType(part.Header.Get("Content-Disposition"))
	if err != nil {
		return refuse(ReasonMalformed, "a multipart part has no valid Content-Disposition")
	}
	name := params["name"]
	if name == "" {
		return refuse(ReasonMalformed, "a multipart part has no name")
	}
	if filename, isFile := params["filename"]; isFile {
		if name != FilesField {
			return refuse(ReasonMalformed, "files must be sent in parts named %q, not %q", FilesField, name)
		}
		return st.file(part, filename)
	}
	return st.field(part, name)
}

func (st *parseState) field(part *multipart.Part, name string) error {
	st.fields++
	if st.fields > st.lim.MaxFields {
		return refuse(ReasonFields, "the form has more than %d text fields", st.lim.MaxFields)
	}
	if _, dup := st.form.Fields[name]; dup {
		return refuse(ReasonMalformed, "the field %q is sent twice", name)
	}
	left := st.lim.MaxFieldsSize - st.fieldBytes
	var b strings.Builder
	n, err := io.Copy(&b, io.LimitReader(part, left+1))
	if err != nil {
		return readError(err, "reading the field %q: %v", name, err)
	}
	if n > left {
		return refuse(ReasonFields, "the text fields hold more than %d bytes together", st.lim.MaxFieldsSize)
	}
	st.fieldBytes += n
	st.form.Fields[name] = b.String()
	return nil
}

func (st *parseState) file(part *multipart.Part, clientName string) error {
	cfg := st.p.cfg
	mt := declaredType(part.Header.Get("Content-Type"))
	name := SanitizeName(clientName, mt)
	if len(st.form.Files) >= cfg.MaxFiles {
		return fileRefused(ReasonTooMany, name, "a message may carry at most %d files (max_files)", cfg.MaxFiles)
	}
	switch {
	case mt == "" || mt == "application/octet-stream":
		return fileRefused(ReasonType, name, "its type is not declared; accepted types: %s", strings.Join(cfg.AllowedTypes, ", "))
	case forbiddenType(mt):
		return fileRefused(ReasonForbidden, name, "%s is never accepted", mt)
	case !st.p.allowed[mt]:
		return fileRefused(ReasonType, name, "%s is not accepted; accepted types: %s", mt, strings.Join(cfg.AllowedTypes, ", "))
	}

	// The first bytes decide whether the content is what the type says.
	head := st.buf[:sniffLen]
	n, err := io.ReadFull(part, head)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return readError(err, "reading the file %q: %v", name, err)
	}
	head = head[:n]
	if n == 0 {
		return fileRefused(ReasonEmpty, name, "it is empty")
	}
	if e := checkHead(mt, head); e != nil {
		e.Message = fmt.Sprintf("file %q refused: %s", name, e.Message)
		return e
	}

	f := &File{Name: name, Type: mt}
	st.form.Files = append(st.form.Files, f) // from here on, RemoveAll removes its spool
	sp := &spool{dir: cfg.TempDir, file: f, hash: sha256.New()}
	var text *textChecker
	if textType(mt) {
		text = &textChecker{}
	}
	write := func(b []byte) error {
		f.Size += int64(len(b))
		st.total += int64(len(b))
		if f.Size > cfg.MaxFileSize {
			return fileRefused(ReasonTooLarge, name, "it is larger than %s (max_file_size)", formatSize(cfg.MaxFileSize))
		}
		if st.total > cfg.MaxTotal {
			return fileRefused(ReasonTotal, name, "the files together are larger than %s (max_total)", formatSize(cfg.MaxTotal))
		}
		if text != nil {
			_, _ = text.Write(b)
		}
		return sp.write(b)
	}
	err = write(head)
	for err == nil {
		var m int
		m, err = part.Read(st.buf)
		if m > 0 {
			if werr := write(st.buf[:m]); werr != nil {
				err = werr
				break
			}
		}
	}
	if cerr := sp.close(); err == io.EOF {
		err = cerr
	}
	if err != nil {
		var ue *Error
		if errors.As(err, &ue) {
			return ue
		}
		if sp.err != nil {
			return sp.err // this server's fault (a full disk): not the client's
		}
		return readError(err, "reading the file %q: %v", name, err)
	}
	if text != nil && !text.valid() {
		return fileRefused(ReasonMismatch, name, "it is declared as %s but is not UTF-8 text without NUL bytes", mt)
	}
	f.SHA256 = hex.EncodeToString(sp.hash.Sum(nil))
	return nil
}

// readError turns a read failure into a refusal: the body's own limit is
// a 413, anything else a malformed body (400).
func readError(err error, format string, args ...any) *Error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return refuse(ReasonTotal, "the request body is larger than %s", formatSize(mbe.Limit))
	}
	return refuse(ReasonMalformed, format, args...)
}

// spool keeps a file's bytes: in memory up to memLimit, then in a
// temporary file; it hashes them on the way.
type spool struct {
	dir  string
	file *File
	hash hash.Hash
	tmp  *os.File
	err  error
}

func (s *spool) write(b []byte) error {
	if s.err != nil {
		return s.err
	}
	s.hash.Write(b)
	f := s.file
	if s.tmp == nil && len(f.mem)+len(b) <= memLimit {
		f.mem = append(f.mem, b...)
		return nil
	}
	if s.tmp == nil {
		tmp, err := os.CreateTemp(s.dir, "chatproxy-upload-*")
		if err != nil {
			s.err = fmt.Errorf("spooling upload: %w", err)
			return s.err
		}
		s.tmp, f.path = tmp, tmp.Name()
		if _, err := tmp.Write(f.mem); err != nil {
			s.err = fmt.Errorf("spooling upload: %w", err)
			return s.err
		}
		f.mem = nil
	}
	if _, err := s.tmp.Write(b); err != nil {
		s.err = fmt.Errorf("spooling upload: %w", err)
	}
	return s.err
}

func (s *spool) close() error {
	if s.tmp == nil {
		return s.err
	}
	if err := s.tmp.Close(); err != nil && s.err == nil {
		s.err = fmt.Errorf("spooling upload: %w", err)
	}
	return s.err
}

func formatSize(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}
