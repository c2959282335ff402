//! The embedded store: one SQLite database in WAL mode, its schema moved
//! forward by numbered migrations recorded in `PRAGMA user_version`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::{Kind, Log, LogEntry, LogQuery, Record, Store, StoreError};

/// Migration N (1-based) takes the schema from version N-1 to N. Never edit
/// one that has shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: documents and logs.
    "CREATE TABLE records (
         kind TEXT NOT NULL,
         id TEXT NOT NULL,
         version INTEGER NOT NULL,
         body TEXT NOT NULL,
         PRIMARY KEY (kind, id)
     ) WITHOUT ROWID;
     CREATE TABLE audit (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         subject TEXT NOT NULL,
         body TEXT NOT NULL
     );
     CREATE INDEX audit_subject ON audit (subject, seq);
     CREATE TABLE events (
         seq INTEGER PRIMARY KEY AUTOINCREMENT,
         subject TEXT NOT NULL,
         body TEXT NOT NULL
     );
     CREATE INDEX events_subject ON events (subject, seq);",
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn db(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Database { context, source }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(db(format!("cannot open {}", path.display())))?;
        Self::init(conn)
    }

    /// A private in-memory database (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(db("cannot open in memory"))?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        // WAL: readers never wait for the writer, and a crash loses at most
        // the last transactions, never the database. NORMAL sync is durable
        // across process crashes (kill -9), which is what keeld must
        // survive; a power cut may lose the last commits.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db("cannot enable WAL"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db("cannot set synchronous"))?;
        // What is deleted or overwritten (old records, expired replies) is
        // zeroed, not left in free pages for a copy of the file to show.
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(db("cannot set secure_delete"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db("cannot set busy timeout"))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn schema_version(&self) -> Result<u32, StoreError> {
        user_version(&self.conn())
    }
}

fn user_version(conn: &Connection) -> Result<u32, StoreError> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db("cannot read the schema version"))
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found = user_version(conn)?;
    let known = MIGRATIONS.len() as u32;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = i as u32 + 1;
        let tx = conn
            .transaction()
            .map_err(db(format!("cannot start migration {to}")))?;
        tx.execute_batch(sql)
            .map_err(db(format!("migration {to} failed")))?;
        tx.pragma_update(None, "user_version", to)
            .map_err(db(format!("cannot record migration {to}")))?;
        tx.commit()
            .map_err(db(format!("cannot commit migration {to}")))?;
    }
    Ok(())
}

fn parse_body(kind: Kind, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Corrupt { kind, source })
}

fn log_table(log: Log) -> &'static str {
    match log {
        Log::Audit => "audit",
        Log::Event => "events",
    }
}

