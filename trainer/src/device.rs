//! Devices: `--device auto|cpu|cuda:N`, GPU discovery through the CUDA
//! driver API, and choosing candle's device.
//!
//! In a CPU build, discovery loads libcuda dynamically (cudarc's
//! `dynamic-loading`), so the binary builds and runs with no CUDA installed.
//! cudarc panics when asked for a function of a library it cannot load, so
//! we first check that the library loads at all and, as a second guard, run
//! the queries under `catch_unwind`: a machine without a driver reports "no
//! GPU", never a crash. Training on a GPU needs the `cuda` cargo feature
//! (candle's CUDA backend); without it a GPU is listed but not used. A
//! `cuda` build links the CUDA libraries instead (candle asks cudarc for
//! `dynamic-linking`), so it needs the driver installed to start at all:
//! docs/training.md, "GPUs".

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

/// Whether libcuda can be loaded, without cudarc's panicking loader. A
/// `cuda` build links libcuda, so the process could not have started
/// without it.
#[cfg(feature = "cuda")]
fn driver_library_present() -> bool {
    true
}

/// Whether libcuda can be loaded, without cudarc's panicking loader.
#[cfg(not(feature = "cuda"))]
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
    candle_core::Device::new_cuda(ordinal).map_err(|e| {
        let error = e.to_string();
        DeviceError::Open {
            ordinal,
            detail: match cuda_error_hint(&error) {
                Some(hint) => format!("{error}; {hint}"),
                None => error,
            },
        }
    })
}

/// What to do about a CUDA error, for the errors a volunteer's setup
/// causes: a driver older than the toolkit the binary was built with, or
/// kernels compiled for another GPU generation.
pub fn cuda_error_hint(error: &str) -> Option<&'static str> {
    let error = error.to_ascii_uppercase();
    if error.contains("INSUFFICIENT_DRIVER") || error.contains("UNSUPPORTED_PTX_VERSION") {
        Some(
            "the NVIDIA driver is older than the CUDA toolkit this binary was built with: \
             update the driver, or rebuild against an older toolkit \
             (scripts/cuda-toolchain.sh --cuda 12.8)",
        )
    } else if error.contains("NO_BINARY_FOR_GPU") || error.contains("INVALID_PTX") {
        Some(
            "the GPU kernels were compiled for another GPU generation: rebuild with \
             CUDA_COMPUTE_CAP set to this GPU's compute capability (e.g. 89 for an RTX 40xx)",
        )
    } else {
        None
    }
}

/// Device memory as the allocator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMemory {
    /// Most bytes held at once since the last [`reset_peak_memory`].
    pub peak_bytes: u64,
    /// Where the figure comes from: `cuda-pool` (the CUDA memory pool's
    /// high-water mark of bytes in use: exact), `cuda-in-use` (total minus
    /// free, sampled now: the pool is off), or `process-rss` (the process's
    /// peak resident set: on the CPU, tensors and everything else).
    pub source: &'static str,
    /// The device's capacity, where known.
    pub total_bytes: Option<u64>,
}

/// Peak memory on `device` since the last [`reset_peak_memory`] (on the
/// CPU: since the process started). `None` when it cannot be read.
pub fn peak_memory(device: &candle_core::Device) -> Option<DeviceMemory> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => cuda_memory(device, false),
        _ => process_peak_rss().map(|peak_bytes| DeviceMemory {
            peak_bytes,
            source: "process-rss",
            total_bytes: None,
        }),
    }
}

/// Starts a new peak-memory window on a GPU (a no-op on the CPU, where the
/// kernel keeps the process's peak).
pub fn reset_peak_memory(device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(_) = device {
        let _ = cuda_memory(device, true);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// VmHWM from /proc/self/status, in bytes.
fn process_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Reads (and with `reset`, restarts) the CUDA memory pool's high-water
/// mark. cudarc allocates with `cuMemAllocAsync` from the device's default
/// pool when the device supports pools, so the mark counts every tensor.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn cuda_memory(device: &candle_core::Device, reset: bool) -> Option<DeviceMemory> {
    use cudarc::driver::{result, sys};
    let candle_core::Device::Cuda(cuda) = device else {
        return None;
    };
    let stream = cuda.cuda_stream();
    stream.synchronize().ok()?;
    let context = stream.context();
    let (free, total) = context.mem_get_info().ok()?;
    let sampled = DeviceMemory {
        peak_bytes: total.saturating_sub(free) as u64,
        source: "cuda-in-use",
        total_bytes: Some(total as u64),
    };
    if !context.has_async_alloc() {
        return Some(sampled);
    }
    let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    let mut high: u64 = 0;
    // SAFETY: the device handle comes from a live context; USED_MEM_HIGH is
    // a cuuint64_t by the driver API's contract, and `high` is one; setting
    // it to zero is the documented way to restart the mark.
    let read = unsafe {
        result::device::get_default_mem_pool(context.cu_device()).and_then(|pool| {
            result::mem_pool::get_attribute(pool, attribute, (&raw mut high).cast())?;
            if reset {
                let mut zero: u64 = 0;
                result::mem_pool::set_attribute(pool, attribute, (&raw mut zero).cast())?;
            }
            Ok(())
        })
    };
    Some(match read {
        Ok(()) => DeviceMemory {
            peak_bytes: high,
            source: "cuda-pool",
            total_bytes: Some(total as u64),
        },
        Err(_) => sampled,
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
        assert!(cuda_error_hint("DriverError(CUDA_ERROR_INSUFFICIENT_DRIVER, ..)").is_some());
        assert!(cuda_error_hint("CUDA_ERROR_NO_BINARY_FOR_GPU").is_some());
        assert!(cuda_error_hint("shape mismatch").is_none());
        if !cuda_build() {
            assert_eq!(
                select(DeviceSpec::Cuda(0)).err(),
                Some(DeviceError::NoCudaSupport(0))
            );
        }
    }
}
