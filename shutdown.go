package chatproxy

import (
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/handler"
)

// How streams end when Caddy exits (`caddy stop`, SIGTERM, SIGINT).
//
// The HTTP app's Stop shuts every server down with the grace_period as
// deadline and, when the process is exiting, waits for that; only then is
// the config's context cancelled and Cleanup called, and soon after the
// process exits, cutting whatever is still open. So the handler hooks the
// start of the shutdown instead: in Provision it registers a callback with
// its caddyhttp.Server (RegisterOnShutdown, run when http.Server.Shutdown
// begins). When Caddy is exiting (caddy.Exiting) and the grace period is
// finite, the callback schedules the drain shortly before the grace period
// ends, so that streams still running then get an error event and [DONE]
// and store their partial reply while the server still waits for them. A
// stream that ends by itself within the grace period is untouched. With
// the default eternal grace period Caddy waits for every stream, so nothing
// is cut. On a reload (not exiting) the callback does nothing: old streams
// run to their end on the old server.
//
// Cleanup, when exiting, starts the drain (if it has not started) and
// waits a little for the streams to store their replies, before it
// releases the store and before the process exits.

// processExiting reports whether the process is exiting rather than
// reloading; tests replace it.
var processExiting = caddy.Exiting

// drainWait bounds how long Cleanup holds an exiting process for streams
// to store their replies.
const drainWait = 5 * time.Second

// drainMargin is how long before the end of a grace period the drain
// starts: a tenth of it, at most 2s.
func drainMargin(grace time.Duration) time.Duration {
	return min(grace/10, 2*time.Second)
}

// setupDrain creates the handler's drain and hooks it to the shutdown of
// the server the handler is provisioned in, if any (not in unit tests).
func (cp *ChatProxy) setupDrain(ctx caddy.Context) {
	cp.drain = handler.NewDrain()
	srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok || srv == nil {
		return
	}
	grace := httpGracePeriod(ctx)
	srv.RegisterOnShutdown(func() { cp.serverShutdown(grace) })
}

// httpGracePeriod is the HTTP app's grace_period (0: eternal). Caddy
// registers an app before provisioning it, so its configured fields are
// readable while its handlers are provisioned.
func httpGracePeriod(ctx caddy.Context) time.Duration {
	app, err := ctx.AppIfConfigured("http")
	if err != nil {
		return 0
	}
	if a, ok := app.(*caddyhttp.App); ok {
		return time.Duration(a.GracePeriod)
	}
	return 0
}

// serverShutdown runs when the server begins to shut down.
func (cp *ChatProxy) serverShutdown(grace time.Duration) {
	if !processExiting() || grace <= 0 {
		return
	}
	d := cp.drain
	delay := grace - drainMargin(grace)
	if n := d.Active(); n > 0 {
		cp.logger.Info("Caddy is exiting: running chat streams end before the grace period does",
			zap.Int("streams", n), zap.Duration("in", delay))
	}
	time.AfterFunc(delay, d.Start)
}

// finishDrain is Cleanup's part when the process is exiting: streams
// still running end now and have a moment to store their replies.
func (cp *ChatProxy) finishDrain() {
	if cp.drain == nil || !processExiting() {
		return
	}
	cp.drain.Start()
	if !cp.drain.Wait(drainWait) {
		cp.logger.Warn("Caddy is exiting with chat streams still running", zap.Int("streams", cp.drain.Active()))
	}
}
