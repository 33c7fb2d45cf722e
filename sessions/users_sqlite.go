package sessions

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// A verified user's conversations in the embedded store (see Store and
// users_postgres.go). Each call is one write transaction, which excludes
// every other writer, so its statements see the same rows.

const liteResumeUserSession = `
UPDATE chatproxy_sessions
SET last_seen_at = max(last_seen_at, ?3), expires_at = max(expires_at, ?4),
    user_name = nullif(?5, ''), user_email = nullif(?6, ''), user_attributes = ?7
WHERE id = (
    SELECT id FROM chatproxy_sessions
    WHERE user_realm = ?1 AND user_id = ?2 AND kind = ?8 AND (?9 = '' OR site = ?9) AND revoked_at IS NULL AND expires_at > ?3
    ORDER BY last_seen_at DESC, created_at DESC, id DESC
    LIMIT 1
)
RETURNING ` + liteSessionColumns

// ResumeUserSession implements Store.
func (s *SQLiteStore) ResumeUserSession(ctx context.Context, u *User, at, expiresAt time.Time) (*Session, error) {
	return s.resumeUser(ctx, "resuming user session", u, KindVisitor, "", at, expiresAt)
}

// ResumeUserWidget implements Store.
func (s *SQLiteStore) ResumeUserWidget(ctx context.Context, u *User, site string, at, expiresAt time.Time) (*Session, error) {
	if site == "" || !storable(site) {
		return nil, opErr("resuming user widget session", ErrNotFound)
	}
	return s.resumeUser(ctx, "resuming user widget session", u, KindWidget, site, at, expiresAt)
}

// resumeUser is ResumeUserSession for sessions of kind (on site, when
// not empty).
func (s *SQLiteStore) resumeUser(ctx context.Context, op string, u *User, kind, site string, at, expiresAt time.Time) (*Session, error) {
	if u == nil {
		return nil, opErr(op, errors.New("no user"))
	}
	c := *u
	if err := prepareUser(&c); err != nil {
		return nil, opErr(op, err)
	}
	var sess *Session
	err := s.write(ctx, func(tx *sql.Tx) error {
		var err error
		sess, err = liteScanSession(tx.QueryRowContext(ctx, liteResumeUserSession,
			c.Realm, c.ID, normTime(at).UnixMicro(), normTime(expiresAt).UnixMicro(), c.Name, c.Email, liteJSON(c.Attributes), kind, site))
		return err
	})
	if err != nil {
		return nil, opErr(op, err)
	}
	return sess, nil
}

