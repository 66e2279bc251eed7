//! IOVA placement by this crate ([`Iova::Below`](crate::Iova::Below)): the free IOVA space of an IOAS,
//! kept as gaps indexed by address and by size, so finding, taking and returning a range costs
//! O(log n) in the number of gaps however many mappings exist.
//!
//! The kernel's automatic placement walks the IOAS's areas from the lowest address on every map,
//! which grows linearly with the number of mappings; a VMM or driver that creates tens of thousands of
//! mappings places them itself, with this.

use std::collections::{BTreeMap, BTreeSet};

use crate::ioas::IovaRange;

/// The free space: disjoint, non-adjacent gaps.
#[derive(Debug, Clone, Default)]
pub(crate) struct FreeSpace {
    /// start -> last of every gap.
    by_start: BTreeMap<u64, u64>,
    /// (last - start, start) of every gap: the size index.
    by_size: BTreeSet<(u64, u64)>,
}

/// How many size-index candidates [`FreeSpace::find`] examines before falling back to a walk by
/// address (only gaps past the DMA limit can make candidates fail, so this rarely matters).
const CANDIDATES: usize = 64;

impl FreeSpace {
    /// The free space of `usable` ranges (sorted or not, possibly overlapping).
    pub(crate) fn new(usable: impl IntoIterator<Item = IovaRange>) -> FreeSpace {
        let mut space = FreeSpace::default();
        for r in usable {
            if !r.is_empty() {
                space.release(r);
            }
        }
        space
    }

    fn insert_gap(&mut self, start: u64, last: u64) {
        self.by_start.insert(start, last);
        self.by_size.insert((last - start, start));
    }

    fn remove_gap(&mut self, start: u64) -> Option<u64> {
        let last = self.by_start.remove(&start)?;
        self.by_size.remove(&(last - start, start));
        Some(last)
    }

    /// Marks `range` as used: every gap it overlaps is trimmed or split.
    pub(crate) fn occupy(&mut self, range: IovaRange) {
        if range.is_empty() {
            return;
        }
        // Every gap that overlaps the range, from the rightmost down: the one starting last at or
        // before `range.last`, while it reaches `range.start`. (Usually one: the gap a placement was
        // cut from.) No allocation.
        while let Some((&s, &l)) = self.by_start.range(..=range.last).next_back() {
            if l < range.start {
                break;
            }
            self.remove_gap(s);
            if l > range.last {
                self.insert_gap(range.last + 1, l);
            }
            if s < range.start {
                self.insert_gap(s, range.start - 1);
                break; // gaps are disjoint: nothing further left overlaps
            }
        }
    }