impl Store for SqliteStore {
    fn get(&self, kind: Kind, id: &str) -> Result<Option<Record>, StoreError> {
        let conn = self.conn();
        let row: Option<(i64, String)> = conn
            .query_row(
                "SELECT version, body FROM records WHERE kind = ?1 AND id = ?2",
                params![kind.as_str(), id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db(format!("cannot read {kind} {id}")))?;
        row.map(|(version, body)| {
            Ok(Record {
                kind,
                id: id.to_string(),
                version: version as u64,
                body: parse_body(kind, &body)?,
            })
        })
        .transpose()
    }

    fn list(&self, kind: Kind) -> Result<Vec<Record>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT id, version, body FROM records WHERE kind = ?1 ORDER BY id")
            .map_err(db(format!("cannot list {kind}")))?;
        let rows = stmt
            .query_map(params![kind.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db(format!("cannot list {kind}")))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, version, body) = row.map_err(db(format!("cannot list {kind}")))?;
            out.push(Record {
                kind,
                id,
                version: version as u64,
                body: parse_body(kind, &body)?,
            });
        }
        Ok(out)
    }

    fn put(
        &self,
        kind: Kind,
        id: &str,
        expected: u64,
        body: &serde_json::Value,
    ) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let context = || format!("cannot write {kind} {id}");
        let tx = conn.transaction().map_err(db(context()))?;
        let found: u64 = tx
            .query_row(
                "SELECT version FROM records WHERE kind = ?1 AND id = ?2",
                params![kind.as_str(), id],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(db(context()))?
            .unwrap_or(0) as u64;
        if found != expected {
            return Err(StoreError::Conflict {
                kind,
                id: id.to_string(),
                expected,
                found,
            });
        }
        let version = found + 1;
        tx.execute(
            "INSERT INTO records (kind, id, version, body) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kind, id) DO UPDATE SET version = ?3, body = ?4",
            params![kind.as_str(), id, version as i64, body.to_string()],
        )
        .map_err(db(context()))?;
        tx.commit().map_err(db(context()))?;
        Ok(version)
    }

    fn delete(&self, kind: Kind, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM records WHERE kind = ?1 AND id = ?2",
                params![kind.as_str(), id],
            )
            .map_err(db(format!("cannot delete {kind} {id}")))?;
        Ok(n > 0)
    }

    fn append(&self, log: Log, subject: &str, body: &serde_json::Value) -> Result<u64, StoreError> {
        let table = log_table(log);
        let conn = self.conn();
        conn.execute(
            &format!("INSERT INTO {table} (subject, body) VALUES (?1, ?2)"),
            params![subject, body.to_string()],
        )
        .map_err(db(format!("cannot append to {table}")))?;
        Ok(conn.last_insert_rowid() as u64)
    }

    fn read(&self, log: Log, query: &LogQuery) -> Result<Vec<LogEntry>, StoreError> {
        let table = log_table(log);
        let conn = self.conn();
        let limit = if query.limit == 0 { 1000 } else { query.limit } as i64;
        let context = || format!("cannot read {table}");
        // The newest `limit` entries after `after`, returned oldest first.
        let sql = format!(
            "SELECT seq, subject, body FROM (
                 SELECT seq, subject, body FROM {table}
                 WHERE seq > ?1 AND (?2 IS NULL OR subject = ?2)
                 ORDER BY seq DESC LIMIT ?3
             ) ORDER BY seq"
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(db(context()))?;
        let rows = stmt
            .query_map(
                params![query.after as i64, query.subject.as_deref(), limit],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .map_err(db(context()))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, subject, body) = row.map_err(db(context()))?;
            out.push(LogEntry {
                seq: seq as u64,
                subject,
                body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
            });
        }
        Ok(out)
    }

    fn compact(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        // secure_delete zeroed the old pages in the database; the WAL still
        // holds their earlier images until it is checkpointed and emptied.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(db("cannot checkpoint the WAL".to_string()))?;
        conn.execute_batch("VACUUM")
            .map_err(db("cannot vacuum".to_string()))?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(db("cannot checkpoint the WAL".to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_get_list_delete_with_versions() {
        let s = SqliteStore::in_memory().unwrap();
        assert_eq!(s.put(Kind::Vm, "a", 0, &json!({"n": 1})).unwrap(), 1);
        assert_eq!(s.put(Kind::Vm, "a", 1, &json!({"n": 2})).unwrap(), 2);
        let r = s.get(Kind::Vm, "a").unwrap().unwrap();
        assert_eq!((r.version, r.body["n"].as_i64()), (2, Some(2)));
        assert!(s.get(Kind::Disk, "a").unwrap().is_none());
        s.put(Kind::Vm, "b", 0, &json!({})).unwrap();
        let ids: Vec<_> = s
            .list(Kind::Vm)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(s.delete(Kind::Vm, "a").unwrap());
        assert!(!s.delete(Kind::Vm, "a").unwrap());
    }

    #[test]
    fn stale_version_is_a_conflict() {
        let s = SqliteStore::in_memory().unwrap();
        s.put(Kind::Vm, "a", 0, &json!({})).unwrap();
        let err = s.put(Kind::Vm, "a", 0, &json!({})).unwrap_err();
        assert!(matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                found: 1,
                ..
            }
        ));
        assert!(s.put(Kind::Vm, "new", 3, &json!({})).is_err());
    }

    #[test]
    fn logs_filter_by_subject_and_keep_order() {
        let s = SqliteStore::in_memory().unwrap();
        for i in 0..5 {
            let subject = if i % 2 == 0 { "vm-a" } else { "vm-b" };
            s.append(Log::Event, subject, &json!({ "i": i })).unwrap();
        }
        let a = s
            .read(
                Log::Event,
                &LogQuery {
                    subject: Some("vm-a".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        let is: Vec<_> = a.iter().map(|e| e.body["i"].as_i64().unwrap()).collect();
        assert_eq!(is, [0, 2, 4]);
        let last2 = s
            .read(
                Log::Event,
                &LogQuery {
                    limit: 2,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(last2.len(), 2);
        assert_eq!(last2[1].body["i"], 4);
        assert!(s.read(Log::Audit, &LogQuery::default()).unwrap().is_empty());
    }

    #[test]
    fn migrations_run_once_and_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("keel-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keel.db");
        let _ = std::fs::remove_file(&path);
        {
            let s = SqliteStore::open(&path).unwrap();
            assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as u32);
            s.put(Kind::Flavor, "1c2g", 0, &json!({"vcpus": 1}))
                .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.get(Kind::Flavor, "1c2g").unwrap().unwrap().version, 1);
        drop(s);
        // A database from a newer keeld is refused, not damaged.
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
