//! NVMe passthrough: NVMe commands sent as io_uring commands (`IORING_OP_URING_CMD`) to the
//! kernel's NVMe generic character device (`/dev/ngXnY`, Linux 5.19 and later).
//!
//! The kernel's nvme driver keeps the controller, but a command skips the block layer and the
//! file system: the submission entry carries the NVMe command itself (opcode, namespace,
//! CDW10-15 as [`IoCommand::nvme_entry`] builds them for every NVMe transport), the
//! completion the NVMe status. The ring uses 128-byte submission entries and 32-byte
//! completion entries, as the kernel requires for these commands.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::{IoCommand, IoQueue};
use fathom_dma::DmaPool;
use fathom_nvme::spec::{admin_opcode, cns};
use fathom_nvme::{Completed, Namespace, QueueFull, Status};

/// `struct nvme_uring_cmd` and `struct nvme_passthru_cmd` (include/uapi/linux/nvme_ioctl.h):
/// the same 72 bytes, the last word being the result for the ioctl and reserved for io_uring.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PassthruCommand {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCommand>() == 72);

impl PassthruCommand {
    fn to_bytes(self) -> [u8; 80] {
        let mut out = [0u8; 80];
        // SAFETY: the struct is repr(C), 72 bytes without padding (all fields are naturally
        // aligned in declaration order), so its bytes are initialised and fit in `out`.
        let bytes: [u8; 72] = unsafe { std::mem::transmute(self) };
        out[..72].copy_from_slice(&bytes);
        out
    }
}

/// `_IO('N', 0x40)`: the namespace identifier of a namespace device.
const NVME_IOCTL_ID: libc::c_ulong = 0x4e40;
/// `_IOWR('N', 0x41, struct nvme_admin_cmd)`.
const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = 0xc048_4e41;
/// `_IOWR('N', 0x80, struct nvme_uring_cmd)`: an I/O command through io_uring.
const NVME_URING_CMD_IO: u32 = 0xc048_4e80;

/// The namespace behind an NVMe generic device: its identifier (from the kernel) and its
/// size and block size (Identify Namespace, as an admin command through the same device).
pub(super) fn identify(file: &File) -> Result<Namespace, String> {
    let fd = file.as_raw_fd();
    // SAFETY: an argument-less ioctl on an open descriptor; it only returns a number.
    let nsid = unsafe { libc::ioctl(fd, NVME_IOCTL_ID) };
    if nsid <= 0 {
        return Err(format!(
            "NVME_IOCTL_ID failed ({}): not an NVMe namespace device",
            std::io::Error::last_os_error()
        ));
    }
    let mut data = vec![0u8; 4096];
    let mut command = PassthruCommand {
        opcode: admin_opcode::IDENTIFY,
        nsid: nsid as u32,
        addr: data.as_mut_ptr() as u64,
        data_len: data.len() as u32,
        cdw10: cns::NAMESPACE,
        ..Default::default()
    };
    // SAFETY: `command` is the kernel's nvme_passthru_cmd layout and points at `data`, 4096
    // writable bytes that outlive the (synchronous) call.
    let status = unsafe { libc::ioctl(fd, NVME_IOCTL_ADMIN_CMD, &mut command) };
    match status {
        0 => Namespace::from_identify(nsid as u32, &data),
        n if n < 0 => Err(format!(
            "Identify Namespace through NVME_IOCTL_ADMIN_CMD failed ({}); it needs CAP_SYS_ADMIN",
            std::io::Error::last_os_error()
        )),
        n => Err(format!(
            "Identify Namespace failed with NVMe status {}",
            Status::from_status_phase((n as u16) << 1)
        )),
    }
}

/// A reactor's passthrough ring on one namespace.
pub(super) struct PassthruQueue {
    pub(super) ring: IoUring<squeue::Entry128, cqueue::Entry32>,
    pub(super) capacity: usize,
    pub(super) outstanding: usize,
    /// The namespace's real identifier (the engine knows the device as namespace 1).
    pub(super) nsid: u32,
    pub(super) iopoll: bool,
    /// The errno of the last command the kernel refused (for the open-time probe).
    pub(super) last_errno: i32,
    /// Buffers point into the pool: keep it mapped while commands may be in flight.
    pub(super) _pool: DmaPool,
}

impl IoQueue for PassthruQueue {
    #[inline]
    fn submit(&mut self, command: &IoCommand, cookie: u32) -> Result<(), QueueFull> {
        if self.outstanding == self.capacity {
            return Err(QueueFull);
        }
        let entry = command.nvme_entry();
        let (addr, data_len) = command
            .data
            .map_or((0, 0), |data| (data.addr, data.len as u32));
        let passthru = PassthruCommand {
            opcode: entry.opcode(),
            nsid: self.nsid,
            addr,
            data_len,
            cdw10: entry.cdw10,
            cdw11: entry.cdw11,
            cdw12: entry.cdw12,
            cdw13: entry.cdw13,
            cdw14: entry.cdw14,
            cdw15: entry.cdw15,
            ..Default::default()
        };
        let sqe = opcode::UringCmd80::new(types::Fixed(0), NVME_URING_CMD_IO)
            .cmd(passthru.to_bytes())
            .build()
            .user_data(cookie as u64);
        // SAFETY: the data buffer is DMA pool memory owned by the engine until this command's
        // completion is reaped; the pool outlives the ring (`_pool`).
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| QueueFull)?;
        self.outstanding += 1;
        Ok(())
    }

    #[inline]
    fn ring(&mut self) {
        super::submit_queued(&mut self.ring);
    }

    #[inline]
    fn reap(&mut self, out: &mut [Completed]) -> usize {
        super::surface_completions(&mut self.ring, self.outstanding, self.iopoll);
        let mut reaped = 0;
        for cqe in self.ring.completion().take(out.len()) {
            let result = cqe.result();
            // >= 0: the NVMe status field (0: success); < 0: the kernel refused the command.
            let status = if result >= 0 {
                Status::from_status_phase((result as u16) << 1)
            } else {
                self.last_errno = -result;
                match -result {
                    libc::EINVAL => Status::INVALID_FIELD,
                    libc::EOPNOTSUPP => Status::INVALID_OPCODE,
                    _ => Status::INTERNAL_ERROR,
                }
            };
            out[reaped] = Completed {
                cookie: cqe.user_data() as u32,
                status,
                result: cqe.big_cqe()[0] as u32,
            };
            reaped += 1;
        }
        self.outstanding -= reaped;
        reaped
    }

    fn outstanding(&self) -> usize {
        self.outstanding
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn wait(&mut self, timeout: std::time::Duration) -> bool {
        super::wait_for_completion(&mut self.ring, self.outstanding, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_bytes_sit_where_the_kernel_reads_them() {
        let command = PassthruCommand {
            opcode: 0x02,
            nsid: 7,
            addr: 0x1122_3344_5566_7788,
            data_len: 4096,
            cdw10: 0xaabb_ccdd,
            cdw12: 7,
            ..Default::default()
        };
        let bytes = command.to_bytes();
        assert_eq!(bytes[0], 0x02);
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 7);
        assert_eq!(
            u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        assert_eq!(u32::from_le_bytes(bytes[36..40].try_into().unwrap()), 4096);
        assert_eq!(
            u32::from_le_bytes(bytes[40..44].try_into().unwrap()),
            0xaabb_ccdd
        );
        assert_eq!(u32::from_le_bytes(bytes[48..52].try_into().unwrap()), 7);
        assert!(bytes[72..].iter().all(|&b| b == 0));
    }
}
