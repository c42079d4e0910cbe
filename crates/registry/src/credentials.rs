//! Credentials from Docker's config file (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`): `auths` entries, `credHelpers` and `credsStore`, the latter two via
//! the `docker-credential-<name>` helper protocol (`get`/`store` with JSON on stdin/stdout).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The key Docker uses for Docker Hub in `auths` and with helpers.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// What we authenticate with.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user name and password (or access token used as password).
    UserPassword { username: String, password: String },
    /// An OAuth2 refresh token (`identitytoken` in `auths`, user `<token>` from a helper).
    IdentityToken(String),
}

impl std::fmt::Debug for Credentials {
    // Never print secrets, not even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::UserPassword { username, .. } => f
                .debug_struct("UserPassword")
                .field("username", username)
                .finish_non_exhaustive(),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(..)"),
        }
    }
}

/// Where Docker's config lives and where its credential helpers are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// The directory holding `config.json`.
    pub dir: PathBuf,
    /// Run `docker-credential-*` helpers from this directory instead of `$PATH`.
    pub helper_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: std::collections::BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

impl DockerConfig {
    /// `$DOCKER_CONFIG`, else `$HOME/.docker`; helpers from `$PATH`.
    pub fn from_env() -> DockerConfig {
        let dir = match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/"))
                .join(".docker"),
        };
        DockerConfig {
            dir,
            helper_dir: None,
        }
    }

    /// A config in `dir`, helpers from `$PATH`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> DockerConfig {
        DockerConfig {
            dir: dir.into(),
            helper_dir: None,
        }
    }

    /// The path of `config.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    fn read(&self) -> Result<Option<serde_json::Value>> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(None),
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::DockerConfig {
                        path,
                        reason: format!("not valid JSON: {e}"),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::DockerConfig {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// The credentials for `registry` (a host as in a reference: `docker.io`, `ghcr.io`,
    /// `127.0.0.1:5000`), or `None` if the config has none. A helper named by `credHelpers`
    /// for this host wins over `credsStore`, which wins over `auths`, as in Docker.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>> {
        let Some(value) = self.read()? else {
            return Ok(None);
        };
        let path = self.path();
        let file: ConfigFile = serde_json::from_value(value).map_err(|e| Error::DockerConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let want = normalize_host(registry);
        if let Some((_, helper)) = file
            .cred_helpers
            .iter()
            .find(|(k, _)| normalize_host(k) == want)
        {
            return self.helper_get(helper, registry);
        }
        if let Some(helper) = file.creds_store.as_deref().filter(|h| !h.is_empty())
            && let Some(c) = self.helper_get(helper, registry)?
        {
            return Ok(Some(c));
        }
        let Some((key, entry)) = file.auths.iter().find(|(k, _)| normalize_host(k) == want) else {
            return Ok(None);
        };
        if let Some(t) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::IdentityToken(t.to_string())));
        }
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let bad = |reason: &str| Error::DockerConfig {
                path: path.clone(),
                reason: format!("`auths.{key}.auth`: {reason}"),
            };
            let decoded = B64
                .decode(auth.trim())
                .map_err(|e| bad(&format!("not base64: {e}")))?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad("not UTF-8"))?;
            let (user, pass) = decoded
                .split_once(':')
                .ok_or_else(|| bad("not `user:password`"))?;
            return Ok(Some(Credentials::UserPassword {
                username: user.to_string(),
                password: pass.to_string(),
            }));
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) => Ok(Some(Credentials::UserPassword {
                username: u.clone(),
                password: p.clone(),
            })),
            _ => Ok(None),
        }
    }

    /// Save credentials for `registry`: through the host's `credHelpers` entry or `credsStore`
    /// if the config names one, else as base64 `auth` in `auths`. Other content of the file is
    /// kept; the file is replaced atomically and readable by its owner only.
    pub fn store(&self, registry: &str, username: &str, password: &str) -> Result<()> {
        let path = self.path();
        let mut value = self
            .read()?
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        let bad = |reason: String| Error::DockerConfig {
            path: path.clone(),
            reason,
        };
        let obj = value
            .as_object_mut()
            .ok_or_else(|| bad("the top level is not a JSON object".to_string()))?;
        let want = normalize_host(registry);
        let helper = obj
            .get("credHelpers")
            .and_then(|h| h.as_object())
            .and_then(|h| {
                h.iter()
                    .find(|(k, _)| normalize_host(k) == want)
                    .and_then(|(_, v)| v.as_str().map(str::to_string))
            })
            .or_else(|| {
                obj.get("credsStore")
                    .and_then(|s| s.as_str())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            });
        let key = auth_key(registry);
        if let Some(helper) = helper {
            self.helper_store(&helper, &key, username, password)?;
            // Docker leaves an empty entry so `docker info` lists the registry.
            let auths = obj
                .entry("auths")
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if let Some(a) = auths.as_object_mut() {
                a.entry(key)
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
            }
        } else {
            let auths = obj
                .entry("auths")
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            let auths = auths
                .as_object_mut()
                .ok_or_else(|| bad("`auths` is not a JSON object".to_string()))?;
            // Drop other spellings of the same host so lookups cannot find a stale one first.
            auths.retain(|k, _| normalize_host(k) != want);
            auths.insert(
                key,
                serde_json::json!({ "auth": B64.encode(format!("{username}:{password}")) }),
            );
        }
        let bytes = serde_json::to_vec_pretty(&value).map_err(|e| bad(e.to_string()))?;
        write_private_atomic(&self.dir, &path, &bytes).map_err(|e| bad(e.to_string()))
    }

    fn helper_command(&self, helper: &str) -> PathBuf {
        let name = format!("docker-credential-{helper}");
        match &self.helper_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    fn helper_get(&self, helper: &str, registry: &str) -> Result<Option<Credentials>> {
        let server = auth_key(registry);
        let fail = |reason: String| Error::CredentialHelper {
            helper: helper.to_string(),
            action: "get",
            server: server.clone(),
            reason,
        };
        let out = run_helper(&self.helper_command(helper), "get", server.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // The protocol's "no entry" answer; not an error, just no credentials.
            if msg.contains("credentials not found") {
                return Ok(None);
            }
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(fail(format!("{} {msg} {stderr}", out.status)));
        }
        let ans: HelperAnswer = serde_json::from_slice(&out.stdout)
            .map_err(|e| fail(format!("answer is not the helper protocol's JSON: {e}")))?;
        if ans.username == "<token>" {
            return Ok(Some(Credentials::IdentityToken(ans.secret)));
        }
        if ans.username.is_empty() && ans.secret.is_empty() {
            return Ok(None);
        }
        Ok(Some(Credentials::UserPassword {
            username: ans.username,
            password: ans.secret,
        }))
    }

    fn helper_store(&self, helper: &str, server: &str, username: &str, secret: &str) -> Result<()> {
        let input =
            serde_json::json!({"ServerURL": server, "Username": username, "Secret": secret});
        let fail = |reason: String| Error::CredentialHelper {
            helper: helper.to_string(),
            action: "store",
            server: server.to_string(),
            reason,
        };
        let out = run_helper(
            &self.helper_command(helper),
            "store",
            input.to_string().as_bytes(),
        )
        .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        Ok(())
    }
}