    /// Marks `range` as free again, merging it with the gaps it touches.
    pub(crate) fn release(&mut self, range: IovaRange) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut last) = (range.start, range.last);
        // Absorb, from the rightmost down, every gap that overlaps or touches `[start, last]`. No
        // allocation.
        while let Some((&s, &l)) = self.by_start.range(..=last.saturating_add(1)).next_back() {
            if l.saturating_add(1) < start {
                break;
            }
            self.remove_gap(s);
            start = start.min(s);
            last = last.max(l);
        }
        self.insert_gap(start, last);
    }

    /// A free, `align`-aligned range of `len` bytes whose last IOVA is at most `limit`: the smallest
    /// gap that fits (lowest address among equals). `len` is non-zero and `align` a power of two.
    pub(crate) fn find(&self, len: u64, align: u64, limit: u64) -> Option<u64> {
        let fits = |start: u64, last: u64| -> Option<u64> {
            let aligned = start.checked_next_multiple_of(align)?;
            let end = aligned.checked_add(len - 1)?;
            (end <= last && end <= limit).then_some(aligned)
        };
        // Smallest first; a gap at least `len + align - 1` long always fits after alignment, a shorter
        // one only if its start happens to be aligned well enough.
        for &(_, start) in self.by_size.range((len - 1, 0)..).take(CANDIDATES) {
            let Some(&last) = self.by_start.get(&start) else { continue };
            if let Some(iova) = fits(start, last) {
                return Some(iova);
            }
        }
        // Past the candidates (gaps beyond the limit), or gaps that fit only thanks to their own
        // alignment: walk the gaps below the limit by address.
        self.by_start.range(..=limit).find_map(|(&s, &l)| fits(s, l))
    }

    /// The gaps, in address order (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn gaps(&self) -> Vec<IovaRange> {
        self.by_start.iter().map(|(&start, &last)| IovaRange { start, last }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange { start, last }
    }

    /// The free space as a set of free pages, the model.
    fn model_free(usable: &[IovaRange], used: &[IovaRange], pages: u64) -> Vec<bool> {
        (0..pages)
            .map(|p| {
                usable.iter().any(|u| u.start <= p && p <= u.last)
                    && !used.iter().any(|u| u.start <= p && p <= u.last)
            })
            .collect()
    }

    fn gaps_of(free: &[bool]) -> Vec<IovaRange> {
        let mut gaps = Vec::new();
        let mut p = 0;
        while p < free.len() {
            if free[p] {
                let s = p;
                while p < free.len() && free[p] {
                    p += 1;
                }
                gaps.push(r(s as u64, p as u64 - 1));
            } else {
                p += 1;
            }
        }
        gaps
    }

    #[test]
    fn occupy_splits_and_release_merges() {
        let mut f = FreeSpace::new([r(0, 99)]);
        f.occupy(r(10, 19));
        f.occupy(r(30, 39));
        assert_eq!(f.gaps(), vec![r(0, 9), r(20, 29), r(40, 99)]);
        f.release(r(10, 19));
        assert_eq!(f.gaps(), vec![r(0, 29), r(40, 99)]);
        f.release(r(30, 39));
        assert_eq!(f.gaps(), vec![r(0, 99)]);
        // The top of the space does not overflow.
        let mut f = FreeSpace::new([r(u64::MAX - 9, u64::MAX)]);
        f.occupy(r(u64::MAX - 4, u64::MAX));
        f.release(r(u64::MAX - 4, u64::MAX));
        assert_eq!(f.gaps(), vec![r(u64::MAX - 9, u64::MAX)]);
    }

    #[test]
    fn find_honours_alignment_and_limit() {
        let f = FreeSpace::new([r(0x1000, 0x1fff), r(0x10_0000, 0x4f_ffff)]);
        assert_eq!(f.find(0x1000, 0x1000, u64::MAX), Some(0x1000), "best fit: the small gap");
        assert_eq!(f.find(0x2000, 0x1000, u64::MAX), Some(0x10_0000));
        assert_eq!(f.find(0x1000, 0x20_0000, u64::MAX), Some(0x20_0000), "aligned inside the big gap");
        assert_eq!(f.find(0x2000, 0x1000, 0x10_0fff), None, "the only fit ends past the limit");
        assert_eq!(f.find(0x40_0000, 0x1000, u64::MAX), Some(0x10_0000));
        assert_eq!(f.find(0x40_0001, 0x1000, u64::MAX), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 8 } else { 512 }))]

        /// Occupy and release in any order keep the gaps equal to the model's free pages, and `find`
        /// answers a free, aligned range under the limit whenever the model has one.
        #[test]
        fn free_space_matches_a_page_model(
            usable in proptest::collection::vec((0u64..200, 0u64..40), 1..4),
            ops in proptest::collection::vec((any::<bool>(), 0u64..200, 1u64..20), 0..40),
            query in (1u64..16, 0u32..4, 0u64..220),
        ) {
            const PAGES: u64 = 240;
            let usable: Vec<IovaRange> = usable.iter().map(|&(s, n)| r(s, s + n)).collect();
            let mut space = FreeSpace::new(usable.iter().copied());
            let mut used: Vec<IovaRange> = Vec::new();
            for (take, s, n) in ops {
                let range = r(s, s + n - 1);
                if take {
                    space.occupy(range);
                    used.push(range);
                } else if let Some(i) = used.iter().position(|u| *u == range) {
                    // Release only what was taken and is inside a usable range.
                    used.remove(i);
                    let inside: Vec<IovaRange> = usable
                        .iter()
                        .filter_map(|u| {
                            let (a, b) = (u.start.max(range.start), u.last.min(range.last));
                            (a <= b).then(|| r(a, b))
                        })
                        .collect();
                    for part in inside {
                        // Pages still used by another taken range stay used.
                        for p in part.start..=part.last {
                            if !used.iter().any(|u| u.start <= p && p <= u.last) {
                                space.release(r(p, p));
                            }
                        }
                    }
                }
            }
            let free = model_free(&usable, &used, PAGES);
            prop_assert_eq!(space.gaps(), gaps_of(&free));
            let (len, align_log2, limit) = query;
            let align = 1u64 << align_log2;
            let model = (0..PAGES).filter(|s| s % align == 0).find(|&s| {
                s + len - 1 <= limit && (s..s + len).all(|p| p < PAGES && free[p as usize])
            });
            match space.find(len, align, limit) {
                Some(s) => {
                    prop_assert!(s % align == 0 && s + len - 1 <= limit);
                    prop_assert!((s..s + len).all(|p| free[p as usize]), "found {} is not free", s);
                }
                None => prop_assert!(model.is_none(), "model finds {:?}", model),
            }
        }
    }
}
