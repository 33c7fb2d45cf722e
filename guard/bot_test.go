package guard

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	chromeUA  = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
	firefoxUA = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
	iphoneUA  = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1"
	cubotUA   = "Mozilla/5.0 (Linux; Android 10; CUBOT X30) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36"
)

func newScorer(t *testing.T, cfg BotConfig) (*BotScorer, *fakeClock) {
	t.Helper()
	clock := newFakeClock()
	if cfg.Now == nil {
		cfg.Now = clock.Now
	}
	b, err := NewBotScorer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b, clock
}

// Ordinary visitors pass at the default threshold.
func TestBotMustPassCorpus(t *testing.T) {
	corpus := []string{
		"hi", "hello", "Can I update my order?", "select a size", "DROP me a line",
		"Здравствуйте, где мой заказ?", "你好，我想退货", "مرحبا، هل يمكنني تغيير عنواني؟",
		"👍", "🙂🙂🙂", "ok 👌🏽",
		"<script>alert('x')</script> why does this show on my page?",
		"SELECT * FROM orders WHERE id = 1; -- is my query right?",
		"func main() {\n\tfmt.Println(\"hi\")\n}\n{ \"a\": [1, 2] }",
		"is this the right page? https://shop.example/products/42?size=m",
		"a", "?", "yes", "no", "aaaa", "!!!", "FREE SHIPPING?", "www.shop.example",
	}
	for _, ua := range []string{chromeUA, firefoxUA, iphoneUA, cubotUA} {
		b, clock := newScorer(t, BotConfig{})
		for i, msg := range corpus {
			created := clock.Now()
			clock.Advance(4 * time.Second) // a human reads and types
			v := b.Score(context.Background(), BotSignals{
				UserAgent: ua, Message: msg, SessionID: fmt.Sprint("sess-", i),
				SessionCreated: created, FirstMessage: true,
				TokenFingerprint: "fp", RequestFingerprint: "fp",
			})
			if v.Action != ActionAllow || v.Score != 0 {
				t.Errorf("%.20s: %q scored %+v; want allowed with 0", ua, msg, v)
			}
		}
	}
	// The whole corpus as one conversation, sent quickly, passes too.
	b, clock := newScorer(t, BotConfig{})
	created := clock.Now()
	for i, msg := range append(corpus, "hi", "hi", "thanks", "thanks") {
		clock.Advance(1500 * time.Millisecond)
		v := b.Score(context.Background(), BotSignals{UserAgent: chromeUA, Message: msg, SessionID: "one",
			SessionCreated: created, FirstMessage: i == 0})
		if v.Action != ActionAllow {
			t.Errorf("conversation message %d %q: %+v", i, msg, v)
		}
	}
}

// Bots are refused at the default threshold.
func TestBotCorpusRefused(t *testing.T) {
	links := func(n int) string {
		var s []string
		for i := range n {
			s = append(s, fmt.Sprintf("https://spam%d.example/buy", i))
		}
		return "great deals " + strings.Join(s, " ")
	}
	type msg struct {
		ua, text string
		first    bool
		after    time.Duration // since session creation
	}
	cases := map[string]struct {
		msgs []msg
		want []Reason // of the last message
	}{
		"curl, instant first message, link flood": {
			msgs: []msg{{"curl/8.5.0", links(4), true, 50 * time.Millisecond}},
			want: []Reason{ReasonAutomationUA, ReasonFastFirstMessage, ReasonLinkFlood},
		},
		"same message 5 times from python-requests": {
			msgs: slices.Repeat([]msg{{"python-requests/2.32.3", "Buy cheap followers now", false, time.Minute}}, 5),
			want: []Reason{ReasonAutomationUA, ReasonRepeatedMessage},
		},
		"10 links from a browser": {
			msgs: []msg{{chromeUA, links(10), false, time.Minute}},
			want: []Reason{ReasonLinkFlood},
		},
		"no user agent, instant, 3 links": {
			msgs: []msg{{"", links(3), true, 10 * time.Millisecond}},
			want: []Reason{ReasonMissingUA, ReasonFastFirstMessage, ReasonLinkFlood},
		},
		"headless chrome repeating itself": {
			msgs: slices.Repeat([]msg{{"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36", "hello", false, time.Minute}}, 5),
			want: []Reason{ReasonAutomationUA, ReasonRepeatedMessage},
		},
		"a browser sending one text 8 times": {
			msgs: slices.Repeat([]msg{{chromeUA, "  CLICK   here ", false, time.Minute}}, 8),
			want: []Reason{ReasonRepeatedMessage},
		},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			b, clock := newScorer(t, BotConfig{})
			created := clock.Now()
			clock.Advance(c.msgs[0].after)
			var v Verdict
			for _, m := range c.msgs {
				v = b.Score(context.Background(), BotSignals{UserAgent: m.ua, Message: m.text, SessionID: "bot",
					SessionCreated: created, FirstMessage: m.first})
				clock.Advance(time.Second)
			}
			if v.Action != ActionReject || v.Score <= DefaultBotThreshold || !slices.Equal(v.Reasons, c.want) {
				t.Fatalf("verdict %+v; want reject with %v", v, c.want)
			}
		})
	}
}