// AdoptSession implements Store.
func (s *SQLiteStore) AdoptSession(ctx context.Context, fromID string, sess *Session, at time.Time) error {
	const op = "adopting session"
	if sess.User == nil {
		return opErr(op, errors.New("no user"))
	}
	if err := prepareSession(sess, time.Now()); err != nil {
		return opErr(op, err)
	}
	if !storable(fromID) {
		return opErr(op, ErrNotFound)
	}
	atUS := normTime(at).UnixMicro()
	var moved int64
	err := s.write(ctx, func(tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `
SELECT 1 FROM chatproxy_sessions
WHERE id = ?1 AND kind = ?3 AND user_id IS NULL AND revoked_at IS NULL AND expires_at > ?2`, fromID, atUS, sess.Kind).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		if err := liteCreateSession(ctx, tx, sess); err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `UPDATE chatproxy_messages SET session_id = ?2 WHERE session_id = ?1`, fromID, sess.ID)
		if err != nil {
			return err
		}
		if moved, err = res.RowsAffected(); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE chatproxy_sessions SET message_count = ?2 WHERE id = ?1`, sess.ID, moved); err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `DELETE FROM chatproxy_sessions WHERE id = ?1`, fromID)
		return err
	})
	if err != nil {
		return opErr(op, err)
	}
	sess.MessageCount = int(moved)
	return nil
}

// liteListUserSessions is pgListUserSessions for SQLite; see there.
const liteListUserSessions = `
WITH b AS (
    SELECT created_at, id FROM chatproxy_sessions
    WHERE user_realm = ?1 AND user_id = ?2 AND id = ?3
), page AS (
    SELECT s.id, s.created_at, s.last_seen_at, s.expires_at, s.message_count
    FROM chatproxy_sessions s
    WHERE s.user_realm = ?1 AND s.user_id = ?2 AND s.kind = 'visitor'
      AND s.revoked_at IS NULL AND s.expires_at > ?4
      AND (?3 = '' OR (s.created_at, s.id) < (SELECT created_at, id FROM b))
    ORDER BY s.created_at DESC, s.id DESC
    LIMIT ?5
)
SELECT (?3 = '' OR EXISTS (SELECT 1 FROM b)),
       page.id, page.created_at, page.last_seen_at, page.expires_at, page.message_count,
       (SELECT m.created_at FROM chatproxy_messages m WHERE m.session_id = page.id ORDER BY m.seq DESC LIMIT 1),
       (SELECT substr(m.content, 1, ?6) FROM chatproxy_messages m
        WHERE m.session_id = page.id AND m.role = 'user' ORDER BY m.seq LIMIT 1)
FROM (SELECT 1) AS one LEFT JOIN page ON 1
ORDER BY page.created_at DESC, page.id DESC`

// ListUserSessions implements Store.
func (s *SQLiteStore) ListUserSessions(ctx context.Context, realm, userID, before string, limit int, now time.Time) (*ConversationPage, error) {
	const op = "listing user sessions"
	if limit < 0 {
		return nil, opErr(op, fmt.Errorf("negative limit %d", limit))
	}
	if !storable(realm) || !storable(userID) || !storable(before) {
		if before != "" {
			return nil, opErr(op, ErrNotFound)
		}
		return &ConversationPage{}, nil
	}
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	rows, err := s.r.QueryContext(ctx, liteListUserSessions, realm, userID, before, normTime(now).UnixMicro(), int64(limit)+1, PreviewLength)
	if err != nil {
		return nil, opErr(op, err)
	}
	defer rows.Close()
	var (
		page     ConversationPage
		beforeOK bool
	)
	for rows.Next() {
		var (
			id, preview                         sql.NullString
			created, seen, expires, lastMessage sql.NullInt64
			count                               sql.NullInt64
		)
		if err := rows.Scan(&beforeOK, &id, &created, &seen, &expires, &count, &lastMessage, &preview); err != nil {
			return nil, opErr(op, err)
		}
		if !id.Valid {
			continue
		}
		c := Conversation{
			ID: id.String, CreatedAt: fromMicros(created.Int64), LastSeenAt: fromMicros(seen.Int64),
			ExpiresAt: fromMicros(expires.Int64), MessageCount: int(count.Int64), Preview: preview.String,
		}
		if lastMessage.Valid {
			c.LastMessageAt = fromMicros(lastMessage.Int64)
		}
		page.Conversations = append(page.Conversations, c)
	}
	if err := rows.Err(); err != nil {
		return nil, opErr(op, err)
	}
	if !beforeOK {
		return nil, opErr(op, ErrNotFound)
	}
	finishConversations(&page, limit)
	return &page, nil
}

// DeleteUser implements Store, in batches of userDeleteBatch sessions
// (the oldest first), each one write transaction, so other writers get
// in between.
func (s *SQLiteStore) DeleteUser(ctx context.Context, realm, userID string) (int64, int64, error) {
	const op = "deleting user"
	if !storable(realm) || !storable(userID) {
		return 0, 0, nil // nothing stored can have them
	}
	// The same rows in both statements: nothing else writes in between.
	const ids = `SELECT id FROM chatproxy_sessions WHERE user_realm = ?1 AND user_id = ?2 ORDER BY created_at, id LIMIT ?3`
	var ns, nm int64
	for {
		var bs, bm int64
		err := s.write(ctx, func(tx *sql.Tx) error {
			res, err := tx.ExecContext(ctx, `DELETE FROM chatproxy_messages WHERE session_id IN (`+ids+`)`, realm, userID, userDeleteBatch)
			if err != nil {
				return err
			}
			if bm, err = res.RowsAffected(); err != nil {
				return err
			}
			if res, err = tx.ExecContext(ctx, `DELETE FROM chatproxy_sessions WHERE id IN (`+ids+`)`, realm, userID, userDeleteBatch); err != nil {
				return err
			}
			bs, err = res.RowsAffected()
			return err
		})
		if err != nil {
			return ns, nm, opErr(op, err)
		}
		ns, nm = ns+bs, nm+bm
		if bs == 0 {
			return ns, nm, nil
		}
	}
}

// RevokeToken implements Store.
func (s *SQLiteStore) RevokeToken(ctx context.Context, sessionID, jti string, at time.Time) error {
	const op = "revoking token"
	if !storable(sessionID) {
		return opErr(op, ErrNotFound)
	}
	if !storable(jti) || jti == "" {
		return opErr(op, fmt.Errorf("%w: token id %q", ErrInvalidData, jti))
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM chatproxy_sessions WHERE id = ?1`, sessionID).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `
INSERT INTO chatproxy_revoked_tokens (jti, session_id, revoked_at) VALUES (?1, ?2, ?3)
ON CONFLICT (jti) DO NOTHING`, jti, sessionID, normTime(at).UnixMicro())
		return err
	})
	return opErr(op, err)
}

// TokenRevoked implements Store.
func (s *SQLiteStore) TokenRevoked(ctx context.Context, sessionID, jti string) (bool, error) {
	const op = "checking token"
	if !storable(sessionID) || !storable(jti) {
		return false, nil
	}
	if err := s.ready(ctx); err != nil {
		return false, opErr(op, err)
	}
	var revoked bool
	err := s.r.QueryRowContext(ctx, `
SELECT EXISTS (SELECT 1 FROM chatproxy_revoked_tokens WHERE jti = ?1 AND session_id = ?2)`, jti, sessionID).Scan(&revoked)
	if err != nil {
		return false, opErr(op, err)
	}
	return revoked, nil
}
