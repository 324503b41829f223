//! Bad input only a real server can show: password files a server that asks for a password
//! finds unusable (open to others, a malformed line, missing, a wrong password), a revert of a
//! table whose key was dropped while it was captured, and an S3 store that refuses the
//! credentials (a key it does not know, a wrong secret, a user without rights). Each must be
//! refused with its message, never printing a secret.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgtrail_capture::cluster::{Cluster, ClusterOptions};

use crate::{Verdict, capture_command, wait_child};

/// The role the password cases log in as, and its password (never to appear in output).
const ROLE: &str = "torture_pw";
const PASSWORD: &str = "right-password-7c1e";

pub fn bad_inputs(pgtrail: &Path, work: &Path, v: &mut Verdict) {
    let dir = work.join("refusals");
    let _ = std::fs::remove_dir_all(&dir);
    let made = std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()));
    // TCP logins other than postgres's need a password; psql (the socket) is trusted.
    let hba = "local all all trust\n\
               host all postgres 127.0.0.1/32 trust\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    let cluster = made.and_then(|()| {
        let cluster = Cluster::start(ClusterOptions {
            hba: Some(hba.into()),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
        cluster
            .psql("postgres", "CREATE DATABASE torture")
            .and_then(|_| {
                cluster.psql(
                    "torture",
                    &format!(
                        "CREATE ROLE {ROLE} LOGIN REPLICATION SUPERUSER PASSWORD '{PASSWORD}'"
                    ),
                )
            })
            .map_err(|e| e.to_string())?;
        Ok(cluster)
    });
    let ready = || cluster.as_ref().map(|_| ()).map_err(Clone::clone);
    let port = cluster.as_ref().map_or(0, |c| c.port());
    let at = |name: &str| dir.join(name);
    let text = |p: &Path| p.display().to_string();
    // Secrets a case makes as it runs (an S3 user's secret): never to appear in output either.
    let made_secrets = std::cell::RefCell::new(Vec::<String>::new());
    let mut case =
        |name: &str, prepared: Result<(), String>, command: Vec<String>, must_say: &str| {
            let (bin, args) = command.split_first().expect("a command");
            let err = v.bad_input(
                Path::new(bin),
                name,
                prepared.map(|()| String::new()),
                args,
                must_say,
            );
            if err.contains(PASSWORD)
                || err.contains(SECRET)
                || made_secrets
                    .borrow()
                    .iter()
                    .any(|s| err.contains(s.as_str()))
            {
                v.bad_inputs_failed += 1;
                v.problems
                    .push(format!("bad input {name}: a secret appears in its output"));
            }
        };
    let bin = text(pgtrail);

    // Password files, as libpq reads them: a file others can read and a line that is not
    // five fields are skipped (libpq silently; pgtrail says so), a named file that is not
    // there is said, and a wrong password names the file it came from.
    let passfile = |name: &str, body: &str, mode: u32| -> Result<String, String> {
        use std::os::unix::fs::PermissionsExt as _;
        ready()?;
        let path = at(name);
        std::fs::write(&path, body).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())?;
        Ok(text(&path))
    };
    let capture = |passfile: &str| {
        vec![
            bin.clone(),
            "capture".into(),
            "--archive".into(),
            text(&at("password-archive")),
            "--source".into(),
            format!("host=127.0.0.1 port={port} dbname=torture user={ROLE} passfile={passfile}"),
        ]
    };
    let line = format!("127.0.0.1:{port}:torture:{ROLE}:{PASSWORD}\n");
    let open = passfile("open.pgpass", &line, 0o644);
    case(
        "a password file other users can read",
        open.as_ref().map(|_| ()).map_err(Clone::clone),
        capture(open.as_deref().unwrap_or_default()),
        "permissions should be u=rw (0600)",
    );
    let short = passfile(
        "short.pgpass",
        &format!("127.0.0.1:{port}:torture\n"),
        0o600,
    );
    case(
        "a password file line of three fields",
        short.as_ref().map(|_| ()).map_err(Clone::clone),
        capture(short.as_deref().unwrap_or_default()),
        "password file line is not host:port:database:user:password",
    );
    case(
        "a password file that does not exist",
        ready(),
        capture(&text(&at("no-such.pgpass"))),
        "password file does not exist",
    );
    let empty = passfile("empty.pgpass", "", 0o600);
    case(
        "no password for a server that asks for one",
        empty.as_ref().map(|_| ()).map_err(Clone::clone),
        capture(empty.as_deref().unwrap_or_default()),
        &format!("asks user \"{ROLE}\" for a password and none was given"),
    );
    let wrong = passfile(
        "wrong.pgpass",
        &format!("127.0.0.1:{port}:torture:{ROLE}:not-{PASSWORD}\n"),
        0o600,
    );
    let wrong_path = wrong.clone().unwrap_or_default();
    case(
        "a wrong password in a password file",
        wrong.map(|_| ()),
        capture(&wrong_path),
        &format!("(the password came from password file {wrong_path})"),
    );

    // A table captured with a key that is then dropped: its later changes cannot be tied to
    // rows, so reverting them must be refused from the archive, and the source left as it was.
    let keyless = at("keyless-archive");
    let mut from = String::new();
    let prepared = match &cluster {
        Ok(c) => keyless_archive(pgtrail, c, &keyless, &mut from),
        Err(e) => Err(e.clone()),
    };
    case(
        "a revert of a table whose key was dropped",
        prepared,
        vec![
            bin.clone(),
            "revert".into(),
            "--archive".into(),
            text(&keyless),
            "--source".into(),
            cluster.as_ref().map_or(String::new(), |c| c.url("torture")),
            "--tables".into(),
            "public.nokey".into(),
            "--from".into(),
            from,
        ],
        "has no key and its changes do not carry whole rows",
    );
    // An S3 store (moto, checking signatures) that knows none of these credentials; the
    // keyless case's archive is the one exported.
    let keyless_made = keyless.join("log.redb").exists();
    let moto = Moto::start().and_then(|m| {
        keyless_made
            .then_some(m)
            .ok_or_else(|| "no archive to export (the keyless case failed)".to_string())
    });
    let endpoint = moto.as_ref().map_or(String::new(), |m| m.endpoint.clone());
    // Made first: the server takes its first requests unsigned, and these are they.
    let user = moto
        .as_ref()
        .map_err(Clone::clone)
        .and_then(Moto::user_without_rights);
    if let Ok((_, secret)) = &user {
        made_secrets.borrow_mut().push(secret.clone());
    }
    let export_as = |key: &str, secret: &str| {
        vec![
            "env".into(),
            format!("AWS_ENDPOINT_URL={endpoint}"),
            format!("AWS_ACCESS_KEY_ID={key}"),
            format!("AWS_SECRET_ACCESS_KEY={secret}"),
            "AWS_REGION=us-east-1".into(),
            bin.clone(),
            "export".into(),
            "--archive".into(),
            text(&keyless),
            "--to".into(),
            "s3://lake/torture".into(),
            "--layout".into(),
            "cdf".into(),
        ]
    };
    case(
        "S3 credentials the store does not know",
        moto.as_ref().map(|_| ()).map_err(Clone::clone),
        export_as("AKIATORTUREUNKNOWN01", SECRET),
        "the store refused these credentials",
    );
    // A key the store knows, with a wrong secret (SignatureDoesNotMatch) and with its own
    // secret but no rights to the bucket (AccessDenied): both are the credentials' fault.
    let (key, secret) = user.clone().unwrap_or_default();
    case(
        "an S3 secret that is not its key's",
        user.as_ref().map(|_| ()).map_err(Clone::clone),
        export_as(&key, SECRET),
        "SignatureDoesNotMatch",
    );
    case(
        "S3 credentials without rights to the bucket",
        user.as_ref().map(|_| ()).map_err(Clone::clone),
        export_as(&key, &secret),
        "the store refused these credentials",
    );
    drop(moto);
    if let Ok(c) = &cluster {
        let rows = c.psql(
            "torture",
            "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM nokey",
        );
        if rows.as_deref().ok() != Some("1:1,2:2") {
            v.bad_inputs_failed += 1;
            v.problems.push(format!(
                "bad input a revert of a table whose key was dropped: the source changed ({rows:?})"
            ));
        }
    }

    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The S3 secret of the wrong-credentials case (never to appear in output).
