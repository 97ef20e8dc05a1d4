//! A stand-in for `libnvidia-ml.so` that serves the GPUs described in a JSON file, so that tests
//! drive agentd's real `nvml-wrapper` code path without a GPU.
//!
//! The file is named by `FAKE_NVML_CONFIG` and re-read on every call that needs it, so a test can
//! change a GPU while the agent runs; a test should replace it by rename, so no call reads half a
//! file. Its format is in [`config`]. `nvml-wrapper` resolves each symbol lazily into a `Result`,
//! so functions not exported here fail only when called, with `NvmlError::FailedToLoadSymbol`.
//!
//! Exported: `nvmlInit`, `nvmlInit_v2`, `nvmlInitWithFlags`, `nvmlShutdown`, `nvmlErrorString`,
//! `nvmlSystemGetDriverVersion`, `nvmlSystemGetNVMLVersion`, `nvmlSystemGetCudaDriverVersion`
//! (and `_v2`), `nvmlDeviceGetCount` (and `_v2`), `nvmlDeviceGetHandleByIndex` (and `_v2`),
//! `nvmlDeviceGetHandleByUUID`, `nvmlDeviceGetHandleByPciBusId_v2`, `nvmlDeviceGetIndex`,
//! `nvmlDeviceGetName`, `nvmlDeviceGetUUID`, `nvmlDeviceGetMinorNumber`, `nvmlDeviceGetPciInfo_v2`/`_v3`,
//! `nvmlDeviceGetMemoryInfo` (and `_v2`), `nvmlDeviceGetUtilizationRates`,
//! `nvmlDeviceGetTemperature`, `nvmlDeviceGetPowerUsage`, `nvmlDeviceGetEnforcedPowerLimit`,
//! `nvmlDeviceGetPowerManagementLimit`, `nvmlDeviceGetTotalEnergyConsumption`,
//! `nvmlDeviceGetTotalEccErrors`, `nvmlDeviceGetSupportedEventTypes`, `nvmlEventSetCreate`,
//! `nvmlEventSetFree`, `nvmlDeviceRegisterEvents`, `nvmlEventSetWait_v2`.
//!
//! Modelled: init/shutdown reference counting (calls before init return
//! `NVML_ERROR_UNINITIALIZED`); a GPU with `lost: true` answers `NVML_ERROR_GPU_IS_LOST` to every
//! call on it, including getting its handle; optional sensors that are absent from the file answer
//! `NVML_ERROR_NOT_SUPPORTED`; an unreadable or invalid file makes every call that needs it return
//! `NVML_ERROR_UNKNOWN` (and prints the reason once to stderr); critical XID events are delivered
//! once per process through event sets. `nvmlInit*` fails with `NVML_ERROR_DRIVER_NOT_LOADED`
//! when `FAKE_NVML_CONFIG` is unset.
//!
//! Safety contract of every export: it is NVML's. Pointer arguments are either null (answered
//! with `NVML_ERROR_INVALID_ARGUMENT`) or valid for the struct or buffer length the NVML
//! documentation gives; string arguments are NUL-terminated. Device and event-set handles are
//! small integers disguised as pointers and are never dereferenced.

// The exports carry NVML's C names, and their safety contract is the one stated above.
#![allow(non_snake_case, clippy::missing_safety_doc)]

pub mod config;
pub mod events;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::io::Write;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use config::{FakeConfig, FakeGpu, PciAddress, parse_pci_bus_id};
use events::Deliveries;

/// `nvmlReturn_t`.
pub type NvmlReturn = c_uint;
/// `nvmlDevice_t`: here the GPU index plus one.
pub type DeviceHandle = *mut c_void;
/// `nvmlEventSet_t`: here the set's id.
pub type EventSetHandle = *mut c_void;

pub const NVML_SUCCESS: NvmlReturn = 0;
pub const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
pub const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
pub const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
pub const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
pub const NVML_ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
pub const NVML_ERROR_TIMEOUT: NvmlReturn = 10;
pub const NVML_ERROR_GPU_IS_LOST: NvmlReturn = 15;
pub const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;
pub const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

/// `nvmlEventTypeXidCriticalError`, the only event type modelled.
pub const EVENT_TYPE_XID_CRITICAL_ERROR: c_ulonglong = 8;

/// `nvmlPciInfo_t` (the layout `nvmlDeviceGetPciInfo_v2`/`_v3` fill).
#[repr(C)]
pub struct PciInfo {
    pub bus_id_legacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub bus_id: [c_char; 32],
}

