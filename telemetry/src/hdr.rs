//! The histogram bucket layout: HdrHistogram's log-linear layout, reimplemented for the
//! writer side so that recording is an index computation and an increment in shared memory.
//!
//! A value lands in the same bucket as it would in an `hdrhistogram::Histogram` built with the
//! same lowest discernible value (1), highest trackable value and significant figures, so a
//! reader rebuilds the exact histogram by recording each bucket's lowest equivalent value with
//! the bucket's count. Values above the highest trackable value are clamped to it (a reader
//! sees them in the last bucket and in `max`). Zero (a stage two stamps share) is counter 0.

/// Parameters of a layout, stored in the shared region so readers rebuild it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    highest: u64,
    significant_figures: u8,
    /// log2 of half the sub-bucket count.
    sub_bucket_half_count_magnitude: u32,
    sub_bucket_half_count: u64,
    sub_bucket_mask: u64,
    bucket_count: u32,
    counts_len: usize,
    /// The counter of `highest`, where larger values are counted.
    highest_index: usize,
}

impl Layout {
    /// A layout for values 1..=`highest` with `significant_figures` (1..=5) decimal digits of
    /// precision. `None` for parameters HdrHistogram would refuse.
    pub const fn new(highest: u64, significant_figures: u8) -> Option<Self> {
        if significant_figures < 1 || significant_figures > 5 || highest < 2 {
            return None;
        }
        let largest_single_unit = 2 * 10u64.pow(significant_figures as u32);
        // Smallest power of two >= largest_single_unit.
        let sub_bucket_count_magnitude = 64 - (largest_single_unit - 1).leading_zeros();
        let sub_bucket_half_count_magnitude = sub_bucket_count_magnitude - 1;
        let sub_bucket_count = 1u64 << sub_bucket_count_magnitude;
        let sub_bucket_half_count = sub_bucket_count / 2;
        let sub_bucket_mask = sub_bucket_count - 1;
        // Buckets until the smallest untrackable value exceeds `highest`.
        let mut smallest_untrackable = sub_bucket_count;
        let mut bucket_count = 1u32;
        while smallest_untrackable <= highest {
            if smallest_untrackable > u64::MAX / 2 {
                bucket_count += 1;
                break;
            }
            smallest_untrackable <<= 1;
            bucket_count += 1;
        }
        let counts_len = (bucket_count as usize + 1) * sub_bucket_half_count as usize;
        let mut layout = Self {
            highest,
            significant_figures,
            sub_bucket_half_count_magnitude,
            sub_bucket_half_count,
            sub_bucket_mask,
            bucket_count,
            counts_len,
            highest_index: 0,
        };
        layout.highest_index = layout.unclamped_index_of(highest);
        Some(layout)
    }

    pub const fn highest(&self) -> u64 {
        self.highest
    }

    pub const fn significant_figures(&self) -> u8 {
        self.significant_figures
    }

    /// Number of counters a histogram of this layout has.
    pub const fn counts_len(&self) -> usize {
        self.counts_len
    }

    /// The counter a value is recorded in (values above `highest` in `highest`'s).
    #[inline(always)]
    pub fn index_of(&self, value: u64) -> usize {
        // The index grows with the value, so clamping it is clamping the value, and it keeps
        // the clamp off the front of the dependency chain.
        self.unclamped_index_of(value).min(self.highest_index)
    }

    /// HdrHistogram's index, `((bucket + 1) << magnitude) + sub_bucket - half_count`, which is
    /// `(bucket << magnitude) + sub_bucket` since half_count is `1 << magnitude`.
    #[inline(always)]
    const fn unclamped_index_of(&self, value: u64) -> usize {
        // Bucket: which power-of-two range above the first sub-bucket run the value is in
        // (`| mask` makes the logarithm at least the magnitude, and never of zero).
        let bucket = (value | self.sub_bucket_mask).ilog2() - self.sub_bucket_half_count_magnitude;
        let sub_bucket = value >> bucket;
        ((bucket as u64) << self.sub_bucket_half_count_magnitude) as usize + sub_bucket as usize
    }

    /// The lowest value that lands in counter `index`.
    #[inline]
    pub fn value_at(&self, index: usize) -> u64 {
        let index = index as u64;
        let mut bucket = (index >> self.sub_bucket_half_count_magnitude) as i64 - 1;
        let mut sub_bucket =
            (index & (self.sub_bucket_half_count - 1)) + self.sub_bucket_half_count;
        if bucket < 0 {
            sub_bucket -= self.sub_bucket_half_count;
            bucket = 0;
        }
        sub_bucket << bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_as_large_as_hdrhistogram_makes_them() {
        for (highest, figures) in [
            (1u64 << 36, 2u8),
            (3_600_000_000_000, 3),
            (1000, 1),
            (u64::MAX / 2, 2),
        ] {
            let layout = Layout::new(highest, figures).unwrap();
            let reference =
                hdrhistogram::Histogram::<u64>::new_with_bounds(1, highest, figures).unwrap();
            assert_eq!(
                layout.counts_len(),
                reference.distinct_values(),
                "highest {highest}, {figures} figures"
            );
        }
        assert!(Layout::new(1000, 0).is_none());
        assert!(Layout::new(1, 2).is_none());
    }

    proptest::proptest! {
        /// Every value lands in the bucket hdrhistogram puts it in, and every bucket's lowest
        /// value lands in that bucket: a reader rebuilds the writer's histogram exactly.
        #[test]
        fn buckets_match_hdrhistogram(value in 0u64..(1 << 36), shift in 0u32..37) {
            let layout = Layout::new(1 << 36, 2).unwrap();
            let reference = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1 << 36, 2).unwrap();
            let value = value >> shift;
            let index = layout.index_of(value);
            proptest::prop_assert_eq!(layout.value_at(index), reference.lowest_equivalent(value));
            proptest::prop_assert_eq!(layout.index_of(layout.value_at(index)), index);
        }
    }

    #[test]
    fn every_counter_round_trips() {
        let layout = Layout::new(1 << 36, 2).unwrap();
        let reference = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1 << 36, 2).unwrap();
        for index in 0..layout.counts_len() {
            let value = layout.value_at(index);
            if value > layout.highest() {
                break;
            }
            assert_eq!(layout.index_of(value), index);
            assert_eq!(reference.lowest_equivalent(value), value, "counter {index}");
        }
        assert_eq!(
            layout.index_of(u64::MAX),
            layout.index_of(1 << 36),
            "values above the range clamp"
        );
        assert_eq!(layout.index_of(0), 0);
    }
}
