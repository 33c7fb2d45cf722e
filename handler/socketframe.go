package handler

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

// The frames of n8n's chat WebSocket (n8n 2.8.4 sends the plain-text
// variants, newer n8n the JSON ones; the widget handles both).
const (
	frameHeartbeat    = "n8n|heartbeat"
	frameHeartbeatAck = "n8n|heartbeat-ack"
	frameContinue     = "n8n|continue"
	jsonHeartbeatAck  = `{"type":"heartbeat-ack"}`
)

// n8nFrame is what a frame from n8n is to the proxy.
type n8nFrame int

const (
	n8nMessage       n8nFrame = iota // a bot message: relayed and stored
	n8nHeartbeat                     // n8n|heartbeat
	n8nHeartbeatJSON                 // {"type":"heartbeat"}
	n8nContinue                      // n8n|continue or {"type":"continue"}
	n8nError                         // {"type":"error",…}: relayed, not stored
)

// classifyN8nFrame tells heartbeats and continues from messages, and
// returns the text a message is stored with: the text of n8n's JSON
// messages (type message or with-buttons), else the frame as it is.
func classifyN8nFrame(data []byte) (n8nFrame, string) {
	switch string(data) {
	case frameHeartbeat:
		return n8nHeartbeat, ""
	case frameContinue:
		return n8nContinue, ""
	}
	if t := bytes.TrimSpace(data); len(t) > 0 && t[0] == '{' {
		var m struct {
			Type    *string `json:"type"`
			Text    *string `json:"text"`
			Message *string `json:"message"`
		}
		if json.Unmarshal(t, &m) == nil && m.Type != nil {
			switch *m.Type {
			case "heartbeat":
				return n8nHeartbeatJSON, ""
			case "continue":
				return n8nContinue, ""
			case "error":
				return n8nError, ""
			case "message", "with-buttons":
				if m.Text != nil {
					return n8nMessage, *m.Text
				}
			}
		}
	}
	return n8nMessage, string(data)
}

// maxAckFrame bounds a JSON heartbeat ack, {"type":"heartbeat-ack"} with
// room for spaces and escapes: a larger frame (an answer with files) is
// not decoded a second time as one.
const maxAckFrame = 256

// visitorFrame is a frame from the widget that may go on to n8n.
type visitorFrame struct {
	ack       bool          // a heartbeat ack (either variant)
	chatInput string        // a sendMessage answer's text, normalised for storing
	files     []upload.Info // the files the answer carries, checked
}

// visitorMessage is the widget's answer over the socket (Input.vue
// respondToChatNode): exactly these fields.
type visitorMessage struct {
	SessionID *string       `json:"sessionId"`
	Action    *string       `json:"action"`
	ChatInput *string       `json:"chatInput"`
	Files     []visitorFile `json:"files"`
}

// visitorFile is a file of the answer, as the widget sends it (its name,
// its File.type and its FileReader data URL); n8n's chatMessageSchema
// requires all three.
type visitorFile struct {
	Name *string `json:"name"`
	Type *string `json:"type"`
	Data *string `json:"data"`
}

// errSocketFields is the refusal of an answer's file without its name,
// type or data, which n8n would drop without a word.
var errSocketFields = errors.New("each file needs a name, a type and data")

