//! A real S3-protocol server for tests: s3s-fs, on a free 127.0.0.1 port, over
//! a temp directory, installed by `tools::s3s_fs()` on first use.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::tools::{self, free_port};

pub const ACCESS_KEY: &str = "brook-test-key";
pub const SECRET_KEY: &str = "brook-test-secret";
pub const BUCKET: &str = "bucket";

/// A running server holding one bucket, stopped when dropped.
pub struct S3 {
    child: Child,
    pub port: u16,
    pub root: tempfile::TempDir,
    /// The bucket, as the tests inspect and fill it.
    pub store: Arc<dyn ObjectStore>,
}

impl S3 {
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        // A bucket is a directory under the server's root.
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = free_port();
        let child = Command::new(tools::s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "s3s-fs did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut builder = AmazonS3Builder::new().with_bucket_name(BUCKET);
        for (key, value) in env(port) {
            builder = builder.with_config(key.to_ascii_lowercase().parse().unwrap(), value);
        }
        let store = Arc::new(builder.build().unwrap());
        Self {
            child,
            port,
            root,
            store,
        }
    }

    /// The environment a brook process needs to reach the bucket as `s3://bucket/...`.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        env(self.port)
    }

    /// The directory holding the bucket's objects on disk.
    pub fn bucket_dir(&self) -> std::path::PathBuf {
        self.root.path().join(BUCKET)
    }

    /// Puts `bytes` at `key` in the bucket.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) {
        self.store
            .put(&StorePath::from(key), PutPayload::from(bytes))
            .await
            .unwrap();
    }

    /// The keys under `prefix`, sorted.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let mut keys: Vec<String> = self
            .store
            .list(Some(&StorePath::from(prefix)))
            .map_ok(|o| o.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    pub async fn get(&self, key: &str) -> bytes::Bytes {
        self.store
            .get(&StorePath::from(key))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    }

    /// A brook command with the environment to reach the bucket, and no AWS
    /// settings of the machine's user.
    pub fn brook(&self, dir: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_brook"));
        command.current_dir(dir);
        for (key, _) in std::env::vars() {
            if key.starts_with("AWS_") {
                command.env_remove(key);
            }
        }
        command.envs(self.env());
        command
    }
}

fn env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ALLOW_HTTP", "true".into()),
        // Path-style requests (http://host/bucket/key): no DNS name per bucket.
        ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".into()),
    ]
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
