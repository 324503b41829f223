//! Where an export goes: a local directory or an S3 bucket, both behind `object_store` so the
//! two share one code path. Objects are always written whole: a local file appears by rename
//! (then is fsynced with its directory), an S3 object by a single PUT or a completed multipart
//! upload, so a reader never sees part of a file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use tokio::runtime::Handle;

use super::ExportError;

/// Files up to this size go in one PUT; larger ones in a multipart upload of this chunk size.
const SINGLE_PUT_BYTES: u64 = 16 << 20;

/// An export destination.
pub struct Destination {
    store: Arc<dyn ObjectStore>,
    /// As the user wrote it (for messages).
    display: String,
    /// The directory, for a local destination (fsync after each write).
    local_root: Option<PathBuf>,
    handle: Handle,
}

impl Destination {
    /// Open `url` (`s3://bucket/prefix` or a directory path). S3 settings come from the
    /// environment as AWS tools take them.
    pub fn open(url: &str, handle: Handle) -> Result<Destination, ExportError> {
        let bad = |why: String| ExportError::BadDestination {
            destination: url.to_string(),
            why,
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket name (write s3://bucket/prefix)".into()));
            }
            let has = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
            if !has("AWS_ACCESS_KEY_ID") || !has("AWS_SECRET_ACCESS_KEY") {
                return Err(ExportError::MissingCredentials {
                    destination: url.to_string(),
                });
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if !has("AWS_REGION") && !has("AWS_DEFAULT_REGION") {
                builder = builder.with_region("us-east-1");
            }
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .unwrap_or_default();
            // An S3-compatible store on plain HTTP (MinIO, moto) is named by its endpoint.
            let client = ClientOptions::new()
                .with_allow_http(endpoint.starts_with("http://"))
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(Duration::from_secs(120));
            // Fail within seconds when the endpoint is unreachable rather than retrying for
            // the library's default three minutes.
            let retry = RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            };
            let s3 = builder
                .with_client_options(client)
                .with_retry(retry)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let store: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(
                    s3,
                    prefix.trim_matches('/'),
                ))
            };
            return Ok(Destination {
                store,
                display: url.to_string(),
                local_root: None,
                handle,
            });
        }
        if let Some((scheme, _)) = url.split_once("://")
            && scheme != "file"
        {
            return Err(bad(format!(
                "{scheme}:// is not supported; use a directory path or s3://bucket/prefix"
            )));
        }
        let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        if dir.exists() && !dir.is_dir() {
            return Err(bad("it exists and is not a directory".into()));
        }
        std::fs::create_dir_all(&dir).map_err(|e| {
            bad(format!(
                "cannot create it ({e}); give a directory you can write, or s3://bucket/prefix"
            ))
        })?;
        let dir = dir.canonicalize().map_err(|source| ExportError::Io {
            path: dir.clone(),
            source,
        })?;
        let local = LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad(e.to_string()))?;
        Ok(Destination {
            store: Arc::new(local),
            display: url.to_string(),
            local_root: Some(dir),
            handle,
        })
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    fn error(&self, action: &'static str, path: &str, source: object_store::Error) -> ExportError {
        let said = store_says(&source);
        let hint = match source {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                "the store refused these credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may read and write this bucket and prefix"
            }
            _ if said.starts_with("NoSuchBucket") => "check the bucket's name and AWS_REGION",
            _ => "check the bucket, the credentials, and that AWS_ENDPOINT_URL is reachable",
        };
        ExportError::Destination {
            destination: self.display.clone(),
            action,
            path: path.to_string(),
            said,
            hint,
        }
    }

    /// The object at `path`, or `None` when there is none.
    pub fn get(&self, path: &str) -> Result<Option<Vec<u8>>, ExportError> {
        let location = ObjectPath::from(path);
        let got = self.handle.block_on(async {
            match self.store.get(&location).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map(|b| b.map(|b| b.to_vec()))
            .map_err(|e| self.error("read", path, e))
    }

    /// Write `bytes` as the whole object `path`.
    pub fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<(), ExportError> {
        let location = ObjectPath::from(path);
        self.handle
            .block_on(self.store.put(&location, PutPayload::from(bytes)))
            .map_err(|e| self.error("write", path, e))?;
        self.sync_local(path)
    }

    /// Write `bytes` as the object `path` only if there is none: `Ok(false)` when there is
    /// one (nothing was written). A hard link into place on a directory, a PUT with
    /// `If-None-Match: *` on S3: two writers never both succeed.
    pub fn put_if_absent(&self, path: &str, bytes: Vec<u8>) -> Result<bool, ExportError> {
        let location = ObjectPath::from(path);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.handle.block_on(
            self.store
                .put_opts(&location, PutPayload::from(bytes), options),
        ) {
            Ok(_) => {
                self.sync_local(path)?;
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.error("create", path, e)),
        }
    }

    /// Upload the local file `file` as the whole object `path`; returns its size.
    pub fn put_file(&self, path: &str, file: &Path) -> Result<u64, ExportError> {
        let io = |source| ExportError::Io {
            path: file.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(file).map_err(io)?.len();
        let location = ObjectPath::from(path);
        if size <= SINGLE_PUT_BYTES {
            let bytes = std::fs::read(file).map_err(io)?;
            self.handle
                .block_on(self.store.put(&location, PutPayload::from(bytes)))
                .map_err(|e| self.error("write", path, e))?;
        } else {
            // A multipart upload becomes visible only when completed, and whole.
            let upload = self
                .handle
                .block_on(self.store.put_multipart(&location))
                .map_err(|e| self.error("write", path, e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, SINGLE_PUT_BYTES as usize);
            let mut input = std::fs::File::open(file).map_err(io)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = input.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                self.handle
                    .block_on(writer.wait_for_capacity(4))
                    .map_err(|e| self.error("write", path, e))?;
                writer.write(&buf[..n]);
            }
            self.handle
                .block_on(writer.finish())
                .map_err(|e| self.error("write", path, e))?;
        }
        self.sync_local(path)?;
        Ok(size)
    }

    /// On a local destination, make a renamed-into-place file durable: the file, then its
    /// directory entry (object_store renames but does not fsync).
    fn sync_local(&self, path: &str) -> Result<(), ExportError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let full = root.join(path);
        let io = |source| ExportError::Io {
            path: full.clone(),
            source,
        };
        std::fs::File::open(&full)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        let mut dir = full.parent();
        // Directories created for new partitions must be durable too, up to the root.
        while let Some(d) = dir {
            std::fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|source| ExportError::Io {
                    path: d.to_path_buf(),
                    source,
                })?;
            if d == root.as_path() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }

    /// Every object under `prefix`.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, ExportError> {
        use futures_util::TryStreamExt;
        let location = ObjectPath::from(prefix);
        let listed: Result<Vec<_>, _> = self
            .handle
            .block_on(self.store.list(Some(&location)).try_collect());
        match listed {
            Ok(objects) => Ok(objects
                .into_iter()
                .map(|m| m.location.to_string())
                .collect()),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.error("list", prefix, e)),
        }
    }

    pub fn delete(&self, path: &str) -> Result<(), ExportError> {
        let location = ObjectPath::from(path);
        match self.handle.block_on(self.store.delete(&location)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", path, e)),
        }
    }
}

