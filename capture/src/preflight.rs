//! Checks of the source server before capture starts, each failure with the exact fix.

use crate::error::CaptureError;

/// What the preflight learned of the server.
#[derive(Clone, Debug)]
pub struct ServerFacts {
    pub version_num: i32,
    pub database: String,
}

/// Check that the server can feed a logical replication capture.
pub async fn check(sql: &tokio_postgres::Client, user: &str) -> Result<ServerFacts, CaptureError> {
    let row = sql
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('wal_level'), \
                    r.rolreplication, r.rolsuper, current_setting('server_encoding'), \
                    current_setting('max_replication_slots')::int, current_database()::text \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| CaptureError::sql("reading server settings", e))?;
    let version_num: i32 = row.get(0);
    let wal_level: String = row.get(1);
    let replication: bool = row.get(2);
    let superuser: bool = row.get(3);
    let encoding: String = row.get(4);
    let max_slots: i32 = row.get(5);
    let database: String = row.get(6);
    if version_num < 140000 {
        return Err(CaptureError::setup(
            format!(
                "the source runs PostgreSQL {}.{}; pgtrail needs 14 or newer",
                version_num / 10000,
                version_num % 10000 / 100
            ),
            "upgrade the source server to PostgreSQL 14 or newer",
        ));
    }
    if wal_level != "logical" {
        return Err(CaptureError::setup(
            format!(
                "the source has wal_level = {wal_level}; logical replication needs wal_level = logical"
            ),
            "run `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart PostgreSQL",
        ));
    }
    if !replication && !superuser {
        return Err(CaptureError::setup(
            format!("role {user:?} has neither the REPLICATION attribute nor superuser"),
            format!(
                "run `ALTER ROLE \"{}\" WITH REPLICATION;` as a superuser",
                user.replace('"', "\"\"")
            ),
        ));
    }
    if encoding != "UTF8" && encoding != "SQL_ASCII" {
        return Err(CaptureError::setup(
            format!("the source database encoding is {encoding}; pgtrail stores text as UTF-8"),
            "capture a UTF8 database (CREATE DATABASE ... ENCODING 'UTF8')",
        ));
    }
    if max_slots < 1 {
        return Err(CaptureError::setup(
            "the source has max_replication_slots = 0",
            "run `ALTER SYSTEM SET max_replication_slots = 10;` and restart PostgreSQL",
        ));
    }
    Ok(ServerFacts {
        version_num,
        database,
    })
}
