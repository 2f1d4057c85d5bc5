//! Weight buffers: each in an anonymous mapping of its own, on huge pages where the OS
//! offers them.
//!
//! Every decoded token streams all of a model's block weights through the matmuls, and
//! with 4 KiB pages each 4 KiB of that stream is a TLB miss. On Linux with transparent
//! huge pages in `madvise` mode (the common default) memory gets 2 MiB pages only where it
//! is asked for before its first write, and only for whole 2 MiB-aligned pages. Measured
//! on this project's 2-core VM, where a miss walks two levels of page tables, the 1.1B
//! model's decode ran ~20% faster on 2 MiB pages (`genarm bench`, ~26 → ~31 tokens/s).
//!
//! A mapping of its own also keeps the weights out of the C allocator's heap. Loading
//! frees a copy of each tensor right after laying it out; in the heap those copies left
//! holes between the weights that stayed resident (a 1.1B Q8_0 model: 1353 MiB resident
//! for 1188 MiB of weights; 1224 MiB now), and unmapped pages go back to the system at once.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Huge-page size on x86-64 and most Arm Linux kernels.
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// Buffers from this size on get a mapping of their own (Linux); smaller ones, which
/// would waste most of a page, come from the allocator.
#[cfg(target_os = "linux")]
const MAPPED_MIN: usize = 64 << 10;

/// Weight bytes; on Linux, from 64 KiB on, an anonymous mapping of their own, aligned to
/// a huge page and advised to the kernel as huge-page memory when they span one (a hint:
/// nothing changes where it declines).
pub struct WeightBuf {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

/// Where a buffer's memory comes from, to give it back the same way.
#[derive(Clone, Copy, Debug)]
enum Backing {
    /// The global allocator, with this layout (`len` rounded up to one byte).
    Heap(Layout),
    /// A mapping of this many bytes at `ptr` (whole pages; zero when made).
    #[cfg(target_os = "linux")]
    Mapped(usize),
}

// SAFETY: the buffer owns its bytes like a `Vec<u8>`; `&WeightBuf` only reads them.
unsafe impl Send for WeightBuf {}
// SAFETY: as above.
unsafe impl Sync for WeightBuf {}

impl WeightBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let buf = Self::uninit(len);
        match buf.backing {
            // SAFETY: the allocation holds `layout.size()` bytes.
            Backing::Heap(layout) => unsafe { buf.ptr.as_ptr().write_bytes(0, layout.size()) },
            // Zero already; writing it would make every page resident now.
            #[cfg(target_os = "linux")]
            Backing::Mapped(_) => {}
        }
        buf
    }

    /// A copy of `bytes` (written once: no zeroing first).
    pub fn copy_of(bytes: &[u8]) -> Self {
        let buf = Self::uninit(bytes.len());
        // SAFETY: the buffer holds at least `bytes.len()` bytes and is not `bytes`; a
        // zero-length buffer's one allocated byte is never read.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.ptr.as_ptr(), bytes.len()) };
        buf
    }

    /// The buffer, advised but not yet written (the first write picks the page size, so
    /// the advice comes before it); every constructor writes all `len` bytes (or, for a
    /// mapping, leaves them zero).
    fn uninit(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len >= MAPPED_MIN {
            if let Some(buf) = Self::mapped(len) {
                return buf;
            }
        }
        let layout = Layout::from_size_align(len.max(1), 64).expect("buffer size");
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            handle_alloc_error(layout)
        };
        Self {
            ptr,
            len,
            backing: Backing::Heap(layout),
        }
    }

    /// `len` bytes in a mapping of their own, huge-page aligned and advised when they
    /// span a huge page; `None` where the system refuses the mapping (the allocator
    /// then tries, and reports a failure as any allocation does).
    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Option<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| p.is_power_of_two())?;
        let huge = len >= HUGE_PAGE;
        let size = len.checked_next_multiple_of(page)?;
        // Room to start on a huge-page boundary; the slack is unmapped again below.
        let slack = if huge { HUGE_PAGE } else { 0 };
        let span = size.checked_add(slack)?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base as usize;
        let start = if huge {
            base.next_multiple_of(HUGE_PAGE)
        } else {
            base
        };
        let (head, tail) = (start - base, slack - (start - base));
        // SAFETY: both ranges are page-aligned parts of the mapping just made, outside
        // `start..start + size`. A failure only leaves them mapped (and untouched).
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + size) as *mut libc::c_void, tail);
            }
        }
        if huge {
            // Whole huge pages only: a partial last one would be backed past `len`.
            // SAFETY: the range is inside the mapping; MADV_HUGEPAGE only changes how
            // the kernel backs it, never its contents.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    len / HUGE_PAGE * HUGE_PAGE,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
        Some(Self {
            ptr: NonNull::new(start as *mut u8)?,
            len,
            backing: Backing::Mapped(size),
        })
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
        match self.backing {
            // SAFETY: allocated in `uninit` with this layout.
            Backing::Heap(layout) => unsafe { dealloc(self.ptr.as_ptr(), layout) },
            // SAFETY: mapped in `mapped` with this size; nothing borrows it any more.
            #[cfg(target_os = "linux")]
            Backing::Mapped(size) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), size);
            },
        }
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
