//! Deploying an app to several hosts (docs/hosts.md): all at once (`parallel`), or in batches
//! of `parallelism` hosts, each batch gated on its hosts' deploys and health checks (`rolling`);
//! the first batch with a failure stops the rollout. How one host is deployed is the caller's.

use crate::app::Strategy;
use crate::{Error, Result};

/// Hosts handled at once at the most, whatever the strategy: each is an SSH connection and a
/// thread here.
pub const MAX_AT_ONCE: usize = 8;

/// `work` on every item, `at_once` at a time (at most [`MAX_AT_ONCE`]); each result, in order.
/// A thread that panics is an error for its item.
pub fn on_each<H: Sync, T: Send>(
    items: &[H],
    at_once: usize,
    work: impl Fn(&H) -> std::result::Result<T, String> + Sync,
) -> Vec<std::result::Result<T, String>> {
    std::thread::scope(|s| {
        let mut done = Vec::new();
        for chunk in items.chunks(at_once.clamp(1, MAX_AT_ONCE)) {
            let handles: Vec<_> = chunk.iter().map(|h| s.spawn(|| work(h))).collect();
            for j in handles {
                done.push(
                    j.join()
                        .unwrap_or_else(|_| Err("the thread for it panicked".to_string())),
                );
            }
        }
        done
    })
}

/// Deploys `app` to `hosts` (named by `name`) with `strategy`, `deploy` doing one host. The
/// error names the failed hosts and why, and for a rolling deploy which hosts run the new
/// release and which were not touched.
pub fn roll_out<H: Sync>(
    app: &str,
    hosts: &[H],
    name: impl Fn(&H) -> String,
    strategy: Strategy,
    deploy: impl Fn(&H) -> std::result::Result<(), String> + Sync,
) -> Result<()> {
    match strategy {
        Strategy::Parallel => {
            let failures: Vec<String> = hosts
                .iter()
                .zip(on_each(hosts, MAX_AT_ONCE, &deploy))
                .filter_map(|(h, r)| r.err().map(|e| format!("{}: {e}", name(h))))
                .collect();
            if failures.is_empty() {
                return Ok(());
            }
            Err(Error::Config(format!(
                "the deploy of {app} failed on {} of {} hosts:\n{}",
                failures.len(),
                hosts.len(),
                failures.join("\n")
            )))
        }
        Strategy::Rolling { parallelism } => {
            let batches: Vec<&[H]> = hosts.chunks(parallelism.max(1)).collect();
            for (i, batch) in batches.iter().enumerate() {
                let results = on_each(batch, parallelism, &deploy);
                if results.iter().all(|r| r.is_ok()) {
                    continue;
                }
                let mut failed = Vec::new();
                let mut why = Vec::new();
                let mut done: Vec<String> = batches[..i]
                    .iter()
                    .flat_map(|b| b.iter())
                    .map(&name)
                    .collect();
                for (h, r) in batch.iter().zip(&results) {
                    match r {
                        Ok(()) => done.push(name(h)),
                        Err(e) => {
                            failed.push(name(h));
                            why.push(format!("{}: {e}", name(h)));
                        }
                    }
                }
                let rest: Vec<String> = batches[i + 1..]
                    .iter()
                    .flat_map(|b| b.iter())
                    .map(&name)
                    .collect();
                return Err(Error::Config(format!(
                    "{}\nthe rolling deploy of {app} stopped at {} (batch {} of {}): {} keep(s) \
                     its previous release; {}{}",
                    why.join("\n"),
                    failed.join(", "),
                    i + 1,
                    batches.len(),
                    failed.join(", "),
                    if done.is_empty() {
                        "no host runs the new release".to_string()
                    } else {
                        format!("{} run(s) the new release", done.join(", "))
                    },
                    if rest.is_empty() {
                        String::new()
                    } else {
                        format!("; {} not touched", rest.join(", "))
                    }
                )));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Which hosts were deployed, in order of completion, and the error of a rollout where
    /// the hosts in `failing` fail.
    fn run(strategy: Strategy, failing: &[&str]) -> (Vec<String>, Option<String>) {
        let hosts = ["a", "b", "c", "d", "e"];
        let seen = Mutex::new(Vec::new());
        let r = roll_out(
            "web",
            &hosts,
            |h| h.to_string(),
            strategy,
            |h| {
                seen.lock().unwrap().push(h.to_string());
                if failing.contains(h) {
                    Err("unhealthy".into())
                } else {
                    Ok(())
                }
            },
        );
        (seen.into_inner().unwrap(), r.err().map(|e| e.to_string()))
    }

    #[test]
    fn rolling_stops_after_the_batch_with_a_failure_and_says_who_runs_what() {
        let (seen, err) = run(Strategy::Rolling { parallelism: 2 }, &["c"]);
        let mut first_two = seen[..2].to_vec();
        first_two.sort();
        assert_eq!(first_two, ["a", "b"]);
        assert_eq!(seen.len(), 4, "batch 3 must not start: {seen:?}");
        let err = err.unwrap();
        assert!(err.contains("c: unhealthy"), "{err}");
        assert!(err.contains("stopped at c (batch 2 of 3)"), "{err}");
        assert!(err.contains("a, b, d run(s) the new release"), "{err}");
        assert!(err.contains("; e not touched"), "{err}");

        let (seen, err) = run(Strategy::Rolling { parallelism: 1 }, &[]);
        assert_eq!(seen, ["a", "b", "c", "d", "e"]);
        assert!(err.is_none());
    }

    #[test]
    fn parallel_deploys_every_host_and_lists_each_failure() {
        let (seen, err) = run(Strategy::Parallel, &["b", "e"]);
        assert_eq!(seen.len(), 5);
        let err = err.unwrap();
        assert!(err.contains("failed on 2 of 5 hosts"), "{err}");
        assert!(
            err.contains("b: unhealthy") && err.contains("e: unhealthy"),
            "{err}"
        );
    }
}