const SECRET: &str = "not-the-secret-5d2a";

/// Captures `public.nokey` with its key, drops the key, inserts a row, and captures that:
/// `from` is set to the position just before the key was dropped.
fn keyless_archive(
    pgtrail: &Path,
    c: &Cluster,
    archive: &Path,
    from: &mut String,
) -> Result<(), String> {
    let sql = |q: &str| c.psql("torture", q).map_err(|e| e.to_string());
    let catch_up = |name: &str| -> Result<(), String> {
        let end = sql("SELECT pg_current_wal_insert_lsn()::text")?;
        let log = archive.with_extension(format!("{name}.log"));
        let mut child = capture_command(
            pgtrail,
            &c.url("torture"),
            archive,
            "keyless",
            "keyless",
            &log,
        )?
        .args(["--no-compact", "--stop-at", &end])
        .spawn()
        .map_err(|e| e.to_string())?;
        match wait_child(&mut child, Duration::from_secs(120)) {
            Some(s) if s.success() => Ok(()),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "capture {name} did not catch up ({other:?}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ))
            }
        }
    };
    sql("CREATE TABLE nokey (id int PRIMARY KEY, v int); INSERT INTO nokey VALUES (1, 1)")?;
    catch_up("keyed")?;
    *from = sql("SELECT pg_current_wal_insert_lsn()::text")?;
    sql("ALTER TABLE nokey DROP CONSTRAINT nokey_pkey; INSERT INTO nokey VALUES (2, 2)")?;
    catch_up("keyless")
}

