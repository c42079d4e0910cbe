//! Run a registry for manual tests and benchmarks: `serve ROOT [ADDR]` (anonymous, filesystem).
#![allow(clippy::unwrap_used)]

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let root = args.next().expect("usage: serve ROOT [ADDR]");
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:5000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    eprintln!(
        "serving {root} on http://{}",
        listener.local_addr().unwrap()
    );
    strata_registry_server::serve(strata_registry_server::ServerConfig::new(root), listener)
        .await
        .unwrap();
}
