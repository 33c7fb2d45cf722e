package n8n

import (
	"encoding/json"
	"strconv"
)

// ExecutionStarted is n8n's answer when the Chat Trigger's response mode is
// "Using Response Nodes": {"executionStarted":true,"executionId":"41"}
// (newer n8n adds "resumeToken"). The conversation then goes on over the
// chat WebSocket (see DialChat), where the workflow's Chat nodes send their
// messages and wait for the visitor's answers.
type ExecutionStarted struct {
	// ExecutionID is n8n's execution id: sequential, so it is no secret.
	ExecutionID string
	// ResumeToken is the token newer n8n checks on the socket; empty when
	// n8n sent none (n8n 2.8.4).
	ResumeToken string
}

// Started returns n8n's executionStarted answer, or nil for an ordinary
// reply. Only a Request with ResponseNodes gets such a Reply; it holds no
// text (Next returns io.EOF).
func (r *Reply) Started() *ExecutionStarted { return r.started }

// maxExecutionID and maxResumeToken bound what the proxy copies into its
// own tokens and socket URLs.
const (
	maxExecutionID = 64
	maxResumeToken = 512
)

// parseStarted reads an executionStarted answer. The execution id goes
// into URLs and tokens, so it must be short and plain: n8n's ids are
// decimal database ids (a string; a number is taken too).
func parseStarted(obj map[string]any) (*ExecutionStarted, error) {
	st := &ExecutionStarted{}
	switch id := obj["executionId"].(type) {
	case string:
		st.ExecutionID = id
	case json.Number:
		st.ExecutionID = id.String()
	case float64:
		st.ExecutionID = strconv.FormatFloat(id, 'f', -1, 64)
	}
	if !plainToken(st.ExecutionID, maxExecutionID) {
		return nil, perr(ReasonInvalid, "executionStarted reply has no usable executionId")
	}
	if tok, ok := obj["resumeToken"]; ok && tok != nil {
		s, _ := tok.(string)
		if !plainToken(s, maxResumeToken) {
			return nil, perr(ReasonInvalid, "executionStarted reply has an unusable resumeToken")
		}
		st.ResumeToken = s
	}
	return st, nil
}

// plainToken reports whether s is 1..limit characters of letters, digits,
// '-', '_' and '.'.
func plainToken(s string, limit int) bool {
	if s == "" || len(s) > limit {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}
