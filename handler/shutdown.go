package handler

import (
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// How streams end when Caddy exits (`caddy stop`, SIGTERM, SIGINT).
//
// The HTTP app's Stop shuts every server down with the grace_period as
// deadline and, when the process is exiting, waits for that; only then is
// the config's context cancelled and Cleanup called, and soon after the
// process exits, cutting whatever is still open. So the handler hooks the
// start of the shutdown instead: at provision time HookServer registers a
// callback with its caddyhttp.Server (RegisterOnShutdown, run when
// http.Server.Shutdown begins). When Caddy is exiting (caddy.Exiting) and
// the grace period is finite, the callback schedules the drain shortly
// before the grace period ends, so that streams still running then get an
// error event and [DONE] and store their partial reply while the server
// still waits for them. A stream that ends by itself within the grace
// period is untouched. With the default eternal grace period Caddy waits
// for every stream, so nothing is cut. On a reload (not exiting) the
// callback does nothing: old streams run to their end on the old server.
//
// Finish, which the module's Cleanup calls when exiting, starts the drain
// (if it has not started) and waits a little for the streams to store
// their replies, before the store is released and the process exits.

// drainWait bounds how long Finish holds an exiting process for streams
// to store their replies.
const drainWait = 5 * time.Second

// DrainMargin is how long before the end of a grace period the drain
// starts: a tenth of it, at most 2s.
func DrainMargin(grace time.Duration) time.Duration {
	return min(grace/10, 2*time.Second)
}

// HookServer hooks the drain to the shutdown of the server the handler is
// being provisioned in, if any (there is none in unit tests). logger
// receives the drain's messages.
func (d *Drain) HookServer(ctx caddy.Context, logger *zap.Logger) {
	d.logger = logger
	srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok || srv == nil {
		return
	}
	grace := httpGracePeriod(ctx)
	srv.RegisterOnShutdown(func() { d.ServerShutdown(grace) })
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

func (d *Drain) exiting() bool {
	if d.Exiting != nil {
		return d.Exiting()
	}
	return caddy.Exiting()
}

// ServerShutdown runs when the server begins to shut down, with the HTTP
// app's grace period: when the process is exiting and the grace period is
// finite, the drain starts DrainMargin before it ends.
func (d *Drain) ServerShutdown(grace time.Duration) {
	if !d.exiting() || grace <= 0 {
		return
	}
	delay := grace - DrainMargin(grace)
	if n := d.Active(); n > 0 {
		d.logger.Info("Caddy is exiting: running chat streams end before the grace period does",
			zap.Int("streams", n), zap.Duration("in", delay))
	}
	time.AfterFunc(delay, d.Start)
}

// Finish is Cleanup's part when the process is exiting: streams still
// running end now and have a moment to store their replies. It does
// nothing on a reload, and on a nil Drain.
func (d *Drain) Finish() {
	if d == nil || !d.exiting() {
		return
	}
	d.Start()
	if !d.Wait(drainWait) {
		d.logger.Warn("Caddy is exiting with chat streams still running", zap.Int("streams", d.Active()))
	}
}
