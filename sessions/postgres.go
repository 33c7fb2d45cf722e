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
	w       *writer // group commit of creations, touches and appends
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
	if !poolSizeSet(connString) {
		cfg.MaxConns = DefaultPoolMaxConns
	}
	if _, ok := cfg.ConnConfig.RuntimeParams["application_name"]; !ok {
		// Lets a DBA tell our connections apart in pg_stat_activity.
		cfg.ConnConfig.RuntimeParams["application_name"] = "caddy-chatproxy"
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return nil, redact(fmt.Errorf("creating database pool: %w", err), secrets)
	}
	s := &PostgresStore{
		pool:    pool,
		db:      stdlib.OpenDBFromPool(pool),
		secrets: secrets,
		gate:    newMigrateGate(),
	}
	s.w = newWriter(s.commitWrites)
	return s, nil
}

// SetStoreWait sets how long a write waits for an unreachable database to
// come back before it fails; zero means DefaultStoreWait.
func (s *PostgresStore) SetStoreWait(d time.Duration) { s.w.setStoreWait(d) }

// DefaultPoolMaxConns is the pool's size unless the URL sets
// pool_max_conns. pgx's own default, max(4, CPUs), leaves chat writes
// queueing for a connection while each waits for its commit to reach the
// disk; with more connections the server flushes several commits at once
// (group commit), which on a 2-core machine raised session creations by
// about a third.
const DefaultPoolMaxConns = 16

// poolSizeSet reports whether the connection string chooses the pool size,
// as a URL query parameter or a keyword/value pair.
func poolSizeSet(connString string) bool {
	return strings.Contains(connString, "pool_max_conns")
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
	if pgDataException(err) {
		err = fmt.Errorf("%w: %w", ErrInvalidData, err)
	}
	return redact(fmt.Errorf("%s: %w", op, err), s.secrets)
}

// pgDataException reports a data exception (SQLSTATE class 22: invalid
// text, a number out of range, an untranslatable character, ...): the
// statement failed because of the values it was given, so running it again
// fails again.
func pgDataException(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && strings.HasPrefix(pe.Code, "22")
}

const pgInsertSession = `
INSERT INTO chatproxy_sessions (id, kind, site, page_url, user_agent, client_ip, fingerprint, metadata,
                      created_at, last_seen_at, expires_at, revoked_at, message_count,
                      user_realm, user_id, user_name, user_email, user_attributes)
VALUES ($1, $2, $3, nullif($4, ''), nullif($5, ''), nullif($6, ''), nullif($7, ''), $8,
        $9, $10, $11, $12, 0,
        $13, $14, nullif($15, ''), nullif($16, ''), $17)
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
	return s.fail(op, s.w.do(ctx, &writeOp{kind: writeCreate, sess: sess}))
}

// pgSessionColumns are the columns pgScanSession reads.
const pgSessionColumns = `id, kind, site, coalesce(page_url, ''), coalesce(user_agent, ''), coalesce(client_ip, ''),
       coalesce(fingerprint, ''), metadata, created_at, last_seen_at, expires_at, revoked_at, message_count,
       user_realm, user_id, coalesce(user_name, ''), coalesce(user_email, ''), user_attributes, mode`

const pgGetSession = `SELECT ` + pgSessionColumns + ` FROM chatproxy_sessions WHERE id = $1`

// GetSession implements Store.
func (s *PostgresStore) GetSession(ctx context.Context, id string) (*Session, error) {
	const op = "getting session"
	if !storable(id) {
		return nil, s.fail(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	sess, err := pgScanSession(s.pool.QueryRow(ctx, pgGetSession, id))
	if err != nil {
		return nil, s.fail(op, err)
	}
	return sess, nil
}

// pgScanSession reads a row of pgSessionColumns; no row is ErrNotFound.
func pgScanSession(row pgx.Row) (*Session, error) {
	var (
		sess          Session
		md, attrs     []byte
		realm, userID *string
		name, email   string
	)
	err := row.Scan(
		&sess.ID, &sess.Kind, &sess.Site, &sess.PageURL, &sess.UserAgent, &sess.ClientIP,
		&sess.Fingerprint, &md, &sess.CreatedAt, &sess.LastSeenAt, &sess.ExpiresAt, &sess.RevokedAt,
		&sess.MessageCount, &realm, &userID, &name, &email, &attrs, &sess.Mode)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	if sess.Metadata, err = pgJSON(md); err != nil {
		return nil, err
	}
	if userID != nil {
		sess.User = &User{ID: *userID, Name: name, Email: email}
		if realm != nil {
			sess.User.Realm = *realm
		}
		if sess.User.Attributes, err = pgJSON(attrs); err != nil {
			return nil, err
		}
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
	if !storable(id) {
		return s.fail(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	w := &writeOp{kind: writeTouch, id: id, at: normTime(at)}
	if !expiresAt.IsZero() {
		e := normTime(expiresAt)
		w.extend = &e
	}
	return s.fail(op, s.w.do(ctx, w))
}

const pgTouchSession = `
UPDATE chatproxy_sessions SET last_seen_at = greatest(last_seen_at, $2),
    expires_at = CASE WHEN $3::timestamptz IS NOT NULL AND revoked_at IS NULL
                      THEN greatest(expires_at, $3::timestamptz) ELSE expires_at END
