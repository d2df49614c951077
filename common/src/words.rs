//! Copying and clearing plain data in the kernel programs as written. LLVM turns a struct
//! assignment, or a run of adjacent stores of zero, into a call of `memmove` or `memset`, and on
//! BPF those are compiler-builtins' byte loops: about seven instructions a byte (copying a
//! request's 136-byte aggregate into its record ran ~950). Volatile accesses are kept as they
//! are: whole words, inline.

/// Copies `*src` to `*dst` a word at a time.
///
/// # Safety
/// Both must be valid for `T` (8-byte aligned and a multiple of 8 bytes long: asserted).
#[inline(always)]
pub unsafe fn copy<T: Copy>(dst: *mut T, src: *const T) {
    const { assert!(size_of::<T>() % 8 == 0 && align_of::<T>() % 8 == 0) };
    let (d, s) = (dst.cast::<u64>(), src.cast::<u64>());
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        // SAFETY: word i of a T, inside both, aligned as asserted.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Stores `value` in `field` (a store LLVM does not merge with its neighbours into a memset).
#[inline(always)]
pub fn set<T: Copy>(field: &mut T, value: T) {
    // SAFETY: a reference is valid and aligned for a write.
    unsafe { core::ptr::write_volatile(field, value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Agg {
        a: u64,
        b: u32,
        c: u16,
        d: u16,
        e: [u8; 8],
    }

    #[test]
    fn copy_moves_every_byte() {
        let src = Agg { a: u64::MAX - 1, b: 7, c: 0xabcd, d: 3, e: *b"\r\n0\r\n\r\nx" };
        let mut dst = Agg { a: 0, b: 0, c: 0, d: 0, e: [0; 8] };
        // SAFETY: both are `Agg`s.
        unsafe { copy(&mut dst, &src) };
        assert_eq!(dst, src);
    }

    #[test]
    fn set_stores() {
        let mut x = Agg { a: 1, b: 2, c: 3, d: 4, e: [5; 8] };
        set(&mut x.b, 0);
        set(&mut x.e, [0; 8]);
        assert_eq!(x, Agg { a: 1, b: 0, c: 3, d: 4, e: [0; 8] });
    }
}
