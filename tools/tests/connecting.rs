//! Connecting the way libpq does, with the real `psql` as the oracle: every sslmode ×
//! server (no TLS; TLS with the right CA and name; right CA, wrong name; wrong CA) ×
//! channel_binding must be accepted or refused by both of pgtrail's connections exactly as
//! `psql` accepts or refuses it; so must client certificates, `.pgpass` and service files.
//! Then a whole capture over verify-full with the password from `.pgpass`, killed and resumed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use pgtrail_capture::cluster::{Cluster, ClusterOptions};
use pgtrail_capture::source::replication::ReplicationStream;
use pgtrail_capture::source::{Environment, SourceConfig};

const PASSWORD: &str = "s3cret-Pa55";

#[path = "../harness/src/pki.rs"]
pub(crate) mod pki;
/// A cluster that accepts TCP clients over TLS only: client certificates for `certuser`,
/// SCRAM passwords for everyone else.
fn tls_cluster(pki: &pki::TestPki) -> Cluster {
    let cluster = Cluster::start(ClusterOptions {
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), "server.crt".into()),
            ("ssl_key_file".into(), "server.key".into()),
            ("ssl_ca_file".into(), "ca.crt".into()),
        ],
        hba: Some(
            "local all all trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n"
                .into(),
        ),
        files: vec![
            ("server.crt".into(), pki.server_cert.clone().into_bytes()),
            ("server.key".into(), pki.server_key.clone().into_bytes()),
            ("ca.crt".into(), pki.ca.clone().into_bytes()),
        ],
    })
    .unwrap();
    add_roles(&cluster);
    cluster
}

/// A cluster without TLS that asks TCP clients for a SCRAM password.
fn plain_cluster() -> Cluster {
    let cluster = Cluster::start(ClusterOptions {
        hba: Some("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n".into()),
        ..Default::default()
    })
    .unwrap();
    add_roles(&cluster);
    cluster
}

fn add_roles(cluster: &Cluster) {
    cluster
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE alice LOGIN REPLICATION PASSWORD '{PASSWORD}'; CREATE ROLE certuser LOGIN REPLICATION"
            ),
        )
        .unwrap();
    cluster
        .psql("postgres", "CREATE DATABASE shop OWNER alice")
        .unwrap();
}

/// A client's world: an empty home directory (no ~/.pgpass, no ~/.postgresql) and the files
/// a case needs.
struct Client {
    home: tempfile::TempDir,
}

