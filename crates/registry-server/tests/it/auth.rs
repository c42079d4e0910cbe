//! Multi-tenant mode: two orgs, users, API tokens, the bearer-token flow, cross-org refusals.

use reqwest::{Method, StatusCode};
use serde_json::Value;
use strata_oci::Digest;
use strata_registry_server::{Admin, AuthMode, TokenScope};

use crate::common::*;

struct Setup {
    s: Server,
    alice: Creds,
    bob: Creds,
    a_pull_token: String,
    a_push_token: String,
}

async fn setup() -> Setup {
    let s = start(|c| c.auth = AuthMode::Orgs).await;
    let admin = Admin::open(&s.root).unwrap();
    admin.create_org("a").unwrap();
    admin.create_org("b").unwrap();
    admin.create_user("a", "alice", "alice-pw").unwrap();
    admin.create_user("b", "bob", "bob-pw").unwrap();
    let a_pull_token = admin.create_token("a", TokenScope::Pull).unwrap();
    let a_push_token = admin.create_token("a", TokenScope::Push).unwrap();
    Setup {
        alice: Creds::Basic("alice".into(), "alice-pw".into()),
        bob: Creds::Basic("bob".into(), "bob-pw".into()),
        s,
        a_pull_token,
        a_push_token,
    }
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_requests_get_a_bearer_challenge() {
    let t = setup().await;
    let s = &t.s;
    let r = s
        .req(Method::GET, "/v2/", &Creds::None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge(&r),
        format!(r#"Bearer realm="http://{}/token",service="strata""#, s.addr)
    );
    assert_eq!(error_codes(r).await, ["UNAUTHORIZED"]);

    let r = s
        .req(Method::GET, "/v2/a/app/manifests/v1", &Creds::None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge(&r),
        format!(
            r#"Bearer realm="http://{}/token",service="strata",scope="repository:a/app:pull""#,
            s.addr
        )
    );
    let r = s
        .req(Method::POST, "/v2/a/app/blobs/uploads/", &Creds::None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).ends_with(r#"scope="repository:a/app:pull,push""#));
    let r = s
        .req(Method::GET, "/v2/_catalog", &Creds::None)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Wrong password: 401 too.
    let r = s
        .req(
            Method::GET,
            "/v2/",
            &Creds::Basic("alice".into(), "nope".into()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s.req(Method::GET, "/v2/", &t.alice).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_orgs_repositories_are_denied_without_revealing_content() {
    let t = setup().await;
    let s = &t.s;
    let (md, _) = s.push_image("a/app", "v1", "secret", &t.alice).await;
    let layer = Digest::sha256(b"layer of secret");

    for path in [
        "/v2/a/app/manifests/v1".to_string(),
        format!("/v2/a/app/manifests/{md}"),
        format!("/v2/a/app/blobs/{layer}"),
        // Absent content answers the same: existence does not leak.
        format!("/v2/a/app/blobs/{}", Digest::sha256(b"absent")),
        "/v2/a/app/tags/list".to_string(),
        "/v2/a/nothing/tags/list".to_string(),
    ] {
        let r = s.req(Method::GET, &path, &t.bob).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(error_codes(r).await, ["DENIED"], "{path}");
    }
    let r = s
        .req(Method::POST, "/v2/a/app/blobs/uploads/", &t.bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s
        .req(Method::DELETE, "/v2/a/app/manifests/v1", &t.bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A repository outside every org is no one's.
    let r = s
        .req(Method::GET, "/v2/app/tags/list", &t.alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Bob works in his own org; the catalog shows each org its own repositories.
    s.push_image("b/app", "v1", "bob's", &t.bob).await;
    let r = s
        .req(Method::GET, "/v2/_catalog", &t.bob)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["repositories"],
        serde_json::json!(["b/app"])
    );
    let r = s
        .req(Method::GET, "/v2/_catalog", &t.alice)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["repositories"],
        serde_json::json!(["a/app"])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_works_within_an_org_and_falls_back_to_upload_across_orgs() {
    let t = setup().await;
    let s = &t.s;
    let d = s.push_blob("a/base", b"base layer", &t.alice).await;
    let r = s
        .req(
            Method::POST,
            &format!("/v2/a/app/blobs/uploads/?mount={d}&from=a/base"),
            &t.alice,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .req(Method::HEAD, &format!("/v2/a/app/blobs/{d}"), &t.alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Bob asks to mount org a's blob into his repository: a plain upload session, the same
    // answer as for a digest that exists nowhere.
    for digest in [d.clone(), Digest::sha256(b"absent")] {
        let r = s
            .req(
                Method::POST,
                &format!("/v2/b/app/blobs/uploads/?mount={digest}&from=a/base"),
                &t.bob,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        assert!(
            r.headers()["location"]
                .to_str()
                .unwrap()
                .starts_with("/v2/b/app/blobs/uploads/")
        );
    }
    let r = s
        .req(Method::HEAD, &format!("/v2/b/app/blobs/{d}"), &t.bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Nor can he borrow it by naming its digest in a manifest.
    let cd = s.push_blob("b/app", b"{}", &t.bob).await;
    let m = manifest_json(&cd, 2, &[(&d, 10)], None);
    let r = s
        .put_manifest("b/app", "stolen", OCI_MANIFEST, &m, &t.bob)
        .await;
    assert_eq!(error_codes(r).await, ["MANIFEST_BLOB_UNKNOWN"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_tokens_carry_their_scope() {
    let t = setup().await;
    let s = &t.s;
    let push = Creds::Basic("a".into(), t.a_push_token.clone());
    let pull = Creds::Basic("ci".into(), t.a_pull_token.clone());
    let (md, _) = s.push_image("a/app", "v1", "tok", &push).await;
    let r = s
        .req(Method::GET, &format!("/v2/a/app/manifests/{md}"), &pull)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(Method::POST, "/v2/a/app/blobs/uploads/", &pull)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_codes(r).await, ["DENIED"]);
    // An API token also works as a bearer token.
    let r = s
        .req(
            Method::GET,
            "/v2/a/app/manifests/v1",
            &Creds::Bearer(t.a_pull_token.clone()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(Method::GET, "/v2/b/x/manifests/v1", &pull)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A revoked token stops working.
    let admin = Admin::open(&s.root).unwrap();
    let ids = admin.tokens(Some("a")).unwrap();
    assert_eq!(ids.len(), 2);
    for tok in &ids {
        assert!(admin.revoke_token(&tok.id).unwrap());
    }
    let r = s
        .req(
            Method::GET,
            "/v2/a/app/manifests/v1",
            &Creds::Bearer(t.a_pull_token.clone()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_token_flow() {
    let t = setup().await;
    let s = &t.s;
    let get_token = |creds: Creds, scope: &'static str| {
        s.req(
            Method::GET,
            &format!("/token?service=strata&scope={scope}"),
            &creds,
        )
        .send()
    };
    // A wrong password is called that, not a missing one (it read "credentials required").
    let r = get_token(
        Creds::Basic("alice".into(), "wrong-password".into()),
        "repository:a/app:pull",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body = r.text().await.unwrap();
    assert!(body.contains("incorrect username or password"), "{body}");
    let r = get_token(t.alice.clone(), "repository:a/app:pull,push")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["access_token"], token.as_str());
    assert_eq!(v["expires_in"], 900);
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'));
    let bearer = Creds::Bearer(token.clone());
    let (md, _) = s.push_image("a/app", "v1", "jwt", &bearer).await;
    let r = s
        .req(Method::GET, &format!("/v2/a/app/manifests/{md}"), &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The token covers only its scope: another repository asks for a new token.
    let r = s
        .req(Method::GET, "/v2/a/other/tags/list", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains(r#"scope="repository:a/other:pull""#));
    // A pull-only token cannot push.
    let r = get_token(t.alice.clone(), "repository:a/app:pull")
        .await
        .unwrap();
    let pull_only = Creds::Bearer(
        r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    let r = s
        .req(Method::GET, "/v2/a/app/manifests/v1", &pull_only)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(Method::POST, "/v2/a/app/blobs/uploads/", &pull_only)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains(r#"scope="repository:a/app:pull,push""#));

    // Bob gets a token, but it grants nothing in org a.
    let r = get_token(t.bob.clone(), "repository:a/app:pull")
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let bobs = Creds::Bearer(v["token"].as_str().unwrap().to_string());
    let r = s
        .req(Method::GET, "/v2/a/app/manifests/v1", &bobs)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // No or bad credentials at /token: 401; a forged token: 401.
    let r = get_token(Creds::None, "repository:a/app:pull")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = get_token(
        Creds::Basic("alice".into(), "wrong".into()),
        "repository:a/app:pull",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged_claims = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        claims["org"] = "b".into();
        b64.encode(serde_json::to_vec(&claims).unwrap())
    };
    parts[1] = &forged_claims;
    let r = s
        .req(
            Method::GET,
            "/v2/b/app/tags/list",
            &Creds::Bearer(parts.join(".")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_refuses_bad_names_and_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let admin = Admin::open(tmp.path()).unwrap();
    admin.create_org("acme").unwrap();
    assert!(admin.create_org("acme").is_err());
    for bad in ["Acme", "a/b", "", "-x", "../x"] {
        assert!(admin.create_org(bad).is_err(), "{bad}");
    }
    assert!(admin.create_user("nope", "u", "p").is_err());
    admin.create_user("acme", "u", "p").unwrap();
    assert!(admin.create_user("acme", "u", "p").is_err());
    assert!(admin.create_token("nope", TokenScope::Pull).is_err());
    let tok = admin.create_token("acme", TokenScope::Push).unwrap();
    assert!(tok.starts_with("strata_") && tok.len() > 40);
    assert_eq!(admin.orgs().unwrap(), ["acme"]);
    // The secret is not stored.
    for f in ["registry-v1.db", "registry-v1.db-wal"] {
        let db = std::fs::read(tmp.path().join(f)).unwrap_or_default();
        assert!(!db.windows(tok.len()).any(|w| w == tok.as_bytes()), "{f}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_is_refused_at_once_on_every_path() {
    let t = setup().await;
    let s = &t.s;
    let basic = Creds::Basic("ci".into(), t.a_push_token.clone());
    // Basic auth with the token: a push, so the verified credentials are warm.
    s.push_image("a/app", "v1", "before", &basic).await;
    // A bearer token from `/token`, issued on the strength of the API token.
    let r = s
        .req(
            Method::GET,
            "/token?service=strata&scope=repository:a/app:pull,push",
            &basic,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let jwt = Creds::Bearer(
        r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    let start = |creds: &Creds| {
        s.req(Method::POST, "/v2/a/app/blobs/uploads/", creds)
            .send()
    };
    assert_eq!(start(&jwt).await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(start(&basic).await.unwrap().status(), StatusCode::ACCEPTED);

    // Revoked by another process's handle on the database, as `strata registry token revoke`.
    let admin = Admin::open(&s.root).unwrap();
    let id = admin
        .tokens(Some("a"))
        .unwrap()
        .into_iter()
        .find(|i| i.scope == TokenScope::Push)
        .unwrap()
        .id;
    assert!(admin.revoke_token(&id).unwrap());

    for creds in [&basic, &jwt, &Creds::Bearer(t.a_push_token.clone())] {
        let r = start(creds).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{creds:?}");
        let r = s
            .req(Method::GET, "/v2/a/app/manifests/v1", creds)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{creds:?}");
    }
    // Users' cached logins and the other token are untouched.
    let pull = Creds::Basic("ci".into(), t.a_pull_token.clone());
    for creds in [&t.alice, &pull] {
        let r = s
            .req(Method::GET, "/v2/a/app/manifests/v1", creds)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{creds:?}");
    }
}
