package sessions

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// A verified user's conversations on PostgreSQL (see Store). These writes
// are rare (a device opening the chat, an erasure) and go straight to the
// pool rather than through the group-commit writer.

// pgResumeUserSession locks the user's latest active session and updates
// it in one statement; the outer WHERE checks again what the lock waited
// for (a revocation meanwhile).
const pgResumeUserSession = `
UPDATE chatproxy_sessions
SET last_seen_at = greatest(last_seen_at, $3), expires_at = greatest(expires_at, $4),
    user_name = nullif($5, ''), user_email = nullif($6, ''), user_attributes = $7
WHERE id = (
    SELECT id FROM chatproxy_sessions
    WHERE user_realm = $1 AND user_id = $2 AND kind = $8::text AND ($9::text = '' OR site = $9::text) AND revoked_at IS NULL AND expires_at > $3
    ORDER BY last_seen_at DESC, created_at DESC, id DESC
    LIMIT 1
    FOR UPDATE
) AND revoked_at IS NULL AND expires_at > $3
RETURNING ` + pgSessionColumns

// ResumeUserSession implements Store.
func (s *PostgresStore) ResumeUserSession(ctx context.Context, u *User, at, expiresAt time.Time) (*Session, error) {
	return s.resumeUser(ctx, "resuming user session", u, KindVisitor, "", at, expiresAt)
}

// ResumeUserWidget implements Store.
func (s *PostgresStore) ResumeUserWidget(ctx context.Context, u *User, site string, at, expiresAt time.Time) (*Session, error) {
	if site == "" || !storable(site) {
		return nil, s.fail("resuming user widget session", ErrNotFound)
	}
	return s.resumeUser(ctx, "resuming user widget session", u, KindWidget, site, at, expiresAt)
}

