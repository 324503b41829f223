//! `pgtrail keygen`: a new key to sign the archive's checkpoints with (issue 20), written to a
//! file only its owner can read; its verifier key is printed for auditors.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use pgtrail_store::evidence::note::SigningKey;

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// The key's name: the origin line of every checkpoint it signs, a name that says whose
    /// archive it is (e.g. `pgtrail.example.com/shop`; no `+`, spaces or newlines).
    #[arg(long)]
    pub name: String,
    /// Where to write the signing key (created with mode 0600; an existing file is never
    /// overwritten). Keep it outside the archive: whoever can write the archive must not be
    /// able to sign for it.
    #[arg(long)]
    pub out: PathBuf,
    /// The key is an auditor's or a witness's, for `pgtrail cosign`: print its cosigner
    /// verifier key (C2SP tlog-cosignature, type 0x04), which `verify --witness-key` takes.
    #[arg(long)]
    pub cosigner: bool,
}

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let (signing, verifier) = SigningKey::generate(&args.name)
        .with_context(|| format!("cannot make a key named {:?}", args.name))?;
    if args.out.exists() {
        bail!(
            "{} exists: pgtrail keygen never overwrites a key (a key replaced is a key lost); \
             choose another --out or remove the old file yourself",
            args.out.display()
        );
    }
    let dir = match args.out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Written whole, then linked into place only if nothing is there (tempfile's files are
    // created 0600): no moment exists where the key is readable by others or half written,
    // and a file that appeared meanwhile is not replaced.
    let mut file = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    writeln!(file, "{signing}").context("writing the key")?;
    file.as_file().sync_all().context("writing the key")?;
    file.persist_noclobber(&args.out).map_err(|e| {
        anyhow::anyhow!(
            "cannot put the key at {}: {} (nothing was written there)",
            args.out.display(),
            e.error
        )
    })?;
    pgtrail_store::fsync_dir(&dir).context("making the key's file durable")?;
    if args.cosigner {
        let key = SigningKey::parse(&signing).context("reading the key back")?;
        eprintln!(
            "pgtrail keygen: cosigner key written to {} (mode 0600; keep it secret). Its verifier \
             key, for `pgtrail verify --witness-key`, follows on standard output.",
            args.out.display()
        );
        println!("{}", key.cosigner_key());
        return Ok(());
    }
    eprintln!(
        "pgtrail keygen: signing key written to {} (mode 0600; keep it secret, outside the archive). \
         The verifier key, for auditors, follows on standard output.",
        args.out.display()
    );
    println!("{verifier}");
    Ok(())
}
