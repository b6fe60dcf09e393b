//! The `mem` controller's storage media.
//!
//! `ram` and `file` media are one memory mapping each (anonymous, or the backing file mapped
//! shared), so a transfer is one copy and a flush is `msync`. Data written to a shared file
//! mapping belongs to the page cache at once: it survives the node being killed, and survives
//! power loss once flushed. `null` media hold nothing and copy nothing.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::MediaKind;

pub struct Media {
    kind: MediaKind,
    /// The mapping (`None` for null media).
    base: Option<NonNull<u8>>,
    len: u64,
    path: Option<PathBuf>,
    _file: Option<File>,
}

// SAFETY: the mapping is owned by `Media` and unmapped only on drop; controller queues on
// several threads copy into and out of it through raw pointers, as a device's DMA engines do,
// and never form references to it.
unsafe impl Send for Media {}
// SAFETY: as above.
unsafe impl Sync for Media {}

impl Media {
    pub fn null(len: u64) -> Self {
        Self {
            kind: MediaKind::Null,
            base: None,
            len,
            path: None,
            _file: None,
        }
    }

    /// Anonymous memory, reserved lazily (pages are allocated when first written).
    pub fn ram(len: u64) -> std::io::Result<Self> {
        let base = map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )?;
        Ok(Self {
            kind: MediaKind::Ram,
            base: Some(base),
            len,
            path: None,
            _file: None,
        })
    }

    /// A file of at least `len` bytes, created sparse if missing, mapped shared.
    pub fn file(path: &Path, len: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() < len {
            file.set_len(len)?;
        }
        use std::os::fd::AsRawFd;
        let base = map(len, libc::MAP_SHARED, file.as_raw_fd())?;
        Ok(Self {
            kind: MediaKind::File,
            base: Some(base),
            len,
            path: Some(path.into()),
            _file: Some(file),
        })
    }

    pub fn kind(&self) -> MediaKind {
        self.kind
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Copies `len` media bytes at `offset` to `dst`.
    ///
    /// # Safety
    /// `offset + len <= self.len()`, and `dst` must be valid for `len` bytes of writes that no
    /// reference covers (DMA memory translated through the controller's IOMMU map).
    #[inline(always)]
    pub unsafe fn read(&self, offset: u64, dst: *mut u8, len: usize) {
        debug_assert!(offset + len as u64 <= self.len);
        if let Some(base) = self.base {
            // SAFETY: the caller's contract keeps both ranges in bounds.
            unsafe { std::ptr::copy_nonoverlapping(base.as_ptr().add(offset as usize), dst, len) };
        }
    }

    /// Copies `len` bytes from `src` into the media at `offset`.
    ///
    /// # Safety
    /// As for [`Media::read`], with `src` valid for `len` bytes of reads.
    #[inline(always)]
    pub unsafe fn write(&self, offset: u64, src: *const u8, len: usize) {
        debug_assert!(offset + len as u64 <= self.len);
        if let Some(base) = self.base {
            // SAFETY: the caller's contract keeps both ranges in bounds.
            unsafe { std::ptr::copy_nonoverlapping(src, base.as_ptr().add(offset as usize), len) };
        }
    }

    /// Writes zeroes over `len` bytes at `offset`; panics if the range leaves the media (the
    /// controller range-checks commands first).
    pub fn zero(&self, offset: u64, len: u64) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "zeroing past the media"
        );
        if let Some(base) = self.base {
            // SAFETY: range-checked above; the mapping is writable and owned by self.
            unsafe { std::ptr::write_bytes(base.as_ptr().add(offset as usize), 0, len as usize) };
        }
    }

    /// Makes everything written durable (a no-op for null and ram media).
    pub fn flush(&self) -> std::io::Result<()> {
        self.flush_range(0, self.len)
    }

    /// Makes what was written to the `len` bytes at `offset` durable (a FUA write): `msync`
    /// of the pages holding them, not of the whole mapping (which costs in proportion to its
    /// size however little was written). Panics if the range leaves the media.
    pub fn flush_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "flushing past the media"
        );
        if let (MediaKind::File, Some(base)) = (self.kind, self.base) {
            // msync takes a page-aligned start; the mapping itself starts on a page.
            let page = page_size();
            let start = offset / page * page;
            let end = (offset + len)
                .div_ceil(page)
                .saturating_mul(page)
                .min(self.len);
            // SAFETY: msync over a page-aligned part of our own mapping (range-checked above).
            let synced = unsafe {
                libc::msync(
                    base.as_ptr().add(start as usize).cast(),
                    (end - start) as usize,
                    libc::MS_SYNC,
                )
            };
            if synced != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Drop for Media {
    fn drop(&mut self) {
        if let Some(base) = self.base {
            // SAFETY: unmapping exactly the mapping created in the constructor; controller
            // queues hold an `Arc` to the device state that owns this media, so none is left.
            unsafe { libc::munmap(base.as_ptr().cast(), self.len as usize) };
        }
    }
}

fn map(len: u64, flags: i32, fd: i32) -> std::io::Result<NonNull<u8>> {
    if len == 0 || len > isize::MAX as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "media size out of range",
        ));
    }
    // SAFETY: a new mapping at a kernel-chosen address aliases nothing; `fd` is either -1
    // (anonymous) or an open file at least `len` bytes long.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(NonNull::new(ptr.cast()).expect("mmap returned a non-null address"))
}

/// The system's page size (msync's alignment).
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FUA write's range, however it sits on pages (a 512-byte block inside one, a range
    /// across two, the media's last bytes), is msync'ed without error, and the data is in the
    /// file.
    #[test]
    fn a_range_flush_takes_any_part_of_the_media() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("media");
        let len = 3 * 4096 + 1024;
        let media = Media::file(&path, len).unwrap();
        let data = [0x5au8; 512];
        for (offset, bytes) in [(512, 512), (4096 - 256, 512), (len - 512, 512), (0, len)] {
            // SAFETY: within the media; `data` holds at least `min(bytes, 512)` bytes.
            unsafe { media.write(offset, data.as_ptr(), bytes.min(512) as usize) };
            media.flush_range(offset, bytes).unwrap();
        }
        media.flush().unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[512..1024], &data[..]);
        assert_eq!(&file[(len - 512) as usize..], &data[..]);
    }
}