func TestBotHoneypot(t *testing.T) {
	b, _ := newScorer(t, BotConfig{})
	v := b.Score(context.Background(), BotSignals{Honeypot: "http://spam.example", UserAgent: chromeUA, Message: "hi"})
	if v.Action != ActionHoneypot || !slices.Equal(v.Reasons, []Reason{ReasonHoneypot}) || v.Action.String() != "honeypot" {
		t.Fatalf("honeypot: %+v", v)
	}
}

// The fast-first-message and fingerprint signals add risk but never refuse
// on their own, whatever the threshold.
func TestSupportingSignalsNeverBlockAlone(t *testing.T) {
	b, clock := newScorer(t, BotConfig{Threshold: 1, MinFirstMessageDelay: 2 * time.Second})
	created := clock.Now()
	clock.Advance(1500 * time.Millisecond)
	v := b.Score(context.Background(), BotSignals{UserAgent: chromeUA, Message: "hi", SessionID: "s",
		SessionCreated: created, FirstMessage: true, TokenFingerprint: "aaa", RequestFingerprint: "bbb"})
	if v.Action != ActionAllow || v.Score != pointsFastFirst+pointsFingerprint ||
		!slices.Equal(v.Reasons, []Reason{ReasonFastFirstMessage, ReasonFingerprintMismatch}) {
		t.Fatalf("supporting signals alone: %+v", v)
	}
	// They do add to a primary signal: curl alone passes at 50, curl with a
	// fingerprint mismatch and a fast first message does not.
	d, clock := newScorer(t, BotConfig{})
	created = clock.Now()
	if v := d.Score(context.Background(), BotSignals{UserAgent: "curl/8.5.0", Message: "hello"}); v.Action != ActionAllow || v.Score != 30 {
		t.Fatalf("curl alone: %+v", v)
	}
	clock.Advance(100 * time.Millisecond)
	v = d.Score(context.Background(), BotSignals{UserAgent: "curl/8.5.0", Message: "hello", SessionCreated: created, FirstMessage: true,
		TokenFingerprint: "aaa", RequestFingerprint: "bbb"})
	if v.Action != ActionReject || v.Score != 70 {
		t.Fatalf("curl + fast + fingerprint: %+v", v)
	}
	// Not the first message, or an unknown creation time: no timing signal.
	v = d.Score(context.Background(), BotSignals{UserAgent: chromeUA, Message: "x", SessionCreated: created})
	if v.Score != 0 {
		t.Fatalf("later message: %+v", v)
	}
	v = d.Score(context.Background(), BotSignals{UserAgent: chromeUA, Message: "x", FirstMessage: true})
	if v.Score != 0 {
		t.Fatalf("unknown creation time: %+v", v)
	}
}

func TestBotRepeatWindow(t *testing.T) {
	b, clock := newScorer(t, BotConfig{RepeatWindow: time.Minute})
	score := func() int {
		return b.Score(context.Background(), BotSignals{UserAgent: chromeUA, Message: "again", SessionID: "s"}).Score
	}
	for i, want := range []int{0, 0, 10, 20} {
		if got := score(); got != want {
			t.Fatalf("repeat %d: score %d; want %d", i+1, got, want)
		}
	}
	clock.Advance(time.Minute)
	if got := score(); got != 0 {
		t.Fatalf("after the window: %d", got)
	}
}

