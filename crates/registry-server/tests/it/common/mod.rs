//! Test helpers: an in-process registry on 127.0.0.1:0 and small push helpers over raw HTTP.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use strata_oci::Digest;
use strata_registry_server::ServerConfig;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub struct Server {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub root: std::path::PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
    pub config: ServerConfig,
    /// Other replicas' base URLs: when set, every request goes to the next server in turn.
    pub others: Vec<String>,
    turn: std::sync::atomic::AtomicUsize,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

pub async fn start(configure: impl FnOnce(&mut ServerConfig)) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start_at(tmp.path(), configure).await;
    s._tmp = Some(tmp);
    s
}

/// A server on `root`, which the caller keeps (to restart a server on the same data).
pub async fn start_at(root: &std::path::Path, configure: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig::new(root);
    configure(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = config.clone();
    let task = tokio::spawn(async move {
        strata_registry_server::serve_with_shutdown(cfg, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Server {
        base: format!("http://{addr}"),
        addr,
        root: root.to_path_buf(),
        _tmp: None,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        config,
        others: Vec::new(),
        turn: std::sync::atomic::AtomicUsize::new(0),
        stop: Some(tx),
        task,
    }
}

/// Credentials for requests.
#[derive(Clone, Debug)]
pub enum Creds {
    None,
    Basic(String, String),
    Bearer(String),
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        if self.others.is_empty() {
            return format!("{}{path}", self.base);
        }
        let n =
            self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (1 + self.others.len());
        let base = if n == 0 {
            &self.base
        } else {
            &self.others[n - 1]
        };
        format!("{base}{path}")
    }

    pub fn req(&self, method: Method, path: &str, creds: &Creds) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            self.url(path)
        };
        let b = self.http.request(method, url);
        match creds {
            Creds::None => b,
            Creds::Basic(u, p) => b.basic_auth(u, Some(p)),
            Creds::Bearer(t) => b.bearer_auth(t),
        }
    }

    /// Monolithic POST+PUT upload; asserts 201.
    pub async fn push_blob(&self, repo: &str, data: &[u8], creds: &Creds) -> Digest {
        let d = Digest::sha256(data);
        let r = self
            .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), creds)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let r = self
            .req(Method::PUT, &format!("{loc}?digest={d}"), creds)
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
        d
    }

    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
        creds: &Creds,
    ) -> reqwest::Response {
        self.req(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            creds,
        )
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
    }

    /// Push config + one layer + manifest under `tag`; returns (manifest digest, bytes).
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        seed: &str,
        creds: &Creds,
    ) -> (Digest, Vec<u8>) {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":"{seed}"}}"#);
        let layer = format!("layer of {seed}").into_bytes();
        let cd = self.push_blob(repo, config.as_bytes(), creds).await;
        let ld = self.push_blob(repo, &layer, creds).await;
        let m = manifest_json(&cd, config.len(), &[(&ld, layer.len())], None);
        let r = self.put_manifest(repo, tag, OCI_MANIFEST, &m, creds).await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        (Digest::sha256(&m), m)
    }
}

pub fn manifest_json(
    config: &Digest,
    config_size: usize,
    layers: &[(&Digest, usize)],
    extra: Option<Value>,
) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.to_string(), "size": config_size},
        "layers": layers.iter().map(|(d, s)| json!({"mediaType": OCI_LAYER, "digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
    });
    if let Some(Value::Object(extra)) = extra {
        for (k, v) in extra {
            m[k] = v;
        }
    }
    serde_json::to_vec(&m).unwrap()
}

pub async fn error_codes(r: reqwest::Response) -> Vec<String> {
    let v: Value = r.json().await.unwrap();
    v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap().to_string())
        .collect()
}