WHERE id = $1`

// DeleteSession implements Store; messages go by the foreign key's cascade.
func (s *PostgresStore) DeleteSession(ctx context.Context, id string) error {
	const op = "deleting session"
	if !storable(id) {
		return s.fail(op, ErrNotFound)
	}
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
	if !storable(id) {
		return s.fail(op, ErrNotFound)
	}
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
	return s.fail(op, s.w.do(ctx, &writeOp{kind: writeAppend, msg: m}))
}

// pgAppendUserMessage is pgAppendMessage for a session that must also be
// unexpired, returning the session row. The INSERT runs although the final
// SELECT does not read it: PostgreSQL always executes data-modifying CTEs.
const pgAppendUserMessage = `
WITH s AS (
    UPDATE chatproxy_sessions SET message_count = message_count + 1
    WHERE id = $2 AND kind = $7 AND revoked_at IS NULL AND expires_at > $6
    RETURNING ` + pgSessionColumns + `
), m AS (
    INSERT INTO chatproxy_messages (id, session_id, role, content, status, metadata, created_at)
    SELECT $1::text, s.id, 'user', $3::text, $4::text, $5::jsonb, $6::timestamptz FROM s
)
SELECT * FROM s`

// AppendUserMessage implements Store.
func (s *PostgresStore) AppendUserMessage(ctx context.Context, m *Message, kind string) (*Session, error) {
	const op = "appending user message"
	if err := prepareUserMessage(m, time.Now()); err != nil {
		return nil, s.fail(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	w := &writeOp{kind: writeAppendUser, msg: m, userKind: kind}
	err := s.w.do(ctx, w)
	if errors.Is(err, errStoredEarlier) {
		return s.GetSession(ctx, m.SessionID)
	}
	if err != nil {
		return nil, s.fail(op, err)
	}
	return w.out, nil
}

// pgAppendExchange is pgAppendUserMessage that also inserts the
// streaming reply ($8, unless empty) after the user message: one INSERT
// of both rows, in that order, so that the reply's seq comes second.
const pgAppendExchange = `
WITH s AS (
    UPDATE chatproxy_sessions SET message_count = message_count + CASE mode WHEN 'human' THEN 1 ELSE 2 END
    WHERE id = $2 AND kind = $7 AND revoked_at IS NULL AND expires_at > $6
    RETURNING ` + pgSessionColumns + `
), m AS (
    INSERT INTO chatproxy_messages (id, session_id, role, content, status, metadata, created_at)
    SELECT v.id, s.id, v.role, v.content, v.status, v.metadata, v.created_at
    FROM s, (VALUES (1, $1::text, 'user', $3::text, $4::text, $5::jsonb, $6::timestamptz),
                    (2, $8::text, 'assistant', '', 'streaming', NULL::jsonb, $9::timestamptz))
            AS v (n, id, role, content, status, metadata, created_at)
    WHERE v.n = 1 OR s.mode <> 'human'
    ORDER BY v.n
)
SELECT * FROM s`

// AppendExchange implements Store.
func (s *PostgresStore) AppendExchange(ctx context.Context, m, reply *Message, kind string) (*Session, error) {
	const op = "appending message and reply"
	now := time.Now()
	if err := prepareUserMessage(m, now); err != nil {
		return nil, s.fail(op, err)
	}
	if err := prepareReply(reply, m); err != nil {
		return nil, s.fail(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	w := &writeOp{kind: writeAppendUser, msg: m, reply: reply, userKind: kind}
	err := s.w.do(ctx, w)
	if errors.Is(err, errStoredEarlier) {
		w.out, err = s.GetSession(ctx, m.SessionID)
	}
	if err != nil {
		return nil, s.fail(op, err)
	}
	if w.out.Mode != ModeHuman {
		w.out.MessageCount-- // the reply is not counted in what the caller sees
	}
	return w.out, nil
}

// pgFinishReply fills in a streaming reply, found by its id alone (see
// Store.FinishReply).
const pgFinishReply = `
UPDATE chatproxy_messages SET content = $2, status = $3, metadata = $4
WHERE id = $1 AND status = 'streaming'`

// FinishReply implements Store.
func (s *PostgresStore) FinishReply(ctx context.Context, m *Message) error {
	const op = "finishing reply"
	if err := prepareFinish(m); err != nil {
		return s.fail(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	return s.fail(op, s.w.do(ctx, &writeOp{kind: writeFinish, msg: m}))
}

const pgGetMessage = `
SELECT id, role, content, status, metadata, created_at FROM chatproxy_messages
WHERE id = $1 AND session_id = $2`

// GetMessage implements Store.
func (s *PostgresStore) GetMessage(ctx context.Context, sessionID, id string) (*Message, error) {
	const op = "getting message"
	if !storable(id) || !storable(sessionID) {
		return nil, s.fail(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	m := Message{SessionID: sessionID}
	var md []byte
	err := s.pool.QueryRow(ctx, pgGetMessage, id, sessionID).Scan(&m.ID, &m.Role, &m.Content, &m.Status, &md, &m.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		err = ErrNotFound
	}
	if err == nil {
		m.Metadata, err = pgJSON(md)
	}
	if err != nil {
		return nil, s.fail(op, err)
	}
	m.CreatedAt = m.CreatedAt.UTC()
	return &m, nil
}

// commitWrites is the writer's commit: the batch's statements go in one
// pipeline, which PostgreSQL runs as one implicit transaction (one round
// trip, one commit). A statement that fails aborts the transaction; its
// op is answered and the writer sends the rest again.
func (s *PostgresStore) commitWrites(ctx context.Context, ops []*writeOp) attempt {
	b := &pgx.Batch{QueuedQueries: make([]*pgx.QueuedQuery, 0, len(ops))}
	for _, op := range ops {
		switch op.kind {
		case writeCreate:
			sess := op.sess
			realm, userID, name, email, attrs := userArgs(sess.User)
			b.Queue(pgInsertSession,
				sess.ID, sess.Kind, sess.Site, sess.PageURL, sess.UserAgent, sess.ClientIP, sess.Fingerprint,
				jsonArg(sess.Metadata), sess.CreatedAt, sess.LastSeenAt, sess.ExpiresAt, sess.RevokedAt,
				realm, userID, name, email, jsonArg(attrs))
		case writeTouch:
			b.Queue(pgTouchSession, op.id, op.at, op.extend)
		case writeAppend:
			m := op.msg
			b.Queue(pgAppendMessage, m.ID, m.SessionID, m.Role, m.Content, m.Status, jsonArg(m.Metadata), m.CreatedAt)
		case writeAppendUser:
			m := op.msg
			if r := op.reply; r != nil {
				b.Queue(pgAppendExchange, m.ID, m.SessionID, m.Content, m.Status, jsonArg(m.Metadata), m.CreatedAt, op.userKind,
					r.ID, r.CreatedAt)
			} else {
				b.Queue(pgAppendUserMessage, m.ID, m.SessionID, m.Content, m.Status, jsonArg(m.Metadata), m.CreatedAt, op.userKind)
			}
		case writeFinish:
			m := op.msg
			b.Queue(pgFinishReply, m.ID, m.Content, m.Status, jsonArg(m.Metadata))
		}
	}
	br := s.pool.SendBatch(ctx, b)
	for i, op := range ops {
		var err error
		op.err, op.out = nil, nil
		if op.kind == writeAppendUser {
			op.out, err = pgScanSession(br.QueryRow())
			if errors.Is(err, ErrNotFound) {
				op.err, err = ErrNotFound, nil
			}
		} else {
			var tag pgconn.CommandTag
			tag, err = br.Exec()
			if err == nil && tag.RowsAffected() == 0 {
				op.err = ErrNotFound
				if op.kind == writeCreate {
					op.err = ErrExists
				}
			}
		}
		if err != nil {
			_ = br.Close()
			return pgAttemptFailed(i, err)
		}
	}
	if err := br.Close(); err != nil {
		return pgAttemptFailed(-1, err)
	}
	return committed()
}

// pgAttemptFailed classifies a batch's failure at statement i (-1: at the
// commit): the row's own fault, or the database's.
func pgAttemptFailed(i int, err error) attempt {
	var pre pgx.ErrPreprocessingBatch
	if errors.As(err, &pre) {
		if strings.Contains(pre.Error(), "(build)") {
			// A value that cannot be encoded, found before anything was
			// sent: which one is not said.
			return attempt{err: err, failed: splitBatch}
		}
		// Preparing the statements failed: nothing was run.
		return storeFailed(err, false)
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch {
		case pe.Code == "23505" && i >= 0:
			return rowFailed(i, ErrExists)
		case strings.HasPrefix(pe.Code, "40"):
			// Deadlock or serialization failure: rolled back, try again.
			return storeFailed(err, false)
		case pgTransient(pe.Code) || i < 0:
			return storeFailed(err, true)
		}
		return rowFailed(i, err)
	}
	return storeFailed(err, !pgconn.SafeToRetry(err))
}

// pgTransient reports SQLSTATEs that say nothing about the row but about
// the server: connection trouble, shutdown or restart, resources, locks.
func pgTransient(code string) bool {
	switch code[:min(2, len(code))] {
	case "08", "53", "57", "58", "XX":
		return true
	}
	return code == "55P03" // lock_not_available
}

// pgListMessages answers a page in one statement, so count, cursor check
// and rows come from one snapshot. It always returns at least one row; the
// message columns are NULL when the page is empty. $3 is limit+1: the
// extra row only tells whether older messages exist. $4 is the byte
// budget (0: none): the page stops before the message whose content would
// take it past the budget, keeping at least one message, and the third
// column tells whether the budget left messages out. Sizes come from
// octet_length, which reads a stored value's length without its content,
// so what the budget leaves out is never read.
const pgListMessages = `
WITH b AS (
    SELECT seq FROM chatproxy_messages WHERE session_id = $1 AND id = $2::text
), newest AS (
    SELECT seq, octet_length(content) AS size
    FROM chatproxy_messages
    WHERE session_id = $1 AND ($2::text = '' OR seq < (SELECT seq FROM b))
    ORDER BY seq DESC
    LIMIT $3
), sized AS (
    SELECT seq, row_number() OVER w AS n, sum(size) OVER w AS upto
    FROM newest
    WINDOW w AS (ORDER BY seq DESC ROWS UNBOUNDED PRECEDING)
), kept AS (
    SELECT seq FROM sized WHERE n = 1 OR $4::bigint <= 0 OR upto <= $4::bigint
), page AS (
    SELECT m.seq, m.id, m.role, m.content, m.status, m.metadata, m.created_at
    FROM kept JOIN chatproxy_messages m ON m.seq = kept.seq
)
SELECT (SELECT count(*) FROM chatproxy_messages WHERE session_id = $1),
       ($2::text = '' OR EXISTS (SELECT 1 FROM b)),
       (SELECT count(*) FROM sized) > (SELECT count(*) FROM kept),
       page.id, page.role, page.content, page.status, page.metadata, page.created_at