impl Client {
    fn new() -> Client {
        Client {
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self, name: &str, contents: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.home.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// What `psql` does with these variables: connected (`Ok`) or refused (its message).
    fn psql(&self, cluster: &Cluster, vars: &BTreeMap<&str, String>) -> Result<(), String> {
        let out = Command::new(cluster.bin_dir().join("psql"))
            .args(["-X", "-w", "-A", "-t", "-c", "SELECT 1"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn environment(&self, vars: &BTreeMap<&str, String>) -> Environment {
        Environment {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            home: Some(self.home.path().to_path_buf()),
            os_user: Some("nobody-in-particular".into()),
        }
    }

    /// What pgtrail's SQL and replication connections do with the same variables.
    fn pgtrail(
        &self,
        rt: &tokio::runtime::Runtime,
        vars: &BTreeMap<&str, String>,
    ) -> (Result<(), String>, Result<String, String>) {
        let source = match SourceConfig::resolve("", &self.environment(vars)) {
            Ok(s) => s,
            Err(e) => return (Err(e.to_string()), Err(e.to_string())),
        };
        rt.block_on(async {
            let sql = source
                .connect_sql()
                .await
                .map(|_| ())
                .map_err(|e| pgtrail_capture::run::error_chain(&e));
            let replication = async {
                let mut stream =
                    ReplicationStream::connect(&source, "s", "p", None, Duration::from_secs(5))
                        .await?;
                stream.identify_system().await?;
                Ok::<_, pgtrail_capture::CaptureError>(stream.security().to_string())
            }
            .await
            .map_err(|e| pgtrail_capture::run::error_chain(&e));
            (sql, replication)
        })
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Server {
    NoTls,
    RightCaRightName,
    RightCaWrongName,
    WrongCa,
}

#[test]
fn every_sslmode_and_channel_binding_case_is_accepted_or_refused_as_psql_does() {
    let pki = pki::make("pgtrail test CA").unwrap();
    let other = pki::make("somebody else's CA").unwrap();
    let tls = tls_cluster(&pki);
    let plain = plain_cluster();
    let client = Client::new();
    let right_ca = client.file("right-ca.pem", &pki.ca, 0o644);
    let wrong_ca = client.file("wrong-ca.pem", &other.ca, 0o644);
    let rt = runtime();
    let mut outcomes = BTreeMap::new();
    let mut disagreements = Vec::new();
    for server in [
        Server::NoTls,
        Server::RightCaRightName,
        Server::RightCaWrongName,
        Server::WrongCa,
    ] {
        let (cluster, host, ca) = match server {
            Server::NoTls => (&plain, "localhost", &right_ca),
            Server::RightCaRightName => (&tls, "localhost", &right_ca),
            Server::RightCaWrongName => (&tls, "127.0.0.1", &right_ca),
            Server::WrongCa => (&tls, "localhost", &wrong_ca),
        };
        for sslmode in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            for binding in ["disable", "prefer", "require"] {
                let vars = BTreeMap::from([
                    ("PGHOST", host.to_string()),
                    ("PGPORT", cluster.port().to_string()),
                    ("PGUSER", "alice".to_string()),
                    ("PGDATABASE", "shop".to_string()),
                    ("PGPASSWORD", PASSWORD.to_string()),
                    ("PGSSLMODE", sslmode.to_string()),
                    ("PGSSLROOTCERT", ca.display().to_string()),
                    ("PGCHANNELBINDING", binding.to_string()),
                    ("PGCONNECT_TIMEOUT", "5".to_string()),
                ]);
                let psql = client.psql(cluster, &vars);
                let (sql, replication) = client.pgtrail(&rt, &vars);
                let case = format!("{server:?} sslmode={sslmode} channel_binding={binding}");
                if psql.is_ok() != sql.is_ok() || psql.is_ok() != replication.is_ok() {
                    disagreements.push(format!(
                        "{case}: psql {psql:?}, pgtrail sql {sql:?}, replication {replication:?}"
                    ));
                }
                // The password appears in no message.
                for message in [&sql.clone().err(), &replication.clone().err()] {
                    assert!(
                        !message.as_deref().unwrap_or_default().contains(PASSWORD),
                        "{case}: {message:?}"
                    );
                }
                outcomes.insert(case, replication);
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "pgtrail and psql disagree:\n{}",
        disagreements.join("\n")
    );
    // What was accepted was what each mode promises.
    let security = |case: &str| outcomes[case].clone().unwrap();
    assert_eq!(
        security("RightCaRightName sslmode=verify-full channel_binding=require")
            .split_once(' ')
            .map(|(v, _)| v.starts_with("TLSv1.")),
        Some(true)
    );
    assert!(
        security("RightCaRightName sslmode=verify-full channel_binding=prefer")
            .ends_with("server verified (certificate chain and host name), channel binding")
    );
    assert!(
        security("RightCaWrongName sslmode=verify-ca channel_binding=disable")
            .ends_with("server certificate chain verified, host name not checked")
    );
    assert_eq!(
        security("NoTls sslmode=prefer channel_binding=prefer"),
        "no TLS"
    );
    // A certificate that does not verify says what to check, on both connections.
    let (sql, replication) = {
        let vars = BTreeMap::from([
            ("PGHOST", "127.0.0.1".to_string()),
            ("PGPORT", tls.port().to_string()),
            ("PGUSER", "alice".to_string()),
            ("PGDATABASE", "shop".to_string()),
            ("PGPASSWORD", PASSWORD.to_string()),
            ("PGSSLMODE", "verify-full".to_string()),
            ("PGSSLROOTCERT", right_ca.display().to_string()),
        ]);
        client.pgtrail(&rt, &vars)
    };
    for message in [sql.unwrap_err(), replication.unwrap_err()] {
        assert!(message.contains("the TLS connection to"), "{message}");
        assert!(message.contains("fix: check that sslrootcert"), "{message}");
    }
    for refused in [
        "RightCaWrongName sslmode=verify-full channel_binding=prefer",
        "WrongCa sslmode=verify-ca channel_binding=prefer",
        "WrongCa sslmode=require channel_binding=prefer",
        "NoTls sslmode=require channel_binding=prefer",
        "NoTls sslmode=prefer channel_binding=require",
        "RightCaRightName sslmode=disable channel_binding=disable",
    ] {
        assert!(outcomes[refused].is_err(), "{refused} was accepted");
    }
}

#[test]
fn client_certificates_password_files_and_services_behave_as_in_psql() {
    let pki = pki::make("pgtrail test CA").unwrap();
    let tls = tls_cluster(&pki);
    let rt = runtime();
    let client = Client::new();
    let ca = client.file("ca.pem", &pki.ca, 0o644);
    let cert = client.file("certuser.crt", &pki.client_cert, 0o644);
    let key = client.file("certuser.key", &pki.client_key, 0o600);
    let open_key = client.file("open.key", &pki.client_key, 0o644);
    let base = BTreeMap::from([
        ("PGHOST", "localhost".to_string()),
        ("PGPORT", tls.port().to_string()),
        ("PGDATABASE", "shop".to_string()),
        ("PGSSLMODE", "verify-full".to_string()),
        ("PGSSLROOTCERT", ca.display().to_string()),
        ("PGCONNECT_TIMEOUT", "5".to_string()),
    ]);
    let with = |extra: &[(&'static str, String)]| {
        let mut vars = base.clone();
        vars.extend(extra.iter().cloned());
        vars
    };
    let cases: Vec<(&str, BTreeMap<&str, String>, bool)> = vec![
        (
            "client certificate",
            with(&[
                ("PGUSER", "certuser".into()),
                ("PGSSLCERT", cert.display().to_string()),
                ("PGSSLKEY", key.display().to_string()),
            ]),
            true,
        ),
        (
            "no client certificate for cert authentication",
            with(&[("PGUSER", "certuser".into())]),
            false,
        ),
        (
            "a private key others can read",
            with(&[
                ("PGUSER", "certuser".into()),
                ("PGSSLCERT", cert.display().to_string()),
                ("PGSSLKEY", open_key.display().to_string()),
            ]),
            false,
        ),
        (
            "no password anywhere",
            with(&[("PGUSER", "alice".into())]),
            false,
        ),
    ];
    // Password files: the first matching line wins; a readable-by-others file is ignored.
    let port = tls.port();
    let pgpass =
        |name: &str, text: String, mode: u32| client.file(name, &text, mode).display().to_string();
    let good = pgpass(
        "good.pgpass",
        format!(
            "# comment\nother:*:*:*:x\nlocalhost:{port}:shop:alice:{PASSWORD}\n*:*:*:*:wrong\n"
        ),
        0o600,
    );
    let first_wrong = pgpass(
        "first-wrong.pgpass",
        format!("*:*:*:alice:wrong\nlocalhost:{port}:shop:alice:{PASSWORD}\n"),
        0o600,
    );
    let open = pgpass(
        "open.pgpass",
        format!("localhost:{port}:shop:alice:{PASSWORD}\n"),
        0o644,
    );
    let escaped = pgpass(
        "escaped.pgpass",
        format!(
            "localhost:{port}:*:alice:{}\n",
            PASSWORD.replace('-', "\\-")
        ),
        0o600,
    );
    let services = client.file(
        "services.conf",
        &format!("[prod]\nhost=localhost\nport={port}\nuser=alice\ndbname=shop\n"),
        0o644,
    );
    let mut cases = cases;
    for (name, file, accepted) in [
        ("pgpass match", &good, true),
        ("pgpass first match is wrong", &first_wrong, false),
        ("pgpass readable by others", &open, false),
        ("pgpass escapes", &escaped, true),
    ] {
        cases.push((
            name,
            with(&[("PGUSER", "alice".into()), ("PGPASSFILE", file.clone())]),
            accepted,
        ));
    }
    cases.push((
        "service file with password from the environment",
        BTreeMap::from([
            ("PGSERVICEFILE", services.display().to_string()),
            ("PGSERVICE", "prod".to_string()),
            ("PGSSLMODE", "verify-full".to_string()),
            ("PGSSLROOTCERT", ca.display().to_string()),
            ("PGPASSWORD", PASSWORD.to_string()),
            // The service's port wins over the environment's.
            ("PGPORT", "1".to_string()),
        ]),
        true,
    ));
    let mut failures = Vec::new();
    for (name, vars, expected) in &cases {
        let psql = client.psql(&tls, vars);
        let (sql, replication) = client.pgtrail(&rt, vars);
        if psql.is_ok() != *expected || sql.is_ok() != *expected || replication.is_ok() != *expected
        {
            failures.push(format!(
                "{name}: expected {}, psql {psql:?}, pgtrail sql {sql:?}, replication {replication:?}",
                if *expected { "accepted" } else { "refused" }
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The issue's "done when": `PGHOST`, `PGUSER`, `PGSSLMODE=verify-full`, `PGSSLROOTCERT` and
/// the password in `~/.pgpass`; `pgtrail capture --archive A` records a TLS-only server's
/// changes, survives kill -9, and the archive equals the source. The resumed run verifies the
/// server with `sslrootcert=system`.
#[test]
fn capture_over_verify_full_with_a_pgpass_password_survives_kill_9() {
    let pki = pki::make("pgtrail test CA").unwrap();
    let cluster = tls_cluster(&pki);
    let client = Client::new();
    let ca = client.file("ca.pem", &pki.ca, 0o644);
    client.file(
        ".pgpass",
        &format!("localhost:{}:*:alice:{PASSWORD}\n", cluster.port()),
        0o600,
    );
    cluster
        .psql(
            "shop",
            "SET ROLE alice; CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items SELECT g, 'before ' || g FROM generate_series(1, 200) g",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    // The settings a user of libpq tools would have: PG* variables, the password in ~/.pgpass.
    let with_settings = |cmd: &mut Command| {
        cmd.env_remove("PGTRAIL_SOURCE")
            .env("HOME", client.home.path())
            .env("PGHOST", "localhost")
            .env("PGPORT", cluster.port().to_string())
            .env("PGUSER", "alice")
            .env("PGDATABASE", "shop")
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &ca);
    };
    let capture = |stop_at: Option<&str>| {
        let mut cmd = super::pgtrail();
        cmd.args(["capture", "--archive"])
            .arg(&archive)
            .args(["--progress-secs", "1"]);
        if let Some(lsn) = stop_at {
            cmd.args(["--stop-at", lsn]);
        }
        with_settings(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let mut child = capture(None).spawn().unwrap();
    super::wait_slot_active(&cluster, "shop", "pgtrail", &mut child);
    cluster
        .psql(
            "shop",
            "UPDATE items SET name = 'during ' || id WHERE id % 3 = 0; DELETE FROM items WHERE id % 7 = 0",
        )
        .unwrap();
    // Killed while streaming: once what was written so far is acknowledged (the snapshot is
    // complete, the stream runs), more is written and the process dies at once.
    let streamed = super::insert_lsn(&cluster, "shop");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while cluster
        .psql(
            "shop",
            &format!("SELECT coalesce(bool_and(confirmed_flush_lsn >= '{streamed}'), false) FROM pg_replication_slots WHERE slot_name = 'pgtrail'"),
        )
        .unwrap()
        != "t"
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "capture exited before it streamed"
        );
        assert!(std::time::Instant::now() < deadline, "capture did not stream");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster
        .psql(
            "shop",
            "UPDATE items SET name = name || '?' WHERE id % 11 = 0",
        )
        .unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    cluster
        .psql(
            "shop",
            "INSERT INTO items SELECT g, 'after ' || g FROM generate_series(201, 260) g; UPDATE items SET name = name || '!' WHERE id % 5 = 0",
        )
        .unwrap();
    let stop = super::insert_lsn(&cluster, "shop");
    // The resumed run trusts the system's roots (sslrootcert=system, libpq 16's spelling),
    // here a bundle that holds the test CA (SSL_CERT_FILE, which the system roots honour).
    let out = capture(Some(&stop))
        .env("PGSSLROOTCERT", "system")
        .env("SSL_CERT_FILE", &ca)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    // The start line says how the connection is protected.
    assert!(
        stderr.contains("server verified (certificate chain and host name), channel binding"),
        "{stderr}"
    );
    // `status` reports the connection's protection from the same settings.
    let mut status = super::pgtrail();
    status
        .args(["status", "--format", "json", "--source", "", "--archive"])
        .arg(&archive);
    with_settings(&mut status);
    let status = status.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&status.stderr)));
    let connection = &report["slot"]["connection"];
    assert_eq!(connection["tls"], true, "{report}");
    assert_eq!(connection["verified_chain"], true, "{report}");
    assert_eq!(connection["verified_name"], true, "{report}");
    assert!(
        connection["version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("TLSv1."),
        "{report}"
    );
    let source = cluster
        .psql("shop", "SELECT id || '|' || name FROM items ORDER BY id")
        .unwrap();
    let archived = super::pgtrail_sql(
        &archive,
        "csv",
        &format!(
            "SELECT id || '|' || name AS line FROM as_of_lsn('public.items', '{stop}') ORDER BY id"
        ),
    );
    let archived: Vec<&str> = archived.lines().skip(1).collect();
    assert_eq!(archived, source.lines().collect::<Vec<_>>());
    assert!(archived.len() > 200, "{}", archived.len());
}

/// Least privilege: a role with REPLICATION and SELECT, owning nothing, cannot create a
/// publication (PostgreSQL 15 wants the tables' owner); capture says so with the SQL a DBA
/// runs, then captures through the publication the DBA made, without changing it.
#[test]
fn a_role_that_owns_nothing_captures_through_the_publication_a_dba_made() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    cluster
        .psql(
            "postgres",
            "CREATE ROLE app LOGIN; CREATE ROLE archiver LOGIN REPLICATION",
        )
        .unwrap();
    cluster
        .psql("postgres", "CREATE DATABASE lp OWNER app")
        .unwrap();
    cluster
        .psql(
            "lp",
            "SET ROLE app; CREATE TABLE orders (id int PRIMARY KEY, status text); \
             CREATE TABLE secrets (id int PRIMARY KEY, v text); \
             INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 50) g; \
             RESET ROLE; GRANT SELECT ON orders TO archiver",
        )
        .unwrap();
    let url = format!("postgresql://archiver@127.0.0.1:{}/lp", cluster.port());
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let capture = |extra: &[&str], stop_at: &str| {
        super::pgtrail()
            .args(["capture", "--archive"])
            .arg(&archive)
            .args(["--source", &url, "--stop-at", stop_at])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let capture_ok = |stop_at: &str| {
        let out = capture(&[], stop_at);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let stop = super::insert_lsn(&cluster, "lp");
    let refused = capture(&["--tables", "public.orders"], &stop);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    let dba_sql = "CREATE PUBLICATION \"pgtrail\" FOR TABLE \"public\".\"orders\" WITH (publish_via_partition_root = true);";
    assert!(stderr.contains(dba_sql), "{stderr}");
    // The DBA runs what capture printed.
    cluster.psql("lp", dba_sql).unwrap();
    let before = cluster
        .psql("lp", "SELECT pg_get_userbyid(pubowner) FROM pg_publication")
        .unwrap();
    // The snapshot, then the stream.
    capture_ok(&super::insert_lsn(&cluster, "lp"));
    cluster
        .psql(
            "lp",
            "UPDATE orders SET status = 'paid' WHERE id % 4 = 0; DELETE FROM orders WHERE id = 7",
        )
        .unwrap();
    let stop = super::insert_lsn(&cluster, "lp");
    let out = capture_ok(&stop);
    // The publication is the DBA's still, and lists what the DBA put in it.
    assert_eq!(
        cluster
            .psql("lp", "SELECT pg_get_userbyid(pubowner) FROM pg_publication")
            .unwrap(),
        before
    );
    assert_eq!(
        cluster
            .psql(
                "lp",
                "SELECT string_agg(tablename, ',') FROM pg_publication_tables"
            )
            .unwrap(),
        "orders"
    );
    let source = cluster
        .psql("lp", "SELECT id || '|' || status FROM orders ORDER BY id")
        .unwrap();
    let archived = super::pgtrail_sql(
        &archive,
        "csv",
        &format!(
            "SELECT id || '|' || status AS line FROM as_of_lsn('public.orders', '{stop}') ORDER BY id"
        ),
    );
    assert_eq!(
        archived.lines().skip(1).collect::<Vec<_>>(),
        source.lines().collect::<Vec<_>>()
    );
    // A table that cannot join the DBA's publication without the DBA is named with the SQL
    // that adds it; the publication is not touched.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"ALTER PUBLICATION "pgtrail" ADD TABLE "public"."secrets";"#),
        "{stderr}"
    );
    // The application creates a table, the DBA publishes it: the next run reads it whole and
    // captures it from then on.
    cluster
        .psql(
            "lp",
            "SET ROLE app; CREATE TABLE refunds (id int PRIMARY KEY, amount int); \
             INSERT INTO refunds SELECT g, g * 10 FROM generate_series(1, 5) g; RESET ROLE; \
             GRANT SELECT ON refunds TO archiver; ALTER PUBLICATION pgtrail ADD TABLE refunds",
        )
        .unwrap();
    capture_ok(&super::insert_lsn(&cluster, "lp"));
    cluster
        .psql("lp", "UPDATE refunds SET amount = 0 WHERE id = 2")
        .unwrap();
    let stop = super::insert_lsn(&cluster, "lp");
    capture_ok(&stop);
    let archived = super::pgtrail_sql(
        &archive,
        "csv",
        &format!(
            "SELECT id || '|' || amount AS line FROM as_of_lsn('public.refunds', '{stop}') ORDER BY id"
        ),
    );
    let source = cluster
        .psql("lp", "SELECT id || '|' || amount FROM refunds ORDER BY id")
        .unwrap();
    assert_eq!(
        archived.lines().skip(1).collect::<Vec<_>>(),
        source.lines().collect::<Vec<_>>()
    );
    // The DBA takes a table out of the publication: its changes stop reaching the archive,
    // which says so for moments after that instead of showing its last rows as current.
    cluster
        .psql(
            "lp",
            "ALTER PUBLICATION pgtrail DROP TABLE orders; UPDATE orders SET status = 'unseen' WHERE id = 1",
        )
        .unwrap();
    capture_ok(&super::insert_lsn(&cluster, "lp"));
    let after = super::insert_lsn(&cluster, "lp");
    let out = super::pgtrail()
        .args(["sql", "--archive"])
        .arg(&archive)
        .arg(format!(
            "SELECT count(*) FROM as_of_lsn('public.orders', '{after}')"
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("left the publication"),
        "{stderr}"
    );
}

/// PgBouncer (Debian's package) in transaction mode in front of the cluster: capture through it
/// stops at once with a clear error naming the pooler, instead of a retry loop. Skipped when
/// PgBouncer is not installed, unless `PGTRAIL_REQUIRE_PGBOUNCER` is set (CI sets it).
#[test]
fn capture_through_pgbouncer_in_transaction_mode_is_refused_with_a_clear_error() {
    let Some(pgbouncer) = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        assert!(
            std::env::var_os("PGTRAIL_REQUIRE_PGBOUNCER").is_none(),
            "PgBouncer is required here (apt-get install pgbouncer)"
        );
        eprintln!("skipped: pgbouncer is not installed (apt-get install pgbouncer)");
        return;
    };
    let cluster = Cluster::shared();
    let db = cluster.fresh_database("bouncer").unwrap();
    cluster
        .psql(&db, "CREATE TABLE t (id int PRIMARY KEY)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let ini = dir.path().join("pgbouncer.ini");
    let users = dir.path().join("userlist.txt");
    std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
    std::fs::write(
        &ini,
        format!(
            "[databases]\n* = host=127.0.0.1 port={}\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {}\npool_mode = transaction\n\
             ignore_startup_parameters = extra_float_digits, options\nlogfile = {}\npidfile = {}\n",
            cluster.port(),
            users.display(),
            dir.path().join("pgbouncer.log").display(),
            dir.path().join("pgbouncer.pid").display(),
        ),
    )
    .unwrap();
    // PgBouncer refuses to run as root.
    let mut bouncer = if pgtrail_capture::cluster::running_as_root() {
        Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&pgbouncer);
        c
    } else {
        Command::new(&pgbouncer)
    };
    let mut bouncer = bouncer
        .arg(&ini)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ready when it answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "pgbouncer did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let archive = dir.path().join("archive");
    let mut capture = super::pgtrail()
        .args(["capture", "--archive"])
        .arg(&archive)
        .args([
            "--source",
            &format!("postgresql://postgres@127.0.0.1:{port}/{db}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A retry loop would never end: the process must exit by itself, soon.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = capture.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = capture.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = bouncer.kill();
    let _ = bouncer.wait();
    let mut stderr = String::new();
    std::io::Read::read_to_string(capture.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(stderr.contains("connection pooler"), "{stderr}");
    assert!(stderr.contains("unsupported startup parameter"), "{stderr}");
    assert!(
        stderr.contains("connect capture to PostgreSQL directly"),
        "{stderr}"
    );
}
