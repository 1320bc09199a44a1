//! Large buffers in memory mapped for them alone, which the kernel is asked to back with
//! transparent huge pages.
//!
//! Fresh memory is faulted in a page at a time: on the VM the bench runs on, about 1.85 us for
//! each 4 KiB page, so that reading a 17.7 MB base into a new buffer took 12 to 13 ms, against
//! 3.7 ms into memory already touched. A 2 MiB page is one fault: 16 MiB are touched in about
//! 0.4 ms instead of 6. Buffers of [`HUGE_FROM`] bytes or more (whole files, suffix arrays,
//! decoded slices) are therefore mapped apart, their length rounded up to whole huge pages so
//! that the kernel aligns them on one; smaller ones stay on the heap. Where the kernel has no
//! transparent huge pages, or refuses the advice, the mapping is faulted in as before.

use std::io::{self, Read};
use std::ops::{Deref, DerefMut};

use bytemuck::Pod;

/// Buffers of this many bytes or more are mapped apart, in huge pages.
pub const HUGE_FROM: usize = 2 << 20;

/// The size of a transparent huge page on x86-64 and on arm64 with 4 KiB pages.
const HUGE_PAGE: usize = 2 << 20;

/// `len` elements of `T`, zeroed: in a mapping of their own, advised into huge pages, when they
/// take [`HUGE_FROM`] bytes or more, else in a `Vec`.
#[derive(Debug)]
pub struct Pages<T: Pod> {
    inner: Inner<T>,
}

#[derive(Debug)]
enum Inner<T> {
    Heap(Vec<T>),
    /// `len` elements at the start of `map`.
    Mapped {
        map: memmap2::MmapMut,
        len: usize,
    },
}

impl<T: Pod> Pages<T> {
    /// `len` zeroed elements.
    pub fn zeroed(len: usize) -> io::Result<Pages<T>> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::OutOfMemory, "a buffer larger than memory")
        })?;
        if bytes < HUGE_FROM {
            return Ok(Pages {
                inner: Inner::Heap(vec![T::zeroed(); len]),
            });
        }
        let mapped = bytes.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let map = memmap2::MmapMut::map_anon(mapped)?;
        // Advice, not a demand: the mapping works the same way without it.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(Pages {
            inner: Inner::Mapped { map, len },
        })
    }

    /// Keep the first `len` elements (no more than there are).
    pub fn truncate(&mut self, len: usize) {
        match &mut self.inner {
            Inner::Heap(vec) => vec.truncate(len),
            Inner::Mapped { len: kept, .. } => *kept = len.min(*kept),
        }
    }

    /// Whether the elements are in a mapping of their own.
    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }
}

impl<T: Pod> From<Vec<T>> for Pages<T> {
    fn from(vec: Vec<T>) -> Self {
        Pages {
            inner: Inner::Heap(vec),
        }
    }
}

impl<T: Pod> Default for Pages<T> {
    fn default() -> Self {
        Vec::new().into()
    }
}

impl<T: Pod> Deref for Pages<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Heap(vec) => vec,
            // A mapping starts on a page, aligned for any `T` of plain data.
            Inner::Mapped { map, len } => bytemuck::cast_slice(&map[..*len * size_of::<T>()]),
        }
    }
}

impl<T: Pod> DerefMut for Pages<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.inner {
            Inner::Heap(vec) => vec,
            Inner::Mapped { map, len } => {
                bytemuck::cast_slice_mut(&mut map[..*len * size_of::<T>()])
            }
        }
    }
}