FROM (VALUES (1)) AS one (x) LEFT JOIN page ON true
ORDER BY page.seq DESC`

// ListMessages implements Store.
func (s *PostgresStore) ListMessages(ctx context.Context, sessionID, before string, limit int) (*Page, error) {
	return s.ListMessagesWithin(ctx, sessionID, before, limit, 0)
}

// ListMessagesWithin implements Store.
func (s *PostgresStore) ListMessagesWithin(ctx context.Context, sessionID, before string, limit, maxBytes int) (*Page, error) {
	const op = "listing messages"
	if limit < 0 {
		return nil, s.fail(op, fmt.Errorf("negative limit %d", limit))
	}
	if !storable(sessionID) || !storable(before) {
		p, err := unstorablePage(before)
		return p, s.fail(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	rows, err := s.pool.Query(ctx, pgListMessages, sessionID, before, int64(limit)+1, int64(maxBytes))
	if err != nil {
		return nil, s.fail(op, err)
	}
	defer rows.Close()
	var (
		page     Page
		total    int64
		beforeOK bool
		cut      bool
	)
	for rows.Next() {
		var (
			id, role, content, status *string
			md                        []byte
			created                   *time.Time
		)
		if err := rows.Scan(&total, &beforeOK, &cut, &id, &role, &content, &status, &md, &created); err != nil {
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
	finishPage(&page, limit, cut)
	return &page, nil
}

// finishPage turns newest-first rows (up to limit+1) into the page; cut
// says the byte budget left older messages out.
func finishPage(p *Page, limit int, cut bool) {
	p.HasMore = cut
	if len(p.Messages) > limit {
		p.HasMore = true
		p.Messages = p.Messages[:limit]
	}
	for i, j := 0, len(p.Messages)-1; i < j; i, j = i+1, j-1 {
		p.Messages[i], p.Messages[j] = p.Messages[j], p.Messages[i]
	}
}

// pgPurgeLock takes the purge lock for the rest of the transaction, or
// reports false at once when another session holds it. The key is derived
// from the current schema, as the migration lock's is, so deployments (and
// parallel tests) in different schemas of one database never block each
// other.
const pgPurgeLock = `SELECT pg_try_advisory_xact_lock(hashtextextended('chatproxy-purge:' || coalesce(current_schema(), ''), 0))`

// SetSessionMode implements Store.
func (s *PostgresStore) SetSessionMode(ctx context.Context, id, mode string) error {
	const op = "setting session mode"
	if err := checkMode(mode); err != nil {
		return s.fail(op, err)
	}
	if !storable(id) {
		return s.fail(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	tag, err := s.pool.Exec(ctx, `UPDATE chatproxy_sessions SET mode = $2 WHERE id = $1 AND revoked_at IS NULL`, id, mode)
	if err != nil {
		return s.fail(op, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fail(op, ErrNotFound)
	}
	return nil
}

const pgListMessagesAfter = `
SELECT id, role, content, status, metadata, created_at FROM chatproxy_messages
WHERE session_id = $1 AND seq > (SELECT seq FROM chatproxy_messages WHERE session_id = $1 AND id = $2)
ORDER BY seq LIMIT $3`

// ListMessagesAfter implements Store. No row may mean no such message,
// which a second query tells apart.
func (s *PostgresStore) ListMessagesAfter(ctx context.Context, sessionID, after string, limit int) ([]Message, error) {
	const op = "listing messages after"
	if limit < 0 {
		return nil, s.fail(op, fmt.Errorf("negative limit %d", limit))
	}
	if !storable(sessionID) || !storable(after) || after == "" {
		return nil, s.fail(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	rows, err := s.pool.Query(ctx, pgListMessagesAfter, sessionID, after, limit)
	if err != nil {
		return nil, s.fail(op, err)
	}
	var out []Message
	for rows.Next() {
		m := Message{SessionID: sessionID}
		var md []byte
		if err := rows.Scan(&m.ID, &m.Role, &m.Content, &m.Status, &md, &m.CreatedAt); err != nil {
			rows.Close()
			return nil, s.fail(op, err)
		}
		if m.Metadata, err = pgJSON(md); err != nil {
			rows.Close()
			return nil, s.fail(op, err)
		}
		m.CreatedAt = m.CreatedAt.UTC()
		out = append(out, m)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, s.fail(op, err)
	}
	if len(out) == 0 {
		var found bool
		err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM chatproxy_messages WHERE session_id = $1 AND id = $2)`,
			sessionID, after).Scan(&found)
		if err != nil {
			return nil, s.fail(op, err)
		}
		if !found {
			return nil, s.fail(op, ErrNotFound)
		}
	}
	return out, nil
}

