//! What the kernel programs do with captured heads (finding a request head's end, telling a
//! response head written alone, copying the kept bytes into a record), kept here so that it is
//! unit-tested on the host (the eBPF crate builds for BPF only) and shared with the bench's
//! probe. Written for the verifier: loops
//! bounded by constants, raw reads inside the buffer (an indexing bounds check would leave a
//! panic path it refuses).

const LF: u64 = 0x0a0a_0a0a_0a0a_0a0a;
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Does the word hold a `\n` byte? (A zero byte of `w ^ LF`: the classic test, exact for whether
/// there is one.)
#[inline(always)]
fn has_lf(w: u64) -> bool {
    let v = w ^ LF;
    v.wrapping_sub(ONES) & !v & HIGHS != 0
}

/// Where the first blank line (`\r\n\r\n`) in the first `len` bytes of `buf` (at most `KEEP`)
/// ends: the index of its last `\n`. Read a word at a time, and byte by byte only in words that
/// hold a `\n`: a head of a few hundred bytes has a dozen lines, so most words are passed over
/// with a load and four operations (byte by byte, a 46-byte head cost the request's first read
/// ~100 ns here).
///
/// # Safety
/// `buf` must be 8-byte aligned (the heads in the kernel's state are).
#[inline(always)]
pub unsafe fn blank_line_end<const KEEP: usize, const BUF: usize>(buf: &[u8; BUF], len: usize) -> Option<usize> {
    const { assert!(KEEP % 8 == 0 && BUF >= KEEP) };
    let p = buf.as_ptr();
    let mut w = 0;
    while w < KEEP / 8 {
        let base = w * 8;
        if base >= len {
            return None;
        }
        // SAFETY: word `w` < KEEP / 8 lies inside `buf`, aligned as the caller promised.
        let word = unsafe { core::ptr::read_volatile(p.add(base).cast::<u64>()) };
        if has_lf(word) {
            // The word's bytes are compared whatever `len`, which is checked once a blank line is
            // found: a check of `len` per byte gave the verifier a different bound on it along each
            // path, too many paths to follow.
            let mut j = 0;
            while j < 8 {
                let i = base + j;
                // Little-endian: byte `j` of the word is `buf[i]`.
                // SAFETY: 3 <= i < KEEP <= BUF: the three bytes before `i` are inside `buf`.
                if i >= 3
                    && (word >> (8 * j)) as u8 == b'\n'
                    && unsafe { *p.add(i - 1) == b'\r' && *p.add(i - 2) == b'\n' && *p.add(i - 3) == b'\r' }
                {
                    // The first blank line: within what was captured, or none is.
                    return (i < len).then_some(i);
                }
                j += 1;
            }
        }
        w += 1;
    }
    None
}

/// Copies the kept bytes of a head (`len`, at most `KEEP`) into a record, a word at a time:
/// plain loads and stores the JIT emits inline. A `bpf_probe_read_kernel` call per head cost
/// the request's end ~75 ns each here (a helper call pays the retpoline/return-thunk tax).
/// The last word may carry up to 7 bytes past the kept length; the agent reads no further.
///
/// # Safety
/// `dst` and `src` must be 8-byte aligned (the record's and the state's heads follow 8-byte
/// fields: asserted where they are copied).
#[inline(always)]
pub unsafe fn copy_head<const KEEP: usize, const BUF: usize>(dst: &mut [u8; KEEP], src: &[u8; BUF], len: u32) {
    const { assert!(KEEP % 8 == 0 && BUF >= KEEP) };
    let words = (len as usize).div_ceil(8);
    let d = dst.as_mut_ptr().cast::<u64>();
    let s = src.as_ptr().cast::<u64>();
    let mut i = 0;
    // A loop bounded by a constant, which the verifier follows; volatile so that LLVM does not
    // turn it into a memcpy call (BPF has none of variable length).
    while i < KEEP / 8 {
        if i >= words {
            break;
        }
        // SAFETY: i < KEEP / 8 words, inside both buffers, aligned as the caller promised.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Do the bytes start with `HTTP/1.`? (Compared byte by byte: a slice comparison would call
/// memcmp, which eBPF does not have.)
#[inline(always)]
pub fn is_http1(b: &[u8]) -> bool {
    const P: &[u8; 7] = b"HTTP/1.";
    b.len() >= 7 && b[0] == P[0] && b[1] == P[1] && b[2] == P[2] && b[3] == P[3] && b[4] == P[4] && b[5] == P[5] && b[6] == P[6]
}

/// Is the captured response head (the first `len` bytes of `buf`, all of one write) a whole
/// HTTP/1.x head, its blank line ending the write? Servers that write the head alone (gunicorn)
/// are recognised so: what they write next is body, which nothing reads.
#[inline(always)]
pub fn is_head_alone<const KEEP: usize, const BUF: usize>(buf: &[u8; BUF], len: usize) -> bool {
    const { assert!(KEEP.is_power_of_two() && BUF >= KEEP + 4) };
    if len < 16 || len > KEEP {
        return false;
    }
    let p = buf.as_ptr();
    // len - 4 < KEEP: the mask only tells the verifier.
    let i = (len - 4) & (KEEP - 1);
    // SAFETY: i + 3 < KEEP + 4 <= BUF.
    is_http1(buf) && unsafe { *p.add(i) == b'\r' && *p.add(i + 1) == b'\n' && *p.add(i + 2) == b'\r' && *p.add(i + 3) == b'\n' }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: usize = 64;

    #[repr(C, align(8))]
    struct Head([u8; 2 * KEEP]);

    fn head(bytes: &[u8]) -> Head {
        let mut h = Head([b'x'; 2 * KEEP]);
        h.0[..bytes.len()].copy_from_slice(bytes);
        h
    }

    fn scan(bytes: &[u8], len: usize) -> Option<usize> {
        // SAFETY: `Head` is 8-byte aligned.
        unsafe { blank_line_end::<KEEP, { 2 * KEEP }>(&head(bytes).0, len) }
    }

    /// What the scan must find, byte by byte.
    fn naive(bytes: &[u8], len: usize) -> Option<usize> {
        let len = len.min(KEEP).min(bytes.len());
        (3..len).find(|&i| &bytes[i - 3..=i] == b"\r\n\r\n")
    }

    #[test]
    fn finds_the_first_blank_line() {
        let h = b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(scan(h, h.len()), Some(31));
        assert_eq!(scan(h, 32), Some(31));
        assert_eq!(scan(h, 31), None, "its last byte not captured");
    }

    #[test]
    fn bare_newlines_and_short_heads_are_no_blank_line() {
        assert_eq!(scan(b"GET / HTTP/1.0\n\nxx", 18), None);
        assert_eq!(scan(b"\r\n\r", 3), None);
        assert_eq!(scan(b"\r\n\r\n", 4), Some(3));
        assert_eq!(scan(b"", 0), None);
    }

    #[test]
    fn blank_lines_across_words_and_at_the_end_of_what_is_kept() {
        for at in 0..KEEP - 3 {
            let mut b = [b'a'; KEEP];
            b[at..at + 4].copy_from_slice(b"\r\n\r\n");
            assert_eq!(scan(&b, KEEP), Some(at + 3), "blank line at {at}");
        }
        // Past the kept bytes: not looked at, even if the buffer holds them.
        let mut b = [b'a'; 2 * KEEP];
        b[KEEP - 2..KEEP + 2].copy_from_slice(b"\r\n\r\n");
        assert_eq!(scan(&b, 2 * KEEP), None);
    }

    #[test]
    fn agrees_with_a_byte_by_byte_scan() {
        // Bytes drawn mostly from CR, LF and a letter, so that blank lines and near misses abound.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut b = [0u8; KEEP];
            for byte in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = [b'\r', b'\n', b'a', b'\r', b'\n'][(x % 5) as usize];
            }
            let len = (x >> 32) as usize % (KEEP + 8);
            assert_eq!(scan(&b, len), naive(&b, len), "{b:?} len {len}");
        }
    }

    #[test]
    fn copy_head_moves_the_kept_bytes_in_whole_words_and_no_more() {
        #[repr(C, align(8))]
        struct Record([u8; KEEP]);
        let src = head(b"HTTP/1.1 200 OK\r\n\r\n");
        for len in [0u32, 1, 8, 9, 19, 64] {
            let mut dst = Record([0; KEEP]);
            // SAFETY: both are 8-byte aligned.
            unsafe { copy_head::<KEEP, { 2 * KEEP }>(&mut dst.0, &src.0, len) };
            let words = (len as usize).div_ceil(8) * 8;
            assert_eq!(&dst.0[..words], &src.0[..words], "len {len}");
            assert!(dst.0[words..].iter().all(|&b| b == 0), "len {len}: nothing past its last word");
        }
    }

    #[test]
    fn a_head_written_alone() {
        let h = head(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n");
        assert!(is_head_alone::<KEEP, { 2 * KEEP }>(&h.0, 30));
        // With body bytes after it, cut short, not HTTP, or longer than kept: no.
        let h = head(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nbody");
        assert!(!is_head_alone::<KEEP, { 2 * KEEP }>(&h.0, 34));
        assert!(!is_head_alone::<KEEP, { 2 * KEEP }>(&h.0, 28));
        let h = head(b"HTTX/1.1 200 OK\r\nServer: x\r\n\r\n");
        assert!(!is_head_alone::<KEEP, { 2 * KEEP }>(&h.0, 30));
        assert!(!is_head_alone::<KEEP, { 2 * KEEP }>(&head(b"HTTP/1.1 200 OK\r\n").0, KEEP + 1));
        assert!(!is_head_alone::<KEEP, { 2 * KEEP }>(&head(b"HTTP/1.1\r\n\r\n").0, 12));
    }
}