fn run_helper(cmd: &Path, action: &str, stdin: &[u8]) -> std::io::Result<std::process::Output> {
    let mut child = Command::new(cmd)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin)?;
    }
    child.wait_with_output()
}

/// The key Docker uses for `registry` in `auths` and with helpers.
pub fn auth_key(registry: &str) -> String {
    if normalize_host(registry) == "docker.io" {
        DOCKER_HUB_AUTH_KEY.to_string()
    } else {
        registry.to_string()
    }
}

/// `https://index.docker.io/v1/` → `docker.io`, `http://host:5000/v2/` → `host:5000`.
fn normalize_host(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

fn write_private_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".config.json.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(json: &str) -> (tempfile::TempDir, DockerConfig) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        let cfg = DockerConfig::in_dir(dir.path());
        (dir, cfg)
    }

    fn up(u: &str, p: &str) -> Credentials {
        Credentials::UserPassword {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn auths_base64_with_any_key_spelling() {
        let (_d, cfg) = config(&format!(
            r#"{{"auths":{{
                "https://index.docker.io/v1/":{{"auth":"{}"}},
                "http://127.0.0.1:5000":{{"auth":"{}"}},
                "ghcr.io":{{"username":"gh","password":"pw"}},
                "quay.io":{{"identitytoken":"refresh-me"}}
            }}}}"#,
            B64.encode("hub:hubpass"),
            B64.encode("me:se:cret")
        ));
        assert_eq!(cfg.lookup("docker.io").unwrap(), Some(up("hub", "hubpass")));
        // The password may itself contain `:`.
        assert_eq!(
            cfg.lookup("127.0.0.1:5000").unwrap(),
            Some(up("me", "se:cret"))
        );
        assert_eq!(cfg.lookup("ghcr.io").unwrap(), Some(up("gh", "pw")));
        assert_eq!(
            cfg.lookup("quay.io").unwrap(),
            Some(Credentials::IdentityToken("refresh-me".into()))
        );
        assert_eq!(cfg.lookup("127.0.0.1:5001").unwrap(), None);
    }

    #[test]
    fn missing_or_empty_config_means_anonymous_and_bad_json_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            DockerConfig::in_dir(dir.path()).lookup("x.io").unwrap(),
            None
        );
        let (_d, cfg) = config("{}");
        assert_eq!(cfg.lookup("x.io").unwrap(), None);
        let (_d, cfg) = config("{not json");
        let e = cfg.lookup("x.io").unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
        let (_d, cfg) = config(r#"{"auths":{"x.io":{"auth":"!!!"}}}"#);
        let e = cfg.lookup("x.io").unwrap_err().to_string();
        assert!(e.contains("auths.x.io.auth"), "{e}");
    }

    /// A fake helper that answers for `reg.test` and `docker.io`, logs what it was asked, and
    /// records `store` input.
    fn fake_helper(dir: &Path) {
        let script = r#"#!/bin/sh
read -r input
echo "$1 $input" >> "$(dirname "$0")/helper.log"
case "$1" in
get)
  case "$input" in
    reg.test) echo '{"ServerURL":"reg.test","Username":"alice","Secret":"s3cret"}' ;;
    https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"<token>","Secret":"idtok"}' ;;
    *) echo "credentials not found in native keychain"; exit 1 ;;
  esac ;;