// checkVisitorFrame accepts only what the widget sends over the socket:
// heartbeat acks, and sendMessage answers for the socket's own sessionId
// with a valid message and, when uploads is not nil, files within its
// limits (checked as the multipart route checks them, decoded from their
// data URLs). Anything else is refused with the reason the close carries;
// a refusal of the files is an *upload.Error.
func checkVisitorFrame(data []byte, sessionID string, maxRunes int, uploads *upload.Parser) (visitorFrame, error) {
	if string(data) == frameHeartbeatAck {
		return visitorFrame{ack: true}, nil
	}
	t := bytes.TrimSpace(data)
	if len(t) == 0 || t[0] != '{' {
		return visitorFrame{}, errors.New("unexpected frame")
	}
	if len(t) <= maxAckFrame {
		var typ *string
		dec := json.NewDecoder(bytes.NewReader(t))
		err := decodeExactObject(dec, map[string]any{"type": &typ})
		if err == nil && typ != nil && *typ == "heartbeat-ack" && atEOF(dec) {
			return visitorFrame{ack: true}, nil
		}
	}
	m, err := decodeVisitorMessage(t)
	if err != nil {
		return visitorFrame{}, errors.New("frame is not a sendMessage object")
	}
	switch {
	case m.Action == nil || *m.Action != "sendMessage":
		return visitorFrame{}, errors.New("action must be sendMessage")
	case m.SessionID == nil || *m.SessionID != sessionID:
		return visitorFrame{}, errors.New("sessionId does not match the socket's")
	case m.ChatInput == nil:
		return visitorFrame{}, errors.New("chatInput is required")
	}
	text, err := guard.NormalizeMessage(*m.ChatInput, maxRunes)
	if err != nil {
		return visitorFrame{}, guard.WithField(err, "chatInput")
	}
	if len(m.Files) == 0 {
		return visitorFrame{chatInput: text}, nil
	}
	if uploads == nil {
		e := upload.Disabled()
		e.Message = "file uploads are not accepted on this site"
		return visitorFrame{}, e
	}
	files := make([]upload.DataFile, len(m.Files))
	for i, f := range m.Files {
		if f.Name == nil || f.Type == nil || f.Data == nil {
			return visitorFrame{}, errSocketFields
		}
		files[i] = upload.DataFile{Name: *f.Name, Type: *f.Type, Data: *f.Data}
	}
	infos, err := uploads.CheckDataFiles(files)
	if err != nil {
		return visitorFrame{}, err
	}
	return visitorFrame{chatInput: text, files: infos}, nil
}

// decodeVisitorMessage decodes the widget's answer as n8n reads the frame
// it is relayed unchanged to (JSON.parse): encoding/json would match
// "Files" or "DATA" to a field and keep the last of two "files", so the
// checks could read other values than n8n does (a file hidden from them
// behind "Files": []). Here every key must be one of the fields, in its
// exact case, at most once; nothing may follow the object.
func decodeVisitorMessage(t []byte) (visitorMessage, error) {
	var m visitorMessage
	dec := json.NewDecoder(bytes.NewReader(t))
	files := func() error {
		tok, err := dec.Token()
		if err != nil || tok == nil { // null: no files
			return err
		}
		if tok != json.Delim('[') {
			return errors.New("files is not an array")
		}
		for dec.More() {
			var f visitorFile
			if err := decodeExactObject(dec, map[string]any{"name": &f.Name, "type": &f.Type, "data": &f.Data}); err != nil {
				return err
			}
			m.Files = append(m.Files, f)
		}
		_, err = dec.Token() // ]
		return err
	}
	err := decodeExactObject(dec, map[string]any{
		"sessionId": &m.SessionID, "action": &m.Action, "chatInput": &m.ChatInput, "files": files,
	})
	if err == nil && !atEOF(dec) {
		err = errors.New("data after the object")
	}
	return m, err
}

// decodeExactObject decodes the JSON object next in dec: each key must
// be one of fields, in its exact case, at most once; its value is decoded
// into the field's pointer, or by the field's func.
func decodeExactObject(dec *json.Decoder, fields map[string]any) error {
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return errors.New("not an object")
	}
	seen := make(map[string]bool, len(fields))
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string)
		field, ok := fields[key]
		if !ok || seen[key] {
			return errors.New("unexpected or repeated field")
		}
		seen[key] = true
		if decode, ok := field.(func() error); ok {
			err = decode()
		} else {
			err = dec.Decode(field)
		}
		if err != nil {
			return err
		}
	}
	_, err := dec.Token() // }
	return err
}

// atEOF reports whether dec has nothing left but white space.
func atEOF(dec *json.Decoder) bool {
	_, err := dec.Token()
	return err == io.EOF
}