// Purge implements Store. Each batch is one transaction under the purge
// lock: first old messages (of any session), then expired sessions with
// whatever messages they have left.
func (s *PostgresStore) Purge(ctx context.Context, expiredBefore, messagesBefore time.Time) (int64, int64, error) {
	const op = "purging"
	if err := s.ready(ctx); err != nil {
		return 0, 0, s.fail(op, err)
	}
	exp, old := normTime(expiredBefore), normTime(messagesBefore)
	var sessions, messages int64
	first := true
	for _, batch := range []func(pgx.Tx) (ns, nm int64, more bool, err error){
		func(tx pgx.Tx) (int64, int64, bool, error) { return pgPurgeOldMessages(ctx, tx, old) },
		func(tx pgx.Tx) (int64, int64, bool, error) { return pgPurgeExpiredSessions(ctx, tx, exp) },
	} {
		for more := true; more; {
			var ns, nm int64
			locked, err := s.inPurgeTx(ctx, func(tx pgx.Tx) error {
				var err error
				ns, nm, more, err = batch(tx)
				return err
			})
			if err != nil {
				return sessions, messages, s.fail(op, err)
			}
			if !locked {
				if first {
					return 0, 0, s.fail(op, ErrBusy)
				}
				// Another instance took over between two batches.
				return sessions, messages, nil
			}
			first = false
			sessions += ns
			messages += nm
		}
	}
	return sessions, messages, nil
}

