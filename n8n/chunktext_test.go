package n8n

import (
	"encoding/json"
	"errors"
	"testing"
)

// chunkTextTwoPass is chunkText as it was before its one-pass path: the
// line decoded with its content kept raw, then the content decoded again.
// The fuzz target below holds the two to the same answers.
func chunkTextTwoPass(line []byte) (string, error) {
	if len(line) == 0 {
		return "", nil
	}
	var ch struct {
		Type    string          `json:"type"`
		Content json.RawMessage `json:"content"`
	}
	if line[0] != '{' || json.Unmarshal(line, &ch) != nil {
		if looksHTML(line) {
			e := perr(ReasonHTML, "n8n's stream holds an html page")
			e.detail = sanitize(string(line))
			return "", e
		}
		return "", perr(ReasonInvalid, "n8n's stream holds a line that is not a json object")
	}
	text := rawText(ch.Content)
	return chunkOf(ch.Type, text), chunkError(ch.Type, text)
}

func FuzzChunkTextOnePass(f *testing.F) {
	for _, s := range []string{
		`{"type":"item","content":"Hello"}`,
		`{"type":"item","content":"caf\u00e9 \ud83d\ude00","metadata":{"nodeId":"n1"}}`,
		`{"type":"item","content":null}`,
		`{"type":"item"}`,
		`{"type":"item","content":42}`,
		`{"type":"item","content":{"output":"wrapped"}}`,
		`{"type":"item","content":"{\"output\":\"inner\"}"}`,
		`{"type":"error","content":"boom"}`,
		`{"type":"error","content":{"message":"boom"}}`,
		`{"type":1,"content":"x"}`,
		`{"type":"begin"}`,
		`{"TYPE":"item","Content":"case"}`,
		`{"type":"item","content":"a","content":7}`,
		"{\"type\":\"item\",\"content\":\"bad \xff utf-8\"}",
		`<html>`,
		`not json`,
		``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		got, gotErr := chunkText(line)
		want, wantErr := chunkTextTwoPass(line)
		if got != want {
			t.Fatalf("chunkText(%q) = %q, want %q", line, got, want)
		}
		var ge, we *protoError
		if (gotErr == nil) != (wantErr == nil) || errors.As(gotErr, &ge) != errors.As(wantErr, &we) ||
			ge != nil && (ge.reason != we.reason || ge.msg != we.msg || ge.detail != we.detail) {
			t.Fatalf("chunkText(%q) error %v, want %v", line, gotErr, wantErr)
		}
	})
}
