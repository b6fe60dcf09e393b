//! A PCI function opened through VFIO: its config space, BAR0 mapped into this process, and
//! the DMA pool mapped into its IOMMU domain.
//!
//! This is the edge of the `vfio` driver: every `unsafe` of it is here (the BAR mapping, MMIO
//! accesses, config-space reads and writes on the device descriptor, VFIO_IOMMU_MAP_DMA).
//! Opening goes through rust-vmm's `vfio-ioctls` (container, group, device); the BAR is
//! mapped by hand because that crate has no helper for it.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioRegionInfoCap};

use fathom_dma::DmaPool;

/// Where PCI functions appear in sysfs.
pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// The IOMMU's default 39-bit address width (Intel VT-d with 3-level tables): IOVAs at or
/// above this are refused by the IOMMU.
pub const IOVA_LIMIT: u64 = 1 << 39;

/// PCI config space: the Command register and its Bus Master Enable and Memory Space bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// Why a PCI function could not be opened or set up through VFIO.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("no PCI device {address} ({PCI_DEVICES}/{address} does not exist); `fathom-node devices` lists the NVMe controllers this host has")]
    NoDevice { address: String },
    #[error("PCI device {address} is bound to `{driver}`, not vfio-pci: bind it with `fathom-node devices bind {address}` (as root)")]
    NotVfio { address: String, driver: String },
    #[error("PCI device {address} has no IOMMU group: enable the IOMMU (kernel command line `intel_iommu=on` or `amd_iommu=on`) and load vfio-pci")]
    NoIommuGroup { address: String },
    #[error("PCI device {address}: VFIO {what}")]
    Vfio {
        address: String,
        what: &'static str,
        #[source]
        source: vfio_ioctls::VfioError,
    },
    #[error("PCI device {address}: BAR0 {what}")]
    Bar { address: String, what: String },
    #[error("PCI device {address}: {what}")]
    Io {
        address: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("PCI device {address}: the DMA pool (IOVA {iova:#x}, {len} bytes) does not fit below the IOMMU's 2^39 address limit; use a smaller dma.size")]
    IovaRange {
        address: String,
        iova: u64,
        len: usize,
    },
}

/// A PCI address in canonical form (`0000:00:04.0`); `00:04.0` gets domain 0.
pub fn canonical_address(address: &str) -> String {
    if address.matches(':').count() == 1 {
        format!("0000:{address}")
    } else {
        address.to_string()
    }
}

