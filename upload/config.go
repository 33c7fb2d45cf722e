// Package upload reads the files a chat message carries: a
// multipart/form-data body is parsed as a stream, each file is checked
// against the configured limits (count, size, total, media type, and the
// type its first bytes show) and spooled (a small buffer in memory, the
// rest in a temporary file), so a request never holds a whole file in
// memory and a refused upload is refused before anything goes on.
//
// Use:
//
//	form, err := cfg.Parse(r.Body, boundary, upload.Limits{})
//	if err != nil {
//		// *upload.Error: answer e.Status with e.Code / e.Message
//	}
//	defer form.RemoveAll() // removes the temporary files
//	for _, f := range form.Files { rc, _ := f.Open(); ... }
package upload

import (
	"fmt"
	"mime"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/dustin/go-humanize"
)

// Defaults of the uploads block.
const (
	DefaultMaxFiles    = 5
	DefaultMaxFileSize = 10 << 20 // 10 MiB
	DefaultMaxTotal    = 20 << 20 // 20 MiB
)

// DefaultAllowedTypes is what allowed_types accepts when it is not set.
var DefaultAllowedTypes = []string{"image/png", "image/jpeg", "image/webp", "image/gif", "application/pdf", "text/plain"}

// Config is the uploads block: file uploads from the @n8n/chat widget and
// multipart chat messages, forwarded to n8n as the Chat Trigger expects.
// Absent, uploads are off and multipart bodies are refused with 415.
type Config struct {
	// MaxFiles is the most files one message may carry. Default: 5.
	MaxFiles int `json:"max_files,omitempty"`
	// MaxFileSize is the largest file accepted, in bytes. Default: 10 MiB.
	MaxFileSize int64 `json:"max_file_size,omitempty"`
	// MaxTotal is the most bytes all files of one message may hold
	// together. Default: 20 MiB.
	MaxTotal int64 `json:"max_total,omitempty"`
	// AllowedTypes lists the media types accepted, e.g. "image/png", or
	// "image/*" for every image type the proxy can verify. A file must
	// declare one of them and its first bytes must show that type. The
	// types that can be verified are image/png, image/jpeg, image/webp,
	// image/gif, application/pdf, and the text types text/plain,
	// text/csv, text/markdown and application/json (valid UTF-8 without
	// NUL). HTML, SVG and executables are never accepted. Default:
	// image/png image/jpeg image/webp image/gif application/pdf text/plain.
	AllowedTypes []string `json:"allowed_types,omitempty"`
	// TempDir is where files larger than a small in-memory buffer are
	// spooled while the request lasts. Default: the system's temporary
	// directory.
	TempDir string `json:"temp_dir,omitempty"`
}

// WithDefaults returns c with every unset field at its default.
func (c Config) WithDefaults() Config {
	if c.MaxFiles == 0 {
		c.MaxFiles = DefaultMaxFiles
	}
	if c.MaxFileSize == 0 {
		c.MaxFileSize = DefaultMaxFileSize
	}
	if c.MaxTotal == 0 {
		c.MaxTotal = DefaultMaxTotal
	}
	if len(c.AllowedTypes) == 0 {
		c.AllowedTypes = slices.Clone(DefaultAllowedTypes)
	}
	return c
}

// Validate checks the values (after WithDefaults); errors name the option.
func (c Config) Validate() error {
	switch {
	case c.MaxFiles < 1:
		return fmt.Errorf("uploads: max_files: must be at least 1, got %d", c.MaxFiles)
	case c.MaxFileSize < 1:
		return fmt.Errorf("uploads: max_file_size: must be at least 1 byte, got %d", c.MaxFileSize)
	case c.MaxTotal < 1:
		return fmt.Errorf("uploads: max_total: must be at least 1 byte, got %d", c.MaxTotal)
	case c.MaxFileSize > c.MaxTotal:
		return fmt.Errorf("uploads: max_file_size (%d bytes) is larger than max_total (%d bytes)", c.MaxFileSize, c.MaxTotal)
	}
	for _, t := range c.AllowedTypes {
		if _, err := expandType(t); err != nil {
			return fmt.Errorf("uploads: allowed_types: %w", err)
		}
	}
	return nil
}

// allowed returns the set of accepted media types, wildcards expanded.
func (c Config) allowed() map[string]bool {
	set := make(map[string]bool)
	for _, t := range c.AllowedTypes {
		ts, _ := expandType(t)
		for _, x := range ts {
			set[x] = true
		}
	}
	return set
}

// expandType turns one allowed_types entry into the media types it names.
func expandType(t string) ([]string, error) {
	mt, params, err := mime.ParseMediaType(t)
	if err != nil || len(params) > 0 || !strings.Contains(mt, "/") {
		return nil, fmt.Errorf("%q is not a media type such as image/png", t)
	}
	if family, ok := strings.CutSuffix(mt, "/*"); ok {
		var out []string
		for _, k := range verifiable {
			if strings.HasPrefix(k, family+"/") {
				out = append(out, k)
			}
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("%q names no type the proxy can verify (%s)", t, strings.Join(verifiable, ", "))
		}
		return out, nil
	}
	if forbiddenType(mt) {
		return nil, fmt.Errorf("%s is never accepted (HTML, SVG and executables could run in a browser or on a machine)", mt)
	}
	if !slices.Contains(verifiable, mt) {
		return nil, fmt.Errorf("%s cannot be checked against the file's bytes; the types that can are %s", mt, strings.Join(verifiable, ", "))
	}
	return []string{mt}, nil
}

// UnmarshalCaddyfile reads the block after the "uploads" option:
//
//	uploads {
//	    max_files      5
//	    max_file_size  10MiB
//	    max_total      20MiB
//	    allowed_types  image/png image/jpeg image/webp application/pdf text/plain
//	    temp_dir       /var/tmp/chatproxy
//	}
//
// The dispenser is at the "uploads" token; "uploads" alone (no block)
// turns uploads on with the defaults.
func (c *Config) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] {
			return d.Errf("uploads: duplicate option '%s'", option)
		}
		seen[option] = true
		args := d.RemainingArgs()
		switch option {
		case "max_files":
			if len(args) != 1 {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 1 {
				return d.Errf("uploads: max_files: want a whole number of at least 1, got '%s'", args[0])
			}
			c.MaxFiles = n
		case "max_file_size", "max_total":
			if len(args) != 1 {
				return d.ArgErr()
			}
			size, err := humanize.ParseBytes(args[0])
			if err != nil || size == 0 || size > 1<<40 {
				return d.Errf("uploads: %s: want a size such as 10MiB, got '%s'", option, args[0])
			}
			if option == "max_file_size" {
				c.MaxFileSize = int64(size)
			} else {
				c.MaxTotal = int64(size)
			}
		case "allowed_types":
			if len(args) == 0 {
				return d.ArgErr()
			}
			for _, t := range args {
				if _, err := expandType(t); err != nil {
					return d.Errf("uploads: allowed_types: %v", err)
				}
			}
			c.AllowedTypes = args
		case "temp_dir":
			if len(args) != 1 {
				return d.ArgErr()
			}
			c.TempDir = args[0]
		default:
			return d.Errf("uploads: unknown option '%s' (known: max_files, max_file_size, max_total, allowed_types, temp_dir)", option)
		}
	}
	return nil
}
