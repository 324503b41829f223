//! Checks of the source server before capture starts, each failure with the exact fix.

use crate::error::CaptureError;

/// What the preflight learned of the server.
#[derive(Clone, Debug)]
pub struct ServerFacts {
    pub version_num: i32,
    pub database: String,
}

/// How to turn on logical decoding where this server is: managed services set `wal_level`
/// through a setting of their own (told apart by the settings they define).
async fn wal_level_fix(sql: &tokio_postgres::Client) -> String {
    const SERVICES: &[(&str, &str)] = &[
        (
            "rds.logical_replication",
            "Amazon RDS / Aurora: set rds.logical_replication = 1 in the instance's (Aurora: the cluster's) DB parameter group, then reboot",
        ),
        (
            "cloudsql.logical_decoding",
            "Cloud SQL: set the database flag cloudsql.logical_decoding = on (gcloud sql instances patch INSTANCE --database-flags=cloudsql.logical_decoding=on; this restarts the instance)",
        ),
        (
            "azure.extensions",
            "Azure Database for PostgreSQL: set the server parameter wal_level = logical (portal: Server parameters), then restart the server",
        ),
        (
            "neon.timeline_id",
            "Neon: enable logical replication in the Neon Console (project settings); it sets wal_level = logical and restarts the computes",
        ),
    ];
    for (setting, fix) in SERVICES {
        let defined = sql
            .query_one("SELECT current_setting($1, true) IS NOT NULL", &[setting])
            .await
            .is_ok_and(|row| row.get::<_, bool>(0));
        if defined {
            return (*fix).to_string();
        }
    }
    "run `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart PostgreSQL".into()
}

/// Check that the server can feed a logical replication capture.
pub async fn check(sql: &tokio_postgres::Client, user: &str) -> Result<ServerFacts, CaptureError> {
    let row = sql
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('wal_level'), \
                    r.rolreplication, r.rolsuper, current_setting('server_encoding'), \
                    current_setting('max_replication_slots')::int, current_database()::text, \
                    current_setting('max_wal_senders')::int \
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
    let max_wal_senders: i32 = row.get(7);
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
            wal_level_fix(sql).await,
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
    if max_wal_senders < 1 {
        return Err(CaptureError::setup(
            "the source has max_wal_senders = 0: it accepts no replication connection",
            "run `ALTER SYSTEM SET max_wal_senders = 10;` and restart PostgreSQL",
        ));
    }
    Ok(ServerFacts {
        version_num,
        database,
    })
}
