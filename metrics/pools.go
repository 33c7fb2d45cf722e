package metrics

import (
	"sync"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
)

// DBPool is a PostgreSQL connection pool (*pgxpool.Pool).
type DBPool interface {
	Stat() *pgxpool.Stat
}

// RedisPool is a Redis client's connection pool (*redis.Client).
type RedisPool interface {
	PoolStats() *redis.PoolStats
}

// TrackDBPool reports a database pool's statistics under the pool label
// name until every untrack returned for that name has been called: each
// handler using a shared pool tracks it when provisioned and untracks it
// when cleaned up, so the series live exactly as long as some loaded
// config uses the pool, across reloads and failed loads. The name must be
// short and must not hold the database URL (which may hold a password): a
// kind and a hash prefix, for instance. untrack may be called more than
// once.
func TrackDBPool(name string, p DBPool) (untrack func()) {
	return pools.track(pools.db, name, p)
}

// TrackRedisPool reports a Redis client's pool statistics under the pool
// label name, as TrackDBPool does.
func TrackRedisPool(name string, c RedisPool) (untrack func()) {
	return pools.track(pools.redis, name, c)
}

// poolEntry is one tracked pool: a DBPool or a RedisPool, and how many
// handlers track it.
type poolEntry struct {
	pool any
	refs int
}

func (c *poolCollector) track(m map[string]*poolEntry, name string, p any) func() {
	c.mu.Lock()
	e := m[name]
	if e == nil {
		e = &poolEntry{}
		m[name] = e
	}
	e.pool = p // the same pool while tracked: shared pools are keyed like names
	e.refs++
	c.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if e.refs--; e.refs <= 0 && m[name] == e {
				delete(m, name)
			}
		})
	}
}

// poolCollector reads the tracked pools' statistics at every scrape, so
// the values are always current and a closed pool's series disappear.
type poolCollector struct {
	mu    sync.Mutex
	db    map[string]*poolEntry // pool is a DBPool
	redis map[string]*poolEntry // pool is a RedisPool
}

func poolDesc(name, help string) *prometheus.Desc {
	return prometheus.NewDesc(prometheus.BuildFQName(namespace, subsystem, name), help, []string{"pool"}, nil)
}

var (
	dbAcquired     = poolDesc("db_pool_acquired_conns", "Database connections in use, by pool.")
	dbIdle         = poolDesc("db_pool_idle_conns", "Idle database connections, by pool.")
	dbTotal        = poolDesc("db_pool_total_conns", "Database connections open or being opened, by pool.")
	dbMax          = poolDesc("db_pool_max_conns", "The most database connections the pool opens, by pool.")
	dbEmptyAcquire = poolDesc("db_pool_empty_acquire_total", "Connection acquires that found the pool empty and had to wait or connect, by pool.")

	redisHits     = poolDesc("redis_pool_hits_total", "Redis connection requests served by an idle pooled connection, by pool.")
	redisMisses   = poolDesc("redis_pool_misses_total", "Redis connection requests that found no idle connection, by pool.")
	redisTimeouts = poolDesc("redis_pool_timeouts_total", "Redis connection requests that timed out waiting for a connection, by pool.")
	redisTotal    = poolDesc("redis_pool_total_conns", "Open Redis connections, by pool.")
	redisIdle     = poolDesc("redis_pool_idle_conns", "Idle Redis connections, by pool.")
)

// Describe implements prometheus.Collector.
func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{dbAcquired, dbIdle, dbTotal, dbMax, dbEmptyAcquire, redisHits, redisMisses, redisTimeouts, redisTotal, redisIdle} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	db := make(map[string]DBPool, len(c.db))
	for name, e := range c.db {
		db[name] = e.pool.(DBPool)
	}
	rd := make(map[string]RedisPool, len(c.redis))
	for name, e := range c.redis {
		rd[name] = e.pool.(RedisPool)
	}
	c.mu.Unlock()

	gauge := func(d *prometheus.Desc, v float64, name string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, name)
	}
	counter := func(d *prometheus.Desc, v float64, name string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, name)
	}
	for name, p := range db {
		s := p.Stat()
		gauge(dbAcquired, float64(s.AcquiredConns()), name)
		gauge(dbIdle, float64(s.IdleConns()), name)
		gauge(dbTotal, float64(s.TotalConns()), name)
		gauge(dbMax, float64(s.MaxConns()), name)
		counter(dbEmptyAcquire, float64(s.EmptyAcquireCount()), name)
	}
	for name, c := range rd {
		s := c.PoolStats()
		counter(redisHits, float64(s.Hits), name)
		counter(redisMisses, float64(s.Misses), name)
		counter(redisTimeouts, float64(s.Timeouts), name)
		gauge(redisTotal, float64(s.TotalConns), name)
		gauge(redisIdle, float64(s.IdleConns), name)
	}
}
