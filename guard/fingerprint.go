package guard

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
)

// Fingerprint hashes request traits that stay put for one browser across a
// session (user agent, accepted languages). The client IP is left out on
// purpose: mobile visitors change networks all the time. A mismatch is a
// risk signal, never a reason on its own to end a session.
func Fingerprint(r *http.Request) string {
	h := sha256.New()
	h.Write([]byte(r.Header.Get("User-Agent")))
	h.Write([]byte{0})
	h.Write([]byte(r.Header.Get("Accept-Language")))
	return hex.EncodeToString(h.Sum(nil)[:16])
}
