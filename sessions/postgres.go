package sessions

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/chatproxy/caddy-chatproxy/migrations"
)

// PostgresStore is the Store on PostgreSQL, shared by every Caddy instance
// pointed at the same database.
type PostgresStore struct {
	pool    *pgxpool.Pool
	db      *sql.DB // the same pool seen through database/sql, for goose
	secrets []string
	gate    migrateGate
}

var _ Store = (*PostgresStore)(nil)

// OpenPostgres prepares a store for the database at connString (a
// postgres:// URL or keyword/value string, as pgx accepts; pool_* options
// tune the pool). It does no network I/O, so it
// is safe in Provision and `caddy validate`: pgxpool connects on demand,
// and the schema is migrated by the first method call.
func OpenPostgres(connString string) (*PostgresStore, error) {
	secrets := connSecrets(connString)
	cfg, err := pgxpool.ParseConfig(connString)
	if err != nil {
		return nil, redact(fmt.Errorf("parsing database url: %w", err), secrets)
	}
	if cfg.ConnConfig.Password != "" {
		secrets = append(secrets, cfg.ConnConfig.Password)
	}
	if _, ok := cfg.ConnConfig.RuntimeParams["application_name"]; !ok {
		// Lets a DBA tell our connections apart in pg_stat_activity.
		cfg.ConnConfig.RuntimeParams["application_name"] = "caddy-chatproxy"
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return nil, redact(fmt.Errorf("creating database pool: %w", err), secrets)
	}
	return &PostgresStore{
		pool:    pool,
		db:      stdlib.OpenDBFromPool(pool),
		secrets: secrets,
		gate:    newMigrateGate(),
	}, nil
}

// Pool exposes the connection pool, for its statistics.
func (s *PostgresStore) Pool() *pgxpool.Pool { return s.pool }

// Migrate applies pending migrations now rather than on first use; running
// it again is harmless.
func (s *PostgresStore) Migrate(ctx context.Context) error {
	return s.fail("migrating", s.gate.run(ctx, s.migrate, true))
}

func (s *PostgresStore) migrate(ctx context.Context) error {
	return migrations.Up(ctx, s.db, migrations.Postgres)
}

func (s *PostgresStore) ready(ctx context.Context) error {
	return s.gate.ensure(ctx, s.migrate)
}

// fail wraps err with the operation and removes the connection string's
// secrets from the text, should a driver ever echo them.
func (s *PostgresStore) fail(op string, err error) error {
	if err == nil {
		return nil
	}
	return redact(fmt.Errorf("%s: %w", op, err), s.secrets)
}

const pgInsertSession = `
INSERT INTO chatproxy_sessions (id, kind, site, page_url, user_agent, client_ip, fingerprint, metadata,
                      created_at, last_seen_at, expires_at, revoked_at, message_count)
VALUES ($1, $2, $3, nullif($4, ''), nullif($5, ''), nullif($6, ''), nullif($7, ''), $8,
        $9, $10, $11, $12, 0)
ON CONFLICT (id) DO NOTHING`

