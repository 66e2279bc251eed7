//! `IOMMU_GET_HW_INFO`: what IOMMU sits in front of a device, typed.

use std::os::fd::AsFd;

use iommufd_sys as sys;

use super::{BoundDevice, IommuDevice};
use crate::error::Result;
use crate::ioctl::{self, Sized32};

bitflags::bitflags! {
    /// Generic IOMMU capabilities of the device's IOMMU (`IOMMU_HW_CAP_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct HwCapabilities: u64 {
        /// The IOMMU can track dirty pages (allocate a [`Hwpt`](crate::Hwpt) with DIRTY_TRACKING).
        const DIRTY_TRACKING = sys::IOMMU_HW_CAP_DIRTY_TRACKING as u64;
        /// PCI PASID execute permission is supported.
        const PCI_PASID_EXEC = sys::IOMMU_HW_CAP_PCI_PASID_EXEC as u64;
        /// PCI PASID privileged mode is supported.
        const PCI_PASID_PRIV = sys::IOMMU_HW_CAP_PCI_PASID_PRIV as u64;
        /// ATS is not supported or cannot be used for this device.
        const PCI_ATS_NOT_SUPPORTED = sys::IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED as u64;
        const _ = !0;
    }
}

/// Driver-specific IOMMU information, one variant per `IOMMU_HW_INFO_TYPE_*`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HwInfoData {
    /// No driver-specific data (for example virtio-iommu).
    None,
    /// Intel VT-d: the capability and extended capability registers.
    IntelVtd {
        /// `IOMMU_HW_INFO_VTD_*` flags (errata).
        flags: u32,
        /// The VT-d capability register.
        cap_reg: u64,
        /// The VT-d extended capability register.
        ecap_reg: u64,
    },
    /// ARM SMMUv3: its ID registers.
    ArmSmmuv3 {
        /// `IOMMU_HW_INFO_ARM_SMMUV3_*` flags.
        flags: u32,
        /// IDR0..IDR5.
        idr: [u32; 6],
        /// IIDR.
        iidr: u32,
        /// AIDR.
        aidr: u32,
    },
    /// NVIDIA Tegra241 CMDQV (an SMMUv3 extension).
    Tegra241Cmdqv {
        /// Flags.
        flags: u32,
        /// CMDQV version.
        version: u8,
        /// log2 of the number of virtual command queues.
        log2vcmdqs: u8,
        /// log2 of the number of SID replacements.
        log2vsids: u8,
    },
    /// AMD IOMMU: the extended feature registers.
    Amd {
        /// EFR.
        efr: u64,
        /// EFR2.
        efr2: u64,
    },
    /// A type this crate does not know yet, with its raw data.
    Unknown {
        /// The `IOMMU_HW_INFO_TYPE_*` value.
        kind: u32,
        /// The raw bytes the kernel returned.
        data: Vec<u8>,
    },
}

/// The answer of `IOMMU_GET_HW_INFO` for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwInfo {
    /// Driver-specific data.
    pub data: HwInfoData,
    /// Generic capabilities.
    pub capabilities: HwCapabilities,
    /// log2 of the number of PASIDs the device supports (0: no PASID).
    pub max_pasid_log2: u8,
}

fn read<T: Copy + Default>(bytes: &[u8]) -> T {
    let mut v = T::default();
    let n = bytes.len().min(std::mem::size_of::<T>());
    // SAFETY: `T` is one of the kernel's plain-old-data `iommu_hw_info_*` structs (every bit pattern
    // valid); at most `size_of::<T>()` bytes are copied into it from a slice at least `n` long.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), n) };
    v
}

impl BoundDevice {
    /// Queries the device's IOMMU (`IOMMU_GET_HW_INFO`, Linux 6.6).
    pub fn hw_info(&self) -> Result<HwInfo> {
        hw_info(self)
    }
}

/// Queries the IOMMU of any device known to an iommufd (`IOMMU_GET_HW_INFO`, Linux 6.6).
pub fn hw_info(device: &impl IommuDevice) -> Result<HwInfo> {
    let mut data = [0u8; 256];
    let mut arg = sys::iommu_hw_info::new();
    arg.dev_id = device.dev_id();
    arg.data_len = data.len() as u32;
    arg.data_uptr = data.as_mut_ptr() as u64;
    // SAFETY: IOMMU_GET_HW_INFO takes `iommu_hw_info`, sized by `new()`; `data_uptr` points at
    // `data_len` writable bytes of `data`, alive for the call, and the kernel writes at most that.
    unsafe { ioctl::call(device.iommufd().as_fd(), &ioctl::GET_HW_INFO, &mut arg) }?;
    // SAFETY: reading the `out_data_type` member of the kernel-filled union; both members are u32.
    let kind = unsafe { arg.__bindgen_anon_1.out_data_type };
    Ok(decode(kind, &data, arg.data_len, arg.out_capabilities, arg.out_max_pasid_log2))
}