// inPurgeTx runs fn in a transaction that holds the purge lock. It reports
// false, having run nothing, when another instance holds the lock.
func (s *PostgresStore) inPurgeTx(ctx context.Context, fn func(pgx.Tx) error) (bool, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }() // a no-op after Commit
	var locked bool
	if err := tx.QueryRow(ctx, pgPurgeLock).Scan(&locked); err != nil || !locked {
		return false, err
	}
	if err := fn(tx); err != nil {
		return true, err
	}
	return true, tx.Commit(ctx)
}

// pgPurgeOldMessages deletes up to purgeBatch messages created before old
// and lowers their sessions' message_count to match. The batch is the
// oldest such messages by seq, up to a bound, so its statements agree on
// it without shipping ids back and forth. The sessions are locked first,
// as AppendMessage and RevokeSession lock a session before its messages,
// so a purge never deadlocks with them; once they are locked, the DELETE
// and the count it returns are exact.
func pgPurgeOldMessages(ctx context.Context, tx pgx.Tx, old time.Time) (int64, int64, bool, error) {
	var bound *int64
	var n int64
	err := tx.QueryRow(ctx, `
SELECT max(seq), count(*) FROM (
    SELECT seq FROM chatproxy_messages WHERE created_at < $1 ORDER BY seq LIMIT $2
) AS batch`, old, purgeBatch).Scan(&bound, &n)
	if err != nil || bound == nil {
		return 0, 0, false, err
	}
	if _, err := tx.Exec(ctx, `
SELECT 1 FROM chatproxy_sessions
WHERE id IN (SELECT session_id FROM chatproxy_messages WHERE created_at < $1 AND seq <= $2)
ORDER BY id FOR NO KEY UPDATE`, old, *bound); err != nil {
		return 0, 0, false, err
	}
	var deleted int64
	err = tx.QueryRow(ctx, `
WITH d AS (
    DELETE FROM chatproxy_messages WHERE created_at < $1 AND seq <= $2 RETURNING session_id
), c AS (
    SELECT session_id, count(*) AS n FROM d GROUP BY session_id
), u AS (
    UPDATE chatproxy_sessions s SET message_count = greatest(s.message_count - c.n, 0)
    FROM c WHERE s.id = c.session_id
)
SELECT coalesce(sum(n), 0)::bigint FROM c`, old, *bound).Scan(&deleted)
	if err != nil {
		return 0, 0, false, err
	}
	return 0, deleted, n >= int64(purgeBatch), nil
}