// resumeUser is ResumeUserSession for sessions of kind (on site, when
// not empty).
func (s *PostgresStore) resumeUser(ctx context.Context, op string, u *User, kind, site string, at, expiresAt time.Time) (*Session, error) {
	if u == nil {
		return nil, s.fail(op, errors.New("no user"))
	}
	c := *u
	if err := prepareUser(&c); err != nil {
		return nil, s.fail(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	sess, err := pgScanSession(s.pool.QueryRow(ctx, pgResumeUserSession,
		c.Realm, c.ID, normTime(at), normTime(expiresAt), c.Name, c.Email, jsonArg(c.Attributes), kind, site))
	if err != nil {
		return nil, s.fail(op, err)
	}
	return sess, nil
}

// AdoptSession implements Store. The anonymous session's row is locked
// first, as an append locks it, so a message arriving meanwhile either
// moves with the others or finds the session gone.
func (s *PostgresStore) AdoptSession(ctx context.Context, fromID string, sess *Session, at time.Time) error {
	const op = "adopting session"
	if sess.User == nil {
		return s.fail(op, errors.New("adopting session: no user"))
	}
	if err := prepareSession(sess, time.Now()); err != nil {
		return s.fail(op, err)
	}
	if !storable(fromID) {
		return s.fail(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	at = normTime(at)
	var moved int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var one int
		err := tx.QueryRow(ctx, `
SELECT 1 FROM chatproxy_sessions
WHERE id = $1 AND kind = $3 AND user_id IS NULL AND revoked_at IS NULL AND expires_at > $2
FOR UPDATE`, fromID, at, sess.Kind).Scan(&one)
		if errors.Is(err, pgx.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		realm, userID, name, email, attrs := userArgs(sess.User)
		tag, err := tx.Exec(ctx, pgInsertSession,
			sess.ID, sess.Kind, sess.Site, sess.PageURL, sess.UserAgent, sess.ClientIP, sess.Fingerprint,
			jsonArg(sess.Metadata), sess.CreatedAt, sess.LastSeenAt, sess.ExpiresAt, sess.RevokedAt,
			realm, userID, name, email, jsonArg(attrs))
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return ErrExists
		}
		if tag, err = tx.Exec(ctx, `UPDATE chatproxy_messages SET session_id = $2 WHERE session_id = $1`, fromID, sess.ID); err != nil {
			return err
		}
		moved = tag.RowsAffected()
		if _, err := tx.Exec(ctx, `UPDATE chatproxy_sessions SET message_count = $2 WHERE id = $1`, sess.ID, moved); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `DELETE FROM chatproxy_sessions WHERE id = $1`, fromID)
		return err
	})
	if err != nil {
		return s.fail(op, err)
	}
	sess.MessageCount = int(moved)
	return nil
}

// pgListUserSessions answers a page of a user's conversations in one
// statement. The cursor row is looked up among all the user's sessions;
// the page among the active ones. $5 is limit+1: the extra row only
// tells whether more exist. Each conversation's last message comes from
// the (session_id, seq) index, its preview from its first user message.
const pgListUserSessions = `
WITH b AS (
    SELECT created_at, id FROM chatproxy_sessions
    WHERE user_realm = $1 AND user_id = $2 AND id = $3::text
), page AS (
    SELECT s.id, s.created_at, s.last_seen_at, s.expires_at, s.message_count
    FROM chatproxy_sessions s
    WHERE s.user_realm = $1 AND s.user_id = $2 AND s.kind = 'visitor'
      AND s.revoked_at IS NULL AND s.expires_at > $4
      AND ($3::text = '' OR (s.created_at, s.id) < (SELECT created_at, id FROM b))
    ORDER BY s.created_at DESC, s.id DESC
    LIMIT $5
)
SELECT ($3::text = '' OR EXISTS (SELECT 1 FROM b)),
       page.id, page.created_at, page.last_seen_at, page.expires_at, page.message_count,
       (SELECT m.created_at FROM chatproxy_messages m WHERE m.session_id = page.id ORDER BY m.seq DESC LIMIT 1),
       (SELECT left(m.content, $6) FROM chatproxy_messages m
        WHERE m.session_id = page.id AND m.role = 'user' ORDER BY m.seq LIMIT 1)
FROM (VALUES (1)) AS one (x) LEFT JOIN page ON true
ORDER BY page.created_at DESC, page.id DESC`

// ListUserSessions implements Store.
func (s *PostgresStore) ListUserSessions(ctx context.Context, realm, userID, before string, limit int, now time.Time) (*ConversationPage, error) {
	const op = "listing user sessions"
	if limit < 0 {
		return nil, s.fail(op, fmt.Errorf("negative limit %d", limit))
	}
	if !storable(realm) || !storable(userID) || !storable(before) {
		if before != "" {
			return nil, s.fail(op, ErrNotFound)
		}
		return &ConversationPage{}, nil
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	rows, err := s.pool.Query(ctx, pgListUserSessions, realm, userID, before, normTime(now), int64(limit)+1, PreviewLength)
	if err != nil {
		return nil, s.fail(op, err)
	}
	defer rows.Close()
	var (
		page     ConversationPage
		beforeOK bool
	)
	for rows.Next() {
		var (
			id                     *string
			created, seen, expires *time.Time
			count                  *int
			lastMessage            *time.Time
			preview                *string
		)
		if err := rows.Scan(&beforeOK, &id, &created, &seen, &expires, &count, &lastMessage, &preview); err != nil {
			return nil, s.fail(op, err)
		}
		if id == nil {
			continue
		}
		c := Conversation{ID: *id, CreatedAt: created.UTC(), LastSeenAt: seen.UTC(), ExpiresAt: expires.UTC(), MessageCount: *count}
		if lastMessage != nil {
			c.LastMessageAt = lastMessage.UTC()
		}
		if preview != nil {
			c.Preview = *preview
		}
		page.Conversations = append(page.Conversations, c)
	}
	if err := rows.Err(); err != nil {
		return nil, s.fail(op, err)
	}
	if !beforeOK {
		return nil, s.fail(op, ErrNotFound)
	}
	finishConversations(&page, limit)
	return &page, nil
}

// DeleteUser implements Store. Each batch is a transaction: up to
// userDeleteBatch of the user's sessions (the oldest, by the user index)
// are locked, in id order as a purge locks them, so an append or
// revocation under way finishes before (or finds the session gone), then
// deleted with their messages; their revoked tokens go by the foreign
// key's cascade.
func (s *PostgresStore) DeleteUser(ctx context.Context, realm, userID string) (int64, int64, error) {
	const op = "deleting user"
	if !storable(realm) || !storable(userID) {
		return 0, 0, nil // nothing stored can have them
	}
	if err := s.ready(ctx); err != nil {
		return 0, 0, s.fail(op, err)
	}
	var ns, nm int64
	for {
		var bs, bm int64
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			rows, err := tx.Query(ctx, `
SELECT id FROM chatproxy_sessions
WHERE id IN (
    SELECT id FROM chatproxy_sessions WHERE user_realm = $1 AND user_id = $2
    ORDER BY created_at, id LIMIT $3
)
ORDER BY id FOR UPDATE`, realm, userID, userDeleteBatch)
			if err != nil {
				return err
			}
			ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil || len(ids) == 0 {
				return err
			}
			mtag, err := tx.Exec(ctx, `DELETE FROM chatproxy_messages WHERE session_id = ANY($1)`, ids)
			if err != nil {
				return err
			}
			stag, err := tx.Exec(ctx, `DELETE FROM chatproxy_sessions WHERE id = ANY($1)`, ids)
			if err != nil {
				return err
			}
			bs, bm = stag.RowsAffected(), mtag.RowsAffected()
			return nil
		})
		if err != nil {
			return ns, nm, s.fail(op, err)
		}
		ns, nm = ns+bs, nm+bm
		if bs == 0 {
			return ns, nm, nil
		}
	}
}

// RevokeToken implements Store.
func (s *PostgresStore) RevokeToken(ctx context.Context, sessionID, jti string, at time.Time) error {
	const op = "revoking token"
	if !storable(sessionID) {
		return s.fail(op, ErrNotFound)
	}
	if !storable(jti) || jti == "" {
		return s.fail(op, fmt.Errorf("%w: token id %q", ErrInvalidData, jti))
	}
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	var found bool
	err := s.pool.QueryRow(ctx, `
WITH s AS (SELECT id FROM chatproxy_sessions WHERE id = $2),
i AS (
    INSERT INTO chatproxy_revoked_tokens (jti, session_id, revoked_at)
    SELECT $1, s.id, $3 FROM s
    ON CONFLICT (jti) DO NOTHING
)
SELECT EXISTS (SELECT 1 FROM s)`, jti, sessionID, normTime(at)).Scan(&found)
	if err != nil {
		return s.fail(op, err)
	}
	if !found {
		return s.fail(op, ErrNotFound)
	}
	return nil
}

// TokenRevoked implements Store.
func (s *PostgresStore) TokenRevoked(ctx context.Context, sessionID, jti string) (bool, error) {
	const op = "checking token"
	if !storable(sessionID) || !storable(jti) {
		return false, nil
	}
	if err := s.ready(ctx); err != nil {
		return false, s.fail(op, err)
	}
	var revoked bool
	err := s.pool.QueryRow(ctx, `
SELECT EXISTS (SELECT 1 FROM chatproxy_revoked_tokens WHERE jti = $1 AND session_id = $2)`, jti, sessionID).Scan(&revoked)
	if err != nil {
		return false, s.fail(op, err)
	}
	return revoked, nil
}
