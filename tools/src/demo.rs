//! `pgtrail demo`: the quickstart on a throwaway PostgreSQL.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_capture::{CaptureConfig, SourceConfig};
use pgtrail_store::Lsn;

const SCHEMA: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, tags text[]);
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers, product_id bigint REFERENCES products,
                     quantity int NOT NULL, status text NOT NULL, note jsonb);
INSERT INTO customers (id, name, email) VALUES (1, 'Ada', 'ada@example.com'), (2, 'Grace', 'grace@example.com');
INSERT INTO products VALUES (1, 'Keyboard', 49.90, '{input}'), (2, 'Mouse', 19.50, '{input,small}'), (3, 'Monitor', 189.00, NULL);
";

/// The workload, one transaction per entry; the first statement of most sets the context the
/// way an application (or Bemi's libraries) would.
const WORKLOAD: &[&str] = &[
    "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 42, \"endpoint\": \"/orders\"}');
     INSERT INTO orders VALUES (1, 1, 1, 1, 'new', '{\"gift\": false}'), (2, 2, 2, 3, 'new', NULL);",
    "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 7, \"endpoint\": \"/admin/prices\"}');
     UPDATE products SET price = 44.90 WHERE id = 1;",
    "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 42, \"endpoint\": \"/orders/1/pay\"}');
     UPDATE orders SET status = 'paid' WHERE id = 1;",
    "INSERT INTO customers (id, name) VALUES (3, 'Linus');",
    "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 7, \"endpoint\": \"/admin/orders/2\"}');
     DELETE FROM orders WHERE id = 2;",
    "SELECT pg_logical_emit_message(true, '_bemi', '{\"user_id\": 3, \"endpoint\": \"/orders\"}');
     INSERT INTO orders VALUES (3, 3, 3, 1, 'new', NULL); UPDATE orders SET quantity = 2 WHERE id = 3;",
];

pub async fn run(archive: PathBuf) -> anyhow::Result<()> {
    if archive.exists() {
        if !archive.join(pgtrail_store::LOG_FILE).exists() {
            bail!(
                "{} exists and is not a pgtrail archive; choose another --archive",
                archive.display()
            );
        }
        std::fs::remove_dir_all(&archive)
            .with_context(|| format!("removing the earlier demo archive {}", archive.display()))?;
    }
    eprintln!("demo: starting a throwaway PostgreSQL");
    let cluster =
        tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await??;
    cluster.psql("postgres", "CREATE DATABASE shop")?;
    let url = cluster.url("shop");
    let source = SourceConfig::parse(&url)?;
    let sql = source.connect_sql().await?;
    sql.batch_execute(SCHEMA)
        .await
        .context("creating the shop schema")?;
    eprintln!(
        "demo: PostgreSQL {} on port {}; shop schema created",
        cluster.bin_dir().display(),
        cluster.port()
    );

    let config = CaptureConfig {
        source: source.clone(),
        archive: archive.clone(),
        slot: "pgtrail".into(),
        publication: "pgtrail".into(),
        tables: Vec::new(),
        resnapshot: false,
        progress_interval: Duration::from_secs(2),
        stream_timeout: pgtrail_capture::DEFAULT_STREAM_TIMEOUT,
        durable_observer: None,
        stop_at: None,
        catalog_interval: pgtrail_capture::DEFAULT_CATALOG_INTERVAL,
        // The demo compacts once, explicitly, after the capture stops.
        compaction: None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let capture = tokio::spawn(pgtrail_capture::run(
        config,
        async move {
            let _ = stop_rx.await;
        },
        crate::progress_line,
    ));
    // Wait for the slot (and the initial snapshot) before changing anything, so that the
    // workload is streamed rather than folded into the snapshot.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let active = sql
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgtrail' AND active",
                &[],
            )
            .await?
            .is_some();
        if active {
            break;
        }
        if capture.is_finished() || std::time::Instant::now() > deadline {
            let _ = stop_tx.send(());
            capture.await??;
            bail!("capture did not start streaming");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("demo: capture is streaming; running the workload");
    let mut before_delete = None::<String>;
    for statement in WORKLOAD {
        if statement.contains("DELETE FROM orders") {
            before_delete = Some(
                sql.query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await?
                    .get(0),
            );
        }
        sql.batch_execute(&format!("BEGIN; {statement} COMMIT;"))
            .await
            .context("running the demo workload")?;
    }
    let before_delete = before_delete.context("the workload deletes an order")?;
    let end: String = sql
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let end: Lsn = end.parse()?;
    // Wait until the archive is durable past the workload (the slot confirms it).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let confirmed: Option<String> = sql
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'pgtrail'", &[])
            .await?
            .get(0);
        if confirmed
            .and_then(|c| c.parse::<Lsn>().ok())
            .is_some_and(|c| c >= end)
        {
            break;
        }
        if capture.is_finished() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(());
    let summary = capture.await??;
    eprintln!(
        "demo: captured {} snapshot rows and {} changes in {} transactions into {}",
        summary.snapshot_rows,
        summary.changes - summary.snapshot_rows,
        summary.transactions,
        archive.display()
    );
    drop(sql);
    drop(cluster);
    eprintln!("demo: compacting the log into Parquet segments");
    crate::compact::run(crate::compact::CompactArgs {
        archive: archive.clone(),
        segments: crate::compact::SegmentArgs {
            zstd_level: 3,
            target_segment_mib: 128,
            signer: crate::compact::SignerArgs {
                signing_key: None,
                signer_command: None,
                signer_key: None,
            },
            publish_checkpoints: None,
            keyframe_changes: pgtrail_query::keyframes::KeyframePolicy::default().min_changes,
            keyframe_rows_factor: pgtrail_query::keyframes::KeyframePolicy::default().rows_factor,
        },
        json: false,
    })
    .await?;
    println!();
    crate::status::run(archive.clone(), None, "table").await?;
    println!();
    let queries = [
        (
            "The history of public.orders, with who did it (context)",
            "SELECT pg_lsn(lsn) AS lsn, op, after.id AS id, after.status AS status, before.status AS was, json_get(context, 'user_id') AS user_id FROM public.orders ORDER BY lsn, seq".to_string(),
        ),
        (
            "public.orders as it was just before order 2 was deleted (PostgreSQL is stopped)",
            format!("SELECT * FROM as_of_lsn('public.orders', '{before_delete}') ORDER BY id"),
        ),
        (
            "What changed in public.orders since then",
            format!("SELECT change, key, before.status AS was, after.status AS now, after.quantity AS quantity FROM diff('public.orders', '{before_delete}', '{end}') ORDER BY key"),
        ),
        (
            "Everything user 7 did, across tables (the Bemi-style changes view)",
            "SELECT committed_at, \"table\", operation, primary_key, json_get(context, 'endpoint') AS endpoint FROM changes WHERE json_get(context, 'user_id') = '7' ORDER BY lsn, seq".to_string(),
        ),
    ];
    for (title, query) in &queries {
        println!("-- {title}");
        println!("{query};");
        crate::sql::run(crate::sql::SqlArgs {
            archive: archive.clone(),
            format: "table".into(),
            output: None,
            sql: Some(query.clone()),
        })
        .await?;
        println!();
    }
    println!(
        "Next: pgtrail sql --archive {}   (an interactive prompt; \\d lists tables)",
        archive.display()
    );
    println!(
        "      pgtrail serve --archive {}   (then open http://127.0.0.1:8432/ : each row's timeline, who changed it, the table as of any version)",
        archive.display()
    );
    println!(
        "      pgtrail tail --archive {}   (every change as JSON lines, with the cursor to resume from)",
        archive.display()
    );
    Ok(())
}
