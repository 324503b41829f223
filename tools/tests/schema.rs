//! `pgtrail.schema_versions` against PostgreSQL's own catalog: after each migration (a column
//! added with a default, a type changed, a column renamed) and the write that follows it,
//! the archive's newest version has exactly the columns and types `format_type` printed, and
//! the version applies from the time of that write.

use pgtrail_capture::cluster::Cluster;

use crate::{capture_until_now, pgtrail_sql};

const CATALOG: &str = "SELECT json_agg(json_build_array(attname, format_type(atttypid, atttypmod)) ORDER BY attnum) \
     FROM pg_attribute WHERE attrelid = 'ddl'::regclass AND attnum > 0 AND NOT attisdropped";

const NOW_US: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

#[test]
fn schema_versions_list_each_migration_as_the_catalog_shows_it() {
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("schema").unwrap();
    let psql = |sql: &str| {
        cluster
            .psql(&db, sql)
            .unwrap_or_else(|e| panic!("{e}: {sql}"))
    };
    psql(
        "CREATE TYPE mood AS ENUM ('sad', 'ok');
         CREATE TABLE ddl (id int PRIMARY KEY, amount numeric(12,4), note varchar(10),
           at timestamptz(3), tags text[], m mood, moods mood[], span interval day to second(2),
           c char(3), b bit(4), r numrange, n numeric, t time(0));
         INSERT INTO ddl VALUES (1, 1.2345, 'n', now(), '{a}', 'ok', '{sad}', '1 day', 'abc', B'1010',
           '[1,2)', 1, '12:00');",
    );
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    capture_until_now(cluster, &db, &archive);
    // (columns as the catalog prints them, the write's time window)
    let mut expected: Vec<(serde_json::Value, Option<(i64, i64)>)> =
        vec![(serde_json::from_str(&psql(CATALOG)).unwrap(), None)];
    for migration in [
        "ALTER TABLE ddl ADD COLUMN flag int DEFAULT 5",
        "ALTER TABLE ddl ALTER COLUMN amount TYPE numeric(12,1)",
        "ALTER TABLE ddl RENAME COLUMN note TO remark",
        "ALTER TABLE ddl DROP COLUMN c",
    ] {
        psql(migration);
        let before: i64 = psql(NOW_US).parse().unwrap();
        psql("UPDATE ddl SET id = id WHERE id = 1");
        let after: i64 = psql(NOW_US).parse().unwrap();
        expected.push((
            serde_json::from_str(&psql(CATALOG)).unwrap(),
            Some((before, after)),
        ));
    }
    capture_until_now(cluster, &db, &archive);

    let out = pgtrail_sql(
        &archive,
        "json",
        "SELECT version, column_names, column_types, arrow_cast(valid_from_at, 'Int64') AS at_us \
         FROM pgtrail.schema_versions WHERE table_name = 'public.ddl' ORDER BY version",
    );
    let versions: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(versions.len(), expected.len(), "{versions:?}");
    for (i, (v, (columns, window))) in versions.iter().zip(&expected).enumerate() {
        assert_eq!(v["version"], i + 1);
        let ours: Vec<serde_json::Value> = v["column_names"]
            .as_array()
            .unwrap()
            .iter()
            .zip(v["column_types"].as_array().unwrap())
            .map(|(n, t)| serde_json::json!([n, t]))
            .collect();
        assert_eq!(
            &serde_json::Value::Array(ours),
            columns,
            "version {}",
            i + 1
        );
        let at = v["at_us"].as_i64().expect("every version's time is known");
        if let Some((before, after)) = window {
            assert!(
                (*before..=*after).contains(&at),
                "version {} applies from {at}, not from its write ({before}..{after})",
                i + 1
            );
        }
    }
}
