//! The agent's port owner: a TCP proxy that forwards each connection to one of the current
//! backends (Fly's proxy, in small).
//!
//! The deployer replaces a machine without downtime like this: start the new machine, wait until
//! it is healthy, [`Proxy::set_backends`] to the new set (new connections go there at once),
//! wait until [`Proxy::active_connections`] of the old backend is 0 or a drain timeout passes,
//! then stop the old machine. Connections opened before the switch stay on their backend: the
//! proxy never moves an established connection.
//!
//! A connection counts against its backend from the moment it picks it, before connecting, and
//! the pick and the count happen under the same lock a switch takes: once `set_backends`
//! returns, a connection that will ever use an old backend is already counted. So 0 active
//! connections after a switch means the old machine can go at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use strata_oci::sync::{MutexExt, RwLockExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::{Error, Result};

/// Settings of a [`Proxy`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Most client connections served at once. Further clients wait in the kernel's accept
    /// backlog (and are refused by the kernel when that is full), so memory stays bounded.
    /// 0 is treated as 1.
    pub max_connections: usize,
    /// How long to wait for one backend to accept before trying the next.
    pub connect_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_connections: 4096,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A running TCP proxy. Cloning gives another handle to the same proxy; the proxy stops when
/// [`Proxy::shutdown`] is called or the last handle is dropped.
#[derive(Clone, Debug)]
pub struct Proxy {
    handle: Arc<Handle>,
}

/// What the handles share; dropping it (with the last handle) stops the accept task, because
/// the accept task watches `stop` and a dropped sender wakes it.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// State read by the accept task and every connection task.
#[derive(Debug)]
struct Shared {
    /// The current set. Each connection takes a snapshot (`Arc` clone) when it starts, so a
    /// switch is atomic and never disturbs connections in flight.
    backends: RwLock<Arc<Vec<SocketAddr>>>,
    next: AtomicUsize,
    active: Mutex<HashMap<SocketAddr, usize>>,
    connect_timeout: Duration,
}

impl Proxy {
    /// Listens on `listen` with the default [`ProxyConfig`] and starts accepting on a tokio task.
    /// The backend set starts empty: clients get a 502 until [`Proxy::set_backends`].
    pub async fn bind(listen: SocketAddr) -> Result<Proxy> {
        Proxy::bind_with(listen, ProxyConfig::default()).await
    }

    /// Like [`Proxy::bind`] with explicit settings.
    pub async fn bind_with(listen: SocketAddr, config: ProxyConfig) -> Result<Proxy> {
        let bind_err = |source| Error::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let shared = Arc::new(Shared {
            backends: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
            active: Mutex::new(HashMap::new()),
            connect_timeout: config.connect_timeout,
        });
        let (stop, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), limit, stop_rx));
        Ok(Proxy {
            handle: Arc::new(Handle {
                shared,
                local_addr,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The address the proxy listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }

    /// Replaces the backend set. Connections accepted from now on pick among `backends`;
    /// established connections keep their backend.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        let shared = &self.handle.shared;
        // Lock order: `active`, then `backends` (as in `Shared::claim`).
        let _picks = shared.active.lock_ok();
        let mut current = shared.backends.write_ok();
        *current = Arc::new(backends);
    }

    /// The current backend set.
    pub fn backends(&self) -> Vec<SocketAddr> {
        self.handle.shared.current_backends().as_ref().clone()
    }

    /// How many client connections are forwarded to `backend` right now, whether or not it is
    /// still in the set: the deployer waits for this to reach 0 before stopping an old machine.
    pub fn active_connections(&self, backend: SocketAddr) -> usize {
        let active = self.handle.shared.active.lock_ok();
        active.get(&backend).copied().unwrap_or(0)
    }

    /// Stops accepting, closes the listening socket and closes every forwarded connection,
    /// for every handle of this proxy. Returns when all of that is done.
    pub async fn shutdown(self) {
        // send_replace stores the value even when no receiver is left (the task ended).
        self.handle.stop.send_replace(true);
        let task = self.handle.task.lock_ok().take();
        if let Some(task) = task {
            // The task ends by itself on the stop signal; a JoinError here means it panicked,
            // which has already been reported by the panic hook.
            let _ = task.await;
        }
    }
}

impl Shared {
    fn current_backends(&self) -> Arc<Vec<SocketAddr>> {
        Arc::clone(&self.backends.read_ok())
    }

    /// Counts a connection against `backend` of `set`, unless `set` is no longer the current
    /// set (a switch happened meanwhile: the caller must pick again from the new one).
    fn claim(
        self: &Arc<Shared>,
        set: &Arc<Vec<SocketAddr>>,
        backend: SocketAddr,
    ) -> Option<ActiveGuard> {
        let mut active = self.active.lock_ok();
        if !Arc::ptr_eq(set, &self.current_backends()) {
            return None;
        }
        *active.entry(backend).or_insert(0) += 1;
        Some(ActiveGuard {
            shared: Arc::clone(self),
            backend,
        })
    }
}

/// Accepts while a connection slot is free. Connection tasks live in a `JoinSet` owned here, so
/// when this loop ends (stop signal) dropping the set closes every forwarded connection.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        // Take the slot before accepting: while all slots are busy, clients wait in the kernel
        // backlog instead of in our memory.
        let permit = tokio::select! {
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed; nothing to serve without it
            },
        };
        let accepted = loop {
            tokio::select! {
                _ = stop.changed() => break None,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => break Some(accepted),
            }
        };
        match accepted {
            None => break,
            Some(Ok((client, peer))) => {
                connections.spawn(serve_connection(client, peer, Arc::clone(&shared), permit));
            }
            Some(Err(err)) => {
                // EMFILE and friends: the listener is fine, resources are short. Back off a
                // little instead of spinning; never give up the port.
                tracing::warn!(error = %err, "proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    tracing::debug!(
        open = connections.len(),
        "proxy: stopped accepting; closing connections"
    );
    // Abort and wait, so that when `shutdown` returns every socket is closed and
    // `active_connections` reads 0.
    connections.shutdown().await;
}

/// Counts a connection against its backend for as long as it lives (from [`Shared::claim`]).
struct ActiveGuard {
    shared: Arc<Shared>,
    backend: SocketAddr,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut active = self.shared.active.lock_ok();
        if let Some(count) = active.get_mut(&self.backend) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                active.remove(&self.backend);
            }
        }
    }
}

