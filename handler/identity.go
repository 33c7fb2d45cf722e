package handler

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"

	"go.uber.org/zap"

	ident "github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// Verified visitors. The site proves a logged-in visitor with
// identity_secret (see package identity): at POST {prefix}/session/create
// in the body's user_id/user_hash or identity_token, and on the @n8n/chat
// route in the widget's metadata, which it sends with every request. The
// user then travels with the session (visitor sessions) or with each
// request (widget conversations) and reaches n8n as "user".

// verifyIdentity checks the proof a request carries: nil when it carries
// none (an anonymous visitor), the verified user, or an error (already
// logged, once) that refuseIdentity answers with 401.
func (h *Handler) verifyIdentity(r *http.Request, route string, p ident.Proof) (*sessions.User, error) {
	if !p.Present() {
		return nil, nil
	}
	u, err := h.cfg.Identity.Verify(p)
	if err != nil {
		h.logIdentityRefused(r, route, err, p.UserID)
		return nil, err
	}
	return &sessions.User{ID: u.ID, Name: u.Name, Email: u.Email, Attributes: u.Attributes}, nil
}

// logIdentityRefused writes the one log line of a refused proof. The
// secret, the hash and the token never appear in it, nor, unless
// log_content is on, who the proof claimed to be.
func (h *Handler) logIdentityRefused(r *http.Request, route string, err error, claimedID string) {
	reason := "invalid"
	var ie *ident.Error
	if errors.As(err, &ie) {
		reason = ie.Reason
	}
	fields := []zap.Field{zap.String("route", route), zap.String("site", requestSite(r)),
		zap.String("reason", reason), zap.String("detail", err.Error())}
	if h.cfg.LogContent && claimedID != "" {
		fields = append(fields, zap.String("user_id", claimedID))
	}
	h.cfg.Logger.Info("identity refused", fields...)
}

// refuseIdentity answers a proof that failed: 401 invalid_identity.
func (h *Handler) refuseIdentity(w http.ResponseWriter, r *http.Request, err error) error {
	h.cfg.Metrics.GuardRefused(metrics.RefusalIdentity)
	return h.writeError(w, r, http.StatusUnauthorized, "invalid_identity", err.Error())
}

// widgetIdentity takes the identity proof out of the @n8n/chat widget's
// metadata. A proof is present when metadata holds user_hash or
// identity_token; its fields (user_id, user_hash, identity_token, name,
// email) are then removed from the metadata that is stored and forwarded,
// since the user travels as "user" and the hash and token are
// credentials. Without one, user_id, name and email are ordinary
// metadata, as before identity existed. With identity_secret configured,
// a "user" key of the metadata is renamed "unverified_user" (see
// unverifiedUser).
//
// A proof field that is not a string, or an empty user_hash or
// identity_token, is refused. Metadata that is not an object is left to
// the message checks.
func widgetIdentity(metadata json.RawMessage, configured bool) (ident.Proof, json.RawMessage, *ident.Error) {
	var p ident.Proof
	obj := metadataObject(metadata)
	if obj == nil {
		return p, metadata, nil
	}
	_, hasHash := obj["user_hash"]
	_, hasToken := obj["identity_token"]
	if !hasHash && !hasToken {
		if configured {
			return p, renameUser(metadata, obj), nil
		}
		return p, metadata, nil
	}
	for _, f := range []struct {
		key string
		to  *string
	}{{"user_id", &p.UserID}, {"user_hash", &p.UserHash}, {"identity_token", &p.Token}, {"name", &p.Name}, {"email", &p.Email}} {
		v, ok := obj[f.key]
		if ok && string(v) != "null" && json.Unmarshal(v, f.to) != nil {
			return p, nil, &ident.Error{Reason: ident.ReasonBadField,
				Message: "metadata: user_id, user_hash, identity_token, name and email must be strings"}
		}
		delete(obj, f.key)
	}
	if p.UserHash == "" && p.Token == "" {
		return p, nil, &ident.Error{Reason: ident.ReasonIncomplete, Message: "metadata: user_hash or identity_token is empty"}
	}
	if configured {
		if u, ok := obj["user"]; ok {
			obj["unverified_user"] = u
			delete(obj, "user")
		}
	}
	out, err := json.Marshal(obj)
	if err != nil {
		return p, nil, &ident.Error{Reason: ident.ReasonBadField, Message: "metadata: not a JSON object"}
	}
	return p, out, nil
}

// metadataObject decodes metadata that is a JSON object; nil otherwise.
func metadataObject(raw json.RawMessage) map[string]json.RawMessage {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return nil
	}
	var obj map[string]json.RawMessage
	if json.Unmarshal(raw, &obj) != nil {
		return nil
	}
	return obj
}

// renameUser returns raw with its "user" key renamed "unverified_user",
// or raw itself when it has none.
func renameUser(raw json.RawMessage, obj map[string]json.RawMessage) json.RawMessage {
	u, ok := obj["user"]
	if !ok {
		return raw
	}
	obj["unverified_user"] = u
	delete(obj, "user")
	out, err := json.Marshal(obj)
	if err != nil {
		return raw
	}
	return out
}

// unverifiedUser renames a "user" key of a message's context (sent to n8n
// as metadata) to "unverified_user" when identity_secret is configured, as
// widgetIdentity does for the widget's metadata: nothing the page made up
// can then be read as the verified user. Anything else is left as it is
// (and to the message checks).
func (h *Handler) unverifiedUser(raw json.RawMessage) json.RawMessage {
	// Only context that cannot hold the key is passed over undecoded: a
	// key may be spelt with escapes ("us\u0065r") that decode to "user".
	if h.cfg.Identity == nil || !bytes.Contains(raw, []byte("user")) && bytes.IndexByte(raw, '\\') < 0 {
		return raw
	}
	if obj := metadataObject(raw); obj != nil {
		return renameUser(raw, obj)
	}
	return raw
}

// upstreamUser is the verified user as n8n gets it; nil for anonymous.
func upstreamUser(u *sessions.User) *n8n.User {
	if u == nil {
		return nil
	}
	return &n8n.User{ID: u.ID, Name: u.Name, Email: u.Email, Attributes: u.Attributes}
}

// routeSessionCreate labels POST {prefix}/session/create in identity logs.
const routeSessionCreate = "session_create"

// userTierID is the user rate-limit tier's key for a verified user id:
// the id within this block's realm (its visitor tokens' audience, as the
// store scopes users), so that two sites' "user 42" sharing a Redis never
// share a budget. Empty for anonymous.
func (h *Handler) userTierID(id string) string {
	if id == "" {
		return ""
	}
	return h.cfg.Sessions.Tokens.Audience() + "\x00" + id
}

// userID is a verified user's id, or "" for anonymous.
func userID(u *sessions.User) string {
	if u == nil {
		return ""
	}
	return u.ID
}

// widgetUser verifies the identity proof in the widget's metadata, if
// any, and leaves the metadata without it (see widgetIdentity). Widget
// requests carry the metadata every time, so every request is verified
// on its own: nothing about the user is kept between requests but the
// conversation it names.
func (h *Handler) widgetUser(r *http.Request, req *widgetRequest) (*sessions.User, error) {
	proof, rest, bad := widgetIdentity(req.Metadata, h.cfg.Identity != nil)
	if bad != nil {
		h.logIdentityRefused(r, metrics.RouteWidget, bad, "")
		return nil, bad
	}
	req.Metadata = rest
	return h.verifyIdentity(r, metrics.RouteWidget, proof)
}
