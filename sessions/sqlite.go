package sessions

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/chatproxy/caddy-chatproxy/migrations"
)

// SQLiteStore is the embedded Store: one file, no server, for a single
// Caddy (or a few processes on one machine).
//
// Writes go through one connection, reads through a small pool. SQLite
// allows one writer at a time anyway; queueing writers in Go instead of
// letting them contend for the file lock means no "database is locked"
// under bursts, and WAL lets readers run beside the writer.
type SQLiteStore struct {
	path string
	w    *sql.DB // one connection, BEGIN IMMEDIATE transactions
	r    *sql.DB // query_only connections
	gate migrateGate
	wr   *writer // group commit of creations, touches and appends
}

var _ Store = (*SQLiteStore)(nil)

// Connection settings, as DSN parameters so that every pooled connection
// gets them. busy_timeout covers other processes holding the lock;
// synchronous=NORMAL is durable across crashes of the process in WAL mode
// (a power cut may lose the last transactions, not corrupt the file).
const (
	sqliteCommon = "_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)"
	sqliteWriter = sqliteCommon + "&_pragma=journal_mode(WAL)&_txlock=immediate"
	sqliteReader = sqliteCommon + "&_pragma=query_only(1)"
)

// DefaultSQLitePath is where the embedded store lives when no database is
// configured: beside Caddy's certificates, in its data directory.
func DefaultSQLitePath() string {
	return filepath.Join(caddy.AppDataDir(), "chatproxy", "chatproxy.db")
}

// OpenSQLite prepares a store in the file at path. It touches nothing on
// disk: the directory (mode 0700) and the file are created, and the schema
// migrated, by the first method call, so a bad path is reported there.
func OpenSQLite(path string) (*SQLiteStore, error) {
	switch {
	case path == "":
		return nil, errors.New("opening sqlite store: empty path")
	case path == ":memory:" || strings.HasPrefix(path, "file:"):
		// Each pooled connection would get its own database.
		return nil, fmt.Errorf("opening sqlite store: %q is not a file path", path)
	case strings.ContainsRune(path, '?'):
		// The driver reads everything after '?' as its parameters.
		return nil, fmt.Errorf("opening sqlite store: path %q contains '?'", path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("opening sqlite store: %w", err)
	}
	w, err := sql.Open("sqlite", abs+"?"+sqliteWriter)
	if err != nil {
		return nil, fmt.Errorf("opening sqlite store: %w", err)
	}
	r, err := sql.Open("sqlite", abs+"?"+sqliteReader)
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("opening sqlite store: %w", err)
	}
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	w.SetConnMaxIdleTime(0)
	n := max(4, runtime.GOMAXPROCS(0))
	r.SetMaxOpenConns(n)
	r.SetMaxIdleConns(n)
	s := &SQLiteStore{path: abs, w: w, r: r, gate: newMigrateGate()}
	s.wr = newWriter(s.commitWrites)
	return s, nil
}

// SetStoreWait sets how long a write waits for the database file to be
// writable again (another process holding it past busy_timeout, a full
// disk) before it fails; zero means DefaultStoreWait.
func (s *SQLiteStore) SetStoreWait(d time.Duration) { s.wr.setStoreWait(d) }

// Path is the absolute path of the database file.
func (s *SQLiteStore) Path() string { return s.path }

// Migrate creates the file if needed and applies pending migrations now
// rather than on first use; running it again is harmless.
func (s *SQLiteStore) Migrate(ctx context.Context) error {
	return opErr("migrating", s.gate.run(ctx, s.migrate, true))
}

func (s *SQLiteStore) migrate(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Dir(s.path), 0o700); err != nil {
		return fmt.Errorf("creating directory for sqlite store: %w", err)
	}
	// The file holds conversations and client IPs: create it private.
	// SQLite gives its -wal and -shm files the same mode.
	f, err := os.OpenFile(s.path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("creating sqlite store: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("creating sqlite store: %w", err)
	}
	if err := migrations.Up(ctx, s.w, migrations.SQLite); err != nil {
		return fmt.Errorf("sqlite store %s: %w", s.path, err)
	}
	return nil
}