/// `nvmlMemory_t`.
#[repr(C)]
pub struct Memory {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct MemoryV2 {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `NVML_STRUCT_VERSION(Memory, 2)`: the caller must set it, as real NVML checks it.
pub const MEMORY_V2_VERSION: c_uint = (size_of::<MemoryV2>() | (2 << 24)) as c_uint;

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct Utilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// `nvmlEventData_t` (the `_v2` wait layout).
#[repr(C)]
pub struct EventData {
    pub device: DeviceHandle,
    pub event_type: c_ulonglong,
    pub event_data: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

struct State {
    init_count: u32,
    /// Event sets by id: the GPU indices registered for XID events in each.
    event_sets: BTreeMap<usize, BTreeSet<usize>>,
    next_event_set: usize,
    deliveries: Deliveries,
    /// The last config error printed, so a broken file is reported once, not on every call.
    last_config_error: Option<String>,
}

static STATE: Mutex<State> = Mutex::new(State {
    init_count: 0,
    event_sets: BTreeMap::new(),
    next_event_set: 0,
    deliveries: Deliveries::new(),
    last_config_error: None,
});

/// A panic must never cross the C boundary, so a poisoned lock is simply taken over: the state
/// is a few counters that stay consistent between statements.
fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn status(result: Result<(), NvmlReturn>) -> NvmlReturn {
    match result {
        Ok(()) => NVML_SUCCESS,
        Err(code) => code,
    }
}

/// Reads the config for a call made after init.
fn read_config(state: &mut State) -> Result<FakeConfig, NvmlReturn> {
    if state.init_count == 0 {
        return Err(NVML_ERROR_UNINITIALIZED);
    }
    match FakeConfig::load_from_env() {
        Ok(config) => {
            state.last_config_error = None;
            Ok(config)
        }
        Err(e) => {
            if state.last_config_error.as_deref() != Some(e.0.as_str()) {
                // Ignoring a failed write: stderr may be closed, and this is only a hint.
                let _ = writeln!(std::io::stderr(), "fake-nvml: {e}");
                state.last_config_error = Some(e.0);
            }
            Err(NVML_ERROR_UNKNOWN)
        }
    }
}

fn config() -> Result<FakeConfig, NvmlReturn> {
    read_config(&mut state())
}

fn device_handle(index: usize) -> DeviceHandle {
    std::ptr::without_provenance_mut(index + 1)
}

/// The GPU behind a handle, or the error NVML gives for it.
fn gpu(device: DeviceHandle) -> Result<(usize, FakeGpu), NvmlReturn> {
    let config = config()?;
    let index = device
        .addr()
        .checked_sub(1)
        .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
    let gpu = config
        .gpus
        .into_iter()
        .nth(index)
        .ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
    if gpu.lost {
        return Err(NVML_ERROR_GPU_IS_LOST);
    }
    Ok((index, gpu))
}

/// Writes an out-parameter.
///
/// # Safety
/// `out` is null or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T) -> Result<(), NvmlReturn> {
    if out.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: `out` is not null, and the caller guarantees it is valid for a write of `T`.
    unsafe { out.write(value) };
    Ok(())
}

/// Copies `text` and a terminating NUL into a caller's buffer of `length` bytes.
///
/// # Safety
/// `buffer` is null or valid for writes of `length` bytes.
unsafe fn put_str(buffer: *mut c_char, length: c_uint, text: &str) -> Result<(), NvmlReturn> {
    if buffer.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    let bytes = text.as_bytes();
    if bytes.len() >= length as usize {
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: `buffer` is valid for `length` bytes and `bytes.len() + 1 <= length`; a caller's
    // buffer cannot overlap this process-owned string.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buffer, bytes.len());
        buffer.add(bytes.len()).write(0);
    }
    Ok(())
}

/// Reads a NUL-terminated argument.
///
/// # Safety
/// `text` is null or points to a NUL-terminated string.
unsafe fn arg_str<'a>(text: *const c_char) -> Result<&'a str, NvmlReturn> {
    if text.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: not null, and the caller guarantees NUL termination.
    let text = unsafe { CStr::from_ptr(text) };
    text.to_str().map_err(|_| NVML_ERROR_INVALID_ARGUMENT)
}

/// Copies `text` into a fixed array, truncating so the terminating NUL always fits.
fn fill(array: &mut [c_char], text: &str) {
    let len = text.len().min(array.len().saturating_sub(1));
    for (slot, byte) in array.iter_mut().zip(text.as_bytes()[..len].iter()) {
        *slot = *byte as c_char;
    }
    if let Some(end) = array.get_mut(len) {
        *end = 0;
    }
}

fn pci_info(address: PciAddress) -> PciInfo {
    let PciAddress {
        domain,
        bus,
        device,
        function,
    } = address;
    let mut info = PciInfo {
        bus_id_legacy: [0; 16],
        domain,
        bus,
        device,
        pci_device_id: 0,
        pci_sub_system_id: 0,
        bus_id: [0; 32],
    };
    fill(
        &mut info.bus_id_legacy,
        &format!(
            "{:04X}:{bus:02X}:{device:02X}.{function:X}",
            domain & 0xFFFF
        ),
    );
    fill(
        &mut info.bus_id,
        &format!("{domain:08X}:{bus:02X}:{device:02X}.{function:X}"),
    );
    info
}

fn init() -> NvmlReturn {
    if std::env::var_os(config::CONFIG_ENV).is_none() {
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    let mut state = state();
    state.init_count = state.init_count.saturating_add(1);
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    init()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit() -> NvmlReturn {
    init()
}

/// Flags (no GPUs, no attach) change nothing here: the fake has nothing to attach.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    init()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    let mut state = state();
    if state.init_count == 0 {
        return NVML_ERROR_UNINITIALIZED;
    }
    state.init_count -= 1;
    if state.init_count == 0 {
        state.event_sets.clear();
    }
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    let text: &'static CStr = match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        NVML_ERROR_TIMEOUT => c"Timeout",
        NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    let config = match config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    // SAFETY: NVML's contract: `version` holds `length` bytes.
    status(unsafe { put_str(version, length, &config.driver_version) })
}

/// NVML's own version is "<CUDA major>.<driver version>", e.g. "12.550.54.15".
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    let config = match config() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let text = format!("{}.{}", config.cuda_version / 1000, config.driver_version);
    // SAFETY: NVML's contract: `version` holds `length` bytes.
    status(unsafe { put_str(version, length, &text) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> NvmlReturn {
    // SAFETY: NVML's contract: `version` is valid for a write.
    status(config().and_then(|config| unsafe { put(version, config.cuda_version) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> NvmlReturn {
    // SAFETY: same contract as the `_v2` function.
    unsafe { nvmlSystemGetCudaDriverVersion_v2(version) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    let result = config().and_then(|config| {
        let n = c_uint::try_from(config.gpus.len()).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: NVML's contract: `count` is valid for a write.
        unsafe { put(count, n) }
    });
    status(result)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> NvmlReturn {
    // SAFETY: same contract as the `_v2` function.
    unsafe { nvmlDeviceGetCount_v2(count) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut DeviceHandle,
) -> NvmlReturn {
    let result = config().and_then(|config| {
        let index = index as usize;
        let gpu = config.gpus.get(index).ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        if gpu.lost {
            return Err(NVML_ERROR_GPU_IS_LOST);
        }
        // SAFETY: NVML's contract: `device` is valid for a write.
        unsafe { put(device, device_handle(index)) }
    });
    status(result)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut DeviceHandle,
) -> NvmlReturn {
    // SAFETY: same contract as the `_v2` function.
    unsafe { nvmlDeviceGetHandleByIndex_v2(index, device) }
}

/// Finds a GPU by a predicate and hands out its handle.
///
/// # Safety
/// `device` is null or valid for a write.
unsafe fn handle_where(
    device: *mut DeviceHandle,
    matches: impl Fn(&FakeGpu) -> bool,
) -> NvmlReturn {
    let result = config().and_then(|config| {
        let index = config
            .gpus
            .iter()
            .position(matches)
            .ok_or(NVML_ERROR_NOT_FOUND)?;
        if config.gpus[index].lost {
            return Err(NVML_ERROR_GPU_IS_LOST);
        }
        // SAFETY: the caller's contract.
        unsafe { put(device, device_handle(index)) }
    });
    status(result)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut DeviceHandle,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `uuid` is a NUL-terminated string.
    let uuid = match unsafe { arg_str(uuid) } {
        Ok(uuid) => uuid,
        Err(code) => return code,
    };
    // SAFETY: NVML's contract: `device` is valid for a write.
    unsafe { handle_where(device, |gpu| gpu.uuid == uuid) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus_id: *const c_char,
    device: *mut DeviceHandle,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `bus_id` is a NUL-terminated string.
    let Ok(Some(wanted)) = (unsafe { arg_str(bus_id) }).map(parse_pci_bus_id) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    // SAFETY: NVML's contract: `device` is valid for a write.
    unsafe {
        handle_where(device, |gpu| {
            parse_pci_bus_id(&gpu.pci_bus_id) == Some(wanted)
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: DeviceHandle,
    index: *mut c_uint,
) -> NvmlReturn {
    let result = gpu(device).and_then(|(i, _)| {
        let i = c_uint::try_from(i).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: NVML's contract: `index` is valid for a write.
        unsafe { put(index, i) }
    });
    status(result)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: DeviceHandle,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `name` holds `length` bytes.
    status(gpu(device).and_then(|(_, gpu)| unsafe { put_str(name, length, &gpu.name) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: DeviceHandle,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `uuid` holds `length` bytes.
    status(gpu(device).and_then(|(_, gpu)| unsafe { put_str(uuid, length, &gpu.uuid) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: DeviceHandle,
    minor: *mut c_uint,
) -> NvmlReturn {
    status(gpu(device).and_then(|(position, gpu)| {
        let number = gpu.minor_number.unwrap_or(position as u32);
        // SAFETY: NVML's contract: `minor` is valid for a write of an unsigned int.
        unsafe { put(minor, number) }
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: DeviceHandle,
    pci: *mut PciInfo,
) -> NvmlReturn {
    let result = gpu(device).and_then(|(_, gpu)| {
        // Validated when the config was loaded, so this only fails if that check is wrong.
        let address = parse_pci_bus_id(&gpu.pci_bus_id).ok_or(NVML_ERROR_UNKNOWN)?;
        // SAFETY: NVML's contract: `pci` is valid for a write of `nvmlPciInfo_t`.
        unsafe { put(pci, pci_info(address)) }
    });
    status(result)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v2(
    device: DeviceHandle,
    pci: *mut PciInfo,
) -> NvmlReturn {
    // SAFETY: same contract and layout as the `_v3` function.
    unsafe { nvmlDeviceGetPciInfo_v3(device, pci) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: DeviceHandle,
    memory: *mut Memory,
) -> NvmlReturn {
    let result = gpu(device).and_then(|(_, gpu)| {
        let value = Memory {
            total: gpu.memory_total_bytes,
            free: gpu.memory_total_bytes - gpu.memory_used_bytes,
            used: gpu.memory_used_bytes,
        };
        // SAFETY: NVML's contract: `memory` is valid for a write of `nvmlMemory_t`.
        unsafe { put(memory, value) }
    });
    status(result)
}

/// No memory is reserved by the fake driver: `free + used == total`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: DeviceHandle,
    memory: *mut MemoryV2,
) -> NvmlReturn {
    if memory.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: not null, and NVML's contract makes it a readable `nvmlMemory_v2_t` whose
    // `version` the caller set.
    let version = unsafe { std::ptr::addr_of!((*memory).version).read() };
    if version != MEMORY_V2_VERSION {
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    let result = gpu(device).and_then(|(_, gpu)| {
        let value = MemoryV2 {
            version,
            total: gpu.memory_total_bytes,
            reserved: 0,
            free: gpu.memory_total_bytes - gpu.memory_used_bytes,
            used: gpu.memory_used_bytes,
        };
        // SAFETY: checked above.
        unsafe { put(memory, value) }
    });
    status(result)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: DeviceHandle,
    utilization: *mut Utilization,
) -> NvmlReturn {
    let result = gpu(device).and_then(|(_, gpu)| {
        let value = Utilization {
            gpu: gpu.utilization_gpu,
            memory: gpu.utilization_memory,
        };
        // SAFETY: NVML's contract: `utilization` is valid for a write of `nvmlUtilization_t`.
        unsafe { put(utilization, value) }
    });
    status(result)
}

/// Writes an optional reading, `NVML_ERROR_NOT_SUPPORTED` when the file leaves it out.
///
/// # Safety
/// `out` is null or valid for a write of `T`.
unsafe fn put_reading<T>(
    device: DeviceHandle,
    out: *mut T,
    read: impl FnOnce(&FakeGpu) -> Option<T>,
) -> NvmlReturn {
    let result = gpu(device).and_then(|(_, gpu)| {
        let value = read(&gpu).ok_or(NVML_ERROR_NOT_SUPPORTED)?;
        // SAFETY: the caller's contract.
        unsafe { put(out, value) }
    });
    status(result)
}

/// Only the GPU die sensor (`NVML_TEMPERATURE_GPU`, 0) exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: DeviceHandle,
    sensor: c_uint,
    temperature: *mut c_uint,
) -> NvmlReturn {
    if sensor != 0 {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: NVML's contract: `temperature` is valid for a write.
    unsafe { put_reading(device, temperature, |gpu| gpu.temperature_c) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: DeviceHandle,
    power_mw: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `power_mw` is valid for a write.
    unsafe { put_reading(device, power_mw, |gpu| gpu.power_usage_mw) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: DeviceHandle,
    limit_mw: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `limit_mw` is valid for a write.
    unsafe { put_reading(device, limit_mw, |gpu| gpu.power_limit_mw) }
}

/// The fake has one power limit, so the management limit is the enforced one.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementLimit(
    device: DeviceHandle,
    limit_mw: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `limit_mw` is valid for a write.
    unsafe { put_reading(device, limit_mw, |gpu| gpu.power_limit_mw) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: DeviceHandle,
    energy_mj: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `energy_mj` is valid for a write.
    unsafe { put_reading(device, energy_mj, |gpu| gpu.energy_mj) }
}

/// Error type 0 is corrected, 1 uncorrected; volatile and aggregate counters read the same.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: DeviceHandle,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> NvmlReturn {
    if error_type > 1 || counter_type > 1 {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: NVML's contract: `count` is valid for a write.
    unsafe {
        put_reading(device, count, |gpu| {
            if error_type == 0 {
                gpu.ecc_corrected
            } else {
                gpu.ecc_uncorrected
            }
        })
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: DeviceHandle,
    types: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: NVML's contract: `types` is valid for a write.
    unsafe { put_reading(device, types, |_| Some(EVENT_TYPE_XID_CRITICAL_ERROR)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut EventSetHandle) -> NvmlReturn {
    let mut state = state();
    if state.init_count == 0 {
        return NVML_ERROR_UNINITIALIZED;
    }
    state.next_event_set += 1;
    let id = state.next_event_set;
    // SAFETY: NVML's contract: `set` is valid for a write.
    let result = unsafe { put(set, std::ptr::without_provenance_mut(id)) };
    if result.is_ok() {
        state.event_sets.insert(id, BTreeSet::new());
    }
    status(result)
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: EventSetHandle) -> NvmlReturn {
    let mut state = state();
    if state.init_count == 0 {
        return NVML_ERROR_UNINITIALIZED;
    }
    match state.event_sets.remove(&set.addr()) {
        Some(_) => NVML_SUCCESS,
        None => NVML_ERROR_INVALID_ARGUMENT,
    }
}

/// Only critical XID events exist; asking for any other type is `NVML_ERROR_NOT_SUPPORTED`, as
/// real NVML answers for a type the GPU lacks.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: DeviceHandle,
    event_types: c_ulonglong,
    set: EventSetHandle,
) -> NvmlReturn {
    let index = match gpu(device) {
        Ok((index, _)) => index,
        Err(code) => return code,
    };
    if event_types & !EVENT_TYPE_XID_CRITICAL_ERROR != 0 {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    let mut state = state();
    let Some(registered) = state.event_sets.get_mut(&set.addr()) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    if event_types != 0 {
        registered.insert(index);
    }
    NVML_SUCCESS
}

/// Delivers the next undelivered XID of a GPU registered in `set`, waiting up to `timeout_ms`
/// (re-reading the file every 10 ms) before answering `NVML_ERROR_TIMEOUT`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: EventSetHandle,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> NvmlReturn {
    if data.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        {
            let mut state = state();
            let config = match read_config(&mut state) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let Some(registered) = state.event_sets.get(&set.addr()).cloned() else {
                return NVML_ERROR_INVALID_ARGUMENT;
            };
            if let Some((index, xid)) = state.deliveries.next(&config, &registered) {
                let event = EventData {
                    device: device_handle(index),
                    event_type: EVENT_TYPE_XID_CRITICAL_ERROR,
                    event_data: xid,
                    gpu_instance_id: 0,
                    compute_instance_id: 0,
                };
                // SAFETY: NVML's contract: `data` is valid for a write of `nvmlEventData_t`.
                return status(unsafe { put(data, event) });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return NVML_ERROR_TIMEOUT;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}
