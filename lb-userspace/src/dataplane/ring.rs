//! The `RINGS` map mapped into our memory: a whole Maglev table is written without a syscall
//! per slot.
//!
//! A BPF array stores every element in `round_up(value_size, 8)` bytes, so the `u32` entries
//! sit at an 8-byte stride in the mapping (low half, little-endian; the high half stays zero).

use anyhow::{Result, bail};
use std::os::fd::{AsRawFd, BorrowedFd};

/// A shared mapping of the ring array (created with BPF_F_MMAPABLE).
const STRIDE: usize = 8;

pub struct RingMemory {
    base: *mut u64,
    entries: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; writes go through `&mut self`.
unsafe impl Send for RingMemory {}

impl RingMemory {
    pub fn map(fd: BorrowedFd<'_>, entries: u32) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (entries as usize * STRIDE).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks size and flags.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!("mmap of the ring map failed: {}", std::io::Error::last_os_error());
        }
        Ok(Self { base: base.cast(), entries: entries as usize, bytes })
    }

    /// Copies `table` to entries `offset..offset + table.len()`.
    pub fn write(&mut self, offset: u32, table: &[u32]) -> Result<()> {
        let start = offset as usize;
        if start + table.len() > self.entries {
            bail!("ring write of {} entries at {start} overruns the {} entries", table.len(), self.entries);
        }
        for (i, entry) in table.iter().enumerate() {
            // SAFETY: bounds checked above; the mapping is writable and lives as long as self.
            unsafe { self.base.add(start + i).write_volatile(*entry as u64) };
        }
        // Make the table visible before the VIP update that publishes it (that update is a
        // syscall, itself a full barrier; this keeps the intent explicit).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    pub fn read(&self, index: u32) -> Option<u32> {
        // SAFETY: bounds checked; u32 reads of shared memory.
        ((index as usize) < self.entries).then(|| unsafe { self.base.add(index as usize).read_volatile() as u32 })
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}
