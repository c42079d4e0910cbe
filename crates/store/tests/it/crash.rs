//! A writer killed mid-write (SIGKILL) leaves no partial blob and no stuck lock.

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, SystemTime};

use strata_oci::Descriptor;
use strata_store::Store;

use crate::common::{CHILD_ROLE, files_under, spawn_self};

/// Yields `total` bytes in 64 KiB chunks, slowly, announcing on stdout once it is under way.
struct SlowReader {
    sent: u64,
    total: u64,
}

impl Read for SlowReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.sent >= self.total {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(1));
        let n = buf.len().min(64 * 1024);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = (self.sent as usize + i) as u8;
        }
        self.sent += n as u64;
        if self.sent >= 1024 * 1024 && self.sent < 1024 * 1024 + n as u64 {
            // Past the writer's buffer: bytes are in the temp file now.
            println!("child-writing");
            std::io::stdout().flush()?;
        }
        Ok(n)
    }
}

/// Child half of `sigkill_mid_write_leaves_no_partial_blob`; a no-op unless spawned by it.
#[test]
fn child_slow_put() {
    if std::env::var(CHILD_ROLE).as_deref() != Ok("slow_put") {
        return;
    }
    let store = Store::open(std::env::var("STORE_ROOT").unwrap()).unwrap();
    // Held while killed: the kernel must release it, or the gc below would hang.
    let _session = store.write_session().unwrap();
    let total = 1 << 30;
    store
        .put_blob_reader(SlowReader { sent: 0, total }, None)
        .unwrap();
    panic!("the parent should have killed this child before the put finished");
}

#[test]
fn sigkill_mid_write_leaves_no_partial_blob() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    Store::open(&root).unwrap();
    let mut child = spawn_self(
        "crash::child_slow_put",
        "slow_put",
        &[("STORE_ROOT", root.display().to_string())],
    );
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("child-writing") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL: no destructor, no cleanup runs in the child
    let status = child.wait().unwrap();
    assert!(!status.success());

    // Nothing under blobs/; the half-written temp file is all that is left.
    assert!(files_under(&root.join("blobs")).is_empty());
    let temps = files_under(&root.join("strata/tmp"));
    assert_eq!(temps.len(), 1, "{temps:?}");
    assert!(std::fs::metadata(&temps[0]).unwrap().len() >= 512 * 1024);

    // The store opens and works, and gc (which needs the session lock the child held) runs.
    // The temp file is named after its writer, which is dead: opening the store removes it at
    // once, not after an hour.
    let store = Store::open(&root).unwrap();
    assert!(files_under(&root.join("strata/tmp")).is_empty());
    let (d, n) = store.put_blob_bytes(b"after the crash", None).unwrap();
    store
        .set_ref(
            "after:1",
            Descriptor::new("application/octet-stream", d.clone(), n),
        )
        .unwrap();
    assert_eq!(store.read_blob(&d).unwrap(), b"after the crash");

    let (tx, rx) = std::sync::mpsc::channel();
    let root2 = root.clone();
    std::thread::spawn(move || {
        let store = Store::open(&root2).unwrap();
        tx.send(store.gc(false).unwrap()).unwrap();
    });
    let report = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("gc blocked: the killed child's lock was not released");
    assert!(report.removed.is_empty());
    assert_eq!(report.temps_removed, 0);
    assert!(store.has_blob(&d));
    // A live writer's temp entry stays, however old; an unnamed one goes by age.
    let live = root
        .join("strata/tmp")
        .join(format!("{}keep", strata_store::temp_prefix("blob")));
    let anonymous = root.join("strata/tmp/blob-anonymous");
    let old = filetime::FileTime::from_system_time(SystemTime::now() - Duration::from_secs(7200));
    for p in [&live, &anonymous] {
        std::fs::write(p, b"x").unwrap();
        filetime::set_file_mtime(p, old).unwrap();
    }
    assert_eq!(store.gc(false).unwrap().temps_removed, 1);
    assert!(live.exists() && !anonymous.exists());
}
