//! Small helpers: randomness, time, constant-time comparison.

use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};

/// `n` random bytes from the OS.
pub(crate) fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| Error::Random(e.to_string()))?;
    Ok(buf)
}

/// `n` random bytes as lowercase hex; falls back to time and a counter only if the OS has no
/// randomness, which is fine for temporary file names (never for secrets).
pub(crate) fn random_hex(n: usize) -> String {
    let bytes = random_bytes(n).unwrap_or_else(|_| {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos();
        t.to_le_bytes().iter().cycle().take(n).copied().collect()
    });
    hex(&bytes)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// Equality that takes the same time wherever the first difference is (for secrets).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