/// The bytes of `file`, read whole up to `limit` bytes and one more (so that the caller can
/// tell a file longer than `limit`): `size` is what its metadata says it holds, read into
/// [`Pages`]; whatever follows (a file that grew meanwhile) is read after them.
pub fn read_whole(file: impl Read, size: u64, limit: u64) -> io::Result<Pages<u8>> {
    let mut file = file.take(limit.saturating_add(1));
    let expected = usize::try_from(size.min(limit)).unwrap_or(usize::MAX);
    if expected < HUGE_FROM {
        let mut vec = Vec::with_capacity(expected);
        file.read_to_end(&mut vec)?;
        return Ok(vec.into());
    }
    let mut pages = Pages::zeroed(expected)?;
    let mut filled = 0;
    while filled < expected {
        match file.read(&mut pages[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    pages.truncate(filled);
    if filled < expected {
        return Ok(pages);
    }
    let mut rest = Vec::new();
    file.read_to_end(&mut rest)?;
    if rest.is_empty() {
        return Ok(pages);
    }
    let mut vec = pages.to_vec();
    vec.extend_from_slice(&rest);
    Ok(vec.into())
}

/// The bytes of the file at `path`, read whole (see [`read_whole`]).
pub fn read_file(path: &std::path::Path) -> io::Result<Pages<u8>> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    read_whole(file, size, u64::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small buffers stay on the heap, large ones are mapped; both hold zeros, as many as
    /// asked, and keep what is written to them.
    #[test]
    fn buffers_are_zeroed_and_writable_whatever_their_size() {
        for len in [0, 1, 1000, HUGE_FROM / 4 - 1, HUGE_FROM / 4, HUGE_FROM + 3] {
            let mut pages = Pages::<i32>::zeroed(len).expect("memory");
            assert_eq!(pages.len(), len);
            assert_eq!(pages.is_mapped(), len * 4 >= HUGE_FROM, "{len}");
            assert!(pages.iter().all(|&x| x == 0));
            if let Some(last) = pages.last_mut() {
                *last = -7;
            }
            pages.truncate(len / 2);
            assert_eq!(pages.len(), len / 2);
            if len > 1 {
                pages.truncate(len);
                assert_eq!(pages.len(), len / 2, "truncate never grows");
            }
        }
        assert!(Pages::<u64>::zeroed(usize::MAX / 4).is_err());
    }

    /// A mapped buffer is one the kernel may back with huge pages (`THPeligible` in its
    /// mapping's `/proc/self/smaps` entry), where the kernel has them on advice.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffers_are_advised_into_huge_pages() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !mode.contains("[madvise]") && !mode.contains("[always]") {
            println!("skipped: this kernel gives no transparent huge pages ({mode:?})");
            return;
        }
        let eligible = |at: usize| -> Option<bool> {
            let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
            let mut inside = false;
            for line in smaps.lines() {
                if let Some((range, _)) = line.split_once(' ') {
                    if let Some((lo, hi)) = range.split_once('-') {
                        if let (Ok(lo), Ok(hi)) =
                            (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                        {
                            inside = (lo..hi).contains(&at);
                            continue;
                        }
                    }
                }
                if let (true, Some(flag)) = (inside, line.strip_prefix("THPeligible:")) {
                    return Some(flag.trim() == "1");
                }
            }
            None
        };
        let mapped = Pages::<u8>::zeroed(HUGE_FROM).expect("memory");
        assert!(mapped.is_mapped());
        assert_eq!(eligible(mapped.as_ptr() as usize), Some(true));
        let heap = Pages::<u8>::zeroed(HUGE_FROM - 1).expect("memory");
        assert!(!heap.is_mapped());
    }

    /// A file is read whole whether it holds what its size says, less (it shrank) or more (it
    /// grew); `limit` and one byte more are read at most.
    #[test]
    fn a_file_is_read_whole_whatever_its_size_said() {
        let bytes: Vec<u8> = (0..HUGE_FROM + 5000).map(|i| (i * 7 % 251) as u8).collect();
        for size in [bytes.len(), bytes.len() - 100, bytes.len() + 100, 10] {
            let read = read_whole(&bytes[..], size as u64, u64::MAX - 1).expect("read");
            assert_eq!(&read[..], &bytes[..], "size {size}");
        }
        let read = read_whole(&bytes[..], bytes.len() as u64, HUGE_FROM as u64).expect("read");
        assert_eq!(&read[..], &bytes[..HUGE_FROM + 1]);
        let read = read_whole(&bytes[..], 100, 99).expect("read");
        assert_eq!(&read[..], &bytes[..100]);
    }
}
