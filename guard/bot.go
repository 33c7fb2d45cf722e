package guard

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Reason names a bot or spam signal. The set is small and fixed, so that
// reasons can label metrics and logs.
type Reason string

// The signals the scorer knows.
const (
	ReasonHoneypot            Reason = "honeypot"              // the hidden `website` field was filled in
	ReasonAutomationUA        Reason = "automation_user_agent" // curl, python-requests, headless browsers, crawlers…
	ReasonMissingUA           Reason = "missing_user_agent"    // no User-Agent at all
	ReasonFastFirstMessage    Reason = "fast_first_message"    // first message sooner than a human could type it
	ReasonRepeatedMessage     Reason = "repeated_message"      // the same text again and again in a session
	ReasonLinkFlood           Reason = "link_flood"            // many URLs in one message
	ReasonFingerprintMismatch Reason = "fingerprint_mismatch"  // the token was issued to other browser traits
)

// Points of each signal. The fast-first-message and fingerprint signals
// only support others: on their own they never refuse a request, whatever
// the threshold, because real visitors trigger them (a quick "hi" after
// the widget opens; a browser update, a language change).
const (
	pointsAutomationUA = 30
	pointsMissingUA    = 30
	pointsFastFirst    = 20
	pointsFingerprint  = 20
	maxScore           = 100
)

// repeatPoints: a text seen n times in the window; twice is human.
func repeatPoints(n int) int {
	if n <= 2 {
		return 0
	}
	return min(10*(n-2), 60)
}

// linkPoints: one link is ordinary ("is this the right page?").
func linkPoints(n int) int {
	switch {
	case n <= 1:
		return 0
	case n <= 3:
		return 10
	case n <= 5:
		return 25
	case n <= 9:
		return 40
	}
	return 60
}

// Defaults of BotConfig.
const (
	DefaultBotThreshold         = 50
	DefaultMinFirstMessageDelay = time.Second
	DefaultRepeatWindow         = 5 * time.Minute
)

// RepeatCounter counts how often a session sent the same text within a
// window. *Limiter implements it with Redis (so repeats are seen across
// instances) and an in-process fallback.
type RepeatCounter interface {
	CountRepeat(ctx context.Context, sessionID, text string, window time.Duration) (int, error)
}

// BotConfig configures a BotScorer.
type BotConfig struct {
	// Threshold: a request whose score (0..100) is above it is refused.
	// Default 50, which no single signal reaches except a flood of 10 or
	// more links or a text repeated 8 times, so ordinary visitors and
	// API clients with an unusual user agent pass.
	Threshold int

	// MinFirstMessageDelay is the shortest time between creating a
	// session and its first message that looks human. Default 1s.
	MinFirstMessageDelay time.Duration

	// RepeatWindow is how long a sent text is remembered per session for
	// the repeated-message signal. Default 5m.
	RepeatWindow time.Duration

	// Repeats counts repeated messages; pass the Limiter to share the
	// counts through Redis. Nil counts in this process.
	Repeats RepeatCounter

	// Now is the clock, for tests.
	Now func() time.Time
}

// BotSignals are what the route knows about one chat message.
type BotSignals struct {
	// Honeypot is the body's `website` field, which the widget keeps
	// hidden and empty; anything in it means a form-filling bot.
	Honeypot string
	// UserAgent is the request's User-Agent header.
	UserAgent string
	// Message is the normalized message (see NormalizeMessage).
	Message string
	// SessionID names the session for the repeated-message signal; empty
	// skips that signal.
	SessionID string
	// SessionCreated is when the session was created; zero skips the
	// fast-first-message signal (for example when the route just created
	// the session itself, as for a new @n8n/chat sessionId).
	SessionCreated time.Time
	// FirstMessage says no message was sent in the session before.
	FirstMessage bool
	// TokenFingerprint is the fingerprint claim of the session token and
	// RequestFingerprint the current request's (see Fingerprint); either
	// empty skips the signal.
	TokenFingerprint   string
	RequestFingerprint string
}

// Action is what the route should do with a scored message.
type Action int

const (
	// ActionAllow: go on.
	ActionAllow Action = iota
	// ActionReject: answer 403 {"error":"rejected"}; n8n is not called.
	ActionReject
	// ActionHoneypot: answer a normal-looking reply without calling n8n,
	// and log it; the bot should not learn it was caught.
	ActionHoneypot
)

func (a Action) String() string {
	switch a {
	case ActionAllow:
		return "allow"
	case ActionReject:
		return "reject"
	case ActionHoneypot:
		return "honeypot"
	}
	return "action(" + strconv.Itoa(int(a)) + ")"
}

// Verdict is the scorer's answer.
type Verdict struct {
	Action  Action
	Score   int      // 0..100
	Reasons []Reason // the signals that added points, in a fixed order
}

// BotScorer scores chat messages for bot and spam signals. It is safe for
// concurrent use.
type BotScorer struct {
	threshold int
	minDelay  time.Duration
	window    time.Duration
	repeats   RepeatCounter
	now       func() time.Time
}

