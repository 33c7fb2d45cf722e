package guard

import (
	"strings"
	"testing"
)

// The per-message checks of the bot filter on their own (BenchmarkBotScore
// has them all together): the user-agent check on browsers and a crawler,
// the crawler words alone, and the link count on a short message and a
// long (4000 character) one.
func BenchmarkBotSignals(b *testing.B) {
	msg := "Hi, I ordered the blue jacket last week (order #4417) and the tracking page " +
		"https://shop.example.com/orders/4417?tab=tracking still says pending. Can you check?"
	chromeLower := strings.ToLower(chromeUA)
	long := strings.Repeat("Lorem ipsum dolor sit amet, consectetur adipiscing elit. www.shop.example ", 60)[:4000]
	for _, bc := range []struct {
		name string
		f    func() bool
	}{
		{"ua/chrome", func() bool { return !IsAutomationUserAgent(chromeUA) }},
		{"ua/iphone", func() bool { return !IsAutomationUserAgent(iphoneUA) }},
		{"ua/googlebot", func() bool {
			return IsAutomationUserAgent("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)")
		}},
		{"ua/chrome-crawler-words-only", func() bool { return !isCrawler(chromeLower) }},
		{"links/short", func() bool { return CountLinks(msg) == 1 }},
		{"links/long", func() bool { return CountLinks(long) == maxLinksCounted }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			if !bc.f() {
				b.Fatal("unexpected result")
			}
			b.ReportAllocs()
			for b.Loop() {
				bc.f()
			}
		})
	}
}