// CreateSession implements Store.
func (s *PostgresStore) CreateSession(ctx context.Context, sess *Session) error {
	const op = "creating session"
	if err := prepareSession(sess, time.Now()); err != nil {
		return s.fail(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	tag, err := s.pool.Exec(ctx, pgInsertSession,
		sess.ID, sess.Kind, sess.Site, sess.PageURL, sess.UserAgent, sess.ClientIP, sess.Fingerprint,
		jsonArg(sess.Metadata), sess.CreatedAt, sess.LastSeenAt, sess.ExpiresAt, sess.RevokedAt)
	if err != nil {
		return s.fail(op, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fail(op, ErrExists)
	}
	return nil
}

const pgGetSession = `
SELECT id, kind, site, coalesce(page_url, ''), coalesce(user_agent, ''), coalesce(client_ip, ''),
       coalesce(fingerprint, ''), metadata, created_at, last_seen_at, expires_at, revoked_at, message_count
FROM chatproxy_sessions WHERE id = $1`

// GetSession implements Store.
func (s *PostgresStore) GetSession(ctx context.Context, id string) (*Session, error) {
	const op = "getting session"
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	var (
		sess Session
		md   []byte
	)
	err := s.pool.QueryRow(ctx, pgGetSession, id).Scan(
		&sess.ID, &sess.Kind, &sess.Site, &sess.PageURL, &sess.UserAgent, &sess.ClientIP,
		&sess.Fingerprint, &md, &sess.CreatedAt, &sess.LastSeenAt, &sess.ExpiresAt, &sess.RevokedAt,
		&sess.MessageCount)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, s.fail(op, ErrNotFound)
	}
	if err != nil {
		return nil, s.fail(op, err)
	}
	if sess.Metadata, err = pgJSON(md); err != nil {
		return nil, s.fail(op, err)
	}
	sess.CreatedAt = sess.CreatedAt.UTC()
	sess.LastSeenAt = sess.LastSeenAt.UTC()
	sess.ExpiresAt = sess.ExpiresAt.UTC()
	if sess.RevokedAt != nil {
		r := sess.RevokedAt.UTC()
		sess.RevokedAt = &r
	}
	return &sess, nil
}

// TouchSession implements Store.
func (s *PostgresStore) TouchSession(ctx context.Context, id string, at, expiresAt time.Time) error {
	const op = "touching session"
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	var extend *time.Time
	if !expiresAt.IsZero() {
		e := normTime(expiresAt)
		extend = &e
	}
	tag, err := s.pool.Exec(ctx, `
UPDATE chatproxy_sessions SET last_seen_at = greatest(last_seen_at, $2),
    expires_at = CASE WHEN $3::timestamptz IS NOT NULL AND revoked_at IS NULL
                      THEN greatest(expires_at, $3::timestamptz) ELSE expires_at END
WHERE id = $1`,
		id, normTime(at), extend)
	if err != nil {
		return s.fail(op, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fail(op, ErrNotFound)
	}
	return nil
}

// DeleteSession implements Store; messages go by the foreign key's cascade.
func (s *PostgresStore) DeleteSession(ctx context.Context, id string) error {
	const op = "deleting session"
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	tag, err := s.pool.Exec(ctx, `DELETE FROM chatproxy_sessions WHERE id = $1`, id)
	if err != nil {
		return s.fail(op, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fail(op, ErrNotFound)
	}
	return nil
}

// RevokeSession implements Store. The two statements go as one batch,
// which Postgres runs as one implicit transaction in one round trip. The
// DELETE is a separate statement so that it sees a message appended by a
// transaction the UPDATE had to wait for.
func (s *PostgresStore) RevokeSession(ctx context.Context, id string, at time.Time) error {
	const op = "revoking session"
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	b := &pgx.Batch{}
	b.Queue(`UPDATE chatproxy_sessions SET revoked_at = coalesce(revoked_at, $2), message_count = 0 WHERE id = $1`,
		id, normTime(at))
	b.Queue(`DELETE FROM chatproxy_messages WHERE session_id = $1`, id)
	br := s.pool.SendBatch(ctx, b)
	tag, err := br.Exec()
	if err == nil {
		_, err = br.Exec()
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return s.fail(op, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fail(op, ErrNotFound)
	}
	return nil
}

// pgAppendMessage counts and inserts in one statement, hence atomically.
// The UPDATE's row lock also orders it against RevokeSession.
const pgAppendMessage = `
WITH s AS (
    UPDATE chatproxy_sessions SET message_count = message_count + 1
    WHERE id = $2 AND revoked_at IS NULL
    RETURNING id
)
INSERT INTO chatproxy_messages (id, session_id, role, content, status, metadata, created_at)
SELECT $1::text, s.id, $3::text, $4::text, $5::text, $6::jsonb, $7::timestamptz FROM s`

// AppendMessage implements Store.
func (s *PostgresStore) AppendMessage(ctx context.Context, m *Message) error {
	const op = "appending message"
	if err := prepareMessage(m, time.Now()); err != nil {
		return s.fail(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	tag, err := s.pool.Exec(ctx, pgAppendMessage,
		m.ID, m.SessionID, m.Role, m.Content, m.Status, jsonArg(m.Metadata), m.CreatedAt)
	if pgUniqueViolation(err) {
		return s.fail(op, ErrExists)
	}
	if err != nil {
		return s.fail(op, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fail(op, ErrNotFound)
	}
	return nil
}

// pgListMessages answers a page in one statement, so count, cursor check
// and rows come from one snapshot. It always returns at least one row; the
// message columns are NULL when the page is empty. $3 is limit+1: the
// extra row only tells whether older messages exist.
const pgListMessages = `
WITH b AS (
    SELECT seq FROM chatproxy_messages WHERE session_id = $1 AND id = $2::text
), page AS (
    SELECT seq, id, role, content, status, metadata, created_at
    FROM chatproxy_messages
    WHERE session_id = $1 AND ($2::text = '' OR seq < (SELECT seq FROM b))
    ORDER BY seq DESC
    LIMIT $3
)
SELECT (SELECT count(*) FROM chatproxy_messages WHERE session_id = $1),
       ($2::text = '' OR EXISTS (SELECT 1 FROM b)),
       page.id, page.role, page.content, page.status, page.metadata, page.created_at
FROM (VALUES (1)) AS one (x) LEFT JOIN page ON true
ORDER BY page.seq DESC`

// ListMessages implements Store.
func (s *PostgresStore) ListMessages(ctx context.Context, sessionID, before string, limit int) (*Page, error) {
	const op = "listing messages"
	if limit < 0 {
		return nil, s.fail(op, fmt.Errorf("negative limit %d", limit))
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	rows, err := s.pool.Query(ctx, pgListMessages, sessionID, before, int64(limit)+1)
	if err != nil {
		return nil, s.fail(op, err)
	}
	defer rows.Close()
	var (
		page     Page
		total    int64
		beforeOK bool
	)
	for rows.Next() {
		var (
			id, role, content, status *string
			md                        []byte
			created                   *time.Time
		)
		if err := rows.Scan(&total, &beforeOK, &id, &role, &content, &status, &md, &created); err != nil {
			return nil, s.fail(op, err)
		}
		if id == nil {
			continue
		}
		meta, err := pgJSON(md)
		if err != nil {
			return nil, s.fail(op, err)
		}
		page.Messages = append(page.Messages, Message{
			ID: *id, SessionID: sessionID, Role: *role, Content: *content, Status: *status,
			Metadata: meta, CreatedAt: created.UTC(),
		})
	}
	if err := rows.Err(); err != nil {
		return nil, s.fail(op, err)
	}
	if !beforeOK {
		return nil, s.fail(op, ErrNotFound)
	}
	page.TotalCount = int(total)
	finishPage(&page, limit)
	return &page, nil
}

// finishPage turns newest-first rows (up to limit+1) into the page.
func finishPage(p *Page, limit int) {
	if len(p.Messages) > limit {
		p.HasMore = true
		p.Messages = p.Messages[:limit]
	}
	for i, j := 0, len(p.Messages)-1; i < j; i, j = i+1, j-1 {
		p.Messages[i], p.Messages[j] = p.Messages[j], p.Messages[i]
	}
}

// Purge implements Store: one batch, hence one implicit transaction.
func (s *PostgresStore) Purge(ctx context.Context, expiredBefore, messagesBefore time.Time) (int64, int64, error) {
	const op = "purging"
	if err := s.ready(ctx); err != nil {
		return 0, 0, s.fail(op, err)
	}
	exp, old := normTime(expiredBefore), normTime(messagesBefore)
	b := &pgx.Batch{}
	// Keep message_count equal to the stored history of the sessions that stay.
	b.Queue(`
UPDATE chatproxy_sessions s SET message_count = greatest(s.message_count - d.n, 0)
FROM (SELECT session_id, count(*) AS n FROM chatproxy_messages WHERE created_at < $2 GROUP BY session_id) d
WHERE s.id = d.session_id AND s.expires_at >= $1`, exp, old)
	b.Queue(`
DELETE FROM chatproxy_messages
WHERE created_at < $2 OR session_id IN (SELECT id FROM chatproxy_sessions WHERE expires_at < $1)`, exp, old)
	b.Queue(`DELETE FROM chatproxy_sessions WHERE expires_at < $1`, exp)
	br := s.pool.SendBatch(ctx, b)
	var tags [3]pgconn.CommandTag
	var err error
	for i := range tags {
		if tags[i], err = br.Exec(); err != nil {
			break
		}
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, 0, s.fail(op, err)
	}
	return tags[2].RowsAffected(), tags[1].RowsAffected(), nil
}

// Stats implements Store.
func (s *PostgresStore) Stats(ctx context.Context) (*Stats, error) {
	const op = "reading stats"
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	var st Stats
	v, err := migrations.Version(ctx, s.db, migrations.Postgres)
	if err != nil {
		return nil, s.fail(op, err)
	}
	st.SchemaVersion = v
	err = s.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM chatproxy_sessions), (SELECT count(*) FROM chatproxy_messages)`).
		Scan(&st.Sessions, &st.Messages)
	if err != nil {
		return nil, s.fail(op, err)
	}
	return &st, nil
}

// Ping implements Store.
func (s *PostgresStore) Ping(ctx context.Context) error {
	const op = "pinging database"
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	return s.fail(op, s.pool.Ping(ctx))
}

// Close implements Store. It waits for connections in use to be returned.
func (s *PostgresStore) Close() error {
	err := s.db.Close() // does not close the pool
	s.pool.Close()
	return s.fail("closing database", err)
}

// jsonArg passes metadata to a jsonb parameter, NULL when there is none.
func jsonArg(md json.RawMessage) any {
	if len(md) == 0 {
		return nil
	}
	return []byte(md)
}

// pgJSON undoes jsonb's reformatting (`{"a": 1}`), so both stores return
// compact JSON.
func pgJSON(b []byte) (json.RawMessage, error) {
	if b == nil {
		return nil, nil
	}
	return compactJSON(b)
}

func pgUniqueViolation(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505"
}

// kvPassword finds password values in a keyword/value connection string.
var kvPassword = regexp.MustCompile(`(?:^|\s)(?:ssl)?password\s*=\s*(?:'((?:[^'\\]|\\.)*)'|(\S+))`)

// connSecrets lists the secrets a connection string carries, for redact.
// It copes with strings that do not parse, since those are the ones whose
// errors tend to quote them.
func connSecrets(conn string) []string {
	var out []string
	add := func(v string) {
		if v != "" {
			out = append(out, v)
			if esc := url.QueryEscape(v); esc != v {
				out = append(out, esc)
			}
			if esc := url.PathEscape(v); esc != v {
				out = append(out, esc)
			}
		}
	}
	if strings.HasPrefix(conn, "postgres://") || strings.HasPrefix(conn, "postgresql://") {
		rest := conn[strings.Index(conn, "://")+3:]
		if at := strings.LastIndex(strings.SplitN(rest, "/", 2)[0], "@"); at >= 0 {
			if _, pw, ok := strings.Cut(rest[:at], ":"); ok {
				add(pw)
				if dec, err := url.PathUnescape(pw); err == nil {
					add(dec)
				}
			}
		}
		if _, q, ok := strings.Cut(conn, "?"); ok {
			if vals, err := url.ParseQuery(q); err == nil {
				add(vals.Get("password"))
				add(vals.Get("sslpassword"))
			}
		}
		return out
	}
	for _, m := range kvPassword.FindAllStringSubmatch(conn, -1) {
		add(m[1])
		add(m[2])
	}
	return out
}

// redactedError hides secrets in the message but keeps the chain, so
// errors.Is still finds ErrNotFound or a context error.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

func redact(err error, secrets []string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	changed := false
	for _, sec := range secrets {
		if sec != "" && strings.Contains(msg, sec) {
			msg = strings.ReplaceAll(msg, sec, "xxxxx")
			changed = true
		}
	}
	if !changed {
		return err
	}
	return &redactedError{msg: msg, err: err}
}