async fn serve_connection(
    mut client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let Some((mut upstream, active)) = connect_backend(&shared, peer).await else {
        bad_gateway(client, peer).await;
        return;
    };
    let backend = active.backend;
    // Small request/response exchanges would otherwise wait on Nagle + delayed ACK.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            tracing::debug!(%peer, %backend, up, down, "proxy: connection closed");
        }
        Err(err) => {
            tracing::debug!(%peer, %backend, error = %err, "proxy: connection ended with an error");
        }
    }
}

/// Tries the backends of the current set round-robin, each at most once. When they all fail
/// and the set changed meanwhile (a deploy switched it while this connection was connecting
/// to a machine that is now stopping), the new set gets its turn: a client never sees a 502
/// for a switch it raced with.
///
/// A backend that refuses once may only be busy (a full accept queue on a loaded host): the
/// set is tried again after a short pause, a few times, before the client gets its 502.
async fn connect_backend(
    shared: &Arc<Shared>,
    peer: SocketAddr,
) -> Option<(TcpStream, ActiveGuard)> {
    const PAUSES_MS: [u64; 3] = [0, 50, 250];
    for pause in PAUSES_MS {
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let first = shared.current_backends();
        if let Some(found) = connect_any(shared, peer, &first).await {
            return Some(found);
        }
        let now = shared.current_backends();
        if !Arc::ptr_eq(&first, &now)
            && let Some(found) = connect_any(shared, peer, &now).await
        {
            return Some(found);
        }
        if now.is_empty() {
            return None;
        }
    }
    None
}

async fn connect_any(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    backends: &Arc<Vec<SocketAddr>>,
) -> Option<(TcpStream, ActiveGuard)> {
    if backends.is_empty() {
        tracing::debug!(%peer, "proxy: no backends");
        return None;
    }
    let start = shared.next.fetch_add(1, Ordering::Relaxed);
    for i in 0..backends.len() {
        let backend = backends[(start.wrapping_add(i)) % backends.len()];
        // Counted before connecting; a switch since this set was read ends the old set's turn.
        let guard = shared.claim(backends, backend)?;
        match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(backend)).await {
            Ok(Ok(stream)) => return Some((stream, guard)),
            Ok(Err(err)) => {
                tracing::debug!(%peer, %backend, error = %err, "proxy: backend refused");
            }
            Err(_) => {
                tracing::debug!(%peer, %backend, timeout = ?shared.connect_timeout,
                    "proxy: backend connect timed out");
            }
        }
    }
    None
}

/// Most clients of the proxy speak HTTP; a 502 tells them (and the human behind them) what
/// happened, where a bare close would look like a network fault. Nothing was forwarded yet, so
/// the response cannot interleave with a backend's.
async fn bad_gateway(mut client: TcpStream, peer: SocketAddr) {
    const BODY: &str = "no backend available\n";
    let response = format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let result = async {
        client.write_all(response.as_bytes()).await?;
        client.shutdown().await?;
        // Closing a socket with unread input makes Linux send RST, and the client may then lose
        // our response. Read (and drop) what the client sends until it closes, within bounds.
        let mut buf = [0u8; 4096];
        let mut left = 64 * 1024usize;
        let drain = async {
            while left > 0 {
                match client.read(&mut buf).await? {
                    0 => break,
                    n => left = left.saturating_sub(n),
                }
            }
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        Ok::<_, std::io::Error>(())
    }
    .await;
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "proxy: writing 502 failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pick_counts_at_once_and_a_switch_ends_the_old_sets_turn() {
        let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.89.0.2:80".parse().unwrap(),
            "10.89.0.6:80".parse().unwrap(),
        );
        proxy.set_backends(vec![a]);
        let shared = Arc::clone(&proxy.handle.shared);
        let old = shared.current_backends();
        // Counted from the pick, before any connect.
        let guard = shared.claim(&old, a).unwrap();
        assert_eq!(proxy.active_connections(a), 1);
        proxy.set_backends(vec![b]);
        // A connection still holding the old set may not pick from it any more...
        assert!(shared.claim(&old, a).is_none());
        assert_eq!(proxy.active_connections(a), 1);
        // ...and the one that picked before the switch keeps counting until it ends.
        drop(guard);
        assert_eq!(proxy.active_connections(a), 0);
        let new = shared.current_backends();
        let g = shared.claim(&new, b).unwrap();
        assert_eq!(proxy.active_connections(b), 1);
        drop(g);
        proxy.shutdown().await;
    }
}
