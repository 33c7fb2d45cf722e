package integration

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// shutdownCaddyfile: admin port, HTTP port, HTTPS port, listen port,
// webhook, database file.
const shutdownCaddyfile = `
{
	admin localhost:%d
	skip_install_trust
	persist_config off
	http_port %d
	https_port %d
	grace_period 1s
}

http://127.0.0.1:%d {
	chat_proxy {
		n8n_webhook %s
		database sqlite:%s
		jwt_secret shutdown-test-visitor-jwt-secret-0123456789
		session_secret shutdown-test-n8n-session-secret-0123456789
	}
}
`

// Stopping Caddy for real — `caddy stop` (a POST to the admin /stop) or
// SIGTERM from a service manager — while a reply is streaming: the test
// binary runs as a Caddy process (see TestMain) with grace_period 1s, and
// its n8n stand-in streams two chunks and then stalls. Nothing is
// simulated: Caddy's own exit path shuts the server down, the handler's
// RegisterOnShutdown hook sees caddy.Exiting, and shortly before the grace
// period ends the stream gets a server_shutdown error event and [DONE] —
// a clean end of the response, not a cut connection — and the partial
// reply is in the database after the process has exited (status 0).
func TestShutdownEndsStreams(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Caddy process")
	}
	for _, how := range []string{"caddy stop", "SIGTERM"} {
		t.Run(how, func(t *testing.T) {
			n8n := newSlowN8n(t, "Hello", " world")
			dir := t.TempDir()
			ports := freePorts(t, 3)
			admin, httpPort, httpsPort := ports[0], ports[1], ports[2]
			dbPath := filepath.Join(dir, "chat.db")
			cfg := filepath.Join(dir, "Caddyfile")
			if err := writeFile(cfg, fmt.Sprintf(shutdownCaddyfile, admin, httpPort, httpsPort, httpPort, n8n.URL(), dbPath)); err != nil {
				t.Fatal(err)
			}
			child := startCaddy(t, dir, cfg)

			deadline := time.Now().Add(10 * time.Second)
			for {
				resp, err := http.Get(portURL(httpPort, "/health"))
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode == 200 {
						break
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("Caddy did not come up: %v\n%s", err, child.output())
				}
				time.Sleep(20 * time.Millisecond)
			}
			sessionID, token := createSession(t, portURL(httpPort, "/api/v1/session/create"))
			stream := openStream(t, portURL(httpPort, "/api/v1/chat/message"), token, "Tell me a long story")
			stream.item("Hello")
			n8n.next(t)
			stream.item(" world") // n8n now stalls

			start := time.Now()
			switch how {
			case "caddy stop":
				// What `caddy stop` does. The answer may never come: the
				// process exits.
				go func() {
					resp, err := http.Post(fmt.Sprintf("http://localhost:%d/stop", admin), "", nil)
					if err == nil {
						resp.Body.Close()
					}
				}()
			case "SIGTERM":
				if err := child.cmd.Process.Signal(syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
			}
			ev := stream.next()
			if ev.JSON.Type != "error" || ev.JSON.Error != handler.CodeServerShutdown || ev.JSON.Message == "" {
				t.Fatalf("event %q, want a server_shutdown error\n%s", ev.Data, child.output())
			}
			stream.end()
			// The shutdown hook ends it a tenth of the grace period early, so
			// the server's shutdown can complete in time; Cleanup would only
			// end it after the grace period.
			if d := time.Since(start); d < 500*time.Millisecond || d >= time.Second {
				t.Errorf("the stream ended %v after the stop; want shortly before the 1s grace period ends", d)
			}
			select {
			case <-n8n.canceled:
			case <-time.After(5 * time.Second):
				t.Error("the request to n8n was not cancelled")
			}
			if err := child.wait(10 * time.Second); err != nil {
				t.Fatalf("Caddy: %v\n%s", err, child.output())
			}
			if out := child.output(); !strings.Contains(out, "Caddy is exiting: running chat streams end before the grace period does") {
				t.Errorf("the shutdown hook did not run:\n%s", out)
			}

			st, err := sessions.OpenSQLite(dbPath)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			p, err := st.ListMessages(context.Background(), sessionID, "", 50)
			if err != nil {
				t.Fatal(err)
			}
			if len(p.Messages) != 2 || p.Messages[0].Content != "Tell me a long story" ||
				p.Messages[1].Content != "Hello world" || p.Messages[1].Status != sessions.StatusPartial {
				t.Fatalf("stored after the shutdown: %+v\n%s", p.Messages, child.output())
			}
		})
	}
}

// caddyProcess is the test binary running as Caddy.
type caddyProcess struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	out    bytes.Buffer
	exited chan struct{} // closed when the process has exited
	err    error         // its exit error, once exited
}

func (c *caddyProcess) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}

func (c *caddyProcess) output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.String()
}

// wait waits for the process to exit and returns its error (nil: status 0).
func (c *caddyProcess) wait(timeout time.Duration) error {
	select {
	case <-c.exited:
		return c.err
	case <-time.After(timeout):
		return fmt.Errorf("still running after %v", timeout)
	}
}

// startCaddy runs the test binary as `caddy run` on cfg, with its home and
// data directories in dir; it is killed at the end of the test if it is
// still running.
func startCaddy(t *testing.T, dir, cfg string) *caddyProcess {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := &caddyProcess{exited: make(chan struct{})}
	c.cmd = exec.Command(exe)
	c.cmd.Env = append(os.Environ(), childConfigEnv+"="+cfg, "HOME="+dir,
		"XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	c.cmd.Stdout, c.cmd.Stderr = c, c
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-c.exited:
		default:
			_ = c.cmd.Process.Kill()
			<-c.exited
		}
	})
	return c
}
