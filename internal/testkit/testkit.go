// Package testkit holds test helpers shared by several packages' tests:
// an EventSource-faithful SSE parser, readers that check a live chat
// stream's SSE and NDJSON framing (streams.go), Caddy's encode handler as
// a site configures it, n8n's streaming lines, and the one fake n8n (N8n,
// in n8n.go) every package's tests use. Only tests import it.
package testkit

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/encode"
	caddygzip "github.com/caddyserver/caddy/v2/modules/caddyhttp/encode/gzip"
	caddyzstd "github.com/caddyserver/caddy/v2/modules/caddyhttp/encode/zstd"
)

// SSEEvent is one event as a browser's EventSource would see it.
type SSEEvent struct {
	ID       string
	HasID    bool
	Data     []string // each data line, in order
	Comments []string // comment lines (without the ':') seen since the previous event
}

// ParseSSE parses s the way the WHATWG EventSource algorithm does: lines end
// with "\r\n", "\n" or a lone "\r"; a blank line dispatches; ":" starts a
// comment; "field: value" with one optional space. Comments are attached to
// the next event; a trailing incomplete event is returned too, so that a
// test can see it. A field other than data and id shows up as a data line
// "UNEXPECTED FIELD <name>".
func ParseSSE(s string) (events []SSEEvent) {
	var cur SSEEvent
	seen := false
	for len(s) > 0 {
		i := strings.IndexAny(s, "\r\n")
		var line string
		if i < 0 {
			line, s = s, ""
		} else {
			line = s[:i]
			if s[i] == '\r' && i+1 < len(s) && s[i+1] == '\n' {
				s = s[i+2:]
			} else {
				s = s[i+1:]
			}
		}
		switch {
		case line == "":
			if seen {
				events = append(events, cur)
			}
			cur, seen = SSEEvent{}, false
		case line[0] == ':':
			cur.Comments = append(cur.Comments, line[1:])
		default:
			field, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			seen = true
			switch field {
			case "data":
				cur.Data = append(cur.Data, value)
			case "id":
				cur.ID, cur.HasID = value, true
			default:
				cur.Data = append(cur.Data, "UNEXPECTED FIELD "+field)
			}
		}
	}
	if seen {
		events = append(events, cur)
	}
	return events
}

// NewEncode provisions Caddy's real encode handler as `encode gzip zstd`
// configures it (zstd preferred, default minimum_length and matcher).
func NewEncode(t testing.TB) *encode.Encode {
	t.Helper()
	enc := &encode.Encode{
		EncodingsRaw: caddy.ModuleMap{
			"gzip": caddyconfig.JSON(caddygzip.Gzip{}, nil),
			"zstd": caddyconfig.JSON(caddyzstd.Zstd{}, nil),
		},
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	t.Cleanup(cancel)
	if err := enc.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if err := enc.Validate(); err != nil {
		t.Fatal(err)
	}
	return enc
}

// N8nLine is one line of n8n's streaming reply, as n8n writes it: begin
// and end carry no content key.
func N8nLine(typ, content string) string {
	m := map[string]any{
		"type": typ,
		"metadata": map[string]any{
			"nodeId": "3f2a-agent", "nodeName": "AI Agent", "itemIndex": 0, "runIndex": 0,
			"timestamp": time.Now().UnixMilli(),
		},
	}
	if typ == "item" || typ == "error" {
		m["content"] = content
	}
	b, _ := json.Marshal(m)
	return string(b) + "\n"
}