func (s *SQLiteStore) ready(ctx context.Context) error {
	return s.gate.ensure(ctx, s.migrate)
}

func opErr(op string, err error) error {
	if err == nil {
		return nil
	}
	if liteDataError(err) {
		err = fmt.Errorf("%w: %w", ErrInvalidData, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// liteDataError reports SQLite's counterparts of PostgreSQL's data
// exceptions: a CHECK the row fails (metadata that is not JSON), a value of
// the wrong type for a STRICT column, or one too big to store. Running the
// statement again fails again.
func liteDataError(err error) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	switch se.Code() {
	case sqlite3.SQLITE_CONSTRAINT_CHECK, sqlite3.SQLITE_CONSTRAINT_DATATYPE, sqlite3.SQLITE_MISMATCH, sqlite3.SQLITE_TOOBIG:
		return true
	}
	return false
}

// write runs fn in a write transaction (BEGIN IMMEDIATE, so it holds the
// file's write lock from the start and cannot fail to upgrade midway).
func (s *SQLiteStore) write(ctx context.Context, fn func(tx *sql.Tx) error) error {
	if err := s.ready(ctx); err != nil {
		return err
	}
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

const liteInsertSession = `
INSERT INTO chatproxy_sessions (id, kind, site, page_url, user_agent, client_ip, fingerprint, metadata,
                      created_at, last_seen_at, expires_at, revoked_at, message_count,
                      user_realm, user_id, user_name, user_email, user_attributes)
VALUES (?1, ?2, ?3, nullif(?4, ''), nullif(?5, ''), nullif(?6, ''), nullif(?7, ''), ?8,
        ?9, ?10, ?11, ?12, 0,
        ?13, ?14, nullif(?15, ''), nullif(?16, ''), ?17)
ON CONFLICT (id) DO NOTHING`

// CreateSession implements Store.
func (s *SQLiteStore) CreateSession(ctx context.Context, sess *Session) error {
	const op = "creating session"
	if err := prepareSession(sess, time.Now()); err != nil {
		return opErr(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return opErr(op, err)
	}
	return opErr(op, s.wr.do(ctx, &writeOp{kind: writeCreate, sess: sess}))
}

func liteCreateSession(ctx context.Context, tx *sql.Tx, sess *Session) error {
	var revoked any
	if sess.RevokedAt != nil {
		revoked = sess.RevokedAt.UnixMicro()
	}
	realm, userID, name, email, attrs := userArgs(sess.User)
	res, err := tx.ExecContext(ctx, liteInsertSession,
		sess.ID, sess.Kind, sess.Site, sess.PageURL, sess.UserAgent, sess.ClientIP, sess.Fingerprint,
		liteJSON(sess.Metadata), sess.CreatedAt.UnixMicro(), sess.LastSeenAt.UnixMicro(),
		sess.ExpiresAt.UnixMicro(), revoked, realm, userID, name, email, liteJSON(attrs))
	if err != nil {
		return err
	}
	return mustAffect(res, ErrExists)
}

// liteSessionColumns are the columns liteScanSession reads.
const liteSessionColumns = `id, kind, site, coalesce(page_url, ''), coalesce(user_agent, ''), coalesce(client_ip, ''),
       coalesce(fingerprint, ''), metadata, created_at, last_seen_at, expires_at, revoked_at, message_count,
       user_realm, user_id, coalesce(user_name, ''), coalesce(user_email, ''), user_attributes, mode`

const liteGetSession = `SELECT ` + liteSessionColumns + ` FROM chatproxy_sessions WHERE id = ?1`

// GetSession implements Store.
func (s *SQLiteStore) GetSession(ctx context.Context, id string) (*Session, error) {
	const op = "getting session"
	if !storable(id) {
		return nil, opErr(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	sess, err := liteScanSession(s.r.QueryRowContext(ctx, liteGetSession, id))
	if err != nil {
		return nil, opErr(op, err)
	}
	return sess, nil
}

// liteScanSession reads a row of liteSessionColumns; no row is ErrNotFound.
func liteScanSession(row *sql.Row) (*Session, error) {
	var (
		sess                   Session
		md, attrs              sql.NullString
		realm, userID          sql.NullString
		name, email            string
		created, seen, expires int64
		revoked                sql.NullInt64
	)
	err := row.Scan(
		&sess.ID, &sess.Kind, &sess.Site, &sess.PageURL, &sess.UserAgent, &sess.ClientIP,
		&sess.Fingerprint, &md, &created, &seen, &expires, &revoked, &sess.MessageCount,
		&realm, &userID, &name, &email, &attrs, &sess.Mode)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	if md.Valid {
		sess.Metadata = []byte(md.String)
	}
	if userID.Valid {
		sess.User = &User{ID: userID.String, Realm: realm.String, Name: name, Email: email}
		if attrs.Valid {
			sess.User.Attributes = []byte(attrs.String)
		}
	}
	sess.CreatedAt = fromMicros(created)
	sess.LastSeenAt = fromMicros(seen)
	sess.ExpiresAt = fromMicros(expires)
	if revoked.Valid {
		r := fromMicros(revoked.Int64)
		sess.RevokedAt = &r
	}
	return &sess, nil
}

// TouchSession implements Store.
func (s *SQLiteStore) TouchSession(ctx context.Context, id string, at, expiresAt time.Time) error {
	const op = "touching session"
	if !storable(id) {
		return opErr(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return opErr(op, err)
	}
	w := &writeOp{kind: writeTouch, id: id, at: normTime(at)}
	if !expiresAt.IsZero() {
		e := normTime(expiresAt)
		w.extend = &e
	}
	return opErr(op, s.wr.do(ctx, w))
}

func liteTouchSession(ctx context.Context, tx *sql.Tx, op *writeOp) error {
	var extend any
	if op.extend != nil {
		extend = op.extend.UnixMicro()
	}
	res, err := tx.ExecContext(ctx, `
UPDATE chatproxy_sessions SET last_seen_at = max(last_seen_at, ?2),
    expires_at = CASE WHEN ?3 IS NOT NULL AND revoked_at IS NULL THEN max(expires_at, ?3) ELSE expires_at END
WHERE id = ?1`,
		op.id, op.at.UnixMicro(), extend)
	if err != nil {
		return err
	}
	return mustAffect(res, ErrNotFound)
}

// DeleteSession implements Store; messages go by the foreign key's cascade.
func (s *SQLiteStore) DeleteSession(ctx context.Context, id string) error {
	if !storable(id) {
		return opErr("deleting session", ErrNotFound)
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM chatproxy_sessions WHERE id = ?1`, id)
		if err != nil {
			return err
		}
		return mustAffect(res, ErrNotFound)
	})
	return opErr("deleting session", err)
}

// RevokeSession implements Store.
func (s *SQLiteStore) RevokeSession(ctx context.Context, id string, at time.Time) error {
	if !storable(id) {
		return opErr("revoking session", ErrNotFound)
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx,
			`UPDATE chatproxy_sessions SET revoked_at = coalesce(revoked_at, ?2), message_count = 0 WHERE id = ?1`,
			id, normTime(at).UnixMicro())
		if err != nil {
			return err
		}
		if err := mustAffect(res, ErrNotFound); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `DELETE FROM chatproxy_messages WHERE session_id = ?1`, id)
		return err
	})
	return opErr("revoking session", err)
}

// AppendMessage implements Store.
func (s *SQLiteStore) AppendMessage(ctx context.Context, m *Message) error {
	const op = "appending message"
	if err := prepareMessage(m, time.Now()); err != nil {
		return opErr(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return opErr(op, err)
	}
	return opErr(op, s.wr.do(ctx, &writeOp{kind: writeAppend, msg: m}))
}

func liteAppendMessage(ctx context.Context, tx *sql.Tx, m *Message) error {
	res, err := tx.ExecContext(ctx,
		`UPDATE chatproxy_sessions SET message_count = message_count + 1 WHERE id = ?1 AND revoked_at IS NULL`,
		m.SessionID)
	return liteInsertCounted(ctx, tx, res, err, m)
}

// liteInsertCounted inserts m after the UPDATE that counted it (res, err),
// or returns ErrNotFound if that UPDATE found no session to count it in.
func liteInsertCounted(ctx context.Context, tx *sql.Tx, res sql.Result, err error, m *Message) error {
	if err != nil {
		return err
	}
	if err := mustAffect(res, ErrNotFound); err != nil {
		return err
	}
	return liteInsert(ctx, tx, m)
}

// liteInsert inserts m, counted already.
func liteInsert(ctx context.Context, tx *sql.Tx, m *Message) error {
	_, err := tx.ExecContext(ctx, `
INSERT INTO chatproxy_messages (id, session_id, role, content, status, metadata, created_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)`,
		m.ID, m.SessionID, m.Role, m.Content, m.Status, liteJSON(m.Metadata), m.CreatedAt.UnixMicro())
	if liteUniqueViolation(err) {
		return ErrExists
	}
	return err
}

// AppendUserMessage implements Store.
func (s *SQLiteStore) AppendUserMessage(ctx context.Context, m *Message, kind string) (*Session, error) {
	const op = "appending user message"
	if err := prepareUserMessage(m, time.Now()); err != nil {
		return nil, opErr(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	w := &writeOp{kind: writeAppendUser, msg: m, userKind: kind}
	err := s.wr.do(ctx, w)
	if errors.Is(err, errStoredEarlier) {
		return s.GetSession(ctx, m.SessionID)
	}
	if err != nil {
		return nil, opErr(op, err)
	}
	return w.out, nil
}

// liteAppendUserMessage stores m and, when reply is not nil, the
// streaming reply after it (AppendExchange).
func liteAppendUserMessage(ctx context.Context, tx *sql.Tx, m, reply *Message, kind string) (*Session, error) {
	n := 1
	if reply != nil {
		n = 2
	}
	res, err := tx.ExecContext(ctx, `
UPDATE chatproxy_sessions SET message_count = message_count + CASE mode WHEN 'human' THEN 1 ELSE ?4 END
WHERE id = ?1 AND kind = ?3 AND revoked_at IS NULL AND expires_at > ?2`,
		m.SessionID, m.CreatedAt.UnixMicro(), kind, n)
	if err := liteInsertCounted(ctx, tx, res, err, m); err != nil {
		return nil, err
	}
	sess, err := liteScanSession(tx.QueryRowContext(ctx, liteGetSession, m.SessionID))
	if err != nil || reply == nil || sess.Mode == ModeHuman {
		return sess, err
	}
	return sess, liteInsert(ctx, tx, reply)
}

// AppendExchange implements Store.
func (s *SQLiteStore) AppendExchange(ctx context.Context, m, reply *Message, kind string) (*Session, error) {
	const op = "appending message and reply"
	if err := prepareUserMessage(m, time.Now()); err != nil {
		return nil, opErr(op, err)
	}
	if err := prepareReply(reply, m); err != nil {
		return nil, opErr(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	w := &writeOp{kind: writeAppendUser, msg: m, reply: reply, userKind: kind}
	err := s.wr.do(ctx, w)
	if errors.Is(err, errStoredEarlier) {
		w.out, err = s.GetSession(ctx, m.SessionID)
	}
	if err != nil {
		return nil, opErr(op, err)
	}
	if w.out.Mode != ModeHuman {
		w.out.MessageCount-- // the reply is not counted in what the caller sees
	}
	return w.out, nil
}

// FinishReply implements Store.
func (s *SQLiteStore) FinishReply(ctx context.Context, m *Message) error {
	const op = "finishing reply"
	if err := prepareFinish(m); err != nil {
		return opErr(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return opErr(op, err)
	}
	return opErr(op, s.wr.do(ctx, &writeOp{kind: writeFinish, msg: m}))
}

func liteFinishReply(ctx context.Context, tx *sql.Tx, m *Message) error {
	res, err := tx.ExecContext(ctx, `
UPDATE chatproxy_messages SET content = ?2, status = ?3, metadata = ?4
WHERE id = ?1 AND status = 'streaming'`,
		m.ID, m.Content, m.Status, liteJSON(m.Metadata))
	if err != nil {
		return err
	}
	return mustAffect(res, ErrNotFound)
}

// GetMessage implements Store.
func (s *SQLiteStore) GetMessage(ctx context.Context, sessionID, id string) (*Message, error) {
	const op = "getting message"
	if !storable(id) || !storable(sessionID) {
		return nil, opErr(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	m := Message{SessionID: sessionID}
	var (
		md      sql.NullString
		created int64
	)
	err := s.r.QueryRowContext(ctx, `
SELECT id, role, content, status, metadata, created_at FROM chatproxy_messages
WHERE id = ?1 AND session_id = ?2`, id, sessionID).Scan(&m.ID, &m.Role, &m.Content, &m.Status, &md, &created)
	if errors.Is(err, sql.ErrNoRows) {
		err = ErrNotFound
	}
	if err != nil {
		return nil, opErr(op, err)
	}
	if md.Valid {
		m.Metadata = []byte(md.String)
	}
	m.CreatedAt = fromMicros(created)
	return &m, nil
}

// commitWrites is the writer's commit: the batch in one write transaction.
// Each append runs under a savepoint, so a row that fails (its id taken,
// its session gone) is undone alone and the others are committed.
func (s *SQLiteStore) commitWrites(ctx context.Context, ops []*writeOp) attempt {
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return storeFailed(err, false)
	}
	fail := func(err error) attempt {
		_ = tx.Rollback()
		return storeFailed(err, false)
	}
	for _, op := range ops {
		op.err, op.out = nil, nil
		var err error
		switch op.kind {
		case writeCreate:
			err = liteCreateSession(ctx, tx, op.sess) // one statement: atomic alone
		case writeTouch:
			err = liteTouchSession(ctx, tx, op)
		case writeFinish:
			err = liteFinishReply(ctx, tx, op.msg) // one statement: atomic alone
		case writeAppend, writeAppendUser:
			if _, err := tx.ExecContext(ctx, `SAVEPOINT w`); err != nil {
				return fail(err)
			}
			if op.kind == writeAppend {
				err = liteAppendMessage(ctx, tx, op.msg)
			} else {
				op.out, err = liteAppendUserMessage(ctx, tx, op.msg, op.reply, op.userKind)
			}
			if err != nil && liteRowError(err) {
				if _, err := tx.ExecContext(ctx, `ROLLBACK TO w`); err != nil {
					return fail(err)
				}
			}
			if err == nil || liteRowError(err) {
				if _, err := tx.ExecContext(ctx, `RELEASE w`); err != nil {
					return fail(err)
				}
			}
		}
		if err != nil {
			if !liteRowError(err) {
				return fail(err)
			}
			op.err, op.out = err, nil
		}
	}
	if err := tx.Commit(); err != nil {
		return fail(err)
	}
	return committed()
}

// liteRowError reports a failure of the row itself, which trying again
// cannot mend, as opposed to the database's (busy, I/O, full disk).
func liteRowError(err error) bool {
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrExists) {
		return true
	}
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	switch se.Code() & 0xff {
	case sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_MISMATCH, sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_RANGE:
		return true
	}
	return false
}

// liteListMessages is pgListMessages for SQLite; see there. SQLite's
// octet_length also reads a text's length from its record header only.
const liteListMessages = `
WITH b AS (
    SELECT seq FROM chatproxy_messages WHERE session_id = ?1 AND id = ?2
), newest AS (
    SELECT seq, octet_length(content) AS size
    FROM chatproxy_messages
    WHERE session_id = ?1 AND (?2 = '' OR seq < (SELECT seq FROM b))
    ORDER BY seq DESC
    LIMIT ?3
), sized AS (
    SELECT seq, row_number() OVER w AS n, sum(size) OVER w AS upto
    FROM newest
    WINDOW w AS (ORDER BY seq DESC ROWS UNBOUNDED PRECEDING)
), kept AS (
    SELECT seq FROM sized WHERE n = 1 OR ?4 <= 0 OR upto <= ?4
), page AS (
    SELECT m.seq, m.id, m.role, m.content, m.status, m.metadata, m.created_at
    FROM kept JOIN chatproxy_messages m ON m.seq = kept.seq
)
SELECT (SELECT count(*) FROM chatproxy_messages WHERE session_id = ?1),
       (?2 = '' OR EXISTS (SELECT 1 FROM b)),
       (SELECT count(*) FROM sized) > (SELECT count(*) FROM kept),
       page.id, page.role, page.content, page.status, page.metadata, page.created_at
FROM (SELECT 1) AS one LEFT JOIN page ON 1
ORDER BY page.seq DESC`

// ListMessages implements Store.
func (s *SQLiteStore) ListMessages(ctx context.Context, sessionID, before string, limit int) (*Page, error) {
	return s.ListMessagesWithin(ctx, sessionID, before, limit, 0)
}

// ListMessagesWithin implements Store.
func (s *SQLiteStore) ListMessagesWithin(ctx context.Context, sessionID, before string, limit, maxBytes int) (*Page, error) {
	const op = "listing messages"
	if limit < 0 {
		return nil, opErr(op, fmt.Errorf("negative limit %d", limit))
	}
	if !storable(sessionID) || !storable(before) {
		p, err := unstorablePage(before)
		return p, opErr(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	rows, err := s.r.QueryContext(ctx, liteListMessages, sessionID, before, int64(limit)+1, int64(maxBytes))
	if err != nil {
		return nil, opErr(op, err)
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
			id, role, content, status, md sql.NullString
			created                       sql.NullInt64
		)
		if err := rows.Scan(&total, &beforeOK, &cut, &id, &role, &content, &status, &md, &created); err != nil {
			return nil, opErr(op, err)
		}
		if !id.Valid {
			continue
		}
		m := Message{
			ID: id.String, SessionID: sessionID, Role: role.String, Content: content.String,
			Status: status.String, CreatedAt: fromMicros(created.Int64),
		}
		if md.Valid {
			m.Metadata = []byte(md.String)
		}
		page.Messages = append(page.Messages, m)
	}
	if err := rows.Err(); err != nil {
		return nil, opErr(op, err)
	}
	if !beforeOK {
		return nil, opErr(op, ErrNotFound)
	}
	page.TotalCount = int(total)
	finishPage(&page, limit, cut)
	return &page, nil
}

// SetSessionMode implements Store.
func (s *SQLiteStore) SetSessionMode(ctx context.Context, id, mode string) error {
	const op = "setting session mode"
	if err := checkMode(mode); err != nil {
		return opErr(op, err)
	}
	if !storable(id) {
		return opErr(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return opErr(op, err)
	}
	return opErr(op, s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE chatproxy_sessions SET mode = ?2 WHERE id = ?1 AND revoked_at IS NULL`, id, mode)
		if err != nil {
			return err
		}
		return mustAffect(res, ErrNotFound)
	}))
}

// liteListMessagesAfter is pgListMessagesAfter for SQLite; the first
// column tells whether the after message exists.
const liteListMessagesAfter = `
WITH a AS (
    SELECT seq FROM chatproxy_messages WHERE session_id = ?1 AND id = ?2
), page AS (
    SELECT seq, id, role, content, status, metadata, created_at FROM chatproxy_messages
    WHERE session_id = ?1 AND seq > (SELECT seq FROM a)
    ORDER BY seq LIMIT ?3
)
SELECT EXISTS (SELECT 1 FROM a), page.id, page.role, page.content, page.status, page.metadata, page.created_at
FROM (SELECT 1) AS one LEFT JOIN page ON 1
ORDER BY page.seq`

// ListMessagesAfter implements Store.
func (s *SQLiteStore) ListMessagesAfter(ctx context.Context, sessionID, after string, limit int) ([]Message, error) {
	const op = "listing messages after"
	if limit < 0 {
		return nil, opErr(op, fmt.Errorf("negative limit %d", limit))
	}
	if !storable(sessionID) || !storable(after) || after == "" {
		return nil, opErr(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	rows, err := s.r.QueryContext(ctx, liteListMessagesAfter, sessionID, after, int64(limit))
	if err != nil {
		return nil, opErr(op, err)
	}
	defer rows.Close()
	var (
		out   []Message
		found bool
	)
	for rows.Next() {
		var (
			id, role, content, status, md sql.NullString
			created                       sql.NullInt64
		)
		if err := rows.Scan(&found, &id, &role, &content, &status, &md, &created); err != nil {
			return nil, opErr(op, err)
		}
		if !id.Valid {
			continue
		}
		m := Message{
			ID: id.String, SessionID: sessionID, Role: role.String, Content: content.String,
			Status: status.String, CreatedAt: fromMicros(created.Int64),
		}
		if md.Valid {
			m.Metadata = []byte(md.String)
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, opErr(op, err)
	}
	if !found {
		return nil, opErr(op, ErrNotFound)
	}
	return out, nil
}

// Purge implements Store. Each batch is its own write transaction, so a
// large backlog never holds the write lock (and the chat's writes) for
// long: first old messages, then expired sessions with what they have left.
func (s *SQLiteStore) Purge(ctx context.Context, expiredBefore, messagesBefore time.Time) (int64, int64, error) {
	exp, old := normTime(expiredBefore).UnixMicro(), normTime(messagesBefore).UnixMicro()
	var sessions, messages int64
	for _, batch := range []func(*sql.Tx) (ns, nm int64, more bool, err error){
		func(tx *sql.Tx) (int64, int64, bool, error) { return litePurgeOldMessages(ctx, tx, old) },
		func(tx *sql.Tx) (int64, int64, bool, error) { return litePurgeExpiredSessions(ctx, tx, exp) },
	} {
		for more := true; more; {
			var ns, nm int64
			err := s.write(ctx, func(tx *sql.Tx) error {
				var err error
				ns, nm, more, err = batch(tx)
				return err
			})
			if err != nil {
				return sessions, messages, opErr("purging", err)
			}
			sessions += ns
			messages += nm
		}
	}
	return sessions, messages, nil
}

// litePurgeOldMessages deletes up to purgeBatch messages created before
// old (the oldest by seq, up to a bound) and lowers their sessions'
// message_count to match. The write transaction excludes every other
// writer, so the statements see the same rows.
func litePurgeOldMessages(ctx context.Context, tx *sql.Tx, old int64) (int64, int64, bool, error) {
	var bound sql.NullInt64
	var n int64
	err := tx.QueryRowContext(ctx, `
SELECT max(seq), count(*) FROM (
    SELECT seq FROM chatproxy_messages WHERE created_at < ?1 ORDER BY seq LIMIT ?2
)`, old, purgeBatch).Scan(&bound, &n)
	if err != nil || !bound.Valid {
		return 0, 0, false, err
	}
	if _, err := tx.ExecContext(ctx, `
UPDATE chatproxy_sessions
SET message_count = max(message_count -
    (SELECT count(*) FROM chatproxy_messages m
     WHERE m.session_id = chatproxy_sessions.id AND m.created_at < ?1 AND m.seq <= ?2), 0)
WHERE id IN (SELECT session_id FROM chatproxy_messages WHERE created_at < ?1 AND seq <= ?2)`, old, bound.Int64); err != nil {
		return 0, 0, false, err
	}
	res, err := tx.ExecContext(ctx, `DELETE FROM chatproxy_messages WHERE created_at < ?1 AND seq <= ?2`, old, bound.Int64)
	if err != nil {
		return 0, 0, false, err
	}
	deleted, err := res.RowsAffected()
	return 0, deleted, n >= int64(purgeBatch), err
}

// litePurgeExpiredSessions deletes up to purgeBatch sessions that expired
// before exp, with their messages; both statements pick the same sessions
// (same order, same transaction).
func litePurgeExpiredSessions(ctx context.Context, tx *sql.Tx, exp int64) (int64, int64, bool, error) {
	const batch = `SELECT id FROM chatproxy_sessions WHERE expires_at < ?1 ORDER BY expires_at, id LIMIT ?2`
	res, err := tx.ExecContext(ctx, `DELETE FROM chatproxy_messages WHERE session_id IN (`+batch+`)`, exp, purgeBatch)
	if err != nil {
		return 0, 0, false, err
	}
	nm, err := res.RowsAffected()
	if err != nil {
		return 0, 0, false, err
	}
	if res, err = tx.ExecContext(ctx, `DELETE FROM chatproxy_sessions WHERE id IN (`+batch+`)`, exp, purgeBatch); err != nil {
		return 0, 0, false, err
	}
	ns, err := res.RowsAffected()
	return ns, nm, ns >= int64(purgeBatch), err
}

// Stats implements Store.
func (s *SQLiteStore) Stats(ctx context.Context) (*Stats, error) {
	const op = "reading stats"
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	var st Stats
	v, err := migrations.Version(ctx, s.r, migrations.SQLite)
	if err != nil {
		return nil, opErr(op, err)
	}
	st.SchemaVersion = v
	err = s.r.QueryRowContext(ctx, `SELECT (SELECT count(*) FROM chatproxy_sessions), (SELECT count(*) FROM chatproxy_messages)`).
		Scan(&st.Sessions, &st.Messages)
	if err != nil {
		return nil, opErr(op, err)
	}
	return &st, nil
}

// Status reports the schema version, the pending migrations and the row
// counts. Unlike every other method it never migrates, and it does not
// create a missing file: it reads through the query-only connections.
func (s *SQLiteStore) Status(ctx context.Context) (*Status, error) {
	const op = "reading status"
	if _, err := os.Stat(s.path); errors.Is(err, os.ErrNotExist) {
		return &Status{Pending: migrations.PendingAfter(migrations.SQLite, 0)}, nil
	} else if err != nil {
		return nil, opErr(op, err)
	}
	var st Status
	var err error
	st.SchemaVersion, st.Pending, err = migrations.Pending(ctx, s.r, migrations.SQLite)
	if err != nil {
		return nil, opErr(op, err)
	}
	if st.SchemaVersion == 0 {
		return &st, nil // no tables to count
	}
	err = s.r.QueryRowContext(ctx, `SELECT (SELECT count(*) FROM chatproxy_sessions), (SELECT count(*) FROM chatproxy_messages)`).
		Scan(&st.Sessions, &st.Messages)
	if err != nil {
		return nil, opErr(op, err)
	}
	return &st, nil
}

// Ping implements Store.
func (s *SQLiteStore) Ping(ctx context.Context) error {
	const op = "pinging database"
	if err := s.ready(ctx); err != nil {
		return opErr(op, err)
	}
	if err := s.w.PingContext(ctx); err != nil {
		return opErr(op, err)
	}
	return opErr(op, s.r.PingContext(ctx))
}

// Close implements Store. Writes already queued are committed first (or
// fail after store_wait).
func (s *SQLiteStore) Close() error {
	s.wr.close()
	return opErr("closing sqlite store", errors.Join(s.r.Close(), s.w.Close()))
}

func fromMicros(us int64) time.Time { return time.UnixMicro(us).UTC() }

func liteJSON(md []byte) any {
	if len(md) == 0 {
		return nil
	}
	return string(md)
}

// mustAffect turns "no row changed" into notFound.
func mustAffect(res sql.Result, notFound error) error {
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return notFound
	}
	return nil
}

func liteUniqueViolation(err error) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	return se.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || se.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY
}
