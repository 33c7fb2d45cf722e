package upload

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestConfigDefaultsAndValidate(t *testing.T) {
	c := Config{}.WithDefaults()
	if c.MaxFiles != 5 || c.MaxFileSize != 10<<20 || c.MaxTotal != 20<<20 || len(c.AllowedTypes) == 0 {
		t.Fatalf("defaults: %+v", c)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	bad := []struct {
		cfg  Config
		want string
	}{
		{Config{MaxFiles: -1}, "max_files"},
		{Config{MaxFileSize: 30 << 20}, "max_file_size"},
		{Config{AllowedTypes: []string{"text/html"}}, "never accepted"},
		{Config{AllowedTypes: []string{"image/svg+xml"}}, "never accepted"},
		{Config{AllowedTypes: []string{"application/zip"}}, "cannot be checked"},
		{Config{AllowedTypes: []string{"video/*"}}, "names no type"},
		{Config{AllowedTypes: []string{"png"}}, "not a media type"},
	}
	for _, tc := range bad {
		err := tc.cfg.WithDefaults().Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "uploads: ") {
			t.Errorf("Validate(%+v) = %v, want an error naming %q", tc.cfg, err, tc.want)
		}
	}
	p, err := NewParser(Config{AllowedTypes: []string{"image/*", "text/plain"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, mt := range []string{"image/png", "image/jpeg", "image/webp", "image/gif", "text/plain"} {
		if !p.allowed[mt] {
			t.Errorf("image/* text/plain does not allow %s", mt)
		}
	}
	if p.allowed["application/pdf"] {
		t.Error("image/* allows application/pdf")
	}
}

func TestUnmarshalCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`uploads {
		max_files      3
		max_file_size  2MiB
		max_total      5MB
		allowed_types  image/png application/pdf
	}`)
	d.Next()
	var c Config
	if err := c.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if c.MaxFiles != 3 || c.MaxFileSize != 2<<20 || c.MaxTotal != 5_000_000 || strings.Join(c.AllowedTypes, " ") != "image/png application/pdf" {
		t.Fatalf("parsed %+v", c)
	}

	d = caddyfile.NewTestDispenser(`uploads`)
	d.Next()
	c = Config{}
	if err := c.UnmarshalCaddyfile(d); err != nil || c.MaxFiles != 0 {
		t.Fatalf("bare uploads: %+v, %v", c, err)
	}

	for in, want := range map[string]string{
		"uploads {\n max_files 0\n}":               "max_files",
		"uploads {\n max_files 1 2\n}":             "wrong argument count",
		"uploads {\n max_file_size lots\n}":        "max_file_size",
		"uploads {\n allowed_types text/html\n}":   "never accepted",
		"uploads {\n max_files 2\n max_files 3\n}": "duplicate option 'max_files'",
		"uploads {\n max_filez 2\n}":               "unknown option 'max_filez'",
		"uploads extra":                            "wrong argument count",
		"uploads {\n allowed_types\n}":             "wrong argument count",
		"uploads {\n temp_dir /tmp /var\n}":        "wrong argument count",
		"uploads {\n max_total 0\n}":               "max_total",
	} {
		d := caddyfile.NewTestDispenser(in)
		d.Next()
		var c Config
		err := c.UnmarshalCaddyfile(d)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want an error containing %q", in, err, want)
		}
	}
}