/// What the store said, once: S3's own code and message when its answer carries them
/// (`InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records.`),
/// otherwise the innermost cause (`tcp connect error: Connection refused`). Never the request's
/// signature or credentials: neither is in an error's text.
fn store_says(e: &object_store::Error) -> String {
    let whole = e.to_string();
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = whole.find(&open)? + open.len();
        let end = whole[start..].find(&format!("</{name}>"))?;
        Some(whole[start..start + end].trim().to_string())
    };
    if let Some(code) = tag("Code") {
        return match tag("Message") {
            Some(message) => format!("{code}: {}", message.trim_end_matches('.')),
            None => code,
        };
    }
    let mut innermost: &dyn std::error::Error = e;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

#[cfg(test)]
mod tests {
    use super::store_says;

    #[test]
    fn a_store_refusal_is_said_once_by_its_code_and_message() {
        let body = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not exist in our records.</Message><RequestId>1</RequestId></Error>";
        let refused = object_store::Error::PermissionDenied {
            path: "x/_pgtrail_export/cdf.json".into(),
            source: body.into(),
        };
        assert_eq!(
            store_says(&refused),
            "InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records"
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let unreachable = object_store::Error::Generic {
            store: "S3",
            source: Box::new(io),
        };
        assert_eq!(store_says(&unreachable), "Connection refused");
    }
}
