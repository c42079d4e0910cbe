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