// MinFirstMessageDelay is the configured shortest human delay between
// creating a session and its first message.
func (b *BotScorer) MinFirstMessageDelay() time.Duration { return b.minDelay }

// NewBotScorer checks the configuration and builds a scorer.
func NewBotScorer(cfg BotConfig) (*BotScorer, error) {
	b := &BotScorer{
		threshold: cfg.Threshold,
		minDelay:  cfg.MinFirstMessageDelay,
		window:    cfg.RepeatWindow,
		repeats:   cfg.Repeats,
		now:       cfg.Now,
	}
	if b.threshold == 0 {
		b.threshold = DefaultBotThreshold
	}
	if b.threshold < 1 || b.threshold >= maxScore {
		return nil, fmt.Errorf("bot detection threshold must be from 1 to %d", maxScore-1)
	}
	if b.minDelay == 0 {
		b.minDelay = DefaultMinFirstMessageDelay
	}
	if b.window == 0 {
		b.window = DefaultRepeatWindow
	}
	if b.minDelay < 0 || b.window < time.Millisecond {
		return nil, errors.New("bot detection: delays must be positive")
	}
	if b.now == nil {
		b.now = time.Now
	}
	if b.repeats == nil {
		b.repeats = &memRepeats{mem: newMemStore(), now: b.now}
	}
	return b, nil
}

// ParseBotDetection parses the Caddyfile value of bot_detection: "off", or
// a threshold from 1 to 99.
func ParseBotDetection(s string) (enabled bool, threshold int, err error) {
	if s == "off" {
		return false, 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n >= maxScore {
		return false, 0, fmt.Errorf("got %q, want off or a threshold from 1 to %d", s, maxScore-1)
	}
	return true, n, nil
}

// Score scores one message. The honeypot decides alone; otherwise the
// points of all signals add up (at most 100) and the message is refused
// when the sum is above the threshold and at least one signal other than
// the supporting ones (fast first message, fingerprint mismatch) is
// present. Recording the message for the repeated-message signal is part
// of scoring; a failure there only skips that signal.
func (b *BotScorer) Score(ctx context.Context, s BotSignals) Verdict {
	if s.Honeypot != "" {
		return Verdict{Action: ActionHoneypot, Score: maxScore, Reasons: []Reason{ReasonHoneypot}}
	}
	var v Verdict
	primary := 0
	add := func(r Reason, points int, supporting bool) {
		if points <= 0 {
			return
		}
		v.Score += points
		v.Reasons = append(v.Reasons, r)
		if !supporting {
			primary += points
		}
	}

	ua := strings.TrimSpace(s.UserAgent)
	switch {
	case ua == "":
		add(ReasonMissingUA, pointsMissingUA, false)
	case IsAutomationUserAgent(ua):
		add(ReasonAutomationUA, pointsAutomationUA, false)
	}

	if s.FirstMessage && !s.SessionCreated.IsZero() {
		if age := b.now().Sub(s.SessionCreated); age >= 0 && age < b.minDelay {
			add(ReasonFastFirstMessage, pointsFastFirst, true)
		}
	}

	if s.SessionID != "" && s.Message != "" {
		if n, err := b.repeats.CountRepeat(ctx, s.SessionID, repeatText(s.Message), b.window); err == nil {
			add(ReasonRepeatedMessage, repeatPoints(n), false)
		}
	}

	add(ReasonLinkFlood, linkPoints(CountLinks(s.Message)), false)

	if s.TokenFingerprint != "" && s.RequestFingerprint != "" && s.TokenFingerprint != s.RequestFingerprint {
		add(ReasonFingerprintMismatch, pointsFingerprint, true)
	}

	v.Score = min(v.Score, maxScore)
	if v.Score > b.threshold && primary > 0 {
		v.Action = ActionReject
	}
	return v
}

// repeatText is the form of a message compared for repeats: case and runs
// of white space do not make a text new.
func repeatText(s string) string {
	return strings.Join(strings.Fields(strings.ToLower(s)), " ")
}

// maxLinksCounted bounds the work of CountLinks; linkPoints saturates
// before it.
const maxLinksCounted = 16

// CountLinks counts the URLs in a message (http(s):// and www. forms), up
// to 16. It finds what the regexp
// (?i)(?:\bhttps?://|\bwww\.)[^\s<>"'()]+ finds, hand-written because
// the regexp cost microseconds per message (bot_equiv_test.go proves them
// equal).
func CountLinks(s string) int {
	n := 0
	for i := 0; i < len(s) && n < maxLinksCounted; i++ {
		switch s[i] {
		case 'h', 'H', 'w', 'W':
		default:
			continue
		}
		if i > 0 && isWordByte(s[i-1]) {
			continue // no \b: inside a word
		}
		end := linkPrefixEnd(s, i)
		if end < 0 || end == len(s) || isLinkStop(s[end]) {
			continue // no scheme or www., or nothing after it
		}
		for end < len(s) && !isLinkStop(s[end]) {
			end++
		}
		n++
		i = end // s[end] is a stop byte: no link starts there
	}
	return n
}

// linkPrefixEnd returns the end of "http://", "https://" or "www." at
// s[i:] in any case, or -1. (?i) also folds 's' with 'ſ' (U+017F).
func linkPrefixEnd(s string, i int) int {
	if hasFoldPrefix(s[i:], "www.") {
		return i + 4
	}
	if !hasFoldPrefix(s[i:], "http") {
		return -1
	}
	j := i + 4
	switch {
	case j < len(s) && (s[j] == 's' || s[j] == 'S'):
		j++
	case strings.HasPrefix(s[j:], "ſ"):
		j += len("ſ")
	}
	if strings.HasPrefix(s[j:], "://") {
		return j + 3
	}
	return -1
}

// hasFoldPrefix reports whether s starts with the lower-case ASCII
// prefix, ignoring ASCII case (prefix holds no s or k, whose folds are
// not ASCII).
func hasFoldPrefix(s, prefix string) bool {
	if len(s) < len(prefix) {
		return false
	}
	for i := 0; i < len(prefix); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != prefix[i] {
			return false
		}
	}
	return true
}

