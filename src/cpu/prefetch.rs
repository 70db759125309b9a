//! Warming caches ahead of a step: byte ranges that a later step streams, prefetched into the
//! cores' L2 (and so the shared L3 behind it) by team members that would otherwise sit idle,
//! e.g. while the hybrid's main thread waits for the GPU's half of a layer. Decode is bound by
//! memory bandwidth, and the wait leaves the memory bus idle; what is fetched then is read from
//! cache afterwards.
//!
//! Only prefetch instructions touch the ranges: a hint never faults and never changes what a
//! later computation reads, so the ranges are plain addresses (`usize`) that may outlive
//! nothing, and a warmed step computes bit for bit what a cold one does.

use std::sync::atomic::{AtomicBool, Ordering};

/// Memory ranges to warm, as (address, bytes).
#[derive(Clone, Debug, Default)]
pub struct Ranges {
    ranges: Vec<(usize, usize)>,
    total: usize,
}

/// Lines prefetched between two looks at the stop flag (4 KiB).
const LINES_PER_CHECK: usize = 64;
const LINE: usize = 64;

impl Ranges {
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.total = 0;
    }

    /// Adds the bytes of `data` (nothing for an empty slice).
    pub fn push<T>(&mut self, data: &[T]) {
        let bytes = std::mem::size_of_val(data);
        if bytes > 0 {
            self.ranges.push((data.as_ptr() as usize, bytes));
            self.total += bytes;
        }
    }

    /// Bytes in all ranges.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Part `part` of `parts` equal shares of the ranges' bytes (taken in order, as if they
    /// were one run), in lines: returns the number of lines prefetched, fewer than the share
    /// when `stop` was set on the way.
    pub fn prefetch_part(&self, part: usize, parts: usize, stop: &AtomicBool) -> usize {
        let parts = parts.max(1);
        let (lo, hi) = (self.total * part / parts, self.total * (part + 1) / parts);
        let mut done = 0;
        let mut start = 0;
        for &(addr, len) in &self.ranges {
            let (a, b) = (lo.max(start), hi.min(start + len));
            if a < b {
                let mut p = addr + (a - start);
                let end = addr + (b - start);
                while p < end {
                    for _ in 0..LINES_PER_CHECK {
                        if p >= end {
                            break;
                        }
                        prefetch_line(p);
                        p += LINE;
                        done += 1;
                    }
                    if stop.load(Ordering::Relaxed) {
                        return done;
                    }
                }
            }
            start += len;
            if start >= hi {
                break;
            }
        }
        done
    }
}

/// One line towards L2: `prefetcht1` on x86-64, nothing elsewhere.
#[inline(always)]
fn prefetch_line(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(addr as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_line_once_across_ranges() {
        let a = vec![0u8; 64 * 100];
        let b = vec![0f32; 16 * 37];
        let mut r = Ranges::default();
        r.push(&a);
        r.push::<u8>(&[]);
        r.push(&b);
        assert_eq!(r.total(), 64 * 100 + 64 * 37);
        let go = AtomicBool::new(false);
        for parts in [1, 3, 7, 13] {
            let lines: usize = (0..parts).map(|p| r.prefetch_part(p, parts, &go)).sum();
            // A share that starts inside a line counts it too, so at most one extra per cut.
            assert!((137..=137 + parts).contains(&lines), "{parts}: {lines}");
        }
        let stop = AtomicBool::new(true);
        assert_eq!(r.prefetch_part(0, 1, &stop), LINES_PER_CHECK, "stops after the first look");
        r.clear();
        assert_eq!((r.total(), r.prefetch_part(0, 2, &go)), (0, 0));
    }
}