// With a Limiter on Redis, repeats are counted across scorers (instances).
func TestBotRepeatsSharedThroughRedis(t *testing.T) {
	rdb, prefix := testRedis(t)
	var scorers []*BotScorer
	for range 2 {
		l, err := NewLimiter(LimiterConfig{Redis: rdb, Prefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		b, _ := newScorer(t, BotConfig{Repeats: l})
		scorers = append(scorers, b)
	}
	var v Verdict
	for i := range 5 {
		v = scorers[i%2].Score(context.Background(), BotSignals{UserAgent: "Go-http-client/1.1", Message: "spam spam", SessionID: "shared"})
	}
	if v.Action != ActionReject || !slices.Contains(v.Reasons, ReasonRepeatedMessage) {
		t.Fatalf("5th repeat across two instances: %+v", v)
	}
}

func TestLinkCount(t *testing.T) {
	for s, want := range map[string]int{
		"no links":                0,
		"see https://a.example/x": 1,
		"http://a.example and www.b.example and HTTPS://C": 3,
		"example.com is not counted, nor mailto:x@y":       0,
		strings.Repeat("http://x.example ", 40):            maxLinksCounted,
	} {
		if got := CountLinks(s); got != want {
			t.Errorf("CountLinks(%.40q) = %d; want %d", s, got, want)
		}
	}
}

func TestAutomationUserAgents(t *testing.T) {
	bots := []string{
		"curl/8.5.0", "Wget/1.21.4", "python-requests/2.32.3", "Python-urllib/3.12", "python-httpx/0.27",
		"Go-http-client/1.1", "Go-http-client/2.0", "okhttp/4.12.0", "Java/17.0.2", "Apache-HttpClient/4.5.14 (Java/17)",
		"node-fetch/1.0", "axios/1.7.7", "undici", "PostmanRuntime/7.42.0", "insomnia/2023.5.8", "HTTPie/3.2.2",
		"Scrapy/2.11 (+https://scrapy.org)", "libwww-perl/6.72",
		"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36",
		"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
		"Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
		"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)",
		"Mozilla/5.0 (Windows NT 10.0) Playwright/1.48", "Mozilla/5.0 Puppeteer", "Mozilla/5.0 PhantomJS/2.1.1",
		"my-crawler/1.0", "Some Spider", "bot",
	}
	for _, ua := range bots {
		if !IsAutomationUserAgent(ua) {
			t.Errorf("%q not recognized", ua)
		}
	}
	humans := []string{chromeUA, firefoxUA, iphoneUA, cubotUA,
		"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.0 Safari/605.1.15",
		"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
		"Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
		"Mozilla/5.0 (Linux; Android 13; Robotic Vacuum Phone) AppleWebKit/537.36 Chrome/120.0 Mobile Safari/537.36",
	}
	for _, ua := range humans {
		if IsAutomationUserAgent(ua) {
			t.Errorf("browser %q taken for automation", ua)
		}
	}
}

func TestBotConfig(t *testing.T) {
	for _, th := range []int{-1, 100, 1000} {
		if _, err := NewBotScorer(BotConfig{Threshold: th}); err == nil {
			t.Errorf("threshold %d accepted", th)
		}
	}
	if _, err := NewBotScorer(BotConfig{MinFirstMessageDelay: -time.Second}); err == nil {
		t.Error("negative delay accepted")
	}
	for in, want := range map[string][2]int{"off": {0, 0}, "50": {1, 50}, "1": {1, 1}, "99": {1, 99}} {
		on, th, err := ParseBotDetection(in)
		if err != nil || on != (want[0] == 1) || th != want[1] {
			t.Errorf("ParseBotDetection(%q) = %v, %d, %v", in, on, th, err)
		}
	}
	for _, in := range []string{"", "on", "0", "100", "-5", "5.5", "OFF"} {
		if _, _, err := ParseBotDetection(in); err == nil {
			t.Errorf("ParseBotDetection(%q) accepted", in)
		}
	}
}
