//! Work split across the machine's cores (walking, keying and the stat cache's parse).

/// The threads to split work over: the machine's cores, at most 8.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// The threads to split `items` over: [`cores`], or one below `min_items` (spawning threads
/// would cost more than it saves).
pub(crate) fn threads_for(items: usize, min_items: usize) -> usize {
    if items < min_items { 1 } else { cores() }
}

/// `f` of each piece, in order: a scoped thread per piece, or this thread for a single one.
/// A panic in `f` is raised again here.
pub(crate) fn map_pieces<P: Send, R: Send>(pieces: Vec<P>, f: impl Fn(P) -> R + Sync) -> Vec<R> {
    if pieces.len() <= 1 {
        return pieces.into_iter().map(f).collect();
    }
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = pieces.into_iter().map(|p| s.spawn(move || f(p))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_come_back_in_order_each_from_a_thread_of_its_own() {
        let me = std::thread::current().id();
        let out = map_pieces(vec![1, 2, 3, 4], |p| (p * 10, std::thread::current().id()));
        let values: Vec<i32> = out.iter().map(|(v, _)| *v).collect();
        assert_eq!(values, [10, 20, 30, 40]);
        let mut threads: Vec<_> = out.iter().map(|(_, t)| *t).collect();
        assert!(!threads.contains(&me));
        threads.sort_by_key(|t| format!("{t:?}"));
        threads.dedup();
        assert_eq!(threads.len(), 4);
        // One piece: no thread.
        assert_eq!(map_pieces(vec![1], |_| std::thread::current().id()), [me]);
        assert!(map_pieces(Vec::<i32>::new(), |p| p).is_empty());
    }

    #[test]
    #[should_panic(expected = "piece 3")]
    fn a_panic_in_a_piece_is_raised_again() {
        map_pieces(vec![1, 2, 3], |p| {
            if p == 3 {
                panic!("piece {p}");
            }
            p
        });
    }
}
