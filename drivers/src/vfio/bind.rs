//! Finding NVMe controllers on the PCI bus and moving them between the kernel's `nvme` driver
//! and `vfio-pci`, as SPDK's `setup.sh` does, through sysfs.
//!
//! A controller whose namespaces (or their partitions) are mounted, used as swap, or held by
//! another block device (device-mapper, md) is never taken from the kernel: binding it to
//! vfio-pci would pull the disk from under them.

use std::path::{Path, PathBuf};

/// PCI class code of an NVM Express controller (mass storage, NVM, NVMe).
const NVME_CLASS: u32 = 0x010802;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "no PCI device {address} under {root}; `fathom-node devices` lists the NVMe controllers"
    )]
    NoDevice { address: String, root: String },
    #[error("PCI device {address} is not an NVMe controller (class {class:#08x})")]
    NotNvme { address: String, class: u32 },
    #[error("refusing to take {address} from the kernel: {what}; stop using it first")]
    InUse { address: String, what: String },
    #[error("the {driver} driver is not loaded: load it first (`modprobe {driver}`)")]
    DriverMissing { driver: String },
    #[error("{address}: writing {value:?} to {path}")]
    Write {
        address: String,
        path: String,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{address}: after binding, the device is bound to {actual}, not {wanted}")]
    NotBound {
        address: String,
        wanted: String,
        actual: String,
    },
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One NVMe controller on the PCI bus.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NvmeFunction {
    pub address: String,
    pub vendor: u16,
    pub device: u16,
    /// The kernel driver bound to it (`nvme`, `vfio-pci`), if any.
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// With the kernel driver: the controller's name (`nvme0`) and model.
    pub controller: Option<String>,
    pub model: Option<String>,
    /// With the kernel driver: its block devices (namespaces and partitions).
    pub block_devices: Vec<String>,
    /// Why it may not be taken from the kernel (mounts, swap, holders); empty when free.
    pub in_use: Vec<String>,
}

/// The system's view: sysfs and /proc, rooted elsewhere in tests.
pub struct System {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl Default for System {
    fn default() -> Self {
        Self {
            sys: "/sys".into(),
            proc: "/proc".into(),
        }
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_string())
}

fn read_hex(path: &Path) -> Option<u32> {
    read_trimmed(path).and_then(|text| u32::from_str_radix(text.trim_start_matches("0x"), 16).ok())
}

impl System {
    fn pci_devices(&self) -> PathBuf {
        self.sys.join("bus/pci/devices")
    }

    /// Every NVMe controller on the PCI bus, by address.
    pub fn nvme_functions(&self) -> Result<Vec<NvmeFunction>, BindError> {
        let dir = self.pci_devices();
        let entries = std::fs::read_dir(&dir).map_err(|source| BindError::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let mut functions = Vec::new();
        for entry in entries.flatten() {
            let address = entry.file_name().to_string_lossy().into_owned();
            if read_hex(&entry.path().join("class")) == Some(NVME_CLASS) {
                functions.push(self.function(&address)?);
            }
        }
        functions.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(functions)
    }

    /// What sysfs says of the NVMe controller at `address`.
    pub fn function(&self, address: &str) -> Result<NvmeFunction, BindError> {
        let address = super::pci::canonical_address(address);
        let path = self.pci_devices().join(&address);
        if !path.exists() {
            return Err(BindError::NoDevice {
                address,
                root: self.pci_devices().display().to_string(),
            });
        }
        let class = read_hex(&path.join("class")).unwrap_or(0);
        if class != NVME_CLASS {
            return Err(BindError::NotNvme { address, class });
        }
        let controller = std::fs::read_dir(path.join("nvme"))
            .ok()
            .and_then(|mut entries| entries.next())
            .and_then(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned());
        let model = controller
            .as_ref()
            .and_then(|name| read_trimmed(&path.join("nvme").join(name).join("model")));
        let block_devices = controller
            .as_ref()
            .map(|name| self.block_devices(name))
            .unwrap_or_default();
        let in_use = self.uses(&block_devices)?;
        Ok(NvmeFunction {
            vendor: read_hex(&path.join("vendor")).unwrap_or(0) as u16,
            device: read_hex(&path.join("device")).unwrap_or(0) as u16,
            driver: super::pci::bound_driver(&path),
            iommu_group: std::fs::read_link(path.join("iommu_group"))
                .ok()
                .and_then(|link| link.file_name()?.to_str()?.parse().ok()),
            controller,
            model,
            block_devices,
            in_use,
            address,
        })
    }

    /// The namespaces of controller `name` (`nvme0n1`, ...) and their partitions, as found in
    /// /sys/block (a namespace's block device may be named after another controller when
    /// multipath is on, so they are matched by their `device` link).
    fn block_devices(&self, controller: &str) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.sys.join("block")) else {
            return out;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let parent = std::fs::read_link(entry.path().join("device"))
                .ok()
                .and_then(|link| Some(link.file_name()?.to_string_lossy().into_owned()));
            let ours = parent.as_deref() == Some(controller)
                || (parent.is_none() && name.starts_with(&format!("{controller}n")));
            if !ours {
                continue;
            }
            // Partitions are subdirectories holding a `partition` file.
            if let Ok(parts) = std::fs::read_dir(entry.path()) {
                for part in parts.flatten() {
                    if part.path().join("partition").exists() {
                        out.push(part.file_name().to_string_lossy().into_owned());
                    }
                }
            }
            out.push(name);
        }
        out.sort();
        out
    }

    /// What holds any of `devices`: mounts, swap, stacked block devices.
    fn uses(&self, devices: &[String]) -> Result<Vec<String>, BindError> {
        let mut uses = Vec::new();
        if devices.is_empty() {
            return Ok(uses);
        }
        let numbers: Vec<(String, String)> = devices
            .iter()
            .filter_map(|name| Some((name.clone(), self.dev_number(name)?)))
            .collect();
        let mountinfo = self.proc.join("self/mountinfo");
        let text = std::fs::read_to_string(&mountinfo).map_err(|source| BindError::Read {
            path: mountinfo.display().to_string(),
            source,
        })?;
        for line in text.lines() {
            // mountinfo: id parent major:minor root mount-point ...
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(number), Some(point)) = (fields.get(2), fields.get(4)) else {
                continue;
            };
            if let Some((name, _)) = numbers.iter().find(|(_, n)| n == number) {
                uses.push(format!("{name} is mounted on {point}"));
            }
        }
        if let Ok(swaps) = std::fs::read_to_string(self.proc.join("swaps")) {
            for line in swaps.lines().skip(1) {
                let Some(file) = line.split_whitespace().next() else {
                    continue;
                };
                if let Some(name) = devices.iter().find(|name| file == format!("/dev/{name}")) {
                    uses.push(format!("{name} is in use as swap"));
                }
            }
        }
        for name in devices {
            let holders = self.block_path(name).join("holders");
            if let Ok(entries) = std::fs::read_dir(holders) {
                for holder in entries.flatten() {
                    uses.push(format!(
                        "{name} is held by {}",
                        holder.file_name().to_string_lossy()
                    ));
                }
            }
        }
        Ok(uses)
    }

    /// /sys/block/NAME, or /sys/block/DISK/NAME for a partition.
    fn block_path(&self, name: &str) -> PathBuf {
        let direct = self.sys.join("block").join(name);
        if direct.exists() {
            return direct;
        }
        std::fs::read_dir(self.sys.join("block"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|disk| disk.path().join(name))
            .find(|path| path.exists())
            .unwrap_or(direct)
    }

    fn dev_number(&self, name: &str) -> Option<String> {
        read_trimmed(&self.block_path(name).join("dev"))
    }

    fn write(&self, address: &str, path: PathBuf, value: &str) -> Result<(), BindError> {
        std::fs::write(&path, value).map_err(|source| BindError::Write {
            address: address.to_string(),
            path: path.display().to_string(),
            value: value.to_string(),
            source,
        })
    }

    /// Binds the controller at `address` to `driver` (`vfio-pci` to take it from the kernel,
    /// `nvme` to give it back): sets driver_override, unbinds the current driver, reprobes.
    /// Refuses to take a controller whose block devices are in use.
    pub fn bind(&self, address: &str, driver: &str) -> Result<NvmeFunction, BindError> {
        let function = self.function(address)?;
        let address = function.address.clone();
        if function.driver.as_deref() == Some(driver) {
            return Ok(function);
        }
        if !function.in_use.is_empty() {
            return Err(BindError::InUse {
                address,
                what: function.in_use.join(", "),
            });
        }
        if !self.sys.join("bus/pci/drivers").join(driver).exists() {
            return Err(BindError::DriverMissing {
                driver: driver.to_string(),
            });
        }
        let device = self.pci_devices().join(&address);
        self.write(&address, device.join("driver_override"), driver)?;
        if function.driver.is_some() {
            self.write(&address, device.join("driver/unbind"), &address)?;
        }
        let probed = self.write(&address, self.sys.join("bus/pci/drivers_probe"), &address);
        // The override is only needed for the probe; leaving it would keep the device from
        // ever going back to its usual driver on its own.
        let _ = std::fs::write(device.join("driver_override"), "\n");
        probed?;
        // The kernel's nvme driver probes asynchronously: wait until the controller is live
        // (its model and namespaces known) before describing it.
        let started = std::time::Instant::now();
        while driver == "nvme" && started.elapsed() < std::time::Duration::from_secs(10) {
            let state = std::fs::read_dir(device.join("nvme"))
                .ok()
                .and_then(|mut entries| entries.next()?.ok())
                .and_then(|entry| read_trimmed(&entry.path().join("state")));
            if state.as_deref() == Some("live") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let actual = super::pci::bound_driver(&device);
        if actual.as_deref() != Some(driver) {
            return Err(BindError::NotBound {
                address,
                wanted: driver.to_string(),
                actual: actual.unwrap_or_else(|| "no driver".into()),
            });
        }
        self.function(&address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs/proc tree with one NVMe controller bound to `nvme`, namespace nvme0n1 with
    /// partition nvme0n1p1 (259:1), and a network card.
    fn tree(mountinfo: &str) -> (tempfile::TempDir, System) {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let proc = dir.path().join("proc");
        let pci = sys.join("bus/pci/devices/0000:00:04.0");
        std::fs::create_dir_all(pci.join("nvme/nvme0")).unwrap();
        std::fs::write(pci.join("class"), "0x010802\n").unwrap();
        std::fs::write(pci.join("vendor"), "0x1b36\n").unwrap();
        std::fs::write(pci.join("device"), "0x0010\n").unwrap();
        std::fs::write(pci.join("nvme/nvme0/model"), "QEMU NVMe Ctrl  \n").unwrap();
        std::fs::create_dir_all(sys.join("bus/pci/drivers/nvme")).unwrap();
        std::os::unix::fs::symlink(sys.join("bus/pci/drivers/nvme"), pci.join("driver")).unwrap();
        let nic = sys.join("bus/pci/devices/0000:00:03.0");
        std::fs::create_dir_all(&nic).unwrap();
        std::fs::write(nic.join("class"), "0x020000\n").unwrap();
        let disk = sys.join("block/nvme0n1");
        std::fs::create_dir_all(disk.join("nvme0n1p1")).unwrap();
        std::fs::create_dir_all(disk.join("holders")).unwrap();
        std::fs::write(disk.join("dev"), "259:0\n").unwrap();
        std::fs::write(disk.join("nvme0n1p1/partition"), "1\n").unwrap();
        std::fs::write(disk.join("nvme0n1p1/dev"), "259:1\n").unwrap();
        std::fs::create_dir_all(proc.join("self")).unwrap();
        std::fs::write(proc.join("self/mountinfo"), mountinfo).unwrap();
        (dir, System { sys, proc })
    }

    const ROOT_ONLY: &str = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n";

    #[test]
    fn lists_nvme_controllers_with_their_driver_model_and_block_devices() {
        let (_dir, system) = tree(ROOT_ONLY);
        let functions = system.nvme_functions().unwrap();
        assert_eq!(functions.len(), 1, "the network card is not listed");
        let f = &functions[0];
        assert_eq!(f.address, "0000:00:04.0");
        assert_eq!((f.vendor, f.device), (0x1b36, 0x0010));
        assert_eq!(f.driver.as_deref(), Some("nvme"));
        assert_eq!(f.model.as_deref(), Some("QEMU NVMe Ctrl"));
        assert_eq!(f.block_devices, ["nvme0n1", "nvme0n1p1"]);
        assert!(f.in_use.is_empty());
    }

    #[test]
    fn refuses_to_take_a_controller_whose_partition_is_mounted() {
        let mounted = format!("{ROOT_ONLY}40 22 259:1 / /srv/data rw - ext4 /dev/nvme0n1p1 rw\n");
        let (_dir, system) = tree(&mounted);
        let error = system.bind("00:04.0", "vfio-pci").unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, BindError::InUse { .. }), "{text}");
        assert!(text.contains("nvme0n1p1 is mounted on /srv/data"), "{text}");
    }

    #[test]
    fn refuses_a_device_that_is_not_nvme_and_one_that_does_not_exist() {
        let (_dir, system) = tree(ROOT_ONLY);
        assert!(matches!(
            system.bind("0000:00:03.0", "vfio-pci"),
            Err(BindError::NotNvme {
                class: 0x020000,
                ..
            })
        ));
        assert!(matches!(
            system.bind("0000:00:09.0", "vfio-pci"),
            Err(BindError::NoDevice { .. })
        ));
    }

    #[test]
    fn a_missing_vfio_pci_driver_is_named_with_the_command_to_load_it() {
        let (_dir, system) = tree(ROOT_ONLY);
        let error = system.bind("0000:00:04.0", "vfio-pci").unwrap_err();
        assert!(error.to_string().contains("modprobe vfio-pci"), "{error}");
    }
}