store) exit 0 ;;
*) exit 2 ;;
esac
"#;
        let p = dir.join("docker-credential-test");
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn cred_helpers_and_creds_store_via_helper_protocol() {
        let (d, mut cfg) = config(&format!(
            r#"{{"credHelpers":{{"reg.test":"test"}},"credsStore":"test",
               "auths":{{"other.test":{{"auth":"{}"}}}}}}"#,
            B64.encode("bob:pw")
        ));
        let helpers = tempfile::tempdir().unwrap();
        fake_helper(helpers.path());
        cfg.helper_dir = Some(helpers.path().to_path_buf());
        assert_eq!(cfg.lookup("reg.test").unwrap(), Some(up("alice", "s3cret")));
        // Through credsStore, with Docker Hub's key and an identity token answer.
        assert_eq!(
            cfg.lookup("docker.io").unwrap(),
            Some(Credentials::IdentityToken("idtok".into()))
        );
        // The store has nothing for other.test: fall back to `auths`.
        assert_eq!(cfg.lookup("other.test").unwrap(), Some(up("bob", "pw")));
        let log = std::fs::read_to_string(helpers.path().join("helper.log")).unwrap();
        assert!(log.contains("get reg.test"), "{log}");
        assert!(log.contains("get https://index.docker.io/v1/"), "{log}");
        drop(d);
    }

    #[test]
    fn missing_helper_is_a_clear_error() {
        let (_d, mut cfg) = config(r#"{"credHelpers":{"reg.test":"nope"}}"#);
        cfg.helper_dir = Some(PathBuf::from("/nonexistent-dir"));
        let e = cfg.lookup("reg.test").unwrap_err().to_string();
        assert!(e.contains("docker-credential-nope"), "{e}");
    }

    #[test]
    fn store_writes_auths_keeps_other_content_and_is_private() {
        let (d, cfg) = config(
            r#"{"auths":{"http://reg.test:5000":{"auth":"b2xkOm9sZA=="}},"psFormat":"table"}"#,
        );
        cfg.store("reg.test:5000", "new", "pass:word").unwrap();
        assert_eq!(
            cfg.lookup("reg.test:5000").unwrap(),
            Some(up("new", "pass:word"))
        );
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cfg.path()).unwrap()).unwrap();
        assert_eq!(v["psFormat"], "table");
        assert_eq!(v["auths"].as_object().unwrap().len(), 1, "{v}");
        let mode = std::fs::metadata(cfg.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Docker Hub gets Docker's key.
        cfg.store("docker.io", "h", "p").unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cfg.path()).unwrap()).unwrap();
        assert!(v["auths"][DOCKER_HUB_AUTH_KEY]["auth"].is_string(), "{v}");
        drop(d);
    }

    #[test]
    fn store_goes_through_the_helper_when_configured() {
        let (_d, mut cfg) = config(r#"{"credsStore":"test"}"#);
        let helpers = tempfile::tempdir().unwrap();
        fake_helper(helpers.path());
        cfg.helper_dir = Some(helpers.path().to_path_buf());
        cfg.store("reg.test", "alice", "pw").unwrap();
        let log = std::fs::read_to_string(helpers.path().join("helper.log")).unwrap();
        assert!(log.starts_with("store {"), "{log}");
        assert!(log.contains(r#""ServerURL":"reg.test""#), "{log}");
        let text = std::fs::read_to_string(cfg.path()).unwrap();
        assert!(
            !text.contains("pw"),
            "secret must not be in the file: {text}"
        );
    }
}
