package handler

import (
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/streaming"
)

// maxLoggedReply bounds the reply text in a log line (log_content on): a
// long reply must not make a log line of megabytes.
const maxLoggedReply = 16 << 10

// exchangeLog follows one chat exchange (a visitor's message and n8n's
// reply) from the moment its session is known, and ends it with its
// metrics and exactly one log line. It belongs to the request's goroutine.
type exchangeLog struct {
	route     string // metrics.RouteMessage, RouteStream or RouteWidget
	start     time.Time
	rec       caddyhttp.ResponseRecorder // what status was written
	sessionID string
	site      string
	messageID string

	// outcome is set where a decision settles it (bot filter, honeypot,
	// internal error); otherwise end derives it.
	outcome string

	called         bool // n8n was called
	upstreamStart  time.Time
	upstreamEnd    time.Time
	ttfb           time.Duration
	upstreamStatus int
	upstreamErr    *n8n.Error
	replyStatus    string // the stored reply's status
	streamed       bool
	clientGone     bool
	chunks, bytes  int

	bot *guard.Verdict // when the bot filter refused or caught it

	message, reply string // only with log_content
}

// beginExchange starts following a chat exchange; the returned writer
// (to be used from then on) records the status written.
func (h *Handler) beginExchange(w http.ResponseWriter, route, sessionID, site string) (*exchangeLog, http.ResponseWriter) {
	rec := caddyhttp.NewResponseRecorder(w, nil, nil)
	return &exchangeLog{route: route, start: time.Now(), rec: rec, sessionID: sessionID, site: site}, rec
}

// track binds a validated message to its exchange.
func (h *Handler) track(ex *exchange, x *exchangeLog) {
	ex.xl = x
	x.messageID = ex.assistantID
	if h.cfg.LogContent {
		x.message = ex.message
	}
}

// noteSent records the answer of Upstream.Send, which returns with the
// first reply text.
func (h *Handler) noteSent(ex *exchange, start time.Time, reply *n8n.Reply, err error) {
	x := ex.xl
	if x == nil {
		return
	}
	x.called, x.upstreamStart = true, start
	if err == nil {
		x.ttfb = time.Since(start)
		x.upstreamStatus = reply.StatusCode()
		h.cfg.Metrics.UpstreamTTFB(x.ttfb)
	}
}

// noteReplyEnded records the end of n8n's reply, as it is stored.
func (h *Handler) noteReplyEnded(ex *exchange, text, status string) {
	x := ex.xl
	if x == nil {
		return
	}
	x.upstreamEnd = time.Now()
	x.replyStatus = status
	if !x.streamed && status == sessions.StatusComplete {
		x.bytes = len(text) // answered whole, as JSON
	}
	if h.cfg.LogContent {
		x.reply = text
	}
}

// endExchange counts the exchange and writes its log line: Info when it
// went well or was refused, Warn when n8n or this server failed. Message
// and reply text appear only with log_content on.
func (h *Handler) endExchange(r *http.Request, x *exchangeLog) {
	outcome := x.result(h.cfg.Drain != nil && h.cfg.Drain.Started())
	m := h.cfg.Metrics
	m.Message(x.route, outcome, x.site)
	if !x.streamed && x.bytes > 0 {
		m.BytesRelayed(x.bytes)
	}
	ue := x.upstreamErr
	if x.called && (ue == nil || ue.Reason != n8n.ReasonCircuitOpen && ue.Reason != n8n.ReasonShutdown) {
		end := x.upstreamEnd
		if end.IsZero() {
			end = time.Now()
		}
		m.UpstreamDuration(end.Sub(x.upstreamStart))
	}
	if ue != nil && ue.Code != n8n.CodeCanceled {
		m.UpstreamError(string(ue.Reason))
	}

	level := zapcore.InfoLevel
	if outcome == metrics.OutcomeUpstreamError || outcome == metrics.OutcomeError {
		level = zapcore.WarnLevel
	}
	ce := h.cfg.Logger.Check(level, "chat exchange")
	if ce == nil {
		return
	}
	status := x.rec.Status()
	if status == 0 && outcome == metrics.OutcomeClientGone {
		status = 499 // nothing was written: the client closed the request
	}
	fields := make([]zap.Field, 0, 24)
	fields = append(fields,
		zap.String("session_id", x.sessionID),
		zap.String("site", x.site),
		zap.String("route", x.route),
		zap.Int("status", status),
		zap.String("outcome", outcome),
		zap.Duration("ttfb", x.ttfb),
		zap.Duration("duration", time.Since(x.start)),
		zap.Int("chunks", x.chunks),
		zap.Int("bytes", x.bytes),
		zap.Int("upstream_status", x.upstreamStatus),
	)
	if x.messageID != "" {
		fields = append(fields, zap.String("message_id", x.messageID))
	}
	if id, ok := requestID(r); ok {
		fields = append(fields, zap.String("request_id", id))
	}
	if ue != nil {
		fields = append(fields, zap.String("upstream_code", ue.Code), zap.String("upstream_reason", string(ue.Reason)),
			zap.Bool("mid_stream", ue.MidStream))
		if ue.Detail != "" {
			fields = append(fields, zap.String("upstream_detail", ue.Detail))
		}
	}
	if x.bot != nil {
		reasons := make([]string, len(x.bot.Reasons))
		for i, reason := range x.bot.Reasons {
			reasons[i] = string(reason)
		}
		fields = append(fields, zap.Int("bot_score", x.bot.Score), zap.Strings("bot_reasons", reasons),
			zap.String("client_ip", clientIP(r)))
	}
	if h.cfg.LogContent {
		fields = append(fields, zap.String("message", x.message), zap.String("reply", truncate(x.reply, maxLoggedReply)))
	}
	ce.Write(fields...)
}

// result is the exchange's outcome label; draining says Caddy is
// shutting down (a reply cut short then is the shutdown's doing).
func (x *exchangeLog) result(draining bool) string {
	if x.outcome != "" {
		return x.outcome
	}
	if x.called {
		ue := x.upstreamErr
		switch {
		case ue != nil && ue.Code != n8n.CodeCanceled:
			return metrics.OutcomeUpstreamError
		case x.clientGone || ue != nil:
			return metrics.OutcomeClientGone
		case x.replyStatus == sessions.StatusComplete:
			return metrics.OutcomeOK
		case draining:
			return metrics.OutcomeShutdown
		}
		return metrics.OutcomeUpstreamError // the reply broke off
	}
	switch s := x.rec.Status(); {
	case s == 0:
		return metrics.OutcomeClientGone
	case s == http.StatusTooManyRequests:
		return metrics.OutcomeRateLimited
	case s >= 400 && s < 500:
		return metrics.OutcomeInvalid
	}
	return metrics.OutcomeError
}

// requestID is Caddy's {http.request.uuid}, the id its access log shows
// for the request, when the request came through Caddy's server.
func requestID(r *http.Request) (string, bool) {
	repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if !ok {
		return "", false
	}
	id, ok := repl.GetString("http.request.uuid")
	return id, ok && id != ""
}

// countingWriter counts the chunks and bytes a stream hands the client,
// and notices when the client is gone.
type countingWriter struct {
	streaming.Writer
	x *exchangeLog
	m *metrics.Recorder
}

func (c countingWriter) Start() error {
	err := c.Writer.Start()
	if err != nil {
		c.x.clientGone = true
	}
	return err
}

func (c countingWriter) Item(content string) error {
	if err := c.Writer.Item(content); err != nil {
		c.x.clientGone = true
		return err
	}
	c.x.chunks++
	c.x.bytes += len(content)
	c.m.ChunkRelayed(len(content))
	return nil
}