// pgPurgeExpiredSessions deletes up to purgeBatch sessions that expired
// before exp, with their messages. Locking the rows re-checks the expiry,
// so a session extended meanwhile stays.
func pgPurgeExpiredSessions(ctx context.Context, tx pgx.Tx, exp time.Time) (int64, int64, bool, error) {
	rows, err := tx.Query(ctx, `SELECT id FROM chatproxy_sessions WHERE expires_at < $1 LIMIT $2 FOR UPDATE`, exp, purgeBatch)
	if err != nil {
		return 0, 0, false, err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(ids) == 0 {
		return 0, 0, false, err
	}
	mtag, err := tx.Exec(ctx, `DELETE FROM chatproxy_messages WHERE session_id = ANY($1)`, ids)
	if err != nil {
		return 0, 0, false, err
	}
	stag, err := tx.Exec(ctx, `DELETE FROM chatproxy_sessions WHERE id = ANY($1)`, ids)
	if err != nil {
		return 0, 0, false, err
	}
	return stag.RowsAffected(), mtag.RowsAffected(), len(ids) >= purgeBatch, nil
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

// Status reports the schema version, the pending migrations and the row
// counts. Unlike every other method it never migrates: it only reads.
func (s *PostgresStore) Status(ctx context.Context) (*Status, error) {
	const op = "reading status"
	var st Status
	var err error
	st.SchemaVersion, st.Pending, err = migrations.Pending(ctx, s.db, migrations.Postgres)
	if err != nil {
		return nil, s.fail(op, err)
	}
	if st.SchemaVersion == 0 {
		return &st, nil // no tables to count
	}
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

// Close implements Store. Writes already queued are committed first (or
// fail after store_wait); it waits for connections in use to be returned.
func (s *PostgresStore) Close() error {
	s.w.close()
	err := s.db.Close() // does not close the pool
	s.pool.Close()
	return s.fail("closing database", err)
}

// userArgs are the user columns of a session's row: all NULL (nil) for an
// anonymous session.
func userArgs(u *User) (realm, id any, name, email string, attrs json.RawMessage) {
	if u == nil {
		return nil, nil, "", "", nil
	}
	return u.Realm, u.ID, u.Name, u.Email, u.Attributes
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
