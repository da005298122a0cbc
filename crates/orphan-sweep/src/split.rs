//! A tick's pure per-item work over a large inventory, on two threads: the work is split in two
//! contiguous halves whose results are joined in order, so the outcome (and every list a tick
//! reports) is the same as on one thread. Log lines written by the second thread go to the
//! caller's subscriber. Below [`PARALLEL_ABOVE`] items, or on a single core, it all runs on the
//! calling thread.

/// Below this many items the work runs on the calling thread (a thread costs more than it saves).
pub(crate) const PARALLEL_ABOVE: usize = 4_096;

/// Whether `len` items are worth two threads here.
pub(crate) fn worth_two(len: usize) -> bool {
    len > PARALLEL_ABOVE && std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

/// Runs `first` on this thread and `second` on another, the second under this thread's
/// `tracing` subscriber; a panic in either is a panic here.
pub(crate) fn both<A, B>(first: impl FnOnce() -> A, second: impl FnOnce() -> B + Send) -> (A, B)
where
    B: Send,
{
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| tracing::dispatcher::with_default(&dispatch, second));
        let a = first();
        match other.join() {
            Ok(b) => (a, b),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `f` over `items` in order, each item changed in place, in two halves at once when
/// [`worth_two`]; the answers in order.
pub(crate) fn map_mut<T: Send, U: Send>(items: &mut [T], f: impl Fn(&mut T) -> U + Sync) -> Vec<U> {
    let len = items.len();
    if !worth_two(len) {
        return items.iter_mut().map(&f).collect();
    }
    let (a, b) = items.split_at_mut(len / 2);
    // The first half's list has room for both, so joining them copies the second only.
    let (mut a, b) = both(
        || {
            let mut out = Vec::with_capacity(len);
            out.extend(a.iter_mut().map(&f));
            out
        },
        || b.iter_mut().map(&f).collect::<Vec<U>>(),
    );
    a.extend(b);
    a
}

/// `f` over `items` (taken by value) in order, in two halves at once when [`worth_two`].
pub(crate) fn map_owned<T: Send, U: Send>(mut items: Vec<T>, f: impl Fn(T) -> U + Sync) -> Vec<U> {
    let run = |items: Vec<T>, room: usize| {
        let mut out = Vec::with_capacity(room);
        out.extend(items.into_iter().map(&f));
        out
    };
    let len = items.len();
    if !worth_two(len) {
        return run(items, len);
    }
    let second = items.split_off(len / 2);
    let second_len = second.len();
    // The first half's list has room for both, so joining them copies the second only.
    let (mut a, b) = both(|| run(items, len), || run(second, second_len));
    a.extend(b);
    a
}

/// `f` over the pairs of `left` and `right` (same length, taken by value), keeping the `Some`
/// answers in order, in two halves at once when [`worth_two`]. `room` says which pairs may
/// answer `Some` (from the right one alone): the answers' list is made at that size, so it is
/// never copied as it grows nor larger than it needs to be.
pub(crate) fn filter_map_pairs<T: Send, V: Send + Sync, U: Send>(
    mut left: Vec<T>,
    mut right: Vec<V>,
    room: impl Fn(&V) -> bool + Sync,
    f: impl Fn(T, V) -> Option<U> + Sync,
) -> Vec<U> {
    let run = |left: Vec<T>, right: Vec<V>, room: usize| {
        let mut out = Vec::with_capacity(room);
        out.extend(left.into_iter().zip(right).filter_map(|(t, v)| f(t, v)));
        out
    };
    let total = right.iter().filter(|v| room(v)).count();
    if !worth_two(left.len()) {
        return run(left, right, total);
    }
    let half = left.len() / 2;
    let (left_b, right_b) = (left.split_off(half), right.split_off(half.min(right.len())));
    let second_room = right_b.iter().filter(|v| room(v)).count();
    // The first half's list has room for both, so joining them copies the second only.
    let (mut a, b) = both(
        || run(left, right, total),
        || run(left_b, right_b, second_room),
    );
    a.extend(b);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_halves_answer_in_order_as_one_thread_would() {
        let items: Vec<u32> = (0..10_000).collect();
        assert!(
            worth_two(items.len())
                || std::thread::available_parallelism().is_ok_and(|n| n.get() < 2)
        );
        let labels: Vec<String> = items.iter().map(|n| format!("n{n}")).collect();
        let kept = filter_map_pairs(
            labels.clone(),
            items.clone(),
            |n| n % 3 == 0,
            |label, n| (n % 3 == 0).then(|| format!("{label}:{n}")),
        );
        let expected: Vec<String> = (0..10_000)
            .filter(|n| n % 3 == 0)
            .map(|n| format!("n{n}:{n}"))
            .collect();
        assert_eq!(kept, expected);
        let owned = map_owned(labels.clone(), |label| label.len());
        assert_eq!(owned, labels.iter().map(String::len).collect::<Vec<_>>());
        let mut numbered = items.clone();
        let before = map_mut(&mut numbered, |n| {
            let was = *n;
            *n += 1;
            was
        });
        assert_eq!(before, items);
        assert_eq!(numbered, items.iter().map(|n| n + 1).collect::<Vec<_>>());
        let small = map_owned(vec![1, 2, 3], |n| n + 1);
        assert_eq!(small, [2, 3, 4]);
    }
}
