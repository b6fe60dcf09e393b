//! DMA buffers by power-of-two size class, reused across one reactor's requests: a
//! connection's request takes one, its reply gives it back, and the pool is touched only when
//! a class runs dry (or the cache is full).

use fathom_dma::{DmaBuf, DmaPool};

/// Smallest buffer size class (one page).
const MIN_BUFFER_SHIFT: u32 = 12;

/// DMA buffers by power-of-two size class, reused across requests of one reactor.
pub struct BufferCache {
    pool: DmaPool,
    classes: Vec<Vec<DmaBuf>>,
    cached_bytes: usize,
    keep_bytes: usize,
    /// Whether the last allocation failed (logged once per episode).
    exhausted: bool,
    what: &'static str,
}

impl BufferCache {
    /// A cache for buffers of up to `max_bytes` (a power of two at least one page), keeping at
    /// most `keep_bytes` for reuse; `what` names the user in the log.
    pub fn new(pool: DmaPool, max_bytes: u32, keep_bytes: usize, what: &'static str) -> Self {
        Self {
            pool,
            classes: (0..=(max_bytes.max(1 << MIN_BUFFER_SHIFT).trailing_zeros()
                - MIN_BUFFER_SHIFT))
                .map(|_| Vec::new())
                .collect(),
            cached_bytes: 0,
            keep_bytes,
            exhausted: false,
            what,
        }
    }

    fn class_of(bytes: usize) -> usize {
        let shift = bytes.max(1).next_power_of_two().trailing_zeros();
        shift.saturating_sub(MIN_BUFFER_SHIFT) as usize
    }

    /// A buffer whose view is `bytes` long, or `None` while DMA memory is exhausted.
    pub fn get(&mut self, bytes: usize) -> Option<DmaBuf> {
        let class = Self::class_of(bytes);
        // A size beyond the largest class is allocated each time and never kept.
        let mut buf = match self.classes.get_mut(class).and_then(Vec::pop) {
            Some(buf) => {
                self.cached_bytes -= buf.capacity();
                buf
            }
            None => match self.pool.alloc(1 << (class as u32 + MIN_BUFFER_SHIFT)) {
                Ok(buf) => {
                    self.exhausted = false;
                    buf
                }
                Err(error) => {
                    if !self.exhausted {
                        tracing::warn!(
                            "{}: no DMA memory for a {bytes}-byte request ({error}); \
                             requests wait for buffers to return (raise dma.size)",
                            self.what
                        );
                        self.exhausted = true;
                    }
                    // Give back what this reactor keeps, so that the next try can succeed.
                    self.release_all();
                    return None;
                }
            },
        };
        buf.set_view(0, bytes);
        Some(buf)
    }

    /// Keeps a buffer for reuse, or returns it to the pool when the cache is full.
    pub fn put(&mut self, buf: DmaBuf) {
        let capacity = buf.capacity();
        let class = Self::class_of(capacity);
        if self.cached_bytes + capacity > self.keep_bytes
            || !capacity.is_power_of_two()
            || class >= self.classes.len()
        {
            return;
        }
        self.cached_bytes += capacity;
        self.classes[class].push(buf);
    }

    /// Returns every kept buffer to the pool.
    pub fn release_all(&mut self) {
        for class in &mut self.classes {
            class.clear();
        }
        self.cached_bytes = 0;
    }
}
