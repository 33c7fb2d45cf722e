package chatproxy

import (
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard" // reverse_proxy, file_server, …
)

var updateAdapt = flag.Bool("update-adapt", false, "rewrite the expected JSON of testdata/caddyfile_adapt/*.caddyfiletest")

// adaptSecret is set as $JWT, $SESSION_SECRET, … while adapting: it must
// never show up in the JSON, because {env.X} is resolved at provision time.
const adaptSecret = "resolved-at-adapt-time-0123456789abcdef"

// TestCaddyfileAdapt runs every testdata/caddyfile_adapt/*.caddyfiletest
// through the Caddyfile adapter, in Caddy core's format: a Caddyfile, a
// line of ten dashes, then either the expected JSON or a substring of the
// expected error.
func TestCaddyfileAdapt(t *testing.T) {
	for _, name := range []string{"JWT", "SESSION_SECRET", "CHAT_JWT_SECRET", "CHAT_SESSION_SECRET", "N8N_URL", "DATABASE_URL"} {
		t.Setenv(name, adaptSecret)
	}
	files, err := filepath.Glob(filepath.Join("testdata", "caddyfile_adapt", "*.caddyfiletest"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 10 {
		t.Fatalf("found %d adapt cases, want at least 10", len(files))
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".caddyfiletest"), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			input, expected, ok := strings.Cut(strings.ReplaceAll(string(data), "\r\n", "\n"), "\n----------\n")
			if !ok {
				t.Fatalf("%s: no ---------- line between the Caddyfile and the expected result", file)
			}
			input = strings.TrimSpace(input) + "\n"
			expected = strings.TrimSpace(expected)

			out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
			for _, w := range warnings {
				t.Errorf("warning: %s", w)
			}

			if !strings.HasPrefix(expected, "{") {
				if err == nil {
					t.Fatalf("adapted without error, want an error containing %q; got\n%s", expected, out)
				}
				if !strings.Contains(err.Error(), expected) {
					t.Fatalf("error\n  %v\nwant it to contain\n  %s", err, expected)
				}
				return
			}
			if err != nil {
				t.Fatalf("adapt: %v", err)
			}
			if strings.Contains(string(out), adaptSecret) {
				t.Errorf("a secret was resolved at adapt time:\n%s", out)
			}
			got := adaptCanonical(t, out)
			if *updateAdapt {
				if err := os.WriteFile(file, []byte(input+"----------\n"+got+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			// file_server hides the Caddyfile by its OS-specific path.
			hidden, _ := json.Marshal("." + string(filepath.Separator) + "Caddyfile")
			expected = strings.ReplaceAll(expected, `"./Caddyfile"`, string(hidden))
			want := adaptCanonical(t, []byte(expected))
			var g, w any
			_ = json.Unmarshal([]byte(got), &g)
			_ = json.Unmarshal([]byte(want), &w)
			if !reflect.DeepEqual(g, w) {
				t.Errorf("adapted JSON differs from %s (- want, + got):\n%s", file, adaptDiff(want, got))
			}
		})
	}
}

// adaptCanonical indents JSON with sorted keys, tabs for indentation.
func adaptCanonical(t *testing.T, b []byte) string {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("invalid JSON: %v\n%s", err, b)
	}
	out, err := json.MarshalIndent(v, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// adaptDiff is a line diff of two texts (longest common subsequence), with
// "-" for lines only in want and "+" for lines only in got.
func adaptDiff(want, got string) string {
	a, b := strings.Split(want, "\n"), strings.Split(got, "\n")
	lcs := make([][]int, len(a)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(b)+1)
	}
	for i := len(a) - 1; i >= 0; i-- {
		for j := len(b) - 1; j >= 0; j-- {
			if a[i] == b[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var sb strings.Builder
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case i < len(a) && j < len(b) && a[i] == b[j]:
			sb.WriteString("  " + a[i] + "\n")
			i, j = i+1, j+1
		case i < len(a) && (j == len(b) || lcs[i+1][j] >= lcs[i][j+1]):
			sb.WriteString("- " + a[i] + "\n")
			i++
		default:
			sb.WriteString("+ " + b[j] + "\n")
			j++
		}
	}
	return sb.String()
}

func TestAdaptDiff(t *testing.T) {
	got := adaptDiff("a\nb\nc", "a\nx\nc\nd")
	want := "  a\n- b\n+ x\n  c\n+ d\n"
	if got != want {
		t.Errorf("adaptDiff = %q, want %q", got, want)
	}
}
