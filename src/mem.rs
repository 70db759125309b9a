//! Large zeroed buffers that ask the kernel for transparent huge pages (2 MiB).
//!
//! Decode streams its packed weights and its KV cache from memory once per token. With 4 KiB
//! pages that is a TLB miss (a two-level walk in a virtual machine) every 4 KiB, and the
//! hardware prefetchers stop at every 4 KiB boundary; a 7B's KV cache rows are 8 KiB apart,
//! so attention over them paid a page walk per key and head group. Most Linux systems give
//! huge pages only to memory that asks for them (`transparent_hugepage=madvise`), which a
//! `Vec` does not. Depends on nothing; `quant` (packed weights) and `cpu` (KV cache) use it.

/// `len` zeroed values of `T` in a private anonymous mapping on Linux (2 MiB-aligned and
/// advised `MADV_HUGEPAGE` when `huge` and at least 2 MiB, so that no page is touched before
/// the advice and the pages fault in as they are first written); a `Vec` elsewhere.
pub struct ZeroedBuf<T: bytemuck::Pod> {
    #[cfg(target_os = "linux")]
    map: Option<(std::ptr::NonNull<u8>, usize)>,
    #[cfg(target_os = "linux")]
    offset: usize,
    #[cfg(not(target_os = "linux"))]
    vec: Vec<T>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

// SAFETY: a `ZeroedBuf` owns its mapping exclusively, like a Vec of plain data.
unsafe impl<T: bytemuck::Pod + Send> Send for ZeroedBuf<T> {}
unsafe impl<T: bytemuck::Pod + Sync> Sync for ZeroedBuf<T> {}

impl<T: bytemuck::Pod> ZeroedBuf<T> {
    const HUGE: usize = 2 << 20;

    pub fn new(len: usize, huge: bool) -> ZeroedBuf<T> {
        assert!(std::mem::align_of::<T>() <= 4096, "page alignment covers the type's");
        #[cfg(target_os = "linux")]
        {
            let bytes = len.checked_mul(std::mem::size_of::<T>()).expect("a buffer size that fits in memory");
            if bytes == 0 {
                return ZeroedBuf { map: None, offset: 0, len, _t: std::marker::PhantomData };
            }
            let align = if huge && bytes >= Self::HUGE { Self::HUGE } else { 4096 };
            let size = bytes + align - 4096;
            // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
            if p == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(bytes, 64).expect("a valid layout"));
            }
            let offset = (p as usize).next_multiple_of(align) - p as usize;
            if align == Self::HUGE {
                // SAFETY: the range lies inside the mapping just made; a refused hint changes
                // nothing.
                unsafe { libc::madvise(p.cast::<u8>().add(offset).cast(), bytes.next_multiple_of(4096), libc::MADV_HUGEPAGE) };
            }
            let map = std::ptr::NonNull::new(p.cast::<u8>()).expect("mmap does not return null on success");
            ZeroedBuf { map: Some((map, size)), offset, len, _t: std::marker::PhantomData }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = huge;
            ZeroedBuf { vec: vec![<T as bytemuck::Zeroable>::zeroed(); len], len, _t: std::marker::PhantomData }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const T {
        #[cfg(target_os = "linux")]
        {
            // SAFETY: the offset lies inside the mapping.
            self.map.map_or(std::ptr::NonNull::<T>::dangling().as_ptr().cast_const(), |(p, _)| unsafe { p.as_ptr().add(self.offset).cast::<T>().cast_const() })
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.vec.as_ptr()
        }
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for ZeroedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` zero-initialised (hence valid, `T: Pod`) values live at `as_ptr`,
        // page-aligned, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for ZeroedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().cast_mut(), self.len) }
    }
}

#[cfg(target_os = "linux")]
impl<T: bytemuck::Pod> Drop for ZeroedBuf<T> {
    fn drop(&mut self) {
        if let Some((p, size)) = self.map {
            // SAFETY: the mapping made in `new`, unmapped once.
            unsafe { libc::munmap(p.as_ptr().cast(), size) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_writable_and_aligned() {
        for (len, huge) in [(0usize, true), (1, false), (3 << 20, true), (3 << 20, false), (12345, true)] {
            let mut b = ZeroedBuf::<u16>::new(len, huge);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % 4096, 0);
                b[len - 1] = 7;
                assert_eq!(b[len - 1], 7);
                b[0] = 3;
                assert_eq!(b[0], 3);
            }
            if huge && len * 2 >= 2 << 20 {
                assert_eq!(b.as_ptr() as usize % (2 << 20), 0);
            }
        }
    }
}
