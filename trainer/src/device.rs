//! Devices: `--device auto|cpu|cuda:N`, GPU discovery through the CUDA
//! driver API, and choosing candle's device.
//!
//! Discovery loads libcuda dynamically (cudarc's `dynamic-loading`), so the
//! binary builds and runs with no CUDA installed. cudarc panics when asked
//! for a function of a library it cannot load, so we first check that the
//! library loads at all and, as a second guard, run the queries under
//! `catch_unwind`: a machine without a driver reports "no GPU", never a
//! crash. Training on a GPU additionally needs the `cuda` cargo feature
//! (candle's CUDA backend); without it a GPU is listed but not used.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which device the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DeviceSpec {
    /// The first GPU if this build can use one, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("unknown device '{0}': expected auto, cpu or cuda:N")]
    Parse(String),
    #[error(
        "device cuda:{0} requested, but this binary was built without the `cuda` feature (rebuild with --features cuda)"
    )]
    NoCudaSupport(usize),
    #[error("device cuda:{ordinal} requested, but {found} GPU(s) were found")]
    NoSuchGpu { ordinal: usize, found: usize },
    #[error("cannot open cuda:{ordinal}: {detail}")]
    Open { ordinal: usize, detail: String },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Parse(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: u64,
    /// Compute capability (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
}

/// Whether this build can train on a GPU (the `cuda` feature).
pub fn cuda_build() -> bool {
    cfg!(feature = "cuda")
}

/// Every GPU the CUDA driver sees; empty when there is no driver, no GPU, or
/// the driver fails in any way.
pub fn discover_gpus() -> Vec<GpuInfo> {
    if !driver_library_present() {
        return Vec::new();
    }
    match std::panic::catch_unwind(query_driver) {
        Ok(Ok(gpus)) => gpus,
        Ok(Err(e)) => {
            tracing::debug!("CUDA driver present but not usable: {e}");
            Vec::new()
        }
        Err(_) => {
            tracing::debug!("CUDA driver query panicked; treating as no GPU");
            Vec::new()
        }
    }
}

/// Whether libcuda can be loaded, without cudarc's panicking loader.
#[allow(unsafe_code)]
fn driver_library_present() -> bool {
    // SAFETY: `is_culib_present` only tries `dlopen` on libcuda's usual
    // names and drops the handle; loading the vendor driver library runs its
    // initialisers, which is exactly what any CUDA program does.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[allow(unsafe_code)]
fn query_driver() -> Result<Vec<GpuInfo>, cudarc::driver::DriverError> {
    use cudarc::driver::result::{device, init};
    use cudarc::driver::sys::CUdevice_attribute as Attr;
    init()?;
    let count = device::get_count()?;
    let mut gpus = Vec::new();
    for ordinal in 0..count {
        let dev = device::get(ordinal)?;
        let name = device::get_name(dev)?;
        // SAFETY: `dev` was just returned by `cuDeviceGet` for a valid
        // ordinal, which is all these queries require.
        let (memory, major, minor) = unsafe {
            (
                device::total_mem(dev)?,
                device::get_attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                device::get_attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            )
        };
        gpus.push(GpuInfo {
            ordinal: ordinal as usize,
            name,
            memory_bytes: memory as u64,
            compute_capability: (major, minor),
        });
    }
    Ok(gpus)
}

/// The candle device for `spec`. `Auto` takes GPU 0 when this is a `cuda`
/// build and a GPU answers, otherwise the CPU.
pub fn select(spec: DeviceSpec) -> Result<candle_core::Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
        DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
        DeviceSpec::Auto => {
            if cuda_build() && !discover_gpus().is_empty() {
                match open_cuda(0) {
                    Ok(device) => return Ok(device),
                    Err(e) => tracing::warn!("falling back to the CPU: {e}"),
                }
            }
            Ok(candle_core::Device::Cpu)
        }
    }
}

fn open_cuda(ordinal: usize) -> Result<candle_core::Device, DeviceError> {
    if !cuda_build() {
        return Err(DeviceError::NoCudaSupport(ordinal));
    }
    let found = discover_gpus().len();
    if ordinal >= found {
        return Err(DeviceError::NoSuchGpu { ordinal, found });
    }
    candle_core::Device::new_cuda(ordinal).map_err(|e| DeviceError::Open {
        ordinal,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_round_trips() {
        for spec in [
            DeviceSpec::Auto,
            DeviceSpec::Cpu,
            DeviceSpec::Cuda(0),
            DeviceSpec::Cuda(3),
        ] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>(), Ok(spec));
        }
        assert_eq!("CUDA:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert!(matches!(
            "tpu".parse::<DeviceSpec>(),
            Err(DeviceError::Parse(_))
        ));
        assert!(matches!(
            "cuda:x".parse::<DeviceSpec>(),
            Err(DeviceError::Parse(_))
        ));
    }

    #[test]
    fn discovery_never_panics_and_cpu_always_works() {
        // On a machine without a driver this is empty; with one, it lists
        // real GPUs. Either way it returns.
        let gpus = discover_gpus();
        for gpu in &gpus {
            assert!(!gpu.name.is_empty());
        }
        assert!(matches!(
            select(DeviceSpec::Cpu),
            Ok(candle_core::Device::Cpu)
        ));
        assert!(select(DeviceSpec::Auto).is_ok());
        if !cuda_build() {
            assert_eq!(
                select(DeviceSpec::Cuda(0)).err(),
                Some(DeviceError::NoCudaSupport(0))
            );
        }
    }
}