/// The kernel driver a PCI function is bound to, if any.
pub fn bound_driver(sysfs: &Path) -> Option<String> {
    std::fs::read_link(sysfs.join("driver"))
        .ok()
        .and_then(|link| {
            link.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
}

/// BAR0 mapped into this process: the controller's registers and doorbells.
pub struct Bar {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is device memory that lives as long as this value; every access is a
// volatile read or write of one aligned register, which the device serialises itself.
unsafe impl Send for Bar {}
// SAFETY: as above; no reference to the mapped memory is ever created.
unsafe impl Sync for Bar {}

impl Bar {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn register<T>(&self, offset: usize) -> *mut T {
        assert!(
            offset.is_multiple_of(std::mem::size_of::<T>())
                && offset + std::mem::size_of::<T>() <= self.len,
            "register {offset:#x} outside the {} byte BAR mapping",
            self.len
        );
        // SAFETY: checked above to lie inside the mapping.
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    pub fn read32(&self, offset: usize) -> u32 {
        // SAFETY: an aligned register inside the live mapping (checked by `register`).
        unsafe { self.register::<u32>(offset).read_volatile() }
    }

    pub fn write32(&self, offset: usize, value: u32) {
        // SAFETY: an aligned register inside the live mapping (checked by `register`).
        unsafe { self.register::<u32>(offset).write_volatile(value) }
    }

    /// A 64-bit register read as two 32-bit halves, low first, which every controller
    /// accepts (not all accept one 64-bit access).
    pub fn read64(&self, offset: usize) -> u64 {
        self.read32(offset) as u64 | (self.read32(offset + 4) as u64) << 32
    }

    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// A pointer to the 32-bit register at `offset`, for a doorbell.
    pub fn register32(&self, offset: usize) -> NonNull<u32> {
        NonNull::new(self.register::<u32>(offset)).expect("inside a non-null mapping")
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `VfioPci::map_bar0`; doorbells that point into it
        // are owned by queue pairs that hold this `Bar` alive through an `Arc`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One PCI function opened through VFIO.
pub struct VfioPci {
    address: String,
    // Field order is drop order: the BAR is unmapped before the device descriptor closes, and
    // the device closes before its container.
    bar0: Arc<Bar>,
    device: VfioDevice,
    container: Arc<VfioContainer>,
    dma: Option<(u64, usize)>,
}

impl VfioPci {
    /// Opens `address` (bound to vfio-pci) through a new VFIO container and maps BAR0.
    pub fn open(address: &str) -> Result<Self, PciError> {
        let address = canonical_address(address);
        let sysfs = PathBuf::from(PCI_DEVICES).join(&address);
        if !sysfs.exists() {
            return Err(PciError::NoDevice { address });
        }
        match bound_driver(&sysfs) {
            Some(driver) if driver == "vfio-pci" => {}
            driver => {
                return Err(PciError::NotVfio {
                    address,
                    driver: driver.unwrap_or_else(|| "no driver".into()),
                })
            }
        }
        if !sysfs.join("iommu_group").exists() {
            return Err(PciError::NoIommuGroup { address });
        }
        let vfio = |what| {
            let address = address.clone();
            move |source| PciError::Vfio {
                address,
                what,
                source,
            }
        };
        let container = Arc::new(VfioContainer::new(None).map_err(vfio(
            "container (/dev/vfio/vfio; is the vfio-pci module loaded?)",
        ))?);
        let device = VfioDevice::new(&sysfs, container.clone(), false).map_err(vfio(
            "device (is another process, or a VM, holding its IOMMU group?)",
        ))?;
        let bar0 = Arc::new(Self::map_bar0(&address, &device)?);
        Ok(Self {
            address,
            bar0,
            device,
            container,
            dma: None,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn bar0(&self) -> &Arc<Bar> {
        &self.bar0
    }

    fn map_bar0(address: &str, device: &VfioDevice) -> Result<Bar, PciError> {
        let index = VFIO_PCI_BAR0_REGION_INDEX;
        let bar_error = |what: String| PciError::Bar {
            address: address.to_string(),
            what,
        };
        let size = device.get_region_size(index);
        if size == 0 {
            return Err(bar_error("is absent".into()));
        }
        if device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(bar_error("cannot be memory-mapped through VFIO".into()));
        }
        // With the MSI-X table inside BAR0, only parts of it may be mapped: take the area that
        // starts at 0, which holds the registers and the doorbells.
        let mut len = size;
        for cap in device.get_region_caps(index) {
            if let VfioRegionInfoCap::SparseMmap(sparse) = cap {
                len = sparse
                    .areas
                    .iter()
                    .find(|area| area.offset == 0)
                    .map(|area| area.size)
                    .ok_or_else(|| bar_error("has no mappable area at offset 0".into()))?;
            }
        }
        let len = len as usize;
        // SAFETY: maps the region of the device descriptor VFIO describes as mappable; the
        // kernel chooses the address, so no existing mapping is replaced.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                device.get_region_offset(index) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PciError::Io {
                address: address.to_string(),
                what: format!("mapping {len} bytes of BAR0"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Bar {
            base: NonNull::new(ptr.cast()).expect("mmap returned a non-null address"),
            len,
        })
    }

    fn config_io(&self, offset: u64, buf: *mut u8, len: usize, write: bool) -> std::io::Result<()> {
        let position = self.device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + offset;
        let fd = self.device.as_raw_fd();
        // SAFETY: `buf` points to `len` bytes owned by the caller for the duration of the call;
        // the descriptor is the open VFIO device.
        let done = unsafe {
            if write {
                libc::pwrite(fd, buf.cast(), len, position as libc::off_t)
            } else {
                libc::pread(fd, buf.cast(), len, position as libc::off_t)
            }
        };
        match done {
            n if n == len as isize => Ok(()),
            n if n < 0 => Err(std::io::Error::last_os_error()),
            n => Err(std::io::Error::other(format!(
                "short config access: {n} of {len} bytes"
            ))),
        }
    }

    /// Turns on memory decoding and bus mastering: vfio-pci leaves bus mastering off, and
    /// without it the controller cannot reach its queues (Identify would never complete).
    pub fn enable_bus_master(&self) -> Result<(), PciError> {
        let io_error = |source| PciError::Io {
            address: self.address.clone(),
            what: "writing the PCI Command register".into(),
            source,
        };
        let mut command = [0u8; 2];
        self.config_io(PCI_COMMAND, command.as_mut_ptr(), 2, false)
            .map_err(io_error)?;
        let value = u16::from_le_bytes(command) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        let mut bytes = value.to_le_bytes();
        self.config_io(PCI_COMMAND, bytes.as_mut_ptr(), 2, true)
            .map_err(io_error)
    }

    /// Maps the whole DMA pool into the device's IOMMU domain at the pool's IOVAs.
    pub fn map_dma(&mut self, pool: &DmaPool) -> Result<(), PciError> {
        let (host, len) = pool.host_range();
        let iova = pool.iova_base();
        if iova
            .checked_add(len as u64)
            .is_none_or(|end| end > IOVA_LIMIT)
        {
            return Err(PciError::IovaRange {
                address: self.address.clone(),
                iova,
                len,
            });
        }
        // SAFETY: the pool's memory is only ever accessed through raw pointers (see `dma`), so
        // no Rust reference to it exists; it stays mapped until `Drop` unmaps the IOVA range,
        // which runs before the pool can go (the driver holds the pool).
        unsafe { self.container.vfio_dma_map(iova, len, host) }.map_err(|source| {
            PciError::Vfio {
                address: self.address.clone(),
                what: "VFIO_IOMMU_MAP_DMA of the DMA pool (are enough pages lockable? see `ulimit -l`)",
                source,
            }
        })?;
        self.dma = Some((iova, len));
        Ok(())
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        if let Some((iova, len)) = self.dma.take() {
            if let Err(error) = self.container.vfio_dma_unmap(iova, len) {
                tracing::warn!(
                    "{}: unmapping DMA memory from the IOMMU: {error}",
                    self.address
                );
            }
        }
    }
}