/// Decodes the kernel's answer: the data type, the buffer it filled and the length it reported (which
/// may exceed the buffer: only the buffer's bytes are read), the capabilities and the PASID width.
/// Total: any input decodes, never reading past `buffer`.
fn decode(kind: u32, buffer: &[u8], data_len: u32, capabilities: u64, max_pasid_log2: u8) -> HwInfo {
    let len = usize::try_from(data_len).unwrap_or(usize::MAX).min(buffer.len());
    let bytes = &buffer[..len];
    let data = match kind {
        sys::IOMMU_HW_INFO_TYPE_NONE => HwInfoData::None,
        sys::IOMMU_HW_INFO_TYPE_INTEL_VTD => {
            let v: sys::iommu_hw_info_vtd = read(bytes);
            HwInfoData::IntelVtd { flags: v.flags, cap_reg: v.cap_reg, ecap_reg: v.ecap_reg }
        }
        sys::IOMMU_HW_INFO_TYPE_ARM_SMMUV3 => {
            let v: sys::iommu_hw_info_arm_smmuv3 = read(bytes);
            HwInfoData::ArmSmmuv3 { flags: v.flags, idr: v.idr, iidr: v.iidr, aidr: v.aidr }
        }
        sys::IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV => {
            let v: sys::iommu_hw_info_tegra241_cmdqv = read(bytes);
            HwInfoData::Tegra241Cmdqv {
                flags: v.flags,
                version: v.version,
                log2vcmdqs: v.log2vcmdqs,
                log2vsids: v.log2vsids,
            }
        }
        sys::IOMMU_HW_INFO_TYPE_AMD => {
            let v: sys::iommu_hw_info_amd = read(bytes);
            HwInfoData::Amd { efr: v.efr, efr2: v.efr2 }
        }
        kind => HwInfoData::Unknown { kind, data: bytes.to_vec() },
    };
    HwInfo { data, capabilities: HwCapabilities::from_bits_retain(capabilities), max_pasid_log2 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_types_decode_their_fields() {
        let mut vtd = 7u32.to_ne_bytes().to_vec();
        vtd.extend_from_slice(&[0; 4]);
        vtd.extend_from_slice(&0x1122u64.to_ne_bytes());
        vtd.extend_from_slice(&0x3344u64.to_ne_bytes());
        let info = decode(sys::IOMMU_HW_INFO_TYPE_INTEL_VTD, &vtd, 24, 1, 20);
        assert_eq!(info.data, HwInfoData::IntelVtd { flags: 7, cap_reg: 0x1122, ecap_reg: 0x3344 });
        assert_eq!(info.capabilities, HwCapabilities::DIRTY_TRACKING);
        assert_eq!(info.max_pasid_log2, 20);
        // A shorter answer leaves the rest zero; a longer reported length reads only the buffer.
        let short = decode(sys::IOMMU_HW_INFO_TYPE_INTEL_VTD, &vtd, 16, 0, 0);
        assert_eq!(short.data, HwInfoData::IntelVtd { flags: 7, cap_reg: 0x1122, ecap_reg: 0 });
        let long = decode(sys::IOMMU_HW_INFO_TYPE_INTEL_VTD, &vtd, u32::MAX, 0, 0);
        assert_eq!(long.data, info.data);
        let unknown = decode(0xdead, &vtd, 5, 0, 0);
        assert_eq!(unknown.data, HwInfoData::Unknown { kind: 0xdead, data: vtd[..5].to_vec() });
    }

    fn kinds() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(sys::IOMMU_HW_INFO_TYPE_NONE),
            Just(sys::IOMMU_HW_INFO_TYPE_INTEL_VTD),
            Just(sys::IOMMU_HW_INFO_TYPE_ARM_SMMUV3),
            Just(sys::IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV),
            Just(sys::IOMMU_HW_INFO_TYPE_AMD),
            any::<u32>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::device::prop_cases()))]

        /// Any type, bytes, reported length and flags: a value, never a panic or a read past the
        /// buffer; an unknown type keeps exactly the bytes the kernel reported (up to the buffer).
        #[test]
        fn decode_is_total(
            kind in kinds(),
            buffer in proptest::collection::vec(any::<u8>(), 0..300),
            data_len: u32,
            capabilities: u64,
            max_pasid_log2: u8,
        ) {
            let info = decode(kind, &buffer, data_len, capabilities, max_pasid_log2);
            prop_assert_eq!(info.capabilities.bits(), capabilities);
            prop_assert_eq!(info.max_pasid_log2, max_pasid_log2);
            if let HwInfoData::Unknown { kind: k, data } = &info.data {
                prop_assert_eq!(*k, kind);
                let n = (data_len as usize).min(buffer.len());
                prop_assert_eq!(&data[..], &buffer[..n]);
            }
        }

        /// Zero-extension: decoding a prefix equals decoding it padded with zeros to full length.
        #[test]
        fn a_short_answer_reads_as_zero_padded(
            kind in kinds(),
            buffer in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut padded = buffer.clone();
            padded.resize(256, 0);
            let short = decode(kind, &buffer, buffer.len() as u32, 0, 0);
            let full = decode(kind, &padded, 256, 0, 0);
            if !matches!(short.data, HwInfoData::Unknown { .. }) {
                prop_assert_eq!(short.data, full.data);
            }
        }
    }
}
