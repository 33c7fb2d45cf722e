package handler

import (
	"context"
	"encoding/json"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

type chatRequest struct {
	Message string          `json:"message"`
	Context json.RawMessage `json:"context"`
	PageURL string          `json:"page_url"`
	// Website is the honeypot: the widget keeps this field hidden and
	// empty, so anything in it was typed by a bot.
	Website string `json:"website"`
}

// chatMessage answers POST {prefix}/chat/message: SSE, or one JSON object
// when the client asks for application/json and not for an event stream.
func (h *Handler) chatMessage(w http.ResponseWriter, r *http.Request, _ string) error {
	return h.runExchange(w, r, &apiChat{h: h, route: metrics.RouteMessage, asJSON: wantsJSON(r.Header.Get("Accept"))})
}

func (h *Handler) chatStreamPost(w http.ResponseWriter, r *http.Request, _ string) error {
	return h.runExchange(w, r, &apiChat{h: h, route: metrics.RouteStream})
}

// chatStreamGet serves EventSource clients, which can only GET and only
// send the cookie; the cookie CSRF rule applies as for any cookie request.
func (h *Handler) chatStreamGet(w http.ResponseWriter, r *http.Request, _ string) error {
	return h.runExchange(w, r, &apiChat{h: h, route: metrics.RouteStream})
}

// wantsJSON reports whether Accept asks for JSON and not for SSE.
func wantsJSON(accept string) bool {
	json, sse := false, false
	for part := range strings.SplitSeq(accept, ",") {
		mt, params, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err != nil || params["q"] == "0" {
			continue
		}
		switch mt {
		case "application/json":
			json = true
		case "text/event-stream":
			sse = true
		}
	}
	return json && !sse
}

// apiChat is the chat API's side of runExchange: the visitor token (bearer
// or cookie) names the session, the message comes as JSON (or, for
// EventSource, in the GET query), and the reply goes back as SSE or, when
// the client accepts only JSON, as one object.
type apiChat struct {
	h      *Handler
	route  string // metrics.RouteMessage or RouteStream
	asJSON bool

	claims  *sessions.Claims
	session *sessions.Session // once loaded
}

func (a *apiChat) name() string { return a.route }

// resumable: the chat API's replies can be resumed and stopped by their
// message id (GET {prefix}/chat/stream/{id}, POST {prefix}/chat/stop/{id}).
func (a *apiChat) resumable() bool { return true }

// identify verifies the token; its claims name the session and its site,
// so the store is not needed yet.
func (a *apiChat) identify(w http.ResponseWriter, r *http.Request) (identity, bool) {
	_, claims, ok := a.h.authenticateWith(w, r, func(_ context.Context, token string) (*sessions.Session, *sessions.Claims, error) {
		c, err := a.h.cfg.Sessions.Tokens.Verify(token)
		return nil, c, err
	})
	if !ok {
		return identity{}, false
	}
	a.claims = claims
	site := claims.Site
	if site == "" {
		// A token issued before the site claim existed: the site, which
		// the domain tier counts, is only in the session row.
		s, ok := a.load(w, r)
		if !ok {
			return identity{}, false
		}
		site = s.Site
	}
	return identity{sessionID: claims.Subject, site: site, userKey: a.h.userTierID(claims.User)}, true
}

func (a *apiChat) readMessage(w http.ResponseWriter, r *http.Request) (messageInput, *errBadBody) {
	if r.Method == http.MethodPost && upload.IsMultipart(r.Header.Get("Content-Type")) {
		// A message with files: the fields of the JSON body as form
		// fields (context as JSON text) and one "files" part per file.
		form, bad := a.h.readForm(w, r)
		if bad != nil {
			return messageInput{}, bad
		}
		message, _ := form.Value("message")
		pageURL, _ := form.Value("page_url")
		website, _ := form.Value("website")
		return messageInput{
			message: message, messageField: "message",
			extra: a.h.unverifiedUser(formJSON(form, "context")), extraField: "context",
			pageURL: pageURL, honeypot: website, form: form,
		}, nil
	}
	var req chatRequest
	if r.Method == http.MethodGet {
		q := r.URL.Query()
		req.Message, req.PageURL, req.Website = q.Get("message"), q.Get("page_url"), q.Get("website")
	} else if bad := a.h.readJSON(w, r, &req, false); bad != nil {
		return messageInput{}, bad
	}
	return messageInput{
		message: req.Message, messageField: "message",
		extra: a.h.unverifiedUser(req.Context), extraField: "context",
		pageURL: req.PageURL, honeypot: req.Website,
	}, nil
}

func (a *apiChat) loadSession(w http.ResponseWriter, r *http.Request, ex *exchange) (*sessions.Session, bool) {
	s, ok := a.load(w, r)
	if ok {
		ex.tokenFingerprint = a.claims.Fingerprint
	}
	return s, ok
}

// load returns the token's session. The user message's insert confirms
// the session is active, so a session the token describes fully is not
// read (see Manager.MessageSession); sessions younger than the bot
// filter's first-message delay are, as the filter needs their message
// count (a second more covers the token's whole-second iat).
func (a *apiChat) load(w http.ResponseWriter, r *http.Request) (*sessions.Session, bool) {
	if a.session != nil {
		return a.session, true
	}
	h := a.h
	var minAge time.Duration
	if h.cfg.Bots != nil {
		minAge = h.cfg.Bots.MinFirstMessageDelay() + time.Second
	}
	s, err := h.cfg.Sessions.MessageSession(r.Context(), a.claims, minAge)
	if err != nil {
		_ = h.refuseSession(w, r, err)
		return nil, false
	}
	a.session = s
	return s, true
}

func (a *apiChat) replyFormat(*http.Request) replyFormat {
	if a.asJSON {
		return a.h.relayResponseJSON()
	}
	return a.h.relaySSE()
}
