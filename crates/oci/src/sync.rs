//! Locks that keep working after a panic.
//!
//! A `std` lock is poisoned when a thread panics while holding it. strata's locks guard data
//! that stays consistent at every point a panic could happen (caches filled by plain inserts,
//! SQLite connections whose transactions protect themselves, output writers, work queues), so
//! every user recovers the guard instead of failing too. These traits say that once, here,
//! instead of a `match` on the poison at each call site.
//!
//! It lives in `strata-oci` because every crate that locks already depends on it.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex`] access that ignores poisoning.
pub trait MutexExt<T: ?Sized> {
    /// Locks the mutex; a poisoned one yields its guard all the same.
    fn lock_ok(&self) -> MutexGuard<'_, T>;

    /// The value inside the mutex, poisoned or not.
    fn into_inner_ok(self) -> T
    where
        Self: Sized,
        T: Sized;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn lock_ok(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn into_inner_ok(self) -> T
    where
        T: Sized,
    {
        self.into_inner().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`RwLock`] access that ignores poisoning.
pub trait RwLockExt<T: ?Sized> {
    /// Locks for reading; a poisoned lock yields its guard all the same.
    fn read_ok(&self) -> RwLockReadGuard<'_, T>;

    /// Locks for writing; a poisoned lock yields its guard all the same.
    fn write_ok(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_ok(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_ok(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on another thread and checks that it panicked, which poisons any lock whose
    /// guard `f` held at that moment.
    fn panic_in_thread(f: impl FnOnce() + Send) {
        std::thread::scope(|s| assert!(s.spawn(f).join().is_err()));
    }

    #[test]
    fn a_poisoned_mutex_still_locks_and_keeps_its_value() {
        let m = Mutex::new(vec![1]);
        panic_in_thread(|| {
            let mut g = m.lock_ok();
            g.push(2);
            panic!("poisoning on purpose");
        });
        assert!(m.is_poisoned());
        m.lock_ok().push(3);
        assert_eq!(*m.lock_ok(), [1, 2, 3]);
        assert_eq!(m.into_inner_ok(), [1, 2, 3]);
    }

    #[test]
    fn a_poisoned_rwlock_still_reads_and_writes() {
        let l = RwLock::new(1);
        panic_in_thread(|| {
            *l.write_ok() = 2;
            let _g = l.write_ok();
            panic!("poisoning on purpose");
        });
        assert!(l.is_poisoned());
        *l.write_ok() += 1;
        assert_eq!(*l.read_ok(), 3);
    }
}