// isWordByte reports an ASCII word character, which is what \b tests.
func isWordByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_'
}

// isLinkStop reports the bytes that end a link: \s (ASCII white space
// but \v) and <>"'().
func isLinkStop(c byte) bool {
	switch c {
	case '\t', '\n', '\f', '\r', ' ', '<', '>', '"', '\'', '(', ')':
		return true
	}
	return false
}

// automationMarkers are lower-case substrings of user agents of HTTP
// libraries, command-line tools and browser automation. Real browsers
// driven by automation with their normal user agent are not caught here;
// the other signals are for them.
var automationMarkers = []string{
	"curl/", "wget/", "httpie/", "python-requests", "python-urllib", "python-httpx", "aiohttp",
	"go-http-client", "okhttp", "java/", "apache-httpclient", "jakarta commons-httpclient",
	"libwww-perl", "lwp::simple", "node-fetch", "undici", "axios/", "got (", "guzzlehttp",
	"ruby", "php/", "powershell", "postmanruntime", "insomnia", "scrapy", "mechanize",
	"headlesschrome", "headless", "playwright", "puppeteer", "phantomjs", "slimerjs",
	"selenium", "webdriver", "electron-fetch",
}

// crawlerWords are the crawler words isCrawler looks for; product says
// the word may also end a product name before its version
// ("Googlebot/2.1"). (?i) in the regexp they replace folds 's' with 'ſ'
// (U+017F), which strings.ToLower keeps, hence the ſ forms.
var crawlerWords = [...]struct {
	word    string
	product bool
}{
	{"bot", true}, {"crawler", true}, {"spider", true}, {"scraper", false},
	{"ſpider", true}, {"ſcraper", false},
}

// isCrawler reports whether l, a user agent without upper-case ASCII,
// names "bot", "crawler", "spider" or "scraper" as a word or as the end of
// a product name before its version, but not inside phone model names
// such as "CUBOT". It matches exactly what the regexp
// (?i)(?:^|[^a-z])(?:bot|crawler|spider|scraper)(?:[^a-z]|$)|[a-z](?:bot|crawler|spider)/
// matches (bot_equiv_test.go proves it), at a fraction of its cost.
func isCrawler(l string) bool {
	for _, w := range crawlerWords {
		for i := 0; ; {
			j := strings.Index(l[i:], w.word)
			if j < 0 {
				break
			}
			start, end := i+j, i+j+len(w.word)
			if !letterAt(l, end) && (!letterBefore(l, start) || w.product && end < len(l) && l[end] == '/') {
				return true
			}
			i = start + 1
		}
	}
	return false
}

// letterAt and letterBefore report whether the character at (before) i is
// one that (?i)[a-z] matches: an ASCII letter, 'ſ' (U+017F) or the Kelvin
// sign (U+212A).
func letterAt(l string, i int) bool {
	if i >= len(l) {
		return false
	}
	c := l[i]
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' ||
		strings.HasPrefix(l[i:], "ſ") || strings.HasPrefix(l[i:], "\u212a")
}

func letterBefore(l string, i int) bool {
	if i == 0 {
		return false
	}
	c := l[i-1]
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' ||
		strings.HasSuffix(l[:i], "ſ") || strings.HasSuffix(l[:i], "\u212a")
}

// IsAutomationUserAgent reports whether a User-Agent names an HTTP
// library, a command-line tool, a headless or automated browser, or a
// crawler.
func IsAutomationUserAgent(ua string) bool {
	l := strings.ToLower(ua)
	for _, m := range automationMarkers {
		if strings.Contains(l, m) {
			return true
		}
	}
	return isCrawler(l)
}

// memRepeats counts repeats in process, for a scorer without a Limiter.
type memRepeats struct {
	mem *memStore
	now func() time.Time
}

func (m *memRepeats) CountRepeat(_ context.Context, sessionID, text string, window time.Duration) (int, error) {
	h := sha256.Sum256([]byte(sessionID + "\x00" + text))
	return m.mem.count(hex.EncodeToString(h[:16]), epochSeconds(m.now()), window), nil
}