/// moto's S3 server on loopback with signatures checked after its first [`NO_AUTH_ACTIONS`]
/// requests (`INITIAL_NO_AUTH_ACTION_COUNT`): an access key it does not know, a wrong secret and
/// a user without rights are refused, as AWS refuses them.
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Result<Moto, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", NO_AUTH_ACTIONS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start moto's S3 server (pip install 'moto[server]'): {e}")
            })?;
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(
                    "moto's S3 server did not listen within 60 s (pip install 'moto[server]')"
                        .into(),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(moto)
    }

    /// An IAM user the store knows, with no policy (so no rights to any bucket): its access
    /// key and secret. Made by the server's first two requests, the ones it takes without a
    /// signature ([`NO_AUTH_ACTIONS`]); every request after them is checked.
    fn user_without_rights(&self) -> Result<(String, String), String> {
        let out = Command::new("python3")
            .args(["-c", MAKE_USER, &self.endpoint])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run python3 to make an S3 user: {e}"))?;
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        match said.split_whitespace().collect::<Vec<_>>()[..] {
            [key, secret] if out.status.success() => Ok((key.to_string(), secret.to_string())),
            _ => Err(format!(
                "could not make an S3 user in moto (boto3 comes with moto[server]): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }
}

/// Requests moto takes without checking a signature: the two that make the user of
/// [`Moto::user_without_rights`]. Every later one is checked, as AWS checks it.
const NO_AUTH_ACTIONS: &str = "2";

/// Makes an IAM user with an access key and prints `KEY SECRET`.
const MAKE_USER: &str = "import sys, boto3
iam = boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='setup', aws_secret_access_key='setup')
iam.create_user(UserName='norights')
k = iam.create_access_key(UserName='norights')['AccessKey']
print(k['AccessKeyId'], k['SecretAccessKey'])
";

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
