//! Weight buffers on huge pages where the OS offers them.
//!
//! Every decoded token streams all of a model's block weights through the matmuls, and
//! with 4 KiB pages each 4 KiB of that stream is a TLB miss. On Linux with transparent
//! huge pages in `madvise` mode (the common default) memory gets 2 MiB pages only where it
//! is asked for before its first write, and only for whole 2 MiB-aligned pages. Measured
//! on this project's 2-core VM, where a miss walks two levels of page tables, the 1.1B
//! model's decode ran ~20% faster on 2 MiB pages (`genarm bench`, ~26 → ~31 tokens/s).

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Huge-page size on x86-64 and most Arm Linux kernels.
const HUGE_PAGE: usize = 2 << 20;

/// Weight bytes; on Linux, when they span a huge page, aligned to one and
/// advised to the kernel as huge-page memory (a hint: nothing changes where it declines).
pub struct WeightBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The allocation's (`len` rounded up to one byte).
    layout: Layout,
}

// SAFETY: the buffer owns its bytes like a `Vec<u8>`; `&WeightBuf` only reads them.
unsafe impl Send for WeightBuf {}
// SAFETY: as above.
unsafe impl Sync for WeightBuf {}

impl WeightBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let buf = Self::uninit(len);
        // SAFETY: the allocation holds `layout.size()` bytes.
        unsafe { buf.ptr.as_ptr().write_bytes(0, buf.layout.size()) };
        buf
    }

    /// A copy of `bytes` (written once: no zeroing first).
    pub fn copy_of(bytes: &[u8]) -> Self {
        let buf = Self::uninit(bytes.len());
        // SAFETY: the allocation holds at least `bytes.len()` bytes and is not `bytes`; a
        // zero-length buffer's one allocated byte is never read.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.ptr.as_ptr(), bytes.len()) };
        buf
    }

    /// The allocation, advised but not yet written (the first write picks the page size,
    /// so the advice comes before it); every constructor writes all `len` bytes.
    fn uninit(len: usize) -> Self {
        // Huge-page alignment only where there is advice to give: elsewhere (WebAssembly's
        // linear memory) it would only waste the padding.
        let huge = cfg!(target_os = "linux") && len >= HUGE_PAGE;
        let align = if huge { HUGE_PAGE } else { 64 };
        let layout = Layout::from_size_align(len.max(1), align).expect("buffer size");
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            handle_alloc_error(layout)
        };
        #[cfg(target_os = "linux")]
        if huge {
            // Whole huge pages only: a partial last one would be backed past `len`.
            let whole = len / HUGE_PAGE * HUGE_PAGE;
            // SAFETY: the range is inside this allocation; MADV_HUGEPAGE only changes how
            // the kernel backs it, never its contents.
            unsafe { libc::madvise(ptr.as_ptr().cast(), whole, libc::MADV_HUGEPAGE) };
        }
        Self { ptr, len, layout }
    }

    /// The buffer filled by `fill`, which gets it zeroed.
    pub fn filled(len: usize, fill: impl FnOnce(&mut [u8])) -> Self {
        let mut buf = Self::zeroed(len);
        fill(&mut buf);
        buf
    }
}

impl Deref for WeightBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` holds at least `len` bytes, all written by the constructor.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for WeightBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for WeightBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl Clone for WeightBuf {
    fn clone(&self) -> Self {
        Self::copy_of(self)
    }
}

impl std::fmt::Debug for WeightBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBuf({} bytes)", self.len())
    }
}
