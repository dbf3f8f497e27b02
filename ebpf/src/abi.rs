//! Kernel ABI numbers, socket address layouts and the context readers
//! that several program families share.

use weir_common::Addr;

pub(crate) const SOCK_STREAM: u32 = 1;
pub(crate) const SOCK_DGRAM: u32 = 2;
pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const IPPROTO_UDP: u32 = 17;
pub(crate) const V4_LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Reads a 4-word address from a context or socket field one word at a
/// time: the verifier rejects the pointer arithmetic LLVM emits when it
/// copies the array as a whole ("dereference of modified ctx ptr").
#[inline(always)]
pub(crate) fn read_words(p: *const [u32; 4]) -> Addr {
    let p = p as *const u32;
    // SAFETY: `p` points at a readable 16-byte field; volatile keeps each
    // access a separate, fixed-offset 4-byte load.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// Writes a 4-word address into a context field one word at a time.
#[inline(always)]
pub(crate) fn write_words(p: *mut [u32; 4], a: Addr) {
    let p = p as *mut u32;
    // SAFETY: `p` points at a writable 16-byte context field.
    unsafe {
        core::ptr::write_volatile(p, a[0]);
        core::ptr::write_volatile(p.add(1), a[1]);
        core::ptr::write_volatile(p.add(2), a[2]);
        core::ptr::write_volatile(p.add(3), a[3]);
    }
}

#[repr(C)]
pub(crate) struct SockaddrIn {
    pub(crate) family: u16,
    pub(crate) port: u16,
    pub(crate) addr: u32,
    pub(crate) zero: [u8; 8],
}

#[repr(C)]
pub(crate) struct SockaddrIn6 {
    pub(crate) family: u16,
    pub(crate) port: u16,
    pub(crate) flowinfo: u32,
    pub(crate) addr: Addr,
    pub(crate) scope_id: u32,
}
